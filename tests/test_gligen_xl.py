"""GLIGEN-XL: an SDXL pipeline directory with a gated UNet. Its phrase embedding is the first encoder's
`pooler_output` concatenated with the second encoder's *projected* `text_embeds`."""

import json

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

from gligen.adapter import AdapterConfig, GroundingAdapter
from gligen.layout import Entity, Layout
from gligen.pipeline import GligenPipeline
from tests.tiny import HIDDEN, randomize_grounding, tiny_text_encoder, tiny_tokenizer, tiny_vae

HIDDEN_2 = 48  # the second encoder's width, and its projection's: phrase features fill the cross-attention size
CROSS = HIDDEN + HIDDEN_2
PHRASES = ["a cat", "a red ball on the grass"]


def _save_gligen_xl(directory):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + HIDDEN_2, cross_attention_dim=CROSS,
        norm_num_groups=16, attention_type="gated",
    ).eval()
    randomize_grounding(unet)
    tokenizer, tokenizer_2 = tiny_tokenizer(directory / "_t1"), tiny_tokenizer(directory / "_t2")
    StableDiffusionXLPipeline(
        vae=tiny_vae(), unet=unet, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        text_encoder=tiny_text_encoder(len(tokenizer)),
        text_encoder_2=tiny_text_encoder(len(tokenizer_2), HIDDEN_2, HIDDEN_2, with_projection=True, seed=1),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        add_watermarker=False,
    ).save_pretrained(directory / "pipe")
    return directory / "pipe", unet


def _reference_phrase_embeds(pipe, phrases):
    """Written out here: each phrase alone through both encoders; encoder 1's pooled output, encoder 2's text_embeds."""
    rows = []
    for phrase in phrases:
        ids_1 = pipe.tokenizer(phrase, return_tensors="pt").input_ids
        ids_2 = pipe.tokenizer_2(phrase, return_tensors="pt").input_ids
        first = pipe.text_encoder(ids_1).pooler_output
        second = pipe.text_encoder_2(ids_2).text_embeds
        rows.append(torch.cat([first, second], dim=-1)[0])
    return torch.stack(rows)


def test_gligen_xl_directory_is_recognised_and_encodes_phrases_projected(tmp_path):
    directory, gated = _save_gligen_xl(tmp_path)
    pipe = GligenPipeline.from_pretrained(str(directory))
    assert pipe.is_sdxl and pipe.adapter.config.phrase_embedding == "projected"
    assert pipe.unet.config.attention_type == "default"
    for key, value in pipe.adapter.adapter_state_dict().items():
        assert torch.equal(value, gated.state_dict()[key]), key

    expected = _reference_phrase_embeds(pipe, PHRASES)
    with torch.no_grad():
        got = pipe.prompt_encoder.phrases(PHRASES, projected=True)
        unprojected = pipe.prompt_encoder.phrases(PHRASES)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert got.shape == (2, CROSS) and (got - unprojected).abs().max() > 1e-2

    layout = Layout("a cat and a ball", tuple(Entity(p, (0.1 + 0.4 * i, 0.2, 0.5 + 0.4 * i, 0.9))
                                              for i, p in enumerate(PHRASES)), width=16, height=16)
    inputs = pipe.grounding_inputs([layout], slots=4)
    torch.testing.assert_close(inputs.phrase_embeds[0, :2], expected, rtol=0, atol=1e-5)


def test_phrase_embedding_is_recorded_in_the_adapter_config(tmp_path):
    directory, _ = _save_gligen_xl(tmp_path)
    GligenPipeline.from_pretrained(str(directory)).adapter.save_pretrained(tmp_path / "adapter")
    assert GroundingAdapter.from_pretrained(tmp_path / "adapter").config.phrase_embedding == "projected"
    config = (tmp_path / "adapter" / "adapter_config.json")
    data = json.loads(config.read_text())
    del data["phrase_embedding"]  # adapters written before the key existed
    assert AdapterConfig.from_dict(data, str(config)).phrase_embedding == "pooler_output"
