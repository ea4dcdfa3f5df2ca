"""The drawing canvas: a layout as the box annotator's value, and the annotator's value as a layout.

The canvas is an image of the layout's aspect ratio, enlarged by a whole factor to about
`CANVAS_SIDE` pixels on its longer side so that a 32x32 layout can be drawn on as easily as a
512x512 one. Boxes on the canvas are in canvas pixels (the annotator rounds them to whole
pixels); in the layout they are normalized, so the factor cancels out.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from PIL import Image, ImageDraw

from gligen.draw import PALETTE
from gligen.layout import Layout

CANVAS_SIDE = 512
GRID = 8  # grid lines at every eighth of the width and of the height
_BACKGROUND, _LINE = (245, 245, 245), (220, 220, 220)


def canvas_scale(width: int, height: int) -> int:
    """The whole factor that enlarges a `width` x `height` layout to about `CANVAS_SIDE` on its longer side."""
    return max(1, math.ceil(CANVAS_SIDE / max(width, height)))


def blank_canvas(width: int, height: int, background: Image.Image | None = None) -> Image.Image:
    """The canvas of a `width` x `height` layout: `background` stretched to it, else a light grid."""
    scale = canvas_scale(width, height)
    size = (width * scale, height * scale)
    if background is not None:
        return background.convert("RGB").resize(size, Image.BICUBIC)
    canvas = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for k in range(1, GRID):
        x, y = round(k * size[0] / GRID), round(k * size[1] / GRID)
        draw.line([(x, 0), (x, size[1])], fill=_LINE)
        draw.line([(0, y), (size[0], y)], fill=_LINE)
    return canvas


def canvas_value(layout: Layout, background: Image.Image | None = None) -> dict[str, Any]:
    """The annotator's value for `layout`: its canvas and one box per entity, labelled with the phrase."""
    canvas = blank_canvas(layout.width, layout.height, background)
    w, h = canvas.size
    boxes = [
        {"xmin": round(x0 * w), "ymin": round(y0 * h), "xmax": round(x1 * w), "ymax": round(y1 * h),
         "label": entity.phrase, "color": PALETTE[i % len(PALETTE)]}
        for i, (entity, (x0, y0, x1, y1)) in enumerate(zip(layout.entities, layout.boxes))
    ]
    return {"image": canvas, "boxes": boxes}


def resized_canvas(value: dict[str, Any], width: int, height: int, background: Image.Image | None = None
                   ) -> dict[str, Any]:
    """The annotator's `value` on the canvas of a `width` x `height` layout, each box at the same place relative
    to the image, with its label and colour."""
    canvas = blank_canvas(width, height, background)
    (old_w, old_h), (w, h) = value["image"].size, canvas.size
    boxes = [
        {**box, "xmin": round(box["xmin"] * w / old_w), "ymin": round(box["ymin"] * h / old_h),
         "xmax": round(box["xmax"] * w / old_w), "ymax": round(box["ymax"] * h / old_h)}
        for box in value["boxes"]
    ]
    return {"image": canvas, "boxes": boxes}


def layout_dict(
    boxes: Sequence[dict[str, Any]],
    canvas_size: tuple[int, int],
    prompt: str,
    negative_prompt: str,
    width: int | None,
    height: int | None,
    seed: int | None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The layout file's object (what `gligen generate --layout` reads) for the annotator's boxes.

    Boxes keep the annotator's order; a box's label is its entity's phrase. Nothing is checked
    here: `Layout.from_dict` does it, with the messages a layout file gets.
    """
    w, h = canvas_size
    entities = [
        {"phrase": box.get("label") or "",
         "box": [round(box["xmin"] / w, 6), round(box["ymin"] / h, 6), round(box["xmax"] / w, 6),
                 round(box["ymax"] / h, 6)]}
        for box in boxes
    ]
    return {**(meta or {}), "prompt": prompt, "negative_prompt": negative_prompt, "width": width, "height": height,
            "seed": seed, "entities": entities}
