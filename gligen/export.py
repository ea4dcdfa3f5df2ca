"""A grounding adapter -> where people already run GLIGEN: diffusers' own GLIGEN pipelines and ComfyUI.

    gligen convert ADAPTER --to diffusers --base BASE --out DIR      (a StableDiffusionGLIGEN[TextImage]Pipeline)
    gligen convert ADAPTER --to comfyui --out gligen.safetensors     (what ComfyUI's GLIGENLoader reads)

diffusers: the base UNet becomes a GLIGEN UNet (`attention_type` "gated" or "gated-text-image")
holding the base weights plus the adapter's, which already carry diffusers' names.
ComfyUI: one safetensors file of the grounding tensors under official GLIGEN's (LDM) names:
`position_net.*` and `input_blocks.N.1.transformer_blocks.M.fuser.*` (also `middle_block.1`,
`output_blocks.N.1`), the layout of the released checkpoints' `model` section.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import StableDiffusionGLIGENPipeline, StableDiffusionGLIGENTextImagePipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.clip_image_project_model import CLIPImageProjection
from safetensors.torch import save_file
from transformers import CLIPProcessor

from gligen.adapter import GroundingAdapter, check_tensors
from gligen.base import FrozenBase, load_component, load_image_encoder, model_index
from gligen.errors import UserError
from gligen.files import atomic_directory, atomic_path

TARGETS = ("diffusers", "comfyui")
ATTENTION_TYPES = {"text-box": "gated", "text-image-box": "gated-text-image"}


def check_official_fusers(adapter: GroundingAdapter, target: str) -> None:
    """Raise a UserError when the adapter's fusers are not GLIGEN's (visual positions): `target` has no place for them."""
    if adapter.config.visual_positions:
        raise UserError(f"{target} has no place for this adapter's visual positions (visual_positions: true is "
                        "not official GLIGEN); use it with gligen's own pipeline")


def gligen_unet(adapter: GroundingAdapter, unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A diffusers GLIGEN UNet: `unet`'s weights plus the adapter's fusers and position net (and, for an
    inpainting adapter on a 4-channel base, its extra input channels appended to conv_in)."""
    check_official_fusers(adapter, "diffusers' GLIGEN UNet")
    config = dict(unet.config)
    cross = config["cross_attention_dim"]
    if not isinstance(cross, int) or adapter.config.positive_len != cross:
        raise UserError(f"diffusers' GLIGEN UNet takes phrase embeddings of the cross-attention size {cross}; "
                        f"this adapter's are {adapter.config.positive_len}")
    config["attention_type"] = ATTENTION_TYPES[adapter.config.feature_type]
    config["in_channels"] += adapter.config.extra_in_channels
    state = dict(unet.state_dict())
    grounding = adapter.adapter_state_dict()
    extra = grounding.pop("conv_in_extra.weight", None)
    grounding.pop("image_projection.weight", None)
    if extra is not None:
        state["conv_in.weight"] = torch.cat([state["conv_in.weight"], extra.to(state["conv_in.weight"])], dim=1)
    state.update(grounding)
    gated = UNet2DConditionModel.from_config(config).to(unet.dtype)
    check_tensors(gated.state_dict(), state, "the adapter on this base")
    gated.load_state_dict(state)
    return gated.eval()


def export_diffusers(adapter: GroundingAdapter, base: str, out: str | os.PathLike,
                     image_encoder: str | None = None) -> Path:
    """Write `out`: diffusers' StableDiffusionGLIGENPipeline (text-box) or ...TextImagePipeline (text-image-box,
    with a CLIP image encoder from `image_encoder` or the base) of `base` (a directory or hub id) + `adapter`."""
    frozen = FrozenBase.from_pretrained(base)
    if frozen.is_sdxl:
        raise UserError(f"{base}: diffusers has GLIGEN pipelines for SD 1.x / 2.x bases only, not SDXL")
    parts = dict(vae=frozen.vae, text_encoder=frozen.text_encoder, tokenizer=frozen.tokenizer,
                 unet=gligen_unet(adapter, frozen.unet), scheduler=frozen.scheduler, safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    pipeline_class = StableDiffusionGLIGENPipeline
    if adapter.config.feature_type == "text-image-box":
        encoder, processor = _image_side(base, image_encoder)
        projection = adapter.image_projection.weight
        if projection.shape[0] != projection.shape[1]:
            raise UserError(f"diffusers' CLIPImageProjection is square; this adapter's projection is "
                            f"{tuple(projection.shape)}")
        image_project = CLIPImageProjection(hidden_size=projection.shape[0])
        image_project.project.weight.data.copy_(projection)
        parts.update(image_encoder=encoder, image_project=image_project,
                     processor=CLIPProcessor(image_processor=processor, tokenizer=frozen.tokenizer))
        pipeline_class = StableDiffusionGLIGENTextImagePipeline
    with atomic_directory(out) as tmp:
        pipeline_class(**parts).save_pretrained(tmp)
    return Path(out)


def _image_side(base: str, image_encoder: str | None):
    """The CLIP vision encoder and processor of a text-image export: `image_encoder`, else the base's own
    (`image_encoder` and `feature_extractor` components, as `GligenPipeline.save_pretrained` writes them)."""
    if image_encoder is not None:
        return load_image_encoder(image_encoder, torch.float32)
    index = model_index(base)
    if all((index.get(name) or [None, None])[1] is not None for name in ("image_encoder", "feature_extractor")):
        encoder, processor = (load_component(base, index, name, torch.float32)
                              for name in ("image_encoder", "feature_extractor"))
        return encoder, getattr(processor, "image_processor", processor)  # a CLIPProcessor holds one
    raise UserError("a text-image-box adapter needs a CLIP image encoder for diffusers' pipeline (give --image-encoder)")


def ldm_block_paths(unet_config: dict) -> dict[str, str]:
    """diffusers UNet attention paths -> LDM (openaimodel) ones: `down_blocks.i.attentions.j` ->
    `input_blocks.N.1`, `mid_block.attentions.0` -> `middle_block.1`, `up_blocks.i.attentions.j` ->
    `output_blocks.N.1`. Each down block holds its layers then a downsampler (one LDM index each, after
    `input_blocks.0`, the input conv); each up block its layers + 1, the upsampler sharing the last index."""
    levels = len(unet_config["down_block_types"])
    layers = unet_config["layers_per_block"]
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * levels
    paths = {"mid_block.attentions.0": "middle_block.1"}
    index = 1
    for i, count in enumerate(layers):
        for j in range(count):
            paths[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index + j}.1"
        index += count + 1
    index = 0
    for i, count in enumerate(reversed(layers)):
        for j in range(count + 1):
            paths[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index + j}.1"
        index += count + 1
    return paths


def comfyui_state_dict(adapter: GroundingAdapter, unet_config: dict) -> dict[str, torch.Tensor]:
    """The adapter's position net and fusers under official GLIGEN's LDM names (ComfyUI's GLIGEN file)."""
    check_official_fusers(adapter, "ComfyUI's GLIGENLoader")
    if adapter.config.feature_type != "text-box" or adapter.config.extra_in_channels:
        raise UserError("ComfyUI's GLIGENLoader reads text-box adapters without extra input channels only; this one is "
                        f"{adapter.config.feature_type}" + (" inpainting" if adapter.config.extra_in_channels else ""))
    paths = ldm_block_paths(unet_config)
    state = {}
    for key, value in adapter.adapter_state_dict().items():
        if not key.startswith("position_net."):
            block, rest = key.split(".transformer_blocks.", 1)
            if block not in paths:
                raise UserError(f"adapter block {block} has no place in an LDM UNet of {len(paths)} attention blocks")
            key = f"{paths[block]}.transformer_blocks.{rest}"
        state[key] = value.contiguous()
    return state


def export_comfyui(adapter: GroundingAdapter, unet_config: dict, out: str | os.PathLike) -> Path:
    """Write `out`: the single safetensors file ComfyUI's GLIGENLoader reads (see `comfyui_state_dict`)."""
    state = comfyui_state_dict(adapter, unet_config)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "base_model": adapter.config.base_model or ""})
    return Path(out)


def run_export(args) -> Path:
    """`gligen convert ADAPTER --to diffusers|comfyui ...`."""
    adapter = GroundingAdapter.from_pretrained(args.source)
    if args.to == "diffusers":
        if args.base is None:
            raise UserError("--to diffusers needs --base (the Stable Diffusion base the adapter was trained on)")
        return export_diffusers(adapter, args.base, args.out, args.image_encoder)
    if args.base is not None:
        unet_config = UNet2DConditionModel.load_config(args.base, subfolder="unet")
    else:
        unet_config = _sd_unet_config(adapter)
    return export_comfyui(adapter, unet_config, args.out)


def _sd_unet_config(adapter: GroundingAdapter) -> dict:
    """Without --base: the block layout of SD 1.x / 2.x (4 levels, 2 layers each), checked against the adapter."""
    config = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "layers_per_block": 2}
    paths = ldm_block_paths(config)
    missing = next((p for p in adapter.block_paths if p.split(".transformer_blocks.")[0] not in paths), None)
    if missing is not None:
        raise UserError(f"adapter block {missing} is not in an SD 1.x / 2.x UNet; give --base")
    return config
