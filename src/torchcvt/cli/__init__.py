"""The torchcvt command: parse arguments, call the library, print. No logic of its own."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..errors import TorchcvtError
from ..extras import MissingExtra
from .ablate import add_ablate_command
from .inference import add_attention_command, add_embed_command, add_export_command, add_predict_command
from .training import add_eval_command, add_train_command
from .transfer import add_transfer_command
from .weights import add_convert_command, add_info_command

__all__ = ["TorchcvtError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(prog="torchcvt", description="CvT: Convolutional vision Transformers.")
    parser.add_argument("--version", action="version", version=f"torchcvt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (add_info_command, add_train_command, add_eval_command, add_convert_command,
                        add_predict_command, add_attention_command, add_export_command, add_embed_command,
                        add_ablate_command, add_transfer_command):
        add_command(sub)
    return parser


# Commands whose stdout carries their result (a table of predictions): their notices go to stderr.
_RESULT_ON_STDOUT = ("predict", "embed")


class _Console(logging.Handler):
    """The library's log records as the command's output: notices on stdout, warnings on stderr."""

    def __init__(self, command: str):
        super().__init__(logging.INFO)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        # sys.stdout/sys.stderr looked up per record: they may be replaced (tests, tqdm) while running.
        if record.levelno >= logging.WARNING:
            _stderr_line(f"torchcvt {self.command}: warning: {record.getMessage()}")
        elif self.command in _RESULT_ON_STDOUT:
            _stderr_line(f"torchcvt {self.command}: {record.getMessage()}")
        else:
            print(record.getMessage(), flush=True)


def _stderr_line(text: str) -> None:
    """text and its newline in one write: lines from several processes (torchrun's ranks) sharing a
    stderr then never run into each other, as print's separate newline write let them."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@contextmanager
def _console_logging(command: str) -> Iterator[None]:
    logger = logging.getLogger("torchcvt")
    handler, level = _Console(command), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# No space on the device, over the disk quota, file too large for the file system.
_EXHAUSTED = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes positionals in one run only: `convert SRC --to hf DST`, `train a=1 --quiet b=2`.
    positional = next((name for name in ("paths", "overrides") if hasattr(args, name)), None)
    if extra and positional and not any(item.startswith("-") for item in extra):
        setattr(args, positional, getattr(args, positional) + extra)
    elif extra:
        unknown = " ".join(item for item in extra if item.startswith("-")) or " ".join(extra)
        parser.error(f"unrecognized arguments: {unknown}")
    try:
        with _console_logging(args.command):
            return int(args.run(args) or 0)
    except (TorchcvtError, MissingExtra) as error:
        _stderr_line(f"torchcvt {args.command}: error: {error}")
        return 2
    except KeyboardInterrupt:
        _stderr_line(f"torchcvt {args.command}: interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`torchcvt info cvt_13 | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as error:
        if isinstance(error, OSError) and error.errno in _EXHAUSTED:
            # The machine ran out of something the command needed: what ran out, and where, in one line.
            where = f": cannot write {error.filename}" if error.filename else ""
            _stderr_line(f"torchcvt {args.command}: error{where}: {os.strerror(error.errno).lower()}")
            return 2
        # Not a user error: a bug. Show where it happened instead of hiding it behind one line.
        traceback.print_exc()
        _stderr_line(f"torchcvt {args.command}: internal error: this is a bug in torchcvt; please report it "
                     "with the traceback above")
        return 1
