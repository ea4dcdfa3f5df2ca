"""What FSDP (torch's `fully_shard`, through accelerate) needs from a training run.

Only FSDP version 2 is supported. Version 1 cannot resume: accelerate (1.15) loads its sharded
optimizer state into a template made from the fresh optimizer, which has no state before its
first step, so the Adam moments are silently left at zero; and torch's checkpoint loader drops
the entries of parameters a process holds no shard of, then fails on the missing keys.
"""

from __future__ import annotations

import os

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn

from gligen.errors import UserError
from gligen.fuser import GatedSelfAttention


def setup(accelerator: Accelerator, mixed_precision: str) -> None:
    """Refuse FSDP version 1, and turn FSDP on for CPU processes launched with it.

    accelerate turns FSDP on only for GPU-like backends: CPU processes over gloo stay at
    MULTI_CPU and would train with DDP without a word, although `fully_shard` runs on CPUs.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":  # set by `accelerate launch` for FSDP
        return
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("FSDP version 1 cannot resume its optimizer state; set fsdp_version: 2 in the accelerate "
                        "config, as configs/accelerate/fsdp.yaml does")
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as accelerate builds it
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        # AcceleratorState copies PartialState's fields whenever it is instantiated again: set both
        for state in (PartialState(), accelerator.state):
            state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin


def vector_gates(adapter: nn.Module) -> None:
    """Make each fuser's gates 1-element vectors: FSDP refuses 0-dim parameters.

    The product is unchanged (a (1,) gate broadcasts as the scalar did); saved adapters keep
    diffusers' 0-dim gates (see `checkpoint.trained_adapter`).
    """
    for fuser in adapter.modules():
        if isinstance(fuser, GatedSelfAttention):
            for name in ("alpha_attn", "alpha_dense"):
                setattr(fuser, name, nn.Parameter(getattr(fuser, name).detach().reshape(1)))
