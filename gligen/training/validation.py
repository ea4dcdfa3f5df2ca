"""Validation during training: whether the adapter uses the boxes yet, and pictures of what it makes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler
from PIL import Image

from gligen.draw import draw_layout, make_grid
from gligen.files import save_image
from gligen.pipeline import GligenPipeline
from gligen.training import step, trackers
from gligen.training.checkpoint import inference_adapter

if TYPE_CHECKING:
    from gligen.training.trainer import Trainer


def grounding_gain(trainer: Trainer) -> dict[str, float]:
    """The denoising loss of the fixed validation batch with its grounding and with none (null tokens).

    Both with the same noise and timesteps, from a generator of their own (training's goes on
    untouched), and the trained (not EMA) adapter. `grounding_gain` = 1 - grounded / ungrounded:
    0 while the gates are closed, above 0 once the adapter uses the boxes. Every process
    computes it (a model wrapped for several processes is called by all of them).
    """
    training_generator = trainer.generator
    losses = {}
    try:
        for name, drop in (("loss_grounded", 0.0), ("loss_ungrounded", 1.0)):
            trainer.generator = torch.Generator().manual_seed(trainer.config.seed)
            with torch.no_grad():
                losses[name] = step.loss(trainer, trainer.gain_batch, grounding_drop=drop).item()
    finally:
        trainer.generator = training_generator
    return {**losses, "grounding_gain": 1 - losses["loss_grounded"] / losses["loss_ungrounded"]}


@torch.no_grad()
def validation_grid(trainer: Trainer) -> Path | None:
    """Generate the validation layouts with the current (EMA) adapter; save and log a grid with box overlays.

    -> the grid's path on the main process, None on the others (every process must call it).
    """
    adapter = inference_adapter(trainer)  # a copy: the pipeline casts it to the base's dtype
    if adapter is None:
        return None
    config, layouts, unet = trainer.config.validation, trainer.validation_layouts, trainer.base.unet
    trainer.adapter.detach(unet)
    unet.eval()
    try:
        pipe = GligenPipeline.from_base(trainer.base, adapter)
        pipe.scheduler = DDIMScheduler.from_config(trainer.noise_scheduler.config)
        kwargs = {}
        if adapter.inpaints:  # repaint the boxes of a plain grey picture
            kwargs["inpaint_image"] = [Image.new("RGB", (lay.width, lay.height), (128, 128, 128)) for lay in layouts]
        with trainer.accelerator.autocast():
            images = pipe(layouts, num_inference_steps=config.num_inference_steps,
                          guidance_scale=config.guidance_scale, schedule=tuple(config.schedule), **kwargs).images
    finally:
        adapter.detach(unet)
        trainer.adapter.attach(unet)
        unet.train()
    grid = make_grid([draw_layout(image, layout) for image, layout in zip(images, layouts)])
    path = trainer.output_dir / "validation" / f"step-{trainer.step:08d}.png"
    save_image(path, grid)
    trackers.log_image(trainer.accelerator, "validation", grid, trainer.step)
    return path
