"""The training loop: a grounding adapter on a frozen Stable Diffusion base (1.x, 2.x, XL), with accelerate.

Only the adapter trains (position net, fusers, and in inpainting mode the extra input
channels); the VAE, text encoder(s) and UNet are frozen and may be cast to bf16/fp16. A step:

    latents = VAE(crop) ; t, noise ~ U, N ; x_t = add_noise(latents, noise, t)
    grounding tokens = position_net(boxes, phrase embeddings)   (null for 10% of samples)
    loss = || UNet(x_t [, masked latents, mask], t, caption embeddings, tokens) - noise ||^2

On SDXL the UNet also gets the caption's pooled embedding and the time ids of the crop:
the image's original size, the crop's top-left corner and the training resolution.

Randomness of a step (timesteps, noise, VAE sampling, grounding drop) comes from one
generator per process that is saved in checkpoints, and the data stream is a pure function
of its position (see `dataset.py`): a run stopped and resumed from a checkpoint ends with
the same weights as a run that never stopped.

Output directory:
    checkpoints/checkpoint-00005000/  adapter/ (the adapter to generate with), training state
    adapter/                          the final adapter (`gligen generate --adapter DIR/adapter`)
    validation/step-00005000.png      validation grids
    logs/                             metrics.jsonl, and TensorBoard events when tensorboard is installed
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from gligen.adapter import GroundingAdapter
from gligen.devices import launched_processes
from gligen.draw import draw_boxes, make_grid
from gligen.errors import UserError
from gligen.files import atomic_path, save_image, write_json
from gligen.grounding import GroundingInputs, encode_images, scatter_embeds
from gligen.layout import load_layouts
from gligen.pipeline import (
    SDXL_COMPONENTS,
    GligenPipeline,
    box_mask,
    is_sdxl,
    keep_sdxl_vae_in_fp32,
    load_component,
    model_index,
)
from gligen.prompts import PromptEmbeds, PromptEncoder, time_ids
from gligen.training.cache import EncodingCache
from gligen.training.config import TrainConfig
from gligen.training.dataset import DataPosition, ShardDataset

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


class TrainingStopped(UserError):
    """The run cannot go on (too many non-finite losses in a row)."""


class GroundedUNet(nn.Module):
    """The frozen UNet with the adapter attached: the one module accelerate wraps and trains.

    forward: model input (B, C, h, w), timesteps (B,), prompt embeddings, grounding inputs,
    SDXL's time ids (B, 6) -> the UNet's prediction (B, 4, h, w).
    """

    def __init__(self, unet: UNet2DConditionModel, adapter: GroundingAdapter):
        super().__init__()
        self.unet = unet
        self.adapter = adapter
        adapter.attach(unet)

    def forward(self, sample, timesteps, prompt: PromptEmbeds, grounding: GroundingInputs,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.adapter.tokens(grounding)
        kwargs = self.adapter.cross_attention_kwargs(tokens, 1.0)
        return self.unet(sample, timesteps, cross_attention_kwargs=kwargs, **prompt.unet_kwargs(time_ids)).sample


def load_base(config: TrainConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The frozen base components in `dtype` (and the CLIP image encoder for text-image-box) from `model.base`.

    An SDXL base adds `text_encoder_2` and `tokenizer_2`.
    """
    base, revision = config.model.base, config.model.revision
    try:
        index = model_index(base, revision)
        names = ["tokenizer", "text_encoder", "vae", "unet"] + (SDXL_COMPONENTS if is_sdxl(index) else [])
        parts = {name: load_component(base, index, name, dtype, revision) for name in names}
        parts["noise_scheduler"] = DDPMScheduler.from_pretrained(base, subfolder="scheduler", revision=revision)
    except UserError as error:
        raise UserError(f"config key model.base: {error}") from None
    except (OSError, ValueError) as error:
        raise UserError(f"config key model.base: {base}: cannot load the scheduler ({str(error).splitlines()[0]})"
                        ) from None
    if config.model.feature_type == "text-image-box":
        projection, encoder, processor = load_image_side(config.model.image_encoder)
        parts.update(image_projection=projection, image_encoder=encoder, image_processor=processor)
    return parts


def load_image_side(name: str) -> tuple[nn.Linear, nn.Module, Any]:
    """The reference-image projection, CLIP vision encoder and image processor of a full CLIP model.

    The projection is CLIP's transposed text projection, so `name` must be a full CLIP model
    (CLIPModel: its tower configs need not repeat `projection_dim`). A vision-only directory is
    refused: transformers would build its "text projection" from random weights without an error.
    """
    from transformers import AutoConfig

    from gligen.convert import clip_image_side

    try:
        model_type = AutoConfig.from_pretrained(name).model_type
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"model.image_encoder {name!r}: cannot load a CLIP model ({reason})") from None
    if model_type != "clip":
        raise UserError(
            f"model.image_encoder {name!r} is a {model_type} model; text-image-box training needs a full CLIP "
            f"model (vision encoder and text projection), such as openai/clip-vit-large-patch14"
        )
    return clip_image_side(name)


def prompt_encoder(parts: dict[str, Any]) -> PromptEncoder:
    """The base's text side: one tokenizer and text encoder, or SDXL's two."""
    return PromptEncoder(parts["tokenizer"], parts["text_encoder"], parts.get("tokenizer_2"), parts.get("text_encoder_2"))


def make_adapter(config: TrainConfig, parts: dict[str, Any]) -> GroundingAdapter:
    """A fresh adapter for the base UNet (zero gates), or the one named by `model.adapter`."""
    unet = parts["unet"]
    if config.model.adapter:
        adapter = GroundingAdapter.from_pretrained(config.model.adapter)
        adapter.check_fits(unet)
        return adapter
    image_dim = parts["image_encoder"].config.projection_dim if "image_encoder" in parts else None
    adapter = GroundingAdapter.for_unet(
        unet, config.model.feature_type, positive_len=prompt_encoder(parts).phrase_dim,
        inpaint=config.model.inpaint, image_embed_dim=image_dim, base_model=config.model.base,
    )
    if adapter.image_projection is not None:
        # image embeddings are mapped back into the text space by the transposed CLIP text projection
        projection = parts["image_projection"].weight
        if projection.shape != adapter.image_projection.weight.shape:
            raise UserError(
                f"model.image_encoder {config.model.image_encoder!r}: its text projection maps to "
                f"{projection.shape[0]} dims, but the base's text encoder has {adapter.config.positive_len}"
            )
        adapter.image_projection.weight.data.copy_(projection)
    return adapter


class Trainer:
    """`Trainer(config).train()` -> the directory of the final adapter."""

    def __init__(self, config: TrainConfig, parts: dict[str, Any] | None = None):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.log_to_tensorboard = importlib.util.find_spec("tensorboard") is not None
        # without CUDA, launched processes join (over gloo) only when told that they run on CPUs
        launched = launched_processes()
        self.accelerator = Accelerator(
            cpu=launched > 1 and not torch.cuda.is_available(),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with="tensorboard" if self.log_to_tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        if launched > 1 and self.accelerator.num_processes == 1:
            raise UserError(f"{launched} processes were launched but did not join (each would train alone and "
                            "write the same checkpoints); check the accelerate launch configuration")
        set_seed(config.seed)  # the fresh adapter's initialisation
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
        parts = parts or load_base(config, self.weight_dtype)
        self.parts = parts
        self.device = self.accelerator.device
        self.prompts = prompt_encoder(parts)
        for name in ("vae", "text_encoder", "text_encoder_2", "unet", "image_encoder"):
            if name in parts:
                module = parts[name].requires_grad_(False).eval().to(self.device)
                if module.dtype != self.weight_dtype:  # diffusers warns on every cast, needed or not
                    module.to(self.weight_dtype)
        if self.prompts.is_sdxl:
            keep_sdxl_vae_in_fp32(parts["vae"], self.weight_dtype)
        self.noise_scheduler = parts["noise_scheduler"]

        self.adapter = make_adapter(config, parts).to(self.device)
        unet = parts["unet"]
        self.model = GroundedUNet(unet, self.adapter)
        self._set_attention(unet)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()  # gradient checkpointing only acts in training mode; SD UNets have no dropout

        named = [(n, p) for n, p in self.adapter.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in named]
        gates = [p for n, p in named if n.rsplit(".", 1)[-1] in ("alpha_attn", "alpha_dense")]
        others = [p for n, p in named if n.rsplit(".", 1)[-1] not in ("alpha_attn", "alpha_dense")]
        optimizer = torch.optim.AdamW(
            [{"params": others}, {"params": gates, "lr": config.optim.lr * config.optim.gate_lr_scale}],
            lr=config.optim.lr, betas=tuple(config.optim.betas), weight_decay=config.optim.weight_decay,
        )
        # stepped by us once per update (accelerate would step it once per process)
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup" if config.optim.lr_schedule == "constant" else "cosine",
            optimizer, num_warmup_steps=config.optim.warmup_steps, num_training_steps=config.max_steps,
        )
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.ema = EMAModel(self.trainable, decay=config.ema_decay) if config.ema_decay else None
        self.accelerator.register_save_state_pre_hook(self._save_adapter_hook)
        self.accelerator.register_load_state_pre_hook(self._load_adapter_hook)

        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.accelerator.process_index)
        self.step = 0
        self.bad_in_a_row = 0
        self.positions: dict[int, DataPosition] = {}
        self.cache = None
        if config.cache_dir:
            # the encoders run in weight_dtype: entries made in bf16 must not feed an fp32 run
            namespace = f"{config.model.base}@{config.model.revision}/{self.weight_dtype}"
            self.cache = {kind: EncodingCache(config.cache_dir, f"{namespace}/{kind}") for kind in ("latents", "text", "phrases")}
        self.metrics_path = self.output_dir / "logs" / "metrics.jsonl"
        # read now, so that a bad layout file fails the run at once rather than at the first validation
        self.validation_layouts = load_layouts(config.validation.layouts) if config.validation.layouts else []
        self.gain_batch = None
        if config.validation.grounding_gain_samples:  # a fixed batch, from another seed than training's
            with_references = self.adapter.config.feature_type == "text-image-box"
            gain_data = ShardDataset(config.data, config.validation.grounding_gain_samples, config.seed + 1,
                                     with_references=with_references)
            self.gain_batch = next(iter(gain_data))

    # --- set-up ---

    def _set_attention(self, unet: UNet2DConditionModel) -> None:
        """Attention kernel for the whole UNet, fusers included (they are attached by now)."""
        if self.config.attention == "xformers":
            try:
                unet.enable_xformers_memory_efficient_attention()
            except (ImportError, ModuleNotFoundError, ValueError) as error:
                raise UserError(f"config key attention: xformers is not usable here ({error})") from None
        else:
            unet.set_attn_processor(AttnProcessor2_0() if self.config.attention == "sdpa" else AttnProcessor())

    # --- one step ---

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator).to(self.device)

    def _encode(self, kind: str, keys: list[str], fn) -> tuple[torch.Tensor, ...]:
        """fn(indices) -> a tuple of tensors for those keys; through the cache when there is one."""
        if self.cache:
            return self.cache[kind].encode(keys, fn, self.device)
        return fn(list(range(len(keys))))

    def encode_latents(self, pixels: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """Pixels (B,3,R,R) in [-1,1] -> scaled latents (B,4,R/f,R/f), sampled from the VAE posterior."""
        vae = self.parts["vae"]

        @torch.no_grad()
        def moments(indices: list[int]) -> tuple[torch.Tensor]:
            return (vae.encode(pixels[indices].to(self.device, vae.dtype)).latent_dist.parameters,)

        params, = self._encode("latents", keys, moments)
        latents = DiagonalGaussianDistribution(params.float()).sample(generator=self.generator)
        return latents * vae.config.scaling_factor

    def encode_captions(self, captions: list[str]) -> PromptEmbeds:
        """Captions -> prompt embeddings: hidden states (B, 77, D) (and SDXL's pooled embeddings)."""
        def encode(indices: list[int]) -> tuple[torch.Tensor, ...]:
            embeds = self.prompts.prompts([captions[i] for i in indices])
            return (embeds.hidden,) if embeds.pooled is None else (embeds.hidden, embeds.pooled)

        return PromptEmbeds(*self._encode("text", captions, encode))

    def encode_phrase_list(self, phrases: list[str]) -> torch.Tensor:
        """Phrases -> pooled phrase embeddings (P, D)."""
        if not phrases:
            return self.prompts.phrases([])
        embeds, = self._encode("phrases", phrases, lambda indices: (self.prompts.phrases([phrases[i] for i in indices]),))
        return embeds

    def grounding_inputs(self, batch: dict[str, Any], grounding_drop: float | None = None) -> GroundingInputs:
        """The batch's grounding, each sample dropped to null (masks 0) with probability `grounding_drop`
        (the config's by default)."""
        n = self.config.data.max_entities
        counts = [len(p) for p in batch["phrases"]]
        phrase_embeds = scatter_embeds(self.encode_phrase_list([p for ps in batch["phrases"] for p in ps]), counts, n)
        drop = self.config.grounding_drop if grounding_drop is None else grounding_drop
        keep = (self._rand(len(counts)) >= drop).float()
        masks = batch["masks"].to(self.device) * keep[:, None]
        image_embeds = image_masks = None
        if self.adapter.config.feature_type == "text-image-box":
            references = [image for images in batch["references"] for image in images]
            if references:
                # autocast: the projection is the adapter's (fp32), the frozen encoder may be bf16 / fp16
                with torch.no_grad(), self.accelerator.autocast():
                    embeds = encode_images(self.parts["image_encoder"], self.parts["image_processor"],
                                           self.adapter.image_projection, references)
            else:
                embeds = phrase_embeds.new_zeros(0, phrase_embeds.shape[-1])
            image_embeds, image_masks = scatter_embeds(embeds, counts, n), masks
        return GroundingInputs(batch["boxes"].to(self.device), masks, phrase_embeds, image_embeds, image_masks)

    def loss(self, batch: dict[str, Any], grounding_drop: float | None = None) -> torch.Tensor:
        """The denoising loss of one batch (a scalar)."""
        latents = self.encode_latents(batch["pixels"], batch["cache_keys"])
        bsz = latents.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), generator=self.generator)
        timesteps = timesteps.to(self.device)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        model_input = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.adapter.conv_in_extra is not None:
            model_input = torch.cat([model_input, *box_inpaint_input(latents, batch["boxes"], batch["masks"])], dim=1)
        text = self.encode_captions(batch["captions"])
        grounding = self.grounding_inputs(batch, grounding_drop)
        ids = None
        if self.prompts.is_sdxl:
            resolution = self.config.data.resolution
            ids = time_ids(batch["original_sizes"], batch["crops_top_left"], (resolution, resolution)).to(self.device)
        with self.accelerator.autocast():
            prediction = self.model(model_input.to(self.weight_dtype), timesteps, text, grounding, ids)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float())

    # --- the loop ---

    def train(self) -> Path:
        """Train to `max_steps` (resuming from the latest checkpoint) and export the adapter."""
        config, accelerator = self.config, self.accelerator
        self.resume()
        if self.log_to_tensorboard:
            accelerator.init_trackers("gligen", config=_flat(asdict(config)))
        elif accelerator.is_main_process:
            logger.warning("tensorboard is not installed: logging metrics to %s only", self.metrics_path)
        dataset = ShardDataset(
            config.data, config.batch_size, config.seed, accelerator.process_index, accelerator.num_processes,
            self.positions, with_references=self.adapter.config.feature_type == "text-image-box",
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=config.data.num_workers)
        bar = tqdm(total=config.max_steps, initial=self.step, desc="training", unit="step",
                   disable=not accelerator.is_local_main_process)
        window = {"loss": 0.0, "good": 0, "bad": 0, "grad_norm": 0.0, "start": time.perf_counter(), "images": 0}
        window_bad = False
        for batch in loader:
            if self.step >= config.max_steps:
                break
            position = batch["position"]
            self.positions[position["worker"]] = DataPosition(**{k: v for k, v in position.items() if k != "worker"})
            with accelerator.accumulate(self.model):
                loss = self.loss(batch)
                finite = bool(accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all())
                if finite:
                    accelerator.backward(loss)
                    window["loss"] += loss.item()
                else:
                    window_bad = True
                window["images"] += len(batch["captions"]) * accelerator.num_processes
                if accelerator.sync_gradients:
                    if window_bad:
                        self._bad_step(loss.item(), bar)
                        window["bad"] += 1
                    else:
                        window["grad_norm"] += float(accelerator.clip_grad_norm_(self.model.parameters(), config.optim.max_grad_norm))
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        if self.ema:
                            self.ema.step(self.trainable)
                        self.step += 1
                        self.bad_in_a_row = 0
                        window["good"] += 1
                        bar.update(1)
                        self._after_step(window, bar)
                    self.optimizer.zero_grad(set_to_none=True)
                    window_bad = False
        bar.close()
        if self.step and not (self._checkpoint_dir(self.step)).is_dir():
            self.save_checkpoint()
        out = self.output_dir / "adapter"
        if accelerator.is_main_process:
            self.inference_adapter().save_pretrained(out)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return out

    def _bad_step(self, value: float, bar: tqdm) -> None:
        self.bad_in_a_row += 1
        limit = self.config.max_bad_steps_in_a_row
        if self.accelerator.is_main_process:
            bar.write(f"step {self.step + 1}: loss is {value}; skipping the update ({self.bad_in_a_row} in a row, stop at {limit})")
        if self.bad_in_a_row >= limit:
            raise TrainingStopped(
                f"{limit} non-finite losses in a row at step {self.step + 1} (max_bad_steps_in_a_row); "
                f"stopping. Lower optim.lr or try mixed_precision=bf16, then resume from the last checkpoint"
            )

    def _after_step(self, window: dict, bar: tqdm) -> None:
        """Progress bar, logs, checkpoints and validation once per update."""
        config = self.config
        bar.set_postfix(loss=f"{window['loss'] / (window['good'] * config.gradient_accumulation_steps):.4f}", refresh=False)
        if self.step % config.log_every == 0:
            elapsed = time.perf_counter() - window["start"]
            self.log({
                "loss": window["loss"] / (window["good"] * config.gradient_accumulation_steps),
                "lr": self.lr_scheduler.get_last_lr()[0],
                "grad_norm": window["grad_norm"] / window["good"],
                "images_per_s": window["images"] / elapsed,
                "steps_per_s": (window["good"] + window["bad"]) / elapsed,
                "skipped_samples": self.skipped_samples(),
                "bad_steps": window["bad"],
            })
            window.update(loss=0.0, good=0, bad=0, grad_norm=0.0, images=0, start=time.perf_counter())
        if self.step % config.checkpoint_every == 0:
            self.save_checkpoint()
        if config.validation.every and self.step % config.validation.every == 0:
            if self.gain_batch is not None:
                self.log(self.grounding_gain())
            if self.validation_layouts:
                self.validate()

    def skipped_samples(self) -> int:
        """Corrupt samples skipped so far by all readers of all processes."""
        mine = torch.tensor([sum(p.skipped for p in self.positions.values())], device=self.device)
        return int(self.accelerator.reduce(mine, "sum").item())

    def log(self, metrics: dict[str, float]) -> None:
        if self.log_to_tensorboard:
            self.accelerator.log(metrics, step=self.step)
        if self.accelerator.is_main_process:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")

    # --- validation ---

    def grounding_gain(self) -> dict[str, float]:
        """The denoising loss of the fixed validation batch with its grounding and with none (null tokens).

        Both with the same noise and timesteps, from a generator of their own (training's goes on
        untouched), and the trained (not EMA) adapter. `grounding_gain` = 1 - grounded / ungrounded:
        0 while the gates are closed, above 0 once the adapter uses the boxes. Every process
        computes it (a model wrapped for several processes is called by all of them).
        """
        training_generator = self.generator
        losses = {}
        try:
            for name, drop in (("loss_grounded", 0.0), ("loss_ungrounded", 1.0)):
                self.generator = torch.Generator().manual_seed(self.config.seed)
                with torch.no_grad():
                    losses[name] = self.loss(self.gain_batch, grounding_drop=drop).item()
        finally:
            self.generator = training_generator
        return {**losses, "grounding_gain": 1 - losses["loss_grounded"] / losses["loss_ungrounded"]}

    @torch.no_grad()
    def validate(self) -> Path | None:
        """Generate the validation layouts with the current (EMA) adapter; save and log a grid with box overlays."""
        if not self.accelerator.is_main_process:
            return None
        config = self.config.validation
        layouts = self.validation_layouts
        unet = self.parts["unet"]
        adapter = self.inference_adapter()  # a copy: the pipeline casts it to the base's dtype
        self.adapter.detach(unet)
        unet.eval()
        try:
            pipe = GligenPipeline(
                self.parts["vae"], self.parts["text_encoder"], self.parts["tokenizer"], unet,
                DDIMScheduler.from_config(self.noise_scheduler.config), adapter,
                self.parts.get("image_encoder"), self.parts.get("image_processor"),
                self.parts.get("text_encoder_2"), self.parts.get("tokenizer_2"),
            )
            kwargs = {}
            if self.adapter.conv_in_extra is not None:  # repaint the boxes of a plain grey picture
                kwargs["inpaint_image"] = [Image.new("RGB", (lay.width, lay.height), (128, 128, 128)) for lay in layouts]
            with self.accelerator.autocast():
                images = pipe(layouts, num_inference_steps=config.num_inference_steps,
                              guidance_scale=config.guidance_scale, schedule=tuple(config.schedule), **kwargs)
        finally:
            adapter.detach(unet)
            self.adapter.attach(unet)
            unet.train()
        overlays = [draw_boxes(image, layout.boxes, layout.phrases) for image, layout in zip(images, layouts)]
        grid = make_grid(overlays)
        path = self.output_dir / "validation" / f"step-{self.step:08d}.png"
        save_image(path, grid)
        if self.log_to_tensorboard:
            import numpy as np

            self.accelerator.get_tracker("tensorboard").writer.add_image(
                "validation", np.asarray(grid), self.step, dataformats="HWC")
        self.log({"validation_grid": str(path)})
        return path

    # --- checkpoints ---

    def _checkpoint_dir(self, step: int) -> Path:
        return self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"

    def _save_adapter_hook(self, models, weights, output_dir) -> None:
        """accelerate's save hook: write only the adapter (the frozen base is not ours to save)."""
        weights.clear()
        if self.accelerator.is_main_process:
            self.adapter.save_pretrained(Path(output_dir) / ("trained_adapter" if self.ema else "adapter"))

    def _load_adapter_hook(self, models, input_dir) -> None:
        models.clear()
        trained = GroundingAdapter.from_pretrained(Path(input_dir) / ("trained_adapter" if self.ema else "adapter"))
        self.adapter.load_adapter_state_dict(trained.adapter_state_dict())

    def save_checkpoint(self) -> Path:
        """Adapter + optimizer + RNG states (accelerate) + our state, into a directory renamed when complete."""
        accelerator = self.accelerator
        final = self._checkpoint_dir(self.step)
        tmp = final.with_name(f".tmp-{final.name}")
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        rank = accelerator.process_index
        state = {
            "step": self.step,
            "bad_in_a_row": self.bad_in_a_row,
            "positions": {str(k): asdict(v) for k, v in self.positions.items()},
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }
        tensors = {"generator": self.generator.get_state()}
        if self.ema:
            state["ema_step"] = self.ema.optimization_step
            tensors.update({f"ema.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.ema.shadow_params)})
        write_json(tmp / f"training_state_{rank}.json", state)
        with atomic_path(tmp / f"training_state_{rank}.safetensors") as path:
            save_file(tensors, str(path))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if self.ema:
                self.inference_adapter().save_pretrained(tmp / "adapter")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune_checkpoints()
        accelerator.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        for old in sorted(checkpoints(self.output_dir))[:-self.config.keep_checkpoints]:
            shutil.rmtree(old)

    def resume(self) -> Path | None:
        """Load the latest complete checkpoint of `output_dir`, if any."""
        found = sorted(checkpoints(self.output_dir))
        if not found:
            return None
        latest = found[-1]
        self.accelerator.load_state(str(latest))
        rank = self.accelerator.process_index
        state_path = latest / f"training_state_{rank}.json"
        if not state_path.is_file():
            raise UserError(f"{latest}: no training state for process {rank} (was it saved with another number of processes?)")
        state = json.loads(state_path.read_text())
        tensors = load_file(str(latest / f"training_state_{rank}.safetensors"))
        self.step = state["step"]
        self.bad_in_a_row = state["bad_in_a_row"]
        self.positions = {int(k): DataPosition(**v) for k, v in state["positions"].items()}
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(tensors["generator"])
        if self.ema:
            self.ema.optimization_step = state["ema_step"]
            self.ema.shadow_params = [tensors[f"ema.{i}"].to(p.device) for i, p in enumerate(self.ema.shadow_params)]
        if self.accelerator.is_main_process:
            logger.warning("resumed from %s at step %d", latest, self.step)
        return latest

    def inference_adapter(self) -> GroundingAdapter:
        """A detached copy of the adapter to generate with: the EMA weights when EMA is on, else the trained ones."""
        adapter = copy.deepcopy(self.adapter)
        if self.ema:
            self.ema.copy_to([p for p in adapter.parameters() if p.requires_grad])
        return adapter


def box_inpaint_input(latents: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inpainting channels: latents with the boxes blanked (B,4,h,w) and the mask (B,1,h,w), 0 inside boxes.

    The pipeline's own mask (as official GLIGEN and diffusers: drawn at latent resolution,
    multiplying the clean latents), so the model learns to paint the boxed entities into their context.
    """
    mask = torch.stack([
        box_mask([box for box, real in zip(b.tolist(), m.tolist()) if real], latents.shape[2:])
        for b, m in zip(boxes, masks)
    ])[:, None].to(latents)
    return latents * mask, mask


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (half-written ones are hidden `.tmp-` directories)."""
    root = Path(output_dir) / "checkpoints"
    return [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()] if root.is_dir() else []


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"optim.lr": ...} with TensorBoard-friendly values."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
