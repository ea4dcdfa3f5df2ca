"""Checkpoints: save and resume a run exactly, atomically, with nothing of the frozen base in them.

    OUTPUT_DIR/checkpoints/checkpoint-00005000/
        adapter/                          the adapter to generate with (the EMA weights when EMA is on)
        trained_adapter/                  with EMA only: the trained (not averaged) weights
        optimizer.bin, random_states_R.pkl, (scaler.pt)    accelerate's state of the trainable parameters
        training_state_R.json             step, non-finite losses in a row, data positions, lr schedule
        training_state_R.safetensors      the step generator, the EMA weights

R is each process's rank. accelerate writes what it wraps, which is the adapter alone (see
`model.GroundedUNet`); under FSDP (version 2) accelerate writes the adapter's and its optimizer's
shards instead of `optimizer.bin` (`pytorch_model_fsdp_0/`, `optimizer_0/`: torch.distributed.checkpoint
directories), and under DeepSpeed its engine files (`pytorch_model/`: the adapter's weights, and per process
its ZeRO partition of the optimizer state), which are read weights-only before DeepSpeed loads them. A
checkpoint is written into a hidden `.tmp-` directory renamed when complete, so an interrupted save leaves
the previous one as the latest.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from gligen.adapter import GroundingAdapter
from gligen.errors import UserError
from gligen.files import atomic_path, write_json
from gligen.training import sharding
from gligen.training.dataset import DataPosition

if TYPE_CHECKING:
    from gligen.training.trainer import Trainer

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (half-written ones are hidden `.tmp-` directories)."""
    root = Path(output_dir) / "checkpoints"
    return [p for p in root.glob(f"{PREFIX}*") if p.is_dir()] if root.is_dir() else []


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def latest(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint of `output_dir` with the highest step, if any."""
    found = sorted(checkpoints(output_dir))
    return found[-1] if found else None


def prune(output_dir: str | os.PathLike, keep: int) -> None:
    """Remove all but the `keep` newest checkpoints."""
    for old in sorted(checkpoints(output_dir))[:-keep]:
        shutil.rmtree(old)


def register_hooks(trainer: Trainer) -> None:
    """accelerate's save / load hooks: the adapter is written as an adapter directory, never as a model state."""
    trained = "trained_adapter" if trainer.ema else "adapter"

    def save(models, weights, output_dir) -> None:
        weights.clear()
        adapter = trained_adapter(trainer)
        if adapter is not None:
            adapter.save_pretrained(Path(output_dir) / trained)

    def load(models, input_dir) -> None:
        models.clear()
        if trainer.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return  # accelerate loads the sharded / engine files it wrote
        state = GroundingAdapter.from_pretrained(Path(input_dir) / trained).adapter_state_dict()
        trainer.adapter.load_adapter_state_dict(state)

    trainer.accelerator.register_save_state_pre_hook(save)
    trainer.accelerator.register_load_state_pre_hook(load)


def trained_adapter(trainer: Trainer) -> GroundingAdapter | None:
    """The trained adapter with all its weights, on the main process (None on the others).

    Every process must call it. Under FSDP the full weights are gathered from the shards, and
    under DeepSpeed (ZeRO 1 and 2 keep whole weights in every process) read from the adapter,
    into a new adapter with diffusers' 0-dim gates again; otherwise it is the adapter being trained itself.
    """
    accelerator = trainer.accelerator
    if accelerator.distributed_type == DistributedType.FSDP:
        state = accelerator.get_state_dict(trainer.model)  # the full weights, on the main process
        state = {k.removeprefix("adapter."): v for k, v in state.items()}
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        state = trainer.adapter.state_dict()
    else:
        return trainer.adapter if accelerator.is_main_process else None
    if not accelerator.is_main_process:
        return None
    adapter = GroundingAdapter(copy.deepcopy(trainer.adapter.config))
    own = adapter.state_dict()
    adapter.load_state_dict({k: v.detach().reshape(own[k].shape) for k, v in state.items()})
    return adapter


def inference_adapter(trainer: Trainer) -> GroundingAdapter | None:
    """A detached copy of the adapter to generate with, on the main process (None on the others):
    the EMA weights when EMA is on, else the trained ones. Every process must call it."""
    adapter = trained_adapter(trainer)
    if adapter is trainer.adapter:
        adapter = copy.deepcopy(adapter)
    if adapter is not None and trainer.ema:
        trainer.ema.copy_to([p for p in adapter.parameters() if p.requires_grad])
    return adapter


def save(trainer: Trainer) -> Path:
    """Adapter + optimizer + RNG states (accelerate) + our state, into a directory renamed when complete.

    Sets `trainer.last_save_seconds` (what a stop on a signal weighs before saving).
    """
    start = time.perf_counter()
    accelerator = trainer.accelerator
    final = checkpoint_dir(trainer.output_dir, trainer.step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    rank = accelerator.process_index
    state = {
        "step": trainer.step,
        "bad_in_a_row": trainer.bad_in_a_row,
        "positions": {str(k): asdict(v) for k, v in trainer.positions.items()},
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
    }
    tensors = {"generator": trainer.generator.get_state()}
    if trainer.ema:
        state["ema_step"] = trainer.ema.optimization_step
        tensors.update({f"ema.{i}": p.detach().cpu().contiguous() for i, p in enumerate(trainer.ema.shadow_params)})
    write_json(tmp / f"training_state_{rank}.json", state)
    with atomic_path(tmp / f"training_state_{rank}.safetensors") as path:
        save_file(tensors, str(path))
    adapter = inference_adapter(trainer) if trainer.ema else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if adapter is not None:
            adapter.save_pretrained(tmp / "adapter")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(trainer.output_dir, trainer.config.keep_checkpoints)
    accelerator.wait_for_everyone()
    trainer.last_save_seconds = time.perf_counter() - start
    return final


def resume(trainer: Trainer) -> Path | None:
    """Load the latest complete checkpoint of `output_dir`, if any."""
    found = latest(trainer.output_dir)
    if found is None:
        return None
    try:
        if trainer.accelerator.distributed_type == DistributedType.DEEPSPEED and not trainer.config.trust_pickle:
            sharding.check_engine_files(found)
        trainer.accelerator.load_state(str(found), load_kwargs={"weights_only": False} if trainer.config.trust_pickle else None)
    except pickle.UnpicklingError:  # accelerate reads its state files weights-only: no code runs from them
        raise UserError(f"{found}: a state file is a pickle that needs code to load; refused (no code ran). "
                        "Rerun with --trust-pickle only if you trust it, or remove this checkpoint to resume "
                        "from the one before it") from None
    rank = trainer.accelerator.process_index
    state_path = found / f"training_state_{rank}.json"
    if not state_path.is_file():
        raise UserError(f"{found}: no training state for process {rank} (was it saved with another number of processes?)")
    state = json.loads(state_path.read_text())
    tensors = load_file(str(found / f"training_state_{rank}.safetensors"))
    trainer.step = state["step"]
    trainer.bad_in_a_row = state["bad_in_a_row"]
    trainer.positions = {int(k): DataPosition(**v) for k, v in state["positions"].items()}
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    trainer.generator.set_state(tensors["generator"])
    if trainer.ema:
        trainer.ema.optimization_step = state["ema_step"]
        trainer.ema.shadow_params = [tensors[f"ema.{i}"].to(p.device) for i, p in enumerate(trainer.ema.shadow_params)]
    if trainer.accelerator.is_main_process:
        logger.warning("resumed from %s at step %d", found, trainer.step)
    return found
