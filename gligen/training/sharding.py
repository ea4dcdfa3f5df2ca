"""What FSDP and DeepSpeed (through accelerate) need from a training run, on GPUs and on CPU processes.

accelerate turns FSDP and DeepSpeed on for GPU-like backends only: CPU processes over gloo
stay at MULTI_CPU and would train with plain DDP without a word, although torch's
`fully_shard` and DeepSpeed's ZeRO (with its CPU accelerator, over gloo) run on CPUs.
`setup` turns them on there, as accelerate would have.

Only FSDP version 2 is supported. Version 1 cannot resume: accelerate (1.15) loads its sharded
optimizer state into a template made from the fresh optimizer, which has no state before its
first step, so the Adam moments are silently left at zero; and torch's checkpoint loader drops
the entries of parameters a process holds no shard of, then fails on the missing keys.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from torch import nn

from gligen.errors import UserError
from gligen.fuser import GatedSelfAttention
from gligen.training.config import TrainConfig


def launched_with(name: str) -> bool:
    """Whether `accelerate launch` asked for FSDP or DEEPSPEED (it sets ACCELERATE_USE_<NAME>)."""
    return os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true"


def setup(accelerator: Accelerator, config: TrainConfig) -> None:
    """Refuse FSDP version 1; turn FSDP or DeepSpeed on for CPU processes launched with it; give DeepSpeed
    the batch size (it wants the loader's, and ours is a `batch_size=None` stream of whole batches)."""
    mixed_precision = config.mixed_precision
    if launched_with("FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("FSDP version 1 cannot resume its optimizer state; set fsdp_version: 2 in the accelerate "
                        "config, as configs/accelerate/fsdp.yaml does")
    if accelerator.distributed_type == DistributedType.MULTI_CPU and launched_with("FSDP"):
        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as accelerate builds it
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        switch(accelerator, DistributedType.FSDP)
        accelerator.state.fsdp_plugin = plugin
    elif accelerator.distributed_type == DistributedType.MULTI_CPU and launched_with("DEEPSPEED"):
        plugin = DeepSpeedPlugin()  # from the launcher's ACCELERATE_DEEPSPEED_* variables
        plugin.set_mixed_precision(mixed_precision)
        plugin.select(_from_accelerator_state=True)
        switch(accelerator, DistributedType.DEEPSPEED)
        accelerator.state.deepspeed_plugins = plugin
        accelerator.state._mixed_precision = "no"  # DeepSpeed's config holds the precision, as accelerate sets it
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # ZeRO-3 would partition the adapter's weights, which checkpoints and the export read whole
        if accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise UserError("DeepSpeed ZeRO stage 3 is not supported (the adapter is small: stage 2 partitions "
                            "its gradients and optimizer state); use configs/accelerate/deepspeed_zero2.yaml")
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
        # DeepSpeed's own call, once per step: nothing a user can act on
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated")


def check_engine_files(checkpoint: Path) -> None:
    """Read DeepSpeed's engine files weights-only first (DeepSpeed itself unpickles them whole): no code runs
    from them, and a file that holds more than tensors, plain data and ZeRO's own state classes raises
    pickle.UnpicklingError."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        for path in sorted(checkpoint.glob("pytorch_model*/*.pt")):
            torch.load(path, map_location="cpu", weights_only=True)


def switch(accelerator: Accelerator, kind: DistributedType) -> None:
    # AcceleratorState copies PartialState's fields whenever it is instantiated again: set both
    for state in (PartialState(), accelerator.state):
        state.distributed_type = kind


def vector_gates(adapter: nn.Module) -> None:
    """Make each fuser's gates 1-element vectors: FSDP refuses 0-dim parameters, DeepSpeed cannot broadcast them.

    The product is unchanged (a (1,) gate broadcasts as the scalar did); saved adapters keep
    diffusers' 0-dim gates (see `checkpoint.trained_adapter`).
    """
    for fuser in adapter.modules():
        if isinstance(fuser, GatedSelfAttention):
            for name in ("alpha_attn", "alpha_dense"):
                setattr(fuser, name, nn.Parameter(getattr(fuser, name).detach().reshape(1)))
