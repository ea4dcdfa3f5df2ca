"""SDXL bases: generation against diffusers' StableDiffusionXLPipeline, prompt and phrase encoding, training."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from gligen.adapter import GroundingAdapter
from gligen.layout import Entity, Layout
from gligen.pipeline import GligenPipeline
from gligen.training import Trainer
from gligen.training.dataset import ShardDataset
from gligen.data.shapes import write_shards
from tests.tiny import HIDDEN, SDXL_CROSS, SDXL_HIDDEN_2, randomize_grounding, save_tiny_sdxl, tiny_train_config


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "pipe")


def layout(negative_prompt=""):
    entities = (Entity("a cat", (0.1, 0.2, 0.5, 0.9)), Entity("a red ball", (0.6, 0.5, 0.9, 0.8)))
    return Layout("a cat and a red ball", entities, negative_prompt=negative_prompt, width=64, height=48, seed=3)


@pytest.mark.parametrize("negative_prompt", ["", "blurry"])
def test_sdxl_generation_matches_diffusers_with_zero_gates(sdxl, negative_prompt):
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl, add_watermarker=False)
    expected = reference("a cat and a red ball", negative_prompt=negative_prompt or None, num_inference_steps=10,
                         guidance_scale=7.5, height=48, width=64, generator=torch.Generator().manual_seed(3),
                         output_type="np").images[0]
    plain = GligenPipeline.from_pretrained(str(sdxl))
    assert plain.prompt_encoder.is_sdxl and plain.force_zeros_for_empty_prompt
    np.testing.assert_allclose(plain([layout(negative_prompt)], num_inference_steps=10, output_type="np").images[0],
                               expected, rtol=0, atol=1e-5)

    adapter = GroundingAdapter.for_unet(plain.unet)  # zero gates: the base's output, fusers and all
    assert adapter.config.positive_len == SDXL_CROSS and len(adapter.fusers) == 8  # (1 down + 1 mid + 2 up) x 2 layers
    grounded = GligenPipeline(plain.vae, plain.text_encoder, plain.tokenizer, plain.unet, plain.scheduler, adapter,
                              text_encoder_2=plain.text_encoder_2, tokenizer_2=plain.tokenizer_2)
    np.testing.assert_allclose(grounded([layout(negative_prompt)], num_inference_steps=10, output_type="np").images[0],
                               expected, rtol=0, atol=1e-5)
    randomize_grounding(adapter)
    changed = grounded([layout(negative_prompt)], num_inference_steps=10, output_type="np").images[0]
    assert np.abs(changed - expected).max() > 1e-2


def test_sdxl_prompt_and_phrase_embeddings(sdxl):
    pipe = GligenPipeline.from_pretrained(str(sdxl))
    encoder, encoder_2 = pipe.text_encoder, pipe.text_encoder_2
    phrases = ["a cat", "a red ball"]
    embeds = pipe.prompt_encoder.phrases(phrases)
    assert embeds.shape == (2, HIDDEN + SDXL_HIDDEN_2) and pipe.prompt_encoder.phrase_dim() == SDXL_CROSS
    with torch.no_grad():
        for row, phrase in enumerate(phrases):
            ids = pipe.tokenizer(phrase, return_tensors="pt").input_ids  # one phrase: no padding
            ids_2 = pipe.tokenizer_2(phrase, return_tensors="pt").input_ids
            first = encoder(ids).last_hidden_state[0, -1]  # EOS after the final LayerNorm
            output_2 = encoder_2(ids_2)
            second = output_2.last_hidden_state[0, -1]
            torch.testing.assert_close(embeds[row], torch.cat([first, second]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(encoder_2.text_projection(second), output_2.text_embeds[0], rtol=1e-5, atol=1e-6)

    # an empty negative prompt is SDXL's zero embedding; a given one is encoded
    prompt = pipe.encode_prompts([layout(""), layout("blurry")], guided=True)
    assert prompt.hidden.shape == (4, 77, SDXL_CROSS) and prompt.pooled.shape == (4, 24)
    assert not prompt.hidden[0].any() and not prompt.pooled[0].any()
    assert prompt.hidden[1].abs().sum() > 0 and prompt.pooled[1].abs().sum() > 0
    torch.testing.assert_close(pipe.time_ids([layout()], guided=True), torch.tensor([[48.0, 64, 0, 0, 48, 64]] * 2))


def test_sdxl_adapter_trains_and_generates(sdxl, tmp_path):
    shards = tmp_path / "shards"
    write_shards(str(shards), 8, size=40, samples_per_shard=4)
    config = tiny_train_config(sdxl, shards, tmp_path / "run", "max_steps=4", "grounding_drop=0", "data.caption_drop=0",
                               "optim.lr=3e-3")
    trainer = Trainer(config)
    assert trainer.prompts.is_sdxl and trainer.adapter.config.positive_len == SDXL_CROSS
    base = {k: v.clone() for k, v in trainer.parts["unet"].state_dict().items() if ".fuser." not in k}

    batch = next(iter(ShardDataset(trainer.config.data, batch_size=2, seed=0)))
    assert batch["original_sizes"].tolist() == [[40.0, 40.0]] * 2  # square images: the crop corner is (0, 0)
    assert batch["crops_top_left"].tolist() == [[0.0, 0.0]] * 2

    def loss(**changes):
        trainer.generator.manual_seed(5)
        with torch.no_grad():
            return trainer.loss({**batch, **changes}).item()

    # the size conditioning reaches the UNet: another original size is another prediction
    assert loss() != loss(original_sizes=batch["original_sizes"] * 4)

    out = trainer.train()
    assert trainer.step == 4
    after = trainer.parts["unet"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert any(v.abs().max() > 0 for k, v in trainer.adapter.adapter_state_dict().items() if "alpha_attn" in k)

    pipe = GligenPipeline.from_pretrained(str(sdxl), adapter=str(out))
    image = pipe([Layout("a red circle", (Entity("a red circle", (0.2, 0.2, 0.7, 0.7)),), width=16, height=16)],
                 num_inference_steps=2).images[0]
    assert image.size == (16, 16)
