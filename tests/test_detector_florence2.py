"""Florence-2 behind OpenSetDetector against transformers' own processor + generate + post-processing."""

from __future__ import annotations

import pytest
import torch
from transformers import Florence2ForConditionalGeneration, Florence2Processor

from detector import Exemplar, OpenSetDetector
from detector.cli import main
from detector.florence2 import Florence2Detector
from detector.label import name_objects
from gligen.errors import UserError
from gligen.layout import load_layouts
from tests.test_detector_detect import random_image
from tests.tiny_detector import save_tiny_florence2

A, B = random_image(60, 80, 1), random_image(90, 50, 2)
ANSWERS = [  # what the tiny model is taught to answer
    (A, "<OD>", "cat<loc_100><loc_150><loc_450><loc_800>dog<loc_500><loc_300><loc_900><loc_700>"),
    (A, "<DENSE_REGION_CAPTION>", "a black cat<loc_100><loc_150><loc_450><loc_800>"),
    (A, "<OPEN_VOCABULARY_DETECTION>a cat", "a cat<loc_120><loc_150><loc_450><loc_800>"),
    (B, "<OPEN_VOCABULARY_DETECTION>the red car", "the red car<loc_50><loc_500><loc_600><loc_950>"),
]


@pytest.fixture(scope="module")
def florence_dir(tmp_path_factory):
    return save_tiny_florence2(tmp_path_factory.mktemp("florence") / "florence2", ANSWERS)


@pytest.fixture(scope="module")
def florence(florence_dir):
    return OpenSetDetector.from_pretrained(str(florence_dir))


def reference(florence_dir, image, prompt: str) -> dict:
    """transformers' own Florence-2 recipe: processor, beam search (3 beams, greedy), post_process_generation."""
    processor = Florence2Processor.from_pretrained(florence_dir)
    model = Florence2ForConditionalGeneration.from_pretrained(florence_dir).eval()
    task = prompt[: prompt.index(">") + 1]
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=62, num_beams=3, do_sample=False)
    text = processor.batch_decode(ids, skip_special_tokens=False)[0]
    return processor.post_process_generation(text, task=task, image_size=image.size)[task]


def normalized(boxes, image) -> torch.Tensor:
    w, h = image.size
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) / torch.tensor([w, h, w, h])).clamp(0, 1)


def test_family(florence):
    assert isinstance(florence, Florence2Detector) and florence.names_objects and not florence.takes_exemplars
    with pytest.raises(UserError, match="Florence-2 takes text phrases only"):
        florence.detect(A, exemplars=[Exemplar(B)])


@pytest.mark.parametrize("task", ["od", "dense"])
def test_named_objects_equal_transformers(florence_dir, florence, task):
    prompt = {"od": "<OD>", "dense": "<DENSE_REGION_CAPTION>"}[task]
    found = florence.name_objects([A, B], task=task)  # one batch of two images
    for image, detections in zip([A, B], found):
        expected = reference(florence_dir, image, prompt)
        assert detections.labels == expected["labels"] and len(detections) > 0
        assert torch.equal(detections.boxes, normalized(expected["bboxes"], image))
        assert detections.image_size == image.size and torch.equal(detections.scores, torch.ones(len(detections)))
    assert found[0].labels == (["cat", "dog"] if task == "od" else ["a black cat"])  # what it was taught


def test_phrase_detections_equal_transformers(florence_dir, florence):
    phrases = ["a cat", "the red car"]
    found = florence.detect([A, B], phrases, nms_iou=None)
    for image, detections in zip([A, B], found):
        boxes, ids = [], []
        for pid, phrase in enumerate(phrases):
            expected = reference(florence_dir, image, "<OPEN_VOCABULARY_DETECTION>" + phrase)
            boxes += expected["bboxes"]
            ids += [pid] * len(expected["bboxes"])
        assert detections.phrases == phrases and len(detections) == len(ids) > 0
        assert torch.equal(detections.phrase_ids, torch.tensor(ids))
        assert torch.equal(detections.boxes, normalized(boxes, image))


def test_caption_free_label_with_florence(florence_dir, florence, tmp_path):
    [layout] = name_objects(florence, [A])
    assert layout.prompt == "cat, dog" and [e.spans for e in layout.entities] == [((0, 3),), ((5, 8),)]
    [found] = florence.name_objects([A])
    assert [e.box for e in layout.entities] == [pytest.approx(tuple(b)) for b in found.boxes.tolist()]
    A.save(tmp_path / "a.png")
    assert main(["label", str(tmp_path / "a.png"), "--model", str(florence_dir), "--task", "dense",
                 "--out", str(tmp_path / "layout.json")]) == 0
    [loaded] = load_layouts(tmp_path / "layout.json")
    assert loaded.phrases == ["a black cat"] and loaded.prompt == "a black cat"
