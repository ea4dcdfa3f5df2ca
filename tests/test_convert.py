"""`gligen convert`: diffusers GLIGEN UNets and official GLIGEN checkpoints -> plain base + adapter."""

import copy
import json

import pytest
import torch
from PIL import Image
from diffusers import (
    AutoencoderKL,
    StableDiffusionGLIGENPipeline,
    StableDiffusionGLIGENTextImagePipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.clip_image_project_model import CLIPImageProjection
from safetensors.torch import load_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from gligen.adapter import GroundingAdapter
from gligen.cli import main as gligen_main
from gligen.convert import split_gligen_unet
from gligen.errors import UserError
from gligen.grounding import GroundingInputs
from tests.tiny import HIDDEN, randomize_grounding, save_tiny_sd, tiny_components, tiny_image_encoder, tiny_unet


def _unet_inputs(in_channels=4, batch=2, n=30):
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(batch, in_channels, 8, 8, generator=generator)
    text = torch.randn(batch, 7, HIDDEN, generator=generator)
    boxes, embeds = torch.rand(batch, n, 4, generator=generator), torch.randn(batch, n, HIDDEN, generator=generator)
    images = torch.randn(batch, n, HIDDEN, generator=generator)
    masks = torch.zeros(batch, n)
    masks[1, :3] = 1  # row 0: the unconditional half (null grounding)
    image_masks = torch.zeros(batch, n)
    image_masks[1, 1] = 1
    return sample, torch.tensor(10), text, GroundingInputs(boxes, masks, embeds, images, image_masks)


def _gligen_kwargs(attention_type, g):
    if attention_type == "gated":
        return {"boxes": g.boxes, "masks": g.masks, "positive_embeddings": g.phrase_embeds}
    return {"boxes": g.boxes, "masks": g.masks, "phrases_masks": g.masks, "image_masks": g.image_masks,
            "phrases_embeddings": g.phrase_embeds, "image_embeddings": g.image_embeds}


def assert_split_matches(gated, plain, adapter, in_channels=4):
    """The plain UNet with the adapter attached gives exactly the gated UNet's output."""
    sample, t, text, grounding = _unet_inputs(in_channels)
    attention_type = gated.config.attention_type
    with torch.no_grad():
        expected = gated(sample, t, text, cross_attention_kwargs={"gligen": _gligen_kwargs(attention_type, grounding)}).sample
        adapter.attach(plain)
        got = plain(sample, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(adapter.tokens(grounding))).sample
        adapter.detach(plain)
        ungrounded = gated(sample, t, text).sample
    assert (expected - ungrounded).abs().max() > 1e-3  # grounding changes the output
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    return (got - expected).abs().max().item()


@pytest.mark.parametrize("attention_type, in_channels", [("gated", 4), ("gated-text-image", 9)])
def test_split_gligen_unet(attention_type, in_channels):
    gated = tiny_unet(in_channels, attention_type)
    randomize_grounding(gated)
    base_keys = {k for k in gated.state_dict() if "fuser" not in k and "position_net" not in k}
    plain, adapter = split_gligen_unet(copy.deepcopy(gated))
    assert plain.config.attention_type == "default" and plain.config.in_channels == in_channels
    assert set(plain.state_dict()) == base_keys
    assert all(torch.equal(plain.state_dict()[k], gated.state_dict()[k]) for k in base_keys)
    assert adapter.config.feature_type == {"gated": "text-box", "gated-text-image": "text-image-box"}[attention_type]
    assert adapter.config.extra_in_channels == 0
    assert_split_matches(gated, plain, adapter, in_channels)


def test_split_refuses_a_plain_unet():
    with pytest.raises(UserError, match="not a GLIGEN UNet"):
        split_gligen_unet(tiny_unet())


# --- official-format checkpoints, built here from tiny diffusers components ---

EXECUTED = []  # what the pickled config's own code did when (wrongly) run


class DictConfig:
    """Pickles like OmegaConf's DictConfig (`_content` of nodes); its code records that it ran."""

    def __init__(self, content):
        self._metadata, self._parent = {"ref_type": "Any"}, None
        self._content = {k: DictConfig(v) if isinstance(v, dict) else AnyNode(v) for k, v in content.items()}

    def __setstate__(self, state):
        EXECUTED.append(type(self).__name__)
        self.__dict__.update(state)


class AnyNode(DictConfig):
    def __init__(self, value):
        self._metadata, self._parent, self._val = {}, None, value


L = 1  # layers per block (LDM num_res_blocks) of the tiny models


def renamed(key, prefixes):
    """(`key` with the first matching (old, new) prefix replaced, that old prefix or None)."""
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old):], old
    return key, None


def ldm_unet(state, levels=2):
    """diffusers UNet names -> LDM openaimodel names (the inverse of the conversion, written out here)."""
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    prefixes = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
                ("mid_block.attentions.0.", "middle_block.1."),
                ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]  # SDXL
    prefixes += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    for i in range(levels):
        for j in range(L):
            prefixes += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.0."),
                         (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.1.")]
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(L + 1) * (i + 1)}.0.op."))
        for j in range(L + 1):
            prefixes += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(L + 1) * i + j}.0."),
                         (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(L + 1) * i + j}.1.")]
        prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(L + 1) * i + L}.2."))
    out = {}
    for key, value in state.items():
        new, old = renamed(key, prefixes)
        if old is None:
            assert key.startswith("position_net."), key
        elif ".resnets." in old:
            for a, b in resnet:
                new = new.replace(f".{a}.", f".{b}.")
        out[new] = value.clone()
    return out


def ldm_vae(state, levels=2):
    """diffusers AutoencoderKL names -> LDM autoencoder names."""
    prefixes = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
        prefixes.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    for i in range(levels):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                     (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                     (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block."),
                     (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")]
    attention = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in state.items():
        new = renamed(key, prefixes)[0].replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            for a, b in attention:
                new = new.replace(f".attn_1.{a}", f".attn_1.{b}")
            if value.ndim == 2:
                value = value[:, :, None, None]  # LDM's attention uses 1x1 convolutions
        out[new] = value.clone()
    return out


def ldm_clip(state):
    """transformers CLIPTextModel names -> LDM FrozenCLIPEmbedder names (transformers 4 layout, with position_ids)."""
    out = {"transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v.clone() for k, v in state.items()}
    out["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def ldm_open_clip(state):
    """transformers CLIPTextModelWithProjection names -> OpenCLIP text tower names (SDXL's second text encoder):
    q, k, v fused into `attn.in_proj_*`, the projection stored transposed (hidden, projection)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "text_projection": state.pop("text_projection.weight").T,
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias")}
    for i in sorted({int(key.split(".")[2]) for key in state}):  # the rest are encoder.layers.<i>.*
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"encoder.layers.{i}.self_attn.{p}_proj.{kind}") for p in "qkv"])
    names = [("encoder.layers.", "transformer.resblocks."), (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."),
             (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."), (".self_attn.out_proj.", ".attn.out_proj.")]
    for key, value in state.items():
        for a, b in names:
            key = key.replace(a, b)
        out[key] = value
    return {k: v.clone().contiguous() for k, v in out.items()}


def tiny_gligen_unet(attention_type="gated", in_channels=4):
    """A tiny GLIGEN UNet in the shapes an LDM config can describe (32 groups, one head count)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=L, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=2, attention_type=attention_type,
    ).eval()
    randomize_grounding(unet)
    return unet


def tiny_ldm_vae():
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 64), layers_per_block=L, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()


def tiny_clip_text():
    """A tiny CLIP text encoder with CLIP's real vocabulary size (the bundled tokenizer's ids fit)."""
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(config).eval()


LDM_BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2


def official_checkpoint(unet, vae=None, text_encoder=None):
    """An official-format GLIGEN checkpoint dict (what torch.save wrote in the releases)."""
    config = DictConfig({
        "model": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 8, "in_channels": unet.config.in_channels, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [1, 2], "num_res_blocks": L, "channel_mult": [1, 2], "num_heads": 2,
            "transformer_depth": 1, "context_dim": HIDDEN, "fuser_type": "gatedSA"}},
        "autoencoder": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "scale_factor": 0.18215, "embed_dim": 4, "ddconfig": {
                "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2], "num_res_blocks": L, "attn_resolutions": [], "dropout": 0.0}}},
        "text_encoder": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        "diffusion": {"target": "ldm.models.diffusion.ldm.LatentDiffusion", "params": {
            "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}},
    })
    return {
        "model": ldm_unet(unet.state_dict()),
        "autoencoder": ldm_vae(vae.state_dict()) if vae is not None else {},
        "text_encoder": ldm_clip(text_encoder.state_dict()) if text_encoder is not None else {},
        "diffusion": {"betas": LDM_BETAS.float(), "alphas_cumprod": torch.cumprod(1 - LDM_BETAS, 0).float()},
        "config_dict": config,
    }


def convert_cli(*argv):
    return gligen_main(["convert", *map(str, argv)])


def test_official_checkpoint_full(tmp_path):
    unet, vae, text_encoder = tiny_gligen_unet(), tiny_ldm_vae(), tiny_clip_text()
    torch.save(official_checkpoint(unet, vae, text_encoder), tmp_path / "gligen.pth")
    EXECUTED.clear()
    assert convert_cli(tmp_path / "gligen.pth", "--out", tmp_path / "out", "--full") == 0
    assert EXECUTED == []  # the pickled config was never constructed through its own code
    out = tmp_path / "out"

    plain = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    adapter = GroundingAdapter.from_pretrained(out / "adapter")
    assert plain.config.attention_type == "default" and adapter.config.feature_type == "text-box"
    assert_split_matches(unet, plain, adapter)

    converted_vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    latents = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(converted_vae.decode(latents).sample, vae.decode(latents).sample, rtol=0, atol=1e-5)
    assert converted_vae.config.scaling_factor == 0.18215

    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    # ids of OpenAI CLIP's reference tokenizer (open_clip.tokenizer.SimpleTokenizer) for this text
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tokenizer(["a red cube on the left"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        converted_text = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
        torch.testing.assert_close(converted_text(ids).last_hidden_state, text_encoder(ids).last_hidden_state, rtol=0, atol=0)
        torch.testing.assert_close(converted_text(ids).pooler_output, text_encoder(ids).pooler_output, rtol=0, atol=0)

    scheduler = StableDiffusionPipeline.from_pretrained(out).scheduler
    torch.testing.assert_close(scheduler.betas.double(), LDM_BETAS.float().double(), rtol=1e-5, atol=1e-9)

    # the converted release generates with nothing else
    layout = {"prompt": "a cat", "width": 64, "height": 64, "seed": 0,
              "entities": [{"phrase": "a cat", "box": [0.1, 0.1, 0.6, 0.9]}]}
    (tmp_path / "cat.json").write_text(json.dumps(layout))
    argv = ["generate", "--model", out, "--adapter", out / "adapter", "--layout", tmp_path / "cat.json",
            "--out", tmp_path / "images", "--steps", "2", "--device", "cpu"]
    assert gligen_main(list(map(str, argv))) == 0
    with Image.open(tmp_path / "images" / "cat.png") as image:
        assert image.size == (64, 64)


@pytest.mark.parametrize("attention_type, in_channels", [("gated-text-image", 4), ("gated", 9)])
def test_official_text_image_and_inpainting_releases(tmp_path, attention_type, in_channels):
    unet = tiny_gligen_unet(attention_type, in_channels)
    torch.save(official_checkpoint(unet), tmp_path / "gligen.bin")
    args = [tmp_path / "gligen.bin", "--out", tmp_path / "out"]
    clip = None
    if attention_type == "gated-text-image":
        torch.manual_seed(0)
        clip = CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=99, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=1,
                             num_attention_heads=4),
            vision_config=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                               image_size=32, patch_size=8),
            projection_dim=24))
        clip.save_pretrained(tmp_path / "clip")
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "clip")
        args += ["--clip", tmp_path / "clip"]
    assert convert_cli(*args) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter"]
    adapter = GroundingAdapter.from_pretrained(tmp_path / "out" / "adapter")
    assert adapter.config.extra_in_channels == 0
    if clip is not None:
        assert adapter.config.feature_type == "text-image-box"
        # reference images enter the text embedding space through the transposed CLIP text projection
        torch.testing.assert_close(adapter.image_projection.weight, clip.text_projection.weight.T, rtol=0, atol=0)
    reference = copy.deepcopy(unet)
    plain, _ = split_gligen_unet(unet)  # the base: the gated UNet minus its grounding
    assert plain.config.in_channels == in_channels
    assert_split_matches(reference, plain, adapter, in_channels)


def test_trusting_the_pickle_runs_its_code(tmp_path):
    """The opt-in really is different: plain unpickling constructs the config through its own code."""
    torch.save(official_checkpoint(tiny_gligen_unet()), tmp_path / "gligen.pth")
    EXECUTED.clear()
    assert convert_cli(tmp_path / "gligen.pth", "--out", tmp_path / "safe") == 0
    assert EXECUTED == []
    assert convert_cli(tmp_path / "gligen.pth", "--out", tmp_path / "trusted", "--trust-pickle") == 0
    assert "DictConfig" in EXECUTED
    safe = load_file(tmp_path / "safe" / "adapter" / "adapter.safetensors")
    trusted = load_file(tmp_path / "trusted" / "adapter" / "adapter.safetensors")
    assert safe.keys() == trusted.keys() and all(torch.equal(safe[k], trusted[k]) for k in safe)


def save_tiny_gligen_pipeline(directory, attention_type="gated"):
    """A tiny diffusers GLIGEN (text-box or text-image) pipeline directory with non-zero gates."""
    components = tiny_components(directory / "_build", tiny_unet(attention_type=attention_type))
    randomize_grounding(components["unet"])
    pipeline_class = StableDiffusionGLIGENPipeline
    if attention_type == "gated-text-image":
        torch.manual_seed(2)
        image_encoder, image_processor = tiny_image_encoder()
        components.update(image_encoder=image_encoder, image_project=CLIPImageProjection(hidden_size=HIDDEN),
                          processor=CLIPProcessor(image_processor=image_processor, tokenizer=components["tokenizer"]))
        pipeline_class = StableDiffusionGLIGENTextImagePipeline
    pipeline_class(**components, safety_checker=None, feature_extractor=None,
                   requires_safety_checker=False).save_pretrained(directory)
    return components


@pytest.mark.parametrize("attention_type", ["gated", "gated-text-image"])
def test_diffusers_gligen_pipeline_round_trip(tmp_path, attention_type):
    components = save_tiny_gligen_pipeline(tmp_path / "gligen", attention_type)
    assert convert_cli(tmp_path / "gligen", "--out", tmp_path / "out", "--full") == 0
    out = tmp_path / "out"
    plain = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    adapter = GroundingAdapter.from_pretrained(out / "adapter")
    assert plain.config.attention_type == "default"
    assert_split_matches(components["unet"], plain, adapter)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.attention_type == "default" and not hasattr(pipe.unet, "position_net")
    if attention_type == "gated-text-image":
        weight = components["image_project"].project.weight
        torch.testing.assert_close(adapter.image_projection.weight, weight, rtol=0, atol=0)
        encoder = CLIPVisionModelWithProjection.from_pretrained(out / "image_encoder")
        assert torch.equal(encoder.visual_projection.weight, components["image_encoder"].visual_projection.weight)
        CLIPImageProcessor.from_pretrained(out / "image_encoder")


def test_diffusers_gligen_unet_directory(tmp_path):
    """A UNet directory alone gives the same adapter and base as its pipeline."""
    save_tiny_gligen_pipeline(tmp_path / "gligen")
    out = tmp_path / "out"
    assert convert_cli(tmp_path / "gligen", "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "unet"]
    assert convert_cli(tmp_path / "gligen" / "unet", "--out", tmp_path / "unet_only") == 0
    again = load_file(tmp_path / "unet_only" / "adapter" / "adapter.safetensors")
    first = load_file(out / "adapter" / "adapter.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    assert (tmp_path / "unet_only" / "unet" / "config.json").is_file()


def _one_line_error(capsys, *argv):
    assert convert_cli(*argv) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]  # the rest is progress bars
    assert len(lines) == 1 and lines[0] == err.splitlines()[-1] and lines[0].startswith("gligen: error: ")
    return lines[0]


class NeedsCode:
    """A pickled model object (as in checkpoints saved with torch.save(model)) rather than a state dict."""

    def __setstate__(self, state):
        EXECUTED.append("NeedsCode")


def test_bad_inputs(tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "junk.bin").write_bytes(b"\x80\x02 definitely not a checkpoint")
    assert "junk.bin: not a PyTorch checkpoint" in _one_line_error(capsys, tmp_path / "junk.bin", "--out", out)

    torch.save({"model": NeedsCode()}, tmp_path / "code.pth")
    EXECUTED.clear()
    err = _one_line_error(capsys, tmp_path / "code.pth", "--out", out)
    assert "tests.test_convert.NeedsCode" in err and "--trust-pickle" in err and EXECUTED == []

    torch.save({"model": {"conv_in.weight": torch.zeros(1), "global_step": 3}}, tmp_path / "int.pth")
    assert "model/global_step is a int, not a tensor" in _one_line_error(capsys, tmp_path / "int.pth", "--out", out)

    torch.save({"state_dict": {}}, tmp_path / "nomodel.pth")
    assert "no 'model' key" in _one_line_error(capsys, tmp_path / "nomodel.pth", "--out", out)

    checkpoint = official_checkpoint(tiny_gligen_unet())
    checkpoint["model"]["label_emb.0.weight"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "strange.pth")
    assert "key label_emb.0.weight does not map" in _one_line_error(capsys, tmp_path / "strange.pth", "--out", out)

    del checkpoint["model"]["label_emb.0.weight"], checkpoint["model"]["out.2.bias"]
    torch.save(checkpoint, tmp_path / "missing.pth")
    assert "no tensor for conv_out.bias" in _one_line_error(capsys, tmp_path / "missing.pth", "--out", out)

    assert "not a GLIGEN UNet" in _one_line_error(capsys, save_tiny_sd(tmp_path / "sd"), "--out", out)
    err = _one_line_error(capsys, tmp_path / "sd" / "unet", "--out", out, "--full")
    assert "--full needs a diffusers pipeline directory" in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    torch.save(official_checkpoint(tiny_gligen_unet()), tmp_path / "gligen.pth")
    assert "not empty" in _one_line_error(capsys, tmp_path / "gligen.pth", "--out", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


class OpaqueConfig:
    """A config object whose state is no plain data (not OmegaConf's `_content` / `_val`)."""

    def __init__(self):
        self.blob = b"\x00compressed"


def test_unreadable_pickled_config_is_named_in_one_line(tmp_path, capsys):
    checkpoint = official_checkpoint(tiny_gligen_unet())
    torch.save({**checkpoint, "config_dict": OpaqueConfig()}, tmp_path / "gligen.pth")
    assert convert_cli(tmp_path / "gligen.pth", "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert "config_dict (a pickled tests.test_convert.OpaqueConfig) cannot be read" in err and "\n" not in err
    assert "do not map" not in err and not (tmp_path / "out").exists()
