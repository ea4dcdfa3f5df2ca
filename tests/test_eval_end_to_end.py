"""`gligen eval`: evaluation sets from COCO / LVIS JSON, generate (resumable) and score end to end on tiny models."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from gligen.errors import run_cli
from gligen.eval.annotations import Filters, load_eval_set
from gligen.eval.cli import register
from gligen.eval.generate import image_name, layout_seed
from gligen.eval.metrics import COCO_STATS, LVIS_GROUPS
from tests.launch import accelerate_launch
from tests.tiny_detector import save_tiny_owlv2

CATEGORIES = [{"id": 1, "name": "cat", "frequency": "f"}, {"id": 2, "name": "dog", "frequency": "c"},
              {"id": 3, "name": "traffic_light", "frequency": "r"}]
IMAGES = [(1, 160, 120), (2, 160, 120), (3, 80, 64), (4, 80, 64)]  # id, width, height
ANNOTATIONS = [  # image_id, category_id, bbox (pixels xywh), iscrowd
    (1, 1, [4, 4, 80, 60], 0), (1, 2, [80, 30, 60, 80], 0), (1, 2, [0, 0, 3, 3], 0), (1, 1, [100, 0, 50, 25], 1),
    (2, 3, [10, 10, 40, 40], 0),
    (3, 1, [0, 0, 80, 64], 0), (3, 2, [0, 0, 40, 32], 0), (3, 1, [40, 32, 40, 32], 0),
]


def instances(lvis: bool = False) -> dict:
    """A small COCO (or LVIS: coco_url, frequency groups) instances file."""
    images = []
    for image_id, width, height in IMAGES:
        name = f"val2017/{image_id:03d}.jpg"
        where = {"coco_url": f"http://images.cocodataset.org/{name}"} if lvis else {"file_name": name}
        images.append({"id": image_id, "width": width, "height": height, **where})
    categories = CATEGORIES if lvis else [{k: c[k] for k in ("id", "name")} for c in CATEGORIES]
    annotations = [{"id": i + 1, "image_id": image, "category_id": category, "bbox": bbox, "iscrowd": crowd,
                    "area": bbox[2] * bbox[3]} for i, (image, category, bbox, crowd) in enumerate(ANNOTATIONS)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def cli(*argv: str) -> tuple[int, str]:
    """Run `gligen eval ...` through run_cli; return the exit status and stderr."""
    parser = argparse.ArgumentParser(prog="gligen")
    register(parser.add_subparsers(dest="command"))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = run_cli(parser, ["eval", *argv])
    return status, stderr.getvalue()


def picture(size: tuple[int, int], boxes) -> Image.Image:
    """A grey image with a coloured rectangle per normalized box."""
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        draw.rectangle([x0 * size[0], y0 * size[1], x1 * size[0], y1 * size[1]], fill=(60 * i % 255, 200, 40))
    return image


# --- evaluation sets ---------------------------------------------------------------------------------------------


def test_coco_layouts_filters_and_captions(tmp_path):
    path = write(tmp_path / "instances.json", instances())
    captions = write(tmp_path / "captions.json", {"annotations": [
        {"id": 7, "image_id": 1, "caption": " A cat and a dog. "}, {"id": 8, "image_id": 1, "caption": "Pets."}]})

    records = load_eval_set(path, captions, Filters(min_area=0.01, min_objects=2), size=64).records
    assert [r.image_id for r in records] == [1, 3]  # 2 has one box, 4 none
    one, three = (r.layout for r in records)
    assert one.prompt == "A cat and a dog." and (one.width, one.height) == (64, 64)
    assert one.phrases == ["cat", "dog"]  # the 3x3 dog is under 1 % of the image, the crowd cat is skipped
    np.testing.assert_allclose(one.boxes[0], [4 / 160, 4 / 120, 84 / 160, 64 / 120])
    assert three.prompt == "cat, dog" and len(three.entities) == 3
    assert records[0].file_name == "val2017/001.jpg"

    kept = load_eval_set(path, filters=Filters(skip_crowd=False, max_objects=3, max_entities=2)).records
    assert [r.image_id for r in kept] == [2, 3]  # image 1 has 4 boxes with its crowd region
    assert [e.box for e in kept[1].layout.entities] == [(0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 0.5, 0.5)]

    lvis = load_eval_set(write(tmp_path / "lvis.json", instances(lvis=True)))
    assert [(c.name, c.frequency) for c in lvis.categories] == [("cat", "f"), ("dog", "c"), ("traffic light", "r")]
    assert lvis.records[1].layout.phrases == ["traffic light"] and lvis.records[1].file_name == "val2017/002.jpg"


@pytest.mark.parametrize("command", ["generate", "score"])
def test_bad_annotations_give_one_line(tmp_path, command):
    broken = instances()
    del broken["annotations"][4]["bbox"]
    path = write(tmp_path / "annotations.json", broken)
    extra = ["--model", "unused"] if command == "generate" else ["--images", str(tmp_path)]
    status, stderr = cli(command, "--annotations", str(path), *extra, "--out", str(tmp_path / "out"))
    assert status == 1
    assert stderr == f"gligen: error: {path}: annotations[4]: missing 'bbox'\n"

    path.write_text('{"images": [')
    status, stderr = cli(command, "--annotations", str(path), *extra, "--out", str(tmp_path / "out"))
    assert status == 1 and stderr.count("\n") == 1 and f"{path} line 1: invalid JSON" in stderr
    assert not (tmp_path / "out").exists()


# --- scoring with the tiny detector ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    from tests.tiny_detector import save_tiny_detector

    return save_tiny_detector(tmp_path_factory.mktemp("detector"))


def check_report(out: Path, num_images: int, num_missing: int, lvis: bool) -> dict:
    """Every report file is there with every field; metrics equal pycocotools' on the written files."""
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"mode", "images", "num_images", "num_missing", "missing_images", "metrics", "lvis",
                           "layout", "settings", "files"}
    assert (report["num_images"], report["num_missing"], report["lvis"]) == (num_images, num_missing, lvis)
    assert len(report["missing_images"]) == num_missing
    expected = (["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR300", "ARs", "ARm", "ARl",
                 *LVIS_GROUPS] if lvis else list(COCO_STATS))
    assert list(report["metrics"]) == expected
    assert all(-1 <= v <= 1 for v in report["metrics"].values())
    assert set(report["layout"]) >= {"instance_success_rate", "mean_iou", "num_entities", "num_images"}
    assert report["layout"]["num_images"] == num_images
    assert set(report["settings"]) == {"box_threshold", "text_threshold", "verify_threshold", "iou_threshold",
                                       "batch_size", "num_samples"}
    markdown = (out / "report.md").read_text()
    for name in expected + ["instance success rate", "mean IoU", *report["missing_images"], "samples.png"]:
        assert name in markdown
    with Image.open(out / report["files"]["grid"]) as grid:
        assert grid.size[0] > 64 and grid.size[1] > 32

    gt = json.loads((out / "ground_truth.json").read_text())
    detections = json.loads((out / "detections.json").read_text())
    assert len(gt["images"]) == num_images and detections
    assert report["layout"]["num_entities"] == len(gt["annotations"])
    for det in detections:  # the detector was asked for each image's own phrases only
        assert det["category_id"] in {a["category_id"] for a in gt["annotations"] if a["image_id"] == det["image_id"]}
        assert set(det) == {"image_id", "category_id", "bbox", "score"} and len(det["bbox"]) == 4
    return report


def test_score_generated_images_coco(tmp_path, tiny_detector):
    annotations = write(tmp_path / "instances.json", instances())
    records = load_eval_set(annotations).records
    images = tmp_path / "generated"
    images.mkdir()
    for record in records[:2]:  # the third image was never generated
        picture((64, 64), record.layout.boxes).save(images / image_name(record.image_id))

    status, stderr = cli("score", "--annotations", str(annotations), "--images", str(images), "--detector",
                         str(tiny_detector), "--batch-size", "2", "--out", str(tmp_path / "score"))
    assert status == 0, stderr
    report = check_report(tmp_path / "score", num_images=2, num_missing=1, lvis=False)
    assert report["missing_images"] == [str(images / image_name(records[2].image_id))]
    assert report["settings"]["verify_threshold"] == 0.35  # Grounding DINO's, as `detector verify` checks

    # The layout checks take each family's threshold unless told: OWLv2's is 0.1.
    owl = save_tiny_owlv2(tmp_path / "owl")
    for extra, expected in (([], 0.1), (["--verify-threshold", "0.2"], 0.2)):
        out = tmp_path / f"owl{len(extra)}"
        status, stderr = cli("score", "--annotations", str(annotations), "--images", str(images), "--detector",
                             str(owl), "--out", str(out), *extra)
        assert status == 0, stderr
        assert json.loads((out / "report.json").read_text())["settings"]["verify_threshold"] == expected

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "score" / "ground_truth.json"))
        evaluator = COCOeval(gt, gt.loadRes(str(tmp_path / "score" / "detections.json")), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    np.testing.assert_allclose([report["metrics"][k] for k in COCO_STATS], evaluator.stats, atol=1e-6, rtol=0)

    # The written pair re-scores without a model to the same numbers.
    status, stderr = cli("score", "--annotations", str(tmp_path / "score" / "ground_truth.json"),
                         "--detections", str(tmp_path / "score" / "detections.json"), "--out", str(tmp_path / "files"))
    assert status == 0, stderr
    rescored = json.loads((tmp_path / "files" / "report.json").read_text())
    assert rescored["metrics"] == report["metrics"] and rescored["layout"] is None
    assert (tmp_path / "files" / "report.md").is_file()

    # Detections exactly on the layout boxes score AP 1 (the random tiny detector scores about 0).
    gt = json.loads((tmp_path / "score" / "ground_truth.json").read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    status, stderr = cli("score", "--annotations", str(tmp_path / "score" / "ground_truth.json"),
                         "--detections", str(write(tmp_path / "perfect.json", perfect)), "--out", str(tmp_path / "1"))
    assert status == 0, stderr
    assert json.loads((tmp_path / "1" / "report.json").read_text())["metrics"]["AP"] == pytest.approx(1.0)


def test_score_real_images_lvis(tmp_path, tiny_detector):
    annotations = write(tmp_path / "lvis.json", instances(lvis=True))
    root = tmp_path / "coco"
    for record in load_eval_set(annotations).records:
        if record.image_id != 2:  # image 2 is missing from the dataset folder
            size = next((w, h) for i, w, h in IMAGES if i == record.image_id)
            (root / record.file_name).parent.mkdir(parents=True, exist_ok=True)
            picture(size, record.layout.boxes).save(root / record.file_name, format="JPEG")

    status, stderr = cli("score", "--annotations", str(annotations), "--images", str(root), "--real-images",
                         "--detector", str(tiny_detector), "--out", str(tmp_path / "score"))
    assert status == 0, stderr
    report = check_report(tmp_path / "score", num_images=2, num_missing=1, lvis=True)
    assert report["missing_images"] == [str(root / "val2017/002.jpg")]
    gt = json.loads((tmp_path / "score" / "ground_truth.json").read_text())
    assert [(i["width"], i["height"]) for i in gt["images"]] == [(160, 120), (80, 64)]  # the real images' pixels

    # The layout checks come from the AP detection pass; they equal a separate `detector verify` pass.
    from detector.detect import OpenSetDetector
    from gligen.files import open_image
    from detector.verify import summarize, verify_batch

    records = [r for r in load_eval_set(annotations).records if r.image_id != 2]
    images = [open_image(root / r.file_name) for r in records]
    detector = OpenSetDetector.from_pretrained(str(tiny_detector))
    expected = summarize(verify_batch(detector, images, [r.layout for r in records]))
    assert report["layout"] == pytest.approx(expected, abs=1e-6)
    assert expected["mean_iou"] > 0  # detections were matched, so the comparison has substance

    # detections.json is the detector's output at the AP threshold, in pixels, with LVIS category ids.
    written = json.loads((tmp_path / "score" / "detections.json").read_text())
    ids = {c["name"].replace("_", " "): c["id"] for c in CATEGORIES}
    for record, image, found in zip(records, images, detector.detect(
            images, [list(dict.fromkeys(r.layout.phrases)) for r in records], box_threshold=0.05, text_threshold=0.05)):
        mine = [d for d in written if d["image_id"] == record.image_id]
        assert len(mine) == len(found) > 0
        assert [d["category_id"] for d in mine] == [ids[label] for label in found.labels]
        boxes = found.pixel_boxes().numpy()
        np.testing.assert_allclose([d["bbox"] for d in mine], np.c_[boxes[:, :2], boxes[:, 2:] - boxes[:, :2]],
                                   atol=0.01)
        np.testing.assert_allclose([d["score"] for d in mine], found.scores.numpy(), atol=1e-5)


# --- generation with a tiny GLIGEN pipeline, then scoring it -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gligen(tmp_path_factory):
    """A tiny diffusers GLIGEN (text-box) pipeline directory with visible grounding."""
    from diffusers import StableDiffusionGLIGENPipeline

    from tests.tiny import randomize_grounding, tiny_components, tiny_unet

    directory = tmp_path_factory.mktemp("gligen")
    unet = tiny_unet(attention_type="gated")
    randomize_grounding(unet)
    pipeline = StableDiffusionGLIGENPipeline(**tiny_components(directory / "build", unet), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(directory / "model")
    return directory / "model"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_generate_resumes_and_scores(tmp_path, tiny_gligen, tiny_detector):
    from gligen.eval.generate import generate
    from gligen.layout import load_layouts

    annotations = write(tmp_path / "instances.json", instances())
    records = load_eval_set(annotations).records
    out = tmp_path / "run"
    command = ("generate", "--annotations", str(annotations), "--model", str(tiny_gligen), "--size", "32",
               "--steps", "2", "--guidance", "1", "--batch-size", "2", "--seed", "5", "--out", str(out))
    status, stderr = cli(*command)
    assert status == 0, stderr

    files = {r.image_id: out / image_name(r.image_id) for r in records}
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in files.values()), "layouts.jsonl"])
    layouts = load_layouts(out / "layouts.jsonl")
    assert [(lay.meta["image_id"], lay.meta["file_name"], lay.seed) for lay in layouts] == [
        (r.image_id, r.file_name, layout_seed(5, r.image_id)) for r in records]
    for layout, record in zip(layouts, records):
        assert layout.phrases == record.layout.phrases
        np.testing.assert_allclose(layout.boxes, record.layout.boxes, atol=1e-6)
    first = {i: pixels(p) for i, p in files.items()}
    assert all(image.shape == (32, 32, 3) for image in first.values())
    assert np.abs(first[1] - first[2]).mean() > 1  # own seed and layout per image

    # Resume: an interrupted run lost image 2 (made in a batch with image 1); only it is made again, alone.
    mtimes = {i: p.stat().st_mtime_ns for i, p in files.items()}
    files[2].unlink()
    status, stderr = cli(*command)
    assert status == 0, stderr
    assert "2 of 3 images already done" in stderr
    assert all(files[i].stat().st_mtime_ns == mtimes[i] for i in (1, 3))
    assert np.abs(pixels(files[2]) - first[2]).max() <= 2  # same seed, same image, whatever the batch

    calls = []
    assert generate(lambda batch, **kwargs: calls.append(batch), records, out, base_seed=5) == 0 and not calls

    # The run's layouts.jsonl is an evaluation set: score it with the images beside it.
    status, stderr = cli("score", "--annotations", str(out / "layouts.jsonl"), "--detector", str(tiny_detector),
                         "--out", str(out / "score"))
    assert status == 0, stderr
    check_report(out / "score", num_images=3, num_missing=0, lvis=False)


def test_generate_split_over_two_launched_processes_equals_one(tmp_path, tiny_gligen):
    """Two CPU processes from `accelerate launch` (torchrun; `--cpu` alone starts one process without mpirun)."""
    annotations = write(tmp_path / "instances.json", instances())
    records = load_eval_set(annotations).records
    command = ("eval", "generate", "--annotations", str(annotations), "--model", str(tiny_gligen), "--size", "32",
               "--steps", "2", "--guidance", "1", "--seed", "5", "--device", "cpu")
    status, stderr = cli(*command[1:], "--out", str(tmp_path / "one"))
    assert status == 0, stderr

    done = accelerate_launch("-m", "gligen.cli", *command, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    made = dict(re.findall(r"process (\d) of 2: made (\d+) images", done.stderr))
    assert sorted(made) == ["0", "1"] and sorted(made.values()) == ["1", "2"]  # 3 images, each process its share

    names = sorted(image_name(r.image_id) for r in records)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one")) == [*names, "layouts.jsonl"]
    for name in names:  # the union is the single-process run (3 made in all: so no image was made twice)
        np.testing.assert_array_equal(pixels(tmp_path / "two" / name), pixels(tmp_path / "one" / name), err_msg=name)
    layouts = (tmp_path / "two" / "layouts.jsonl").read_text()
    assert layouts == (tmp_path / "one" / "layouts.jsonl").read_text() and layouts.count("\n") == len(records)


def test_launched_processes_that_cannot_join_are_refused(tmp_path, tiny_gligen, monkeypatch):
    """Launched CPU processes that did not form a group would each make every image."""
    from accelerate import PartialState

    annotations = write(tmp_path / "instances.json", instances())
    monkeypatch.setenv("WORLD_SIZE", "2")
    PartialState._reset_state()
    try:
        status, stderr = cli("generate", "--annotations", str(annotations), "--model", str(tiny_gligen),
                             "--out", str(tmp_path / "out"))
    finally:
        PartialState._reset_state()
    assert status == 1
    assert stderr == ("gligen: error: 2 processes were launched but did not join (each would make every image); "
                      "on CPUs pass --device cpu\n")
    assert not (tmp_path / "out").exists()


def test_generate_defaults_to_the_models_own_size(tmp_path, tiny_gligen):
    from gligen.bundled import native_size

    unet = json.loads((Path(tiny_gligen) / "unet" / "config.json").read_text())
    vae = json.loads((Path(tiny_gligen) / "vae" / "config.json").read_text())
    side = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    assert native_size(str(tiny_gligen)) == side and native_size("org/a-hub-id") is None
    annotations = write(tmp_path / "instances.json", instances())
    status, stderr = cli("generate", "--annotations", str(annotations), "--model", str(tiny_gligen), "--steps", "1",
                         "--limit", "1", "--out", str(tmp_path / "run"))
    assert status == 0, stderr
    [image] = (tmp_path / "run").glob("*.png")
    assert pixels(image).shape == (side, side, 3)
