"""The frozen base: a diffusers Stable Diffusion pipeline's networks (1.x, 2.x, XL), as one typed object.

Generation (`GligenPipeline`) and training (`gligen.training`) both run on a `FrozenBase`:

    base = FrozenBase.from_pretrained("CompVis/stable-diffusion-v1-4", dtype=torch.float16)
    base.to("cuda")

Its parts are loaded with the classes the pipeline's `model_index.json` names, as diffusers
loads them. Nothing in it trains: an adapter attaches to `base.unet` and detaches without a trace.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline, ModelMixin
from torch import nn

from gligen.errors import UserError
from gligen.prompts import PromptEncoder

SD_COMPONENTS = ["vae", "text_encoder", "tokenizer", "unet", "scheduler"]
SDXL_COMPONENTS = ["text_encoder_2", "tokenizer_2"]


@dataclass
class FrozenBase:
    """VAE, text encoder(s) and tokenizer(s), UNet, scheduler; and a CLIP image encoder for reference images.

    `text_encoder_2` / `tokenizer_2` are SDXL's second pair (None otherwise); with
    `force_zeros_for_empty_prompt` (SDXL's default) an empty negative prompt is the zero embedding.
    `image_projection` (text-image-box) maps CLIP image embeddings into the text space (CLIP's
    transposed text projection); a text-image-box adapter holds a copy, which is the one used.
    """

    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    image_encoder: Any = None
    image_processor: Any = None
    image_projection: Any = None
    force_zeros_for_empty_prompt: bool = True

    @classmethod
    def from_pretrained(cls, model: str, dtype: torch.dtype = torch.float32, revision: str | None = None) -> FrozenBase:
        """Load a diffusers pipeline directory or hub id; its networks in `dtype` (SDXL's VAE kept fp32 with fp16)."""
        index = model_index(model, revision)
        names = SD_COMPONENTS + (SDXL_COMPONENTS if is_sdxl(index) else [])
        base = cls(**{name: load_component(model, index, name, dtype, revision) for name in names},
                   force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
        if base.is_sdxl:
            keep_sdxl_vae_in_fp32(base.vae, dtype)
        return base

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def prompt_encoder(self) -> PromptEncoder:
        """The text side: one tokenizer and text encoder, or SDXL's two."""
        return PromptEncoder(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2)

    def networks(self) -> list[nn.Module]:
        """The networks present: VAE, text encoder(s), UNet, image encoder."""
        parts = (self.vae, self.text_encoder, self.text_encoder_2, self.unet, self.image_encoder)
        return [part for part in parts if part is not None]

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> FrozenBase:
        """Move the networks (and cast them to `dtype`; SDXL's VAE stays fp32 with fp16). Returns self."""
        for module in self.networks():
            module.to(device)
            if dtype is not None and module.dtype != dtype:  # diffusers warns on every cast, needed or not
                module.to(dtype)
        if dtype is not None and self.is_sdxl:
            keep_sdxl_vae_in_fp32(self.vae, dtype)
        return self

    def freeze(self) -> FrozenBase:
        """No gradients and evaluation mode for every network. Returns self."""
        for module in self.networks():
            module.requires_grad_(False).eval()
        return self


def model_index(model: str, revision: str | None = None) -> dict:
    """The `model_index.json` of a diffusers pipeline directory or hub id."""
    path = Path(model)
    if path.exists() and not (path / "model_index.json").is_file():
        raise UserError(f"{model}: not a diffusers pipeline directory (no model_index.json)")
    try:
        return DiffusionPipeline.load_config(model, revision=revision)
    except (OSError, ValueError) as error:
        raise UserError(f"{model}: cannot load a diffusers pipeline ({str(error).splitlines()[0]})") from None


def is_sdxl(index: dict) -> bool:
    """Whether a pipeline's `model_index.json` has SDXL's second text encoder."""
    return (index.get("text_encoder_2") or [None, None])[1] is not None


def keep_sdxl_vae_in_fp32(vae, dtype: torch.dtype) -> None:
    """SDXL's VAE overflows in fp16: with `dtype` fp16 it stays in fp32 when its config asks (as in diffusers)."""
    if dtype == torch.float16 and vae.config.force_upcast:
        vae.to(torch.float32)


def load_component(model: str, index: dict, name: str, dtype: torch.dtype, revision: str | None = None):
    """Load pipeline component `name` with the class `model_index.json` names for it."""
    if name not in index or index[name][1] is None:
        raise UserError(f"{model}: the pipeline has no {name}")
    class_name = index[name][1]
    component_class = getattr(diffusers, class_name, None) or getattr(transformers, class_name, None)
    if component_class is None:
        module = importlib.import_module(f"diffusers.pipelines.{index[name][0]}")
        component_class = getattr(module, class_name)
    kwargs = {}
    if issubclass(component_class, ModelMixin):
        kwargs["torch_dtype"] = dtype
    elif issubclass(component_class, transformers.PreTrainedModel):
        kwargs["dtype"] = dtype
    try:
        component = component_class.from_pretrained(model, subfolder=name, revision=revision, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{model}: cannot load {name} ({str(error).splitlines()[0]})") from None
    return component.eval() if isinstance(component, torch.nn.Module) else component


def load_image_encoder(path: str, dtype: torch.dtype):
    """A CLIP vision model with projection and its image processor, from a full CLIP model or a vision-only one.

    A full CLIP model's vision tower takes the model's `projection_dim`, which its tower config
    need not repeat (transformers would otherwise build a projection of the default width).
    """
    try:
        if transformers.AutoConfig.from_pretrained(path).model_type == "clip":
            from gligen.convert import clip_image_side

            _, encoder, processor = clip_image_side(path)
            return encoder.to(dtype), processor
        encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(path, dtype=dtype).eval()
        processor = transformers.CLIPImageProcessor.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: cannot load a CLIP image encoder ({str(error).splitlines()[0]})") from None
    return encoder, processor
