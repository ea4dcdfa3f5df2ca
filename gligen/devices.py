"""Device and dtype choices shared by every command that runs a network."""

from __future__ import annotations

import torch

from gligen.errors import UserError, require

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    """'fp32' | 'fp16' | 'bf16' -> torch dtype."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str | None) -> torch.device:
    """`name` as a torch device (None: CUDA when available, else the CPU); an unusable one is a UserError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device") from None
    require(device.type != "cuda" or torch.cuda.is_available(), f"--device {name}: CUDA is not available")
    return device
