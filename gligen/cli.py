"""`gligen` command line: generate, convert, data, eval. Each subcommand lives beside its code."""

from __future__ import annotations

import argparse
from typing import Sequence

from gligen.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gligen", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _registrations():
        register(subparsers)
    return parser


def _registrations():
    """Each command module's `register(subparsers)`, which adds its subcommand."""
    from gligen.convert import register as convert
    from gligen.data.cli import register as data
    from gligen.eval.cli import register as evaluate
    from gligen.generate import register as generate

    return [generate, convert, data, evaluate]


def main(argv: Sequence[str] | None = None) -> int:
    """The exit status: 0, 1 for a user error; argparse exits with 2 itself on a usage error."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
