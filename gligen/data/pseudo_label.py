"""`gligen data pseudo-label`: image-caption pairs to grounded shards through the detector.

GLIGEN made most of its grounding data this way from CC3M and SBU: noun phrases of the
caption are detected in the image and kept with their boxes and char spans. Here
`detector.label.label_batch` does that, a batch of pairs per detector call; each pair
becomes one sample, or is skipped (and counted) when no phrase is found.

Pairs come from either
- a directory of images and a captions file: `.jsonl` lines `{"image": "rel/path.jpg",
  "caption": "..."}` or `.tsv` lines `rel/path.jpg<TAB>caption` (keys are line numbers),
  cut into input shards of `samples_per_shard` pairs, or
- webdataset shards of `jpg` (or png/webp) + `txt` samples, as img2dataset writes them
  (keys are kept): a directory of `.tar` files, a brace pattern, a URL, a `pipe:` command;
  one input shard per tar.

Output shard `DIR/shard-NNNNNN.tar` holds the samples of input shard N (none: no file).
The work is split across `accelerate launch` processes, resumes per shard and ends with one
merged `DIR/summary.json` (`gligen.data.sharded`): the shards equal a single process's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import webdataset as wds
from PIL import Image

from gligen.data.format import Sample, SampleError, encode_sample
from gligen.data.sharded import Decoded, InputShard, Pending, list_shards, run_sharded, tar_shards
from gligen.errors import UserError
from gligen.files import atomic_path, parse_json, read_text
from gligen.layout import Layout

if TYPE_CHECKING:
    from gligen.maps.extract import Extractor

Labeler = Callable[[list[Image.Image], list[str]], list[Layout]]
"""(images, captions) -> one layout per image, entities with boxes and char spans in the caption
(`detector.label.label_batch` with a detector bound); raises `UserError` for an unlabelable caption."""


def pairs_from_directory(images_dir: str | os.PathLike, captions: str | os.PathLike) -> list[Pending]:
    """Pairs listed in a `.jsonl` or `.tsv` captions file, image paths relative to `images_dir`."""
    captions = Path(captions)
    if not captions.is_file():
        raise UserError(f"{captions}: captions file not found")
    if captions.suffix not in (".jsonl", ".tsv"):
        raise UserError(f"{captions}: captions file must be .jsonl or .tsv")
    pairs = []
    for lineno, line in enumerate(read_text(captions).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{captions} line {lineno}"
        if captions.suffix == ".jsonl":
            record = parse_json(line, where)
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise UserError(f"{where}: expected an object with 'image' and 'caption'")
            name, caption = record["image"], record.get("caption")
            if caption is not None and not isinstance(caption, str):
                raise UserError(f"{where}: 'caption' must be a string")
        else:
            name, _, caption = line.partition("\t")
        pairs.append(Pending(f"{lineno:09d}", str(Path(images_dir) / name), str(Path(images_dir) / name), caption))
    return pairs


def pair_shards(source: str, captions: str | None, samples_per_shard: int) -> list[InputShard]:
    """The input shards of `source`: a directory with a captions file, or webdataset shards of image + txt."""
    if captions is None:
        return tar_shards(source)
    if not Path(source).is_dir():
        raise UserError(f"{source}: --captions needs a directory of images")
    return list_shards(pairs_from_directory(source, captions), samples_per_shard, str(captions))


def write_pseudo_label_shards(
    shards: list[InputShard],
    labeler: Labeler,
    out: str | os.PathLike,
    options: dict[str, Any],
    image_format: str = "jpg",
    batch_size: int = 8,
    workers: int = 4,
    state=None,
    condition: Extractor | None = None,
) -> dict[str, Any] | None:
    """Label the pairs of this process's input shards into `out/shard-NNNNNN.tar`; the merged summary (main process).
    `condition` adds a map to every sample (as `ShardWriter` does)."""

    def job(shard: InputShard, batches: Iterable[list[Decoded]], out_dir: Path) -> dict[str, Any]:
        samples, dropped, inputs = [], {}, 0
        for batch in batches:
            inputs += len(batch)
            for result in _label_batch(labeler, batch):
                if isinstance(result, SampleError):
                    dropped[result.reason] = dropped.get(result.reason, 0) + 1
                else:
                    if condition is not None:
                        result.condition, result.condition_map = condition.kind, condition(result.image)
                    samples.append(result)
        if samples:
            with atomic_path(out_dir / f"shard-{shard.index:06d}.tar") as tmp, open(tmp, "wb") as file:
                with wds.TarWriter(file, encoder=False, mtime=0) as tar:  # a fixed mtime: byte-identical reruns
                    for sample in samples:
                        tar.write(encode_sample(sample, image_format))
        return {"inputs": inputs, "samples": len(samples), "dropped": dropped}

    options = dict(options, command="pseudo-label", image_format=image_format, batch_size=batch_size)
    if condition is not None:
        options.update(condition.options())
    return run_sharded(shards, job, out, options, batch_size, workers, state, desc="pseudo-label")


def _label_batch(labeler: Labeler, batch: list[Decoded]) -> list[Sample | SampleError]:
    """One sample, or the reason for none, per decoded pair; one detector call for those that can be labelled."""
    results: list[Sample | SampleError] = []
    ready = []
    for i, item in enumerate(batch):
        if item.caption is None or not item.caption.strip():
            results.append(SampleError(item.where, "pair without caption"))
        elif isinstance(item.image, SampleError):
            results.append(item.image)
        else:
            results.append(None)  # filled below
            ready.append(i)
    for i, layout in zip(ready, _label(labeler, [batch[i] for i in ready])):
        results[i] = layout if isinstance(layout, SampleError) else _sample(batch[i], layout)
    return results


def _label(labeler: Labeler, pairs: list[Decoded]) -> list[Layout | SampleError]:
    """One detector call for the batch; if it refuses a caption, pair by pair to skip only that one."""
    if not pairs:
        return []
    try:
        return labeler([pair.image for pair in pairs], [pair.caption.strip() for pair in pairs])
    except UserError as error:
        if len(pairs) == 1:
            return [SampleError(pairs[0].where, "caption not labelled", str(error))]
    return [result for pair in pairs for result in _label(labeler, [pair])]


def _sample(pair: Decoded, layout: Layout) -> Sample | SampleError:
    if not layout.entities:
        return SampleError(pair.where, "no phrase of the caption detected")
    return Sample(pair.key, pair.image, layout.prompt, list(layout.entities))
