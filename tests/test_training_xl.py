"""Training GLIGEN-XL adapters: phrases encoded as the first encoder's `pooler_output` and the second's
projected `text_embeds` (`model.phrase_embedding=projected`), recorded in the adapter, honoured by the pipeline."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from gligen.data.shapes import write_shards
from gligen.errors import UserError
from gligen.layout import Entity, Layout
from gligen.pipeline import GligenPipeline
from gligen.training import Trainer
from gligen.training.step import encode_phrases
from tests.tiny import HIDDEN, SDXL_CROSS, SDXL_PROJECTION, save_tiny_sd, save_tiny_sdxl, tiny_train_config

PHRASES = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training_xl")
    shards = root / "shards"
    write_shards(str(shards), 8, size=40, samples_per_shard=4)
    return {"sdxl": save_tiny_sdxl(root / "sdxl"), "shards": shards, "root": root}


def config(setup, out, *overrides):
    return tiny_train_config(setup["sdxl"], setup["shards"], setup["root"] / out, "max_steps=2", *overrides)


def reference_phrase_embeds(base, phrases):
    """Written out here: each phrase alone through both encoders, encoder 1's pooler_output ++ encoder 2's
    pooler_output (unprojected) and text_embeds (projected)."""
    first, second = CLIPTextModel.from_pretrained(base / "text_encoder"), CLIPTextModelWithProjection.from_pretrained(
        base / "text_encoder_2")
    tokenizer, tokenizer_2 = CLIPTokenizer.from_pretrained(base / "tokenizer"), CLIPTokenizer.from_pretrained(
        base / "tokenizer_2")
    pooled, pooled_2, projected_2 = [], [], []
    with torch.no_grad():
        for phrase in phrases:
            pooled.append(first(tokenizer(phrase, return_tensors="pt").input_ids).pooler_output[0])
            output = second(tokenizer_2(phrase, return_tensors="pt").input_ids)
            eos = output.last_hidden_state[0, -1]  # a phrase alone: no padding, EOS last
            pooled_2.append(eos)
            projected_2.append(output.text_embeds[0])
    pooled, pooled_2, projected_2 = map(torch.stack, (pooled, pooled_2, projected_2))
    torch.testing.assert_close(projected_2, pooled_2 @ second.text_projection.weight.T, rtol=0, atol=1e-6)
    return torch.cat([pooled, projected_2], -1), torch.cat([pooled, pooled_2], -1)


def test_projected_phrase_embeddings_train_save_and_generate_alike(setup):
    cache = setup["root"] / "cache"
    trainer = Trainer(config(setup, "projected", "model.phrase_embedding=projected", f"cache_dir={cache}"))
    assert trainer.adapter.config.phrase_embedding == "projected"
    assert trainer.adapter.config.positive_len == HIDDEN + SDXL_PROJECTION  # the second encoder's projection size

    projected, unprojected = reference_phrase_embeds(setup["sdxl"], PHRASES)
    got = encode_phrases(trainer, PHRASES)
    torch.testing.assert_close(got, projected, rtol=0, atol=1e-5)
    assert encode_phrases(trainer, []).shape == (0, HIDDEN + SDXL_PROJECTION)

    plain = Trainer(config(setup, "plain", f"cache_dir={cache}"))
    assert plain.adapter.config.phrase_embedding == "pooler_output" and plain.adapter.config.positive_len == SDXL_CROSS
    plain_embeds = encode_phrases(plain, PHRASES)
    torch.testing.assert_close(plain_embeds, unprojected, rtol=0, atol=1e-5)
    assert plain.cache["phrases"].hits == 0  # the projected entries of the same phrases are not read
    assert (plain_embeds[:, :HIDDEN] == got[:, :HIDDEN]).all()  # encoder 1 is the same; encoder 2 is not
    assert plain_embeds.shape[1] != got.shape[1]
    for run, size in ((trainer, HIDDEN + SDXL_PROJECTION), (plain, SDXL_CROSS)):
        entries = list(run.cache["phrases"].directory.rglob("*.safetensors"))
        assert len(entries) == len(PHRASES)
        assert all(load_file(str(path))["0"].shape == (size,) for path in entries)
    torch.testing.assert_close(encode_phrases(trainer, PHRASES), got, rtol=0, atol=0)  # cached: the same
    assert trainer.cache["phrases"].hits == len(PHRASES)

    out = trainer.train()
    assert json.loads((out / "adapter_config.json").read_text())["phrase_embedding"] == "projected"

    pipe = GligenPipeline.from_pretrained(str(setup["sdxl"]), adapter=str(out))
    layout = Layout("shapes", tuple(Entity(p, (0.1 * i, 0.2, 0.3 + 0.2 * i, 0.8)) for i, p in enumerate(PHRASES)),
                    width=16, height=16)
    inputs = pipe.grounding_inputs([layout], slots=4)
    torch.testing.assert_close(inputs.phrase_embeds[0, :3], got, rtol=0, atol=1e-5)
    assert pipe([layout], num_inference_steps=2).images[0].size == (16, 16)


def test_an_adapter_brings_its_phrase_embedding_and_conflicts_are_named(setup):
    projected = Trainer(config(setup, "from", "model.phrase_embedding=projected", "max_steps=1")).train()
    resumed = Trainer(config(setup, "again", f"model.adapter={projected}"))
    assert resumed.adapter.config.phrase_embedding == "projected"
    torch.testing.assert_close(encode_phrases(resumed, PHRASES), reference_phrase_embeds(setup["sdxl"], PHRASES)[0],
                               rtol=0, atol=1e-5)
    with pytest.raises(UserError, match=f"^config key model.phrase_embedding: pooler_output conflicts with "
                                        f"model.adapter {projected}, trained with phrase_embedding projected$"):
        Trainer(config(setup, "conflict", f"model.adapter={projected}", "model.phrase_embedding=pooler_output"))


def test_projected_needs_an_sdxl_base(setup):
    sd = save_tiny_sd(setup["root"] / "sd")
    with pytest.raises(UserError, match=f"^config key model.phrase_embedding: projected phrase embeddings need an "
                                        f"SDXL base, {sd} has one text encoder$"):
        Trainer(config(setup, "sd", f"model.base={sd}", "model.phrase_embedding=projected"))
    with pytest.raises(UserError, match="^config key model.phrase_embedding: 'sideways' is not pooler_output or projected or null$"):
        config(setup, "x", "model.phrase_embedding=sideways")
