"""Jobs over image collections split in shards, across processes, one output per input shard.

`gligen data pseudo-label` and `detector detect` over directories and webdataset shards run
here. The inputs are cut into input shards (a webdataset `.tar` each, or blocks of a
listing); output `i` is made from input shard `i` alone, so what is written does not depend
on how many processes ran, or which shards an earlier, interrupted run finished:

- under `accelerate launch` (several GPUs or nodes; CPUs join over gloo with `--device cpu`)
  process `r` of `n` takes the input shards `i` with `i % n == r`;
- images are decoded in DataLoader workers while the model runs; worker `k` of `w` decodes
  the batches `k, k + w, ...` of the shard and the loader hands them over in order, so a
  shard's batches are always the same;
- a shard's output is written to a temporary file and renamed, then its counts go to
  `DIR/progress/shard-NNNNNN.json`; a rerun skips the shards that have one;
- when every process is done, the first merges the counts into `DIR/summary.json`
  (printed) and marks `DIR/manifest.json` complete. The manifest also holds the job's
  options: a rerun with other options is refused.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from gligen.data.format import IMAGE_EXTENSIONS, SampleError, decode_image, load_image, shard_urls
from gligen.data.writer import dropped_lines
from gligen.errors import UserError, ignore_stop_signals
from gligen.files import write_json

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
PROGRESS = "progress"


@dataclass
class Pending:
    """One input before decoding: its image (a path, the bytes, or None when missing) and caption."""

    key: str
    where: str  # names the input in messages
    image: str | bytes | None
    caption: str | None = None


@dataclass
class Decoded:
    """An input after decoding in a worker: the image, or why there is none (a `SampleError`)."""

    key: str
    where: str
    caption: str | None
    image: Image.Image | SampleError


@dataclass
class InputShard:
    """Input shard `index`: a webdataset tar (read in the worker) or a list of inputs."""

    index: int
    name: str
    items: Sequence[Pending] | None = None
    url: str | None = None

    def inputs(self) -> Iterator[Pending]:
        if self.items is not None:
            yield from self.items
            return
        for raw in wds.DataPipeline(wds.SimpleShardList([self.url]), wds.tarfile_to_samples()):
            where = f"{self.url} key {raw['__key__']}"
            image = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
            caption = raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else None
            yield Pending(raw["__key__"], where, image, caption)


def tar_shards(source: str) -> list[InputShard]:
    """One input shard per tar of a webdataset source (directory, brace pattern, URL, `pipe:`)."""
    return [InputShard(i, url, url=url) for i, url in enumerate(shard_urls(source))]


def list_shards(items: Sequence[Pending], per_shard: int, name: str) -> list[InputShard]:
    """A listing cut into input shards of `per_shard` inputs."""
    if per_shard < 1:
        raise UserError(f"inputs per shard must be at least 1, got {per_shard}")
    return [InputShard(i, f"{name} [{start}:{start + per_shard}]", items=items[start:start + per_shard])
            for i, start in enumerate(range(0, len(items), per_shard))]


def directory_images(directory: str | os.PathLike) -> list[Pending]:
    """The image files under `directory` (recursively, sorted by path); keys are their paths without suffix."""
    root = Path(directory)
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise UserError(f"{directory}: holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [Pending(str(p.relative_to(root).with_suffix("")), str(p), str(p)) for p in paths]


def decode(item: Pending) -> Decoded:
    try:
        if item.image is None:
            raise SampleError(item.where, "no image")
        image = load_image(item.image) if isinstance(item.image, str) else decode_image(item.image, item.where)
    except SampleError as error:
        image = error
    return Decoded(item.key, item.where, item.caption, image)


class DecodedBatches(IterableDataset):
    """The batches of one input shard, decoded; DataLoader worker k of w decodes batches k, k + w, ..."""

    def __init__(self, shard: InputShard, batch_size: int):
        self.shard, self.batch_size = shard, batch_size

    def __iter__(self) -> Iterator[list[Decoded]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batch: list[Pending] = []
        number = 0
        for item in self.shard.inputs():
            batch.append(item)
            if len(batch) == self.batch_size:
                if number % workers == worker:
                    yield [decode(x) for x in batch]
                batch, number = [], number + 1
        if batch and number % workers == worker:
            yield [decode(x) for x in batch]


def _as_is(batch):
    return batch


def decoded_batches(shard: InputShard, batch_size: int, workers: int) -> Iterable[list[Decoded]]:
    """The shard's decoded batches, in order, decoded by `workers` DataLoader workers (0: here)."""
    return DataLoader(DecodedBatches(shard, batch_size), batch_size=None, num_workers=workers, collate_fn=_as_is,
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      worker_init_fn=ignore_stop_signals)


ShardJob = Callable[[InputShard, Iterable[list[Decoded]], Path], dict[str, Any]]
"""(input shard, its decoded batches, DIR) -> its counts {"inputs": n, ..., "dropped": {reason: n}}, after
writing its output atomically."""


def run_sharded(
    shards: Sequence[InputShard],
    job: ShardJob,
    out_dir: str | os.PathLike,
    options: dict[str, Any],
    batch_size: int = 8,
    workers: int = 4,
    state=None,
    desc: str = "shards",
) -> dict[str, Any] | None:
    """Run `job` on this process's input shards not done yet; the merged summary (on the main process)."""
    from gligen.eval.generate import process_state

    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise UserError(f"workers must be at least 0, got {workers}")
    state = state or process_state()
    out = Path(out_dir)
    if state.is_main_process:
        _start(out, options, len(shards))
    state.wait_for_everyone()  # every process checks the manifest the main one wrote
    _check_manifest(out, options)
    progress = out / PROGRESS
    mine = [s for s in shards if s.index % state.num_processes == state.process_index]
    todo = [s for s in mine if not (progress / _progress_name(s.index)).is_file()]
    if len(todo) < len(mine):
        tqdm.write(f"{len(mine) - len(todo)} of {len(mine)} shards already done in {out}; skipping them", file=sys.stderr)
    label = desc if state.num_processes == 1 else f"{desc} [process {state.process_index}]"
    for shard in tqdm(todo, desc=label, unit="shard", position=state.process_index if state.num_processes > 1 else None):
        counts = job(shard, decoded_batches(shard, batch_size, workers), out)
        write_json(progress / _progress_name(shard.index), {"shard": shard.name, **counts})
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    summary = merge_progress(out, len(shards))
    write_json(out / SUMMARY, summary)
    manifest = json.loads((out / MANIFEST).read_text())
    write_json(out / MANIFEST, {**manifest, "complete": summary["shards_done"] == len(shards)})
    print(format_counts(summary))
    return summary


def _progress_name(index: int) -> str:
    return f"shard-{index:06d}.json"


def _start(out: Path, options: dict[str, Any], shards: int) -> None:
    manifest = out / MANIFEST
    if manifest.is_file():
        return  # a rerun; checked below by every process
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out}: holds files but no {MANIFEST}; use an empty --out directory")
    write_json(manifest, {"options": options, "shards": shards, "complete": False})


def _check_manifest(out: Path, options: dict[str, Any]) -> None:
    try:
        previous = json.loads((out / MANIFEST).read_text()).get("options", {})
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{out / MANIFEST}: unreadable ({error}); delete the directory to start over") from None
    if previous != options:
        changes = ", ".join(f"{k}={previous.get(k)!r} (now {options.get(k)!r})"
                            for k in sorted(set(previous) | set(options)) if previous.get(k) != options.get(k))
        raise UserError(f"{out}: was written with other options: {changes}; "
                        "use another --out directory, or delete this one to start over")


def merge_progress(out: Path, shards: int) -> dict[str, Any]:
    """The counts of every finished shard, summed."""
    totals: Counter = Counter()
    dropped: Counter = Counter()
    done = 0
    for path in sorted((out / PROGRESS).glob("shard-*.json")):
        counts = json.loads(path.read_text())
        done += 1
        dropped.update(counts.get("dropped", {}))
        totals.update({k: v for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)})
    return {"out": str(out), "shards": shards, "shards_done": done, **dict(sorted(totals.items())),
            "dropped": dict(sorted(dropped.items()))}


def format_counts(summary: dict[str, Any]) -> str:
    """One readable paragraph: what was done and what was left out, by reason."""
    counts = ", ".join(f"{v} {k}" for k, v in summary.items() if k not in ("out", "shards", "shards_done", "dropped"))
    head = f"{summary['out']}: {summary['shards_done']} of {summary['shards']} shards done: {counts}"
    return "\n".join([head, *dropped_lines(summary["dropped"])])

