"""The one module that writes files: whole or not at all, on disk before a replaced file goes; a full disk
one clear OSError and Ctrl-C during a write a KeyboardInterrupt (not torch's internal error), neither
damaging a file already there.

Every output file is written beside its destination and renamed over it once its bytes are on disk; a
folder written as one unit (a transformers export, a data tree) is built beside its destination and put
in place in one step. New files get mode 0666 less the umask (0644 as a rule), as torch.save's do.
A path that exists and is not a regular file or folder (a device, a FIFO, a socket) is refused unless the
writer streams to it on purpose (stream=True). Outside this module only lock files are opened for
writing, and TensorBoard's SummaryWriter (third-party) writes its own event files
(tests/test_files_structure.py keeps it so).
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from .errors import TorchcvtError

# What renameat2 needs to swap two paths in one step (Linux 3.15+; not every file system has it).
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_SPECIAL = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
            (stat.S_ISSOCK, "a socket"))


class FailSoftly(io.RawIOBase):
    """A binary file whose write never raises: it keeps the first OSError or Ctrl-C (KeyboardInterrupt) for
    `error` and drops the rest.

    torch's C++ writers turn a failed or interrupted write into an internal RuntimeError, or abort the
    process when the failure comes while they clean up; the caller raises `error` once the writer is done
    instead.
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
            except (OSError, KeyboardInterrupt) as error:
                self.error = error
        return len(data) if isinstance(data, bytes) else memoryview(data).nbytes


def special_kind(path: str | Path) -> str | None:
    """What path is when it exists and is neither a regular file nor a folder ('a FIFO'...), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return next((name for test, name in _SPECIAL if test(mode)), None)


def refuse_special(path: str | Path, what: str = "output") -> None:
    """A one-line error when path is a device, FIFO or socket: a writer would replace or fill it."""
    kind = special_kind(path)
    if kind is not None:
        raise TorchcvtError(f"{what} {path} is {kind}, not a regular file: give a file name")


def _with_name(error: OSError, path: Path) -> OSError:
    return OSError(error.errno, error.strerror, str(path)) if error.errno else error


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def replace_file(path: str | Path, keep_previous_as: Path | None = None, stream: bool = False
                 ) -> Iterator[FailSoftly]:
    """A binary file whose bytes replace path only once all are written and on disk.

    A full disk or a kill leaves a file already at path whole. A failed write raises its OSError (naming
    path) when the block ends. keep_previous_as gives the file being replaced a second name first, so that
    some file is at path at every moment a kill may come. A device, FIFO or socket at path is written in
    place with stream=True and refused otherwise.
    """
    path = Path(path)
    direct = special_kind(path) is not None
    if direct and not stream:
        refuse_special(path)
    target = path if direct else _temporary(path)
    previous_tmp = None
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
        if direct:
            return
        if keep_previous_as is not None and path.is_file():
            previous_tmp = _temporary(keep_previous_as)
            try:
                os.link(path, previous_tmp)
            except OSError:
                shutil.copyfile(path, previous_tmp)
            os.replace(previous_tmp, keep_previous_as)
        os.replace(target, path)
        fsync_folder(path.parent)
    finally:
        if not direct:
            target.unlink(missing_ok=True)
        if previous_tmp is not None:
            previous_tmp.unlink(missing_ok=True)


def fsync_folder(folder: Path) -> None:
    """Put a rename inside folder on disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_bytes(path: str | Path, data: bytes, stream: bool = False) -> Path:
    """path's new content, written as replace_file writes it; returns path."""
    with replace_file(path, stream=stream) as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, stream: bool = False) -> Path:
    """UTF-8 text as path's new content, written as replace_file writes it; returns path."""
    return write_bytes(path, text.encode("utf-8"), stream)


def write_json(path: str | Path, data: Any, stream: bool = False, allow_nan: bool = True) -> Path:
    """data as indented JSON with a trailing newline, written as replace_file writes it; returns path."""
    return write_text(path, json.dumps(data, indent=2, allow_nan=allow_nan) + "\n", stream)


def append_text(path: str | Path, text: str) -> None:
    """Add text at the end of path (created if missing), on disk when this returns; a failed write (a full
    disk) cuts path back to what it held and raises its OSError naming path."""
    path = Path(path)
    refuse_special(path)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(descriptor).st_size
            try:
                data = memoryview(text.encode("utf-8"))
                while data:
                    data = data[os.write(descriptor, data):]
                os.fsync(descriptor)
            except OSError:
                os.ftruncate(descriptor, size)
                raise
        finally:
            os.close(descriptor)
    except OSError as error:
        raise _with_name(error, path) from None


def read_json(path: str | Path, what: str = "") -> Any:
    """The JSON object in path, or a one-line TorchcvtError naming path when it is empty, torn or no object
    (a file written before writes were atomic may be cut short by a kill or a full disk)."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise TorchcvtError(f"cannot read {name}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        found = "empty" if not path.stat().st_size else f"not valid JSON: {error}"
        raise TorchcvtError(f"{name} is damaged ({found}): a kill or a full disk cut it short") from None
    if not isinstance(data, dict):
        raise TorchcvtError(f"{name} holds JSON {type(data).__name__}, not an object: it is damaged")
    return data


def _fsync_tree(root: Path) -> None:
    """Put every file under root on disk: one syncfs of its file system where there is one (a tree of
    thousands of small files), else an fsync per file and folder."""
    descriptor = os.open(root, os.O_RDONLY)
    try:
        syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
        if syncfs is not None and syncfs(descriptor) == 0:
            return
    finally:
        os.close(descriptor)
    for folder, _, names in os.walk(root):
        for name in names:
            descriptor = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        fsync_folder(Path(folder))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextmanager
def replace_folder(path: str | Path) -> Iterator[Path]:
    """An empty folder beside path to write into; when the block ends, its files are put on disk and it
    takes path's place in one step, so path always holds the old folder whole or the new one whole.

    Where the file system cannot swap two folders in one step, the old one is renamed aside first: a kill
    between the two renames leaves no folder at path, never a mix. A failure inside the block leaves path
    as it was.
    """
    path = Path(path)
    refuse_special(path)
    _remove_leftovers(path)
    staging = _temporary(path)
    staging.mkdir(parents=True)
    try:
        yield staging
        _fsync_tree(staging)
        if not path.exists():
            os.rename(staging, path)
        elif not _exchange(staging, path):
            aside = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, aside)
            os.rename(staging, path)
            shutil.rmtree(aside)
        fsync_folder(path.parent)
    except OSError as error:
        raise _with_name(error, path) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old folder after a swap, or a failed new one


def _remove_leftovers(path: Path) -> None:
    """Delete what a killed replace_folder left beside path: folders named for a process that is gone."""
    for leftover in [*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{path.name}.old-*")]:
        pid = leftover.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover, from an earlier call that failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_folder(root: Path) -> Path:
    """An empty folder beside root, this process's own, to write a tree into before publish_tree."""
    staging = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def write_new(path: Path, data: bytes) -> None:
    """A file in a staging folder: nothing is replaced, and publish_tree puts it on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as handle:
        handle.write(data)


def publish_tree(staging: Path, root: Path) -> None:
    """Put a tree written whole in staging (with its .complete marker) on disk and at root in one rename;
    a tree another process published first is kept (it is as good as ours)."""
    _fsync_tree(staging)
    root.parent.mkdir(parents=True, exist_ok=True)
    # A tree left incomplete by a crash, or written for other settings.
    shutil.rmtree(root, ignore_errors=True)
    try:
        os.replace(staging, root)
        fsync_folder(root.parent)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (root / ".complete").exists():
            raise


def write_figure(path: str | Path, figure: Any, stream: bool = False, dpi: int = 100) -> Path:
    """A matplotlib figure as a PNG, written as replace_file writes it; returns path."""
    with replace_file(path, stream=stream) as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    return Path(path)


def write_together(contents: dict[Path, bytes]) -> list[Path]:
    """Several files that belong together: all are written and on disk before the first replaces its
    path, so a full disk changes none of them; returns the paths. (A kill between the renames can still
    leave some new beside some old: a reader that must tell records what ties them, such as a hash.)"""
    written: dict[Path, Path] = {}
    try:
        for path, data in contents.items():
            refuse_special(path)
            temporary = written[path] = _temporary(path)
            try:
                with open(temporary, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as error:
                raise _with_name(error, path) from None
        for path, temporary in written.items():
            os.replace(temporary, path)
        for folder in {path.parent for path in written}:
            fsync_folder(folder)
    finally:
        for temporary in written.values():
            temporary.unlink(missing_ok=True)
    return list(contents)
