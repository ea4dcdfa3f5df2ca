"""Pseudo-labels: the noun-phrase chunker, label() with the tiny detector, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detector.box_ops import box_iou
from detector.cli import main
from detector.detect import OpenSetDetector
from detector.label import label, label_batch, load_vocabulary, name_objects, noun_phrases
from gligen.errors import UserError
from gligen.layout import Layout, load_layouts
from tests.tiny_detector import save_tiny_detector

CAPTIONS = {
    "a cat and a dog on a sofa": [("a cat", (0, 5)), ("a dog", (10, 15)), ("a sofa", (19, 25))],
    "A man riding a horse on the beach.": [("A man", (0, 5)), ("a horse", (13, 20)), ("the beach", (24, 33))],
    "two red apples, a banana and the small wooden bowl": [
        ("two red apples", (0, 14)), ("a banana", (16, 24)), ("the small wooden bowl", (29, 50)),
    ],
    "a dog sitting next to a building": [("a dog", (0, 5)), ("a building", (22, 32))],
    "a running dog with a frisbee": [("a running dog", (0, 13)), ("a frisbee", (19, 28))],
    "the car is red": [("the car", (0, 7))],
    "there is a cup of coffee on top of the table": [("a cup", (9, 14)), ("coffee", (18, 24)), ("the table", (35, 44))],
    "A black-and-white cat sleeps on the man's lap": [("A black-and-white cat", (0, 21)), ("the man's lap", (32, 45))],
    "a cat a dog": [("a cat", (0, 5)), ("a dog", (6, 11))],
    "the two dogs": [("the two dogs", (0, 12))],
    "a white square and a red circle": [("a white square", (0, 14)), ("a red circle", (19, 31))],
    "a square table is white": [("a square table", (0, 14))],
}


@pytest.mark.parametrize("caption", list(CAPTIONS))
def test_noun_phrases(caption):
    assert noun_phrases(caption) == CAPTIONS[caption]
    assert all(caption[s:e] == phrase for phrase, (s, e) in noun_phrases(caption))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp("label") / "tiny")


def picture(seed: int, size=(100, 60)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_label_with_the_tiny_detector(tiny):
    detector = OpenSetDetector.from_pretrained(str(tiny))
    caption = "A cat and a dog next to a cat"
    layout = label(detector, picture(0), caption, box_threshold=0.0, text_threshold=0.0)
    found = detector.detect(picture(0), ["a cat", "a dog"], box_threshold=0.0, text_threshold=0.0)[0]
    ranked = {p: sorted((s, b) for s, b, q in zip(found.scores.tolist(), found.boxes.tolist(), found.phrase_ids.tolist()) if q == p)[::-1]
              for p in (0, 1)}
    assert [(e.phrase, e.spans) for e in layout.entities] == [
        ("A cat", ((0, 5),)), ("a dog", ((10, 15),)), ("a cat", ((24, 29),)),
    ]
    # the first "cat" takes the best cat detection, the second "cat" the second best
    expected = [ranked[0][0], ranked[1][0], ranked[0][1]]
    assert [e.box for e in layout.entities] == [pytest.approx(tuple(b)) for _, b in expected]
    assert layout.meta["scores"] == pytest.approx([s for s, _ in expected], abs=1e-4)
    assert (layout.prompt, layout.width, layout.height) == (caption, 96, 64)  # 100 x 60 to multiples of 8

    nothing = label(detector, picture(0), caption, box_threshold=1.0)
    assert nothing.entities == ()  # phrases not found are left out
    two = label_batch(detector, [picture(0), picture(1)], [caption, "a tree"], box_threshold=0.0, text_threshold=0.0)
    assert [(e.phrase, e.spans) for e in two[0].entities] == [(e.phrase, e.spans) for e in layout.entities]
    assert [e.box for e in two[0].entities] == [pytest.approx(e.box, abs=1e-5) for e in layout.entities]
    assert [e.phrase for e in two[1].entities] == ["a tree"]


def test_label_cli(tiny, tmp_path, capsys):
    picture(0).save(tmp_path / "photo.png")
    caption = "a cat and a dog on a sofa"
    args = ["label", str(tmp_path / "photo.png"), "--caption", caption, "--model", str(tiny),
            "--box-threshold", "0", "--text-threshold", "0"]
    assert main([*args, "--out", str(tmp_path / "layout.json"), "--overlay", str(tmp_path / "ov")]) == 0
    (loaded,) = load_layouts(tmp_path / "layout.json")  # a valid layout file
    expected = label(OpenSetDetector.from_pretrained(str(tiny)), picture(0), caption, 0.0, 0.0)
    assert [e.phrase for e in loaded.entities] == ["a cat", "a dog", "a sofa"]
    assert [e.spans for e in loaded.entities] == [e.spans for e in expected.entities]
    assert [e.box for e in loaded.entities] == [pytest.approx(e.box, abs=1e-6) for e in expected.entities]
    assert Image.open(tmp_path / "ov" / "photo.png").size == (500, 300)  # enlarged 5 times to label it
    capsys.readouterr()
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["entities"][0]["tokens_positive"] == [[0, 5]]

    assert main(["label", str(tmp_path / "photo.png"), "--caption", "is on the", "--model", str(tiny)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "caption 'is on the': no noun phrases found" in err


# ----------------------------------------------------------------------------- caption-free


def test_vocabularies(tmp_path):
    lvis, coco = load_vocabulary("lvis"), load_vocabulary("coco")
    assert len(lvis) == 1203 and lvis[:2] == ["aerosol can", "air conditioner"] and "bus (vehicle)" in lvis
    assert len(coco) == 80 and coco[:3] == ["person", "bicycle", "car"] and "traffic light" in coco
    (tmp_path / "names.txt").write_text("# my things\nred mug\n\n  potted_plant \nred mug\n")
    assert load_vocabulary(str(tmp_path / "names.txt")) == ["red mug", "potted plant"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    for name, message in [("missing.txt", "cannot read the vocabulary"), (str(tmp_path / "empty.txt"), "holds no names")]:
        with pytest.raises(UserError, match=message):
            load_vocabulary(name)


def check_named_layout(layout, detections, max_objects: int) -> None:
    """A valid layout of the best, mutually non-overlapping detections, its prompt listing their names."""
    assert 0 < len(layout.entities) <= max_objects
    loaded = Layout.from_dict(layout.to_dict())  # passes the layout rules
    assert [(e.phrase, e.spans) for e in loaded.entities] == [(e.phrase, e.spans) for e in layout.entities]
    for entity in layout.entities:
        (start, end), = entity.spans
        assert layout.prompt[start:end] == entity.phrase
    assert layout.prompt == ", ".join(layout.phrases)
    assert layout.meta["scores"] == sorted(layout.meta["scores"], reverse=True)
    boxes = torch.tensor(layout.boxes)
    overlaps = box_iou(boxes, boxes).fill_diagonal_(0)
    assert overlaps.max() <= 0.5
    for entity, score in zip(layout.entities, layout.meta["scores"]):  # each entity is one of the detections
        same = (detections.boxes - torch.tensor(entity.box)).abs().amax(-1) < 1e-6
        assert any(detections.labels[k] == entity.phrase and abs(float(detections.scores[k]) - score) < 1e-4
                   for k in same.nonzero()[:, 0].tolist())
    # the best detection of all is the first entity
    assert layout.entities[0].phrase == detections.labels[0] and layout.meta["scores"][0] == pytest.approx(
        float(detections.scores[0]), abs=1e-4)


def test_caption_free_layout_from_a_vocabulary(tiny):
    detector = OpenSetDetector.from_pretrained(str(tiny))
    names = ["cat", "dog", "sofa", "tree", "red car"]
    layouts = name_objects(detector, [picture(0), picture(1)], names, box_threshold=0.3, max_objects=4)
    for layout, image in zip(layouts, [picture(0), picture(1)]):
        [found] = detector.detect(image, names, box_threshold=0.3)
        check_named_layout(layout, found, 4)
        assert (layout.width, layout.height) == (96, 64)


def test_caption_free_layouts_with_owlv2_and_lvis(tmp_path):
    from tests.tiny_detector import save_tiny_owlv2

    owl_dir = save_tiny_owlv2(tmp_path / "owl")
    owl = OpenSetDetector.from_pretrained(str(owl_dir))
    [layout] = name_objects(owl, [picture(2, (64, 80))])  # OWLv2 takes no names of its own: the LVIS ones
    [found] = owl.detect(picture(2, (64, 80)), load_vocabulary("lvis"))
    check_named_layout(layout, found, 30)
    assert set(layout.phrases) <= set(load_vocabulary("lvis"))

    picture(2, (64, 80)).save(tmp_path / "photo.png")
    assert main(["label", str(tmp_path / "photo.png"), "--vocabulary", "coco", "--max-objects", "3",
                 "--model", str(owl_dir), "--out", str(tmp_path / "layout.json")]) == 0
    (loaded,) = load_layouts(tmp_path / "layout.json")
    expected = name_objects(owl, [picture(2, (64, 80))], load_vocabulary("coco"), max_objects=3)[0]
    assert loaded.phrases == expected.phrases and len(loaded.entities) == 3
    assert [e.box for e in loaded.entities] == [pytest.approx(e.box, abs=1e-6) for e in expected.entities]
