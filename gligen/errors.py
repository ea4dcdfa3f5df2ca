"""User errors and the command-line convention for them.

A `UserError` is a problem with what the user gave us (a file, a box, a flag). Commands
print its message as one line on stderr and exit with status 1, without a traceback
unless `--debug` was given.

`gligen` and `detector` list their subcommands as `Command`s: only the module of the
subcommand being run is imported, so `gligen data shapes` does not load the detector, and
`gligen --help` loads nothing heavy at all.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input from the user; the message names what is wrong and where."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by `run_cli`'s handler so that a job stops as on Ctrl-C.

    Like KeyboardInterrupt it is not an Exception: long jobs catch both to save what they can
    (a training checkpoint), then re-raise; `run_cli` turns them into exit 143 and 130.
    """


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the chosen subcommand (`args.func(args)`), map user errors to exit 1.

    Usage errors exit 2 through argparse itself.
    """
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_usage(sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        args.func(args)
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as stop:
        if args.debug:
            traceback.print_exc()
        cause, status = ("interrupted", 130) if isinstance(stop, KeyboardInterrupt) else ("terminated", 143)
        print(f"{parser.prog}: {cause}; rerun the same command to resume", file=sys.stderr)
        return status
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, its one-line help, and "module:function" that adds its parser to a subparsers action."""

    name: str
    help: str
    register: str


def build_parser(prog: str, description: str, commands: Sequence[Command], chosen: str | None = None
                 ) -> argparse.ArgumentParser:
    """A parser listing every command; only the `chosen` one's module is imported and its arguments added."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands:
        if command.name == chosen:
            module, function = command.register.split(":")
            getattr(importlib.import_module(module), function)(subparsers)
        else:
            subparsers.add_parser(command.name, help=command.help)
    return parser


def run_commands(prog: str, description: str, commands: Sequence[Command], argv: Sequence[str] | None = None) -> int:
    """Run the subcommand named in `argv` (default: the process's arguments); the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    return run_cli(build_parser(prog, description, commands, chosen), argv)


def require(condition: bool, message: str) -> None:
    """Raise a `UserError` with `message` unless `condition` holds."""
    if not condition:
        raise UserError(message)


CommandFn = Callable[[argparse.Namespace], None]
