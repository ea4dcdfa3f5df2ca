"""User errors and the command-line convention for them.

A `UserError` is a problem with what the user gave us (a file, a box, a flag). Commands
print its message as one line on stderr and exit with status 1, without a traceback
unless `--debug` was given.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input from the user; the message names what is wrong and where."""


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the chosen subcommand (`args.func(args)`), map user errors to exit 1.

    Usage errors exit 2 through argparse itself.
    """
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_usage(sys.stderr)
        return 2
    try:
        args.func(args)
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    return 0


def require(condition: bool, message: str) -> None:
    """Raise a `UserError` with `message` unless `condition` holds."""
    if not condition:
        raise UserError(message)


CommandFn = Callable[[argparse.Namespace], None]
