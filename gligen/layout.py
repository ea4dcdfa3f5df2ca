"""Layouts: the one input type of generation, training data, verification and evaluation.

A layout is a prompt plus entities, each a phrase and a box. Boxes are normalized xyxy
(origin top-left, values in [0, 1]) unless the file says `"box_units": "pixels"`, in
which case they are divided by the layout's width and height on load.

    {"prompt": "a cat and a dog", "width": 512, "height": 512, "seed": 0,
     "entities": [{"phrase": "a cat", "box": [0.1, 0.35, 0.45, 0.9]},
                  {"phrase": "a dog", "box": [0.5, 0.3, 0.95, 0.9], "image": "dog.jpg"}]}

An entity may carry `keypoints` (17 COCO points [x, y] or [x, y, v], in the box units; v = 0:
not given): its box, when missing, is that of its given points, and its phrase, when missing,
is "person". An entity may carry `mask`, the region to repaint when inpainting: a PNG (light = the
entity; relative to the layout file, resized to the layout) or a polygon [[x, y], ...] of at least 3
points in the box units. A layout may carry `style`, an image whose style the picture takes (text-image-box
models). Image paths are relative to the layout file.
A layout may also carry a dense map that grounds the whole image, with or without entities:
`"condition": {"type": "canny" | "hed" | "depth" | "normal" | "sem", "image": "map.png"}` (see `gligen.maps`).

A `.json` file holds one layout (or a list of them), a `.jsonl` file one layout per line.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from gligen.errors import UserError, is_number
from gligen.pose import KEYPOINT_NAMES, NUM_KEYPOINTS, Keypoints, given_points
from gligen.maps import CONDITION_TYPES, LABEL_TYPES

Box = tuple[float, float, float, float]
Span = tuple[int, int]
Polygon = tuple[tuple[float, float], ...]

MAX_ENTITIES = 30  # the released GLIGEN models were trained with at most 30 grounding tokens
MAX_SIDE = 4096  # default limit on a layout's width and height, in pixels (`--max-side`)
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1

_LAYOUT_KEYS = {"prompt", "negative_prompt", "width", "height", "seed", "entities", "box_units", "style", "condition"}
KEYPOINT_PHRASE = "person"  # the phrase of an entity given by its keypoints alone


class LayoutError(UserError):
    """A layout breaks a rule; the message names the layout, the entity and the rule."""


@dataclass(frozen=True)
class Entity:
    """One thing to place: a phrase, its normalized xyxy box, optionally a reference image, keypoints and a mask.

    `spans` are character spans of the phrase in the layout's prompt (`tokens_positive` in
    grounding data), when known. `keypoints` are a person's 17 normalized (x, y, v) in COCO's
    order (`gligen.pose`). `mask` (inpainting: what to repaint instead of the box) is a mask image
    path or a normalized polygon (`gligen.masks`).
    """

    phrase: str
    box: Box
    image: str | None = None
    spans: tuple[Span, ...] | None = None
    keypoints: Keypoints | None = None
    mask: str | Polygon | None = None

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phrase": self.phrase, "box": [round(v, 6) for v in self.box]}
        if self.image is not None:
            out["image"] = self.image
        if self.spans is not None:
            out["tokens_positive"] = [list(s) for s in self.spans]
        if self.keypoints is not None:
            out["keypoints"] = [[round(x, 6), round(y, 6), v] for x, y, v in self.keypoints]
        if self.mask is not None:
            out["mask"] = self.mask if isinstance(self.mask, str) else [[round(x, 6), round(y, 6)] for x, y in self.mask]
        return out


@dataclass(frozen=True)
class Condition:
    """A dense map that grounds the whole image: its type (`gligen.maps.CONDITION_TYPES`) and its image file."""

    type: str
    image: str

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "image": self.image}


@dataclass(frozen=True)
class Layout:
    """A prompt and the entities to place, optionally a style image and a condition map. Extra keys of the file
    are kept in `meta`."""

    prompt: str
    entities: tuple[Entity, ...] = ()
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    style: str | None = None
    condition: Condition | None = None

    @property
    def phrases(self) -> list[str]:
        return [e.phrase for e in self.entities]

    @property
    def boxes(self) -> list[Box]:
        return [e.box for e in self.entities]

    def pixel_boxes(self) -> list[Box]:
        """Entity boxes in pixels of a `width` x `height` image."""
        w, h = self.width, self.height
        return [(x0 * w, y0 * h, x1 * w, y1 * h) for x0, y0, x1, y1 in self.boxes]

    def keep_largest(self, max_entities: int = MAX_ENTITIES) -> Layout:
        """The layout with only its largest entities, in their original order: `max_entities` of
        them, one fewer with a style image (its token takes one of the grounding slots)."""
        limit = max_entities - (self.style is not None)
        if len(self.entities) <= limit:
            return self
        by_area = sorted(range(len(self.entities)), key=lambda i: -self.entities[i].area)
        kept = sorted(by_area[:limit])
        styled = " and a style image" if self.style is not None else ""
        warnings.warn(
            f"layout {self.prompt!r} has {len(self.entities)} entities{styled}; keeping the {limit} largest",
            stacklevel=2,
        )
        return replace(self, entities=tuple(self.entities[i] for i in kept))

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.meta)
        out.update(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            seed=self.seed,
            entities=[e.to_dict() for e in self.entities],
        )
        if self.style is not None:
            out["style"] = self.style
        if self.condition is not None:
            out["condition"] = self.condition.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "layout", base_dir: str | os.PathLike | None = None,
                  max_side: int = MAX_SIDE) -> Layout:
        """Validate and build a layout. `where` prefixes every error message (file and line).

        Relative reference image paths are resolved against `base_dir` and must exist; width and
        height above `max_side` pixels are refused.
        """
        if not isinstance(data, dict):
            raise LayoutError(f"{where}: expected a JSON object, got {_json_type(data)}")
        prompt = _string(data, "prompt", where)
        negative = _string(data, "negative_prompt", where)
        width = _side(data, "width", where, max_side)
        height = _side(data, "height", where, max_side)
        seed = data.get("seed", 0)
        if not _is_int(seed) or not 0 <= seed <= SEED_MAX:
            raise LayoutError(f"{where}: 'seed' must be an integer in [0, 2**64 - 1], got {_short(seed)}")
        units = data.get("box_units", "normalized")
        if units not in ("normalized", "pixels"):
            raise LayoutError(f"{where}: 'box_units' must be 'normalized' or 'pixels', got {_short(units)}")
        raw_entities = data.get("entities", [])
        if not isinstance(raw_entities, list):
            raise LayoutError(f"{where}: 'entities' must be a list, got {_json_type(raw_entities)}")
        scale = (width, height, width, height) if units == "pixels" else (1, 1, 1, 1)
        entities = tuple(
            _entity(raw, f"{where}: entity {i}", scale, base_dir, prompt) for i, raw in enumerate(raw_entities)
        )
        if units == "pixels" and entities and all(
            (x1 - x0) * width < 1 and (y1 - y0) * height < 1 for x0, y0, x1, y1 in (e.box for e in entities)
        ):
            warnings.warn(f"{where}: every box is smaller than 1 pixel although 'box_units' is 'pixels'; "
                          "are these normalized numbers? (then drop 'box_units')", stacklevel=2)
        style = data.get("style")
        if style is not None:
            style = _image_path(style, where, base_dir, "style", "style image")
        condition = _condition(data["condition"], where, base_dir) if data.get("condition") is not None else None
        meta = {k: v for k, v in data.items() if k not in _LAYOUT_KEYS}
        return cls(prompt, entities, negative, width, height, seed, meta, style, condition)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    """`repr(value)`, shortened: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> float | None:
    """`value` as a finite float, or None when it is no number (bools are none), NaN, infinite or too large."""
    return float(value) if is_number(value) else None


def _string(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LayoutError(f"{where}: '{key}' must be a string, got {_json_type(value)}")
    return value


def _side(data: dict, key: str, where: str, max_side: int) -> int:
    value = data.get(key, 512)
    if not _is_int(value) or value <= 0 or value % 8:
        raise LayoutError(f"{where}: '{key}' must be a positive multiple of 8, got {_short(value)}")
    if value > max_side:
        raise LayoutError(f"{where}: '{key}' is {value} pixels, above the limit of {max_side} (--max-side)")
    return value


def _entity(raw: Any, where: str, scale: tuple, base_dir: str | os.PathLike | None, text: str | None) -> Entity:
    if not isinstance(raw, dict):
        raise LayoutError(f"{where}: expected an object with 'phrase' and 'box', got {_json_type(raw)}")
    phrase = raw.get("phrase")
    if phrase is None and raw.get("keypoints") is not None:
        phrase = KEYPOINT_PHRASE
    if phrase is None:
        raise LayoutError(f"{where}: 'phrase' is missing")
    if not isinstance(phrase, str):
        raise LayoutError(f"{where}: 'phrase' must be a string, got {_json_type(phrase)}")
    if not phrase.strip():
        raise LayoutError(f"{where}: empty phrase")
    where = f"{where} ({_short(phrase.strip())})"
    keypoints = raw.get("keypoints")
    if keypoints is not None:
        keypoints = _keypoints(keypoints, where, scale)
    box = raw.get("box")
    if box is None and keypoints is not None:
        box = _box_of(keypoints, where)
    else:
        box = _box(box, where, scale)
    image = raw.get("image")
    if image is not None:
        image = _image_path(image, where, base_dir, "image", "reference image")
    mask = raw.get("mask")
    if mask is not None:
        mask = _mask_path(mask, where, base_dir) if isinstance(mask, str) else _polygon(mask, where, scale)
    return Entity(phrase.strip(), box, image, _spans(raw.get("tokens_positive"), where, text), keypoints, mask)


def _box(box: Any, where: str, scale: tuple) -> Box:
    """A box of the file, checked and normalized."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise LayoutError(f"{where}: 'box' must be 4 numbers [x0, y0, x1, y1], got {_short(box)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise LayoutError(f"{where}: box {_short(box)} has a value that is not a number")
    numbers = [_finite(v) for v in box]
    if None in numbers:
        raise LayoutError(f"{where}: box {_short(box)} has a NaN, infinite or huge value")
    x0, y0, x1, y1 = (v / s for v, s in zip(numbers, scale))
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise LayoutError(f"{where}: box {_short(box)} has coordinates outside the image ([0, 1] normalized)")
    if x1 <= x0:
        raise LayoutError(f"{where}: box {_short(box)} has x1 <= x0")
    if y1 <= y0:
        raise LayoutError(f"{where}: box {_short(box)} has y1 <= y0")
    return (x0, y0, x1, y1)


def _keypoints(raw: Any, where: str, scale: tuple) -> Keypoints:
    """17 [x, y] or [x, y, v] entries of the file -> normalized (x, y, v); a point not given becomes (0, 0, 0)."""
    if not isinstance(raw, (list, tuple)) or len(raw) != NUM_KEYPOINTS:
        got = f"{len(raw)} entries" if isinstance(raw, (list, tuple)) else _json_type(raw)
        raise LayoutError(f"{where}: 'keypoints' must be {NUM_KEYPOINTS} [x, y] or [x, y, v] entries in COCO order "
                          f"({', '.join(KEYPOINT_NAMES[:3])}, ...), got {got}")
    points = []
    for k, point in enumerate(raw):
        at = f"{where}: keypoint {k} ({KEYPOINT_NAMES[k]})"
        if not isinstance(point, (list, tuple)) or len(point) not in (2, 3):
            raise LayoutError(f"{at} must be [x, y] or [x, y, v], got {_short(point)}")
        x, y = (_finite(v) for v in point[:2])
        if x is None or y is None:
            raise LayoutError(f"{at} {_short(point)} has a NaN, infinite, huge or non-number coordinate")
        v = point[2] if len(point) == 3 else 2
        if not _is_int(v) or v not in (0, 1, 2):
            raise LayoutError(f"{at}: visibility v must be 0 (not given), 1 or 2, got {_short(v)}")
        x, y = x / scale[0], y / scale[1]
        if v and not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise LayoutError(f"{at} {_short(point)} lies outside the image ([0, 1] normalized)")
        points.append((x, y, v) if v else (0.0, 0.0, 0))
    return tuple(points)


def _polygon(raw: Any, where: str, scale: tuple) -> Polygon:
    """A mask polygon of the file: at least 3 [x, y] points inside the image, spanning an area; normalized."""
    if not isinstance(raw, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in raw):
        raise LayoutError(f"{where}: 'mask' must be a mask image path or a polygon [[x, y], ...], got {_short(raw)}")
    if len(raw) < 3:
        raise LayoutError(f"{where}: mask polygon has {len(raw)} point(s); a polygon needs at least 3")
    points = []
    for k, point in enumerate(raw):
        x, y = (_finite(v) for v in point)
        if x is None or y is None:
            raise LayoutError(f"{where}: mask point {k} {_short(point)} has a NaN, infinite, huge or non-number "
                              "coordinate")
        x, y = x / scale[0], y / scale[1]
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise LayoutError(f"{where}: mask point {k} {_short(point)} lies outside the image ([0, 1] normalized)")
        points.append((x, y))
    twice_area = sum(xa * yb - xb * ya for (xa, ya), (xb, yb) in zip(points, points[1:] + points[:1]))
    if twice_area == 0:
        raise LayoutError(f"{where}: mask polygon spans no area (its points are in a line)")
    return tuple(points)


def _mask_path(value: str, where: str, base_dir: str | os.PathLike | None) -> str:
    """A mask image path, resolved against `base_dir`: an image that reads in full."""
    from gligen.files import open_image

    path = _image_path(value, where, base_dir, "mask", "mask image")
    try:
        open_image(path)
    except UserError as error:
        raise LayoutError(f"{where}: mask image {error}") from None
    return path


def _box_of(keypoints: Keypoints, where: str) -> Box:
    """The box of an entity's given keypoints (its 'box' being missing)."""
    points = given_points(keypoints)
    if not points:
        raise LayoutError(f"{where}: 'box' is missing and no keypoint is given (v > 0) to derive it from")
    xs, ys = [x for x, _ in points], [y for _, y in points]
    box = (min(xs), min(ys), max(xs), max(ys))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise LayoutError(f"{where}: 'box' is missing and the given keypoints span no area "
                          f"({len(points)} point(s) in a line); give a 'box'")
    return box


def _image_path(value: Any, where: str, base_dir: str | os.PathLike | None, key: str, what: str) -> str:
    """The image path under `key`, resolved against `base_dir`; it must name an existing file."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise LayoutError(f"{where}: '{key}' must be a path, got {_short(value)}")
    path = Path(base_dir or ".") / value
    try:
        found = path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        raise LayoutError(f"{where}: {what} not found: {path}")
    return str(path)


def _condition(raw: Any, where: str, base_dir: str | os.PathLike | None) -> Condition:
    """`{"type": ..., "image": ...}`: a known type and a readable image of the kind that type needs."""
    where = f"{where}: condition"
    if not isinstance(raw, dict):
        raise LayoutError(f"{where}: expected an object with 'type' and 'image', got {_json_type(raw)}")
    unknown = sorted(set(raw) - {"type", "image"})
    if unknown:
        raise LayoutError(f"{where}: unknown key {unknown[0]!r} (known: image, type)")
    kind = raw.get("type")
    if kind not in CONDITION_TYPES:
        raise LayoutError(f"{where}: 'type' must be one of {', '.join(CONDITION_TYPES)}, got {_short(kind)}")
    image = raw.get("image")
    if not isinstance(image, str) or not image or "\0" in image:
        raise LayoutError(f"{where}: 'image' must be a path, got {_short(image)}")
    path = Path(base_dir or ".") / image
    bands = _image_bands(path, where)
    if kind in LABEL_TYPES and len(bands) > 1:
        raise LayoutError(f"{where}: {path} is a {'/'.join(bands)} image; a {kind!r} map is an ADE20K label PNG "
                          "(one channel holding a class index per pixel), not a colour picture")
    if kind == "normal" and len(bands) == 1:
        raise LayoutError(f"{where}: {path} is a one-channel image; a 'normal' map is RGB-encoded "
                          "((n + 1) / 2 * 255 of the unit normal)")
    return Condition(kind, str(path))


def _image_bands(path: Path, where: str) -> tuple[str, ...]:
    """The bands of an image file, read from its header (('P',) for a palette); a LayoutError if it is no image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.getbands()
    except FileNotFoundError:
        raise LayoutError(f"{where}: map image not found: {path}") from None
    except (OSError, ValueError, UnidentifiedImageError) as error:
        raise LayoutError(f"{where}: cannot read the map image {path} ({error})") from None


def _spans(raw: Any, where: str, text: str | None) -> tuple[Span, ...] | None:
    """`tokens_positive`: [start, end] character spans of the phrase, inside `text` when it is known."""
    if raw is None:
        return None
    if not isinstance(raw, (list, tuple)) or not all(
        isinstance(s, (list, tuple)) and len(s) == 2 and all(_is_int(v) for v in s) and 0 <= s[0] < s[1] for s in raw
    ):
        raise LayoutError(f"{where}: 'tokens_positive' must be a list of [start, end] integer pairs with "
                          f"0 <= start < end, got {_short(raw)}")
    if text is not None and any(end > len(text) for _, end in raw):
        raise LayoutError(f"{where}: 'tokens_positive' {_short(raw)} reaches past the end of the "
                          f"{len(text)}-character prompt")
    return tuple((start, end) for start, end in raw)


def entity_from_dict(raw: Any, where: str = "entity", text: str | None = None) -> Entity:
    """Validate one entity object with a normalized box (as stored in training shards); spans must lie in `text`."""
    return _entity(raw, where, (1, 1, 1, 1), None, text)


def load_layouts(path: str | os.PathLike, max_side: int = MAX_SIDE) -> list[Layout]:
    """Read layouts from a `.json` file (one layout or a list) or a `.jsonl` file (one a line).

    A file that is empty, holds no layout, or is not UTF-8 text is an error naming it.
    """
    from gligen.files import read_text

    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: layout file not found")
    text = read_text(path)
    if not text.strip():
        raise LayoutError(f"{path}: the file is empty; it should hold a layout (a JSON object)")
    base = path.parent
    if path.suffix == ".jsonl":
        layouts = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                where = f"{path} line {lineno}"
                layouts.append(Layout.from_dict(_parse(line, where), where, base, max_side))
    else:
        parsed = _parse(text, str(path))
        items = parsed if isinstance(parsed, list) else [parsed]
        where = (lambda i: f"{path} layout {i}") if isinstance(parsed, list) else (lambda i: str(path))
        layouts = [Layout.from_dict(item, where(i), base, max_side) for i, item in enumerate(items)]
    if not layouts:
        raise LayoutError(f"{path}: holds no layouts")
    return layouts


def _parse(text: str, where: str) -> Any:
    from gligen.files import parse_json

    return parse_json(text, where)


def save_layouts(path: str | os.PathLike, layouts: Iterable[Layout]) -> None:
    """Write layouts as JSONL (`.jsonl`) or as one JSON layout / list (`.json`), atomically."""
    from gligen.files import write_json, write_text

    layouts = list(layouts)
    if Path(path).suffix == ".jsonl":
        write_text(path, "".join(json.dumps(layout.to_dict()) + "\n" for layout in layouts))
    else:
        write_json(path, layouts[0].to_dict() if len(layouts) == 1 else [lay.to_dict() for lay in layouts])
