"""Training on tiny components from generated shards: loop, checkpoints, exact resume, bad data."""

import json
import random

import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from gligen.adapter import GroundingAdapter
from gligen.data.format import Sample, encode_sample
from gligen.data.shapes import write_shards
from gligen.errors import UserError
from gligen.layout import Entity, Layout, save_layouts
from gligen.pipeline import GligenPipeline
from gligen.training import Trainer, TrainingStopped, load_config
from gligen.training.config import DataConfig
from gligen.training.dataset import DataPosition, ShardDataset, augment, swap_left_right
from tests.tiny import save_tiny_sd


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    shards = root / "shards"
    write_shards(str(shards), 12, size=40, samples_per_shard=4)
    good = Sample("extra", Image.new("RGB", (40, 40), (200, 30, 30)), "a red square on the left",
                  [Entity("a red square on the left", (0.1, 0.1, 0.6, 0.6))])
    with wds.TarWriter(str(shards / "shard-000003.tar"), encoder=False) as tar:
        tar.write({"__key__": "badimage", "jpg": b"\xff\xd8 not a jpeg", "json": json.dumps({"caption": "x"}).encode()})
        tar.write(encode_sample(good))
        tar.write({**encode_sample(Sample("badjson", good.image, "", [])), "json": b"{caption: oops"})
    return {"sd": save_tiny_sd(root / "sd"), "shards": shards, "root": root}


def config(setup, out, *overrides):
    return load_config("configs/tiny_test.yaml", [
        f"model.base={setup['sd']}", f"data.shards={setup['shards']}", f"output_dir={setup['root'] / out}",
        "data.resolution=16", *overrides,
    ])


def adapter_tensors(trainer):
    return {k: v.clone() for k, v in trainer.adapter.adapter_state_dict().items()}


def test_config_errors_name_the_key(setup):
    with pytest.raises(UserError, match="unknown config key optim.lrr"):
        config(setup, "x", "optim.lrr=1")
    with pytest.raises(UserError, match="config key optim.lr: 'fast' is not a float"):
        config(setup, "x", "optim.lr=fast")
    with pytest.raises(UserError, match="config key mixed_precision: 'fp8' is not one of"):
        config(setup, "x", "mixed_precision=fp8")
    with pytest.raises(UserError, match="config key data.caption_drop must be in"):
        config(setup, "x", "data.caption_drop=2")
    with pytest.raises(UserError, match="key=value"):
        config(setup, "x", "optim.lr")
    assert config(setup, "x", "optim.betas=[0.5, 0.9]").optim.betas == [0.5, 0.9]


def test_augment_moves_boxes_with_crop_and_flip():
    image = Image.new("RGB", (80, 40))
    sample = Sample("k", image, "a cat on the left", [
        Entity("the left cat", (0.0, 0.0, 0.25, 1.0)), Entity("a speck", (0.9, 0.9, 0.91, 0.91)),
    ])
    cfg = DataConfig(shards="x", resolution=40, caption_drop=0.0, min_box_area=0.01)
    for seed in range(20):
        rng = random.Random(seed)
        out = augment(sample, cfg, rng)
        replay = random.Random(seed)
        left, _, flip = replay.randint(0, 40), replay.randint(0, 0), replay.random() < 0.5
        x1 = min(max((20 - left) / 40, 0), 1)  # the cat spans pixels 0..20 of the 80-wide image
        expected = [(1 - x1, 0.0, 1.0, 1.0) if flip else (0.0, 0.0, x1, 1.0)] if x1 >= 0.01 else []
        assert out.boxes == pytest.approx(expected)
        assert out.caption == ("a cat on the right" if flip else "a cat on the left")
        assert out.phrases == (["the right cat" if flip else "the left cat"] if expected else [])
        assert out.pixels.shape == (3, 40, 40)
    assert swap_left_right("Left of right, leftover") == "Right of left, leftover"


def test_dataset_is_deterministic_resumable_and_counts_corrupt_samples(setup):
    cfg = DataConfig(shards=str(setup["shards"]), resolution=16, num_workers=0)
    stream = iter(ShardDataset(cfg, batch_size=3, seed=5))
    batches = [next(stream) for _ in range(8)]  # 24 samples: one epoch is 13 good + 2 corrupt
    again = iter(ShardDataset(cfg, batch_size=3, seed=5))
    torch.testing.assert_close(next(again)["pixels"], batches[0]["pixels"], rtol=0, atol=0)
    epoch_end = next(b["position"] for b in batches if b["position"]["epoch"] == 1)
    assert epoch_end["skipped"] == 2
    keys = [k.split("|")[0] for b in batches[:4] for k in b["cache_keys"]]
    assert "extra" in keys and "badimage" not in keys and "badjson" not in keys
    position = DataPosition(**{k: v for k, v in batches[3]["position"].items() if k != "worker"})
    resumed = iter(ShardDataset(cfg, batch_size=3, seed=5, positions={0: position}))
    for expected in batches[4:]:
        got = next(resumed)
        assert got["cache_keys"] == expected["cache_keys"] and got["position"] == expected["position"]
        torch.testing.assert_close(got["pixels"], expected["pixels"], rtol=0, atol=0)
        torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=0, atol=0)


def _fixed_loss(trainer, batch):
    trainer.generator.manual_seed(123)
    with torch.no_grad():
        return sum(trainer.loss(batch).item() for _ in range(4)) / 4


def test_training_run_checkpoints_and_adapter(setup):
    layouts = setup["root"] / "validation.jsonl"
    save_layouts(layouts, [Layout("a blue star", (Entity("a blue star", (0.1, 0.2, 0.6, 0.9)),), width=16, height=16)] * 2)
    trainer = Trainer(config(setup, "run", "max_steps=20", "grounding_drop=0", "data.caption_drop=0",
                             "optim.lr=3e-3", "checkpoint_every=10", f"validation.layouts={layouts}", "validation.every=20"))
    base = {k: v.clone() for k, v in trainer.parts["unet"].state_dict().items() if ".fuser." not in k and "position_net" not in k}
    before = adapter_tensors(trainer)
    batch = next(iter(ShardDataset(trainer.config.data, batch_size=4, seed=1)))
    loss_before = _fixed_loss(trainer, batch)
    out = trainer.train()
    assert _fixed_loss(trainer, batch) < loss_before

    after = trainer.parts["unet"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    changed = [k for k, v in adapter_tensors(trainer).items() if not torch.equal(v, before[k])]
    assert any(".fuser.alpha_attn" in k for k in changed) and any(k.startswith("position_net.") for k in changed)

    metrics = [json.loads(line) for line in (setup["root"] / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 20]
    grid = Image.open(metrics.pop()["validation_grid"])
    assert grid.size == (2 * 18 + 2, 18 + 2)  # two 16x16 images with box overlays, padded
    assert metrics[-1]["skipped_samples"] >= 2  # 40 samples drawn: the corrupt pair was met at least once
    assert all(m["lr"] == 3e-3 and m["grad_norm"] > 0 for m in metrics)
    checkpoints = sorted(p.name for p in (setup["root"] / "run" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-00000010", "checkpoint-00000020"]

    adapter = GroundingAdapter.from_pretrained(out)
    for key, value in adapter.adapter_state_dict().items():
        torch.testing.assert_close(value, trainer.adapter.adapter_state_dict()[key], rtol=0, atol=0)
    pipe = GligenPipeline.from_pretrained(str(setup["sd"]), adapter=str(out))
    layout = Layout("a red circle", (Entity("a red circle", (0.2, 0.2, 0.7, 0.7)),), width=16, height=16)
    images = pipe([layout], num_inference_steps=2)
    assert images[0].size == (16, 16)


def test_kill_and_resume_equals_uninterrupted(setup):
    common = ["checkpoint_every=3", "ema_decay=0.9", "optim.warmup_steps=2", "optim.lr_schedule=cosine"]
    straight = Trainer(config(setup, "straight", "max_steps=6", *common))
    straight.train()
    killed = Trainer(config(setup, "resumed", "max_steps=6", *common))
    real_loss, calls = killed.loss, []

    def dies_at_step_5(batch):  # after the checkpoint of step 3 and one more update
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_loss(batch)

    killed.loss = dies_at_step_5
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert killed.step == 4
    resumed = Trainer(config(setup, "resumed", "max_steps=6", *common))
    resumed.train()
    assert resumed.step == 6
    for key, value in adapter_tensors(straight).items():
        assert torch.equal(value, adapter_tensors(resumed)[key]), key
    ema_a = load_file(str(setup["root"] / "straight" / "adapter" / "adapter.safetensors"))
    ema_b = load_file(str(setup["root"] / "resumed" / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(v, ema_b[k]) for k, v in ema_a.items())


def test_non_finite_losses_are_skipped_then_stop(setup, capsys):
    trainer = Trainer(config(setup, "nan", "max_steps=3", "max_bad_steps_in_a_row=2"))
    real_loss, calls = trainer.loss, []

    def flaky(batch):
        calls.append(1)
        return real_loss(batch) * (float("nan") if len(calls) == 2 else 1.0)

    trainer.loss = flaky
    trainer.train()
    assert trainer.step == 3 and len(calls) == 4
    assert "loss is nan; skipping the update (1 in a row" in capsys.readouterr().out

    stuck = Trainer(config(setup, "inf", "max_steps=3", "max_bad_steps_in_a_row=2"))
    before = adapter_tensors(stuck)
    stuck.loss = lambda batch: torch.tensor(float("inf"), requires_grad=True)
    with pytest.raises(TrainingStopped, match="2 non-finite losses in a row"):
        stuck.train()
    assert all(torch.equal(v, before[k]) for k, v in adapter_tensors(stuck).items())


def test_inpaint_mode_trains_extra_channels_and_gradient_checkpointing_agrees(setup):
    trainer = Trainer(config(setup, "inpaint", "model.inpaint=true", "max_steps=2", "grounding_drop=0"))
    batch = next(iter(ShardDataset(trainer.config.data, batch_size=2, seed=0)))
    grads = []
    for checkpointing in (False, True):
        trainer.parts["unet"].gradient_checkpointing = False
        if checkpointing:
            trainer.parts["unet"].enable_gradient_checkpointing()
        trainer.generator.manual_seed(7)
        trainer.adapter.zero_grad()
        trainer.loss(batch).backward()
        grads.append([p.grad.clone() for p in trainer.trainable])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    trainer.adapter.zero_grad()
    trainer.train()
    assert trainer.adapter.conv_in_extra.abs().sum() > 0
