"""Evaluation sets: COCO / LVIS instance annotations or a layouts JSONL -> layouts to generate and score.

A COCO or LVIS instances JSON becomes one layout per image: each kept annotation an entity
whose phrase is its category name (LVIS underscores become spaces) and whose box is the
annotation's pixel `bbox` normalized by the image size; a COCO person keypoints JSON's persons
also carry their keypoints. The prompt is the image's first
caption when a COCO captions JSON is given, else the phrases joined by commas. Layouts get
the generation size (`size` x `size`, as GLIGEN evaluated at 512), their boxes stay
normalized, so they are the same on the generated and on the real image.

The filters are those of the layout-to-image literature (LostGAN, LAMA, GLIGEN): crowd
annotations dropped, boxes under `min_area` of the image dropped, images with fewer than
`min_objects` or more than `max_objects` remaining boxes skipped, then the `max_entities`
largest boxes kept. A layout with a condition map and no box is kept whatever the box filters say:
its map grounds it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from gligen.errors import UserError, is_number
from gligen.files import read_json
from gligen.layout import MAX_ENTITIES, Entity, Layout, load_layouts
from gligen.pose import NUM_KEYPOINTS, Keypoints, coco_keypoints, given_points


class Record(NamedTuple):
    """One image of an evaluation set: its layout, its id and the dataset's own image file."""

    layout: Layout
    image_id: int
    file_name: str


@dataclass(frozen=True)
class Category:
    """A category scored by AP: the phrase the detector is prompted with, and LVIS's frequency group."""

    id: int
    name: str
    frequency: str | None = None  # "r", "c" or "f" for LVIS categories


@dataclass(frozen=True)
class Filters:
    min_objects: int = 1
    max_objects: int | None = None
    min_area: float = 0.0  # fraction of the image
    skip_crowd: bool = True
    max_entities: int = MAX_ENTITIES


@dataclass
class EvalSet:
    records: list[Record]
    categories: list[Category]

    def category_ids(self) -> dict[str, int]:
        """Normalized phrase (as the detector's captions have it: `detector.prompt.normalize_phrase`) -> category id."""
        from detector.prompt import normalize_phrase

        return {normalize_phrase(c.name): c.id for c in self.categories}


def load_eval_set(
    path: str | Path,
    captions: str | Path | None = None,
    filters: Filters = Filters(),
    size: int = 512,
    limit: int | None = None,
) -> EvalSet:
    """Read a COCO / LVIS instances `.json` or a layouts `.jsonl`, filter, and keep the first `limit` images."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found")
    if path.suffix == ".jsonl":
        if captions is not None:
            raise UserError(f"{captions}: captions apply to a COCO instances JSON, not to the layouts {path}")
        records, categories = _from_layouts(path, filters)
    else:
        records, categories = _from_instances(path, captions, filters, size)
    return EvalSet(records[:limit] if limit is not None else records, categories)


def _from_layouts(path: Path, filters: Filters) -> tuple[list[Record], list[Category]]:
    """Layouts JSONL: `image_id` and `file_name` from each layout's extra keys, else line index and ''."""
    records = []
    for index, layout in enumerate(load_layouts(path)):
        image_id = layout.meta.get("image_id", index)
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise UserError(f"{path} line {index + 1}: 'image_id' must be an integer, got {image_id!r}")
        map_only = layout.condition is not None and not layout.entities  # grounded by its map: no box to count
        entities = [] if map_only else _filter(list(layout.entities), filters)
        if entities is not None:
            layout = _keep_largest(replace(layout, entities=tuple(entities)), filters.max_entities)
            records.append(Record(layout, image_id, str(layout.meta.get("file_name", ""))))
    _check_unique(records, path)
    from detector.prompt import normalize_phrase

    names = dict.fromkeys(normalize_phrase(phrase) for record in records for phrase in record.layout.phrases)
    return records, [Category(i, name) for i, name in enumerate(names, 1)]


def _from_instances(
    path: Path, captions_path: str | Path | None, filters: Filters, size: int
) -> tuple[list[Record], list[Category]]:
    data = read_json(path)
    categories = {}
    for i, cat in enumerate(json_list(data, "categories", path)):
        where = f"{path}: categories[{i}]"
        frequency = cat.get("frequency") if isinstance(cat, dict) else None
        if frequency not in (None, "r", "c", "f"):
            raise UserError(f"{where}: 'frequency' must be 'r', 'c' or 'f', got {frequency!r}")
        category = Category(check_id(cat, "id", where), check_name(cat, where).replace("_", " "), frequency)
        unique(category.id, categories, "category id", where)
        categories[category.id] = category

    images = {}
    for i, image in enumerate(json_list(data, "images", path)):
        where = f"{path}: images[{i}]"
        image_id = check_id(image, "id", where)
        if "file_name" in image or "coco_url" not in image:
            file_name = required(image, "file_name", where)
        else:  # LVIS: "http://images.cocodataset.org/val2017/0001.jpg" -> "val2017/0001.jpg" as detectron2 does
            file_name = required(image, "coco_url", where)
            if isinstance(file_name, str):
                file_name = "/".join(file_name.split("/")[-2:])
        if not isinstance(file_name, str):
            raise UserError(f"{where}: 'file_name' must be a string, got {file_name!r}")
        unique(image_id, images, "image id", where)
        images[image_id] = (file_name, *check_size(image, where), [])

    for i, ann in enumerate(json_list(data, "annotations", path)):
        where = f"{path}: annotations[{i}]"
        image_id, category_id = check_id(ann, "image_id", where), check_id(ann, "category_id", where)
        bbox = check_bbox(required(ann, "bbox", where), where)
        if image_id not in images:
            raise UserError(f"{where}: image_id {image_id!r} is not in 'images'")
        if category_id not in categories:
            raise UserError(f"{where}: category_id {category_id!r} is not in 'categories'")
        if ann.get("iscrowd", 0) and filters.skip_crowd:
            continue
        _, width, height, entities = images[image_id]
        x, y, w, h = bbox
        box = (max(x / width, 0.0), max(y / height, 0.0), min((x + w) / width, 1.0), min((y + h) / height, 1.0))
        if box[2] > box[0] and box[3] > box[1]:  # COCO has a few zero-size boxes; no layout can hold them
            entities.append(Entity(categories[category_id].name, box, keypoints=_keypoints(ann, width, height, where)))

    prompts = _captions(Path(captions_path)) if captions_path is not None else {}
    records = []
    for image_id, (file_name, _, _, entities) in images.items():
        kept = _filter(entities, filters)
        if kept is None:
            continue
        prompt = prompts.get(image_id) or ", ".join(dict.fromkeys(e.phrase for e in kept))
        layout = _keep_largest(Layout(prompt, tuple(kept), width=size, height=size), filters.max_entities)
        records.append(Record(layout, image_id, file_name))
    return records, sorted(categories.values(), key=lambda c: c.id)


def _keypoints(ann: dict[str, Any], width: float, height: float, where: str) -> Keypoints | None:
    """A person keypoints annotation's points (normalized), None without any given point."""
    if "keypoints" not in ann:
        return None
    points = coco_keypoints(ann["keypoints"], width, height)
    if points is None:
        raise UserError(f"{where}: 'keypoints' must be {3 * NUM_KEYPOINTS} numbers (x, y, v of 17 points), "
                        f"got {_short(ann['keypoints'])}")
    return points if given_points(points) else None


def _filter(entities: list[Entity], filters: Filters) -> list[Entity] | None:
    """The entities large enough to keep, or None when the image has too few or too many of them."""
    kept = [e for e in entities if e.area >= filters.min_area]
    if len(kept) < filters.min_objects:
        return None
    if filters.max_objects is not None and len(kept) > filters.max_objects:
        return None
    return kept


def _keep_largest(layout: Layout, max_entities: int) -> Layout:
    with warnings.catch_warnings():  # an evaluation set trims many layouts; one warning each is noise
        warnings.simplefilter("ignore")
        return layout.keep_largest(max_entities)


def _captions(path: Path) -> dict[int, str]:
    """image_id -> its first caption in the COCO captions file."""
    prompts: dict[int, str] = {}
    for i, ann in enumerate(json_list(read_json(path), "annotations", path)):
        where = f"{path}: annotations[{i}]"
        caption = required(ann, "caption", where)
        if not isinstance(caption, str):
            raise UserError(f"{where}: 'caption' must be a string, got {caption!r}")
        prompts.setdefault(check_id(ann, "image_id", where), caption.strip())
    return prompts


def _check_unique(records: list[Record], path: Path) -> None:
    seen: set[int] = set()
    for record in records:
        if record.image_id in seen:
            raise UserError(f"{path}: image_id {record.image_id} appears twice")
        seen.add(record.image_id)


def json_list(data: Any, key: str, path: str | Path) -> list:
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object with '{key}'")
    value = required(data, key, str(path))
    if not isinstance(value, list):
        raise UserError(f"{path}: '{key}' must be a list")
    return value


def required(record: Any, key: str, where: str) -> Any:
    """`record[key]`, or a UserError such as "gt.json: annotations[12]: missing 'bbox'"."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object")
    if key not in record:
        raise UserError(f"{where}: missing '{key}'")
    return record[key]


def check_bbox(bbox: Any, where: str) -> list[float]:
    """A COCO `bbox`: 4 finite numbers [x, y, width, height] in pixels, width and height not negative."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        raise UserError(f"{where}: 'bbox' must be 4 finite numbers [x, y, width, height], got {_short(bbox)}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise UserError(f"{where}: 'bbox' {_short(bbox)} has a negative width or height")
    return bbox


def check_id(record: Any, key: str, where: str) -> int:
    """`record[key]`, an integer id."""
    value = required(record, key, where)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{where}: '{key}' must be an integer, got {_short(value)}")
    return value


def check_name(record: Any, where: str) -> str:
    """`record["name"]`, a non-empty string."""
    name = required(record, "name", where)
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{where}: 'name' must be a non-empty string, got {_short(name)}")
    return name


def check_size(record: Any, where: str) -> tuple[int, int]:
    """`record["width"], record["height"]`: positive numbers of pixels."""
    sides = tuple(required(record, key, where) for key in ("width", "height"))
    for key, value in zip(("width", "height"), sides):
        if not is_number(value) or value <= 0:
            raise UserError(f"{where}: '{key}' must be a positive number of pixels, got {_short(value)}")
    return sides


def unique(value: int, seen: Any, what: str, where: str) -> None:
    """Refuse a second record with the same id."""
    if value in seen:
        raise UserError(f"{where}: {what} {value} appears twice")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
