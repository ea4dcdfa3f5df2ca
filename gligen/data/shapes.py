"""Synthetic shapes: a small, seeded world of coloured shapes on plain backgrounds.

Each image holds 1 to 3 objects, each a distinct (colour, shape) pair from 8 colours x 6
shapes, on a plain background whose colour is far from every object's colour. The caption
names them ("a red circle and a blue star on a gray background"); each entity's phrase is
its noun phrase in the caption ("a red circle", with its char span) and its box is tight
around the pixels where the object covers at least half of the final image.

Shapes are drawn at 4x and downsampled with a box filter, so edges are antialiased and
each pixel's coverage by each object is known exactly. Scene `index` of seed `seed` is the
same on every machine (its own `random.Random`), so any part of a data set can be
regenerated alone: shards resume cheaply and held-out layouts need no images.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from gligen.data.format import Sample
from gligen.data.writer import ShardWriter
from gligen.errors import require
from gligen.files import save_image, write_json
from gligen.layout import Entity, Layout, save_layouts

if TYPE_CHECKING:
    from gligen.maps.extract import Extractor

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 215, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "dark gray": (70, 70, 70),
    "beige": (225, 210, 180),
    "light blue": (175, 205, 235),
    "light green": (185, 225, 175),
}
MIN_CONTRAST = 90.0  # RGB distance between an object's colour and its background
MAX_OBJECTS = 3
SIZE_RANGE = (0.25, 0.5)  # side of an object's square region, as a fraction of the image
MAX_OVERLAP = 0.1  # of the smaller region's area, between any two objects' regions
SUPERSAMPLE = 4
COVERED = 0.5  # a pixel belongs to an object's box when the object covers at least this much of it


@dataclass(frozen=True)
class ShapeObject:
    """One object: its kind and its square region (normalized centre and side)."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def phrase(self) -> str:
        return f"{_article(self.color)} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def categories() -> list[dict]:
    """The 48 COCO categories, one per (shape, colour) phrase; ids from 1, shape-major."""
    names = [ShapeObject(shape, color, 0, 0, 0).phrase for shape in SHAPES for color in COLORS]
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(names)]


def sample_scene(seed: int, index: int) -> Scene:
    """Scene `index` of the data set drawn with `seed`: background, then objects placed apart."""
    rng = random.Random(f"shapes-{seed}-{index}")
    background = rng.choice(sorted(BACKGROUNDS))
    colors = [c for c in COLORS if math.dist(COLORS[c], BACKGROUNDS[background]) >= MIN_CONTRAST]
    kinds = rng.sample([(s, c) for s in SHAPES for c in colors], rng.randint(1, MAX_OBJECTS))
    objects: list[ShapeObject] = []
    for shape, color in kinds:
        for _ in range(50):  # rejection sampling; an object that finds no room is left out
            size = rng.uniform(*SIZE_RANGE)
            cx, cy = (rng.uniform(size / 2, 1 - size / 2) for _ in range(2))
            candidate = ShapeObject(shape, color, cx, cy, size)
            if all(_overlap(candidate, other) <= MAX_OVERLAP for other in objects):
                objects.append(candidate)
                break
    return Scene(background, tuple(objects))


def _overlap(a: ShapeObject, b: ShapeObject) -> float:
    """Intersection of the two square regions over the smaller one's area."""
    dx = min(a.cx + a.size / 2, b.cx + b.size / 2) - max(a.cx - a.size / 2, b.cx - b.size / 2)
    dy = min(a.cy + a.size / 2, b.cy + b.size / 2) - max(a.cy - a.size / 2, b.cy - b.size / 2)
    return max(dx, 0.0) * max(dy, 0.0) / min(a.size, b.size) ** 2


def _draw_mask(obj: ShapeObject, size: int) -> np.ndarray:
    """Coverage of each pixel of a `size` x `size` image by `obj`: (size, size) float32 in [0, 1]."""
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = obj.cx * big, obj.cy * big, obj.size * big / 2
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif obj.shape == "square":
        h = 0.85 * r  # a square as wide as the circle looks bigger; match their areas roughly
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=255)
    elif obj.shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.42 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    elif obj.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    elif obj.shape == "cross":
        t = 0.3 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    # box-filter downsampling in float: each pixel's exact covered fraction (a multiple of 1/16)
    big_mask = np.asarray(mask, dtype=np.float32) / 255.0
    return big_mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, size: int = 64, seed: int = 0) -> tuple[Image.Image, Layout]:
    """The scene's image (size x size RGB) and its layout (caption, phrases, tight boxes).

    Objects are painted in order, each over the ones before; an object's box bounds the
    pixels it still covers by at least `COVERED` once the later ones are painted.
    `seed` goes into the layout (the seed a generator would draw its noise with).
    """
    coverage = [_draw_mask(obj, size) for obj in scene.objects]
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    for obj, cov in zip(scene.objects, coverage):
        canvas = canvas * (1 - cov[..., None]) + np.asarray(COLORS[obj.color], np.float32) * cov[..., None]
    image = Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")

    visible_objects, boxes = [], []
    for i, obj in enumerate(scene.objects):
        visible = coverage[i].copy()
        for later in coverage[i + 1 :]:
            visible *= 1 - later
        ys, xs = np.nonzero(visible >= COVERED)
        if len(xs):  # an object hidden entirely is not in the picture, so not in the layout
            visible_objects.append(obj)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            boxes.append((x0 / size, y0 / size, x1 / size, y1 / size))
    caption, spans = _caption([obj.phrase for obj in visible_objects], scene.background)
    entities = tuple(
        Entity(obj.phrase, box, spans=(span,)) for obj, box, span in zip(visible_objects, boxes, spans)
    )
    return image, Layout(caption, entities, width=size, height=size, seed=seed)


def _caption(phrases: list[str], background: str) -> tuple[str, list[tuple[int, int]]]:
    """"a, b and c on a gray background", with the char span of each phrase."""
    caption, spans = "", []
    for i, phrase in enumerate(phrases):
        if i:
            caption += " and " if i == len(phrases) - 1 else ", "
        spans.append((len(caption), len(caption) + len(phrase)))
        caption += phrase
    caption += f" on {_article(background)} {background} background"
    return caption, spans


def key(index: int) -> str:
    return f"{index:08d}"


def shape_sample(seed: int, index: int, size: int = 64) -> Sample:
    image, layout = render(sample_scene(seed, index), size, seed=index)
    return Sample(key(index), image, layout.prompt, list(layout.entities))


def shape_layouts(n: int, size: int = 64, seed: int = 1) -> Iterator[Layout]:
    """The layouts (no images) of scenes 0..n-1 of `seed`: held-out evaluation inputs.

    Use a seed other than the training data's. Each layout's generation seed is its index.
    """
    for index in range(n):
        yield render(sample_scene(seed, index), size, seed=index)[1]


def write_shards(out: str, n: int, size: int = 64, seed: int = 0, samples_per_shard: int = 1000,
                 condition: Extractor | None = None) -> dict:
    """Scenes 0..n-1 as PNG shards under `out`, resuming a previous run; returns the summary.
    `condition` adds a map to every sample (`ShardWriter`)."""
    _check_size(size)
    options = {"command": "shapes", "n": n, "size": size, "seed": seed}
    with ShardWriter(out, options, samples_per_shard, "png", condition) as writer:
        writer.consume(range(n), lambda i: [shape_sample(seed, i, size)], total=n, desc="shapes")
    return writer.summary()


def write_coco(out: str, n: int, size: int = 64, seed: int = 0) -> None:
    """Scenes 0..n-1 as COCO data: `images/*.png`, `instances.json`, `captions.json`.

    `instances.json` is also MDETR-style grounding data: each image carries its `caption`
    and each annotation its `tokens_positive`, so it feeds `detector train`, evaluation
    ground truth, `gligen data from-coco` and `gligen data from-grounding` alike. COCO
    category names are the entity phrases ("a red circle").
    """
    _check_size(size)
    out_dir = Path(out)
    category_ids = {c["name"]: c["id"] for c in categories()}
    images, annotations, captions = [], [], []
    for index in tqdm(range(n), desc="shapes (coco)", unit="image"):
        sample = shape_sample(seed, index, size)
        image_id = index + 1
        file_name = f"{sample.key}.png"
        save_image(out_dir / "images" / file_name, sample.image)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                       "caption": sample.caption})
        captions.append({"id": image_id, "image_id": image_id, "caption": sample.caption})
        for entity in sample.entities:
            x0, y0, x1, y1 = (v * size for v in entity.box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_ids[entity.phrase],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                "tokens_positive": [list(s) for s in entity.spans],
            })
    write_json(out_dir / "instances.json", {"images": images, "annotations": annotations, "categories": categories()})
    write_json(out_dir / "captions.json", {"images": images, "annotations": captions})
    print(f"wrote {n} images with {len(annotations)} boxes to {out_dir} (instances.json, captions.json, images/)")


def write_layouts(out: str, n: int, size: int = 64, seed: int = 1) -> None:
    """Held-out layouts of scenes 0..n-1 as `out/layouts.jsonl` (the input of `gligen eval`)."""
    _check_size(size)
    save_layouts(Path(out) / "layouts.jsonl", tqdm(shape_layouts(n, size, seed), total=n, desc="layouts"))
    print(f"wrote {n} layouts to {Path(out) / 'layouts.jsonl'}")


def _check_size(size: int) -> None:
    require(size >= 16 and size % 8 == 0, f"--size must be a multiple of 8 and at least 16, got {size}")
