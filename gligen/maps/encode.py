"""Map files -> the tensors the map networks take (the encodings are listed in `gligen.maps`).

Like the official inference, a map is centre-cropped to the image's aspect ratio and resized to the
image size (bicubic; label maps nearest), then RGB maps become (3, H, W) in [-1, 1] and label maps
(1, H, W) integer labels.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from gligen.errors import UserError
from gligen.files import check_pixels, open_image
from gligen.maps import LABEL_TYPES, SEM_CLASSES


def read_map(path: str | os.PathLike, kind: str) -> Image.Image:
    """A map file as PIL: 8-bit RGB (`gligen.files.open_image`), or for label maps its labels in mode 'L' / 'I'.

    A missing or unreadable file, a colour picture given as labels, or a label out of range: a UserError naming it.
    """
    if kind not in LABEL_TYPES:
        return open_image(path)
    try:
        with Image.open(path) as image:
            return labels_of(image, kind, str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: map image not found") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise UserError(f"{path}: cannot read the map image ({error})") from None


def labels_of(image: Image.Image, kind: str, where: str) -> Image.Image:
    """An opened label map's labels, loaded, in mode 'L' or 'I' (see `read_map`)."""
    try:
        check_pixels(image, where)
        image.load()
        labels = image if image.mode in ("L", "P") else image.convert("I") if image.mode.startswith("I") else None
        if labels is None:
            raise UserError(f"{where}: a {image.mode} image; a {kind!r} map is an ADE20K label PNG "
                            "(one channel holding a class index per pixel)")
        labels = labels.copy() if labels.mode == "L" else Image.fromarray(np.asarray(labels, dtype=np.int32))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UserError(f"{where}: cannot read the map image ({error})") from None
    if labels.mode == "P":  # a palette image's indices are the labels
        labels = Image.fromarray(np.asarray(labels, dtype=np.uint8), "L")
    check_labels(np.asarray(labels), where)
    return labels


def check_labels(labels: np.ndarray, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= SEM_CLASSES):
        raise UserError(f"{where}: holds label {int(labels.max() if labels.max() >= SEM_CLASSES else labels.min())}; "
                        f"ADE20K label maps hold 0 .. {SEM_CLASSES - 1}")


def fit(image: Image.Image, width: int, height: int, kind: str) -> Image.Image:
    """Centre-crop `image` to the aspect ratio width:height and resize it (bicubic; label maps nearest)."""
    if image.size == (width, height):
        return image
    w, h = image.size
    crop_w, crop_h = min(w, h * width / height), min(h, w * height / width)
    box = ((w - crop_w) / 2, (h - crop_h) / 2, (w + crop_w) / 2, (h + crop_h) / 2)
    resample = Image.NEAREST if kind in LABEL_TYPES else Image.BICUBIC
    return image.resize((width, height), resample, box=box)


def map_tensor(image: Image.Image, kind: str) -> torch.Tensor:
    """A (fitted) map image -> (3, H, W) float in [-1, 1], or (1, H, W) int64 labels."""
    array = np.asarray(image)
    if kind in LABEL_TYPES:
        return torch.from_numpy(array.astype(np.int64))[None]
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1


def load_map(path: str | os.PathLike, kind: str, width: int, height: int) -> torch.Tensor:
    """A map file as the network input of a `width` x `height` image (see the module docstring)."""
    return map_tensor(fit(read_map(path, kind), width, height, kind), kind)
