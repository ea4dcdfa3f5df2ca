"""Map conditions end to end on tiny models: layouts carrying a map generate, bad maps get one line, the
ConvNeXt loads transformers' weights."""

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from transformers import ConvNextConfig, ConvNextModel

from gligen.adapter import GroundingAdapter
from gligen.layout import Layout
from gligen.maps.convnext import from_transformers
from gligen.maps.nets import MapConfig
from tests.test_generate_cli import CAT, gligen_cli
from tests.tiny import randomize_grounding, save_tiny_sd

TINY_MAP = dict(depths=[1, 1, 1, 1], dims=[4, 4, 8, 8], resize_input=64)


def edges(shift=0):
    """A white square outline on black, 16 px, moved right by `shift`."""
    image = np.zeros((16, 16), np.uint8)
    image[3:13, 3 + shift] = image[3:13, 12 + shift] = image[3, 3 + shift:13 + shift] = image[12, 3 + shift:13 + shift] = 255
    return Image.fromarray(image)


@pytest.fixture(scope="module")
def sd_and_map_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("maps")
    save_tiny_sd(root / "sd")
    unet = UNet2DConditionModel.from_pretrained(root / "sd", subfolder="unet")
    for kind in ("canny", "sem"):
        adapter = GroundingAdapter.for_unet(unet, feature_type=None, condition=MapConfig(kind, **TINY_MAP))
        randomize_grounding(adapter)
        with torch.no_grad():
            adapter.conv_in_extra.normal_(std=0.5)
        adapter.save_pretrained(root / kind)
    return root


def layout_file(path, condition, **changes):
    layout = {"prompt": "a house", "width": 16, "height": 16, "seed": 1, "condition": condition, **changes}
    path.write_text(json.dumps(layout))
    return path


def test_a_layout_with_a_map_generates_and_follows_its_map(sd_and_map_adapters, tmp_path, capsys):
    root = sd_and_map_adapters
    edges().save(tmp_path / "square.png")
    edges(shift=3).save(tmp_path / "moved.png")
    args = ["--model", root / "sd", "--adapter", root / "canny"]
    for name in ("square", "moved"):
        layout = layout_file(tmp_path / f"{name}.json", {"type": "canny", "image": f"{name}.png"})
        assert gligen_cli(*args, "--layout", layout, "--out", tmp_path / "out") == 0
    record = json.loads((tmp_path / "out" / "square.json").read_text())
    assert record["layout"]["condition"] == {"type": "canny", "image": str(tmp_path / "square.png")}
    assert record["settings"]["schedule"] == [0.9, 0.0, 0.1]  # the canny releases' default
    square, moved = (np.asarray(Image.open(tmp_path / "out" / f"{n}.png"), dtype=int) for n in ("square", "moved"))
    assert square.shape == (16, 16, 3) and np.abs(square - moved).max() > 0  # the map steers the image

    labels = np.zeros((16, 16), np.uint8)
    labels[:, 8:] = 150  # ADE20K classes
    Image.fromarray(labels, "L").save(tmp_path / "labels.png")
    layout = layout_file(tmp_path / "sem.json", {"type": "sem", "image": "labels.png"}, entities=[CAT])
    assert gligen_cli("--model", root / "sd", "--adapter", root / "sem", "--layout", layout, "--out", tmp_path / "sem") == 0
    assert capsys.readouterr().err.count("warning: entity boxes are ignored: the model grounds 'sem' maps only") == 1
    assert (tmp_path / "sem" / "sem.png").is_file()


def _one_line(capsys, message):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_bad_maps_get_one_line(sd_and_map_adapters, tmp_path, capsys):
    root = sd_and_map_adapters
    canny, sem = ["--model", root / "sd", "--adapter", root / "canny"], ["--model", root / "sd", "--adapter", root / "sem"]
    out = tmp_path / "out"

    missing = layout_file(tmp_path / "missing.json", {"type": "canny", "image": "nowhere.png"})
    assert gligen_cli(*canny, "--layout", missing, "--out", out) == 1
    _one_line(capsys, f"condition: map image not found: {tmp_path / 'nowhere.png'}")

    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    broken = layout_file(tmp_path / "broken.json", {"type": "canny", "image": "broken.png"})
    assert gligen_cli(*canny, "--layout", broken, "--out", out) == 1
    _one_line(capsys, f"cannot read the map image {tmp_path / 'broken.png'}")

    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "photo.png")
    rgb_labels = layout_file(tmp_path / "rgb.json", {"type": "sem", "image": "photo.png"})
    assert gligen_cli(*sem, "--layout", rgb_labels, "--out", out) == 1
    _one_line(capsys, "is a R/G/B image; a 'sem' map is an ADE20K label PNG")

    edges().save(tmp_path / "edges.png")
    depth = layout_file(tmp_path / "depth.json", {"type": "depth", "image": "edges.png"})
    assert gligen_cli(*canny, "--layout", depth, "--out", out) == 1
    _one_line(capsys, "has a 'depth' map, but this model grounds 'canny' maps")

    no_map = tmp_path / "boxes.json"
    no_map.write_text(json.dumps({"prompt": "a cat", "width": 16, "height": 16, "entities": [CAT]}))
    assert gligen_cli(*canny, "--layout", no_map, "--out", out) == 1
    _one_line(capsys, "has no 'condition', but this model grounds 'canny' maps")

    canny_layout = layout_file(tmp_path / "canny.json", {"type": "canny", "image": "edges.png"})
    assert gligen_cli("--model", root / "sd", "--layout", canny_layout, "--out", out) == 1
    _one_line(capsys, "this model grounds no maps, so it cannot use the 'canny' condition")

    unknown = layout_file(tmp_path / "unknown.json", {"type": "sketch", "image": "edges.png"})
    assert gligen_cli(*canny, "--layout", unknown, "--out", out) == 1
    _one_line(capsys, "condition: 'type' must be one of canny, hed, depth, normal, sem, got 'sketch'")

    labels = np.full((16, 16), 200, np.uint8)
    Image.fromarray(labels, "L").save(tmp_path / "too_high.png")
    too_high = layout_file(tmp_path / "high.json", {"type": "sem", "image": "too_high.png"})
    assert gligen_cli(*sem, "--layout", too_high, "--out", out) == 1
    _one_line(capsys, "holds label 200; ADE20K label maps hold 0 .. 151")
    assert not out.exists()


def test_layout_round_trip_keeps_the_condition(tmp_path):
    edges().save(tmp_path / "e.png")
    layout = Layout.from_dict({"prompt": "p", "condition": {"type": "hed", "image": "e.png"}}, "layout", tmp_path)
    assert layout.condition.type == "hed" and layout.condition.image == str(tmp_path / "e.png")
    assert Layout.from_dict(layout.to_dict(), "again").condition == layout.condition


def test_convnext_loads_transformers_weights(tmp_path):
    torch.manual_seed(0)
    config = ConvNextConfig(depths=[1, 2, 1, 1], hidden_sizes=[8, 8, 12, 16], layer_scale_init_value=0.5)
    ConvNextModel(config).eval().save_pretrained(tmp_path / "convnext")
    theirs = ConvNextModel.from_pretrained(tmp_path / "convnext").eval()
    ours = from_transformers(str(tmp_path / "convnext")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).last_hidden_state, rtol=0, atol=1e-5)


def test_eval_generates_map_only_layouts_with_the_maps_schedule_and_scores_their_fidelity(
        sd_and_map_adapters, tmp_path):
    from tests.test_eval_end_to_end import cli
    from tests.tiny_detector import save_tiny_detector

    root = sd_and_map_adapters
    for shift in (0, 3):
        edges(shift).save(tmp_path / f"edges{shift}.png")
    layouts = tmp_path / "layouts.jsonl"
    layouts.write_text("".join(
        json.dumps({"prompt": "a house", "width": 16, "height": 16, "image_id": i,
                    "condition": {"type": "canny", "image": f"edges{shift}.png"}}) + "\n"
        for i, shift in enumerate((0, 3))))
    model = ["--model", str(root / "sd"), "--adapter", str(root / "canny"), "--steps", "4", "--size", "16",
             "--device", "cpu", "--annotations", str(layouts)]
    runs = {"default": [], "canny": ["--schedule", "0.9,0,0.1"], "boxes": ["--schedule", "0.3,0,0.7"]}
    for name, schedule in runs.items():
        status, stderr = cli("generate", *model, *schedule, "--out", str(tmp_path / name))
        assert status == 0, stderr
    images = {name: [np.asarray(Image.open(path)) for path in sorted((tmp_path / name).glob("*.png"))] for name in runs}
    assert len(images["default"]) == 2  # map-only layouts pass --min-objects 1
    assert all(np.array_equal(a, b) for a, b in zip(images["default"], images["canny"]))  # the canny releases' schedule
    assert not all(np.array_equal(a, b) for a, b in zip(images["default"], images["boxes"]))

    detector = save_tiny_detector(tmp_path / "detector")
    status, stderr = cli("score", "--annotations", str(tmp_path / "default" / "layouts.jsonl"), "--detector",
                         str(detector), "--condition-fidelity", "--out", str(tmp_path / "score"))
    assert status == 0, stderr
    report = json.loads((tmp_path / "score" / "report.json").read_text())
    assert 0 <= report["metrics"]["canny edge_f1"] <= 1 and report["metrics"]["canny maps"] == 2
    assert report["layout"] is None and (tmp_path / "score" / "samples.png").is_file()
    assert "canny edge_f1" in (tmp_path / "score" / "report.md").read_text()
