"""README's main command on the bundled demo models: offline, on the CPU, files on disk."""

import json

import pytest
from PIL import Image

from detector.cli import main as detector_main
from gligen.cli import main as gligen_main
from gligen.demo import MODELS_DIR
from gligen.layout import load_layouts

pytestmark = pytest.mark.skipif(not (MODELS_DIR / "base").is_dir(), reason="demo models not bundled")


def run(main, *argv) -> int:
    return main([str(a) for a in argv])


def test_readme_main_command_and_detector_on_the_demo(tmp_path):
    [layout] = load_layouts("examples/shapes.json")
    assert run(gligen_main, "generate", "--model", "demo", "--layout", "examples/shapes.json",
               "--out", tmp_path, "--overlay", "--steps", "10") == 0
    image = Image.open(tmp_path / "shapes.png")
    assert image.size == (layout.width, layout.height)
    assert Image.open(tmp_path / "shapes.overlay.png").size == (256, 256)  # 32 px enlarged 8 times to label it
    record = json.loads((tmp_path / "shapes.json").read_text())
    assert record["model"] == "demo" and record["layout"]["entities"][0]["phrase"] == "a red circle"

    assert run(detector_main, "detect", tmp_path / "shapes.png", "--model", "demo", "--phrases", *layout.phrases,
               "--box-threshold", "0.05", "--out", tmp_path / "dets.json") == 0
    [result] = json.loads((tmp_path / "dets.json").read_text())["images"]
    assert result["phrases"] == layout.phrases
