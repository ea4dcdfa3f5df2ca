"""GroundingAdapter: everything GLIGEN adds to a frozen UNet, as one module and one file.

It holds the position net (entities -> grounding tokens: text-box, text-image-box, or
keypoint, `gligen.keypoints`), one gated self-attention per transformer block, and optionally
the reference-image projection (text-image-box), zero-initialised extra UNet input channels
(inpainting on a 4-channel base), and a map condition's tokenizer and downsampler
(`gligen.maps`), whose output takes the extra channels.

On disk: `adapter_config.json` + `adapter.safetensors`. Tensor names are those of a
diffusers GLIGEN UNet (`position_net.*`, `<block path>.fuser.*`), so the adapter of a
diffusers or converted official release is a plain subset of its UNet state dict.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gligen.bundled import looks_like_repo_id
from gligen.errors import UserError
from gligen.files import atomic_path, read_json, write_json
from gligen.fuser import POSITION_OCTAVES, GatedSelfAttention, attach_fusers, block_shape, detach_fusers, transformer_blocks
from gligen.grounding import GroundingInputs, TextBoxPositionNet, TextImageBoxPositionNet
from gligen.keypoints import MAX_PERSONS, KeypointPositionNet
from gligen.maps.nets import MapConfig, MapDownsampler, MapTokenizer
from gligen.schedule import Schedule, parse_schedule

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FEATURE_TYPES = ("text-box", "text-image-box", "keypoint")
PHRASE_EMBEDDINGS = ("pooler_output", "projected")


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
    `phrase_embedding` is the phrase feature it was trained with: "pooler_output" (each text
    encoder's pooled output before any projection, as official GLIGEN) or "projected" (SDXL, as
    GLIGEN-XL: the first encoder's pooled output and the second's projected `text_embeds`).
    `condition` a map condition's networks (`gligen.maps.nets.MapConfig`); its downsampler's
    channels are then the extra input channels. `feature_type` None: no entity grounding (a map only).
    `visual_positions`: the fusers add Fourier features of each visual token's place to their attention
    input (`gligen.fuser`; not in official GLIGEN, so such an adapter exports to neither diffusers nor ComfyUI).
    `schedule`: the scheduled sampling [a, b, c] the adapter is released for, generation's default (None: GLIGEN's
    for its kind, `GligenPipeline.default_schedule`).
    """

    blocks: dict[str, tuple[int, int, int]]
    feature_type: str | None = "text-box"
    positive_len: int = 768
    cross_attention_dim: int = 768
    fourier_freqs: int = 8
    image_embed_dim: int | None = None
    extra_in_channels: int = 0
    max_entities: int = 30
    base_model: str | None = None
    max_persons: int | None = None
    phrase_embedding: str = "pooler_output"
    condition: MapConfig | None = None
    visual_positions: bool = False
    schedule: Schedule | None = None

    def __post_init__(self):
        if isinstance(self.condition, dict):
            self.condition = MapConfig.from_dict(self.condition, "adapter condition")
        if self.feature_type not in FEATURE_TYPES and not (self.feature_type is None and self.condition is not None):
            raise UserError(f"adapter feature_type must be one of {FEATURE_TYPES}, got {self.feature_type!r}")
        if self.phrase_embedding not in PHRASE_EMBEDDINGS:
            raise UserError(f"adapter phrase_embedding must be one of {PHRASE_EMBEDDINGS}, got {self.phrase_embedding!r}")
        if self.feature_type == "keypoint" and self.max_persons is None:
            self.max_persons = MAX_PERSONS
        self.blocks = {path: tuple(shape) for path, shape in self.blocks.items()}
        if self.schedule is not None:
            self.schedule = parse_schedule(self.schedule)

    @property
    def projected_phrases(self) -> bool:
        """Whether the phrase embeddings are GLIGEN-XL's, with the second encoder's projected `text_embeds`."""
        return self.phrase_embedding == "projected"

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
        if data.get("condition") is not None:
            MapConfig.from_dict(data["condition"], f"{where}: 'condition'")
        map_only = "feature_type" in data and data["feature_type"] is None and data.get("condition") is not None
        for key, allowed in (("feature_type", FEATURE_TYPES), ("phrase_embedding", PHRASE_EMBEDDINGS)):
            if key in data and data[key] not in allowed and not (key == "feature_type" and map_only):
                raise UserError(f"{where}: '{key}' must be one of {', '.join(allowed)}, got {data[key]!r}"[:300])
        for key in ("positive_len", "cross_attention_dim", "fourier_freqs", "max_entities"):
            if key in data and not _positive(data[key]):
                raise UserError(f"{where}: '{key}' must be a positive integer, got {data[key]!r}"[:300])
        checks = {
            "image_embed_dim": (lambda v: v is None or _positive(v), "a positive integer or null"),
            "extra_in_channels": (lambda v: _positive(v) or v == 0 and not isinstance(v, bool), "0 or a positive integer"),
            "base_model": (lambda v: v is None or isinstance(v, str), "a string or null"),
            "max_persons": (lambda v: v is None or _positive(v), "a positive integer or null"),
            "visual_positions": (lambda v: isinstance(v, bool), "true or false"),
            "schedule": (lambda v: v is None or isinstance(v, list), "a list [a, b, c] of fractions or null"),
        }
        for key, (valid, wanted) in checks.items():
            if key in data and not valid(data[key]):
                raise UserError(f"{where}: '{key}' must be {wanted}, got {data[key]!r}"[:300])
        if data.get("schedule") is not None:
            try:
                parse_schedule(data["schedule"])
            except UserError as error:
                raise UserError(f"{where}: 'schedule': {error}"[:300]) from None
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

    Equal to one convolution with the two weights concatenated along input channels; the base
    convolution is kept as it is. `trained_base` (official map releases, which trained the whole
    first conv: its base channels and bias) replaces the base convolution while extra channels come in.
    Given no extra channels (a map condition at grounding scale 0) it is the base convolution alone,
    as official GLIGEN restores SD's first conv there.
    """

    def __init__(self, base: nn.Conv2d, extra_weight: nn.Parameter, trained_base: nn.Conv2d | None = None):
        super().__init__()
        self.base = base
        self.extra_weight = extra_weight
        self.trained_base = trained_base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.base.in_channels
        if x.shape[1] == c:
            return self.base(x)
        extra = F.conv2d(x[:, c:], self.extra_weight, None, self.base.stride, self.base.padding)
        base = self.base if self.trained_base is None else self.trained_base
        return base(x[:, :c]) + extra


class GroundingAdapter(nn.Module):
    """Position net + fusers (+ image projection, + extra input channels)."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.position_net = None
        if config.feature_type == "keypoint":
            self.position_net = KeypointPositionNet(config.max_persons, config.cross_attention_dim, config.fourier_freqs)
        elif config.feature_type is not None:
            net = TextBoxPositionNet if config.feature_type == "text-box" else TextImageBoxPositionNet
            self.position_net = net(config.positive_len, config.cross_attention_dim, config.fourier_freqs)
        self.block_paths = list(config.blocks)
        self.fusers = nn.ModuleList(
            GatedSelfAttention(dim, config.cross_attention_dim, heads, head_dim,
                               position_octaves=POSITION_OCTAVES if config.visual_positions else 0)
            for dim, heads, head_dim in config.blocks.values()
        )
        self.image_projection = None
        if config.feature_type == "text-image-box":
            self.image_projection = nn.Linear(config.image_embed_dim or config.positive_len, config.positive_len, bias=False)
            self.image_projection.requires_grad_(False)
        self.map_tokenizer = self.map_downsampler = None
        if config.condition is not None:
            self.map_tokenizer = MapTokenizer(config.condition, config.cross_attention_dim)
            self.map_downsampler = MapDownsampler(config.condition)
        self.conv_in_extra = None
        self.conv_in_base = None  # an official map release's trained first conv, its base channels (`ExtendedConvIn`)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def for_unet(
        cls, unet: nn.Module, feature_type: str | None = "text-box", positive_len: int | None = None,
        inpaint: bool = False, image_embed_dim: int | None = None, condition: MapConfig | None = None, **config_kwargs,
    ) -> GroundingAdapter:
        """A fresh adapter (zero gates) fitting `unet`; `inpaint` adds 5 zero input channels to a 4-channel base,
        a `condition` its downsampler's channels."""
        cross = unet.config.cross_attention_dim
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        blocks = {path: block_shape(block) for path, block in transformer_blocks(unet).items()}
        extra = 5 if inpaint and unet.config.in_channels == 4 else 0
        if condition is not None:
            if inpaint:
                raise UserError("an adapter grounds a map or inpaints, not both (official GLIGEN has no such model)")
            extra = condition.extra_channels
        config = AdapterConfig(
            blocks, feature_type, positive_len or cross, cross, image_embed_dim=image_embed_dim,
            extra_in_channels=extra, condition=condition, **config_kwargs,
        )
        adapter = cls(config)
        if extra:
            conv = unet.conv_in
            adapter.conv_in_extra = nn.Parameter(torch.zeros(conv.out_channels, extra, *conv.kernel_size))
        return adapter.to(unet.device)

    # --- grounding tokens and the UNet ---

    def tokens(self, inputs: GroundingInputs) -> torch.Tensor:
        """Grounding tokens (B, N, C) for text-box, (B, 2N, C) for text-image-box, (B, 17 max_persons, C) for keypoint;
        a map's tokens follow.

        A text-image-box slot whose phrase mask is 0 (an image without a phrase, as official
        GLIGEN's style token) gets the null text feature.
        """
        parts = [] if self.position_net is None else [self._entity_tokens(inputs)]
        if self.map_tokenizer is not None:
            parts.append(self.map_tokenizer(inputs.maps, inputs.map_masks))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @property
    def inpaints(self) -> bool:
        """Whether its extra input channels take the inpainting input (a map adapter's take the map)."""
        return self.conv_in_extra is not None and self.map_downsampler is None

    @property
    def condition_type(self) -> str | None:
        """The map condition this adapter grounds (`gligen.maps.CONDITION_TYPES`), or None."""
        return self.config.condition.type if self.config.condition is not None else None

    def map_channels(self, inputs: GroundingInputs, latent_size: tuple[int, int]) -> torch.Tensor | None:
        """The map's extra UNet input channels (B, extra_in_channels, h, w); None without a map condition."""
        if self.map_downsampler is None:
            return None
        return self.map_downsampler(inputs.maps, latent_size)

    def _entity_tokens(self, inputs: GroundingInputs) -> torch.Tensor:
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

    def forward(self, inputs: GroundingInputs) -> torch.Tensor:
        """`tokens`: a module call, so that offloading hooks bring the position net to the device."""
        return self.tokens(inputs)

    def cross_attention_kwargs(self, tokens: torch.Tensor, scale: float = 1.0, extra: dict | None = None,
                               latent_size: tuple[int, int] | None = None) -> dict | None:
        """The UNet's `cross_attention_kwargs` for this step at fuser scale `scale` (plus the user's `extra`, e.g.
        {"scale": a LoRA scale}); without grounding at scale 0, so that the fusers cost nothing.

        The scale (and the UNet input's (h, w) `latent_size`, which visual positions need) is written into
        the fusers in place (see `GatedSelfAttention`).
        """
        if scale == 0:
            return extra or None
        for fuser in self.fusers:
            fuser.set_scale(scale)
            if latent_size is not None:
                fuser.set_latent_size(latent_size)
        return {**(extra or {}), "gligen": {"objs": tokens}}

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
            raise UserError(f"this adapter adds input channels to a 4-channel base UNet, got {unet.conv_in.in_channels} channels")

    def attach(self, unet: nn.Module) -> None:
        """Put the fusers into `unet`'s blocks (and the extra input channels); base weights untouched."""
        self.check_fits(unet)
        attach_fusers(unet, dict(zip(self.block_paths, self.fusers)))
        if self.conv_in_extra is not None:
            unet.conv_in = ExtendedConvIn(unet.conv_in, self.conv_in_extra, self.conv_in_base)

    def detach(self, unet: nn.Module) -> None:
        """Remove everything `attach` added: the UNet is exactly its base again."""
        detach_fusers(unet)
        if isinstance(unet.conv_in, ExtendedConvIn):
            unet.conv_in = unet.conv_in.base

    # --- files ---

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under diffusers GLIGEN UNet names (a map's networks: the official names under `map_tokenizer.`,
        `map_downsampler.`)."""
        return {k: v.detach().contiguous() for k, v in self._named_targets()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], where: str = "adapter") -> None:
        """Load tensors named as by `adapter_state_dict` (e.g. a subset of a GLIGEN UNet's state dict)."""
        if "conv_in_extra.weight" in state and self.conv_in_extra is None:
            self.conv_in_extra = nn.Parameter(torch.zeros_like(state["conv_in_extra.weight"]))
        if "conv_in_base.weight" in state and self.conv_in_base is None:
            out_channels, in_channels, size, _ = state["conv_in_base.weight"].shape
            self.conv_in_base = nn.Conv2d(in_channels, out_channels, size, padding=size // 2)
        check_tensors(self.adapter_state_dict(), state, where)
        targets = dict(self._named_targets())
        with torch.no_grad():
            for key, value in state.items():
                targets[key].copy_(value)

    def _named_targets(self):
        for prefix in ("position_net", "map_tokenizer", "map_downsampler", "conv_in_base"):
            module = getattr(self, prefix)
            if module is not None:
                yield from ((f"{prefix}.{k}", v) for k, v in module.state_dict(keep_vars=True).items())
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
    def from_pretrained(cls, source: str | os.PathLike, dtype: torch.dtype | None = None, revision: str | None = None,
                        subfolder: str | None = None) -> GroundingAdapter:
        """Load an adapter directory written by `save_pretrained` (or `gligen convert`), or a hub repository id
        (at `revision`: a branch, tag or commit) holding one, in `subfolder` if given."""
        directory = adapter_files(source, revision, subfolder)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        config = AdapterConfig.from_dict(read_json(config_path), str(config_path))
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as error:
            raise UserError(f"{weights_path}: not a safetensors file ({error})") from None
        adapter = cls(config)
        adapter.load_adapter_state_dict(state, where=str(weights_path))
        return adapter.to(dtype) if dtype is not None else adapter

    def push_to_hub(self, repo_id: str, card: ModelCard | None = None, private: bool | None = None,
                    token: str | None = None, revision: str | None = None, commit_message: str = "Upload adapter") -> str:
        """Upload the adapter (config, weights) and a model card (README.md) to the hub repository `repo_id`,
        created if needed. -> the URL of the commit."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        card = card or ModelCard()
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            (Path(folder) / "README.md").write_text(card.render(self.config, repo_id), encoding="utf-8")
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                       commit_message=commit_message)
        return str(getattr(commit, "commit_url", commit))


def adapter_files(source: str | os.PathLike, revision: str | None = None, subfolder: str | None = None) -> Path:
    """The local directory holding an adapter's config and weights: `source` itself, or the hub cache's copy
    of repository `source` (downloaded unless offline). A UserError names what is missing."""
    local = Path(source) / (subfolder or "")
    if local.is_dir() or Path(source).exists() or not looks_like_repo_id(str(source)):
        if not (local / CONFIG_NAME).is_file() or not (local / WEIGHTS_NAME).is_file():
            raise UserError(f"{local}: not an adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        return local
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        paths = [hf_hub_download(str(source), name, subfolder=subfolder, revision=revision)
                 for name in (CONFIG_NAME, WEIGHTS_NAME)]
    except (OSError, ValueError, HFValidationError) as error:
        at = f" at revision {revision}" if revision else ""
        raise UserError(f"{source}{at}: cannot load an adapter from the hub ({str(error).splitlines()[0]})") from None
    return Path(paths[0]).parent


@dataclass
class ModelCard:
    """What a model card says beyond the adapter config: the training data, steps and scores, when known."""

    training_data: str | None = None
    steps: int | None = None
    scores: dict[str, float] | None = None
    notes: str | None = None

    def render(self, config: AdapterConfig, repo_id: str) -> str:
        """README.md: hub metadata (library, base model, tags) and what the adapter is and how to use it."""
        meta = ["---", "library_name: gligen", "tags:", "- gligen", "- layout-to-image", "- text-to-image"]
        if config.base_model:
            meta.append(f"base_model: {config.base_model}")
        meta.append("---")
        facts = [
            ("base model", config.base_model or "unknown"),
            ("grounding", config.feature_type),
            ("phrase embedding", config.phrase_embedding),
            ("fusers", str(len(config.blocks))),
            ("grounding slots", str(config.max_entities)),
            ("training data", self.training_data or "unknown"),
            ("training steps", str(self.steps) if self.steps is not None else "unknown"),
        ]
        lines = meta + ["", f"# {repo_id}", "", "A GLIGEN grounding adapter (position net + gated self-attention "
                        "fusers) for a frozen Stable Diffusion base, made with `gligen`.", "",
                        "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in facts]
        if self.scores:
            lines += ["", "## Scores", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {name} | {value:.4g} |" for name, value in self.scores.items()]
        if self.notes:
            lines += ["", self.notes]
        base = config.base_model or "BASE_MODEL"
        lines += ["", "## Use", "", "```bash",
                  f"gligen generate --model {base} --adapter {repo_id} --layout layouts.jsonl --out out/", "```", "",
                  "```python", "from gligen.pipeline import GligenPipeline", "",
                  f'pipe = GligenPipeline.from_pretrained("{base}", adapter="{repo_id}")', "```", ""]
        return "\n".join(lines)
