"""Condition fidelity: how well a generated image follows its map. The same extractor is run on the generated
image (`gligen.maps.extract`; for `sem` a user-supplied segmenter) and its map compared with the input map:

- canny, hed: F1 of edge pixels, an edge counting as found within `tolerance` pixels (1 is perfect);
- depth: scale-invariant RMSE of log inverse depth (Eigen et al. 2014; 0 is perfect, any global scale is free);
- normal: mean angle between the normals, in degrees (0 is perfect);
- sem: mean IoU over the classes present in either map (1 is perfect).

Maps are arrays as read from map files: (H, W) or (H, W, C) uint8 (16-bit depth allowed), labels (H, W) ints.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from gligen.errors import UserError
from gligen.files import open_image
from gligen.maps.encode import fit, read_map

if TYPE_CHECKING:
    from gligen.layout import Layout

HIGHER_IS_BETTER = {"canny": True, "hed": True, "depth": False, "normal": False, "sem": True}
METRIC_NAMES = {"canny": "edge_f1", "hed": "edge_f1", "depth": "si_rmse", "normal": "mean_angle_deg", "sem": "miou"}


def _grey(array: np.ndarray) -> np.ndarray:
    return array[..., 0] if array.ndim == 3 else array


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` grown by a disk of `radius` pixels."""
    out = mask.copy()
    height, width = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx > radius * radius or (dy, dx) == (0, 0):
                continue
            out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] |= \
                mask[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


def edge_f1(generated: np.ndarray, reference: np.ndarray, tolerance: int = 2, threshold: int = 128) -> float:
    """F1 of the edge pixels (values >= `threshold`), a match within `tolerance` pixels; 1.0 when neither has edges."""
    found, wanted = _grey(generated) >= threshold, _grey(reference) >= threshold
    if not found.any() and not wanted.any():
        return 1.0
    precision = (found & _dilate(wanted, tolerance)).sum() / max(found.sum(), 1)
    recall = (wanted & _dilate(found, tolerance)).sum() / max(wanted.sum(), 1)
    return float(2 * precision * recall / (precision + recall)) if precision + recall > 0 else 0.0


def scale_invariant_rmse(generated: np.ndarray, reference: np.ndarray, eps: float = 1.0) -> float:
    """sqrt(mean(d^2) - mean(d)^2) with d = log(generated + eps) - log(reference + eps), of the inverse depths."""
    d = np.log(_grey(generated).astype(np.float64) + eps) - np.log(_grey(reference).astype(np.float64) + eps)
    return float(np.sqrt(max(np.mean(d * d) - np.mean(d) ** 2, 0.0)))


def mean_angular_error(generated: np.ndarray, reference: np.ndarray) -> float:
    """The mean angle in degrees between RGB-encoded normals ((n + 1) / 2 * 255)."""
    def unit(array: np.ndarray) -> np.ndarray:
        normal = array[..., :3].astype(np.float64) / 255 * 2 - 1
        return normal / np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-8)

    cosine = np.clip((unit(generated) * unit(reference)).sum(-1), -1, 1)
    return float(np.degrees(np.arccos(cosine)).mean())


def mean_iou(generated: np.ndarray, reference: np.ndarray) -> float:
    """Mean IoU over the labels present in either map."""
    classes = np.union1d(np.unique(generated), np.unique(reference))
    ious = [((generated == c) & (reference == c)).sum() / ((generated == c) | (reference == c)).sum() for c in classes]
    return float(np.mean(ious))


def fidelity(kind: str, generated: np.ndarray, reference: np.ndarray, tolerance: int = 2) -> float:
    """The `kind`'s metric (`METRIC_NAMES`) of a generated image's map against the input map."""
    if generated.shape[:2] != reference.shape[:2]:
        raise UserError(f"{kind} fidelity: the maps differ in size, {generated.shape[:2]} and {reference.shape[:2]}")
    if kind in ("canny", "hed"):
        return edge_f1(generated, reference, tolerance)
    if kind == "depth":
        return scale_invariant_rmse(generated, reference)
    if kind == "normal":
        return mean_angular_error(generated, reference)
    if kind == "sem":
        return mean_iou(_grey(generated), _grey(reference))
    raise UserError(f"no fidelity metric for condition type {kind!r}")


def score_images(
    pairs: Sequence[tuple[Layout, str | os.PathLike]], make_map: Callable[[Image.Image], Image.Image], tolerance: int = 2,
) -> dict[str, float]:
    """The mean fidelity of generated images to their layouts' maps: {"<type> <metric>": value, "<type> maps": n}.

    `pairs` are (layout with a `condition`, generated image); `make_map` makes a map of the condition's type from
    an image (`gligen.maps.extract.Extractor`, or a segmenter giving ADE20K labels for `sem`).
    """
    scores: dict[str, list[float]] = {}
    for layout, path in tqdm(pairs, desc="condition fidelity", unit="image"):
        kind = layout.condition.type
        image = open_image(path)
        reference = np.asarray(fit(read_map(layout.condition.image, kind), image.width, image.height, kind))
        scores.setdefault(kind, []).append(fidelity(kind, np.asarray(make_map(image)), reference, tolerance))
    out = {}
    for kind, values in scores.items():
        out[f"{kind} {METRIC_NAMES[kind]}"] = float(np.mean(values))
        out[f"{kind} maps"] = len(values)
    return out
