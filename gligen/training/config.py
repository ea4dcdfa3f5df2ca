"""Training configuration: nested dataclasses read from YAML, with `key=value` overrides.

    cfg = load_config("configs/sd14_text_box.yaml", ["optim.lr=1e-4", "data.shards=/data/{000..009}.tar"])
    cfg = load_config("sd14_text_box", [...])   # a config shipped in the package (gligen/configs/)

Override values are parsed as YAML (`1e-4`, `true`, `[a, b]`, `null`). Every unknown key
and every value of the wrong type raises a `UserError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from accelerate.utils import LoggerType

from gligen.errors import UserError, is_number
from gligen.schedule import parse_schedule

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"  # gligen/configs, shipped with the package
# accelerate's trackers (tensorboard, wandb, ...), "all" (those installed) or "none"
TRACKER_NAMES = tuple(str(kind) for kind in LoggerType) + ("none",)


@dataclass
class ModelConfig:
    """The frozen base and the adapter to train on it."""

    base: str = "CompVis/stable-diffusion-v1-4"  # diffusers SD directory or hub id
    revision: str | None = None
    feature_type: Literal["text-box", "text-image-box", "keypoint"] | None = "text-box"  # null: no boxes (a map adapter)
    max_persons: int = 8  # keypoint: persons grounded per image (17 tokens each), as the official release
    inpaint: bool = False  # 5 zero-initialised input channels; the boxes are masked out of the image
    # a map adapter (`gligen.maps`): shards written with `--condition TYPE`; sem maps need label files
    condition: Literal["canny", "hed", "depth", "normal", "sem"] | None = None
    condition_backbone: str | None = None  # transformers ConvNeXt initialising the map tokenizer (facebook/convnext-tiny-224)
    condition_resize_input: int = 256  # the map tokenizer's input side (official: 256 at 512 px, 64 tokens)
    image_encoder: str | None = None  # CLIP model (vision + text projection) for text-image-box
    adapter: str | None = None  # start from this adapter directory instead of a fresh one
    # the phrase feature: each text encoder's pooler_output (GLIGEN), or on SDXL the second encoder's projected
    # text_embeds in its place (GLIGEN-XL). null: model.adapter's, else pooler_output
    phrase_embedding: Literal["pooler_output", "projected"] | None = None
    # tanh of a fresh adapter's attention gates (GLIGEN: 0, so attaching changes nothing). On a small base trained
    # from scratch the adapter uses the boxes far sooner with them open: the demo's gained 2.2% loss from the
    # boxes at 500 steps with 0.5, 4e-5 with 0 (its generated placement had not followed yet at 5000 steps).
    gate_init: float = 0.0
    # the fusers add Fourier features of each visual token's place to their attention input (not in GLIGEN): on
    # the demo's small base, the boxes' loss gain at high noise reached 16.7% in 1500 steps with them, 0.02% without
    visual_positions: bool = False
    # the scheduled sampling [a, b, c] the exported adapter is released for, generation's default with it (null:
    # GLIGEN's for its kind); validation grids keep validation.schedule
    schedule: list[float] | None = None


@dataclass
class DataConfig:
    """Shards and what is done to each sample (see `gligen.training.dataset`)."""

    shards: str | list[str] = ""  # directory, path, brace pattern, URL or `pipe:` command, or a list
    resolution: int = 512
    random_crop: bool = True  # else a centre crop
    random_flip: bool = True
    min_box_area: float = 0.01  # boxes smaller than this fraction of the crop are dropped
    max_entities: int = 30
    caption_drop: float = 0.5  # probability of training a sample with an empty caption
    style_prob: float = 0.0  # text-image-box: probability of a style token, a random crop of the image itself
    shuffle_shards: bool = True
    shuffle_within_shard: bool = True
    num_workers: int = 2


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10000
    lr_schedule: Literal["constant", "cosine"] = "constant"
    max_grad_norm: float = 1.0
    gate_lr_scale: float = 1.0  # the fusers' zero-initialised gates learn at lr * this (they move slowly)
    use_8bit_adam: bool = False  # bitsandbytes' 8-bit AdamW: optimizer state in a quarter of the memory


@dataclass
class ValidationConfig:
    """Every `every` steps (0: never): fixed layouts generated, and the grounding gain measured."""

    layouts: str | None = None  # a layout file (.json / .jsonl)
    grounding_gain_samples: int = 0  # a fixed batch of this many shard samples: loss with grounding vs without
    every: int = 5000
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    schedule: list[float] = field(default_factory=lambda: [0.3, 0.0, 0.7])


@dataclass
class TrainConfig:
    output_dir: str = "runs/gligen"
    seed: int = 0
    batch_size: int = 8  # per process
    gradient_accumulation_steps: int = 1
    max_steps: int = 500000
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers", "eager"] = "sdpa"
    grounding_drop: float = 0.1  # probability of training a sample with null grounding (masks zeroed)
    ema_decay: float | None = None  # EMA of the adapter; the exported adapter is the EMA
    adapter_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # of the exported adapter/; checkpoints stay fp32
    cache_dir: str | None = None  # cache VAE latents and text embeddings here
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    log_every: int = 50
    max_bad_steps_in_a_row: int = 20  # NaN / infinite losses in a row before the run stops
    # [first, end) of the training timesteps, sampled uniformly; null: all. Scheduled sampling turns the
    # fusers off in the last (least noisy) steps, so an adapter for schedule [0.3, 0, 0.7] needs the noisy ones.
    timestep_range: list[int] | None = None
    # "none": the MSE of the UNet's own prediction (noise or velocity), as GLIGEN trains. "x0": the MSE of the
    # clean latents that prediction implies, i.e. each sample weighted by its noise-to-signal ratio: it stresses
    # the noisiest steps, where the layout is decided and the prediction's own error barely shows it.
    loss_weighting: Literal["none", "x0"] = "none"
    trust_pickle: bool = False  # resume from state files that need code to load (`--trust-pickle`)
    report_to: str | list[str] = "tensorboard"  # accelerate trackers (tensorboard, wandb, ...), "all" or "none"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self):
        checks = [
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be at least 1"),
            (self.max_steps >= 1, "max_steps", "must be at least 1"),
            (0 <= self.grounding_drop <= 1, "grounding_drop", "must be in [0, 1]"),
            (0 <= self.data.caption_drop <= 1, "data.caption_drop", "must be in [0, 1]"),
            (0 <= self.data.style_prob <= 1, "data.style_prob", "must be in [0, 1]"),
            (self.model.max_persons >= 1, "model.max_persons", "must be at least 1"),
            (-1 < self.model.gate_init < 1, "model.gate_init", "must be in (-1, 1) (it is a tanh)"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1)"),
            (self.data.resolution % 8 == 0 and self.data.resolution > 0, "data.resolution", "must be a positive multiple of 8"),
            (0 <= self.data.min_box_area < 1, "data.min_box_area", "must be in [0, 1)"),
            (self.data.max_entities >= 1, "data.max_entities", "must be at least 1"),
            (self.data.num_workers >= 0, "data.num_workers", "must be >= 0"),
            (self.optim.lr > 0, "optim.lr", "must be positive"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
            (len(self.optim.betas) == 2, "optim.betas", "must be two numbers"),
            (self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1"),
            (self.log_every >= 1, "log_every", "must be at least 1"),
            (self.max_bad_steps_in_a_row >= 1, "max_bad_steps_in_a_row", "must be at least 1"),
            (self.validation.every >= 0, "validation.every", "must be >= 0"),
            (self.validation.grounding_gain_samples >= 0, "validation.grounding_gain_samples", "must be >= 0"),
            (not (self.model.feature_type == "text-image-box" and not self.model.image_encoder),
             "model.image_encoder", "is required for feature_type text-image-box"),
            (bool(self.data.shards), "data.shards", "must name the training shards"),
            (self.model.feature_type is not None or self.model.condition is not None, "model.feature_type",
             "may be null only with a model.condition (a map adapter)"),
            (not (self.model.condition and self.model.inpaint), "model.inpaint", "cannot go with a model.condition"),
            (self.timestep_range is None or len(self.timestep_range) == 2 and 0 <= self.timestep_range[0]
             < self.timestep_range[1], "timestep_range", "must be [first, end) with 0 <= first < end"),
        ]
        for ok, key, rule in checks:
            if not ok:
                raise UserError(f"config key {key} {rule}")
        self.report_to = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        for name in self.report_to:
            if name not in TRACKER_NAMES:
                raise UserError(f"config key report_to: {name!r} is not one of {', '.join(TRACKER_NAMES)}")
        for key, schedule in (("validation.schedule", self.validation.schedule), ("model.schedule", self.model.schedule)):
            if schedule is not None:
                try:
                    parse_schedule(schedule)
                except UserError as error:
                    raise UserError(f"config key {key}: {error}") from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A `TrainConfig` from a YAML file or a shipped config's name (or the defaults) and `key=value` dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = config_path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise UserError(f"{path}: invalid YAML ({error})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a config must be a mapping of keys to values")
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise UserError(f"override {override!r} must look like key=value (e.g. optim.lr=1e-4)")
        _set_dotted(data, key.strip(), _parse_value(text, key))
    return build(TrainConfig, data)


def config_path(name_or_path: str | Path) -> Path:
    """A config file: the path itself if it exists, else the shipped config of that name (`sd14_text_box[.yaml]`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIGS_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    raise UserError(f"{name_or_path}: config file not found, nor a shipped config ({names})")


def _parse_value(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"override {key}: cannot parse value {text!r}") from None


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key}: {'.'.join(parents[:i + 1])} is not a section")
    node[last] = value


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a mapping, checking every key and value type."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise UserError(f"config key {where} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise UserError(f"unknown config key {prefix}{key} (known in {where}: {', '.join(sorted(names))})")
    values = {key: _check(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    return cls(**values)


def _check(hint: Any, value: Any, key: str) -> Any:
    """`value` if it fits type `hint` (ints are accepted as floats), else a UserError naming `key`."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, f"{key}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check(arg, value, key)
            except UserError:
                continue
        raise UserError(f"config key {key}: {value!r} is not {_describe(hint)}")
    if origin is Literal:
        if value in args:
            return value
        raise UserError(f"config key {key}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key {key}: {value!r} is not a list")
        return [_check(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is type(None) and value is None:
        return None
    if hint is float and is_number(value):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `5e-5` (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            number = None
        if is_number(number):
            return number
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise UserError(f"config key {key}: {value!r} is not {_describe(hint)}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return "a list"
    if typing.get_origin(hint) is Literal:
        return " or ".join(map(str, typing.get_args(hint)))
    args = typing.get_args(hint)
    if args:
        return " or ".join(_describe(a) for a in args)
    return "null" if hint is type(None) else f"a {getattr(hint, '__name__', hint)}"
