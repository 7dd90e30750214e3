"""One training per run folder: an OS-level lock that dies with the process holding it."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from ..errors import TorchcvtError

LOCK_NAME = ".train.lock"


class RunLock:
    """An exclusive flock on FOLDER/.train.lock, naming its holder (pid and host) inside.

    The kernel drops a flock when its process ends, however it ends, so a killed run never leaves a
    stale lock; the file itself stays, harmless.
    """

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or a one-line ValueError naming the live process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process starting up"
            os.close(fd)
            raise TorchcvtError(
                f"run folder {self.path.parent} is in use by another training ({holder}); wait for it to "
                "finish or stop it, or give another train.output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_holder(folder: str | Path) -> str | None:
    """Who holds FOLDER's run lock (its pid and host), or None when no live process does."""
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 200).decode(errors="replace").strip() or "a process starting up"
    finally:
        os.close(fd)
    return None
