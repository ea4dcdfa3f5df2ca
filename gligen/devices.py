"""Device and dtype choices shared by every command that runs a network.

torch is imported only when a device or dtype is parsed, so that commands can declare their
options (and check their inputs) without loading it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from gligen.errors import UserError, require

if TYPE_CHECKING:
    import torch

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # option value -> torch dtype name


def parse_dtype(name: str) -> torch.dtype:
    """'fp32' | 'fp16' | 'bf16' -> torch dtype."""
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def launched_processes() -> int:
    """How many processes `accelerate launch` (torchrun or MPI) started together; 1 when not launched."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def parse_device(name: str | None) -> torch.device:
    """`name` as a torch device (None: CUDA when available, else the CPU); an unusable one is a UserError."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device") from None
    require(device.type != "cuda" or torch.cuda.is_available(), f"--device {name}: CUDA is not available")
    return device


SMALL_UNET_PARAMETERS = 50_000_000  # the demo's UNet has 6 M; SD 1.x's 860 M


def suit_threads(unet: torch.nn.Module, device: torch.device) -> None:
    """Run a small UNet on one CPU thread, unless OMP_NUM_THREADS chose a count.

    Its layers are too small to split: with torch's default (one thread per core) a demo image
    takes seconds longer, more so while other processes load the machine, than on one thread.
    """
    import torch

    small = sum(p.numel() for p in unet.parameters()) < SMALL_UNET_PARAMETERS
    if device.type == "cpu" and small and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
