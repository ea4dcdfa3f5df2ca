"""`gligen data from-grounding`: MDETR-style grounding annotations to training shards.

The input is COCO-like JSON as MDETR released it for Flickr30k Entities and GoldG
(`final_flickr_separateGT_train.json`, `final_mixed_train_no_coco.json`): each entry of
`images` is one image-caption pair (`file_name`, `width`, `height`, `caption`), each
annotation a box with `tokens_positive`, the character spans of its phrase in the caption.
Every entry becomes one sample (an image with several captions appears once per caption);
an entity's phrase is the caption text of its spans, joined by spaces, and its spans are
kept as `tokens_positive`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gligen.data.coco import by_image, coco_box, load_coco_json, open_coco_image
from gligen.data.format import Sample, SampleError, safe_key
from gligen.data.writer import ShardWriter
from gligen.layout import Entity, Span

if TYPE_CHECKING:
    from gligen.maps.extract import Extractor


def phrase_spans(tokens_positive: Any, caption: str) -> tuple[Span, ...] | None:
    """Valid, sorted char spans of an annotation in `caption`, or None when there are none."""
    try:
        spans = tuple(sorted((int(a), int(b)) for a, b in tokens_positive))
    except (TypeError, ValueError):
        return None
    if not spans or not all(0 <= a < b <= len(caption) and caption[a:b].strip() for a, b in spans):
        return None
    return spans


def write_grounding_shards(
    annotations: str | os.PathLike,
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    condition: Extractor | None = None,
) -> dict[str, Any]:
    """Convert MDETR-style grounding data to shards under `out`, resuming; returns the summary.
    `condition` adds a map to every sample (`ShardWriter`)."""
    data = load_coco_json(annotations, ("images", "annotations"))
    boxes_of = by_image(data["annotations"])
    entries = sorted(data["images"], key=lambda e: e.get("id", 0))
    images_dir = Path(images_dir)
    options = {"command": "from-grounding", "annotations": str(Path(annotations).resolve()),
               "images": str(images_dir.resolve())}

    def convert(entry: dict[str, Any]) -> list[Sample]:
        caption = entry.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise SampleError(f"{annotations} image {entry.get('id')}", "entry without caption")
        image, where = open_coco_image(entry, images_dir)
        entities = []
        for ann in boxes_of.get(entry.get("id"), []):
            spans = phrase_spans(ann.get("tokens_positive"), caption)
            box = coco_box(ann.get("bbox"), image.width, image.height)
            if ann.get("iscrowd"):
                writer.drop("crowd annotation (skipped)")
            elif box is None:
                writer.drop("annotation with empty or malformed box", detail=f"{where}: bbox {ann.get('bbox')}")
            elif spans is None:
                writer.drop("annotation without valid tokens_positive",
                            detail=f"{where}: tokens_positive {ann.get('tokens_positive')} in {caption!r}")
            else:
                entities.append(Entity(" ".join(caption[a:b].strip() for a, b in spans), box, spans=spans))
        if not entities:
            raise SampleError(where, "image without usable boxes")
        return [Sample(safe_key(entry.get("id")), image, caption, entities)]

    with ShardWriter(out, options, samples_per_shard, image_format, condition) as writer:
        writer.consume(entries, convert, total=len(entries), desc="from-grounding")
    return writer.summary()
