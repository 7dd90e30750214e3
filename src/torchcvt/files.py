"""Writing output files so that a full disk is one clear OSError and never damages a file already there."""

from __future__ import annotations

import io
import os
import shutil
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
def replace_file(path: str | Path, keep_previous_as: Path | None = None) -> Iterator[FailSoftly]:
    """A binary file whose bytes replace path only once all are written and on disk.

    A full disk or a kill leaves a file already at path whole; a device (/dev/null) is written in place.
    A failed write raises its OSError (naming path) when the block ends. keep_previous_as gives the file
    being replaced a second name first, so that some file is at path at every moment a kill may come.
    """
    path = Path(path)
    direct = path.exists() and not path.is_file()
    target = path if direct else path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
            previous_tmp = keep_previous_as.with_name(f".{keep_previous_as.name}.tmp-{os.getpid()}")
            try:
                os.link(path, previous_tmp)
            except OSError:
                shutil.copyfile(path, previous_tmp)
            os.replace(previous_tmp, keep_previous_as)
        os.replace(target, path)
        _fsync_folder(path.parent)
    finally:
        if not direct:
            target.unlink(missing_ok=True)
        if previous_tmp is not None:
            previous_tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Put a rename inside folder on disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_bytes(path: str | Path, data: bytes) -> None:
    """path's new content, written as replace_file writes it."""
    with replace_file(path) as handle:
        handle.write(data)
