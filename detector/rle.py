"""COCO run-length encoding of binary masks, as pycocotools writes and reads it.

    rle = encode(mask)        # (H, W) bool -> {"size": [H, W], "counts": "...ascii..."}
    mask = decode(rle)        # and back, bit for bit

`counts` is COCO's compressed string (column-major runs, starting with a run of zeros), the
form of COCO's result files and of `pycocotools.mask.encode(...)` with its bytes decoded as
ASCII, so the dicts go into JSON as they are. `decode` also reads uncompressed RLE
(`counts` a list of run lengths, as in COCO's crowd annotations). The work is done by
faster-coco-eval's C implementation of COCO's mask API, a dependency of this package already.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from faster_coco_eval.core import mask as coco_mask

from gligen.errors import UserError


def encode(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool (or 0/1) mask -> COCO compressed RLE `{"size": [H, W], "counts": str}`."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode takes one (H, W) mask, got shape {tuple(mask.shape)}")
    rle = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(rle: Mapping[str, Any]) -> np.ndarray:
    """COCO RLE (compressed `counts` as str or bytes, or uncompressed as a list of runs) -> (H, W) bool mask.

    A malformed record raises a UserError saying what is wrong with it.
    """
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"not a COCO RLE mask (expected {{'size': [height, width], 'counts': ...}}): {_short(rle)}") from None
    if height < 0 or width < 0:
        raise UserError(f"RLE size [{height}, {width}] is negative")
    if isinstance(counts, list):
        _check_runs(counts, height * width)
        counts = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)["counts"]
    elif not isinstance(counts, (str, bytes)):
        raise UserError(f"RLE counts must be a string or a list of run lengths, not {type(counts).__name__}")
    try:
        compressed = counts.encode("ascii") if isinstance(counts, str) else counts
        return coco_mask.decode({"size": [height, width], "counts": compressed}).astype(bool)
    except (ValueError, UnicodeError) as error:  # counts whose runs do not fill the size, or not COCO's alphabet
        raise UserError(f"RLE counts {_short(counts)} do not describe a {height}x{width} mask ({error})") from None


def _check_runs(runs: list, pixels: int) -> None:
    """Uncompressed counts: non-negative integer runs that cover the mask exactly."""
    if not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r >= 0 for r in runs):
        raise UserError(f"RLE counts must be non-negative integers: {_short(runs)}")
    if sum(runs) != pixels:
        raise UserError(f"RLE runs add up to {sum(runs)} pixels, the size says {pixels}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
