"""The networks of a training run: the frozen base a config names, the adapter, and the module accelerate wraps."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn

from gligen.adapter import GroundingAdapter
from gligen.base import FrozenBase
from gligen.bundled import resolve_model
from gligen.errors import UserError
from gligen.grounding import GroundingInputs
from gligen.prompts import PromptEmbeds
from gligen.maps.nets import MapConfig
from gligen.training.config import ModelConfig, TrainConfig


class GroundedUNet(nn.Module):
    """The frozen UNet with the adapter attached: the one module accelerate wraps and trains.

    forward: model input (B, C, h, w), timesteps (B,), prompt embeddings, grounding inputs,
    SDXL's time ids (B, 6) -> the UNet's prediction (B, 4, h, w).

    Only the adapter is a submodule: the UNet is held outside the module tree, so whatever
    wraps this module (DDP, FSDP, DeepSpeed) syncs, shards and saves the adapter alone.
    """

    def __init__(self, unet: nn.Module, adapter: GroundingAdapter):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "unet", unet)  # not registered: see the class docstring
        adapter.attach(unet)

    def forward(self, sample, timesteps, prompt: PromptEmbeds, grounding: GroundingInputs,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.adapter.tokens(grounding)
        kwargs = self.adapter.cross_attention_kwargs(tokens, 1.0, latent_size=sample.shape[2:])
        channels = self.adapter.map_channels(grounding, sample.shape[2:])
        if channels is not None:  # the map's channels, whether or not its tokens are dropped (as official GLIGEN)
            sample = torch.cat([sample, channels.to(sample.dtype)], dim=1)
        return self.unet(sample, timesteps, cross_attention_kwargs=kwargs, **prompt.unet_kwargs(time_ids)).sample


def load_base(config: TrainConfig, dtype: torch.dtype = torch.float32) -> FrozenBase:
    """The frozen base of `model.base` (`demo`: the bundled one) in `dtype`, with the CLIP image side for text-image-box."""
    try:
        base = FrozenBase.from_pretrained(resolve_model(config.model.base, "base"), dtype, config.model.revision)
    except UserError as error:
        raise UserError(f"config key model.base: {error}") from None
    if config.model.feature_type == "text-image-box":
        base.image_projection, base.image_encoder, base.image_processor = load_image_side(config.model.image_encoder)
    return base


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


def make_adapter(config: TrainConfig, base: FrozenBase) -> GroundingAdapter:
    """A fresh adapter for the base UNet (attention gates at tanh = `model.gate_init`, dense gates 0), or the one
    named by `model.adapter`.

    Its config records the number of grounding slots this run trains with (`data.max_entities`) and the phrase
    feature (`phrase_embedding`).
    """
    adapter = GroundingAdapter.from_pretrained(config.model.adapter) if config.model.adapter else None
    embedding = phrase_embedding(config.model, base, adapter.config.phrase_embedding if adapter is not None else None)
    phrase_dim = base.prompt_encoder().phrase_dim(embedding == "projected")
    if adapter is not None:
        adapter.check_fits(base.unet)
        if adapter.config.feature_type in ("text-box", "text-image-box") and adapter.config.positive_len != phrase_dim:
            raise UserError(f"config key model.adapter: {config.model.adapter} takes {adapter.config.positive_len}-dim "
                            f"phrase embeddings, the base's {embedding} ones have {phrase_dim}")
    else:
        image_dim = base.image_encoder.config.projection_dim if base.image_encoder is not None else None
        backbone = condition = None
        if config.model.condition is not None:
            backbone, condition = map_condition(config.model)
        adapter = GroundingAdapter.for_unet(
            base.unet, config.model.feature_type, positive_len=phrase_dim,
            inpaint=config.model.inpaint, image_embed_dim=image_dim, base_model=config.model.base, condition=condition,
            phrase_embedding=embedding,
            max_persons=config.model.max_persons if config.model.feature_type == "keypoint" else None,
            visual_positions=config.model.visual_positions, schedule=config.model.schedule,
        )
        if config.model.gate_init:
            with torch.no_grad():
                for name, gate in adapter.named_parameters():
                    if name.endswith("alpha_attn"):
                        gate.fill_(math.atanh(config.model.gate_init))
        if backbone is not None:
            adapter.map_tokenizer.convnext_tiny_backbone.load_state_dict(backbone.state_dict())
        if adapter.image_projection is not None:
            # image embeddings are mapped back into the text space by the transposed CLIP text projection
            projection = base.image_projection.weight
            if projection.shape != adapter.image_projection.weight.shape:
                raise UserError(
                    f"model.image_encoder {config.model.image_encoder!r}: its text projection maps to "
                    f"{projection.shape[0]} dims, but the base's text encoder has {adapter.config.positive_len}"
                )
            adapter.image_projection.weight.data.copy_(projection)
    adapter.config.max_entities = config.data.max_entities
    return adapter


def phrase_embedding(config: ModelConfig, base: FrozenBase, recorded: str | None = None) -> str:
    """The phrase feature a run trains with: `model.phrase_embedding`, else the one `recorded` in model.adapter's
    config, else pooler_output. 'projected' needs SDXL's second, projecting text encoder."""
    chosen = config.phrase_embedding
    if recorded is not None:
        if chosen is not None and chosen != recorded:
            raise UserError(f"config key model.phrase_embedding: {chosen} conflicts with model.adapter {config.adapter}, "
                            f"trained with phrase_embedding {recorded}")
        chosen = recorded
    if chosen == "projected" and not base.is_sdxl:
        where = "config key model.phrase_embedding" if config.phrase_embedding else f"model.adapter {config.adapter}"
        raise UserError(f"{where}: projected phrase embeddings need an SDXL base, {config.base} has one text encoder")
    return chosen or "pooler_output"


def map_condition(config: ModelConfig) -> tuple[nn.Module | None, MapConfig]:
    """The map tokenizer's initial ConvNeXt (`model.condition_backbone`; None: random, ConvNeXt-T) and its config."""
    from gligen.maps.convnext import from_transformers

    backbone = from_transformers(config.condition_backbone) if config.condition_backbone else None
    shape = {"depths": list(backbone.depths), "dims": list(backbone.dims)} if backbone is not None else {}
    data = {"type": config.condition, "resize_input": config.condition_resize_input, **shape}
    return backbone, MapConfig.from_dict(data, "config key model.condition_resize_input")


def set_attention(unet: nn.Module, kind: str) -> None:
    """Attention kernel for the whole UNet, fusers included (attach them first): sdpa, xformers or eager."""
    if kind == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as error:
            raise UserError(f"config key attention: xformers is not usable here ({error})") from None
    else:
        unet.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())
