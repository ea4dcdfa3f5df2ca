"""The loaders diffusers users expect, each against the matching diffusers pipeline with a zero-gate adapter
(which changes nothing): LoRA, textual inversion, IP-Adapter, ControlNet (one and several), single-file
checkpoints; and attention processors set by the user survive loading."""

import copy

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image

from gligen.adapter import GroundingAdapter
from gligen.layout import Entity, Layout
from gligen.pipeline import GligenPipeline
from tests.tiny import HIDDEN, tiny_components, tiny_image_encoder, tiny_unet

SIZE, STEPS, TOLERANCE = 16, 4, 1e-5


def _layout(prompt="a cat and a dog", seed=3):
    return Layout(prompt, (Entity("a cat", (0.1, 0.2, 0.5, 0.9)), Entity("a dog", (0.55, 0.25, 0.95, 0.8))),
                  width=SIZE, height=SIZE, seed=seed)


def _pair(tmp_path, **extra):
    """(diffusers' StableDiffusionPipeline, our pipeline with a zero-gate adapter) on equal but separate weights."""
    theirs = StableDiffusionPipeline(**tiny_components(tmp_path / "theirs"), safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False, **extra)
    parts = _same_scheduler(tiny_components(tmp_path / "ours"), theirs)
    ours = GligenPipeline(**parts, adapter=GroundingAdapter.for_unet(parts["unet"]))
    return theirs, ours


def _same_scheduler(parts, theirs):
    """diffusers' SD pipelines update an old scheduler config (steps_offset 0 -> 1) when built: ours gets it too."""
    parts["scheduler"] = copy.deepcopy(theirs.scheduler)
    return parts


def _theirs(pipe, layout, **kwargs):
    return pipe(layout.prompt, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np",
                generator=torch.Generator().manual_seed(layout.seed), **kwargs).images[0]


def _ours(pipe, layout, **kwargs):
    return pipe(layout, num_inference_steps=STEPS, output_type="np", **kwargs).images[0]


def _close(got, expected, tolerance=TOLERANCE):
    assert np.abs(got - expected).max() <= tolerance


def test_zero_gates_equal_diffusers_and_user_processors_are_kept(tmp_path):
    theirs, ours = _pair(tmp_path)
    _close(_ours(ours, _layout()), _theirs(theirs, _layout()))

    parts = tiny_components(tmp_path / "mine")
    parts["unet"].set_attn_processor(AttnProcessor())
    GligenPipeline(**parts, adapter=GroundingAdapter.for_unet(parts["unet"]))
    assert {type(p) for name, p in parts["unet"].attn_processors.items() if ".fuser." not in name} == {AttnProcessor}


def _lora(tmp_path):
    """A UNet LoRA with non-zero weights, saved as diffusers saves one. (A text-encoder LoRA needs
    transformers' PEFT integration, which asks for peft >= 0.22, not yet released on the registry here.)"""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet()
    torch.manual_seed(5)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    return tmp_path / "lora"


def test_lora_as_in_diffusers(tmp_path):
    theirs, ours = _pair(tmp_path)
    before = _ours(ours, _layout())
    lora = _lora(tmp_path)
    theirs.load_lora_weights(lora, adapter_name="style")
    ours.load_lora_weights(lora, adapter_name="style")
    assert not any(".fuser." in name for name, _ in ours.unet.named_modules() if name.endswith("lora_A"))
    got = _ours(ours, _layout())
    assert np.abs(got - before).max() > 1e-3
    _close(got, _theirs(theirs, _layout()))
    half = {"scale": 0.5}
    _close(_ours(ours, _layout(), cross_attention_kwargs=half), _theirs(theirs, _layout(), cross_attention_kwargs=half))


def test_lcm_lora_few_step_generation_as_in_diffusers(tmp_path):
    """LCM-LoRA's recipe: the LoRA, the LCM scheduler, 4 steps, no guidance; the same image as diffusers'."""
    from diffusers import LCMScheduler

    theirs, ours = _pair(tmp_path)
    lora = _lora(tmp_path)
    for pipe in (theirs, ours):
        pipe.load_lora_weights(lora)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    got = _ours(ours, _layout(), guidance_scale=1.0)
    _close(got, _theirs(theirs, _layout(), guidance_scale=1.0))
    assert np.abs(got - _ours(ours, _layout(seed=4), guidance_scale=1.0)).max() > 1e-3  # LCM's noise follows the seed


def test_textual_inversion_as_in_diffusers(tmp_path):
    theirs, ours = _pair(tmp_path)
    embedding = {"<toy>": torch.randn(HIDDEN, generator=torch.Generator().manual_seed(4))}
    torch.save(embedding, tmp_path / "toy.bin")
    for pipe in (theirs, ours):
        pipe.load_textual_inversion(str(tmp_path / "toy.bin"))
    layout = _layout("a <toy> on a sofa")
    _close(_ours(ours, layout), _theirs(theirs, layout))
    assert np.abs(_ours(ours, layout) - _ours(ours, _layout("a on a sofa"))).max() > 1e-3


def _ip_adapter_weights(unet, image_embed_dim, tokens=4):
    """A plain IP-Adapter state dict (ImageProjection, one to_k_ip / to_v_ip per cross-attention) for `unet`."""
    generator = torch.Generator().manual_seed(6)
    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": torch.randn(cross * tokens, image_embed_dim, generator=generator) * 0.1,
                  "proj.bias": torch.zeros(cross * tokens), "norm.weight": torch.ones(cross),
                  "norm.bias": torch.zeros(cross)}
    ip_adapter, key = {}, 1
    for name in unet.attn_processors:  # diffusers numbers the cross-attentions 1, 3, 5, ...
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.in_features
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_out[0].out_features
            for kind in ("to_k_ip", "to_v_ip"):
                ip_adapter[f"{key}.{kind}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.3
            key += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def test_ip_adapter_as_in_diffusers(tmp_path):
    encoder, processor = tiny_image_encoder()
    theirs, ours = _pair(tmp_path)
    for pipe in (theirs, ours):
        pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    from safetensors.torch import save_file

    weights = _ip_adapter_weights(theirs.unet, encoder.config.projection_dim)
    flat = {f"{part}.{k}": v for part, values in weights.items() for k, v in values.items()}
    save_file(flat, tmp_path / "ip.safetensors")
    for pipe in (theirs, ours):
        pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors")
    assert hasattr(ours.unet.down_blocks[0].attentions[0].transformer_blocks[0], "fuser")  # fusers back on
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    got = _ours(ours, _layout(), ip_adapter_image=image)
    _close(got, _theirs(theirs, _layout(), ip_adapter_image=image))
    assert np.abs(got - _ours(ours, _layout(), ip_adapter_image=Image.new("RGB", (32, 32), (0, 90, 200)))).max() > 1e-3


def _controlnet(seed):
    controlnet = ControlNetModel.from_unet(tiny_unet(),
                                           conditioning_embedding_out_channels=(16, 32))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero convolutions made non-zero, so the residuals show
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return controlnet.eval()


@pytest.mark.parametrize("nets", [1, 2])
def test_controlnet_as_in_diffusers(tmp_path, nets):
    controlnet = _controlnet(7) if nets == 1 else [_controlnet(7), _controlnet(8)]
    parts = tiny_components(tmp_path / "theirs")
    theirs = StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)
    mine = _same_scheduler(tiny_components(tmp_path / "ours"), theirs)
    ours = GligenPipeline(**mine, adapter=GroundingAdapter.for_unet(mine["unet"]), controlnet=controlnet)
    control = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    image = control if nets == 1 else [control, control.transpose(Image.FLIP_LEFT_RIGHT)]
    scale = 0.8 if nets == 1 else [0.8, 0.5]
    got = _ours(ours, _layout(), control_image=image, controlnet_conditioning_scale=scale, control_guidance_end=0.5)
    _close(got, _theirs(theirs, _layout(), image=image, controlnet_conditioning_scale=scale, control_guidance_end=0.5))
    assert np.abs(got - _ours(ours, _layout(), control_image=image, controlnet_conditioning_scale=0.0 if nets == 1
                              else [0.0, 0.0])).max() > 1e-3


def test_from_single_file(tmp_path):
    """A community-style single .safetensors checkpoint (LDM names), loaded by diffusers' own converter."""
    from tests.test_convert import ldm_unet, ldm_vae
    from safetensors.torch import save_file

    parts = tiny_components(tmp_path / "sd")
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "sd")
    state = {f"model.diffusion_model.{k}": v for k, v in ldm_unet(parts["unet"].state_dict()).items()}
    state.update({f"first_stage_model.{k}": v for k, v in ldm_vae(parts["vae"].state_dict()).items()})
    text = parts["text_encoder"].state_dict()
    state.update({"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
                  for k, v in text.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")

    ours = GligenPipeline.from_single_file(str(tmp_path / "model.safetensors"), config=str(tmp_path / "sd"),
                                           adapter=None, local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        for key, value in parts[name].state_dict().items():
            torch.testing.assert_close(getattr(ours, name).state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_from_single_file_sdxl(tmp_path):
    """A tiny SDXL in the original SGM single-file layout. diffusers' inference of the model type reads the released
    models' key shapes and takes it for SD-1.x; `config=` (a local SDXL pipeline directory) says SDXL."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint
    from safetensors.torch import save_file

    from tests.test_convert import ldm_clip, ldm_open_clip, ldm_unet, ldm_vae
    from tests.tiny import randomize_grounding, save_tiny_sdxl

    directory = save_tiny_sdxl(tmp_path / "sdxl")
    parts = StableDiffusionXLPipeline.from_pretrained(directory, add_watermarker=False).components
    state = {f"model.diffusion_model.{k}": v for k, v in ldm_unet(parts["unet"].state_dict()).items()}
    state.update({f"first_stage_model.{k}": v for k, v in ldm_vae(parts["vae"].state_dict()).items()})
    state.update({f"conditioner.embedders.0.{k}": v for k, v in ldm_clip(parts["text_encoder"].state_dict()).items()})
    state.update({f"conditioner.embedders.1.model.{k}": v
                  for k, v in ldm_open_clip(parts["text_encoder_2"].state_dict()).items()})
    path = tmp_path / "sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    assert not infer_diffusers_model_type(load_single_file_checkpoint(str(path))).startswith("xl")

    adapter = GroundingAdapter.for_unet(parts["unet"])
    randomize_grounding(adapter)
    adapter.save_pretrained(tmp_path / "adapter")
    ours = GligenPipeline.from_single_file(str(path), config=str(directory), adapter=str(tmp_path / "adapter"),
                                           local_files_only=True)
    assert ours.is_sdxl
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        loaded = getattr(ours, name).state_dict()
        for key, value in parts[name].state_dict().items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=f"{name} {key}")

    expected = GligenPipeline.from_pretrained(str(directory), adapter=str(tmp_path / "adapter"))
    grounded = ours([_layout()], num_inference_steps=STEPS, output_type="np").images[0]
    np.testing.assert_allclose(grounded, expected([_layout()], num_inference_steps=STEPS, output_type="np").images[0],
                               rtol=0, atol=TOLERANCE)
    plain = GligenPipeline.from_pretrained(str(directory))([_layout()], num_inference_steps=STEPS, output_type="np")
    assert np.abs(plain.images[0] - grounded).max() > 1e-3  # the adapter grounds
