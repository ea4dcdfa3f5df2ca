"""Visual positions in the fusers (`AdapterConfig.visual_positions`): where the tokens are, how they start, training."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gligen.adapter import GroundingAdapter
from gligen.fuser import token_centres
from gligen.layout import Entity, Layout
from gligen.pipeline import GligenPipeline
from gligen.data.shapes import write_shards
from gligen.training import Trainer
from tests.test_convert import convert_cli
from tests.tiny import save_tiny_gligen, save_tiny_sd, tiny_train_config


@pytest.mark.parametrize("latent_size", [(6, 10), (5, 7), (8, 8)])
def test_token_centres_follow_diffusers_flattening_at_every_level(latent_size):
    h, w = latent_size
    while True:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        feature_map = torch.stack([xs, ys])[None]  # (1, 2, h, w): each place holds its own centre
        tokens = feature_map.permute(0, 2, 3, 1).reshape(1, h * w, 2)  # as diffusers' Transformer2DModel flattens
        assert torch.equal(token_centres(h * w, latent_size), tokens[0])
        if (h, w) == (1, 1):
            break
        h, w = math.ceil(h / 2), math.ceil(w / 2)  # a stride-2 convolution with padding 1
    with pytest.raises(ValueError, match="7 visual tokens are no level of a"):
        token_centres(7, latent_size)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """The tiny GLIGEN pipeline, and the same with its adapter's fusers given (zero) visual positions."""
    _, directory = save_tiny_gligen(tmp_path_factory.mktemp("gligen"))
    plain = GligenPipeline.from_pretrained(str(directory))
    positioned = GroundingAdapter(dataclasses.replace(plain.adapter.config, visual_positions=True))
    missing, unexpected = positioned.load_state_dict(plain.adapter.state_dict(), strict=False)
    assert missing and all(".position." in key for key in missing) and not unexpected
    return plain, GligenPipeline.from_pretrained(str(directory), adapter=positioned)


def _image(pipe, width=24, height=16):
    """A non-square layout, so that the token grids of every level are non-square too."""
    layout = Layout("a cat and a dog", (Entity("a cat", (0.1, 0.2, 0.5, 0.9)), Entity("a dog", (0.55, 0.25, 0.95, 0.8))),
                    width=width, height=height, seed=3)
    return pipe(layout, num_inference_steps=5, output_type="np").images[0]


def test_fresh_visual_positions_change_nothing_and_trained_ones_do(pipelines):
    plain, positioned = pipelines
    assert np.array_equal(_image(positioned), _image(plain))  # zero-initialised: x + 0 is x, exactly
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for fuser in positioned.adapter.fusers:
            fuser.position.weight.copy_(torch.randn(fuser.position.weight.shape, generator=generator))
    try:
        assert np.abs(_image(positioned) - _image(plain)).max() > 1e-3
    finally:
        for fuser in positioned.adapter.fusers:
            torch.nn.init.zeros_(fuser.position.weight)


def test_a_trained_adapter_with_visual_positions_saves_loads_and_does_not_export(tmp_path, capsys):
    root = tmp_path / "run"
    write_shards(str(tmp_path / "shards"), 8, size=40, samples_per_shard=4)
    config = tiny_train_config(save_tiny_sd(tmp_path / "sd"), tmp_path / "shards", root, "max_steps=2", "grounding_drop=0",
                               "model.gate_init=0.5", "model.visual_positions=true")
    trainer = Trainer(config)
    trainer.train()
    saved = load_file(str(root / "adapter" / "adapter.safetensors"))
    positions = {k: v for k, v in saved.items() if ".fuser.position." in k}
    assert len(positions) == 2 * len(trainer.adapter.fusers)
    assert any(v.abs().max() > 0 for k, v in positions.items() if k.endswith("weight"))  # trained away from zero
    loaded = GroundingAdapter.from_pretrained(root / "adapter")
    assert loaded.config.visual_positions
    assert all(torch.equal(v, saved[k]) for k, v in loaded.adapter_state_dict().items())
    capsys.readouterr()
    assert convert_cli(root / "adapter", "--to", "comfyui", "--out", tmp_path / "x.safetensors") == 1
    err = capsys.readouterr().err
    assert "ComfyUI's GLIGENLoader has no place for this adapter's visual positions" in err
    assert "Traceback" not in err and not (tmp_path / "x.safetensors").exists()
