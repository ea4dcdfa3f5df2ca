"""Subcommand registries of the `gligen` and `detector` command lines, and the checked types of their options.

Each CLI lists its subcommands as `Command`s: only the module of the subcommand being run is
imported, so `gligen data shapes` does not load the detector, and `gligen --help` loads
nothing heavy at all. `number` makes argparse types that refuse NaN, infinities and values
out of range in one line.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from gligen.errors import run_cli
from gligen.layout import SEED_MAX


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



def number(kind: type = float, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse `type`: a finite `kind` (int or float) in [low, high] (open ends with `low_open` / `high_open`).

    `number(float, 0, 1)("nan")` fails with "must be a finite number in [0, 1], got 'nan'".
    """
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    if low is not None and high is not None:
        wanted = f"in {left}{low:g}, {high:g}{right}"
    elif low is not None:
        wanted = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        wanted = f"{'<' if high_open else '<='} {high:g}"
    else:
        wanted = ""
    noun = "an integer" if kind is int else "a finite number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        ok = value is not None and math.isfinite(value)
        ok = ok and (low is None or (value > low if low_open else value >= low))
        ok = ok and (high is None or (value < high if high_open else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {noun} {wanted}, got {text!r}".replace("  ", " "))
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def positive_int(text: str) -> int:
    """An argparse `type`: an integer >= 1 (steps, batch sizes, counts)."""
    return number(int, 1)(text)


def seed(text: str) -> int:
    """An argparse `type`: a seed, an integer in [0, 2**64 - 1]."""
    return number(int, 0, SEED_MAX)(text)


def fraction(text: str) -> float:
    """An argparse `type`: a number in [0, 1] (thresholds, IoU, beta)."""
    return number(float, 0, 1)(text)
