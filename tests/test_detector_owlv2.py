"""OWLv2 behind OpenSetDetector against transformers' own OWLv2 pipeline, on a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import Owlv2ForObjectDetection, Owlv2Processor
from transformers.models.owlv2 import Owlv2ImageProcessorPil

from detector import Exemplar, OpenSetDetector
from detector.box_ops import box_iou
from detector.cli import main
from detector.owl_preprocess import SquareSettings, preprocess_square
from detector.owlv2 import Owlv2Detector, unit
from tests.test_detector_detect import random_image, run_cli
from tests.tiny_detector import save_tiny_detector, save_tiny_owlv2


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    return save_tiny_owlv2(tmp_path_factory.mktemp("owl") / "owlv2")


@pytest.fixture(scope="module")
def owl(owl_dir):
    return OpenSetDetector.from_pretrained(str(owl_dir))


@pytest.fixture(scope="module")
def reference(owl_dir):
    return Owlv2Processor.from_pretrained(owl_dir), Owlv2ForObjectDetection.from_pretrained(owl_dir).eval()


@pytest.mark.parametrize("size", [64, 960])
def test_preprocessing_equals_the_scipy_processor(size):
    # landscape, portrait, larger than the model size, tiny, square, one pixel high
    images = [random_image(90, 120, 1), random_image(50, 40, 2), random_image(1000, 700, 3),
              random_image(30, 33, 4), random_image(64, 64, 5), random_image(1, 5, 6)]
    ref = Owlv2ImageProcessorPil(size={"height": size, "width": size})(images=images, return_tensors="pt")
    ours = preprocess_square(images, SquareSettings(size), "cpu", torch.float32)
    assert ours.shape == ref["pixel_values"].shape == (6, 3, size, size)
    # float32 rounding only: one grey level would be 1/255/0.27 = 0.015
    assert (ours - ref["pixel_values"]).abs().max() < 1e-5


def test_from_pretrained_picks_the_family_from_the_config(owl, tmp_path):
    assert isinstance(owl, Owlv2Detector) and owl.takes_exemplars and owl.settings.size == 64
    gdino = OpenSetDetector.from_pretrained(str(save_tiny_detector(tmp_path / "gd", shortest_edge=64, longest_edge=96)))
    assert type(gdino).__name__ == "GroundingDinoDetector" and not gdino.takes_exemplars


def expected_detections(result: dict, image: Image.Image) -> tuple[torch.Tensor, ...]:
    """transformers' detections of one image, best first, boxes normalized to the image and clipped."""
    w, h = image.size
    order = result["scores"].argsort(descending=True, stable=True)
    boxes = (result["boxes"] / torch.tensor([w, h, w, h])).clamp(0, 1)
    return boxes[order], result["scores"][order], order


def test_text_detections_equal_transformers_pipeline(owl, reference):
    processor, model = reference
    images = [random_image(120, 90, 4), random_image(70, 200, 5), random_image(64, 64, 6)]
    phrases = [["a cat", "a small brown dog", "Sofa"], ["the red car", "tree", "a person"], ["a", "b", "c"]]
    inputs = processor(text=phrases, images=images, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    scores = out.logits.sigmoid().amax(-1).flatten().sort().values
    threshold = float(scores[len(scores) // 2 : len(scores) // 2 + 2].mean())  # between two scores: about half pass
    sizes = [(im.height, im.width) for im in images]
    ref = processor.post_process_grounded_object_detection(out, threshold=threshold, target_sizes=sizes)
    ours = owl.detect(images, phrases, box_threshold=threshold, nms_iou=None)
    compared = 0
    for image, result, found in zip(images, ref, ours):
        boxes, expected_scores, order = expected_detections(result, image)
        assert len(found) == len(expected_scores) > 0
        assert torch.allclose(found.scores, expected_scores, atol=1e-5)
        assert torch.allclose(found.boxes, boxes, atol=1e-5)
        assert torch.equal(found.phrase_ids, result["labels"][order])
        compared += len(found)
    assert compared >= 60
    # phrase lists of other lengths per image: each image as if asked alone
    mixed = owl.detect(images[:2], [["a cat"], ["the red car", "tree", "a person", "a bus"]], box_threshold=threshold)
    alone = [owl.detect(images[0], ["a cat"], box_threshold=threshold)[0],
             owl.detect(images[1], ["the red car", "tree", "a person", "a bus"], box_threshold=threshold)[0]]
    for a, b in zip(mixed, alone):
        assert torch.allclose(a.scores, b.scores, atol=1e-6) and torch.equal(a.phrase_ids, b.phrase_ids)


def test_image_guided_detections_equal_transformers_pipeline(owl, reference):
    """An exemplar without a box is transformers' image_guided_detection: the query image's most object-like patch."""
    processor, model = reference
    images = [random_image(120, 90, 4), random_image(70, 200, 5)]
    queries = [random_image(60, 80, 6), random_image(100, 50, 7)]
    inputs = processor(images=images, query_images=queries, return_tensors="pt")
    with torch.no_grad():
        out = model.image_guided_detection(**inputs)
    threshold = 0.5
    sizes = torch.tensor([(im.height, im.width) for im in images])
    ref = processor.post_process_image_guided_detection(out, threshold=threshold, nms_threshold=1.0, target_sizes=sizes)
    ours = owl.detect(images, exemplars=[[Exemplar(queries[0])], [Exemplar(queries[1])]], box_threshold=threshold,
                      nms_iou=None)
    for image, result, found in zip(images, ref, ours):
        boxes, alphas, _ = expected_detections(result, image)
        assert len(found) == len(alphas) > 5
        assert torch.allclose(found.boxes, boxes, atol=1e-5)
        # transformers reports "display alphas": scores rescaled so the best is 1 and 10% of it is 0
        best = found.scores.max() + 1e-6
        assert torch.allclose(((found.scores - 0.1 * best) / (0.9 * best)).clamp(0, 1), alphas, atol=1e-5)
        assert found.labels == ["exemplar"] * len(found)


def shape_patch(rng, size: int = 24) -> Image.Image:
    """A flat colour with a disc of another colour."""
    patch = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    ImageDraw.Draw(patch).ellipse((4, 4, size - 5, size - 5), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return patch


def test_exemplar_finds_a_pasted_copy_better_than_a_random_patch(owl):
    rng = np.random.default_rng(0)
    for trial in range(4):
        wanted, other = shape_patch(rng), shape_patch(rng)
        ref = random_image(64, 64, 100 + trial)
        ref.paste(wanted, (8, 32))
        exemplar = Exemplar(ref, box=(8 / 64, 32 / 64, 32 / 64, 56 / 64), label="thing")
        x, y = (int(v) * 8 for v in rng.integers(0, 5, 2))
        with_copy = random_image(64, 64, 200 + trial)
        with_other = with_copy.copy()
        with_copy.paste(wanted, (x, y))
        with_other.paste(other, (x, y))
        found = owl.detect([with_copy, with_other], exemplars=[exemplar], box_threshold=0.0, nms_iou=None)
        place = torch.tensor([[x, y, x + 24, y + 24]]) / 64
        there = [f.scores[box_iou(f.boxes, place)[:, 0] > 0.1].max() for f in found]
        assert there[0] > there[1] + 0.02, (trial, there)
        assert box_iou(found[0].boxes[:1], place) > 0.1  # the best detection is the copy


def test_exemplars_of_one_label_are_averaged_into_one_query(owl):
    a, b, c = random_image(64, 80, 1), random_image(70, 60, 2), random_image(50, 50, 3)
    exemplars = [Exemplar(a, (0.1, 0.1, 0.6, 0.7), "mug"), Exemplar(c, None, "plant"), Exemplar(b, (0.3, 0.2, 0.9, 0.9), "mug")]
    target = random_image(90, 120, 4)
    [found] = owl.detect(target, ["a cat"], exemplars, box_threshold=0.0, nms_iou=None)
    assert found.phrases == ["a cat", "mug", "plant"]
    embeddings = owl.exemplar_queries(exemplars, batch_size=2)
    queries = torch.stack([owl.text_queries(["a cat"])[0], unit(embeddings[id(exemplars[0])] + embeddings[id(exemplars[2])]),
                           embeddings[id(exemplars[1])]])
    feats, _ = owl.image_features([target])
    logits = owl.model.class_predictor(feats, queries[None])[0][0]  # (patches, 3)
    expected = logits.sigmoid().amax(-1).sort(descending=True).values
    assert torch.allclose(found.scores, expected, atol=1e-5)
    assert set(found.phrase_ids.tolist()) == {0, 1, 2}


def test_cli_exemplars(owl_dir, tmp_path, capsys):
    rng = np.random.default_rng(1)
    ref, target = random_image(64, 64, 1), random_image(80, 100, 2)
    ref.paste(shape_patch(rng), (8, 32))
    ref.save(tmp_path / "ref.png")
    target.save(tmp_path / "target.png")
    out = tmp_path / "dets.json"
    model = ["--model", str(owl_dir), "--device", "cpu"]
    assert main(["detect", str(tmp_path / "target.png"), "--exemplar", f"mug={tmp_path / 'ref.png'}:8,32,32,56",
                 "--exemplar", f"mug={tmp_path / 'ref.png'}:0.1,0.5,0.5,0.9", "--phrases", "a cat",
                 "--box-threshold", "0.3", "--out", str(out), *model]) == 0
    [image] = json.loads(out.read_text())["images"]
    assert image["phrases"] == ["a cat", "mug"] and image["detections"]

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    gdino = save_tiny_detector(tmp_path / "gd", shortest_edge=64, longest_edge=96)
    capsys.readouterr()
    cases = {
        "lies outside": ["--exemplar", f"{tmp_path / 'ref.png'}:10,10,80,30", *model],
        "bad.jpg": ["--exemplar", f"{bad}:1,1,20,20", *model],
        "takes text phrases only": ["--exemplar", f"{tmp_path / 'ref.png'}:8,32,32,56", "--model", str(gdino)],
        "nothing to detect": model,
    }
    for needle, args in cases.items():
        code, err = run_cli(["detect", str(tmp_path / "target.png"), *args], capsys)
        assert code == 1 and len(err) == 1 and needle in err[0], (needle, err)
