"""A resumable, atomic shard writer shared by every `gligen data` command.

Inputs (images, image-caption pairs, synthetic scenes) are consumed in a fixed order and
turned into samples, written to `DIR/shard-000000.tar`, `DIR/shard-000001.tar`, ... Each
shard is written to a hidden temporary file and renamed when full, and only then is
`DIR/manifest.json` updated with how many inputs are done. A killed run therefore leaves
complete shards only, and rerunning the same command resumes after the last of them.

What was left out is counted by reason (a whole input: `skip`; part of one, such as a
crowd annotation: `drop`) and reported at the end, printed and in `DIR/summary.json`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, TypeVar

import webdataset as wds
from tqdm import tqdm

from gligen.data.format import Sample, SampleError, encode_sample
from gligen.errors import UserError, progress
from gligen.files import atomic_path, naming_os_errors, write_json

if TYPE_CHECKING:
    from gligen.maps.extract import Extractor

T = TypeVar("T")
R = TypeVar("R")

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
FORMAT_VERSION = 1


class ShardWriter:
    """Write samples into numbered tar shards under `out_dir`, resuming a previous run.

    `options` describes the job (command, sources, flags); resuming with different options
    is refused, since the inputs done so far would not match. `condition` (a `gligen.maps.extract.Extractor`)
    adds its map to every sample that has none.

        with ShardWriter(out, {"command": "shapes", "n": 100}) as writer:
            writer.consume(items, convert, total=len(items))
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        options: dict[str, Any],
        samples_per_shard: int = 1000,
        image_format: str = "jpg",
        condition: Extractor | None = None,
    ):
        if samples_per_shard < 1:
            raise UserError(f"samples per shard must be at least 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.samples_per_shard = samples_per_shard
        self.image_format = image_format
        self.options = dict(options, samples_per_shard=samples_per_shard, image_format=image_format)
        self.condition = condition
        if condition is not None:
            self.options.update(condition.options())
        self.state = self._load_state()
        self._pending_inputs = 0
        self._pending_dropped: Counter = Counter()
        self._seen_reasons: set[str] = set()
        self._tar: wds.TarWriter | None = None
        self._shard = contextlib.ExitStack()  # the open shard: a temporary file, renamed when complete
        self._shard_samples = 0

    # -- resume ---------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        manifest = self.out_dir / MANIFEST
        fresh = {"format": FORMAT_VERSION, "options": self.options, "complete": False,
                 "inputs": 0, "samples": 0, "shards": [], "dropped": {}}
        if not manifest.is_file():
            if any(self.out_dir.glob("shard-*.tar")):
                raise UserError(f"{self.out_dir}: holds shards but no {MANIFEST}; use an empty --out directory")
            return fresh
        try:
            state = json.loads(manifest.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{manifest}: invalid JSON ({error.msg}); delete the directory to start over") from None
        previous = state.get("options") or {}
        if previous != self.options:
            changes = ", ".join(
                f"{k}={previous.get(k)!r} (now {self.options.get(k)!r})"
                for k in sorted(set(previous) | set(self.options)) if previous.get(k) != self.options.get(k)
            )
            raise UserError(
                f"{self.out_dir}: was written with other options: {changes}; "
                "use another --out directory, or delete this one to start over"
            )
        self._remove_unfinished_shards()  # the previous run's, if it was killed
        return state

    def _remove_unfinished_shards(self) -> None:
        for unfinished in self.out_dir.glob(".shard-*.tmp"):
            unfinished.unlink(missing_ok=True)

    @property
    def start(self) -> int:
        """How many inputs previous runs have finished (they are skipped on resume)."""
        return self.state["inputs"]

    @property
    def complete(self) -> bool:
        return self.state["complete"]

    # -- writing ---------------------------------------------------------------------------

    def consume(
        self,
        items: Iterable[T],
        convert: Callable[[T], Sequence[Sample]],
        total: int | None = None,
        desc: str = "writing shards",
    ) -> None:
        """Convert and write every input not done yet, with a progress bar.

        `convert` returns the samples of one input (maybe none); a `SampleError` it raises
        skips the input, counted under the error's reason.
        """
        self.consume_batches(items, lambda batch: [attempt(convert, item) for item in batch], total, desc)

    def consume_batches(
        self,
        items: Iterable[T],
        convert_batch: Callable[[list[T]], list[Sequence[Sample] | SampleError]],
        total: int | None = None,
        desc: str = "writing shards",
        batch_size: int = 1,
    ) -> None:
        """`consume` for converters that work best on many inputs at once (a detector).

        `convert_batch` returns one result per input: its samples, or the `SampleError` that
        skips it. Inputs still count one by one, so resuming does not depend on `batch_size`.
        """
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        remaining = iter(itertools.islice(items, self.start, None))
        with progress(self._finished), tqdm(total=total, initial=self.start, desc=desc, unit="input") as bar:
            while batch := list(itertools.islice(remaining, batch_size)):
                for result in convert_batch(batch):
                    if isinstance(result, SampleError):
                        self.skip(result.reason, str(result))
                    else:
                        self.write(result)
                bar.update(len(batch))
                bar.set_postfix(samples=self.state["samples"] + self._shard_samples, refresh=False)

    def write(self, samples: Sequence[Sample]) -> None:
        """Write the samples of one input. A shard is closed after the input that fills it, so
        the samples of one input never straddle two shards (a shard may exceed its size by a few)."""
        for sample in samples:
            if self.condition is not None and sample.condition_map is None:
                sample.condition, sample.condition_map = self.condition.kind, self.condition(sample.image)
            if self._tar is None:
                self._open_shard()
            self._tar.write(encode_sample(sample, self.image_format))
            self._shard_samples += 1
        self._pending_inputs += 1
        if self._shard_samples >= self.samples_per_shard:
            self._close_shard()

    def skip(self, reason: str, detail: str = "") -> None:
        """One input left out entirely (counted under `reason`)."""
        self.drop(reason, detail=detail)
        self._pending_inputs += 1

    def drop(self, reason: str, count: int = 1, detail: str = "") -> None:
        """Part of an input left out (an annotation, a caption), counted under `reason`."""
        self._pending_dropped[reason] += count
        if reason not in self._seen_reasons:  # show one example of each kind, count the rest
            self._seen_reasons.add(reason)
            tqdm.write(f"dropping ({reason}): {detail or '-'}; further ones are only counted", file=sys.stderr)

    def _shard_path(self, index: int) -> Path:
        return self.out_dir / f"shard-{index:06d}.tar"

    def _finished(self) -> str:
        """What a rerun resumes from: the manifest on disk (a signal may come between a shard's entry in memory and
        the manifest's writing)."""
        try:
            committed = json.loads((self.out_dir / MANIFEST).read_text())
        except (OSError, ValueError):
            committed = {"shards": [], "inputs": 0}
        return f"{len(committed['shards'])} complete shards ({committed['inputs']} inputs) in {self.out_dir}"

    def _open_shard(self) -> None:
        path = self._shard_path(len(self.state["shards"]))
        tmp = self._shard.enter_context(atomic_path(path))
        self._shard.enter_context(naming_os_errors(path))
        file = self._shard.enter_context(open(tmp, "wb"))
        # a fixed mtime makes shards byte-identical across runs with the same inputs
        self._tar = wds.TarWriter(file, encoder=False, mtime=0)

    def _close_shard(self) -> None:
        """Finish the open shard (if any) and commit everything pending to the manifest."""
        if self._tar is not None:
            self._tar.close()
            self._shard.close()  # renames the complete shard into place
            index = len(self.state["shards"])
            self.state["shards"].append({"name": self._shard_path(index).name, "samples": self._shard_samples})
            self.state["samples"] += self._shard_samples
            self._tar = None
            self._shard_samples = 0
        self.state["inputs"] += self._pending_inputs
        dropped = Counter(self.state["dropped"]) + self._pending_dropped
        self.state["dropped"] = dict(sorted(dropped.items()))
        self._pending_inputs = 0
        self._pending_dropped = Counter()
        write_json(self.out_dir / MANIFEST, self.state)

    def _abort(self, error: BaseException) -> None:
        """Forget the open shard; the manifest still names the last complete one."""
        if self._tar is not None:
            with contextlib.suppress(OSError, ValueError):  # the disk may still be full: the file goes anyway
                self._tar.close()
            self._tar = None
        self._shard.__exit__(type(error), error, error.__traceback__)  # deletes the temporary file
        # and one the stack never held: a signal can come between the file's making and its registration
        self._remove_unfinished_shards()

    def close(self) -> dict[str, Any]:
        """Write the last shard, mark the job complete, print and save the summary."""
        self._close_shard()
        if not self.complete:
            self.state["complete"] = True
            write_json(self.out_dir / MANIFEST, self.state)
        summary = self.summary()
        write_json(self.out_dir / SUMMARY, summary)
        print(format_summary(summary))
        return summary

    def summary(self) -> dict[str, Any]:
        return {
            "out": str(self.out_dir),
            "inputs": self.state["inputs"],
            "samples": self.state["samples"],
            "shards": len(self.state["shards"]),
            "dropped": self.state["dropped"],
        }

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort(exc)


def attempt(function: Callable[[T], R], item: T) -> R | SampleError:
    """`function(item)`, or the `SampleError` it raised."""
    try:
        return function(item)
    except SampleError as error:
        return error


def format_summary(summary: dict[str, Any]) -> str:
    """One readable paragraph: what was written and what was dropped, by reason."""
    head = (f"wrote {summary['samples']} samples in {summary['shards']} shards to {summary['out']} "
            f"from {summary['inputs']} inputs")
    return "\n".join([head, *dropped_lines(summary["dropped"])])


def dropped_lines(dropped: dict[str, int]) -> list[str]:
    """What was left out, one line per reason with its count."""
    if not dropped:
        return ["dropped: nothing"]
    return ["dropped:", *(f"  {count:>8}  {reason}" for reason, count in dropped.items())]
