"""`gligen data from-coco`: COCO detection data (and captions, and person keypoints) to training shards.

Each image becomes one sample whose entities are its non-crowd boxes, the phrase being the
category name. Without a captions file the caption is empty, as GLIGEN trained on
detection-only data. With one, the caption is the image's first caption (lowest caption
id), or with `all_captions` one sample per caption (keys `IMAGEID_CAPTIONID`), each holding
the image again.

With a person keypoints file (`person_keypoints_train2017.json`) the persons carry their 17
keypoints: alone, it is the annotation file and the entities are its persons with at least
`min_keypoints` given points (as GLIGEN's keypoint model trained); beside an instances file,
each person annotation of it gets the keypoints of the same annotation id.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from gligen.data.format import Sample, SampleError, load_image, safe_key
from gligen.data.writer import ShardWriter
from gligen.errors import UserError
from gligen.files import read_json
from gligen.layout import Box, Entity
from gligen.pose import coco_keypoints, given_points

if TYPE_CHECKING:
    from gligen.maps.extract import Extractor


def load_coco_json(path: str | os.PathLike, required: tuple[str, ...]) -> dict[str, Any]:
    """A COCO-style JSON file with the `required` top-level lists, or a `UserError` naming the problem."""
    data = read_json(path)
    for key in required:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise UserError(f"{path}: expected a COCO JSON object with a '{key}' list")
    return data


def by_image(annotations: list[dict[str, Any]]) -> dict[Any, list[dict[str, Any]]]:
    """Annotations grouped by `image_id`, each group in annotation id order."""
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for ann in sorted(annotations, key=lambda a: a.get("id", 0)):
        groups[ann.get("image_id")].append(ann)
    return groups


def coco_box(bbox: Any, width: int, height: int) -> Box | None:
    """COCO [x, y, w, h] in pixels to normalized xyxy, clipped to the image; None if empty or malformed."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    x0, y0 = max(x, 0.0) / width, max(y, 0.0) / height
    x1, y1 = min(x + w, width) / width, min(y + h, height) / height
    if not (x1 > x0 and y1 > y0):
        return None
    return (x0, y0, x1, y1)


def open_coco_image(entry: dict[str, Any], images_dir: Path) -> tuple[Image.Image, str]:
    """The image file of a COCO image entry, checked against the entry's width and height."""
    path = images_dir / str(entry.get("file_name", ""))
    image = load_image(path)
    if (image.width, image.height) != (entry.get("width"), entry.get("height")):
        raise SampleError(
            str(path), "image size differs from the annotations",
            f"{image.width}x{image.height} vs {entry.get('width')}x{entry.get('height')}",
        )
    return image, str(path)


def write_coco_shards(
    instances: str | os.PathLike | None,
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    captions: str | os.PathLike | None = None,
    all_captions: bool = False,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    keypoints: str | os.PathLike | None = None,
    min_keypoints: int = 1,
    condition: Extractor | None = None,
) -> dict[str, Any]:
    """Convert COCO instances and/or person keypoints (+ captions) to shards under `out`, resuming; returns the summary.
    `condition` adds a map to every sample (`ShardWriter`)."""
    if instances is None and keypoints is None:
        raise UserError("from-coco needs an instances JSON, a keypoints JSON (--keypoints), or both")
    data = load_coco_json(instances or keypoints, ("images", "annotations", "categories"))
    names = {c.get("id"): c.get("name") for c in data["categories"]}
    boxes_of = by_image(data["annotations"])
    poses = {}  # annotation id -> COCO's flat keypoints
    if keypoints is not None:
        pose_data = data if instances is None else load_coco_json(keypoints, ("annotations",))
        poses = {ann.get("id"): ann.get("keypoints") for ann in pose_data["annotations"] if "keypoints" in ann}
    captions_of = by_image(load_coco_json(captions, ("annotations",))["annotations"]) if captions else None
    images = sorted(data["images"], key=lambda e: e.get("id", 0))
    images_dir = Path(images_dir)
    options = {"command": "from-coco", "instances": str(Path(instances).resolve()) if instances else None,
               "images": str(images_dir.resolve()), "captions": str(Path(captions).resolve()) if captions else None,
               "all_captions": all_captions}
    if keypoints is not None:  # only then, so that runs of earlier versions resume
        options.update(keypoints=str(Path(keypoints).resolve()), min_keypoints=min_keypoints)

    def person(ann: dict[str, Any], where: str, width: int, height: int):
        """The annotation's keypoints, or None when it has none (or too few: counted)."""
        if ann.get("id") not in poses:
            return None
        points = coco_keypoints(poses[ann.get("id")], width, height)
        if points is None:
            writer.drop("annotation with malformed keypoints", detail=f"{where}: annotation {ann.get('id')}")
        elif len(given_points(points)) < min_keypoints:
            writer.drop(f"person with fewer than {min_keypoints} keypoints" + (" (kept as a box)" if instances else ""))
        else:
            return points
        return None

    def convert(entry: dict[str, Any]) -> list[Sample]:
        image, where = open_coco_image(entry, images_dir)
        entities = []
        for ann in boxes_of.get(entry.get("id"), []):
            if ann.get("iscrowd"):
                writer.drop("crowd annotation (skipped)")
                continue
            name = names.get(ann.get("category_id"))
            box = coco_box(ann.get("bbox"), image.width, image.height)
            if not isinstance(name, str) or not name.strip():
                writer.drop("annotation with unknown category", detail=f"{where}: category {ann.get('category_id')}")
            elif box is None:
                writer.drop("annotation with empty or malformed box", detail=f"{where}: bbox {ann.get('bbox')}")
            else:
                points = person(ann, where, image.width, image.height)
                if points is not None or instances is not None:
                    entities.append(Entity(name.strip(), box, keypoints=points))
        if not entities:
            raise SampleError(where, "image without usable boxes" if instances is not None else
                              f"image without a person with {min_keypoints}+ keypoints")
        key = safe_key(entry.get("id"))
        if captions_of is None:
            return [Sample(key, image, "", entities)]
        texts = [c for c in captions_of.get(entry.get("id"), []) if isinstance(c.get("caption"), str)]
        if not texts:
            raise SampleError(where, "image without caption")
        if not all_captions:
            return [Sample(key, image, texts[0]["caption"].strip(), entities)]
        return [Sample(f"{key}_{safe_key(c.get('id'))}", image, c["caption"].strip(), entities) for c in texts]

    with ShardWriter(out, options, samples_per_shard, image_format, condition) as writer:
        writer.consume(images, convert, total=len(images), desc="from-coco")
    return writer.summary()
