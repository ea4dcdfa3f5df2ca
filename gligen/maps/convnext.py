"""ConvNeXt (Liu et al., 2022) as GLIGEN's map tokenizers hold it: tensor names those of the official checkpoints.

    downsample_layers.0 = [Conv 4x4 stride 4, LayerNorm]   downsample_layers.i = [LayerNorm, Conv 2x2 stride 2]
    stages.i.j          = Block: depthwise 7x7 conv, LayerNorm, Linear(4 dim), GELU, Linear(dim), * gamma, + input

No final norm and no head: the output is the last stage's feature map, (B, dims[-1], H/32, W/32).
ConvNeXt-T is depths (3, 3, 9, 3), dims (96, 192, 384, 768). `from_transformers` loads the weights of a
transformers `ConvNextModel` (e.g. facebook/convnext-tiny-224, GLIGEN's initialisation) by renaming them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from gligen.errors import UserError

TINY_DEPTHS = (3, 3, 9, 3)
TINY_DIMS = (96, 192, 384, 768)
EPS = 1e-6


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    """(B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """(B, in_channels, H, W) -> (B, dims[-1], H/32, W/32)."""

    def __init__(self, in_channels: int = 3, depths: Sequence[int] = TINY_DEPTHS, dims: Sequence[int] = TINY_DIMS):
        super().__init__()
        self.depths, self.dims = list(depths), list(dims)
        stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], kernel_size=4, stride=4), ChannelsFirstLayerNorm(dims[0], eps=EPS))
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(1, len(dims)):
            self.downsample_layers.append(nn.Sequential(
                ChannelsFirstLayerNorm(dims[i - 1], eps=EPS), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList(nn.Sequential(*(Block(dim) for _ in range(depth))) for depth, dim in zip(depths, dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return x


def transformers_names(depths: Sequence[int]) -> dict[str, str]:
    """Our (official) tensor name -> the name of the same tensor in transformers' `ConvNextModel`."""
    names = {"downsample_layers.0.0": "embeddings.patch_embeddings", "downsample_layers.0.1": "embeddings.layernorm"}
    for i, depth in enumerate(depths):
        if i:
            names[f"downsample_layers.{i}.0"] = f"encoder.stages.{i}.downsampling_layer.0"
            names[f"downsample_layers.{i}.1"] = f"encoder.stages.{i}.downsampling_layer.1"
        for j in range(depth):
            ours, theirs = f"stages.{i}.{j}", f"encoder.stages.{i}.layers.{j}"
            names.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in (
                ("dwconv", "dwconv"), ("norm", "layernorm"), ("pwconv1", "pwconv1"), ("pwconv2", "pwconv2"))})
    out = {}
    for ours, theirs in names.items():
        out[f"{ours}.weight"], out[f"{ours}.bias"] = f"{theirs}.weight", f"{theirs}.bias"
    for i, depth in enumerate(depths):
        out.update({f"stages.{i}.{j}.gamma": f"encoder.stages.{i}.layers.{j}.layer_scale_parameter" for j in range(depth)})
    return out


def from_transformers(name: str) -> ConvNeXt:
    """A ConvNeXt holding the weights of a transformers ConvNeXt (directory or hub id; a classifier's head is left out)."""
    from transformers import ConvNextModel

    try:
        model = ConvNextModel.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UserError(f"{name}: cannot load a transformers ConvNeXt ({str(error).splitlines()[0]})") from None
    config = model.config
    if (config.num_channels, config.patch_size, config.hidden_act) != (3, 4, "gelu") or config.layer_scale_init_value <= 0:
        raise UserError(f"{name}: a ConvNeXt with {config.num_channels} input channels, patch size {config.patch_size}, "
                        f"{config.hidden_act} and layer scale {config.layer_scale_init_value}: GLIGEN's tokenizer takes "
                        "3 channels, patch 4, gelu and a layer scale")
    backbone = ConvNeXt(3, config.depths, config.hidden_sizes)
    state = model.state_dict()
    backbone.load_state_dict({ours: state[theirs] for ours, theirs in transformers_names(config.depths).items()})
    return backbone
