"""The training step's criterion: the denoising loss of one batch.

    latents = VAE(crop) ; t ~ U(timestep_range), noise ~ N ; x_t = add_noise(latents, noise, t)
    grounding tokens = position_net(boxes, phrase embeddings [, reference and style images] | keypoints)
                       [+ map_tokenizer(map)]      (map adapters)
                       (null for `grounding_drop` of the samples)
    loss = || UNet(x_t [, masked latents, mask | , downsampler(map)], t, caption embeddings, tokens) - noise ||^2
           (or - velocity; loss_weighting x0: each sample's error weighted into that of the clean latents)

On SDXL the UNet also gets the caption's pooled embedding and the time ids of the crop: the
image's original size, the crop's top-left corner and the training resolution.

Every random draw (VAE sample, timesteps, noise, grounding drop) comes from `trainer.generator`,
in this order, so a step is a pure function of the weights, the batch and the generator state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from gligen.grounding import GroundingInputs, add_style, encode_images, scatter_embeds
from gligen.keypoints import keypoint_tensors
from gligen.masks import box_mask
from gligen.prompts import PromptEmbeds, time_ids
from gligen.training.batch import TrainingBatch

if TYPE_CHECKING:
    from gligen.training.trainer import Trainer


def loss(trainer: Trainer, batch: TrainingBatch | Mapping[str, Any], grounding_drop: float | None = None
         ) -> torch.Tensor:
    """The denoising loss of one batch (a scalar)."""
    batch = TrainingBatch.of(batch)
    latents = encode_latents(trainer, batch.pixels, batch.cache_keys)
    timesteps = torch.randint(*trainer.timesteps, (latents.shape[0],), generator=trainer.generator).to(trainer.device)
    noise = torch.randn(latents.shape, generator=trainer.generator).to(trainer.device)
    model_input = trainer.noise_scheduler.add_noise(latents, noise, timesteps)
    if trainer.adapter.inpaints:
        model_input = torch.cat([model_input, *box_inpaint_input(latents, batch.boxes, batch.masks)], dim=1)
    text = encode_captions(trainer, batch.captions)
    grounding = grounding_inputs(trainer, batch, grounding_drop)
    ids = None
    if trainer.base.is_sdxl:
        resolution = (trainer.config.data.resolution,) * 2
        ids = time_ids(batch.original_sizes, batch.crops_top_left, resolution).to(trainer.device)
    with trainer.accelerator.autocast():
        prediction = trainer.model(model_input.to(trainer.weight_dtype), timesteps, text, grounding, ids)
    velocity = trainer.noise_scheduler.config.prediction_type == "v_prediction"
    target = trainer.noise_scheduler.get_velocity(latents, noise, timesteps) if velocity else noise
    if trainer.config.loss_weighting == "none":
        return F.mse_loss(prediction.float(), target.float())
    errors = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))
    return (errors * x0_weights(trainer.noise_scheduler.alphas_cumprod, timesteps, velocity)).mean()


def x0_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, velocity: bool) -> torch.Tensor:
    """(B,) weights that turn the squared error of a noise (or velocity) prediction into that of the clean
    latents it implies: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), x0 = sqrt(a) x_t - sqrt(1 - a) v (a: alpha-bar)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return 1 - a if velocity else (1 - a) / a


def _encode(trainer: Trainer, kind: str, keys: list[str], fn: Callable[[list[int]], tuple[torch.Tensor, ...]]
            ) -> tuple[torch.Tensor, ...]:
    """fn(indices) -> a tuple of tensors for those keys; through the cache when there is one."""
    if trainer.cache:
        return trainer.cache[kind].encode(keys, fn, trainer.device)
    return fn(list(range(len(keys))))


def encode_latents(trainer: Trainer, pixels: torch.Tensor, keys: list[str]) -> torch.Tensor:
    """Pixels (B,3,R,R) in [-1,1] -> scaled latents (B,4,R/f,R/f), sampled from the VAE posterior."""
    vae = trainer.base.vae

    @torch.no_grad()
    def moments(indices: list[int]) -> tuple[torch.Tensor]:
        return (vae.encode(pixels[indices].to(trainer.device, vae.dtype)).latent_dist.parameters,)

    params, = _encode(trainer, "latents", keys, moments)
    latents = DiagonalGaussianDistribution(params.float()).sample(generator=trainer.generator)
    return latents * vae.config.scaling_factor


def encode_captions(trainer: Trainer, captions: list[str]) -> PromptEmbeds:
    """Captions -> prompt embeddings: hidden states (B, 77, D) (and SDXL's pooled embeddings)."""
    def encode(indices: list[int]) -> tuple[torch.Tensor, ...]:
        embeds = trainer.prompts.prompts([captions[i] for i in indices])
        return (embeds.hidden,) if embeds.pooled is None else (embeds.hidden, embeds.pooled)

    return PromptEmbeds(*_encode(trainer, "text", captions, encode))


def encode_phrases(trainer: Trainer, phrases: list[str]) -> torch.Tensor:
    """Phrases -> pooled phrase embeddings (P, D), the adapter's `phrase_embedding` (GLIGEN-XL's: projected)."""
    projected = trainer.adapter.config.projected_phrases
    if not phrases:
        return trainer.prompts.phrases([], projected)
    embeds, = _encode(trainer, "phrases", phrases,
                      lambda indices: (trainer.prompts.phrases([phrases[i] for i in indices], projected),))
    return embeds


def grounding_inputs(trainer: Trainer, batch: TrainingBatch | Mapping[str, Any], grounding_drop: float | None = None
                     ) -> GroundingInputs:
    """The batch's grounding, each sample dropped to null (masks 0) with probability `grounding_drop`
    (the config's by default)."""
    batch = TrainingBatch.of(batch)
    n = trainer.config.data.max_entities
    counts = [len(p) for p in batch.phrases]
    phrase_embeds = scatter_embeds(encode_phrases(trainer, [p for ps in batch.phrases for p in ps]), counts, n)
    drop = trainer.config.grounding_drop if grounding_drop is None else grounding_drop
    keep = (torch.rand(len(counts), generator=trainer.generator).to(trainer.device) >= drop).float()
    # copies: a style token is written into them, and the batch (such as the fixed validation one) stays as it is
    inputs = GroundingInputs(batch.boxes.to(trainer.device, copy=True), batch.masks.to(trainer.device, copy=True),
                             phrase_embeds)
    feature_type = trainer.adapter.config.feature_type
    if feature_type == "text-image-box":
        references = [image for images in batch.references for image in images]
        styles = [style for style in batch.styles or [] if style is not None]
        embeds = image_embeds(trainer, references + styles, phrase_embeds)
        inputs.image_embeds, inputs.image_masks = scatter_embeds(embeds[:len(references)], counts, n), inputs.masks.clone()
        if styles:
            slots = [count if style is not None else None for count, style in zip(counts, batch.styles)]
            add_style(inputs, slots, embeds[len(references):])
    elif feature_type == "keypoint":
        keypoints = batch.keypoints or [[] for _ in counts]
        people = [list(zip(boxes.tolist(), persons)) for boxes, persons in zip(batch.boxes, keypoints)]
        inputs.points, inputs.point_masks = keypoint_tensors(people, trainer.adapter.config.max_persons, trainer.device)
    for name in ("masks", "image_masks", "phrase_masks", "point_masks"):
        if getattr(inputs, name) is not None:
            setattr(inputs, name, getattr(inputs, name) * keep[:, None])
    if batch.maps is not None:  # the map's tokens are dropped with the rest; its channels stay (`GroundedUNet`)
        inputs.maps, inputs.map_masks = batch.maps.to(trainer.device), keep
    return inputs


def image_embeds(trainer: Trainer, images: list, phrase_embeds: torch.Tensor) -> torch.Tensor:
    """Reference or style images -> their embeddings in the text space (len(images), D), D that of `phrase_embeds`."""
    if not images:
        return phrase_embeds.new_zeros(0, phrase_embeds.shape[-1])
    # autocast: the projection is the adapter's (fp32), the frozen encoder may be bf16 / fp16
    with torch.no_grad(), trainer.accelerator.autocast():
        return encode_images(trainer.base.image_encoder, trainer.base.image_processor, trainer.adapter.image_projection,
                             images)


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
