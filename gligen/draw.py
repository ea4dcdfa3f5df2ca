"""Pictures for people: labelled box overlays (with keypoint skeletons), tinted masks and sample grids."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gligen.pose import SKELETON, Keypoints

if TYPE_CHECKING:
    from gligen.layout import Layout

PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
]


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
    normalized: bool = True,
    colors: Sequence[tuple[int, int, int]] | None = None,
    min_side: int = 256,
    keypoints: Sequence[Keypoints | None] | None = None,
) -> Image.Image:
    """A copy of `image` with each xyxy box outlined and labelled (colour i for box i), and the
    normalized `keypoints` of box i, when given, drawn as a COCO skeleton in its colour.

    An image whose shorter side is under `min_side` is first enlarged by a whole factor
    (nearest neighbour, so its pixels stay visible as they are) to make the labels legible;
    pixel boxes (`normalized=False`) are scaled with it.
    """
    out = image.convert("RGB")
    factor = max(1, math.ceil(min_side / min(out.size)))
    if factor > 1:
        out = out.resize((out.width * factor, out.height * factor), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    w, h = out.size
    width = max(1, round(min(w, h) / 128))
    for i, (box, label) in enumerate(zip(boxes, labels)):
        x0, y0, x1, y1 = (box[0] * w, box[1] * h, box[2] * w, box[3] * h) if normalized else (v * factor for v in box)
        color = (colors or PALETTE)[i % len(colors or PALETTE)]
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        tx0, ty0, tx1, ty1 = draw.textbbox((x0, y0), label, font=font)
        tx = max(0.0, min(x0, w - (tx1 - tx0) - 4))  # a box at the right edge keeps its whole label in the image
        ty = max(0.0, y0 - (ty1 - ty0) - 2)
        draw.rectangle([tx, ty, tx + (tx1 - tx0) + 4, ty + (ty1 - ty0) + 2], fill=color)
        draw.text((tx + 2, ty), label, fill=(255, 255, 255), font=font)
        if keypoints is not None and i < len(keypoints) and keypoints[i] is not None:
            _skeleton(draw, keypoints[i], w, h, color, width)
    return out


def _skeleton(draw: ImageDraw.ImageDraw, keypoints: Keypoints, w: int, h: int, color, width: int) -> None:
    """The limbs between given points and a dot on each given point (normalized keypoints on a w x h picture)."""
    points = [(x * w, y * h) if v else None for x, y, v in keypoints]
    for a, b in SKELETON:
        if points[a] is not None and points[b] is not None:
            draw.line([points[a], points[b]], fill=color, width=width)
    radius = width + 1
    for point in points:
        if point is not None:
            x, y = point
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline=(255, 255, 255))


def draw_masks(
    image: Image.Image,
    masks: Sequence[np.ndarray] | np.ndarray,
    colors: Sequence[tuple[int, int, int]] | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """A copy of `image` (RGB) with mask i, an (H, W) bool array of the image's size, tinted in colour i.

    Each mask's pixels become (1 - alpha) * pixel + alpha * colour, the masks in order (a later
    one tints over an earlier one). Draw boxes and labels over it with `draw_boxes`.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    for i, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != pixels.shape[:2]:
            raise ValueError(f"mask {i} is {mask.shape[1]}x{mask.shape[0]}, the image {image.width}x{image.height}")
        color = np.asarray((colors or PALETTE)[i % len(colors or PALETTE)], dtype=np.float32)
        pixels[mask] = (1 - alpha) * pixels[mask] + alpha * color
    return Image.fromarray(np.round(pixels).astype(np.uint8))


def draw_layout(image: Image.Image, layout: Layout) -> Image.Image:
    """`image` with the layout's labelled boxes and its persons' skeletons."""
    return draw_boxes(image, layout.boxes, layout.phrases, keypoints=[e.keypoints for e in layout.entities])


def make_grid(images: Sequence[Image.Image], columns: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (resized to the first one's size) into a grid, row by row."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or min(len(images), 4)
    rows = -(-len(images) // columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(image.convert("RGB").resize((w, h)), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
