"""GroundingAdapter: everything GLIGEN adds to a frozen UNet, as one module and one file.

It holds the position net (entities -> grounding tokens: text-box, text-image-box, or
keypoint, `gligen.keypoints`), one gated self-attention per transformer block, and optionally
the reference-image projection (text-image-box) and zero-initialised extra UNet input
channels (inpainting on a 4-channel base).

On disk: `adapter_config.json` + `adapter.safetensors`. Tensor names are those of a
diffusers GLIGEN UNet (`position_net.*`, `<block path>.fuser.*`), so the adapter of a
diffusers or converted official release is a plain subset of its UNet state dict.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gligen.errors import UserError
from gligen.files import atomic_path, read_json, write_json
from gligen.fuser import GatedSelfAttention, attach_fusers, block_shape, detach_fusers, transformer_blocks
from gligen.grounding import GroundingInputs, TextBoxPositionNet, TextImageBoxPositionNet
from gligen.keypoints import MAX_PERSONS, KeypointPositionNet

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FEATURE_TYPES = ("text-box", "text-image-box", "keypoint")


@dataclass
class AdapterConfig:
    """What an adapter is made of.

    `blocks` maps each transformer block's module path in the UNet to its
    (dim, heads, head_dim). `positive_len` is the phrase embedding size (the text encoder's
    pooled output), `cross_attention_dim` the token size. `image_embed_dim` is the CLIP
    image embedding size (text-image-box only); `extra_in_channels` the zero-initialised
    UNet input channels added for inpainting (0 when the base already takes them);
    `max_entities` the number of grounding slots the adapter was trained with; `max_persons`
    the number of persons a keypoint adapter grounds (17 tokens each; keypoint only).
    """

    blocks: dict[str, tuple[int, int, int]]
    feature_type: str = "text-box"
    positive_len: int = 768
    cross_attention_dim: int = 768
    fourier_freqs: int = 8
    image_embed_dim: int | None = None
    extra_in_channels: int = 0
    max_entities: int = 30
    base_model: str | None = None
    max_persons: int | None = None

    def __post_init__(self):
        if self.feature_type not in FEATURE_TYPES:
            raise UserError(f"adapter feature_type must be one of {FEATURE_TYPES}, got {self.feature_type!r}")
        if self.feature_type == "keypoint" and self.max_persons is None:
            self.max_persons = MAX_PERSONS
        self.blocks = {path: tuple(shape) for path, shape in self.blocks.items()}

    @classmethod
    def from_dict(cls, data: Any, where: str = "adapter config") -> AdapterConfig:
        """Validate a parsed `adapter_config.json`; a UserError names `where` and the key at fault."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "extra"}  # a key, never used, that older adapter configs carry
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        if "blocks" not in data:
            raise UserError(f"{where}: missing key 'blocks'")
        blocks = data["blocks"]
        if not isinstance(blocks, dict) or not blocks:
            raise UserError(f"{where}: 'blocks' must be an object of block path -> [dim, heads, head_dim]")
        for path, shape in blocks.items():
            if not (isinstance(shape, list) and len(shape) == 3 and all(_positive(v) for v in shape)):
                raise UserError(f"{where}: 'blocks' -> {path!r} must be 3 positive integers [dim, heads, head_dim], "
                                f"got {shape!r}"[:300])
        if "feature_type" in data and data["feature_type"] not in FEATURE_TYPES:
            raise UserError(f"{where}: 'feature_type' must be one of {', '.join(FEATURE_TYPES)}, "
                            f"got {data['feature_type']!r}"[:300])
        for key in ("positive_len", "cross_attention_dim", "fourier_freqs", "max_entities"):
            if key in data and not _positive(data[key]):
                raise UserError(f"{where}: '{key}' must be a positive integer, got {data[key]!r}"[:300])
        checks = {
            "image_embed_dim": (lambda v: v is None or _positive(v), "a positive integer or null"),
            "extra_in_channels": (lambda v: _positive(v) or v == 0 and not isinstance(v, bool), "0 or a positive integer"),
            "base_model": (lambda v: v is None or isinstance(v, str), "a string or null"),
            "max_persons": (lambda v: v is None or _positive(v), "a positive integer or null"),
        }
        for key, (valid, wanted) in checks.items():
            if key in data and not valid(data[key]):
                raise UserError(f"{where}: '{key}' must be {wanted}, got {data[key]!r}"[:300])
        return cls(**data)


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_tensors(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str) -> None:
    """Raise a UserError naming the first tensor that `state` lacks, has extra, or shapes differently."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        problem = f"no tensor for {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        raise UserError(f"{where}: {problem} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise UserError(f"{where}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")


class ExtendedConvIn(nn.Module):
    """The base `conv_in` plus extra input channels: conv(x[:, :c], W_base) + conv(x[:, c:], W_extra).

    Equal to one convolution with the two weights concatenated along input channels;
    the base convolution is kept as it is.
    """

    def __init__(self, base: nn.Conv2d, extra_weight: nn.Parameter):
        super().__init__()
        self.base = base
        self.extra_weight = extra_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.base.in_channels
        extra = F.conv2d(x[:, c:], self.extra_weight, None, self.base.stride, self.base.padding)
        return self.base(x[:, :c]) + extra


class GroundingAdapter(nn.Module):
    """Position net + fusers (+ image projection, + extra input channels)."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        if config.feature_type == "keypoint":
            self.position_net = KeypointPositionNet(config.max_persons, config.cross_attention_dim, config.fourier_freqs)
        else:
            net = TextBoxPositionNet if config.feature_type == "text-box" else TextImageBoxPositionNet
            self.position_net = net(config.positive_len, config.cross_attention_dim, config.fourier_freqs)
        self.block_paths = list(config.blocks)
        self.fusers = nn.ModuleList(
            GatedSelfAttention(dim, config.cross_attention_dim, heads, head_dim)
            for dim, heads, head_dim in config.blocks.values()
        )
        self.image_projection = None
        if config.feature_type == "text-image-box":
            self.image_projection = nn.Linear(config.image_embed_dim or config.positive_len, config.positive_len, bias=False)
            self.image_projection.requires_grad_(False)
        self.conv_in_extra = None

    @classmethod
    def for_unet(
        cls, unet: nn.Module, feature_type: str = "text-box", positive_len: int | None = None, inpaint: bool = False,
        image_embed_dim: int | None = None, **config_kwargs,
    ) -> GroundingAdapter:
        """A fresh adapter (zero gates) fitting `unet`; `inpaint` adds 5 zero input channels to a 4-channel base."""
        cross = unet.config.cross_attention_dim
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        blocks = {path: block_shape(block) for path, block in transformer_blocks(unet).items()}
        extra = 5 if inpaint and unet.config.in_channels == 4 else 0
        config = AdapterConfig(
            blocks, feature_type, positive_len or cross, cross, image_embed_dim=image_embed_dim,
            extra_in_channels=extra, **config_kwargs,
        )
        adapter = cls(config)
        if extra:
            conv = unet.conv_in
            adapter.conv_in_extra = nn.Parameter(torch.zeros(conv.out_channels, extra, *conv.kernel_size))
        return adapter.to(unet.device)

    # --- grounding tokens and the UNet ---

    def tokens(self, inputs: GroundingInputs) -> torch.Tensor:
        """Grounding tokens (B, N, C) for text-box, (B, 2N, C) for text-image-box, (B, 17 max_persons, C) for keypoint."""
        if self.config.feature_type == "text-box":
            return self.position_net(inputs.boxes, inputs.masks, inputs.phrase_embeds)
        if self.config.feature_type == "keypoint":
            return self.position_net(inputs.points, inputs.point_masks)
        image_embeds = inputs.image_embeds
        if image_embeds is None:
            image_embeds = torch.zeros_like(inputs.phrase_embeds)
        image_masks = inputs.image_masks if inputs.image_masks is not None else torch.zeros_like(inputs.masks)
        phrase_masks = inputs.phrase_masks if inputs.phrase_masks is not None else inputs.masks
        return self.position_net(inputs.boxes, inputs.masks, inputs.phrase_embeds, image_embeds, phrase_masks, image_masks)

    def cross_attention_kwargs(self, tokens: torch.Tensor, scale: float = 1.0) -> dict | None:
        """The UNet's `cross_attention_kwargs` for this step at fuser scale `scale`; None at scale 0.

        At scale 0 the UNet gets no grounding at all, so the fusers cost nothing.
        """
        if scale == 0:
            return None
        for fuser in self.fusers:
            fuser.scale = scale
        return {"gligen": {"objs": tokens}}

    def check_fits(self, unet: nn.Module) -> None:
        """Raise a UserError naming the first adapter block that the UNet lacks or shapes differently."""
        blocks = transformer_blocks(unet)
        for path, shape in self.config.blocks.items():
            if path not in blocks:
                raise UserError(f"adapter does not fit the base UNet: it has no transformer block {path}")
            if block_shape(blocks[path]) != shape:
                raise UserError(
                    f"adapter does not fit the base UNet: block {path} is (dim, heads, head_dim) = "
                    f"{block_shape(blocks[path])} in the base but {shape} in the adapter"
                )
        if len(blocks) != len(self.config.blocks):
            missing = next(p for p in blocks if p not in self.config.blocks)
            raise UserError(f"adapter does not fit the base UNet: base block {missing} has no fuser")
        if self.conv_in_extra is not None and unet.conv_in.in_channels != 4:
            raise UserError(f"inpainting adapter expects a 4-channel base UNet, got {unet.conv_in.in_channels} channels")

    def attach(self, unet: nn.Module) -> None:
        """Put the fusers into `unet`'s blocks (and the extra input channels); base weights untouched."""
        self.check_fits(unet)
        attach_fusers(unet, dict(zip(self.block_paths, self.fusers)))
        if self.conv_in_extra is not None:
            unet.conv_in = ExtendedConvIn(unet.conv_in, self.conv_in_extra)

    def detach(self, unet: nn.Module) -> None:
        """Remove everything `attach` added: the UNet is exactly its base again."""
        detach_fusers(unet)
        if isinstance(unet.conv_in, ExtendedConvIn):
            unet.conv_in = unet.conv_in.base

    # --- files ---

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under diffusers GLIGEN UNet names."""
        state = {f"position_net.{k}": v for k, v in self.position_net.state_dict().items()}
        for path, fuser in zip(self.block_paths, self.fusers):
            state.update({f"{path}.fuser.{k}": v for k, v in fuser.state_dict().items()})
        if self.image_projection is not None:
            state["image_projection.weight"] = self.image_projection.weight
        if self.conv_in_extra is not None:
            state["conv_in_extra.weight"] = self.conv_in_extra
        return {k: v.detach().contiguous() for k, v in state.items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], where: str = "adapter") -> None:
        """Load tensors named as by `adapter_state_dict` (e.g. a subset of a GLIGEN UNet's state dict)."""
        if "conv_in_extra.weight" in state and self.conv_in_extra is None:
            self.conv_in_extra = nn.Parameter(torch.zeros_like(state["conv_in_extra.weight"]))
        check_tensors(self.adapter_state_dict(), state, where)
        targets = dict(self._named_targets())
        with torch.no_grad():
            for key, value in state.items():
                targets[key].copy_(value)

    def _named_targets(self):
        for k, v in self.position_net.state_dict(keep_vars=True).items():
            yield f"position_net.{k}", v
        for path, fuser in zip(self.block_paths, self.fusers):
            for k, v in fuser.state_dict(keep_vars=True).items():
                yield f"{path}.fuser.{k}", v
        if self.image_projection is not None:
            yield "image_projection.weight", self.image_projection.weight
        if self.conv_in_extra is not None:
            yield "conv_in_extra.weight", self.conv_in_extra

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` and `adapter.safetensors` into `directory`, atomically each."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file({k: v.cpu() for k, v in self.adapter_state_dict().items()}, str(tmp), metadata={"format": "pt"})
        write_json(directory / CONFIG_NAME, asdict(self.config))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> GroundingAdapter:
        """Load an adapter directory written by `save_pretrained` (or `gligen convert`)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise UserError(f"{directory}: not an adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        config = AdapterConfig.from_dict(read_json(config_path), str(config_path))
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as error:
            raise UserError(f"{weights_path}: not a safetensors file ({error})") from None
        adapter = cls(config)
        adapter.load_adapter_state_dict(state, where=str(weights_path))
        return adapter.to(dtype) if dtype is not None else adapter
