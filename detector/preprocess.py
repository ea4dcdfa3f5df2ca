"""Grounding DINO image preprocessing as tensor ops on the model's device.

Resize so the shortest side is 800 and the longest at most 1333, scale to [0, 1], normalize
with the ImageNet mean and std, pad a batch bottom-right to its largest image, and mark real
pixels in a mask. The resize reproduces Pillow's bilinear filter bit for bit (antialiased,
22-bit fixed-point weights, horizontal pass then vertical pass, rounding to uint8 after each):
that is what transformers' `GroundingDinoImageProcessor` runs without torchvision and what the
official GroundingDINO transforms run (they resize PIL images). `torch.nn.functional.interpolate`
with `antialias=True` differs from it by one grey level in about 0.1-1% of the pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit images (32 - 8 - 2)


@dataclass(frozen=True)
class ImageSettings:
    """What `GroundingDinoImageProcessor` is configured with (read from a checkpoint's processor)."""

    shortest_edge: int = 800
    longest_edge: int = 1333
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class ImageBatch:
    pixel_values: torch.Tensor  # (B, 3, H, W) normalized, zero in the padding
    pixel_mask: torch.Tensor  # (B, H, W) int64, 1 on real pixels


def resized_size(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """(height, width) after the resize, with transformers' rounding (`get_size_with_aspect_ratio`)."""
    size, raw = shortest, None
    short, long = float(min(height, width)), float(max(height, width))
    if long / short * size > longest:
        raw = longest * short / long
        size = int(round(raw))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    scale = raw if raw is not None else size
    if width < height:
        return int(scale * height / width), size
    return size, int(scale * width / height)


@lru_cache(maxsize=64)
def _bilinear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter.

    Returns index (out, K) int64 of input samples and weight (out, K) int32 in 2**-22 units.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear (triangle) filter has support 1
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    taps = np.arange(ksize)
    x = ((taps[None] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)
    w = np.where(taps[None] < xmax[:, None], np.clip(1.0 - np.abs(x), 0.0, None), 0.0)
    total = w.sum(1, keepdims=True)
    w = np.where(total != 0, w / np.where(total != 0, total, 1.0), w)
    fixed = np.trunc(np.where(w < 0, -0.5, 0.5) + w * (1 << PRECISION_BITS)).astype(np.int32)
    index = np.minimum(taps[None] + xmin[:, None], in_size - 1)
    return index, fixed


def _resample_last_axis(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """Pillow's 8-bit bilinear pass along the last axis. x: (..., L) int32 -> (..., out_size) int32."""
    index, weight = _bilinear_weights(x.shape[-1], out_size)
    index = torch.from_numpy(index).to(x.device)
    weight = torch.from_numpy(weight).to(x.device)
    acc = torch.full((*x.shape[:-1], out_size), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for k in range(index.shape[1]):
        acc += x.index_select(-1, index[:, k]) * weight[:, k]
    return (acc >> PRECISION_BITS).clamp_(0, 255)


def pil_bilinear_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize like `PIL.Image.resize(..., BILINEAR)`. image: (..., C, H, W) uint8 -> (..., C, height, width) uint8."""
    x = image.to(torch.int32)
    if x.shape[-1] != width:
        x = _resample_last_axis(x, width)
    if x.shape[-2] != height:
        x = _resample_last_axis(x.transpose(-1, -2), height).transpose(-1, -2)
    return x.to(torch.uint8)


def image_tensor(images: list[Image.Image], device: torch.device | str) -> torch.Tensor:
    """Same-sized PIL images as one (N, 3, H, W) uint8 RGB tensor on `device` (one copy to the device)."""
    array = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return torch.from_numpy(array).to(device, non_blocking=True).permute(0, 3, 1, 2)


def preprocess(
    images: list[Image.Image], settings: ImageSettings, device: torch.device | str, dtype: torch.dtype
) -> ImageBatch:
    """Resize, normalize, pad and mask a batch of images on `device`; pixel_values in `dtype`."""
    device = torch.device(device)
    sizes = [resized_size(im.height, im.width, settings.shortest_edge, settings.longest_edge) for im in images]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    values = torch.zeros(len(images), 3, height, width, dtype=torch.float32, device=device)
    mask = torch.zeros(len(images), height, width, dtype=torch.long, device=device)
    mean = torch.tensor(settings.mean, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(settings.std, dtype=torch.float32, device=device)[:, None, None]
    groups: dict[tuple[int, int, int, int], list[int]] = {}  # images of one size resize as one batch
    for i, (image, size) in enumerate(zip(images, sizes)):
        groups.setdefault((image.height, image.width, *size), []).append(i)
    for (_, _, h, w), members in groups.items():
        resized = pil_bilinear_resize(image_tensor([images[i] for i in members], device), h, w)
        values[members, :, :h, :w] = (resized.to(torch.float32) * (1 / 255) - mean) / std
        mask[members, :h, :w] = 1
    return ImageBatch(pixel_values=values.to(dtype), pixel_mask=mask)
