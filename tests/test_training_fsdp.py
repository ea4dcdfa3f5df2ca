"""FSDP (configs/accelerate/fsdp.yaml) on 2 CPU processes over gloo: sharded checkpoints of the adapter alone, exact resume."""

import shutil

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from gligen.adapter import GroundingAdapter
from gligen.data.shapes import write_shards
from gligen.errors import UserError
from gligen.training import Trainer, load_config
from tests.launch import accelerate_launch
from tests.tiny import save_tiny_sd


def tensor_sizes(directory) -> dict[str, torch.Size]:
    """The tensors of a torch.distributed.checkpoint directory: name -> full (unsharded) size."""
    metadata = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {k: v.size for k, v in metadata.items() if isinstance(v, TensorStorageMetadata)}


def test_fsdp_checkpoints_hold_the_adapter_alone_and_resume_exactly(tmp_path):
    shards = tmp_path / "shards"  # 2 readers: each process reads every other shard
    write_shards(str(shards), 16, size=40, samples_per_shard=4)
    sd = save_tiny_sd(tmp_path / "sd")

    def launch(out, steps):
        done = accelerate_launch("train.py", "--config", "configs/tiny_test.yaml", f"model.base={sd}",
                                 f"data.shards={shards}", f"output_dir={tmp_path / out}", "data.resolution=16",
                                 "batch_size=1", f"max_steps={steps}", "checkpoint_every=2",
                                 config_file="configs/accelerate/fsdp.yaml")
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    launch("straight", 4)
    first = tmp_path / "straight" / "checkpoints" / "checkpoint-00000002"
    copied = tmp_path / "resumed" / "checkpoints" / first.name
    shutil.copytree(first, copied)  # a run stopped at step 2
    assert f"resumed from {copied} at step 2" in launch("resumed", 4).stderr
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter" / "adapter.safetensors"))
    assert sorted(straight) == sorted(resumed)
    assert all(torch.equal(v, resumed[k]) for k, v in straight.items())
    assert any(v.abs().max() > 0 for k, v in straight.items() if "alpha_attn" in k)  # the gates trained

    # the exported adapter has diffusers' 0-dim gates, although FSDP trained them as 1-element vectors
    adapter = GroundingAdapter.from_pretrained(tmp_path / "straight" / "adapter")
    assert all(v.shape == () for k, v in straight.items() if k.endswith(("alpha_attn", "alpha_dense")))

    # the checkpoint holds the adapter's trainable parameters and their AdamW state, and nothing of the base
    assert sorted(p.name for p in first.iterdir()) == [
        "adapter", "optimizer_0", "pytorch_model_fsdp_0", "random_states_0.pkl", "random_states_1.pkl",
        "training_state_0.json", "training_state_0.safetensors", "training_state_1.json", "training_state_1.safetensors"]
    trainable = {name: p.numel() for name, p in adapter.named_parameters() if p.requires_grad}
    weights = tensor_sizes(first / "pytorch_model_fsdp_0")
    assert {k: v.numel() for k, v in weights.items()} == {f"model.adapter.{k}": n for k, n in trainable.items()}
    state = tensor_sizes(first / "optimizer_0")
    for kind in ("exp_avg", "exp_avg_sq"):
        moments = {k.removesuffix(f".{kind}"): v.numel() for k, v in state.items() if k.endswith(f".{kind}")}
        assert moments == {f"optimizer.state.adapter.{k}": n for k, n in trainable.items()}
    assert sum(v.numel() for v in state.values()) == 2 * sum(trainable.values()) + len(trainable)  # + the steps


def test_fsdp_version_1_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    write_shards(str(tmp_path / "shards"), 4, size=40, samples_per_shard=4)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp --fsdp_version 1` sets
    monkeypatch.setenv("FSDP_VERSION", "1")
    config = load_config("configs/tiny_test.yaml", ["model.base=nowhere", f"data.shards={tmp_path / 'shards'}",
                                                     f"output_dir={tmp_path / 'out'}"])
    AcceleratorState._reset_state(True)
    try:
        with pytest.raises(UserError, match="FSDP version 1 cannot resume its optimizer state; set fsdp_version: 2"):
            Trainer(config)
    finally:
        AcceleratorState._reset_state(True)


def test_deepspeed_launched_on_cpus_is_refused_rather_than_run_as_ddp(tmp_path):
    """accelerate turns DeepSpeed on for GPUs only: on CPUs it would train plain DDP without a word."""
    pytest.importorskip("deepspeed", reason="`accelerate launch` of a DeepSpeed config needs deepspeed installed")
    shards = tmp_path / "shards"
    write_shards(str(shards), 4, size=40, samples_per_shard=2)
    done = accelerate_launch("train.py", "--config", "configs/tiny_test.yaml", f"model.base={tmp_path / 'nowhere'}",
                             f"data.shards={shards}", f"output_dir={tmp_path / 'out'}",
                             config_file="configs/accelerate/deepspeed_zero2.yaml", env={"DS_ACCELERATOR": "cpu"})
    assert done.returncode != 0
    assert ("train.py: error: the launch asks for DeepSpeed, but accelerate runs these processes as MULTI_CPU (plain data "
            "parallel); on CPUs use configs/accelerate/fsdp.yaml") in done.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
