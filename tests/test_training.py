"""Training on tiny components from generated shards: loop, checkpoints, exact resume, bad data."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from gligen.adapter import GroundingAdapter
from gligen.data.format import Sample, encode_sample
from gligen.data.shapes import shape_sample, write_shards
from gligen.errors import UserError
from gligen.grounding import IMAGE_EMBED_NORM
from gligen.layout import Entity, Layout, save_layouts
from gligen.pipeline import GligenPipeline
from gligen.training import Trainer, TrainingStopped, load_config
from gligen.training.config import DataConfig
from gligen.training.dataset import DataPosition, ShardDataset, augment, swap_left_right
from tests.launch import accelerate_launch
from tests.tiny import HIDDEN, save_tiny_sd, tiny_image_encoder, tiny_train_args, tiny_train_config


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
    return tiny_train_config(setup["sd"], setup["shards"], setup["root"] / out, *overrides)


def adapter_tensors(trainer):
    return {k: v.clone() for k, v in trainer.adapter.adapter_state_dict().items()}


def test_config_errors_name_the_key(setup):
    with pytest.raises(UserError, match="unknown config key optim.lrr"):
        config(setup, "x", "optim.lrr=1")
    for value in ("fast", "nan", "inf"):
        with pytest.raises(UserError, match=f"config key optim.lr: '{value}' is not a float"):
            config(setup, "x", f"optim.lr={value}")
    with pytest.raises(UserError, match="config key mixed_precision: 'fp8' is not one of"):
        config(setup, "x", "mixed_precision=fp8")
    with pytest.raises(UserError, match="config key data.caption_drop must be in"):
        config(setup, "x", "data.caption_drop=2")
    with pytest.raises(UserError, match="key=value"):
        config(setup, "x", "optim.lr")
    assert config(setup, "x", "optim.betas=[0.5, 0.9]").optim.betas == [0.5, 0.9]
    with pytest.raises(UserError, match="config key model.base: .*: not a diffusers pipeline directory"):
        Trainer(config(setup, "x", f"model.base={setup['shards']}"))


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_names_its_base(path):
    config = load_config(path, ["data.shards=x"] + (["model.base=x"] if path.name == "tiny_test.yaml" else []))
    assert config.model.base


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
        assert len(out.boxes) == len(expected)
        assert [v for box in out.boxes for v in box] == pytest.approx([v for box in expected for v in box])
        assert out.caption == ("a cat on the right" if flip else "a cat on the left")
        assert out.phrases == (["the right cat" if flip else "the left cat"] if expected else [])
        assert out.pixels.shape == (3, 40, 40)
        assert out.original_size == (40, 80)  # SDXL's conditioning: (height, width), and the crop corner as seen
        assert out.crop_top_left == (0, 40 - left if flip else left)
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
    elsewhere = setup["root"] / "moved" / "shards"  # the same files in another directory: the same stream
    shutil.copytree(setup["shards"], elsewhere)
    moved = iter(ShardDataset(DataConfig(shards=str(elsewhere), resolution=16, num_workers=0), batch_size=3, seed=5))
    for expected in batches[:4]:
        got = next(moved)
        assert got["cache_keys"] == expected["cache_keys"]
        torch.testing.assert_close(got["pixels"], expected["pixels"], rtol=0, atol=0)
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
                             "optim.lr=3e-3", "checkpoint_every=10", f"validation.layouts={layouts}", "validation.every=20",
                             "validation.grounding_gain_samples=4"))
    base = {k: v.clone() for k, v in trainer.parts["unet"].state_dict().items() if ".fuser." not in k and "position_net" not in k}
    before = adapter_tensors(trainer)
    rng = trainer.generator.get_state()
    closed = trainer.grounding_gain()  # zero gates: grounding changes nothing yet
    assert closed["loss_grounded"] == closed["loss_ungrounded"] > 0 and closed["grounding_gain"] == 0
    assert torch.equal(trainer.generator.get_state(), rng)  # training's randomness is left alone
    batch = next(iter(ShardDataset(trainer.config.data, batch_size=4, seed=1)))
    loss_before = _fixed_loss(trainer, batch)
    out = trainer.train()
    assert _fixed_loss(trainer, batch) < loss_before

    after = trainer.parts["unet"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    changed = [k for k, v in adapter_tensors(trainer).items() if not torch.equal(v, before[k])]
    assert any(".fuser.alpha_attn" in k for k in changed) and any(k.startswith("position_net.") for k in changed)

    metrics = [json.loads(line) for line in (setup["root"] / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 20, 20]
    grid = Image.open(metrics.pop()["validation_grid"])
    gain = metrics.pop()
    assert gain == {"step": 20, **trainer.grounding_gain()} and gain["grounding_gain"] != 0
    assert grid.size == (2 * 258 + 2, 258 + 2)  # two 16x16 images with box overlays (enlarged to 256), padded
    assert metrics[-1]["skipped_samples"] >= 2  # 40 samples drawn: the corrupt pair was met at least once
    assert all(m["lr"] == 3e-3 and m["grad_norm"] > 0 for m in metrics)
    checkpoints = sorted(p.name for p in (setup["root"] / "run" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-00000010", "checkpoint-00000020"]

    adapter = GroundingAdapter.from_pretrained(out)
    for key, value in adapter.adapter_state_dict().items():
        torch.testing.assert_close(value, trainer.adapter.adapter_state_dict()[key], rtol=0, atol=0)
    pipe = GligenPipeline.from_pretrained(str(setup["sd"]), adapter=str(out))
    layout = Layout("a red circle", (Entity("a red circle", (0.2, 0.2, 0.7, 0.7)),), width=16, height=16)
    images = pipe([layout], num_inference_steps=2).images
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
    rerun = Trainer(config(setup, "resumed", "max_steps=6", "adapter_dtype=fp16", "model.schedule=[0.8, 0, 0.2]",
                           *common))
    out = rerun.train()  # a finished run, rerun: nothing more to train, the adapter exported again in half precision
    half = load_file(str(out / "adapter.safetensors"))
    assert rerun.step == 6 and all(torch.equal(v.half(), half[k]) for k, v in ema_a.items())
    # with the schedule it is released for: generation's default
    assert GligenPipeline.from_pretrained(str(setup["sd"]), adapter=str(out)).default_schedule == (0.8, 0.0, 0.2)
    assert GligenPipeline.from_pretrained(str(setup["sd"]), adapter=str(setup["root"] / "straight" / "adapter")
                                          ).default_schedule == (0.3, 0.0, 0.7)
    with pytest.raises(UserError, match=r"config key model.schedule: schedule \[0.8, 0.0, 0.1\] must sum to 1"):
        config(setup, "resumed", "model.schedule=[0.8, 0, 0.1]")


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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_loss_weighting_is_the_error_of_the_implied_clean_latents(setup, prediction_type):
    trainer = Trainer(config(setup, f"x0_{prediction_type}", "loss_weighting=x0", "grounding_drop=0"))
    trainer.noise_scheduler.register_to_config(prediction_type=prediction_type)
    batch = next(iter(ShardDataset(trainer.config.data, batch_size=4, seed=0)))
    seen = {}
    add_noise = trainer.noise_scheduler.add_noise

    def recorded(latents, noise, timesteps):
        seen.update(latents=latents, timesteps=timesteps, noisy=add_noise(latents, noise, timesteps))
        return seen["noisy"]

    trainer.noise_scheduler.add_noise = recorded
    trainer.model.register_forward_hook(lambda module, inputs, output: seen.update(prediction=output.detach()))
    with torch.no_grad():
        weighted = trainer.loss(batch).item()
    a = trainer.noise_scheduler.alphas_cumprod[seen["timesteps"]].view(-1, 1, 1, 1)
    x_t, prediction = seen["noisy"], seen["prediction"]
    if prediction_type == "epsilon":
        clean = (x_t - (1 - a).sqrt() * prediction) / a.sqrt()
    else:
        clean = a.sqrt() * x_t - (1 - a).sqrt() * prediction
    assert seen["timesteps"].unique().numel() > 1
    assert weighted == pytest.approx((clean - seen["latents"]).pow(2).mean().item(), rel=1e-4)


# --- cached encodings ----------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerator():
    """Runs in other precisions: accelerate keeps one mixed-precision setting per process unless reset."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def run_and_losses(setup, out, *overrides):
    """A fresh 4-step run logging every step -> (the trainer, its per-step losses)."""
    AcceleratorState._reset_state(True)
    trainer = Trainer(config(setup, out, "max_steps=4", "log_every=1", *overrides))
    trainer.train()
    lines = (setup["root"] / out / "logs" / "metrics.jsonl").read_text().splitlines()
    return trainer, [json.loads(line)["loss"] for line in lines]


def test_cache_dir_gives_the_same_losses_and_is_reused(setup, fresh_accelerator):
    cache = setup["root"] / "cache"
    _, plain = run_and_losses(setup, "uncached")
    run_and_losses(setup, "cached_bf16", f"cache_dir={cache}", "mixed_precision=bf16")  # bf16 entries: not for fp32
    first, cached = run_and_losses(setup, "cached", f"cache_dir={cache}")
    assert cached == pytest.approx(plain, rel=1e-5, abs=0) and len(plain) == 4
    assert (first.cache["latents"].hits, first.cache["latents"].misses) == (0, 8)  # 4 steps x 2 crops, all new
    for kind, entries in first.cache.items():  # a caption or phrase met twice in one batch is one file
        assert 0 < len(list(entries.directory.rglob("*.safetensors"))) <= entries.misses, kind
    assert len(list(first.cache["latents"].directory.rglob("*.safetensors"))) == 8
    written = {path: path.stat().st_mtime_ns for path in cache.rglob("*.safetensors")}

    second, again = run_and_losses(setup, "cached_again", f"cache_dir={cache}")
    assert again == cached
    assert all(entries.misses == 0 and entries.hits == first.cache[kind].hits + first.cache[kind].misses
               for kind, entries in second.cache.items())
    assert {path: path.stat().st_mtime_ns for path in cache.rglob("*.safetensors")} == written


# --- text-image-box adapters ---------------------------------------------------------------------------------------

PROJECTION = 24  # CLIP's joint embedding width; unlike HIDDEN, so a projection the wrong way round cannot fit


def save_clip(directory, text_hidden=HIDDEN, tower_projection=True):
    """A tiny full CLIP model directory; its tower configs name the projection width (as openai's do) or not."""
    tower = dict(intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    if tower_projection:
        tower["projection_dim"] = PROJECTION
    config = CLIPConfig(text_config=dict(tower, hidden_size=text_hidden, vocab_size=99, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1),
                        vision_config=dict(tower, hidden_size=HIDDEN, image_size=32, patch_size=8),
                        projection_dim=PROJECTION)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    tiny_image_encoder()[1].save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def text_image(setup):
    """A CLIP directory and shards: shard 0 with a KEY.ref<i>.png per entity, the first entity a speck that the
    box filter drops; shard 1 with no reference images."""
    shards = setup["root"] / "reference_shards"
    shards.mkdir()
    expected = {}
    with wds.TarWriter(str(shards / "shard-000000.tar"), encoder=False) as tar:
        for i in range(4):
            scene = shape_sample(3, i, 40)
            entities = [Entity("a speck", (0.5, 0.5, 0.52, 0.52)), *scene.entities]
            references = [Image.new("RGB", (8 + j, 8), (60 * j, 250 - 60 * j, 40 * i)) for j in range(len(entities))]
            tar.write(encode_sample(Sample(f"withref{i}", scene.image, scene.caption, entities, references), "png"))
            expected[f"withref{i}"] = references[1:]
    with wds.TarWriter(str(shards / "shard-000001.tar"), encoder=False) as tar:
        for i in range(4):
            tar.write(encode_sample(shape_sample(4, i, 40), "png"))
    return {"clip": save_clip(setup["root"] / "clip"), "shards": shards, "references": expected}


def text_image_config(setup, text_image, out, *overrides):
    return config(setup, out, "model.feature_type=text-image-box", f"model.image_encoder={text_image['clip']}",
                  f"data.shards={text_image['shards']}", "batch_size=4", *overrides)


def test_references_are_the_reference_files_or_box_crops(text_image):
    data = DataConfig(shards=str(text_image["shards"]), resolution=16, num_workers=0)
    batch = next(iter(ShardDataset(data, batch_size=8, seed=0, with_references=True)))
    keys = [k.split("|")[0] for k in batch["cache_keys"]]
    assert sorted(keys)[4:] == sorted(text_image["references"])  # one epoch: 4 samples of each shard
    for key, pixels, boxes, references in zip(keys, batch["pixels"], batch["boxes"], batch["references"]):
        assert len(references) == len(batch["phrases"][keys.index(key)]) > 0
        if key in text_image["references"]:  # the files of the kept entities, the speck's dropped with it
            for got, want in zip(references, text_image["references"][key], strict=True):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        else:  # each box cut from the augmented (resized, cropped, maybe flipped) training image
            image = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
            for got, box in zip(references, boxes):
                x0, y0, x1, y1 = (round(v * 16) for v in box.tolist())
                np.testing.assert_array_equal(np.asarray(got), image[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)])


def test_text_image_box_adapter_trains_and_generates_with_a_reference(setup, text_image):
    trainer = Trainer(text_image_config(setup, text_image, "text_image", "max_steps=6", "grounding_drop=0",
                                        "data.caption_drop=0", "optim.lr=3e-3"))
    clip = CLIPModel.from_pretrained(text_image["clip"]).eval()
    projection = clip.text_projection.weight.T  # CLIP image embedding -> the text encoder's space
    assert trainer.adapter.image_projection.weight.shape == (HIDDEN, PROJECTION)
    torch.testing.assert_close(trainer.adapter.image_projection.weight, projection, rtol=0, atol=0)

    # Image tokens: CLIP's projected image embedding of each reference, mapped back and rescaled to norm 28.7.
    batch = next(iter(ShardDataset(trainer.config.data, batch_size=8, seed=0, with_references=True)))
    grounding = trainer.grounding_inputs(batch)
    torch.testing.assert_close(grounding.image_masks, grounding.masks, rtol=0, atol=0)
    processor = CLIPImageProcessor.from_pretrained(text_image["clip"])
    for row, references in enumerate(batch["references"]):
        pixels = processor(images=references, return_tensors="pt").pixel_values
        with torch.no_grad():
            embeds = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output) @ projection.T
        expected = embeds / embeds.norm(dim=-1, keepdim=True) * IMAGE_EMBED_NORM
        torch.testing.assert_close(grounding.image_embeds[row, :len(references)], expected, rtol=1e-5, atol=1e-5)
        assert not grounding.image_embeds[row, len(references):].any()

    before = adapter_tensors(trainer)
    out = trainer.train()
    after = adapter_tensors(trainer)
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert any(k.startswith("position_net.linears_image.") for k in changed)
    assert "image_projection.weight" not in changed  # frozen: it is CLIP's

    pipe = GligenPipeline.from_pretrained(str(setup["sd"]), adapter=str(out), image_encoder=str(text_image["clip"]))
    torch.testing.assert_close(pipe.adapter.image_projection.weight, projection, rtol=0, atol=0)
    torch.testing.assert_close(pipe.image_encoder.visual_projection.weight, clip.visual_projection.weight, rtol=0, atol=0)
    bare = save_clip(setup["root"] / "clip_bare_towers", tower_projection=False)  # the width only at the top
    encoder = GligenPipeline.from_pretrained(str(setup["sd"]), adapter=str(out), image_encoder=str(bare)).image_encoder
    torch.testing.assert_close(encoder.visual_projection.weight, CLIPModel.from_pretrained(bare).visual_projection.weight,
                               rtol=0, atol=0)
    with torch.no_grad():  # gates opened, so that what a reference changes stands far above rounding noise
        for fuser in pipe.adapter.fusers:
            fuser.alpha_attn.fill_(1.0)
            fuser.alpha_dense.fill_(1.0)
    latents = {}
    for name, colour in (("red", (250, 0, 0)), ("blue", (0, 0, 250))):
        path = setup["root"] / f"{name}.png"
        Image.new("RGB", (20, 20), colour).save(path)
        layout = Layout("a thing", (Entity("a thing", (0.2, 0.2, 0.7, 0.7), image=str(path)),), width=16, height=16)
        latents[name] = pipe([layout, layout], num_inference_steps=2, schedule=(1.0, 0.0, 0.0), output_type="latent").images
    # Rows of one batch may differ in the last bits (CPU kernels treat batch rows differently on some
    # machines); a reference image that is used moves the latents by far more than that tolerance.
    torch.testing.assert_close(latents["red"][0], latents["red"][1], rtol=0, atol=1e-4)
    assert (latents["red"][0] - latents["blue"][0]).abs().max() > 1e-3  # 3e-3 measured


def test_text_image_box_trains_in_bf16(setup, text_image, fresh_accelerator):
    trainer = Trainer(text_image_config(setup, text_image, "text_image_bf16", "max_steps=2", "grounding_drop=0",
                                        "mixed_precision=bf16"))
    assert trainer.parts["image_encoder"].dtype == torch.bfloat16
    before = adapter_tensors(trainer)
    trainer.train()
    assert trainer.step == 2
    changed = {k for k, v in adapter_tensors(trainer).items() if not torch.equal(v, before[k])}
    assert any(k.startswith("position_net.linears_image.") for k in changed)


def test_text_image_box_needs_a_full_clip_model_that_fits(setup, text_image):
    vision_only = setup["root"] / "clip_vision_only"  # such as `gligen convert --full` writes: enough to generate
    for part in tiny_image_encoder():
        part.save_pretrained(vision_only)
    with pytest.raises(UserError, match="is a clip_vision_model model; text-image-box training needs a full CLIP"):
        Trainer(text_image_config(setup, {**text_image, "clip": vision_only}, "vision_only"))
    narrow = save_clip(setup["root"] / "clip_narrow", text_hidden=16)
    with pytest.raises(UserError, match="its text projection maps to 16 dims, but the base's text encoder has 32"):
        Trainer(text_image_config(setup, {**text_image, "clip": narrow}, "narrow"))


def test_gate_lr_scale_moves_only_the_gates_faster(setup):
    """Adam's first step moves each parameter by about lr: the gates by lr * gate_lr_scale, the rest by lr."""
    common = ("max_steps=1", "grounding_drop=0", "data.caption_drop=0", "optim.lr_schedule=constant")
    moved = {}
    for scale in (1, 10):
        trainer = Trainer(config(setup, f"gate_scale_{scale}", *common, f"optim.gate_lr_scale={scale}"))
        before = adapter_tensors(trainer)
        trainer.train()
        moved[scale] = {k: (v - before[k]).abs().max().item() for k, v in adapter_tensors(trainer).items()}
    gates = [k for k in moved[1] if k.endswith(("alpha_attn", "alpha_dense"))]
    assert gates and all(moved[10][k] == pytest.approx(10 * moved[1][k], rel=1e-3) for k in gates)
    assert all(moved[10][k] == pytest.approx(moved[1][k], rel=1e-4) for k in moved[1] if k not in gates)


def test_gate_init_opens_the_attention_gates_of_a_fresh_adapter(setup, capsys):
    """model.gate_init is the tanh of every fresh attention gate; the dense gates stay 0; 0 is GLIGEN's closed start."""
    closed = adapter_tensors(Trainer(config(setup, "gates_closed")))
    opened = adapter_tensors(Trainer(config(setup, "gates_open", "model.gate_init=0.5")))
    attn = [k for k in opened if k.endswith("alpha_attn")]
    assert attn and all(torch.tanh(opened[k]).item() == pytest.approx(0.5) and closed[k].item() == 0 for k in attn)
    assert all(opened[k].item() == 0 for k in opened if k.endswith("alpha_dense"))
    assert all(torch.equal(opened[k], closed[k]) for k in opened if not k.endswith("alpha_attn"))  # same init otherwise
    with pytest.raises(UserError, match=r"config key model.gate_init must be in \(-1, 1\)"):
        config(setup, "gates_bad", "model.gate_init=1")


def test_two_launched_processes_train_checkpoint_and_resume_exactly(setup, tmp_path):
    """`accelerate launch` with 2 processes: a run stopped at a checkpoint and rerun ends where a straight run does."""
    shards = tmp_path / "shards"  # 2 readers: each process reads every other shard
    write_shards(str(shards), 16, size=40, samples_per_shard=4)

    def launch(out, steps):
        done = accelerate_launch("train.py", "--config", "configs/tiny_test.yaml", *tiny_train_args(
            setup["sd"], shards, tmp_path / out, "batch_size=1", f"max_steps={steps}", "checkpoint_every=2", "ema_decay=0.9"))
        assert done.returncode == 0, done.stderr[-3000:]

    launch("straight", 4)
    launch("resumed", 2)
    first = tmp_path / "resumed" / "checkpoints" / "checkpoint-00000002"
    positions = [json.loads((first / f"training_state_{rank}.json").read_text())["positions"] for rank in (0, 1)]
    assert all(p["0"]["sample"] == 2 for p in positions)  # each process read 2 samples of its own shard
    launch("resumed", 4)
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter" / "adapter.safetensors"))
    assert sorted(straight) == sorted(resumed)
    assert all(torch.equal(v, resumed[k]) for k, v in straight.items())
    assert any(v.abs().max() > 0 for k, v in straight.items() if "alpha_attn" in k)
