"""`gligen data pseudo-label`: image-caption pairs to grounded shards through the detector.

GLIGEN made most of its grounding data this way from CC3M and SBU: noun phrases of the
caption are detected in the image and kept with their boxes and char spans. Here
`detector.label.label_batch` does that, a batch of pairs per detector call; each pair
becomes one sample, or is skipped (and counted) when no phrase is found.

Pairs come from either
- a directory of images and a captions file: `.jsonl` lines `{"image": "rel/path.jpg",
  "caption": "..."}` or `.tsv` lines `rel/path.jpg<TAB>caption` (keys are line numbers), or
- webdataset shards of `jpg` (or png/webp) + `txt` samples, as img2dataset writes them
  (keys are kept): a directory of `.tar` files, a brace pattern, a URL, a `pipe:` command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import webdataset as wds
from PIL import Image

from gligen.data.format import IMAGE_EXTENSIONS, Sample, SampleError, decode_image, load_image, shard_urls
from gligen.data.writer import ShardWriter, attempt
from gligen.errors import UserError
from gligen.files import parse_json, read_text
from gligen.layout import Layout

if TYPE_CHECKING:
    from gligen.maps.extract import Extractor

Labeler = Callable[[list[Image.Image], list[str]], list[Layout]]
"""(images, captions) -> one layout per image, entities with boxes and char spans in the caption
(`detector.label.label_batch` with a detector bound); raises `UserError` for an unlabelable caption."""


@dataclass
class Pair:
    """One image-caption pair; the image is decoded only when needed (not for pairs resumed past)."""

    key: str
    where: str
    caption: str | None
    load: Callable[[], Image.Image]


def pairs_from_directory(images_dir: str | os.PathLike, captions: str | os.PathLike) -> list[Pair]:
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
        path = Path(images_dir) / name
        pairs.append(Pair(f"{lineno:09d}", str(path), caption, lambda path=path: load_image(path)))
    return pairs


def pairs_from_shards(source: str) -> Iterator[Pair]:
    """Pairs of webdataset shards holding an image and a `txt` caption per sample."""
    for raw in wds.DataPipeline(wds.SimpleShardList(shard_urls(source)), wds.tarfile_to_samples()):
        where = f"{raw.get('__url__')} key {raw['__key__']}"
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        caption = raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else None
        load = _missing(where) if image_ext is None else (lambda data=raw[image_ext], w=where: decode_image(data, w))
        yield Pair(raw["__key__"], where, caption, load)


def _missing(where: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        raise SampleError(where, "no image")

    return load


def write_pseudo_label_shards(
    pairs: list[Pair] | Iterator[Pair],
    labeler: Labeler,
    out: str | os.PathLike,
    options: dict[str, Any],
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    batch_size: int = 8,
    condition: Extractor | None = None,
) -> dict[str, Any]:
    """Label the pairs, `batch_size` at a time, into shards under `out`, resuming; returns the summary.
    `condition` adds a map to every sample (`ShardWriter`)."""

    def convert_batch(batch: list[Pair]) -> list[list[Sample] | SampleError]:
        images = [attempt(_load, pair) for pair in batch]
        ready = [i for i, image in enumerate(images) if not isinstance(image, SampleError)]
        layouts = _label(labeler, [batch[i] for i in ready], [images[i] for i in ready])
        results: list[list[Sample] | SampleError] = list(images)  # the errors stay, images get replaced
        for i, layout in zip(ready, layouts):
            results[i] = layout if isinstance(layout, SampleError) else _sample(batch[i], images[i], layout)
        return results

    total = len(pairs) if isinstance(pairs, list) else None
    with ShardWriter(out, dict(options, command="pseudo-label"), samples_per_shard, image_format, condition) as writer:
        writer.consume_batches(pairs, convert_batch, total, "pseudo-label", batch_size)
    return writer.summary()


def _load(pair: Pair) -> Image.Image:
    if pair.caption is None or not pair.caption.strip():
        raise SampleError(pair.where, "pair without caption")
    return pair.load()


def _label(labeler: Labeler, pairs: list[Pair], images: list[Image.Image]) -> list[Layout | SampleError]:
    """One detector call for the batch; if it refuses a caption, pair by pair to skip only that one."""
    if not pairs:
        return []
    try:
        return labeler(images, [pair.caption.strip() for pair in pairs])
    except UserError as error:
        if len(pairs) == 1:
            return [SampleError(pairs[0].where, "caption not labelled", str(error))]
    return [result for pair, image in zip(pairs, images) for result in _label(labeler, [pair], [image])]


def _sample(pair: Pair, image: Image.Image, layout: Layout) -> list[Sample] | SampleError:
    if not layout.entities:
        return SampleError(pair.where, "no phrase of the caption detected")
    return [Sample(pair.key, image, layout.prompt, list(layout.entities))]
