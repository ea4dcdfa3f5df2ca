"""`detector train`: transformers' loss on COCO-format data, checkpoints, exact resume."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file
from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

from detector.cli import main
from detector.model import image_settings, load_detector
from detector.prompt import build_caption, positive_map
from detector.train import (
    CaptionedExamples,
    CocoDetection,
    TrainConfig,
    collate,
    model_inputs,
    parameter_groups,
    train,
    training_settings,
)
from gligen.errors import UserError
from tests.tiny_detector import save_tiny_detector

COLOURS = {"red box": (220, 30, 30), "blue box": (30, 30, 220), "green box": (30, 200, 30)}


def make_coco(root: Path, num_images: int = 6, size: int = 64) -> tuple[Path, Path]:
    """Grey images with one or two coloured rectangles each, and their COCO instances file."""
    rng = np.random.default_rng(0)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    names = list(COLOURS)
    images, annotations = [], []
    for i in range(num_images):
        pixels = np.full((size, size, 3), 128, dtype=np.uint8)
        for c in rng.choice(len(names), size=1 + i % 2, replace=False):
            w, h = rng.integers(size // 4, size // 2, size=2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            pixels[y : y + h, x : x + w] = COLOURS[names[c]]
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": int(c) + 1,
                                "bbox": [int(x), int(y), int(w), int(h)], "area": int(w * h), "iscrowd": 0})
        Image.fromarray(pixels).save(images_dir / f"{i}.png")
        images.append({"id": 100 + i, "file_name": f"{i}.png", "width": size, "height": size})
    categories = [{"id": j + 1, "name": name} for j, name in enumerate(names)]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return images_dir, path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; each test run is a new "process"."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    images, annotations = make_coco(root / "coco")
    model = save_tiny_detector(root / "tiny")
    return root, images, annotations, model


def config(data, out: str, **overrides) -> TrainConfig:
    root, images, annotations, model = data
    base = TrainConfig(images=str(images), annotations=str(annotations), model=str(model), out=str(root / out),
                       steps=6, batch_size=2, lr=1e-3, save_every=3, image_size=128, workers=0)
    return replace(base, **overrides)


def fixed_batch_loss(model_dir: Path, data) -> float:
    """transformers' loss of a model on every training image with a fixed caption, eval mode."""
    _, images, annotations, _ = data
    model, tokenizer, settings = load_detector(str(model_dir))
    examples = CaptionedExamples(CocoDetection(images, annotations), tokenizer, seed=123)
    batch = collate([examples[p] for p in range(len(examples.coco.items))])
    with torch.no_grad():
        return model(**model_inputs(batch, tokenizer, training_settings(settings, 128), "cpu")).loss.item()


def test_class_labels_name_the_box_category_in_the_caption(data):
    _, images, annotations, _ = data
    _, tokenizer, _ = load_detector(str(data[3]))
    coco = CocoDetection(images, annotations)
    examples = CaptionedExamples(coco, tokenizer, seed=0)
    raw = json.loads(Path(annotations).read_text())
    category_name = {c["id"]: c["name"] for c in raw["categories"]}
    for position in range(2 * len(coco.items)):  # two epochs: every image, two caption draws
        example = examples[position]
        phrases = example["caption"].removesuffix(" .").split(" . ")
        # transformers' loss reads class k as the k-th token group between separators: it must
        # be exactly the tokens of the caption's k-th phrase
        text = tokenizer(example["caption"], return_offsets_mapping=True, return_tensors="pt")
        label_maps = build_label_maps(torch.zeros(1, 1, 256), text["input_ids"])[0].bool()
        spans = build_caption(phrases)[1]
        assert torch.equal(label_maps[:, : text["input_ids"].shape[1]], positive_map(text["offset_mapping"][0], spans))
        assert sorted(phrases) == sorted(COLOURS)  # 3 short names always fit: all are in the caption
        image_id = 100 + int(examples.item_at(position).path.stem)
        expected = [category_name[a["category_id"]] for a in raw["annotations"] if a["image_id"] == image_id]
        assert [phrases[k] for k in example["labels"]["class_labels"]] == expected


def test_boxes_are_normalized_cxcywh(data):
    _, images, annotations, _ = data
    coco = CocoDetection(images, annotations)
    raw = json.loads(Path(annotations).read_text())
    first = coco.items[0]
    x, y, w, h = raw["annotations"][0]["bbox"]
    assert first.path.name == "0.png"
    torch.testing.assert_close(first.boxes[0], torch.tensor([(x + w / 2) / 64, (y + h / 2) / 64, w / 64, h / 64]))


def test_loss_goes_down(data):
    losses = train(config(data, "run_down", steps=30, save_every=30))
    assert len(losses) == 30 and all(np.isfinite(losses))
    out = Path(data[0]) / "run_down"
    before, after = fixed_batch_loss(data[3], data), fixed_batch_loss(out / "model", data)
    assert after < 0.7 * before, (before, after)
    # the saved detector resizes images as it was tuned: shortest side 128, longest 128 * 1333 / 800
    assert image_settings(str(out / "model")) == replace(image_settings(str(data[3])), shortest_edge=128, longest_edge=213)


def test_resume_repeats_the_uninterrupted_run(data):
    full = train(config(data, "run_full"))
    out = Path(data[0]) / "run_cut"
    cut = train(config(data, "run_cut"))
    assert cut == full  # same seed, same run
    shutil.rmtree(out / "checkpoints" / "checkpoint-00000006")  # as if killed after the checkpoint of step 3
    shutil.rmtree(out / "model")
    state = json.loads((out / "checkpoints" / "checkpoint-00000003" / "training_state.json").read_text())
    assert state["step"] == 3 and state["scheduler"]["last_epoch"] == 3
    resumed = train(config(data, "run_cut", resume=True))
    assert resumed == full[3:]
    a = load_file(Path(data[0]) / "run_full" / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    optimizer = load_file(out / "checkpoints" / "checkpoint-00000006" / "training_state.safetensors")
    assert torch.equal(optimizer["optimizer.0.step"], torch.tensor(6.0))


def test_backbone_lr_scale_and_step_callback(data):
    model, _, _ = load_detector(str(data[3]))
    backbones = {id(p) for m in (model.model.backbone, model.model.text_backbone) for p in m.parameters() if p.requires_grad}
    default, scratch = parameter_groups(model, 1e-3), parameter_groups(model, 1e-3, backbone_lr_scale=1.0)
    assert [g["lr"] for g in default] == [1e-3, 1e-4] and [g["lr"] for g in scratch] == [1e-3, 1e-3]
    assert {id(p) for p in scratch[1]["params"]} == backbones
    calls = []
    losses = train(config(data, "run_scale", steps=2, save_every=2, backbone_lr_scale=1.0),
                   on_step=lambda step, loss: calls.append((step, loss)))
    assert calls == list(enumerate(losses, 1))
    state = json.loads((Path(data[0]) / "run_scale" / "checkpoints" / "checkpoint-00000002" / "training_state.json").read_text())
    assert [g["initial_lr"] for g in state["param_groups"]] == [1e-3, 1e-3]
    with pytest.raises(UserError, match="--backbone-lr-scale must not be negative, got -1"):
        train(config(data, "run_negative", backbone_lr_scale=-1))

def test_bad_inputs(data, tmp_path):
    root, images, annotations, model = data
    with pytest.raises(UserError, match="--resume: no checkpoint"):
        train(config(data, "nothing_here", resume=True))
    broken = tmp_path / "broken.json"
    raw = json.loads(Path(annotations).read_text())
    raw["annotations"][2]["category_id"] = 99
    broken.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"broken.json: annotation 2 has an unknown category_id 99"):
        CocoDetection(images, broken)
    raw["categories"][0]["name"] = "st. bernard"
    broken.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"category 0 \('st. bernard'\) contains '.' or '\?'"):
        CocoDetection(images, broken)
    with pytest.raises(UserError, match="has no config.json"):
        train(config(data, "bad_model", model=str(images)))


def test_train_cli(data, capsys):
    root, images, annotations, model = data
    out = root / "run_cli"
    args = ["train", "--images", str(images), "--annotations", str(annotations), "--model", str(model),
            "--out", str(out), "--steps", "2", "--batch-size", "2", "--save-every", "1", "--image-size", "128",
            "--workers", "1", "--mixed-precision", "bf16", "--keep-checkpoints", "1"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "model"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-00000002"]  # the newest kept
    assert "train: 100%" in capsys.readouterr().err  # the progress bar
    assert main(["detect", str(images / "0.png"), "--phrases", "red box", "--model", str(out / "model"),
                 "--box-threshold", "0", "--out", str(root / "found.json")]) == 0
    assert json.loads((root / "found.json").read_text())["images"][0]["detections"]
    capsys.readouterr()
    assert main([*args, "--image-size", "64"]) == 1
    assert capsys.readouterr().err == "detector: error: --image-size must be at least 128, got 64\n"
    assert main([*args, "--annotations", str(images / "missing.json")]) == 1
    assert capsys.readouterr().err == f"detector: error: {images / 'missing.json'}: annotations file not found\n"
