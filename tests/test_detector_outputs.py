"""Detections in other formats: transformers' zero-shot-object-detection pipeline, COCO results."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from transformers import pipeline

from detector import OpenSetDetector
from detector.detections import Detections
from gligen.errors import UserError
from tests.test_detector_detect import random_image
from tests.tiny_detector import save_tiny_owlv2


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    return save_tiny_owlv2(tmp_path_factory.mktemp("outputs") / "owl")


def test_pipeline_round_trip_is_exact(owl_dir):
    owl = OpenSetDetector.from_pretrained(str(owl_dir))
    for image in (random_image(90, 120, 1), random_image(77, 33, 2)):
        [found] = owl.detect(image, ["a cat", "a dog", "a bus"], box_threshold=0.01)
        assert len(found) > 5
        records = found.to_pipeline()
        assert set(records[0]) == {"score", "label", "box"} and set(records[0]["box"]) == {"xmin", "ymin", "xmax", "ymax"}
        back = Detections.from_pipeline(records, image.size, found.phrases)
        assert torch.equal(back.boxes, found.boxes) and torch.equal(back.scores, found.scores)
        assert torch.equal(back.phrase_ids, found.phrase_ids) and back.phrases == found.phrases
        assert back.image_size == found.image_size
        # without the phrase list, labels in order of first appearance
        assert Detections.from_pipeline(records, image.size).labels == found.labels


def test_reads_transformers_pipeline_output(owl_dir):
    """The pipeline asks one label at a time and rounds boxes to unclipped integer pixels; per label, ours agree."""
    detect = pipeline("zero-shot-object-detection", model=str(owl_dir), device="cpu")
    owl = OpenSetDetector.from_pretrained(str(owl_dir))
    image = random_image(90, 120, 3)
    records = detect(image, candidate_labels=["a cat", "a dog"], threshold=0.02)
    theirs = Detections.from_pipeline(records, image.size, ["a cat", "a dog"])
    assert len(theirs) > 10 and theirs.labels == [r["label"] for r in records]
    for pid, label in enumerate(["a cat", "a dog"]):
        [ours] = owl.detect(image, [label], box_threshold=0.02, nms_iou=None)
        mine = theirs.phrase_ids == pid
        assert int(mine.sum()) == len(ours)
        assert torch.allclose(theirs.scores[mine], ours.scores, atol=1e-5)
        w, h = image.size
        clipped = theirs.pixel_boxes()[mine].clamp(min=0).minimum(torch.tensor([w, h, w, h], dtype=torch.float64))
        assert (clipped - ours.pixel_boxes()).abs().max() <= 1.0  # integer pixels
    with pytest.raises(UserError, match="label 'a cat' is none of the phrases"):
        Detections.from_pipeline(records, image.size, ["a dog"])
    with pytest.raises(UserError, match="detection 0: expected score, label and box"):
        Detections.from_pipeline([{"score": 0.5, "label": "x"}], image.size)


def test_coco_results(owl_dir):
    from pycocotools.coco import COCO

    owl = OpenSetDetector.from_pretrained(str(owl_dir))
    image = random_image(90, 120, 4)
    [found] = owl.detect(image, ["a cat", "a dog"], box_threshold=0.02)
    records = found.to_coco(7, {"a cat": 17, "a dog": 18})
    assert records == found.to_coco(7, [17, 18])
    gt = COCO()
    gt.dataset = {"images": [{"id": 7, "width": 120, "height": 90}], "annotations": [],
                  "categories": [{"id": 17, "name": "a cat"}, {"id": 18, "name": "a dog"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        results = gt.loadRes(records)
    loaded = results.loadAnns(results.getAnnIds())
    assert len(loaded) == len(found) > 0
    for record, (x0, y0, x1, y1), score, label in zip(loaded, found.pixel_boxes().tolist(), found.scores.tolist(),
                                                      found.labels):
        assert record["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
        assert record["score"] == pytest.approx(score) and record["category_id"] == {"a cat": 17, "a dog": 18}[label]
