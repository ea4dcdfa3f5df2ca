"""GligenPipeline as a diffusers DiffusionPipeline: save/load round trip with the adapter, `.to`, offload,
VAE slicing, callbacks, and the diffusers call arguments (generator, latents, prompt embeddings, ...)."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from gligen.errors import UserError
from gligen.layout import Entity, Layout
from gligen.pipeline import GligenPipeline

SIZE, STEPS = 16, 4
LAYOUT = Layout("a cat and a dog", (Entity("a cat", (0.1, 0.2, 0.5, 0.9)), Entity("a dog", (0.55, 0.25, 0.95, 0.8))),
                width=SIZE, height=SIZE, seed=3)


@pytest.fixture
def pipe(gligen_dir):
    return GligenPipeline.from_pretrained(str(gligen_dir))


def _run(pipe, layouts=LAYOUT, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipe(layouts, num_inference_steps=STEPS, **kwargs).images


def test_save_and_load_round_trip_with_the_adapter(pipe, tmp_path):
    assert isinstance(pipe, DiffusionPipeline) and pipe.components["adapter"] is pipe.adapter
    expected = _run(pipe)[0]
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "GligenPipeline" and index["adapter"] == ["gligen", "GroundingAdapter"]
    assert json.loads((tmp_path / "saved" / "unet" / "config.json").read_text())["attention_type"] == "default"
    saved = load_file(tmp_path / "saved" / "adapter" / "adapter.safetensors")
    for key, value in pipe.adapter.adapter_state_dict().items():
        assert torch.equal(saved[key], value), key
    assert hasattr(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0], "fuser")  # re-attached after saving

    loaded = GligenPipeline.from_pretrained(str(tmp_path / "saved"))
    assert loaded.adapter is not None and loaded.adapter.config == pipe.adapter.config
    np.testing.assert_allclose(_run(loaded)[0], expected, rtol=0, atol=1e-6)
    # the plain base in it is an ordinary Stable Diffusion directory
    plain = StableDiffusionPipeline.from_pretrained(str(tmp_path / "saved"), safety_checker=None, adapter=None)
    assert plain.unet.config.attention_type == "default"


def test_to_moves_and_casts_the_adapter(pipe):
    noise = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(9))  # same in both dtypes
    expected = _run(pipe, latents=noise)[0]
    pipe.to(torch.float64)
    assert pipe.unet.dtype == torch.float64 and pipe.adapter.dtype == torch.float64
    fuser = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].fuser
    assert fuser.alpha_attn.dtype == torch.float64
    np.testing.assert_allclose(_run(pipe, latents=noise)[0], expected, rtol=0, atol=1e-4)


def test_model_cpu_offload_gives_the_same_image(pipe):
    expected = _run(pipe)[0]
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.unet, "_hf_hook") and pipe._execution_device.type == "cpu"
    np.testing.assert_allclose(_run(pipe)[0], expected, rtol=0, atol=1e-6)


def test_sequential_cpu_offload_hooks_the_fusers_and_position_net(pipe):
    """Set-up only: a sequentially offloaded call fails in diffusers' own StableDiffusionPipeline too with
    this accelerate and torch 2.13 on CPU (accelerate rebuilds parameters with an argument torch refuses)."""
    pipe.enable_sequential_cpu_offload(device="cpu")
    fuser = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].fuser
    assert fuser.alpha_attn.device.type == "meta"  # offloaded with its UNet block
    assert hasattr(pipe.adapter.position_net, "_hf_hook") and pipe.adapter.position_net.null_positive_feature.is_meta
    assert pipe.components["adapter"] is pipe.adapter


def test_vae_slicing_and_tiling(pipe):
    layouts = [LAYOUT, Layout("a dog", LAYOUT.entities[1:], width=SIZE, height=SIZE, seed=5)]
    expected = _run(pipe, layouts)
    pipe.enable_vae_slicing()
    assert pipe.vae.use_slicing
    for got, want in zip(_run(pipe, layouts), expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    pipe.enable_vae_tiling()
    assert pipe.vae.use_tiling
    pipe.disable_vae_tiling()
    pipe.disable_vae_slicing()
    assert not pipe.vae.use_slicing and not pipe.vae.use_tiling


def test_callback_on_step_end_sees_and_replaces_tensors(pipe):
    seen = []

    def record(pipeline, step, timestep, tensors):
        seen.append((step, int(timestep), {name: value.clone() for name, value in tensors.items()}))
        return {}

    final = _run(pipe, output_type="latent", callback_on_step_end=record,
                 callback_on_step_end_tensor_inputs=["latents", "grounding_tokens"])[0]
    assert [step for step, _, _ in seen] == list(range(STEPS))
    assert [t for _, t, _ in seen] == pipe.scheduler.timesteps.tolist()
    assert torch.equal(seen[-1][2]["latents"][0], final)
    assert seen[0][2]["grounding_tokens"].shape == (2, 30, 32)  # [null; grounded] x slots x cross-attention size

    def zero_last(pipeline, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if step == STEPS - 1 else {}

    assert torch.equal(_run(pipe, output_type="latent", callback_on_step_end=zero_last)[0], torch.zeros_like(final))
    with pytest.raises(UserError, match="callback tensor inputs must be among"):
        _run(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"])


def test_generator_latents_and_images_per_prompt(pipe):
    by_seed = _run(pipe, output_type="latent")[0]
    generator = torch.Generator().manual_seed(LAYOUT.seed)
    assert torch.equal(_run(pipe, output_type="latent", generator=generator)[0], by_seed)

    noise = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(9))
    two = _run(pipe, output_type="latent", latents=noise, num_images_per_prompt=2)
    assert len(two) == 2 and not torch.allclose(two[0], two[1])
    # batch rows may differ in the last bits (CPU kernels treat batch rows differently on some machines)
    torch.testing.assert_close(_run(pipe, output_type="latent", latents=noise[1:])[0], two[1], rtol=0, atol=1e-4)
    with pytest.raises(UserError, match="latents for 1 images, expected 2"):
        _run(pipe, latents=noise[:1], num_images_per_prompt=2)


def test_precomputed_prompt_embeddings_and_clip_skip(pipe):
    expected = _run(pipe, output_type="latent")[0]
    text = pipe.prompt_encoder
    positive, negative = text.prompts([LAYOUT.prompt]).hidden, text.prompts([""]).hidden
    got = _run(pipe, output_type="latent", prompt_embeds=positive, negative_prompt_embeds=negative)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    # clip_skip=1: the penultimate layer's states through the final LayerNorm, as diffusers' encode_prompt
    tokens = pipe.tokenizer([LAYOUT.prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    states = pipe.text_encoder(tokens, output_hidden_states=True).hidden_states[-2]
    layer_norm = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm
    skipped = text.prompts([LAYOUT.prompt], clip_skip=1).hidden
    torch.testing.assert_close(skipped, layer_norm(states), rtol=0, atol=1e-6)
    assert not torch.allclose(skipped, positive)
    assert not torch.allclose(_run(pipe, output_type="latent", clip_skip=1)[0], expected)
