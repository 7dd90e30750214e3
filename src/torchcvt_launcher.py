"""The `torchcvt` command's entry point (its console script; `python -m torchcvt` ends here too).

Importing torchcvt loads torch, which takes seconds, and some libraries swallow a KeyboardInterrupt while
they import. So main() holds a Ctrl-C until the import is done and then reports it as one line, exit 130.
This module is outside the package so that it runs before the package is imported: `import torchcvt` itself
touches no signal handler. It imports only the standard library until main() runs.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

INTERRUPTED = 130  # the shell's code for a command stopped by SIGINT


@contextmanager
def hold_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C until the block is done, then raise it as KeyboardInterrupt; the old handler returns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the torchcvt command on argv (default: the process's arguments); returns its exit code."""
    try:
        with hold_interrupt():
            from torchcvt.cli import main as run_command
    except KeyboardInterrupt:
        args = sys.argv[1:] if argv is None else list(argv)
        command = next((arg for arg in args if not arg.startswith("-")), "")
        sys.stderr.write(f"torchcvt {command}".rstrip() + ": interrupted\n")
        return INTERRUPTED
    return run_command(argv)


if __name__ == "__main__":
    raise SystemExit(main())
