"""Loading detector checkpoints (configs of every family, Grounding DINO models), and converting
the official IDEA-Research Grounding DINO release.

`load_detector` opens anything transformers' `GroundingDinoForObjectDetection` (or
`MMGroundingDinoForObjectDetection`, when the config says `mm-grounding-dino`) opens: a local
directory or a hub id. `convert_official` turns the official `groundingdino_swint_ogc.pth` /
`groundingdino_swinb_cogcoor.pth` (a pickled dict whose `model` entry holds the state dict,
keys prefixed `module.`) into such a directory. The pickle is read with
`gligen.safe_pickle`, which rebuilds only tensors and plain containers, so no code from the
file ever runs. Key names follow transformers' own conversion script
(`convert_grounding_dino_to_hf.py`): the result is in the layout of the hub checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    BertConfig,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    MMGroundingDinoForObjectDetection,
    SwinConfig,
)
from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

from detector.preprocess import ImageSettings
from gligen.bundled import resolve_model
from gligen.errors import UserError
from gligen.files import atomic_directory
from gligen.safe_pickle import Inert, inert_objects, load_checkpoint

MODEL_CLASSES = {
    "grounding-dino": GroundingDinoForObjectDetection,
    "mm-grounding-dino": MMGroundingDinoForObjectDetection,
}


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_config(path_or_id: str, model_types: Mapping[str, object] = MODEL_CLASSES, what: str = "detector"):
    """The checkpoint's config; a `UserError` when `path_or_id` is no checkpoint of one of `model_types`
    (default: the Grounding DINO family, which `load_detector` and `detector train` take). `what` names
    the kind of checkpoint in the messages ("detector", "SAM")."""
    local = Path(path_or_id)
    if local.is_file():
        hint = " (an official .pth checkpoint converts with `detector convert`)" if what == "detector" else ""
        raise UserError(f"{path_or_id}: is a file, not a {what} checkpoint directory{hint}")
    if local.is_dir() and not (local / "config.json").is_file():
        raise UserError(f"{path_or_id}: has no config.json, so it is no {what} checkpoint directory")
    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError) as error:
        raise UserError(f"{path_or_id}: cannot load a {what} checkpoint ({first_line(error)})") from error
    if config.model_type not in model_types:
        kind = "Grounding DINO checkpoint" if model_types is MODEL_CLASSES else f"{what} checkpoint this project runs"
        raise UserError(
            f"{path_or_id}: model_type {config.model_type!r} is no {kind} (expected one of {sorted(model_types)})"
        )
    return config


def image_settings(path_or_id: str) -> ImageSettings:
    """Resize and normalization settings of the checkpoint's image processor (defaults if it has none)."""
    try:
        processor = AutoImageProcessor.from_pretrained(path_or_id)
    except (OSError, ValueError):
        return ImageSettings()
    size = processor.size
    return ImageSettings(
        shortest_edge=int(size["shortest_edge"]),
        longest_edge=int(size["longest_edge"] or size["shortest_edge"]),
        mean=tuple(float(v) for v in processor.image_mean),
        std=tuple(float(v) for v in processor.image_std),
    )


@contextlib.contextmanager
def loading(path_or_id: str) -> Iterator[None]:
    """Turn what transformers raises for a checkpoint it cannot load into one `UserError` naming it."""
    try:
        yield
    except (OSError, ValueError) as error:
        raise UserError(f"{path_or_id}: cannot load the detector ({first_line(error)})") from error


def load_detector(path_or_id: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode on `device` in `dtype`, fast tokenizer, image settings) of a checkpoint.

    `"demo"` names the bundled shapes-world detector (`gligen.demo`).
    """
    path_or_id = resolve_model(path_or_id, "detector")
    config = load_config(path_or_id)
    with loading(path_or_id):
        model = MODEL_CLASSES[config.model_type].from_pretrained(path_or_id, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    if not tokenizer.is_fast:
        raise UserError(f"{path_or_id}: the tokenizer has no fast version, which character spans need")
    return model.to(device).eval(), tokenizer, image_settings(path_or_id)


# ---------------------------------------------------------------- official checkpoint conversion

_SWIN = "model.backbone.conv_encoder.model."
_BLOCK = r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\."
_SWIN_BLOCK = _SWIN + r"encoder.layers.\1.blocks.\2."
_ENC = r"^transformer\.encoder\.layers\.(\d+)\."
_TEXT = r"^transformer\.encoder\.text_layers\.(\d+)\."
_FUSE = r"^transformer\.encoder\.fusion_layers\.(\d+)\."
_DEC = r"^transformer\.decoder\.layers\.(\d+)\."

# (official key pattern, hub key replacement); the first matching rule renames a key.
RENAMES: list[tuple[str, str]] = [
    (r"^backbone\.0\.patch_embed\.proj\.", _SWIN + "embeddings.patch_embeddings.projection."),
    (r"^backbone\.0\.patch_embed\.norm\.", _SWIN + "embeddings.norm."),
    (_BLOCK + r"norm1\.", _SWIN_BLOCK + "layernorm_before."),
    (_BLOCK + r"norm2\.", _SWIN_BLOCK + "layernorm_after."),
    (_BLOCK + r"attn\.relative_position_bias_table$", _SWIN_BLOCK + "attention.self.relative_position_bias_table"),
    (_BLOCK + r"attn\.proj\.", _SWIN_BLOCK + "attention.output.dense."),
    (_BLOCK + r"mlp\.fc1\.", _SWIN_BLOCK + "intermediate.dense."),
    (_BLOCK + r"mlp\.fc2\.", _SWIN_BLOCK + "output.dense."),
    (r"^backbone\.0\.layers\.(\d+)\.downsample\.", _SWIN + r"encoder.layers.\1.downsample."),
    (_ENC + r"self_attn\.", r"model.encoder.layers.\1.deformable_layer.self_attn."),
    (_ENC + r"norm1\.", r"model.encoder.layers.\1.deformable_layer.self_attn_layer_norm."),
    (_ENC + r"linear1\.", r"model.encoder.layers.\1.deformable_layer.fc1."),
    (_ENC + r"linear2\.", r"model.encoder.layers.\1.deformable_layer.fc2."),
    (_ENC + r"norm2\.", r"model.encoder.layers.\1.deformable_layer.final_layer_norm."),
    (_TEXT + r"self_attn\.out_proj\.", r"model.encoder.layers.\1.text_enhancer_layer.self_attn.out_proj."),
    (_TEXT + r"linear1\.", r"model.encoder.layers.\1.text_enhancer_layer.fc1."),
    (_TEXT + r"linear2\.", r"model.encoder.layers.\1.text_enhancer_layer.fc2."),
    (_TEXT + r"norm1\.", r"model.encoder.layers.\1.text_enhancer_layer.layer_norm_before."),
    (_TEXT + r"norm2\.", r"model.encoder.layers.\1.text_enhancer_layer.layer_norm_after."),
    (_FUSE + r"gamma_v$", r"model.encoder.layers.\1.fusion_layer.vision_param"),
    (_FUSE + r"gamma_l$", r"model.encoder.layers.\1.fusion_layer.text_param"),
    (_FUSE + r"layer_norm_v\.", r"model.encoder.layers.\1.fusion_layer.layer_norm_vision."),
    (_FUSE + r"layer_norm_l\.", r"model.encoder.layers.\1.fusion_layer.layer_norm_text."),
    (_FUSE + r"attn\.v_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.vision_proj."),
    (_FUSE + r"attn\.l_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.text_proj."),
    (_FUSE + r"attn\.values_v_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.values_vision_proj."),
    (_FUSE + r"attn\.values_l_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.values_text_proj."),
    (_FUSE + r"attn\.out_v_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.out_vision_proj."),
    (_FUSE + r"attn\.out_l_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.out_text_proj."),
    (_DEC + r"cross_attn\.", r"model.decoder.layers.\1.encoder_attn."),
    (_DEC + r"norm1\.", r"model.decoder.layers.\1.encoder_attn_layer_norm."),
    (_DEC + r"ca_text\.out_proj\.", r"model.decoder.layers.\1.encoder_attn_text.out_proj."),
    (_DEC + r"catext_norm\.", r"model.decoder.layers.\1.encoder_attn_text_layer_norm."),
    (_DEC + r"self_attn\.out_proj\.", r"model.decoder.layers.\1.self_attn.out_proj."),
    (_DEC + r"norm2\.", r"model.decoder.layers.\1.self_attn_layer_norm."),
    (_DEC + r"linear1\.", r"model.decoder.layers.\1.fc1."),
    (_DEC + r"linear2\.", r"model.decoder.layers.\1.fc2."),
    (_DEC + r"norm3\.", r"model.decoder.layers.\1.final_layer_norm."),
    (r"^transformer\.decoder\.norm\.", "model.decoder.layer_norm."),
    (r"^transformer\.decoder\.ref_point_head\.", "model.decoder.reference_points_head."),
    (r"^transformer\.decoder\.bbox_embed\.", "model.decoder.bbox_embed."),
    (r"^transformer\.enc_output", "model.enc_output"),  # enc_output.* and enc_output_norm.*
    (r"^transformer\.enc_out_bbox_embed\.", "model.encoder_output_bbox_embed."),
    (r"^transformer\.level_embed$", "model.level_embed"),
    (r"^transformer\.tgt_embed\.", "model.query_position_embeddings."),
    (r"^bert\.", "model.text_backbone."),
    (r"^input_proj\.", "model.input_proj_vision."),
    (r"^feat_map\.", "model.text_projection."),
    (r"^bbox_embed\.", "bbox_embed."),
]

# Fused query/key/value projections, split in thirds (query, key, value) into {part}.
SPLITS: list[tuple[str, str]] = [
    (_BLOCK + r"attn\.qkv\.(weight|bias)$", _SWIN_BLOCK + r"attention.self.{part}.\3"),
    (_TEXT + r"self_attn\.in_proj_(weight|bias)$", r"model.encoder.layers.\1.text_enhancer_layer.self_attn.{part}.\2"),
    (_DEC + r"self_attn\.in_proj_(weight|bias)$", r"model.decoder.layers.\1.self_attn.{part}.\2"),
    (_DEC + r"ca_text\.in_proj_(weight|bias)$", r"model.decoder.layers.\1.encoder_attn_text.{part}.\2"),
]

# Buffers the official code saves and transformers rebuilds itself.
IGNORED = (r"\.relative_position_index$", r"^bert\.embeddings\.position_ids$", r"^bert\.pooler\.")

# Backbone weights transformers creates but the detector never uses (Swin's final norm).
UNUSED_MISSING = (r"conv_encoder\.model\.(swin\.)?layernorm\.",)


def _norm_rename(key: str) -> str | None:
    """`backbone.0.norm{i}.*` (Swin's per-output norms) -> `hidden_states_norms.stage{i+1}.*`."""
    match = re.match(r"^backbone\.0\.norm(\d+)\.(.+)$", key)
    return match and f"{_SWIN}hidden_states_norms.stage{int(match[1]) + 1}.{match[2]}"


def official_to_hub(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an official state dict (no `module.` prefix) to hub key names.

    Returns (renamed state dict, official keys that no rule knows).
    """
    out, unknown = {}, []
    for key, value in state.items():
        if any(re.search(p, key) for p in IGNORED):
            continue
        split = next(((p, r) for p, r in SPLITS if re.match(p, key)), None)
        if split:
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[re.sub(split[0], split[1].replace("{part}", part), key)] = chunk.contiguous()
            continue
        new = _norm_rename(key) or next((re.sub(p, r, key) for p, r in RENAMES if re.match(p, key)), None)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    return out, unknown


def read_official_checkpoint(src: str | os.PathLike, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an official checkpoint's `model` entry, read without running code from the file
    (unless `trust_pickle`).

    Objects other than tensors and plain containers (say, the training arguments beside the
    weights) stay inert records (`gligen.safe_pickle`); one inside the state dict is an error.
    """
    obj = load_checkpoint(src, trust_pickle)
    if isinstance(obj, Inert):
        raise UserError(f"{src}: the file is a pickled {obj.qualname} object that needs its code to load; "
                        "not loaded (--trust-pickle only if you trust the file)")
    nested = isinstance(obj, dict) and "model" in obj  # else a bare state dict
    state, prefix = (obj["model"], "model/") if nested else (obj, "")
    if not isinstance(state, dict):
        raise UserError(f"{src}: has no state dict under a 'model' key, so it is no detector checkpoint")
    for where, inert in inert_objects(state):
        raise UserError(f"{src}: {prefix}{where} is a {inert.qualname}, which only code could rebuild; "
                        "not loaded (--trust-pickle only if you trust the file)")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"{src}: {prefix}{bad} is no tensor, so this is no detector checkpoint")
    return {k.removeprefix("module."): v for k, v in state.items()}


def release_config(state: dict[str, torch.Tensor]) -> GroundingDinoConfig:
    """The config of the official release whose Swin backbone matches `state` (Swin-T or Swin-B)."""
    key = "backbone.0.patch_embed.proj.weight"
    if key not in state:
        raise UserError(f"checkpoint has no {key}: no Swin Grounding DINO; pass --config")
    embed_dim = state[key].shape[0]
    swin = {
        96: dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, image_size=224),
        128: dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12, image_size=384),
    }.get(embed_dim)
    if swin is None:
        raise UserError(f"Swin embedding size {embed_dim} matches no official release (96 or 128); pass --config")
    return GroundingDinoConfig(backbone_config=SwinConfig(out_indices=[2, 3, 4], **swin), text_config=BertConfig())


def _load_checked(directory: Path) -> torch.nn.Module:
    """Load a converted directory through transformers; a `UserError` if a used weight is missing."""
    model, info = GroundingDinoForObjectDetection.from_pretrained(directory, output_loading_info=True)
    missing = sorted(k for k in info["missing_keys"] if not any(re.search(p, k) for p in UNUSED_MISSING))
    if missing or info["mismatched_keys"]:
        problems = missing or [str(m) for m in info["mismatched_keys"]]
        kind = "misses" if missing else "has wrongly shaped"
        raise UserError(
            f"the checkpoint {kind} {len(problems)} weights of this config (first: {problems[0]}); "
            "pass the matching --config"
        )
    return model


def convert_official(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: GroundingDinoConfig | str | os.PathLike | None = None,
    tokenizer: str = "bert-base-uncased",
    warn: Callable[[str], None] = print,
    trust_pickle: bool = False,
) -> Path:
    """Convert an official GroundingDINO checkpoint into an HF directory `out_dir` (written atomically).

    `config`: a `GroundingDinoConfig`, a config.json / checkpoint directory, or None for the
    official release that matches the backbone. `tokenizer`: where the BERT tokenizer comes
    from (a directory or hub id). Keys no rule knows are reported through `warn`. `trust_pickle`
    lets the checkpoint's pickle run code (only for a file you trust that cannot be read otherwise).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: already exists and is not empty; choose another --out")
    state = read_official_checkpoint(src, trust_pickle)
    if config is None:
        config = release_config(state)
    elif not isinstance(config, GroundingDinoConfig):
        try:
            config = GroundingDinoConfig.from_pretrained(config)
        except (OSError, ValueError) as error:
            raise UserError(f"{config}: cannot read a Grounding DINO config ({first_line(error)})") from error
    try:
        text_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load tokenizer {tokenizer!r} ({first_line(error)}); pass --tokenizer DIR") from error
    hub_state, unknown = official_to_hub(state)
    if unknown:
        warn(f"warning: {len(unknown)} checkpoint entries not converted (first: {unknown[0]})")
    with tempfile.TemporaryDirectory() as raw, atomic_directory(out_dir) as final:
        config.save_pretrained(raw)
        save_file(hub_state, Path(raw) / "model.safetensors", metadata={"format": "pt"})
        model = _load_checked(Path(raw))
        model.save_pretrained(final)
        processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(), tokenizer=text_tokenizer)
        processor.save_pretrained(final)
    return out_dir
