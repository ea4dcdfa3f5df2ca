"""`detector detect` over a directory of images or webdataset shards, split across processes.

    detector detect photos/ --phrases "a cat" "a dog" --out dets/
    accelerate launch -m detector.cli detect 'shards/{000000..000999}.tar' --phrases ... --out dets/

Input shard N (a tar, or `--images-per-shard` files of the directory in path order) gives
`DIR/detections-NNNNNN.jsonl`, one line per image: `{"key", "image", "image_size", "phrases",
"detections"}` (as `detector detect --out` writes them). Images that cannot be read are
counted by reason in `DIR/summary.json`. Resumable per shard; see `gligen.data.sharded`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from detector.detect import OpenSetDetector
from detector.exemplars import Exemplar
from gligen.data.format import SampleError
from gligen.data.sharded import Decoded, InputShard, directory_images, list_shards, run_sharded, tar_shards
from gligen.files import atomic_path

REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://")


def is_collection(paths: Sequence[str]) -> bool:
    """Is the one path given a directory or a webdataset source (tars, brace pattern, URL) rather than image files?"""
    if len(paths) != 1:
        return False
    path = paths[0]
    return Path(path).is_dir() or path.endswith(".tar") or "{" in path or path.startswith(REMOTE)


def collection_shards(source: str, images_per_shard: int) -> list[InputShard]:
    """A directory's tars, or its images in blocks of `images_per_shard`; else a webdataset source's tars."""
    if Path(source).is_dir() and not any(Path(source).glob("*.tar")):
        return list_shards(directory_images(source), images_per_shard, source)
    return tar_shards(source)


def detect_shards(
    detector: OpenSetDetector,
    shards: list[InputShard],
    out: str,
    options: dict[str, Any],
    phrases: Sequence[str] | None,
    exemplars: Sequence[Exemplar],
    batch_size: int = 8,
    workers: int = 4,
    state=None,
    **detect_kwargs,
) -> dict[str, Any] | None:
    """Detect in this process's input shards into `out/detections-NNNNNN.jsonl`; the merged summary (main process)."""

    def job(shard: InputShard, batches: Iterable[list[Decoded]], out_dir: Path) -> dict[str, Any]:
        lines, dropped, inputs, found = [], {}, 0, 0
        for batch in batches:
            inputs += len(batch)
            ready = [item for item in batch if not isinstance(item.image, SampleError)]
            for item in batch:
                if isinstance(item.image, SampleError):
                    dropped[item.image.reason] = dropped.get(item.image.reason, 0) + 1
            found_in = detector.detect([item.image for item in ready], phrases, exemplars, batch_size=batch_size,
                                       **detect_kwargs) if ready else []
            for item, detections in zip(ready, found_in):
                lines.append(json.dumps({"key": item.key, "image": item.where, **detections.to_dict()}))
                found += len(detections)
        with atomic_path(out_dir / f"detections-{shard.index:06d}.jsonl") as tmp:
            tmp.write_text("".join(line + "\n" for line in lines))
        return {"inputs": inputs, "images": len(lines), "detections": found, "dropped": dropped}

    options = dict(options, command="detect", batch_size=batch_size)
    return run_sharded(shards, job, out, options, batch_size, workers, state, desc="detect")
