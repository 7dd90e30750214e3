"""Writing output files so that a full disk is one clear OSError and never damages a file already there."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


class FailSoftly(io.RawIOBase):
    """A binary file whose write never raises: it keeps the first OSError for `error` and drops the rest.

    torch's C++ writers turn a failed write into an internal RuntimeError, or abort the process when the
    failure comes while they clean up; the caller raises `error` once the writer is done instead.
    """

    def __init__(self, handle: BinaryIO):
        super().__init__()
        self.handle, self.error = handle, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.handle.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.error is None:
            try:
                self.handle.write(data)
            except OSError as error:
                self.error = error
        return len(data) if isinstance(data, bytes) else memoryview(data).nbytes


def _with_name(error: OSError, path: Path) -> OSError:
    return OSError(error.errno, error.strerror, str(path)) if error.errno else error


@contextmanager
def replace_file(path: str | Path) -> Iterator[FailSoftly]:
    """A binary file whose bytes replace path only once all are written and on disk.

    A full disk or a kill leaves a file already at path whole; a device (/dev/null) is written in place.
    A failed write raises its OSError (naming path) when the block ends.
    """
    path = Path(path)
    direct = path.exists() and not path.is_file()
    target = path if direct else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            with open(target, "wb") as handle:
                sink = FailSoftly(handle)
                yield sink
                if sink.error is not None:
                    raise sink.error
                handle.flush()
                if not direct:
                    os.fsync(handle.fileno())
        except OSError as error:
            raise _with_name(error, path) from None
        if not direct:
            os.replace(target, path)
    finally:
        if not direct:
            target.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """path's new content, written as replace_file writes it."""
    with replace_file(path) as handle:
        handle.write(data)
