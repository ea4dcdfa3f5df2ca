"""Train the demo's tiny base text-to-image model from scratch on captioned images (boxes unused).

    python -m gligen.demo.train_base --data SHARDS --out DIR --steps N --batch-size B [--vae-steps M] [--resume]

Stage 1 trains the autoencoder (L1 + L2 reconstruction, a small KL term), on random crops
with `--vae-crop`. Stage 2 freezes it and trains the UNet and the text encoder together
(epsilon prediction with min-SNR weighting, captions dropped 10% of the time for
classifier-free guidance, EMA weights) and writes model/. With `--decoder-steps`, stage 3
then trains the decoder alone on whole images; the latents do not change, so an adapter can
train on model/ while it runs, and model/ is written again with the new decoder.

The data set is small, so it is decoded once into one uint8 tensor on the training device
and batches are drawn from it; stage 2 likewise encodes every image to latents once.
Outputs under DIR:

    model/              the StableDiffusionPipeline directory (EMA weights, safetensors)
    vae/, diffusion/, decoder/    each stage's checkpoints/checkpoint-STEP/ (as `gligen train` writes them:
                        renamed into place when complete, the last 2 kept; resumed from the newest)
    tokenizer/          the run's tokenizer, built from the captions once
    summary.json        sizes, steps, times, losses, held-out reconstruction PSNR
    reconstructions.png held-out images (top) and their VAE reconstructions (bottom)
    samples.png         images the saved pipeline generates for held-out captions
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import EMAModel, compute_snr
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import CLIPTokenizer

from gligen.data.format import read_shards, shard_urls
from gligen.demo.base_model import (
    BaseModelConfig,
    assemble_pipeline,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    training_scheduler,
)
from gligen.draw import make_grid
from gligen.errors import UserError, require, run_cli
from gligen.files import atomic_directory, save_image, write_json
from gligen.training import checkpoint

PRESETS = {"demo": BaseModelConfig(), "tiny": BaseModelConfig.tiny()}
HELD_OUT = 256  # images kept out of training, for the reconstruction score and sample captions
SAMPLE_COUNT = 16


@dataclass
class ImageSet:
    """Decoded training data: `images` (N, S, S, 3) uint8 on the training device, one caption each."""

    images: torch.Tensor
    captions: list[str]

    def split(self, held_out: int) -> tuple[ImageSet, ImageSet]:
        n = len(self.captions) - held_out
        return ImageSet(self.images[:n], self.captions[:n]), ImageSet(self.images[n:], self.captions[n:])


def load_images(source: str, size: int, workers: int) -> ImageSet:
    """Every sample of the shards in `source`, decoded in parallel (one shard per task) and resized to `size`."""
    urls = shard_urls(source)
    for url in urls:
        require("://" in url or url.startswith("pipe:") or Path(url).is_file(), f"--data: shard {url} does not exist")
    sizes = [size] * len(urls)
    if workers > 1 and len(urls) > 1:
        with ProcessPoolExecutor(min(workers, len(urls))) as pool:
            parts = list(tqdm(pool.map(_read_shard, urls, sizes), total=len(urls), desc="decode", unit="shard"))
    else:
        parts = list(tqdm(map(_read_shard, urls, sizes), total=len(urls), desc="decode", unit="shard"))
    captions = [c for _, part in parts for c in part]
    require(len(captions) > HELD_OUT // 8, f"{source}: {len(captions)} samples is too few to train on")
    return ImageSet(torch.from_numpy(np.concatenate([images for images, _ in parts])), captions)


def _read_shard(url: str, size: int) -> tuple[np.ndarray, list[str]]:
    images, captions = [], []
    for sample in read_shards([url]):
        image = sample.image
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        images.append(np.asarray(image))
        captions.append(sample.caption)
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), captions


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, S, S) in [-1, 1] -> PIL images."""
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


# --- one training stage: schedule, resume, progress, checkpoints -------------------------------------

CALIBRATION = (10, 60)  # steps after a (re)start between which a time budget measures the step time


@dataclass
class Plan:
    """A stage's length and learning-rate shape: linear warmup, then cosine decay to zero at `steps`.

    With `minutes`, `steps` is an upper bound that `fit_to_budget` lowers once the step time is known.
    """

    steps: int
    warmup: int
    minutes: float | None = None

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    def fit_to_budget(self, done: int, step_seconds: float, elapsed: float) -> None:
        """As many steps as fit in what is left of `minutes` at `step_seconds` each (fitted once)."""
        remaining = self.minutes * 60 - elapsed
        self.steps = max(done, min(self.steps, done + int(remaining / step_seconds)))
        self.minutes = None


class Stage:
    """What a stage trains: named modules (and an EMA of them), with AdamW and the `plan`'s lr schedule."""

    def __init__(self, name: str, modules: dict[str, nn.Module], lr: float, plan: Plan, ema_decay: float | None = None):
        self.name, self.modules, self.plan = name, modules, plan
        self.optimizer = torch.optim.AdamW(
            self.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01, fused=self.device.type == "cuda"
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, plan.lr_factor)
        self.ema = EMAModel(self.parameters(), ema_decay, use_ema_warmup=True, foreach=True) if ema_decay else None

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]

    @property
    def device(self) -> torch.device:
        return self.parameters()[0].device

    def save(self, directory: Path, step: int, summary: dict) -> None:
        """Everything a resume needs, into `directory`: weights, EMA and RNG as safetensors, the optimizer
        (plain tensors, read back weights-only) and the step, summary, plan and lr schedule as JSON."""
        tensors = {f"{name}.{key}": value for name, module in self.modules.items()
                   for key, value in module.state_dict().items()}
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors.update({f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
        ema = {}
        if self.ema is not None:
            ema = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
            tensors.update({f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)})
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, directory / "state.safetensors")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        write_json(directory / "training_state.json", {
            "step": step, "summary": summary, "plan": vars(self.plan), "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": ema,
        })

    def load(self, directory: Path) -> tuple[int, dict]:
        """Restore what `save` wrote; returns the step and the summary so far."""
        tensors = load_file(directory / "state.safetensors")
        for name, module in self.modules.items():
            module.load_state_dict({k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")})
        state = json.loads((directory / "training_state.json").read_text())
        vars(self.plan).update(state["plan"])
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(tensors["rng.cpu"])
        if torch.cuda.is_available() and "rng.cuda.0" in tensors:
            torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])
        if self.ema is not None:
            shadow = [tensors[f"ema.{i}"].to(self.device, copy=True) for i in range(len(self.ema.shadow_params))]
            self.ema.load_state_dict({**state["ema"], "shadow_params": shadow})
        return state["step"], state["summary"]


def save_checkpoint(stage: Stage, out: Path, step: int, summary: dict) -> None:
    """`OUT/<stage>/checkpoints/checkpoint-<step>/`, renamed into place when complete; the last 2 are kept."""
    with atomic_directory(checkpoint.checkpoint_dir(out / stage.name, step), replace=True) as tmp:
        stage.save(tmp, step, summary)
    checkpoint.prune(out / stage.name, keep=2)


def run_stage(stage: Stage, loss_fn: Callable[[], torch.Tensor], args: argparse.Namespace,
              steps: int | None = None) -> dict:
    """Train `stage` to the end of its plan, resuming from its checkpoint; returns the stage summary.

    Summary: `loss` (mean over the last `--log-every` steps), `seconds` (training time over all
    runs), `steps_per_s`, `steps`. A checkpoint (`save_checkpoint`) is written every
    `--checkpoint-every` steps and at the end; a finished stage is loaded and skipped.
    `steps`, when given, is the stage's length even on resume: a finished stage given more steps
    trains on, its cosine decay taken up where the longer plan puts it.
    """
    out = Path(args.out)
    start, summary = 0, {"loss": None, "seconds": 0.0, "steps_per_s": None}
    found = checkpoint.latest(out / stage.name)
    if found is not None:
        start, summary = stage.load(found)
    if steps is not None:
        stage.plan.steps = steps
    for module in stage.modules.values():
        module.train()
    device = stage.device
    recent: list[torch.Tensor] = []  # losses kept on the device, read every `log_every` steps (no sync per step)
    progress = tqdm(initial=start, total=stage.plan.steps, desc=stage.name, unit="step")
    begin, seconds_before, marks = time.perf_counter(), summary["seconds"], {}
    done = start
    while done < stage.plan.steps:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn()
        stage.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.parameters(), 1.0)
        stage.optimizer.step()
        stage.lr_scheduler.step()
        if stage.ema is not None:
            stage.ema.step(stage.parameters())
        recent.append(loss.detach())
        done += 1
        progress.update()
        if stage.plan.minutes is not None and done - start in CALIBRATION:
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks[done - start] = time.perf_counter()
            if len(marks) == 2:
                step_seconds = (marks[CALIBRATION[1]] - marks[CALIBRATION[0]]) / (CALIBRATION[1] - CALIBRATION[0])
                stage.plan.fit_to_budget(done, step_seconds, seconds_before + marks[CALIBRATION[1]] - begin)
                progress.total = stage.plan.steps
        if done % args.log_every == 0 or done == stage.plan.steps:
            summary["loss"] = torch.stack(recent).float().mean().item()
            recent.clear()
            progress.set_postfix(loss=f"{summary['loss']:.4f}", lr=f"{stage.lr_scheduler.get_last_lr()[0]:.2e}")
        if done % args.checkpoint_every == 0 or done == stage.plan.steps:
            summary.update(seconds=seconds_before + time.perf_counter() - begin, steps=done)
            summary["steps_per_s"] = done / summary["seconds"]
            save_checkpoint(stage, out, done, summary)
    progress.close()
    return summary


def random_batch(n: int, batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, n, (batch_size,), device=device)


# --- stage 1: the autoencoder ------------------------------------------------------------------------


def vae_loss(
    vae: nn.Module, x: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """L1 + L2 reconstruction per pixel + `kl_weight` x KL per latent element; `x` (B, 3, S, S) in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample.float()
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x) + kl_weight * kl


def train_vae(vae: AutoencoderKL, data: ImageSet, args: argparse.Namespace) -> dict:
    """Minimise `vae_loss` on random batches of `data`, cropped to `--vae-crop` pixels.

    The autoencoder is convolutional, so it trains on crops and runs on whole images: a 32 px
    crop of a 64 px image costs a quarter of a step on the whole image.
    """
    device = data.images.device
    stage = Stage("vae", {"vae": vae}, args.vae_lr, Plan(args.vae_steps, min(args.warmup, args.vae_steps // 10) or 1))
    loss = _compiled(vae_loss, args)

    size = data.images.shape[1]
    crop = args.vae_crop or size
    require(8 <= crop <= size, f"--vae-crop must be between 8 and the image size {size}, got {crop}")

    def loss_fn() -> torch.Tensor:
        images = data.images[random_batch(len(data.captions), args.batch_size, device)]
        y, x = torch.randint(0, size - crop + 1, (2,)).tolist()  # one crop corner per batch: a batch is one tensor
        return loss(vae, to_pixels(images[:, y:y + crop, x:x + crop]), args.kl_weight)

    return run_stage(stage, loss_fn, args, steps=args.vae_steps)


def train_decoder(vae: AutoencoderKL, data: ImageSet, args: argparse.Namespace) -> dict:
    """Minimise the reconstruction loss of the decoder alone on whole images, the encoder frozen.

    The latents the diffusion model learns are the encoder's, so this stage changes none of them:
    it only sharpens what whole images decode to after the autoencoder trained on crops, and
    anything trained on the latents (the UNet, an adapter) stays valid.
    """
    device = data.images.device
    vae.requires_grad_(False)
    modules = {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}
    for module in modules.values():
        module.requires_grad_(True)
    warmup = min(args.warmup, args.decoder_steps // 10) or 1
    stage = Stage("decoder", modules, args.vae_lr, Plan(args.decoder_steps, warmup))
    loss = _compiled(vae_loss, args)

    def loss_fn() -> torch.Tensor:
        return loss(vae, to_pixels(data.images[random_batch(len(data.captions), args.batch_size, device)]), 0.0)

    summary = run_stage(stage, loss_fn, args, steps=args.decoder_steps)
    vae.requires_grad_(False).eval()
    return summary


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Posterior mean and std of every image: (N, S, S, 3) uint8 -> (N, 2, C, h, w) float32."""
    out = []
    for chunk in images.split(batch_size):
        dist = vae.encode(to_pixels(chunk)).latent_dist
        out.append(torch.stack([dist.mean, dist.std], 1).float())
    return torch.cat(out)


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor) -> tuple[float, Image.Image]:
    """Mean PSNR (dB, images in [0, 1]) of decoding the posterior means; a grid of originals over reconstructions."""
    x = to_pixels(images)
    reconstruction = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((reconstruction - x) / 2).pow(2).flatten(1).mean(1)
    n = min(SAMPLE_COUNT, len(x))
    return (-10 * torch.log10(mse)).mean().item(), make_grid(to_pil(x[:n]) + to_pil(reconstruction[:n]), n)


# --- stage 2: UNet + text encoder ----------------------------------------------------------------


def loss_weights(
    scheduler: DDPMScheduler, snr_gamma: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per timestep: alpha-bar (T,) and the min-SNR-gamma loss weight for epsilon prediction (T,)."""
    snr = compute_snr(scheduler, torch.arange(scheduler.config.num_train_timesteps))
    return scheduler.alphas_cumprod.to(device), (snr.clamp(max=snr_gamma) / snr).to(device)


def diffusion_loss(
    unet: nn.Module, text_encoder: nn.Module, latents: torch.Tensor, tokens: torch.Tensor, noise: torch.Tensor,
    t: torch.Tensor, alphas: torch.Tensor, weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted epsilon-prediction error: latents and noise (B, C, h, w), tokens (B, L) ids, t (B,) timesteps."""
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # the scheduler's add_noise, tables kept on the device
    prediction = unet(noisy, t, text_encoder(tokens)[0]).sample.float()
    return (weights[t] * (prediction - noise).pow(2).mean((1, 2, 3))).mean()


def train_diffusion(
    vae: AutoencoderKL, tokenizer: CLIPTokenizer, config: BaseModelConfig, data: ImageSet, args: argparse.Namespace
) -> tuple[nn.Module, nn.Module, dict]:
    """Minimise `diffusion_loss` of UNet and text encoder on the frozen VAE's latents of `data`.

    Returns them with their EMA weights loaded, and the stage summary.
    """
    device = data.images.device
    torch.manual_seed(args.seed + 1)
    unet, text_encoder = build_unet(config).to(device), build_text_encoder(config, tokenizer).to(device)
    scheduler = training_scheduler()
    moments = encode_latents(vae.eval(), data.images, 4 * args.batch_size)
    scale = vae.config.scaling_factor
    ids = tokenizer(data.captions, padding="max_length", max_length=config.max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    empty = tokenizer("", padding="max_length", max_length=config.max_length, return_tensors="pt").input_ids.to(device)
    alphas, weights = loss_weights(scheduler, args.snr_gamma, device)

    plan = Plan(args.steps, min(args.warmup, args.steps // 10) or 1, args.minutes)
    stage = Stage("diffusion", {"unet": unet, "text_encoder": text_encoder}, args.lr, plan, args.ema_decay)
    loss = _compiled(diffusion_loss, args)

    def loss_fn() -> torch.Tensor:
        index = random_batch(len(data.captions), args.batch_size, device)
        mean, std = moments[index].unbind(1)
        dropped = torch.rand(len(index), device=device) < args.caption_dropout
        tokens = torch.where(dropped[:, None], empty, ids[index])
        latents = (mean + std * torch.randn_like(std)) * scale
        t = torch.randint(0, len(weights), (len(index),), device=device)
        return loss(unet, text_encoder, latents, tokens, torch.randn_like(latents), t, alphas, weights)

    summary = run_stage(stage, loss_fn, args, steps=args.steps if args.minutes is None else None)
    stage.ema.copy_to(stage.parameters())
    return unet.eval(), text_encoder.eval(), summary


def fit_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch_size: int) -> float:
    """1 / std of sampled latents, so the diffusion model sees unit-variance latents (SD's 0.18215 rule).

    Computed without sampling (variance of the means + mean posterior variance), so a resumed run gets the same value.
    """
    mean, std = encode_latents(vae.eval(), images[: 8 * batch_size], batch_size).unbind(1)
    return 1.0 / (mean.var() + std.pow(2).mean()).sqrt().item()


def _compiled(loss: Callable[..., torch.Tensor], args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    """`loss` (networks' forward passes included) compiled with `--compile MODE`, else itself."""
    return torch.compile(loss, mode=args.compile) if args.compile else loss


# --- the whole run ----------------------------------------------------------------------------


def train(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if (out / "tokenizer").is_dir() and not args.resume:
        raise UserError(f"{out} holds a previous run; pass --resume to continue it or use an empty --out")
    require(args.steps >= 1 and args.vae_steps >= 1 and args.batch_size >= 1 and args.decoder_steps >= 0,
            "--steps, --vae-steps and --batch-size must be at least 1, --decoder-steps at least 0")
    config = PRESETS[args.preset]
    data = load_images(args.data, config.image_size, args.workers)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    train_set, held_out = ImageSet(data.images.to(device), data.captions).split(min(HELD_OUT, len(data.captions) // 8))
    tokenizer = _tokenizer(out / "tokenizer", train_set.captions, config.max_length)

    torch.manual_seed(args.seed)
    vae = build_vae(config).to(device)
    vae_summary = train_vae(vae, train_set, args)
    vae.requires_grad_(False).eval()
    scale = fit_scaling_factor(vae, train_set.images, args.batch_size)
    vae.register_to_config(scaling_factor=scale)
    vae_summary.update(scaling_factor=scale, held_out_psnr_db=reconstruction_psnr(vae, held_out.images)[0])

    unet, text_encoder, diffusion_summary = train_diffusion(vae, tokenizer, config, train_set, args)
    model_dir = out / "model"
    save_pipeline(assemble_pipeline(vae, text_encoder, tokenizer, unet), model_dir, args.save_dtype)
    decoder_summary = None
    if args.decoder_steps:  # model/ already holds the UNet an adapter trains on: that can start now
        decoder_summary = train_decoder(vae, train_set, args)
        save_pipeline(assemble_pipeline(vae, text_encoder, tokenizer, unet), model_dir, args.save_dtype)
    psnr, reconstructions = reconstruction_psnr(vae, held_out.images)
    save_image(out / "reconstructions.png", reconstructions)
    samples = sample_grid(model_dir, held_out.captions[:SAMPLE_COUNT], config, device, args.seed)
    save_image(out / "samples.png", samples)
    write_json(out / "summary.json", {
        "command": " ".join(["python -m gligen.demo.train_base"] + sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": config.to_dict(), "train_images": len(train_set.captions), "held_out_images": len(held_out.captions),
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in
                       (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))},
        "model_bytes": sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()),
        "vae": vae_summary,
        "diffusion": diffusion_summary,
        "decoder": decoder_summary and dict(decoder_summary, held_out_psnr_db=psnr),
        "batch_size": args.batch_size,
    })
    print(f"saved the pipeline to {model_dir} (held-out VAE PSNR {psnr:.1f} dB)")


def _tokenizer(directory: Path, captions: list[str], max_length: int) -> CLIPTokenizer:
    """The run's tokenizer: built from the captions once and kept, so a resumed run uses the same one."""
    if directory.is_dir():
        return CLIPTokenizer.from_pretrained(directory)
    tokenizer = build_tokenizer(captions, max_length)
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_pipeline(pipeline: StableDiffusionPipeline, directory: Path, dtype: str) -> None:
    """Save the pipeline in `dtype` safetensors, replacing `directory` only once it is complete."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    networks = (pipeline.vae, pipeline.text_encoder, pipeline.unet)
    for network in networks:
        network.half() if dtype == "fp16" else network.float()
    pipeline.save_pretrained(tmp, safe_serialization=True)
    for network in networks:
        network.float()
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def sample_grid(model_dir: Path, captions: list[str], config: BaseModelConfig, device: torch.device,
                seed: int) -> Image.Image:
    """Images the saved pipeline, loaded back from disk, generates for `captions` (25 DDIM steps, guidance 4)."""
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32).to(device)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(captions, height=config.image_size, width=config.image_size, num_inference_steps=25,
                      guidance_scale=4.0, generator=torch.Generator(device).manual_seed(seed)).images
    return make_grid(images, min(len(images), 8))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gligen.demo.train_base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="shards: a directory of .tar files, a brace pattern or a URL")
    parser.add_argument("--out", required=True, help="output directory (model/, the stages' checkpoints, summary.json, ...)")
    parser.add_argument("--steps", type=int, required=True, help="UNet + text encoder training steps")
    parser.add_argument("--minutes", type=float, default=None,
                        help="time budget of the UNet stage: as many steps as fit (at most --steps), measured early on")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--vae-steps", type=int, default=2000, help="autoencoder training steps")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="network sizes (demo: the bundled model, tiny: tests)")
    parser.add_argument("--lr", type=float, default=5e-4, help="UNet + text encoder peak learning rate")
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-crop", type=int, default=None, help="train the autoencoder on random crops of this side")
    parser.add_argument("--decoder-steps", type=int, default=0,
                        help="then train the decoder alone on whole images, the encoder (so the latents) frozen")
    parser.add_argument("--warmup", type=int, default=500, help="warmup steps (at most a tenth of each stage)")
    parser.add_argument("--kl-weight", type=float, default=1e-4, help="KL weight per latent element")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="classifier-free guidance dropout")
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR loss weighting gamma")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--save-dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="torch.compile the networks (MODE: default, reduce-overhead, max-autotune)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes decoding shards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.set_defaults(func=train)
    return parser


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(build_parser(), argv))


if __name__ == "__main__":
    main()
