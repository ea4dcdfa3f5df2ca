"""Layouts: the one input type of generation, training data, verification and evaluation.

A layout is a prompt plus entities, each a phrase and a box. Boxes are normalized xyxy
(origin top-left, values in [0, 1]) unless the file says `"box_units": "pixels"`, in
which case they are divided by the layout's width and height on load.

    {"prompt": "a cat and a dog", "width": 512, "height": 512, "seed": 0,
     "entities": [{"phrase": "a cat", "box": [0.1, 0.35, 0.45, 0.9]},
                  {"phrase": "a dog", "box": [0.5, 0.3, 0.95, 0.9], "image": "dog.jpg"}]}

A `.json` file holds one layout (or a list of them), a `.jsonl` file one layout per line.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from gligen.errors import UserError

Box = tuple[float, float, float, float]
Span = tuple[int, int]

MAX_ENTITIES = 30  # the released GLIGEN models were trained with at most 30 grounding tokens

_LAYOUT_KEYS = {"prompt", "negative_prompt", "width", "height", "seed", "entities", "box_units"}


class LayoutError(UserError):
    """A layout breaks a rule; the message names the layout, the entity and the rule."""


@dataclass(frozen=True)
class Entity:
    """One thing to place: a phrase, its normalized xyxy box, optionally a reference image.

    `spans` are character spans of the phrase in the layout's prompt (`tokens_positive` in
    grounding data), when known.
    """

    phrase: str
    box: Box
    image: str | None = None
    spans: tuple[Span, ...] | None = None

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
        return out


@dataclass(frozen=True)
class Layout:
    """A prompt and the entities to place. Extra keys of the file are kept in `meta`."""

    prompt: str
    entities: tuple[Entity, ...] = ()
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

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
        """The layout with only its `max_entities` largest entities, in their original order."""
        if len(self.entities) <= max_entities:
            return self
        by_area = sorted(range(len(self.entities)), key=lambda i: -self.entities[i].area)
        kept = sorted(by_area[:max_entities])
        warnings.warn(
            f"layout {self.prompt!r} has {len(self.entities)} entities; keeping the {max_entities} largest",
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
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "layout", base_dir: str | os.PathLike | None = None) -> Layout:
        """Validate and build a layout. `where` prefixes every error message (file and line).

        Relative reference image paths are resolved against `base_dir` and must exist.
        """
        if not isinstance(data, dict):
            raise LayoutError(f"{where}: expected a JSON object, got {type(data).__name__}")
        prompt = data.get("prompt", "")
        if not isinstance(prompt, str):
            raise LayoutError(f"{where}: 'prompt' must be a string")
        negative = data.get("negative_prompt", "") or ""
        if not isinstance(negative, str):
            raise LayoutError(f"{where}: 'negative_prompt' must be a string")
        width = _positive_int(data, "width", 512, where)
        height = _positive_int(data, "height", 512, where)
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise LayoutError(f"{where}: 'seed' must be a non-negative integer, got {seed!r}")
        units = data.get("box_units", "normalized")
        if units not in ("normalized", "pixels"):
            raise LayoutError(f"{where}: 'box_units' must be 'normalized' or 'pixels', got {units!r}")
        raw_entities = data.get("entities", [])
        if not isinstance(raw_entities, list):
            raise LayoutError(f"{where}: 'entities' must be a list")
        scale = (width, height, width, height) if units == "pixels" else (1, 1, 1, 1)
        entities = tuple(
            _entity(raw, f"{where}: entity {i}", scale, base_dir) for i, raw in enumerate(raw_entities)
        )
        meta = {k: v for k, v in data.items() if k not in _LAYOUT_KEYS}
        return cls(prompt, entities, negative, width, height, seed, meta)


def _positive_int(data: dict, key: str, default: int, where: str) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 8:
        raise LayoutError(f"{where}: '{key}' must be a positive multiple of 8, got {value!r}")
    return value


def _entity(raw: Any, where: str, scale: tuple, base_dir: str | os.PathLike | None) -> Entity:
    if not isinstance(raw, dict):
        raise LayoutError(f"{where}: expected an object with 'phrase' and 'box'")
    phrase = raw.get("phrase")
    if not isinstance(phrase, str) or not phrase.strip():
        raise LayoutError(f"{where}: empty phrase")
    where = f"{where} ({phrase!r})"
    box = raw.get("box")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise LayoutError(f"{where}: 'box' must be 4 numbers [x0, y0, x1, y1]")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise LayoutError(f"{where}: box {box} has a value that is not a number")
    if not all(math.isfinite(v) for v in box):
        raise LayoutError(f"{where}: box {box} has a NaN or infinite value")
    x0, y0, x1, y1 = (float(v) / s for v, s in zip(box, scale))
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise LayoutError(f"{where}: box {box} has coordinates outside the image ([0, 1] normalized)")
    if x1 <= x0:
        raise LayoutError(f"{where}: box {box} has x1 <= x0")
    if y1 <= y0:
        raise LayoutError(f"{where}: box {box} has y1 <= y0")
    image = raw.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise LayoutError(f"{where}: 'image' must be a path")
        path = Path(base_dir or ".") / image
        if not path.is_file():
            raise LayoutError(f"{where}: reference image not found: {path}")
        image = str(path)
    spans = raw.get("tokens_positive")
    if spans is not None:
        try:
            spans = tuple((int(a), int(b)) for a, b in spans)
        except (TypeError, ValueError):
            raise LayoutError(f"{where}: 'tokens_positive' must be a list of [start, end] pairs") from None
    return Entity(phrase.strip(), (x0, y0, x1, y1), image, spans)


def entity_from_dict(raw: Any, where: str = "entity") -> Entity:
    """Validate one entity object with a normalized box (as stored in training shards)."""
    return _entity(raw, where, (1, 1, 1, 1), None)


def load_layouts(path: str | os.PathLike) -> list[Layout]:
    """Read layouts from a `.json` file (one layout or a list) or a `.jsonl` file (one a line)."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: layout file not found")
    text = path.read_text()
    base = path.parent
    if path.suffix == ".jsonl":
        layouts = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                layouts.append(Layout.from_dict(_parse(line, f"{path} line {lineno}"), f"{path} line {lineno}", base))
        return layouts
    data = _parse(text, str(path))
    items = data if isinstance(data, list) else [data]
    where = (lambda i: f"{path} layout {i}") if isinstance(data, list) else (lambda i: str(path))
    return [Layout.from_dict(item, where(i), base) for i, item in enumerate(items)]


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = "" if "line " in where else f" line {error.lineno}"
        raise LayoutError(f"{where}{line}: invalid JSON: {error.msg}") from None


def save_layouts(path: str | os.PathLike, layouts: Iterable[Layout]) -> None:
    """Write layouts as JSONL (`.jsonl`) or as one JSON layout / list (`.json`), atomically."""
    from gligen.files import write_json, write_text

    layouts = list(layouts)
    if Path(path).suffix == ".jsonl":
        write_text(path, "".join(json.dumps(layout.to_dict()) + "\n" for layout in layouts))
    else:
        write_json(path, layouts[0].to_dict() if len(layouts) == 1 else [lay.to_dict() for lay in layouts])
