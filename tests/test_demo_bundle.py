"""README's main command on the bundled demo models: offline, on the CPU, files on disk."""

import json

import pytest
from PIL import Image

from detector.cli import main as detector_main
from gligen.cli import main as gligen_main
from gligen.data.shapes import write_layouts
from gligen.demo import MODELS_DIR
from gligen.layout import load_layouts

pytestmark = pytest.mark.skipif(not (MODELS_DIR / "base").is_dir(), reason="demo models not bundled")

GROUNDED_AP50 = 0.45  # measured 0.581 (beta 0: 0.069) on these layouts with the bundled models (AMD EPYC)


def run(main, *argv) -> int:
    return main([str(a) for a in argv])


def test_readme_main_command_and_detector_on_the_demo(tmp_path):
    [layout] = load_layouts("examples/shapes.json")
    assert run(gligen_main, "generate", "--model", "demo", "--layout", "examples/shapes.json",
               "--out", tmp_path, "--overlay", "--steps", "10") == 0
    image = Image.open(tmp_path / "shapes.png")
    assert image.size == (layout.width, layout.height)
    assert Image.open(tmp_path / "shapes.overlay.png").size == (256, 256)  # 64 px enlarged 4 times to label it
    record = json.loads((tmp_path / "shapes.json").read_text())
    assert record["model"] == "demo" and record["layout"]["entities"][0]["phrase"] == "a red circle"
    assert record["adapter"] == "demo" and record["settings"]["schedule"] == [0.8, 0.0, 0.2]  # the adapter's own

    assert run(detector_main, "detect", tmp_path / "shapes.png", "--model", "demo", "--phrases", *layout.phrases,
               "--box-threshold", "0.05", "--out", tmp_path / "dets.json") == 0
    [result] = json.loads((tmp_path / "dets.json").read_text())["images"]
    assert result["phrases"] == layout.phrases


def test_demo_adapter_puts_things_in_their_boxes(tmp_path):
    """The evaluation job on 32 held-out layouts: the demo detector finds what the layouts name where their boxes
    are far more often with the bundled adapter than with grounding off (`--beta 0`)."""
    write_layouts(str(tmp_path / "heldout"), 32, size=64, seed=1)
    ap50 = {}
    for name, extra in (("grounded", []), ("beta0", ["--beta", "0"])):
        out = tmp_path / name
        assert run(gligen_main, "eval", "generate", "--annotations", tmp_path / "heldout" / "layouts.jsonl",
                   "--model", "demo", "--out", out, "--steps", "25", "--guidance", "5", "--batch-size", "16",
                   *extra) == 0
        assert run(gligen_main, "eval", "score", "--annotations", out / "layouts.jsonl", "--detector", "demo",
                   "--out", out / "report") == 0
        ap50[name] = json.loads((out / "report" / "report.json").read_text())["metrics"]["AP50"]
    assert ap50["grounded"] >= GROUNDED_AP50 and ap50["grounded"] >= 5 * ap50["beta0"], ap50
