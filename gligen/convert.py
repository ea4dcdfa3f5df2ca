"""Released GLIGEN weights -> a plain diffusers base + a `GroundingAdapter`.

Two sources:
- a diffusers GLIGEN UNet (`attention_type` "gated" or "gated-text-image"), alone or inside a
  pipeline directory: the fusers and the position net move to an adapter, the rest is the base;
- an official GLIGEN checkpoint (a pickled dict with `model`, `autoencoder`, `text_encoder`,
  `diffusion`, `config_dict`, LDM key names), read without running code from the file: the
  text-box, text-image-box (reference images and style) and keypoint releases.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    LDM_UNET_KEY,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from diffusers.pipelines.stable_diffusion.clip_image_project_model import CLIPImageProjection
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from gligen.adapter import GroundingAdapter, check_tensors
from gligen.errors import UserError
from gligen.files import Output, atomic_directory, write_json
from gligen.fuser import detach_fusers
from gligen.keypoints import KeypointPositionNet
from gligen.maps import CONDITION_TYPES
from gligen.maps.convert import is_map_release, map_adapter, release_condition, split_map_release
from gligen.safe_pickle import Inert, inert_objects, load_checkpoint

GLIGEN_ATTENTION_TYPES = {"gated": "text-box", "gated-text-image": "text-image-box"}
TOKENIZER_ASSETS = Path(__file__).parent / "assets" / "clip_tokenizer"


def is_grounding_key(key: str) -> bool:
    """Whether a GLIGEN UNet state-dict key belongs to the adapter (position net or a fuser)."""
    return key.startswith("position_net.") or ".fuser." in key


def split_gligen_unet(
    unet: UNet2DConditionModel, image_projection: nn.Linear | None = None, phrase_embedding: str = "pooler_output",
) -> tuple[UNet2DConditionModel, GroundingAdapter]:
    """A diffusers GLIGEN UNet -> (the plain base UNet, the adapter holding its position net and fusers).

    The UNet is changed in place and returned: its fusers and position net are removed and
    its config says `attention_type="default"`, so it saves and loads as an ordinary SD UNet;
    every base weight stays as it was. The plain UNet with the adapter attached computes what
    the GLIGEN UNet computed. `image_projection` (text-image-box only) is the reference-image
    projection, diffusers' `CLIPImageProjection.project` of a GLIGEN text-image pipeline; without
    it the adapter's projection is the identity. `phrase_embedding` is recorded in the adapter's
    config ("projected" for GLIGEN-XL, an SDXL pipeline with a gated UNet).
    """
    attention_type = unet.config.attention_type
    if attention_type not in GLIGEN_ATTENTION_TYPES:
        raise UserError(f"UNet has attention_type {attention_type!r}, not a GLIGEN UNet ('gated' or 'gated-text-image')")
    feature_type = GLIGEN_ATTENTION_TYPES[attention_type]
    keypoint = {}
    if isinstance(unet.position_net, KeypointPositionNet):  # an official keypoint release (`official_unet`)
        feature_type, keypoint = "keypoint", {"max_persons": unet.position_net.max_persons}
    projection = image_projection.weight if image_projection is not None else None
    adapter = GroundingAdapter.for_unet(
        unet, feature_type, positive_len=getattr(unet.position_net, "positive_len", None),
        image_embed_dim=projection.shape[1] if projection is not None else None, phrase_embedding=phrase_embedding,
        **keypoint,
    )
    state = {k: v for k, v in unet.state_dict().items() if is_grounding_key(k)}
    if feature_type == "text-image-box":
        state["image_projection.weight"] = projection if projection is not None else torch.eye(adapter.config.positive_len)
    adapter.load_adapter_state_dict(state, where="GLIGEN UNet")
    detach_fusers(unet)
    unet.register_to_config(attention_type="default")
    return unet, adapter.to(device=unet.device, dtype=unet.dtype)


# --- official GLIGEN checkpoints ---

# The architecture of every official GLIGEN release (SD-1.4), in the layout of the checkpoint's
# `config_dict`; the file's own config, when readable, overrides it.
GLIGEN_SD14_CONFIG = {
    "model": {"params": {
        "in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8, "transformer_depth": 1,
        "context_dim": 768,
    }},
    "autoencoder": {"params": {"scale_factor": 0.18215, "ddconfig": {
        "z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
    }}},
    "diffusion": {"params": {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}},
}
UNET_PREFIXES = ("time_embed.", "input_blocks.", "middle_block.", "output_blocks.", "out.", "position_net.")
CLIP_PREFIX = "transformer."  # LDM's FrozenCLIPEmbedder wraps a transformers CLIPTextModel as `transformer`


def read_official_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """The checkpoint dict of an official GLIGEN release, read without running code from it.

    Raises a UserError when the file is no checkpoint, has no `model` state dict, or keeps
    its weights in objects that need code to be rebuilt (naming the class it wanted).
    """
    checkpoint = load_checkpoint(path, trust_pickle)
    if isinstance(checkpoint, Inert):
        raise UserError(f"{path}: the file is a pickled {checkpoint.qualname} object that needs its code to load; "
                        "use --trust-pickle only if you trust the file")
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: not a GLIGEN checkpoint (a pickled {type(checkpoint).__name__}, not a dict)")
    if "model" not in checkpoint:
        keys = ", ".join(map(str, list(checkpoint)[:5]))
        raise UserError(f"{path}: not a GLIGEN checkpoint: no 'model' key (keys: {keys})")
    for name in ("model", "autoencoder", "text_encoder", "diffusion"):
        for where, obj in inert_objects(checkpoint.get(name, {}), name):
            raise UserError(f"{path}: {where} is a pickled {obj.qualname} object that needs its code to load; "
                            "use --trust-pickle only if you trust the file")
    model = checkpoint["model"]
    if not isinstance(model, dict):
        raise UserError(f"{path}: 'model' is a {type(model).__name__}, not a state dict")
    key = next((k for k, v in model.items() if not isinstance(v, torch.Tensor)), None)
    if key is not None:
        raise UserError(f"{path}: model/{key} is a {type(model[key]).__name__}, not a tensor")
    return checkpoint


def plain_config(obj: Any) -> Any:
    """A pickled config as plain dicts and lists: OmegaConf containers and nodes, kept inert (or built,
    with --trust-pickle), unwrap to their `_content` / `_val`; other objects become None."""
    if isinstance(obj, dict):
        return {key: plain_config(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_config(value) for value in obj]
    if isinstance(obj, (str, int, float, bool, type(None))):
        return obj
    state = obj.state if isinstance(obj, Inert) else getattr(obj, "__dict__", None)
    state = state if isinstance(state, dict) else {}
    if "_content" in state:  # DictConfig / ListConfig
        return plain_config(state["_content"])
    if "_val" in state:  # AnyNode, StringNode, ...
        return plain_config(state["_val"])
    return None


def gligen_config(checkpoint: dict, where: str = "checkpoint") -> dict:
    """The release's config (`config_dict`) as plain data over the SD-1.4 defaults; in_channels from the weights.

    A `config_dict` that is there but cannot be read as plain data is a UserError naming what it is,
    not a silent fall back to the defaults (which would fail later as keys that do not map).
    """
    config = copy.deepcopy(GLIGEN_SD14_CONFIG)
    raw = checkpoint.get("config_dict")
    found = plain_config(raw)
    if raw is not None and not isinstance(found, dict):
        kind = raw.qualname if isinstance(raw, Inert) else type(raw).__name__
        raise UserError(f"{where}: its config_dict (a pickled {kind}) cannot be read as plain data, so the UNet's "
                        "shape is unknown; use --trust-pickle only if you trust the file")
    for section in config:
        params = found.get(section, {}) if isinstance(found, dict) else {}
        params = params.get("params", {}) if isinstance(params, dict) else {}
        config[section]["params"].update({k: v for k, v in (params or {}).items() if v is not None})
    conv_in = checkpoint["model"].get("input_blocks.0.0.weight")
    if conv_in is not None:
        config["model"]["params"]["in_channels"] = conv_in.shape[1]  # 9 for the inpainting releases
    return config


def _ldm_config(config: dict) -> dict:
    """GLIGEN's config in the layout of SD's YAML, which diffusers' single-file helpers read."""
    autoencoder = config["autoencoder"]["params"]
    return {"model": {"params": {
        "unet_config": {"params": config["model"]["params"]},
        "first_stage_config": {"params": autoencoder},
        "scale_factor": autoencoder["scale_factor"],
    }}}


def _first_unmapped(source: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> str | None:
    """The first source key whose tensor the conversion dropped (conversions rename tensors, never copy them)."""
    used = {t.data_ptr() for t in converted.values()}
    return next((k for k, t in source.items() if t.numel() and t.data_ptr() not in used), None)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict naming the first key that does not fit."""
    check_tensors(module.state_dict(), state, f"{where}: keys do not map to the diffusers model")
    module.load_state_dict(state)


def _build(model_class: type, config: dict, source: dict, converted: dict, where: str,
           position_net: nn.Module | None = None) -> nn.Module:
    """`model_class(**config)` holding `converted`, with `position_net` (when given) in place of its own;
    a UserError names the first `source` tensor left unmapped."""
    unmapped = _first_unmapped(source, converted)
    if unmapped is not None:
        raise UserError(f"{where}: key {unmapped} does not map to a diffusers {model_class.__name__}")
    model = model_class(**config)
    if position_net is not None:
        model.position_net = position_net
    _load_strict(model, converted, where)
    return model.eval()


def ldm_unet_to_diffusers(state: dict[str, torch.Tensor], config: dict, where: str) -> tuple[dict, dict]:
    """An LDM UNet state dict (fusers included, no `position_net.*`) -> (diffusers tensors, the UNet's config)."""
    strange = next((k for k in state if not k.startswith(UNET_PREFIXES)), None)
    if strange is not None:
        raise UserError(f"{where}: key {strange} does not map to a diffusers UNet")
    prefixed = {LDM_UNET_KEY + k: v for k, v in state.items()}
    unet_config = create_unet_diffusers_config_from_ldm(_ldm_config(config), prefixed)
    return convert_ldm_unet_checkpoint(prefixed, unet_config), unet_config


def official_unet(checkpoint: dict, config: dict, where: str = "model") -> UNet2DConditionModel:
    """The release's `model` (LDM names) as a diffusers GLIGEN UNet (attention_type gated / gated-text-image).

    A keypoint release's UNet is a gated one whose position net is a `KeypointPositionNet`
    (diffusers calls it with the `gligen` keyword arguments `points` and `masks`).
    """
    state = checkpoint["model"]
    converted, unet_config = ldm_unet_to_diffusers(
        {k: v for k, v in state.items() if not k.startswith("position_net.")}, config, where)
    image = any(k.startswith("position_net.linears_image.") for k in state)
    unet_config["attention_type"] = "gated-text-image" if image else "gated"
    converted.update({k: v for k, v in state.items() if k.startswith("position_net.")})
    return _build(UNet2DConditionModel, unet_config, state, converted, where, keypoint_position_net(state))


def keypoint_position_net(state: dict[str, torch.Tensor]) -> KeypointPositionNet | None:
    """The position net of an official keypoint release (shaped by its tensors), None for other releases."""
    persons = state.get("position_net.person_embeddings")
    if persons is None:
        return None
    null_xy = state.get("position_net.null_xy_feature")
    freqs = null_xy.shape[0] // 4 if null_xy is not None else 8  # sin and cos of x and y per frequency
    return KeypointPositionNet(persons.shape[0], persons.shape[1], freqs)


def official_map_unet(
    checkpoint: dict, config: dict, condition: str | None = None, where: str = "model",
) -> tuple[UNet2DConditionModel, GroundingAdapter]:
    """A map release's `model` (`gligen.maps.convert`) -> (the plain diffusers UNet, the map adapter)."""
    state, found = checkpoint["model"], plain_config(checkpoint.get("config_dict"))
    found = found if isinstance(found, dict) else {}
    unet_state, map_config, maps = split_map_release(state, release_condition(state, found, condition, where), where)
    config = copy.deepcopy(config)
    config["model"]["params"]["in_channels"] = unet_state["input_blocks.0.0.weight"].shape[1]
    converted, unet_config = ldm_unet_to_diffusers(unet_state, config, where)
    fusers = {k: converted.pop(k) for k in list(converted) if is_grounding_key(k)}
    base_source = {k: v for k, v in unet_state.items() if ".fuser." not in k}
    unet = _build(UNet2DConditionModel, unet_config, base_source, converted, where)
    return unet, map_adapter(unet, map_config, fusers, maps, where)


def official_vae(checkpoint: dict, config: dict, where: str = "autoencoder") -> AutoencoderKL:
    """The release's `autoencoder` (LDM names) as a diffusers AutoencoderKL."""
    state = _section(checkpoint, "autoencoder", where)
    vae_config = create_vae_diffusers_config_from_ldm(_ldm_config(config), state)
    converted = convert_ldm_vae_checkpoint(state, vae_config)
    return _build(AutoencoderKL, vae_config, state, converted, where)


def official_text_encoder(checkpoint: dict, where: str = "text_encoder") -> CLIPTextModel:
    """The release's `text_encoder` (LDM FrozenCLIPEmbedder: `transformer.text_model.*`) as a CLIPTextModel.

    The architecture follows from the tensor shapes; heads are OpenAI CLIP's 64 dims each.
    """
    state = _section(checkpoint, "text_encoder", where)
    strange = next((k for k in state if not k.startswith(CLIP_PREFIX + "text_model.")), None)
    if strange is not None:
        raise UserError(f"{where}: key {strange} does not map to a CLIPTextModel")
    state = {k[len(CLIP_PREFIX):]: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    try:
        vocab, hidden = state["text_model.embeddings.token_embedding.weight"].shape
        layers = len({k.split(".")[3] for k in state if k.startswith("text_model.encoder.layers.")})
        config = CLIPTextConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
            intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
            hidden_act="quick_gelu", projection_dim=hidden,
            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
        )
    except KeyError as error:
        raise UserError(f"{where}: no tensor {CLIP_PREFIX}{error.args[0]}") from None
    model = CLIPTextModel(config)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5.6 flattened it
        state = {k[len("text_model."):]: v for k, v in state.items()}
    _load_strict(model, state, where)
    return model.eval()


def official_scheduler(checkpoint: dict, config: dict) -> DDIMScheduler:
    """DDIM with the release's training noise schedule (LDM 'linear' = diffusers 'scaled_linear').

    The betas come from the `diffusion` buffers when present, else from the config.
    """
    params = config["diffusion"]["params"]
    betas = checkpoint.get("diffusion", {}).get("betas") if isinstance(checkpoint.get("diffusion"), dict) else None
    if betas is not None:
        betas = betas.double()
        start, end, steps = betas[0].item(), betas[-1].item(), len(betas)
    else:
        start, end, steps = params["linear_start"], params["linear_end"], params["timesteps"]
    kwargs = dict(num_train_timesteps=steps, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scaled = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    if betas is not None and not torch.allclose(scaled, betas, rtol=1e-5, atol=1e-8):
        return DDIMScheduler(trained_betas=betas.tolist(), **kwargs)
    return DDIMScheduler(beta_start=start, beta_end=end, beta_schedule="scaled_linear", **kwargs)


def bundled_clip_tokenizer(directory: Path) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer from the files shipped with this package (official releases carry none)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(TOKENIZER_ASSETS / f"{name}.gz") as source, open(directory / name, "wb") as target:
            shutil.copyfileobj(source, target)
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


def _section(checkpoint: dict, name: str, where: str) -> dict[str, torch.Tensor]:
    section = checkpoint.get(name)
    if not isinstance(section, dict):
        raise UserError(f"{where}: the checkpoint has no '{name}' state dict, needed for --full")
    return section


def clip_image_side(clip: str) -> tuple[nn.Linear, CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """From a CLIP model (directory or hub id): the reference-image projection of text-image-box
    GLIGEN (the transposed text projection, image embedding -> text embedding space), the vision
    encoder and its image processor."""
    try:
        model = CLIPModel.from_pretrained(clip).eval()
        processor = CLIPImageProcessor.from_pretrained(clip)
    except (OSError, ValueError) as error:
        raise UserError(f"{clip}: cannot load a CLIP model ({str(error).splitlines()[0]})") from None
    text_projection = model.text_projection.weight  # (projection_dim, text hidden)
    projection = nn.Linear(text_projection.shape[0], text_projection.shape[1], bias=False)
    projection.weight.data.copy_(text_projection.detach().T)
    vision_config = copy.deepcopy(model.config.vision_config)
    vision_config.projection_dim = model.config.projection_dim
    encoder = CLIPVisionModelWithProjection(vision_config)
    encoder.vision_model.load_state_dict(model.vision_model.state_dict())
    encoder.visual_projection.load_state_dict(model.visual_projection.state_dict())
    return projection, encoder.eval(), processor


def _save_pipeline(directory: Path, vae, text_encoder, tokenizer, unet, scheduler) -> None:
    """Write a plain diffusers StableDiffusionPipeline directory (no safety checker)."""
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(directory)


def convert_official(
    path: str | os.PathLike, out: str | os.PathLike, full: bool = False, trust_pickle: bool = False,
    clip: str | None = None, condition: str | None = None,
) -> Path:
    """An official GLIGEN checkpoint -> `out`/adapter, and with `full` a StableDiffusionPipeline in `out`.

    `clip` (a CLIP model directory or hub id, e.g. openai/clip-vit-large-patch14) gives a
    text-image-box release its reference-image projection and, with `full`, `out`/image_encoder.
    `condition` names a map release's type where its config does not (`gligen.maps.convert`).
    """
    out = Path(out)
    checkpoint = read_official_checkpoint(path, trust_pickle)
    config = gligen_config(checkpoint, str(path))
    maps = is_map_release(checkpoint["model"])
    if condition is not None and not maps:
        raise UserError(f"{path}: --condition {condition}, but the release grounds no maps (no ConvNeXt tokenizer)")
    with atomic_directory(out) as tmp, tqdm(total=5 if full else 2, desc="convert", unit="step") as progress:
        encoder = processor = None
        if maps:
            unet, adapter = official_map_unet(checkpoint, config, condition, f"{path} [model]")
            if full:
                warnings.warn("a map release holds only its trained first conv: the base UNet's conv_in is its first "
                              "4 channels, while official GLIGEN restores SD-1.4's conv at grounding scale 0 (to match "
                              "it, generate on an SD-1.4 base)", stacklevel=2)
        else:
            unet = official_unet(checkpoint, config, f"{path} [model]")
            projection = None
            if unet.config.attention_type == "gated-text-image":
                if clip is not None:
                    projection, encoder, processor = clip_image_side(clip)
                else:
                    warnings.warn("text-image-box release converted without --clip: the adapter's image projection "
                                  "is the identity, so reference images need a re-run with --clip", stacklevel=2)
            unet, adapter = split_gligen_unet(unet, projection)
        progress.update()
        adapter.save_pretrained(tmp / "adapter")
        progress.update()
        if not full:
            return out
        vae = official_vae(checkpoint, config, f"{path} [autoencoder]")
        progress.update()
        text_encoder = official_text_encoder(checkpoint, f"{path} [text_encoder]")
        progress.update()
        with tempfile.TemporaryDirectory() as files:
            tokenizer = bundled_clip_tokenizer(Path(files))
            _save_pipeline(tmp, vae, text_encoder, tokenizer, unet, official_scheduler(checkpoint, config))
        if encoder is not None:
            encoder.save_pretrained(tmp / "image_encoder")
            processor.save_pretrained(tmp / "image_encoder")
        progress.update()
    return out


# --- diffusers GLIGEN pipelines and UNets ---


def convert_diffusers(source: str | os.PathLike, out: str | os.PathLike, full: bool = False) -> Path:
    """A diffusers GLIGEN pipeline or UNet directory -> `out`/adapter + `out`/unet (the plain base);
    with `full` (pipelines only) `out` is a whole plain StableDiffusionPipeline directory."""
    source, out = Path(source), Path(out)
    pipeline = (source / "model_index.json").is_file()
    if full and not pipeline:
        raise UserError(f"{source}: --full needs a diffusers pipeline directory (with model_index.json), not a UNet")
    index = json.loads((source / "model_index.json").read_text()) if pipeline else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(source / "unet" if pipeline else source).eval()
        projection = None
        if "image_project" in index:
            projection = CLIPImageProjection.from_pretrained(source / "image_project").project
    except (OSError, ValueError) as error:
        raise UserError(f"{source}: cannot load the GLIGEN UNet ({str(error).splitlines()[0]})") from None
    unet, adapter = split_gligen_unet(unet, projection)
    with atomic_directory(out) as tmp:
        adapter.save_pretrained(tmp / "adapter")
        unet.save_pretrained(tmp / "unet")
        if full:
            _copy_plain_pipeline(source, index, tmp)
    return out


def _copy_plain_pipeline(source: Path, index: dict, out: Path) -> None:
    """The components of a GLIGEN pipeline directory other than its UNet, copied as files under a
    StableDiffusionPipeline `model_index.json`; a text-image pipeline's image encoder and
    processor go to `out`/image_encoder together."""
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        if name not in index or not (source / name).is_dir():
            raise UserError(f"{source}: the pipeline has no {name}")
        shutil.copytree(source / name, out / name)
    if "image_encoder" in index:
        shutil.copytree(source / "image_encoder", out / "image_encoder")
        CLIPImageProcessor.from_pretrained(source / "processor").save_pretrained(out / "image_encoder")
    plain = {key: value for key, value in index.items() if key.startswith("_") or key in
             ("vae", "text_encoder", "tokenizer", "scheduler")}
    plain.update(_class_name="StableDiffusionPipeline", unet=["diffusers", "UNet2DConditionModel"],
                 safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                 requires_safety_checker=False)
    write_json(out / "model_index.json", plain)


# --- command line ---


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        description="Convert released GLIGEN weights. Writes OUT/adapter (adapter_config.json + adapter.safetensors); "
                    "from a diffusers GLIGEN pipeline or UNet also OUT/unet (the plain base UNet); with --full, OUT is "
                    "a complete diffusers StableDiffusionPipeline directory (use: gligen generate --model OUT "
                    "--adapter OUT/adapter).",
    )
    parser.add_argument("source", metavar="SRC", help="official GLIGEN .bin/.pth file, or a diffusers GLIGEN "
                        "pipeline or UNet directory (attention_type gated / gated-text-image)")
    parser.add_argument("--out", required=True, type=Output, help="output directory (must not exist or be empty)")
    parser.add_argument("--full", action="store_true", help="write the whole pipeline (UNet, VAE, text encoder, "
                        "tokenizer, scheduler) so nothing else needs downloading")
    parser.add_argument("--trust-pickle", action="store_true", help="let the checkpoint's pickle run code: only "
                        "for files that cannot be read otherwise, and only if you trust them")
    parser.add_argument("--clip", help="CLIP model (directory or hub id) for an official text-image-box release: "
                        "its reference-image projection and image encoder")
    parser.add_argument("--condition", choices=CONDITION_TYPES, help="an official map release's type, where its "
                        "config does not say it (canny and depth have the same shapes)")
    export = parser.add_argument_group("export an adapter (SRC: an adapter directory or hub id)")
    export.add_argument("--to", choices=["diffusers", "comfyui"], help="diffusers: OUT is a diffusers "
                        "StableDiffusionGLIGEN(TextImage)Pipeline directory; comfyui: OUT is the single .safetensors "
                        "file of ComfyUI's GLIGENLoader (official GLIGEN key names)")
    export.add_argument("--base", help="the SD base the adapter was trained on (directory or hub id); needed for "
                        "--to diffusers, optional for comfyui (default: the SD 1.x/2.x block layout)")
    export.add_argument("--image-encoder", help="--to diffusers, text-image-box: CLIP vision directory or hub id "
                        "(default: the base's image_encoder and feature_extractor)")
    parser.set_defaults(func=run)


def run(args) -> None:
    source = Path(args.source)
    if args.to is not None:
        from gligen.export import run_export

        out = run_export(args)
    elif source.is_dir():
        out = convert_diffusers(source, args.out, args.full)
    else:
        out = convert_official(source, args.out, args.full, args.trust_pickle, args.clip, args.condition)
    print(f"wrote {out}")
