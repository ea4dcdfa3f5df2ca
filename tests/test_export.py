"""`gligen convert ADAPTER --to diffusers|comfyui`: adapters out to diffusers' own GLIGEN pipelines and ComfyUI."""

import numpy as np
import torch
from diffusers import StableDiffusionGLIGENPipeline, StableDiffusionGLIGENTextImagePipeline, UNet2DConditionModel
from safetensors.torch import load_file

from gligen.adapter import GroundingAdapter
from gligen.export import ldm_block_paths
from gligen.layout import Entity, Layout
from gligen.pipeline import GligenPipeline
from tests.test_convert import convert_cli, official_checkpoint, save_tiny_gligen_pipeline, tiny_gligen_unet
from tests.tiny import save_tiny_gligen

SIZE = 16
LAYOUT = Layout("a cat and a dog", (Entity("a cat", (0.1, 0.2, 0.5, 0.9)), Entity("a dog", (0.55, 0.25, 0.95, 0.8))),
                width=SIZE, height=SIZE, seed=7)


def _equal_states(got, expected):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_diffusers_export_gives_the_same_image_in_diffusers_pipeline(tmp_path):
    reference, gligen_dir = save_tiny_gligen(tmp_path / "gligen")
    ours = GligenPipeline.from_pretrained(str(gligen_dir))
    ours.save_pretrained(tmp_path / "ours")  # plain base + adapter/
    assert convert_cli(tmp_path / "ours" / "adapter", "--to", "diffusers", "--base", tmp_path / "ours",
                       "--out", tmp_path / "exported") == 0

    exported = StableDiffusionGLIGENPipeline.from_pretrained(str(tmp_path / "exported"))
    _equal_states(exported.unet.state_dict(), reference.unet.state_dict())
    got = exported(prompt=LAYOUT.prompt, gligen_phrases=LAYOUT.phrases, gligen_boxes=[list(b) for b in LAYOUT.boxes],
                   gligen_scheduled_sampling_beta=0.3, num_inference_steps=10, guidance_scale=7.5, height=SIZE,
                   width=SIZE, output_type="np", generator=torch.Generator("cpu").manual_seed(LAYOUT.seed)).images[0]
    expected = ours(LAYOUT, num_inference_steps=10, guidance_scale=7.5, output_type="np").images[0]
    assert np.abs(got - expected).max() <= 1e-4


def test_text_image_export_loads_in_diffusers_text_image_pipeline(tmp_path):
    components = save_tiny_gligen_pipeline(tmp_path / "gligen", "gated-text-image")
    GligenPipeline.from_pretrained(str(tmp_path / "gligen")).save_pretrained(tmp_path / "ours")
    assert convert_cli(tmp_path / "ours" / "adapter", "--to", "diffusers", "--base", tmp_path / "ours",
                       "--out", tmp_path / "exported") == 0
    exported = StableDiffusionGLIGENTextImagePipeline.from_pretrained(str(tmp_path / "exported"))
    _equal_states(exported.unet.state_dict(), components["unet"].state_dict())
    _equal_states(exported.image_project.state_dict(), components["image_project"].state_dict())
    _equal_states(exported.image_encoder.state_dict(), components["image_encoder"].state_dict())


def test_comfyui_file_reads_back_tensor_equal(tmp_path):
    unet = tiny_gligen_unet()
    checkpoint = official_checkpoint(unet)
    torch.save(checkpoint, tmp_path / "gligen.pth")
    assert convert_cli(tmp_path / "gligen.pth", "--out", tmp_path / "converted") == 0
    UNet2DConditionModel.from_config({**unet.config, "attention_type": "default"}).save_pretrained(
        tmp_path / "base" / "unet")
    out = tmp_path / "gligen_comfyui.safetensors"
    assert convert_cli(tmp_path / "converted" / "adapter", "--to", "comfyui", "--base", tmp_path / "base",
                       "--out", out) == 0

    # every grounding tensor of the release, under its official (LDM) name, as ComfyUI's GLIGENLoader reads it
    comfy = load_file(out)
    official = {k: v for k, v in checkpoint["model"].items() if k.startswith("position_net.") or ".fuser." in k}
    _equal_states(comfy, official)
    assert any(k.startswith("input_blocks.1.1.transformer_blocks.0.fuser.") for k in comfy)

    # and back through the project's own official-checkpoint reader: the same adapter
    base = {k: v for k, v in checkpoint["model"].items() if k not in official}
    torch.save({**checkpoint, "model": {**base, **comfy}}, tmp_path / "again.pth")
    assert convert_cli(tmp_path / "again.pth", "--out", tmp_path / "again") == 0
    _equal_states(load_file(tmp_path / "again" / "adapter" / "adapter.safetensors"),
                  load_file(tmp_path / "converted" / "adapter" / "adapter.safetensors"))


def test_ldm_block_paths_of_sd_and_sdxl():
    sd = ldm_block_paths({"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "layers_per_block": 2})
    assert sd["down_blocks.0.attentions.0"] == "input_blocks.1.1" and sd["down_blocks.2.attentions.1"] == "input_blocks.8.1"
    assert sd["up_blocks.1.attentions.0"] == "output_blocks.3.1" and sd["up_blocks.3.attentions.2"] == "output_blocks.11.1"
    xl = ldm_block_paths({"down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2, "layers_per_block": 2})
    assert xl["down_blocks.1.attentions.0"] == "input_blocks.4.1" and xl["up_blocks.0.attentions.2"] == "output_blocks.2.1"


def test_export_errors_are_one_line(tmp_path, capsys):
    adapter = GroundingAdapter.for_unet(tiny_gligen_unet(attention_type="default"), feature_type="text-image-box",
                                        image_embed_dim=32)
    adapter.save_pretrained(tmp_path / "adapter")
    assert convert_cli(tmp_path / "adapter", "--to", "comfyui", "--out", tmp_path / "x.safetensors") == 1
    assert "ComfyUI's GLIGENLoader reads text-box adapters" in capsys.readouterr().err
    assert convert_cli(tmp_path / "adapter", "--to", "diffusers", "--out", tmp_path / "x") == 1
    assert "--to diffusers needs --base" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.safetensors").exists()
