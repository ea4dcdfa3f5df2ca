"""`gligen generate` end to end on tiny saved models: outputs, records, resume, bad inputs, detector options."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from gligen.adapter import GroundingAdapter
from gligen.cli import main
from gligen.layout import load_layouts
from gligen.pipeline import GligenPipeline
from tests.tiny import HIDDEN, randomize_grounding, save_tiny_sd

CAT = {"phrase": "a cat", "box": [0.1, 0.2, 0.5, 0.9]}
DOG = {"phrase": "a dog", "box": [0.55, 0.25, 0.95, 0.8]}
LAYOUT = {"prompt": "a cat and a dog", "width": 16, "height": 16, "seed": 3, "entities": [CAT, DOG]}


def gligen_cli(*argv):
    """Run `gligen generate ...` in this process; its exit status."""
    try:
        return main(["generate", "--device", "cpu", "--steps", "2", *map(str, argv)])
    except SystemExit as usage_error:
        return usage_error.code


def write_jsonl(path, *layouts):
    path.write_text("".join(json.dumps(layout) + "\n" for layout in layouts))
    return path


@pytest.fixture(scope="module")
def sd_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    save_tiny_sd(root / "sd")
    adapter = GroundingAdapter.for_unet(UNet2DConditionModel.from_pretrained(root / "sd", subfolder="unet"))
    randomize_grounding(adapter)
    adapter.save_pretrained(root / "adapter")
    return root / "sd", root / "adapter"


def test_generate_from_a_diffusers_gligen_directory(gligen_dir, tmp_path, capsys):
    layouts = write_jsonl(tmp_path / "layouts.jsonl", {**LAYOUT, "name": "cats"}, {**LAYOUT, "seed": 4, "entities": [DOG]})
    out = tmp_path / "out"
    assert gligen_cli("--model", gligen_dir, "--layout", layouts, "--out", out, "--overlay", "--batch-size", 2) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "cats.json", "cats.overlay.png", "cats.png", "layouts_0001.json", "layouts_0001.overlay.png", "layouts_0001.png"]

    expected = GligenPipeline.from_pretrained(str(gligen_dir))(load_layouts(layouts), num_inference_steps=2).images
    for name, image in zip(["cats", "layouts_0001"], expected):
        assert np.array_equal(np.asarray(Image.open(out / f"{name}.png")), np.asarray(image))
        overlay = np.asarray(Image.open(out / f"{name}.overlay.png"))
        enlarged = np.asarray(image.resize((256, 256), Image.NEAREST))  # 16 px, enlarged 16 times to label it
        assert overlay.shape == enlarged.shape and not np.array_equal(overlay, enlarged)
    record = json.loads((out / "cats.json").read_text())
    assert record["image"] == "cats.png" and record["seed"] == 3
    assert record["model"] == str(gligen_dir) and record["adapter"] is None
    assert record["layout"]["entities"] == [CAT, DOG]
    assert record["settings"]["steps"] == 2 and record["settings"]["schedule"] == [0.3, 0.0, 0.7]
    assert record["settings"]["dtype"] == "float32" and record["settings"]["scheduler"] == "DDIMScheduler"

    # a second run finds everything done and writes nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert gligen_cli("--model", gligen_dir, "--layout", layouts, "--out", out, "--overlay") == 0
    assert "2 of 2 layouts already done" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_generate_with_a_base_and_an_adapter(sd_and_adapter, tmp_path):
    sd, adapter = sd_and_adapter
    layout = tmp_path / "one.json"
    layout.write_text(json.dumps(LAYOUT))
    out = tmp_path / "out"
    argv = ["--model", sd, "--adapter", adapter, "--layout", layout, "--beta", 1.0, "--seed", 11, "--scheduler", "euler"]
    assert gligen_cli(*argv, "--out", out) == 0
    record = json.loads((out / "one.json").read_text())
    assert record["seed"] == 11 and record["layout"]["seed"] == 11 and record["adapter"] == str(adapter)
    assert record["settings"]["schedule"] == [1.0, 0.0, 0.0]
    assert record["settings"]["scheduler"] == "EulerDiscreteScheduler"
    # the adapter grounds the image: the base alone gives another one
    assert gligen_cli("--model", sd, "--layout", layout, "--beta", 1.0, "--seed", 11, "--scheduler", "euler",
                      "--out", tmp_path / "base") == 0
    grounded, base = (np.asarray(Image.open(d / "one.png"), dtype=int) for d in (out, tmp_path / "base"))
    assert np.abs(grounded - base).max() > 0


def _bad_layout(tmp_path, **entity_changes):
    return write_jsonl(tmp_path / "bad.jsonl", LAYOUT, {**LAYOUT, "entities": [CAT, {**DOG, **entity_changes}]})


BAD_LAYOUTS = {
    "nan box": (dict(box=[float("nan"), 0.2, 0.5, 0.9]), "entity 1 ('a dog'): box [nan, 0.2, 0.5, 0.9] has a NaN"),
    "x1 <= x0": (dict(box=[0.5, 0.2, 0.4, 0.9]), "entity 1 ('a dog'): box [0.5, 0.2, 0.4, 0.9] has x1 <= x0"),
    "outside": (dict(box=[0.5, 0.2, 1.5, 0.9]), "entity 1 ('a dog'): box [0.5, 0.2, 1.5, 0.9] has coordinates outside"),
    "empty phrase": (dict(phrase="  "), "entity 1: empty phrase"),
    "missing reference": (dict(image="nowhere.png"), "entity 1 ('a dog'): reference image not found"),
}


@pytest.mark.parametrize("case", BAD_LAYOUTS)
def test_bad_layouts_exit_1_naming_the_entity_and_write_nothing(gligen_dir, tmp_path, capsys, case):
    changes, message = BAD_LAYOUTS[case]
    layouts = _bad_layout(tmp_path, **changes)
    assert gligen_cli("--model", gligen_dir, "--layout", layouts, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"gligen: error: {layouts} line 2: {message}" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error" in line]) == 1
    assert not (tmp_path / "out").exists()


def _fails(capsys, tmp_path, argv, message):
    assert gligen_cli(*argv, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "gligen: error: " in err and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert not (tmp_path / "out").exists()


def test_bad_files_exit_1(gligen_dir, sd_and_adapter, tmp_path, capsys):
    layouts = write_jsonl(tmp_path / "ok.jsonl", LAYOUT)
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(json.dumps(LAYOUT) + '\n{"prompt": "a dog", "entities": [\n')
    _fails(capsys, tmp_path, ["--model", gligen_dir, "--layout", malformed], f"{malformed} line 2: invalid JSON")

    not_a_model = tmp_path / "weights.bin"
    not_a_model.write_bytes(b"\x00 no checkpoint here")
    _fails(capsys, tmp_path, ["--model", not_a_model, "--layout", layouts], "not a diffusers pipeline directory")

    sd, _ = sd_and_adapter
    broken = tmp_path / "broken_adapter"
    GroundingAdapter.for_unet(UNet2DConditionModel.from_pretrained(sd, subfolder="unet")).save_pretrained(broken)
    (broken / "adapter.safetensors").write_bytes(b"garbage")
    _fails(capsys, tmp_path, ["--model", sd, "--adapter", broken, "--layout", layouts], "not a safetensors file")

    torch.manual_seed(0)
    other_base = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, norm_num_groups=8, cross_attention_dim=HIDDEN,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
    )
    GroundingAdapter.for_unet(other_base).save_pretrained(tmp_path / "other_adapter")
    _fails(capsys, tmp_path, ["--model", sd, "--adapter", tmp_path / "other_adapter", "--layout", layouts],
           "adapter does not fit the base UNet: block down_blocks.0.attentions.0.transformer_blocks.0 is")

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    with_reference = write_jsonl(tmp_path / "ref.jsonl", {**LAYOUT, "entities": [{**CAT, "image": "corrupt.png"}]})
    _fails(capsys, tmp_path, ["--model", gligen_dir, "--layout", with_reference], f"{corrupt}: cannot read the image")

    _fails(capsys, tmp_path, ["--model", gligen_dir, "--layout", layouts, "--schedule", "0.5,0.5,0.5"], "must sum to 1")
    _fails(capsys, tmp_path, ["--model", gligen_dir, "--layout", layouts, "--scheduler", "nope"], "unknown scheduler 'nope'")
    _fails(capsys, tmp_path, ["--model", gligen_dir, "--layout", layouts, "--inpaint-image", corrupt],
           "cannot read the image")


def test_console_entry_point_user_and_usage_errors(tmp_path):
    bad = _bad_layout(tmp_path, box=[0.5, 0.2, 0.4, 0.9])
    run = subprocess.run([sys.executable, "-m", "gligen.cli", "generate", "--model", str(tmp_path), "--layout", str(bad),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"gligen: error: {bad} line 2: entity 1 ('a dog'): box [0.5, 0.2, 0.4, 0.9] has x1 <= x0")
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()
    usage = subprocess.run([sys.executable, "-m", "gligen.cli", "generate", "--model", "m"], capture_output=True, text=True)
    assert usage.returncode == 2


# --- the detector inside generation (issue 3 item 6) ---


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    from tests.tiny_detector import save_tiny_detector

    return save_tiny_detector(tmp_path_factory.mktemp("detector") / "tiny", shortest_edge=96, longest_edge=160)


def _verification(detector_dir, image_path, layout_dict, iou_threshold=0.5):
    from detector.detect import OpenSetDetector
    from detector.verify import verify
    from gligen.layout import Layout

    detector = OpenSetDetector.from_pretrained(str(detector_dir))
    image = Image.open(image_path).convert("RGB")
    return verify(detector, image, Layout.from_dict(layout_dict), iou_threshold).to_dict()


def test_verify_records_each_entity(gligen_dir, detector_dir, tmp_path):
    layouts = write_jsonl(tmp_path / "v.jsonl", LAYOUT)
    out = tmp_path / "out"
    assert gligen_cli("--model", gligen_dir, "--layout", layouts, "--out", out, "--verify", "--detector", detector_dir) == 0
    record = json.loads((out / "v.json").read_text())
    assert [e["phrase"] for e in record["verification"]["entities"]] == ["a cat", "a dog"]
    assert record["verification"] == _verification(detector_dir, out / "v.png", record["layout"])
    assert record["settings"]["detector"] == str(detector_dir) and record["settings"]["iou_threshold"] == 0.5
    assert "candidates" not in record


def test_best_of_keeps_the_best_verified_candidate(gligen_dir, detector_dir, tmp_path):
    layouts = write_jsonl(tmp_path / "b.jsonl", LAYOUT)
    out = tmp_path / "out"
    assert gligen_cli("--model", gligen_dir, "--layout", layouts, "--out", out, "--best-of", 3, "--seed", 20,
                      "--detector", detector_dir, "--iou-threshold", 0.1) == 0
    record = json.loads((out / "b.json").read_text())
    candidates = record["candidates"]
    assert [c["seed"] for c in candidates] == [20, 21, 22]
    best = max(candidates, key=lambda c: (c["success_rate"], c["mean_iou"]))  # first of equals
    assert record["seed"] == best["seed"] == record["layout"]["seed"]
    assert (record["verification"]["success_rate"], record["verification"]["mean_iou"]) == (
        best["success_rate"], best["mean_iou"])
    # each candidate's score is the verification of the image its seed gives
    pipe = GligenPipeline.from_pretrained(str(gligen_dir))
    for candidate in candidates:
        layout = {**LAYOUT, "seed": candidate["seed"]}
        image = pipe(load_layouts(write_jsonl(tmp_path / "c.jsonl", layout))[0], num_inference_steps=2).images[0]
        image.save(tmp_path / "c.png")
        check = _verification(detector_dir, tmp_path / "c.png", layout, iou_threshold=0.1)
        assert (check["success_rate"], check["mean_iou"]) == (candidate["success_rate"], candidate["mean_iou"])
        if candidate["seed"] == record["seed"]:
            assert np.array_equal(np.asarray(Image.open(out / "b.png")), np.asarray(image))
    assert len({(c["success_rate"], c["mean_iou"]) for c in candidates}) > 1  # the candidates differ


@pytest.mark.parametrize("how", ["phrases", "caption", "vocabulary"])
def test_layout_from_an_image(gligen_dir, detector_dir, tmp_path, how):
    from detector.detect import OpenSetDetector
    from detector.label import label, name_objects
    from gligen.generate import layout_of_phrases

    source = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(source)
    (tmp_path / "names.txt").write_text("cat\ndog\nsofa\n")
    given = {"phrases": ["--phrases", "a cat", "a dog"], "caption": ["--caption", "a cat and a dog on a sofa"],
             "vocabulary": ["--vocabulary", tmp_path / "names.txt"]}[how]
    out = tmp_path / "out"
    assert gligen_cli("--model", gligen_dir, "--layout-from", source, *given, "--detector", detector_dir,
                      "--out", out, "--overlay") == 0
    record = json.loads((out / "photo.json").read_text())
    detector = OpenSetDetector.from_pretrained(str(detector_dir))
    image = Image.open(source).convert("RGB")
    expected = {"phrases": lambda: layout_of_phrases(detector, image, ["a cat", "a dog"]),
                "caption": lambda: label(detector, image, "a cat and a dog on a sofa"),
                "vocabulary": lambda: name_objects(detector, [image], ["cat", "dog", "sofa"])[0]}[how]()
    assert expected.entities
    assert record["layout"]["entities"] == [e.to_dict() for e in expected.entities]
    assert record["layout"]["source"] == str(source)
    assert Image.open(out / "photo.png").size == (48, 40)
    assert (out / "photo.overlay.png").is_file()


def test_layout_from_takes_one_source_of_names(gligen_dir, tmp_path, capsys):
    _fails(capsys, tmp_path, ["--model", gligen_dir, "--layout-from", tmp_path / "x.png", "--caption", "a cat",
                              "--phrases", "a cat"], "--layout-from takes one of --caption, --phrases and --vocabulary")


def test_reference_images_through_an_image_encoder(sd_and_adapter, tmp_path, capsys):
    """A text-image-box adapter on a plain base, the CLIP image encoder given by --image-encoder."""
    from tests.tiny import save_text_image_box_adapter

    sd, _ = sd_and_adapter
    save_text_image_box_adapter(sd, tmp_path)
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "dog.png")
    with_image = write_jsonl(tmp_path / "ref.jsonl", {**LAYOUT, "entities": [CAT, {**DOG, "image": "dog.png"}]})
    without = write_jsonl(tmp_path / "plain.jsonl", LAYOUT)
    model = ["--model", sd, "--adapter", tmp_path / "adapter", "--beta", 1]
    _fails(capsys, tmp_path, [*model, "--layout", with_image], "needs an image encoder (give --image-encoder)")
    for layouts in (with_image, without):
        assert gligen_cli(*model, "--image-encoder", tmp_path / "clip", "--layout", layouts, "--out", tmp_path / "out") == 0
    record = json.loads((tmp_path / "out" / "ref.json").read_text())
    assert record["layout"]["entities"][1]["image"] == str(tmp_path / "dog.png")
    assert record["settings"]["image_encoder"] == str(tmp_path / "clip")
    grounded, plain = (np.asarray(Image.open(tmp_path / "out" / f"{n}.png"), dtype=int) for n in ("ref", "plain"))
    assert np.abs(grounded - plain).max() > 0  # the reference image changes the image


def test_a_small_unet_runs_on_one_cpu_thread_unless_omp_num_threads_says(monkeypatch):
    import torch

    from gligen.devices import suit_threads

    small, large = torch.nn.Linear(4, 4), torch.nn.Linear(8000, 8000, device="meta")  # 16 ... 64 M parameters
    cpu, before = torch.device("cpu"), torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        for unet, device, env, threads in [(small, cpu, None, 1), (large, cpu, None, 2),
                                           (small, torch.device("cuda"), None, 2), (small, cpu, "2", 2)]:
            if env:
                monkeypatch.setenv("OMP_NUM_THREADS", env)
            torch.set_num_threads(2)
            suit_threads(unet, device)
            assert torch.get_num_threads() == threads, (unet, device, env)
    finally:
        torch.set_num_threads(before)


def test_verify_checks_reference_images_as_exemplars(sd_and_adapter, tmp_path):
    """--verify with an OWLv2 detector: an entity with a reference image records its exemplar check too."""
    from tests.tiny import save_text_image_box_adapter
    from tests.tiny_detector import save_tiny_owlv2

    sd, _ = sd_and_adapter
    adapter, clip = save_text_image_box_adapter(sd, tmp_path)
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "dog.png")
    layouts = write_jsonl(tmp_path / "ref.jsonl", {**LAYOUT, "entities": [CAT, {**DOG, "image": "dog.png"}]})
    owl = save_tiny_owlv2(tmp_path / "owl")
    assert gligen_cli("--model", sd, "--adapter", adapter, "--image-encoder", clip, "--layout", layouts,
                      "--out", tmp_path / "out", "--verify", "--detector", owl) == 0
    record = json.loads((tmp_path / "out" / "ref.json").read_text())
    cat, dog = record["verification"]["entities"]
    assert "exemplar" not in cat and set(dog["exemplar"]) == {"detected_box", "score", "iou", "success"}
    assert record["verification"] == _verification(owl, tmp_path / "out" / "ref.png", record["layout"])
