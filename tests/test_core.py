"""Grounding tokens, fusers, adapters and the schedule against diffusers' reference modules."""

import pytest
import torch
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection, get_fourier_embeds_from_boundingbox

from gligen.adapter import GroundingAdapter
from gligen.errors import UserError
from gligen.fuser import transformer_blocks
from gligen.grounding import GroundingInputs, TextBoxPositionNet, TextImageBoxPositionNet, fourier_embed
from gligen.schedule import grounding_scales, parse_schedule, schedule_from_beta
from tests.tiny import HIDDEN, randomize_grounding, tiny_unet


def test_fourier_matches_diffusers():
    boxes = torch.rand(2, 5, 4)
    torch.testing.assert_close(fourier_embed(boxes), get_fourier_embeds_from_boundingbox(8, boxes), rtol=0, atol=0)


@pytest.mark.parametrize("ours, feature_type", [(TextBoxPositionNet, "text-only"), (TextImageBoxPositionNet, "text-image")])
def test_position_net_loads_diffusers_weights_and_agrees(ours, feature_type):
    torch.manual_seed(0)
    reference = GLIGENTextBoundingboxProjection(positive_len=24, out_dim=40, feature_type=feature_type)
    randomize_grounding(reference)
    net = ours(positive_len=24, out_dim=40)
    net.load_state_dict(reference.state_dict())  # strict: the same names and shapes
    boxes, embeds, images = torch.rand(2, 6, 4), torch.randn(2, 6, 24), torch.randn(2, 6, 24)
    masks = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    image_masks = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    if feature_type == "text-only":
        expected = reference(boxes, masks, positive_embeddings=embeds)
        got = net(boxes, masks, embeds)
    else:
        expected = reference(boxes, masks, phrases_masks=masks, image_masks=image_masks,
                             phrases_embeddings=embeds, image_embeddings=images)
        got = net(boxes, masks, embeds, images, masks, image_masks)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # padded slots get the null token whatever their inputs are
    boxes2 = boxes.clone()
    boxes2[0, 4] = 0.5
    again = net(boxes2, masks, embeds) if feature_type == "text-only" else net(boxes2, masks, embeds, images, masks, image_masks)
    torch.testing.assert_close(again, got)


def test_schedule_stages():
    assert grounding_scales(10, (0.3, 0.0, 0.7)) == [1.0] * 3 + [0.0] * 7
    assert grounding_scales(10, (0.2, 0.4, 0.4)) == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert grounding_scales(50, schedule_from_beta(1.0)) == [1.0] * 50
    # diffusers: grounding on for steps i < int(beta * T)
    assert sum(grounding_scales(50, schedule_from_beta(0.3))) == int(0.3 * 50)
    assert parse_schedule("0.5,0.25,0.25") == (0.5, 0.25, 0.25)
    with pytest.raises(UserError, match="sum to 1"):
        parse_schedule("0.5,0.5,0.5")
    for beta in (1.5, float("nan"), True, "0.5"):
        with pytest.raises(UserError, match="beta must be in"):
            schedule_from_beta(beta)
    for values in ([0.5, "0.5", 0.0], [0.5, float("nan"), 0.5], [1, None, 0]):
        with pytest.raises(UserError, match="must be three non-negative fractions"):
            parse_schedule(values)


def _unet_inputs(batch=2):
    torch.manual_seed(3)
    return torch.randn(batch, 4, 8, 8), torch.tensor(10), torch.randn(batch, 7, HIDDEN)


def _grounding(adapter, batch=2, n=3):
    inputs = GroundingInputs(torch.rand(batch, n, 4), torch.ones(batch, n), torch.randn(batch, n, HIDDEN))
    return adapter.tokens(inputs)


def test_zero_gates_change_nothing_and_detach_restores_base():
    unet = tiny_unet()
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    sample, t, text = _unet_inputs()
    with torch.no_grad():
        base_out = unet(sample, t, text).sample
        adapter = GroundingAdapter.for_unet(unet)
        adapter.attach(unet)
        tokens = _grounding(adapter)
        zero_gate_out = unet(sample, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(tokens)).sample
        torch.testing.assert_close(zero_gate_out, base_out, rtol=0, atol=0)

        randomize_grounding(adapter)
        grounded = unet(sample, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(tokens)).sample
        assert (grounded - base_out).abs().max() > 1e-3
        half = unet(sample, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(tokens, 0.5)).sample
        assert 0 < (half - base_out).abs().max() < (grounded - base_out).abs().max()
        assert adapter.cross_attention_kwargs(tokens, 0.0) is None

        adapter.detach(unet)
        torch.testing.assert_close(unet(sample, t, text).sample, base_out, rtol=0, atol=0)
    assert unet.state_dict().keys() == base_state.keys()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in base_state.items())


def test_adapter_matches_diffusers_gligen_unet(tmp_path):
    """Our adapter on a plain UNet computes what diffusers' gated UNet computes with the same weights."""
    reference = tiny_unet(attention_type="gated")
    randomize_grounding(reference)
    unet = tiny_unet()
    unet.load_state_dict({k: v for k, v in reference.state_dict().items() if "fuser" not in k and "position_net" not in k})
    adapter = GroundingAdapter.for_unet(unet)
    adapter.load_adapter_state_dict({k: v for k, v in reference.state_dict().items() if "fuser" in k or "position_net" in k})
    adapter.save_pretrained(tmp_path / "adapter")
    adapter = GroundingAdapter.from_pretrained(tmp_path / "adapter")
    adapter.attach(unet)

    sample, t, text = _unet_inputs()
    boxes, masks, embeds = torch.rand(2, 30, 4), torch.zeros(2, 30), torch.randn(2, 30, HIDDEN)
    masks[:, :3] = 1
    masks[0] = 0  # the unconditional half of classifier-free guidance
    with torch.no_grad():
        expected = reference(sample, t, text, cross_attention_kwargs={
            "gligen": {"boxes": boxes, "positive_embeddings": embeds, "masks": masks}}).sample
        tokens = adapter.tokens(GroundingInputs(boxes, masks, embeds))
        got = unet(sample, t, text, cross_attention_kwargs=adapter.cross_attention_kwargs(tokens)).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_adapter_that_does_not_fit_names_the_block(tmp_path):
    unet = tiny_unet()
    adapter = GroundingAdapter.for_unet(unet)
    other = tiny_unet()
    first = next(iter(transformer_blocks(other)))
    adapter.config.blocks[first] = (16, 2, 8)
    with pytest.raises(UserError, match=f"block {first} is"):
        adapter.attach(other)
    with pytest.raises(UserError, match="not an adapter directory"):
        GroundingAdapter.from_pretrained(tmp_path)
    GroundingAdapter.for_unet(unet).save_pretrained(tmp_path)
    (tmp_path / "adapter.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="not a safetensors file"):
        GroundingAdapter.from_pretrained(tmp_path)


def test_inpaint_extra_channels_start_at_zero():
    unet = tiny_unet()
    sample, t, text = _unet_inputs()
    adapter = GroundingAdapter.for_unet(unet, inpaint=True)
    assert adapter.config.extra_in_channels == 5
    with torch.no_grad():
        base = unet(sample, t, text).sample
        adapter.attach(unet)
        extended = unet(torch.cat([sample, torch.randn(2, 5, 8, 8)], 1), t, text).sample
        torch.testing.assert_close(extended, base, rtol=0, atol=1e-6)
        adapter.detach(unet)
    assert isinstance(unet.conv_in, torch.nn.Conv2d)



LOADED_MODULES = """
import sys
from {cli} import main
try:
    main({argv!r})
except SystemExit:
    pass
print("loaded:" + ",".join(m for m in ("diffusers", "transformers", "detector.detect") if m in sys.modules))
"""


@pytest.mark.parametrize("cli, argv, loaded", [
    ("gligen.cli", ["--help"], ""),
    ("gligen.cli", ["data", "--help"], ""),
    ("gligen.cli", ["generate", "--help"], ""),
    ("gligen.cli", ["convert", "--help"], "diffusers,transformers"),
    ("detector.cli", ["--help"], ""),
])
def test_commands_import_only_what_they_run(cli, argv, loaded):
    """Help and argument parsing load only the chosen command's module (no model libraries for most)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", LOADED_MODULES.format(cli=cli, argv=argv)],
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert "usage:" in lines[0]
    assert lines[-1] == f"loaded:{loaded}"


def test_small_images_are_enlarged_whole_before_boxes_are_drawn():
    import numpy as np
    from PIL import Image

    from gligen.draw import PALETTE, draw_boxes

    pixels = np.random.default_rng(0).integers(0, 255, (10, 20, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for box, normalized in (((0.5, 0.2, 0.9, 0.8), True), ((10, 2, 18, 8), False)):
        overlay = np.asarray(draw_boxes(image, [box], ["x"], normalized=normalized))
        assert overlay.shape == (260, 520, 3)  # 26 times: the shorter side reaches 256
        np.testing.assert_array_equal(overlay[-1, :100], np.repeat(pixels[-1, :4], 26, axis=0)[:100])
        assert tuple(overlay[200, 260]) == PALETTE[0]  # the left edge of the box, at x = 10 * 26
        assert tuple(overlay[200, 250]) == tuple(pixels[7, 9])
    large = Image.new("RGB", (300, 256))
    assert draw_boxes(large, [], []).size == (300, 256)

    label = "a label much wider than its box"
    overlay = np.asarray(draw_boxes(large, [(280, 100, 299, 150)], [label], normalized=False))
    filled = np.flatnonzero((overlay[:100] == PALETTE[0]).all(-1).any(0))  # columns of the label's background
    assert filled.max() == 299 and filled.min() < 280 - 100  # ends at the right edge, starts well left of the box
