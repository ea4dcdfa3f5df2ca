"""The two networks of a map condition (official GLIGEN's `*_grounding_net.py` and `*_grounding_downsampler.py`).

Maps come as the pipeline and the trainer make them (`gligen.maps.encode`): (B, 3, H, W) in [-1, 1], or for
`sem` (B, 1, H, W) integer labels, one-hot encoded here after resizing (nearest), as the official one-hot
maps resized with nearest neighbours.

- `MapTokenizer`: map -> 64 tokens (at `resize_input` 256) for the fusers: resized (nearest) to
  `resize_input`, a ConvNeXt (for `sem` after a 3x3 conv from the 152 classes to 3 channels), one token per
  cell of its stride-32 grid; the learnable `null_feature` replaces them where the mask is 0, the positional
  embedding is added, and an MLP (768 -> 512 -> 512 -> C, SiLU) maps them to the cross-attention size.
- `MapDownsampler`: map -> extra UNet input channels at the latent size: resized (bicubic; `sem` nearest)
  to 4x the latent size then two stride-2 4x4 convs with a SiLU between (canny, depth: channel 0 only,
  1 -> 4 -> 8; normal 3 -> 4 -> 8; sem 152 -> 16 -> 8); `hed` has no parameters: its channel 0 resized
  (bicubic) to the latent size, one channel.

Tensor names are the official ones under the official modules (`position_net.*` -> `map_tokenizer.*`,
`downsample_net.*` -> `map_downsampler.*` in an adapter).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gligen.errors import UserError
from gligen.grounding import _mlp, _or_null
from gligen.maps import CONDITION_TYPES, LABEL_TYPES, SEM_CLASSES
from gligen.maps.convnext import TINY_DEPTHS, TINY_DIMS, ConvNeXt


@dataclass
class MapConfig:
    """A map condition's networks: its type, the tokenizer's ConvNeXt (`depths`, `dims`) and input side."""

    type: str
    depths: list[int] = field(default_factory=lambda: list(TINY_DEPTHS))
    dims: list[int] = field(default_factory=lambda: list(TINY_DIMS))
    resize_input: int = 256

    def __post_init__(self):
        self.depths, self.dims = list(self.depths), list(self.dims)

    @property
    def stride(self) -> int:
        return backbone_stride(len(self.dims))

    @property
    def num_tokens(self) -> int:
        return (self.resize_input // self.stride) ** 2

    @property
    def extra_channels(self) -> int:
        """UNet input channels the downsampler adds."""
        return 1 if self.type == "hed" else 8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> MapConfig:
        """Validate a parsed config (an adapter's `condition`); a UserError names `where` and the key at fault."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected an object with 'type', 'depths', 'dims', 'resize_input'")
        unknown = sorted(set(data) - {"type", "depths", "dims", "resize_input"})
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}")
        if data.get("type") not in CONDITION_TYPES:
            raise UserError(f"{where}: 'type' must be one of {', '.join(CONDITION_TYPES)}, got {data.get('type')!r}")
        for key in ("depths", "dims"):
            value = data.get(key, [1])
            if not (isinstance(value, list) and value and all(_positive(v) for v in value)):
                raise UserError(f"{where}: '{key}' must be a list of positive integers, got {value!r}"[:300])
        if len(data.get("depths", TINY_DEPTHS)) != len(data.get("dims", TINY_DIMS)):
            raise UserError(f"{where}: 'depths' and 'dims' must have one entry per stage")
        size, stride = data.get("resize_input", 256), backbone_stride(len(data.get("dims", TINY_DIMS)))
        if not _positive(size) or size % stride:
            raise UserError(f"{where}: 'resize_input' must be a positive multiple of the backbone's stride {stride}, "
                            f"got {size!r}")
        return cls(**data)


def backbone_stride(stages: int) -> int:
    """The ConvNeXt's: a 4x4 stem, then 2x per further stage (ConvNeXt-T: 32, one token per 32x32 pixels)."""
    return 4 * 2 ** (stages - 1)


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def one_hot(labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, H, W) integer labels -> (B, SEM_CLASSES, H, W) one-hot."""
    return F.one_hot(labels[:, 0].long(), SEM_CLASSES).permute(0, 3, 1, 2).to(dtype)


def resized(maps: torch.Tensor, size: tuple[int, int], kind: str, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """Maps resized to `size` with `mode` (labels: always nearest, then one-hot) in `dtype`."""
    if kind in LABEL_TYPES:
        return one_hot(F.interpolate(maps.float(), size, mode="nearest"), dtype)
    return F.interpolate(maps.to(dtype), size, mode=mode)


class MapTokenizer(nn.Module):
    """maps (B, C, H, W), masks (B,) -> tokens (B, num_tokens, out_dim); see the module docstring."""

    def __init__(self, config: MapConfig, out_dim: int):
        super().__init__()
        self.config = config
        if config.type in LABEL_TYPES:
            self.in_conv = nn.Conv2d(SEM_CLASSES, 3, 3, 1, 1)
        self.convnext_tiny_backbone = ConvNeXt(3, config.depths, config.dims)
        feature_dim = config.dims[-1]
        self.pos_embedding = nn.Parameter(torch.empty(1, config.num_tokens, feature_dim).normal_(std=0.02))
        self.linears = _mlp(feature_dim, out_dim)
        self.null_feature = nn.Parameter(torch.zeros(feature_dim))

    def forward(self, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        size = self.config.resize_input
        x = resized(maps, (size, size), self.config.type, "nearest", self.pos_embedding.dtype)
        if self.config.type in LABEL_TYPES:
            x = self.in_conv(x)
        features = self.convnext_tiny_backbone(x).flatten(2).transpose(1, 2)  # B, num_tokens, feature_dim
        features = _or_null(features, masks[:, None].expand(-1, features.shape[1]), self.null_feature)
        return self.linears(features + self.pos_embedding)


class MapDownsampler(nn.Module):
    """maps (B, C, H, W), the latent (h, w) -> extra UNet input channels (B, config.extra_channels, h, w)."""

    def __init__(self, config: MapConfig):
        super().__init__()
        self.config = config
        if config.type != "hed":
            channels_in = {"sem": SEM_CLASSES, "normal": 3}.get(config.type, 1)
            hidden = 16 if config.type in LABEL_TYPES else 4
            self.layers = nn.Sequential(nn.Conv2d(channels_in, hidden, 4, 2, 1), nn.SiLU(),
                                        nn.Conv2d(hidden, config.extra_channels, 4, 2, 1))

    def forward(self, maps: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        kind = self.config.type
        if kind in ("canny", "depth", "hed"):  # grey maps stored as RGB: one channel carries it all
            maps = maps[:, :1]
        if kind == "hed":
            return resized(maps, tuple(latent_size), kind, "bicubic", maps.dtype)
        size = (4 * latent_size[0], 4 * latent_size[1])
        return self.layers(resized(maps, size, kind, "bicubic", self.layers[0].weight.dtype))
