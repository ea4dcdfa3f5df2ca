"""User errors, faults and interrupts on the command line: one line each, a known exit status.

A `UserError` is a problem with what the user gave us (a file, a box, a flag). `run_cli`
runs a command and turns whatever stops it into one line on stderr:

| what stops the command                       | exit | line                                                        |
|----------------------------------------------|------|-------------------------------------------------------------|
| a `UserError`                                | 1    | `gligen: error: layouts.jsonl line 3: entity 1 ('a dog'): ...` |
| an `OSError` (permissions, full disk, ...)   | 1    | `gligen: error: out/: permission denied`                     |
| any other exception (a bug)                  | 1    | `gligen: error: unexpected ValueError: ...; run with --debug for the traceback` |
| Ctrl-C / SIGTERM                             | 130, 143 | `gligen: interrupted (12 of 40 layouts written to out); rerun ...` |
| a usage error (argparse)                     | 2    | `gligen generate: error: argument --steps: ...`               |

`--debug` (or the environment variable `GLIGEN_DEBUG=1`) also prints the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import math
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence


class UserError(Exception):
    """Bad input from the user; the message names what is wrong and where."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by `run_cli`'s handler so that a job stops as on Ctrl-C.

    Like KeyboardInterrupt it is not an Exception: long jobs catch both to save what they can
    (a training checkpoint), then re-raise; `run_cli` turns them into exit 143 and 130.
    """


def require(condition: bool, message: str) -> None:
    """Raise a `UserError` with `message` unless `condition` holds."""
    if not condition:
        raise UserError(message)


def is_number(value: object) -> bool:
    """A finite JSON number (not a boolean, NaN, an infinity or an integer too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@contextlib.contextmanager
def progress(finished: Callable[[], str]) -> Iterator[None]:
    """Within the block, a Ctrl-C or SIGTERM reports `finished()`: what is done ("12 of 40 layouts written to out").

    The innermost block that sees the interrupt answers; `run_cli` prints its words.
    """
    try:
        yield
    except (KeyboardInterrupt, Terminated) as stop:
        if not hasattr(stop, "finished"):
            stop.finished = finished()
        raise


# --- operating-system faults in words ---

_CAUSES = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "is a directory, not a file",
    errno.EEXIST: "already exists",
    errno.ENOTDIR: "is a file, not a directory",
    errno.EMFILE: "too many open files",
    errno.EIO: "input/output error (a failing disk or network file system?)",
}


def describe_os_error(error: OSError) -> str:
    """`path: cause in words` for an operating-system error, e.g. "out/a.png: no space left on the device".

    When a directory cannot be made because a part of its path is a regular file, that file is named.
    """
    cause = _CAUSES.get(error.errno) or (error.strerror or str(error) or type(error).__name__).lower()
    path = error.filename
    if path is None:
        return cause
    path = os.fsdecode(path)
    if error.errno in (errno.EEXIST, errno.ENOTDIR):
        blocking = next((p for p in [Path(path), *Path(path).parents] if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            return f"{blocking}: is a file, not a directory"
    return f"{path}: {cause}"


# --- the command line ---


def _one_line(text: str) -> str:
    """A message as one line. A DataLoader worker's error arrives as a traceback: its last line is the message."""
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share one parser
                yield from _all_parsers(sub)


def _usage_error(parser: argparse.ArgumentParser) -> Callable[[str], None]:
    def error(message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {_one_line(message)} (see {parser.prog} --help)\n")

    return error


def _check_outputs(args: argparse.Namespace) -> None:
    from gligen.files import Output, check_writable

    for value in vars(args).values():
        if isinstance(value, Output):
            check_writable(value, value.is_dir)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: workers leave Ctrl-C and SIGTERM to the main process.

    A terminal's Ctrl-C and a cluster's SIGTERM reach every process of the job; a worker killed
    by one would crash the main process before it could save and report. The main process stops
    its workers when it ends.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the chosen command (`args.func(args)`), and return its exit status (see the module docstring).

    Arguments of type `gligen.files.Output` are checked for writability before the command runs.
    """
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (also GLIGEN_DEBUG=1)")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("GLIGEN_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]  # accepted anywhere, not only before the command
    for each in _all_parsers(parser):
        each.error = _usage_error(each)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_usage(sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line(parser.prog)
            _check_outputs(args)
            args.func(args)
        _leave_process_group()
        return 0
    except (KeyboardInterrupt, Terminated, Exception) as error:
        if debug:
            traceback.print_exc()
        status, line = _status_and_line(error)
        print(f"{parser.prog}: {line}", file=sys.stderr)
        return status
    finally:
        signal.signal(signal.SIGTERM, previous)


def _leave_process_group() -> None:
    """Destroy a launched run's process group, and the objects that hold it, while the interpreter is whole.

    accelerate's `end_training` only unregisters the group: the DDP-wrapped model still holds it, in
    a reference cycle that lives until interpreter shutdown. Destroyed then, gloo's worker threads
    abort a process that finished its work ("terminate called without an active exception", exit
    -6), which fails the whole launch. Only after success: after an error, another process may
    still wait in a collective that shutting down would join.
    """
    distributed = sys.modules.get("torch.distributed")  # only a command that loaded torch can have one
    if distributed is None or not distributed.is_available():
        return
    if distributed.is_initialized():
        distributed.destroy_process_group()
    gc.collect()  # frees the models in cycles, and with them the last references to their groups


def _status_and_line(error: BaseException) -> tuple[int, str]:
    if isinstance(error, (KeyboardInterrupt, Terminated)):
        status, cause = (130, "interrupted") if isinstance(error, KeyboardInterrupt) else (143, "terminated")
        finished = getattr(error, "finished", None)
        return status, f"{cause}{f' ({finished})' if finished else ''}; rerun the same command to resume"
    if isinstance(error, UserError):
        return 1, f"error: {_one_line(str(error))}"
    if isinstance(error, OSError) and error.errno is not None:
        return 1, f"error: {describe_os_error(error)}"
    if isinstance(error, MemoryError):
        return 1, "error: out of memory; use a smaller --batch-size, a smaller model or more memory"
    detail = _one_line(str(error))
    return 1, f"error: unexpected {type(error).__name__}{f': {detail}' if detail else ''}; run with --debug for the traceback"


def _warning_line(prog: str):
    """Warnings as one line each (`gligen: warning: ...`), not Python's two lines with source code."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {_one_line(str(message))}", file=file or sys.stderr)

    return show
