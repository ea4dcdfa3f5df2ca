"""Official GLIGEN map releases (canny, HED, depth, normal, sem) -> a plain diffusers UNet + a map adapter.

Such a release's `model` holds, besides the UNet and its fusers (`gligen.convert`):
- `position_net.*`: the map tokenizer (`convnext_tiny_backbone.*`, `pos_embedding`, `null_feature`,
  `linears.*`, for `sem` also `in_conv.*`) -> the adapter's `map_tokenizer.*`, names unchanged;
- `downsample_net.layers.*` (none for `hed`) -> `map_downsampler.layers.*`;
- `input_blocks.0.0`: the first conv, trained over 4 + 8 (HED: 4 + 1) input channels -> the base UNet
  takes its first 4 channels, the adapter keeps the trained conv (`conv_in_base`, `conv_in_extra`),
  which it uses while the grounding scale is above 0 (`gligen.adapter.ExtendedConvIn`).
The type is read from the release's config (`grounding_tokenizer.target`, e.g. `...canny_grounding_net...`);
canny and depth have the same shapes, so a release whose config cannot be read needs `--condition`.
"""

from __future__ import annotations

import math
import re

import torch
from diffusers import UNet2DConditionModel

from gligen.adapter import GroundingAdapter
from gligen.errors import UserError
from gligen.maps import CONDITION_TYPES
from gligen.maps.nets import MapConfig, backbone_stride

TOKENIZER, DOWNSAMPLER, FIRST_CONV = "position_net.", "downsample_net.", "input_blocks.0.0."
BACKBONE = TOKENIZER + "convnext_tiny_backbone."


def is_map_release(model: dict[str, torch.Tensor]) -> bool:
    """Whether an official checkpoint's `model` grounds a map (its position net holds a ConvNeXt)."""
    return any(key.startswith(BACKBONE) for key in model)


def release_condition(model: dict[str, torch.Tensor], config: dict, given: str | None, where: str) -> str:
    """The release's condition type: `given` (`--condition`), else its config's, else what its shapes tell."""
    target = ((config.get("model") or {}).get("params") or {}).get("grounding_tokenizer") or {}
    found = re.search(r"(\w+)_grounding_net", str(target.get("target", "") if isinstance(target, dict) else ""))
    from_config = found.group(1) if found and found.group(1) in CONDITION_TYPES else None
    if given is not None:
        if from_config is not None and from_config != given:
            raise UserError(f"{where}: --condition {given}, but the release's config says it grounds {from_config!r} maps")
        return given
    if from_config is not None:
        return from_config
    if TOKENIZER + "in_conv.weight" in model:
        return "sem"
    layer = model.get(DOWNSAMPLER + "layers.0.weight")
    if layer is None:
        return "hed"
    if layer.shape[1] == 3:
        return "normal"
    raise UserError(f"{where}: a canny or a depth release (the same shapes) whose config does not say which; "
                    "give --condition canny or --condition depth")


def map_config(model: dict[str, torch.Tensor], kind: str, where: str) -> MapConfig:
    """The tokenizer's ConvNeXt (depths, dims) and input side (from its positional embedding's tokens) from the tensors."""
    names = [k[len(BACKBONE):].split(".") for k in model if k.startswith(BACKBONE + "stages.")]  # stages.i.j.*
    stages = sorted({int(name[1]) for name in names})
    depths = [len({name[2] for name in names if name[1] == str(i)}) for i in stages]
    dims = [model[f"{BACKBONE}stages.{i}.0.dwconv.weight"].shape[0] for i in stages]
    tokens = model.get(TOKENIZER + "pos_embedding", torch.empty(0, 0)).shape[1]
    side = math.isqrt(tokens)
    if not side or side * side != tokens:
        raise UserError(f"{where}: {TOKENIZER}pos_embedding holds {tokens} tokens, not a square grid")
    return MapConfig(kind, depths, dims, side * backbone_stride(len(dims)))


def split_map_release(
    model: dict[str, torch.Tensor], kind: str, where: str,
) -> tuple[dict[str, torch.Tensor], MapConfig, dict[str, torch.Tensor]]:
    """(the UNet's LDM state with a 4-channel first conv and the fusers, the map config, the adapter's map tensors)."""
    condition = map_config(model, kind, where)
    conv, bias = model.get(FIRST_CONV + "weight"), model.get(FIRST_CONV + "bias")
    if conv is None or bias is None:
        raise UserError(f"{where}: no first conv ({FIRST_CONV}weight and bias)")
    base = conv.shape[1] - condition.extra_channels
    if base != 4:
        raise UserError(f"{where}: the first conv takes {conv.shape[1]} channels; a {kind!r} release takes "
                        f"4 + {condition.extra_channels}")
    unet = {k: v for k, v in model.items() if not k.startswith((TOKENIZER, DOWNSAMPLER))}
    unet[FIRST_CONV + "weight"] = conv[:, :base].clone()
    maps = {"map_tokenizer." + k[len(TOKENIZER):]: v for k, v in model.items() if k.startswith(TOKENIZER)}
    maps.update({"map_downsampler." + k[len(DOWNSAMPLER):]: v for k, v in model.items() if k.startswith(DOWNSAMPLER)})
    maps.update({"conv_in_base.weight": conv[:, :base].clone(), "conv_in_base.bias": bias,
                 "conv_in_extra.weight": conv[:, base:].clone()})
    return unet, condition, maps


def map_adapter(
    unet: UNet2DConditionModel, condition: MapConfig, fusers: dict[str, torch.Tensor], maps: dict[str, torch.Tensor],
    where: str,
) -> GroundingAdapter:
    """The adapter of a map release for the plain `unet`: its fusers (diffusers names) and map tensors."""
    adapter = GroundingAdapter.for_unet(unet, feature_type=None, condition=condition)
    adapter.load_adapter_state_dict({**fusers, **maps}, where=where)
    return adapter
