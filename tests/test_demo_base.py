"""The demo base model: its tokenizer, its trainer (both stages learn, runs resume exactly), its saved pipeline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

import gligen.bundled
from gligen.adapter import GroundingAdapter
from gligen.data.shapes import shape_layouts, write_shards
from gligen.demo import resolve_model, train_base
from gligen.demo.base_model import (
    BaseModelConfig,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    training_scheduler,
)
from gligen.errors import UserError
from gligen.training import checkpoint

TINY = BaseModelConfig.tiny()
VAE_STEPS, STEPS, DECODER_STEPS = 24, 12, 4
ARGS = [
    "--preset", "tiny", "--batch-size", "8", "--vae-steps", str(VAE_STEPS), "--steps", str(STEPS), "--lr", "2e-3",
    "--vae-lr", "5e-3", "--vae-crop", "8", "--decoder-steps", str(DECODER_STEPS), "--workers", "1", "--device", "cpu",
    "--log-every", "4", "--checkpoint-every", "4",
]


def train(shards: Path, out: Path, *extra: str) -> int:
    with pytest.raises(SystemExit) as exit:
        train_base.main(["--data", str(shards), "--out", str(out), *ARGS, *extra])
    return exit.value.code


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shards(str(out), 48, size=TINY.image_size, seed=0, samples_per_shard=16)
    return out


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory) -> Path:
    """One uninterrupted training run."""
    out = tmp_path_factory.mktemp("run")
    assert train(shards, out) == 0
    return out


def test_tokenizer_makes_each_caption_word_one_token():
    captions = [layout.prompt for layout in shape_layouts(300, size=16)]
    tokenizer = build_tokenizer(captions, max_length=32)
    for caption in captions:
        words = re.findall(r"[a-z]+|,", caption)
        assert tokenizer.tokenize(caption) == [w + "</w>" for w in words]
        ids = tokenizer(caption).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) <= 32
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption.replace(",", " ,")
    # An unseen word still tokenizes, into characters.
    assert tokenizer.tokenize("a zebra") == ["a</w>", "z", "e", "b", "r", "a</w>"]
    assert len(tokenizer) < 700  # 2 x 256 byte characters + merges + 2 special tokens
    again = build_tokenizer(reversed(captions), max_length=32)  # the same words in another order: the same tokenizer
    assert again.get_vocab() == tokenizer.get_vocab()


def test_saved_pipeline_loads_with_diffusers_and_generates(run):
    summary = json.loads((run / "summary.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(run / "model", dtype=torch.float32)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    assert pipe.vae_scale_factor == TINY.image_size // TINY.latent_size
    assert pipe.vae.config.scaling_factor == pytest.approx(summary["vae"]["scaling_factor"])
    unet_file = run / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    assert load_file(unet_file)["conv_in.weight"].dtype == torch.float16
    assert summary["diffusion"]["steps"] == STEPS and summary["vae"]["steps"] == VAE_STEPS
    assert summary["decoder"]["steps"] == DECODER_STEPS
    assert summary["parameters"]["unet"] == sum(p.numel() for p in pipe.unet.parameters())
    assert (run / "samples.png").is_file() and (run / "reconstructions.png").is_file()

    pipe.set_progress_bar_config(disable=True)
    image = pipe(["a red circle and a blue star on a gray background", "a zebra"], height=16, width=16,
                 num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (2, 16, 16, 3) and np.isfinite(image).all() and image.std() > 0.01
    # The base takes a grounding adapter like any SD UNet.
    GroundingAdapter.for_unet(pipe.unet).attach(pipe.unet)


def fixed_batch(shards: Path, n: int = 8) -> tuple[torch.Tensor, list[str]]:
    """The first `n` training images (n, S, S, 3) uint8 and their captions."""
    data = train_base.load_images(str(shards), TINY.image_size, workers=1)
    return data.images[:n], data.captions[:n]


def stage_weights(run: Path, stage: str, module: str) -> dict[str, torch.Tensor]:
    """The weights of `module` in the newest checkpoint of `stage`."""
    tensors = load_file(checkpoint.latest(run / stage) / "state.safetensors")
    return {k.removeprefix(f"{module}."): v for k, v in tensors.items() if k.startswith(f"{module}.")}


def test_both_stages_lower_the_loss_on_a_fixed_batch(run, shards):
    images, captions = fixed_batch(shards)
    pixels = train_base.to_pixels(images)
    kl_weight = train_base.build_parser().get_default("kl_weight")

    def vae_loss(vae):
        with torch.no_grad():
            return train_base.vae_loss(vae.eval(), pixels, kl_weight, torch.Generator().manual_seed(0)).item()

    trained_vae = build_vae(TINY)
    trained_vae.load_state_dict(stage_weights(run, "vae", "vae"))
    torch.manual_seed(0)
    before, after = vae_loss(build_vae(TINY)), vae_loss(trained_vae)
    print(f"vae loss on a fixed batch: {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, (before, after)

    tokenizer = CLIPTokenizer.from_pretrained(run / "model" / "tokenizer")
    tokens = tokenizer(captions, padding="max_length", max_length=TINY.max_length, return_tensors="pt").input_ids
    scale = json.loads((run / "summary.json").read_text())["vae"]["scaling_factor"]
    latents = train_base.encode_latents(trained_vae.eval(), images, 8)[:, 0] * scale
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, 1000, (len(latents),), generator=generator)
    alphas, weights = train_base.loss_weights(training_scheduler(), 5.0, torch.device("cpu"))

    def diffusion_loss(unet, text_encoder):
        with torch.no_grad():
            unet, text_encoder = unet.eval(), text_encoder.eval()
            return train_base.diffusion_loss(unet, text_encoder, latents, tokens, noise, t, alphas, weights).item()

    unet, text_encoder = build_unet(TINY), build_text_encoder(TINY, tokenizer)
    before = diffusion_loss(unet, text_encoder)
    unet.load_state_dict(stage_weights(run, "diffusion", "unet"))
    text_encoder.load_state_dict(stage_weights(run, "diffusion", "text_encoder"))
    after = diffusion_loss(unet, text_encoder)
    print(f"diffusion loss on a fixed batch: {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, (before, after)


def test_decoder_stage_trains_the_decoder_and_keeps_the_latents(run):
    """Stage 3 changes what latents decode to, never the latents the UNet was trained on."""
    autoencoder = stage_weights(run, "vae", "vae")
    saved = AutoencoderKL.from_pretrained(run / "model" / "vae", dtype=torch.float32).state_dict()
    latent_side = [k for k in autoencoder if k.startswith(("encoder.", "quant_conv."))]
    decoder_side = [k for k in autoencoder if k.startswith(("decoder.", "post_quant_conv."))]
    assert len(latent_side) + len(decoder_side) == len(autoencoder)
    assert all(torch.equal(saved[k], autoencoder[k].half().float()) for k in latent_side)
    assert not all(torch.equal(saved[k], autoencoder[k].half().float()) for k in decoder_side)


class Killed(BaseException):  # as SIGKILL: nothing catches it, not even run_cli
    pass


def test_killed_run_resumes_to_the_same_weights(run, shards, tmp_path, monkeypatch, capsys):
    real_save = train_base.save_checkpoint

    def killed_after_first_diffusion_checkpoint(stage, out, step, summary):
        real_save(stage, out, step, summary)
        if stage.name == "diffusion":
            raise Killed

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(train_base, "save_checkpoint", killed_after_first_diffusion_checkpoint)
        with pytest.raises(Killed):
            train_base.main(["--data", str(shards), "--out", str(out), *ARGS])
    [saved] = checkpoint.checkpoints(out / "diffusion")
    assert saved.name == "checkpoint-00000004" and json.loads((saved / "training_state.json").read_text())["step"] == 4
    assert not (out / "model").exists()

    assert train(shards, out) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert train(shards, out, "--resume") == 0
    for name in ("vae/diffusion_pytorch_model", "unet/diffusion_pytorch_model", "text_encoder/model"):
        resumed = load_file(out / "model" / f"{name}.safetensors")
        uninterrupted = load_file(run / "model" / f"{name}.safetensors")
        assert resumed.keys() == uninterrupted.keys()
        differing = {k: (resumed[k].float() - uninterrupted[k].float()).abs().max().item()
                     for k in resumed if not torch.equal(resumed[k], uninterrupted[k])}
        assert not differing, (name, differing)


def test_resolve_model_names_the_bundled_directories(tmp_path, monkeypatch):
    assert resolve_model("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    monkeypatch.setattr(gligen.bundled, "MODELS_DIR", tmp_path)
    with pytest.raises(UserError, match=r"demo adapter model is not bundled .*adapter"):
        resolve_model("demo", "adapter")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text("{}")
    assert resolve_model("demo") == str(tmp_path / "base")
