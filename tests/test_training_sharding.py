"""FSDP and DeepSpeed ZeRO-2 (configs/accelerate/) on 2 CPU processes over gloo: checkpoints of the adapter alone,
exact resume."""

import json
import os
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
from tests.tiny import save_tiny_sd, tiny_train_args


def tensor_sizes(directory) -> dict[str, torch.Size]:
    """The tensors of a torch.distributed.checkpoint directory: name -> full (unsharded) size."""
    metadata = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {k: v.size for k, v in metadata.items() if isinstance(v, TensorStorageMetadata)}


def test_fsdp_checkpoints_hold_the_adapter_alone_and_resume_exactly(tmp_path):
    shards = tmp_path / "shards"  # 2 readers: each process reads every other shard
    write_shards(str(shards), 16, size=40, samples_per_shard=4)
    sd = save_tiny_sd(tmp_path / "sd")

    def launch(out, steps):
        done = accelerate_launch("train.py", "--config", "configs/tiny_test.yaml", *tiny_train_args(
            sd, shards, tmp_path / out, "batch_size=1", f"max_steps={steps}", "checkpoint_every=2"),
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


@pytest.mark.parametrize("kind", ["fsdp version 1", "zero-3"])
def test_unsupported_sharding_is_refused_before_the_model_loads(tmp_path, monkeypatch, kind):
    if kind == "zero-3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install --no-build-isolation deepspeed)")
    write_shards(str(tmp_path / "shards"), 4, size=40, samples_per_shard=4)
    launch_env, message = {  # what `accelerate launch` sets for such a config
        "fsdp version 1": ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
                           "FSDP version 1 cannot resume its optimizer state; set fsdp_version: 2"),
        "zero-3": ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
                   r"DeepSpeed ZeRO stage 3 is not supported \(the adapter is small"),
    }[kind]
    for name, value in launch_env.items():
        monkeypatch.setenv(name, value)
    config = load_config("configs/tiny_test.yaml", ["model.base=nowhere", f"data.shards={tmp_path / 'shards'}",
                                                     f"output_dir={tmp_path / 'out'}"])
    AcceleratorState._reset_state(True)
    try:
        with pytest.raises(UserError, match=message):
            Trainer(config)
    finally:
        AcceleratorState._reset_state(True)


class RunsCode:
    """A pickled object that runs a command when unpickled (what a malicious checkpoint holds)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_deepspeed_zero2_trains_as_ddp_does_keeps_the_adapter_alone_and_resumes_exactly(tmp_path):
    """configs/accelerate/deepspeed_zero2.yaml on 2 CPU processes (DeepSpeed's CPU accelerator, over gloo)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install --no-build-isolation deepspeed)")
    shards = tmp_path / "shards"
    write_shards(str(shards), 16, size=40, samples_per_shard=4)
    sd = save_tiny_sd(tmp_path / "sd")

    def launch(out, config_file):
        return accelerate_launch("train.py", "--config", "configs/tiny_test.yaml", *tiny_train_args(
            sd, shards, tmp_path / out, "batch_size=1", "max_steps=4", "checkpoint_every=2", "log_every=2"),
            config_file=config_file)

    zero2 = "configs/accelerate/deepspeed_zero2.yaml"
    for out, config_file in (("ddp", None), ("deepspeed", zero2)):
        done = launch(out, config_file)
        assert done.returncode == 0, done.stderr[-3000:]
    first = tmp_path / "deepspeed" / "checkpoints" / "checkpoint-00000002"
    copied = tmp_path / "resumed" / "checkpoints" / first.name
    shutil.copytree(first, copied)  # a run stopped at step 2
    done = launch("resumed", zero2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {copied} at step 2" in done.stderr
    ddp, deepspeed, resumed = (load_file(str(tmp_path / out / "adapter" / "adapter.safetensors"))
                               for out in ("ddp", "deepspeed", "resumed"))
    assert sorted(deepspeed) == sorted(resumed) == sorted(ddp)
    assert all(torch.equal(v, resumed[k]) for k, v in deepspeed.items())
    # the same updates as DDP: DeepSpeed steps our AdamW on its partitions, with our lr schedule and clipping
    for k, v in ddp.items():
        torch.testing.assert_close(deepspeed[k], v, rtol=0, atol=1e-6)
    assert min(abs(float(v)) for k, v in deepspeed.items() if k.endswith("alpha_attn")) > 1e-4  # the gates trained
    norms = {out: [json.loads(line)["grad_norm"] for line in (tmp_path / out / "logs" / "metrics.jsonl").open()
                   if "grad_norm" in line] for out in ("ddp", "deepspeed")}
    assert len(norms["deepspeed"]) == 2 and norms["deepspeed"] == pytest.approx(norms["ddp"], rel=1e-5)  # DeepSpeed's own
    assert all(v.shape == () for k, v in deepspeed.items() if k.endswith(("alpha_attn", "alpha_dense")))

    # the engine files hold the adapter's weights and, split over the processes, its AdamW state: nothing of the base
    assert sorted(p.name for p in (first / "pytorch_model").iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    adapter = GroundingAdapter.from_pretrained(tmp_path / "deepspeed" / "adapter")
    trainable = {name: p.numel() for name, p in adapter.named_parameters() if p.requires_grad}
    weights = torch.load(first / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert {k: v.numel() for k, v in weights.items()} == {f"adapter.{k}": n for k, n in trainable.items()}
    held = 0
    for rank in (0, 1):
        state = torch.load(first / "pytorch_model" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                           weights_only=False)["optimizer_state_dict"]
        moments = state["base_optimizer_state"]["state"]
        held += sum(m["exp_avg"].numel() - pad for m, pad in zip(moments.values(), state["group_paddings"]))
        assert all(m["exp_avg_sq"].shape == m["exp_avg"].shape for m in moments.values())
    assert held == sum(trainable.values())

    # DeepSpeed unpickles its files whole: one that needs code to load is refused before, and nothing runs
    marker = tmp_path / "ran"
    torch.save({"optimizer_state_dict": RunsCode(f"touch {marker}")},
               copied / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "checkpoint-00000004")  # resume from the tampered one
    done = launch("resumed", zero2)
    assert done.returncode != 0 and not marker.exists()
    assert (f"train.py: error: {copied}: a state file is a pickle that needs code to load; refused (no code ran)"
            in done.stderr)
