"""Masks of grounded inpainting: what to repaint, in pixels and in latent cells, and the final composite.

A layout's region to repaint is the union of its entities' masks (`Entity.mask`: a PNG or a
polygon), an entity without one counting its box; a free-form mask (`inpaint_mask`) replaces
that union. The UNet repaints every latent cell that holds a pixel of the region (so an object
is never cut at a cell border); boxes alone keep diffusers' GLIGEN cells (`box_mask`), bit for bit.
With `keep_outside`, the decoded image is laid over the input: pixels farther than `feather`
from the region are the input's exactly, pixels of the region the generated ones, a linear
ramp between.

torch is imported only when a function needs it, so that commands can declare their options (and
read their masks) without loading it.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

    from gligen.layout import Entity, Layout

DEFAULT_FEATHER = 4  # pixels of ramp between the kept input and the generated region

MaskLike = Union[Image.Image, np.ndarray, "torch.Tensor"]  # a mask given to the pipeline


def box_mask(boxes: Sequence[Sequence[float]], size: Sequence[int]) -> torch.Tensor:
    """(h, w) mask: 0 inside the normalized xyxy boxes (cells truncated as diffusers' GLIGEN does), 1 elsewhere."""
    import torch

    height, width = size
    mask = torch.ones(height, width)
    for x0, y0, x1, y1 in boxes:
        mask[int(y0 * height):int(y1 * height), int(x0 * width):int(x1 * width)] = 0
    return mask


def box_pixels(box: Sequence[float], width: int, height: int) -> np.ndarray:
    """(height, width) bool: True on every pixel the normalized xyxy box touches (a box of any size has some)."""
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=bool)
    mask[math.floor(y0 * height):math.ceil(y1 * height), math.floor(x0 * width):math.ceil(x1 * width)] = True
    return mask


def polygon_mask(points: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """(height, width) bool: True where a pixel's centre lies inside the normalized polygon (even-odd rule)."""
    xs = np.arange(width) + 0.5
    ys = (np.arange(height) + 0.5)[:, None]
    corners = np.asarray(points, dtype=np.float64) * [width, height]
    inside = np.zeros((height, width), dtype=bool)
    for (xa, ya), (xb, yb) in zip(corners, np.roll(corners, -1, axis=0)):
        if ya == yb:  # a horizontal edge crosses no row of centres
            continue
        crosses = (ya > ys) != (yb > ys)
        x_at = xa + (ys - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (xs < x_at)
    return inside


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask image file as (H, W) bool: True where it is light (gray level >= 128)."""
    from gligen.files import open_image

    return as_mask(open_image(path))


def as_mask(mask: MaskLike) -> np.ndarray:
    """A PIL image (light = True), or an (H, W) bool/number array or tensor (nonzero = True) -> (H, W) bool."""
    import torch

    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L")) >= 128
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim != 2:
        from gligen.errors import UserError

        raise UserError(f"an inpainting mask must be (H, W), got shape {tuple(array.shape)}")
    return array.astype(bool)


def fit_image(image: Image.Image, width: int, height: int, resample: int = Image.LANCZOS) -> Image.Image:
    """Centre-crop `image` to the aspect ratio width:height and resize it, as diffusers' GLIGEN does (LANCZOS)."""
    if image.size == (width, height):
        return image
    w, h = image.size
    crop_w, crop_h = min(w, h * width / height), min(h, w * height / width)
    box = ((w - crop_w) / 2, (h - crop_h) / 2, (w + crop_w) / 2, (h + crop_h) / 2)
    return image.crop(box).resize((width, height), resample)


def fit_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """`mask` centre-cropped and resized to width x height as the image to repaint is (nearest neighbour)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(fit_image(image, width, height, Image.NEAREST)) >= 128


def entity_mask(entity: Entity, width: int, height: int) -> np.ndarray:
    """(height, width) bool: the entity's polygon or mask image (resized to the layout), else its box's pixels."""
    if entity.mask is None:
        return box_pixels(entity.box, width, height)
    if isinstance(entity.mask, str):
        mask = read_mask(entity.mask)
        if mask.shape != (height, width):
            mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))
        return mask
    return polygon_mask(entity.mask, width, height)


def union_mask(entities: Sequence[Entity], width: int, height: int) -> np.ndarray:
    """(height, width) bool: the union of the entities' masks (boxes where an entity has no mask)."""
    union = np.zeros((height, width), dtype=bool)
    for entity in entities:
        union |= entity_mask(entity, width, height)
    return union


def latent_cells(mask: np.ndarray, factor: int) -> torch.Tensor:
    """(H, W) bool pixels -> (H/factor, W/factor) bool: a cell is True when any of its pixels is."""
    import torch

    height, width = mask.shape
    return torch.from_numpy(mask.reshape(height // factor, factor, width // factor, factor).any(axis=(1, 3)))


def latent_keep_mask(layout: Layout, given: np.ndarray | None, size: Sequence[int], factor: int) -> torch.Tensor:
    """(h, w) float: 0 in the latent cells to repaint, 1 elsewhere (`Inpainting.mask`).

    `given` (a free-form pixel mask) replaces the layout's; boxes alone give `box_mask`'s cells.
    """
    if given is not None:
        return (~latent_cells(given, factor)).float()
    boxed = [e.box for e in layout.entities if e.mask is None]
    keep = box_mask(boxed, size)
    masked = [e for e in layout.entities if e.mask is not None]
    if masked:
        keep[latent_cells(union_mask(masked, layout.width, layout.height), factor)] = 0
    return keep


def feather_weights(mask: np.ndarray, feather: int) -> torch.Tensor:
    """(H, W) bool -> (H, W) float32 weight of the generated image: 1 on the mask, (feather + 1 - d) / (feather + 1)
    at chessboard distance d <= feather from it, 0 farther."""
    import torch
    import torch.nn.functional as F

    grown = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    total = grown.clone()
    for _ in range(feather):
        grown = F.max_pool2d(grown, 3, stride=1, padding=1)
        total += grown
    return (total / (feather + 1))[0, 0]


def composite(generated: torch.Tensor, original: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`weights` * generated + (1 - weights) * original, in float32: exactly `original` where the weight is 0.

    generated, original (B, C, H, W); weights (B, 1, H, W). -> (B, C, H, W) float32."""
    return weights * generated.float() + (1 - weights) * original.float()
