"""What an input path is when it cannot be read as a file: the words every reader of a user's file uses."""

from __future__ import annotations

import errno
import stat
from pathlib import Path


def input_file_problem(path: str | Path) -> str | None:
    """Why path cannot be read as a regular file ('does not exist', 'is a folder', 'is a FIFO', 'is a device',
    'is a symbolic link loop'...), or None when it is one."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if path.is_symlink() else "does not exist"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link loop"
        return f"cannot be read ({error.strerror})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    return None if stat.S_ISREG(mode) else "is not a regular file"
