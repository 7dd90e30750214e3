"""The torchcvt command: parse arguments, call the library, print. No logic of its own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class CliError(Exception):
    """A user error reported as one line on stderr with exit code 2, never a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchcvt", description="CvT: Convolutional vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in ():
        add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (CliError, ValueError, FileNotFoundError) as error:
        print(f"torchcvt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"torchcvt {args.command}: interrupted", file=sys.stderr)
        return 130
