"""OWLv2 image preprocessing as tensor ops on the model's device.

What transformers' `Owlv2ImageProcessor` does with scipy (and the official OWLv2 code with
scikit-image): scale to [0, 1], pad bottom-right to a square with 0, blur with a Gaussian
of sigma (factor - 1) / 2 when shrinking by `factor` (scipy's `gaussian_filter`, kernel
radius int(4 sigma + 0.5), mirrored borders), resample linearly to the model's size
(scipy's `zoom(order=1, grid_mode=True, mode="mirror")`: pixel centres at
(i + 0.5) * factor - 0.5), clip to the range of the padded image, normalize with the CLIP
mean and std. Both filters are separable; each is applied along one axis at a time as a
few gathered taps. Equal to the scipy processor within float32 rounding (about 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from detector.preprocess import image_tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class SquareSettings:
    """What `Owlv2ImageProcessor` is configured with (read from a checkpoint's processor)."""

    size: int = 960
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD


def _mirror(index: np.ndarray, length: int) -> np.ndarray:
    """scipy's "mirror" border: reflect about the edge pixels (d c b | a b c d | c b a)."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    index = np.abs(index) % period
    return np.where(index >= length, period - index, index)


@lru_cache(maxsize=64)
def gaussian_taps(length: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """scipy's `gaussian_filter1d` as taps: index (length, K) into the axis, weight (length, K)."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weight = np.exp(-0.5 / sigma**2 * offsets.astype(np.float64) ** 2)
    weight /= weight.sum()
    index = _mirror(np.arange(length)[:, None] + offsets[None], length)
    return index, np.broadcast_to(weight, index.shape)


@lru_cache(maxsize=64)
def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scipy's `zoom(order=1, grid_mode=True, mode="mirror")` along one axis: index and weight (out_size, 2)."""
    centre = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    left = np.floor(centre)
    frac = centre - left
    index = _mirror(np.stack([left, left + 1], -1).astype(np.int64), in_size)
    return index, np.stack([1 - frac, frac], -1)


def _apply_taps(x: torch.Tensor, dim: int, taps: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
    """out[..., i, ...] = sum_k weight[i, k] * x[..., index[i, k], ...] along `dim`."""
    index, weight = (torch.from_numpy(np.ascontiguousarray(t)).to(x.device) for t in taps)
    weight = weight.to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = -1
    out = None
    for k in range(index.shape[1]):
        term = x.index_select(dim, index[:, k]) * weight[:, k].reshape(shape)
        out = term if out is None else out + term
    return out


def square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, S, S) float in [0, 1] -> (N, C, size, size): anti-aliasing Gaussian, then linear resampling."""
    side = image.shape[-1]
    factor = side / size
    x = image
    if factor > 1:  # scipy blurs only axes that shrink (sigma = 0 elsewhere)
        taps = gaussian_taps(side, (factor - 1) / 2)
        x = _apply_taps(_apply_taps(x, -2, taps), -1, taps)
    taps = linear_taps(side, size)
    x = _apply_taps(_apply_taps(x, -2, taps), -1, taps)
    low = image.amin(dim=(1, 2, 3), keepdim=True)  # scikit-image clips to the input's range
    high = image.amax(dim=(1, 2, 3), keepdim=True)
    return torch.minimum(torch.maximum(x, low), high)


def preprocess_square(
    images: list[Image.Image], settings: SquareSettings, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Pad to square, resize, normalize a batch on `device`: (N, 3, size, size) pixel values in `dtype`."""
    device = torch.device(device)
    out = torch.empty(len(images), 3, settings.size, settings.size, dtype=torch.float32, device=device)
    mean = torch.tensor(settings.mean, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(settings.std, dtype=torch.float32, device=device)[:, None, None]
    groups: dict[tuple[int, int], list[int]] = {}  # images of one size go through the filters together
    for i, image in enumerate(images):
        groups.setdefault(image.size, []).append(i)
    for (width, height), members in groups.items():
        side = max(width, height)
        square = torch.zeros(len(members), 3, side, side, dtype=torch.float32, device=device)
        pixels = image_tensor([images[i] for i in members], device)
        square[:, :, :height, :width] = pixels.to(torch.float32) * (1 / 255)
        out[members] = (square_resize(square, settings.size) - mean) / std
    return out.to(dtype)
