"""Layout verification: matching maths on hand-built detections, the tiny detector end to end, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detector.cli import main
from detector.box_ops import box_iou
from detector.detect import Detections, Exemplar, OpenSetDetector
from detector.verify import EntityCheck, Verification, match_entities, summarize, verify, verify_batch
from gligen.layout import Entity, Layout, save_layouts
from tests.tiny_detector import save_tiny_detector


def layout_of(*entities: tuple[str, tuple]) -> Layout:
    return Layout("test", tuple(Entity(p, b) for p, b in entities))


def detections(*found: tuple[int, float, tuple], phrases: list[str]) -> Detections:
    ids, scores, boxes = zip(*found)
    return Detections(torch.tensor(boxes), torch.tensor(scores), torch.tensor(ids), phrases, (100, 100))


def test_each_entity_gets_its_phrase_detection_with_the_highest_iou():
    layout = layout_of(
        ("a cat", (0.0, 0.0, 0.5, 0.5)),
        ("a dog", (0.5, 0.5, 1.0, 1.0)),
        ("A cat", (0.5, 0.0, 1.0, 0.5)),  # same phrase, other case: the same detector phrase
        ("a bird", (0.0, 0.5, 0.5, 1.0)),
    )
    found = detections(
        (0, 0.9, (0.0, 0.0, 0.4, 0.5)),  # cat: inter 0.2, union 0.25 -> 0.8 with the first cat
        (0, 0.3, (0.55, 0.0, 1.0, 0.5)),  # cat: inter 0.225, union 0.25 -> 0.9 with the second cat
        (1, 0.8, (0.5, 0.5, 0.75, 1.0)),  # dog: inter 0.125, union 0.25 -> 0.5, exactly the threshold
        (1, 0.95, (0.0, 0.0, 0.2, 0.2)),  # dog far away: IoU 0, not chosen over the 0.5 one
        (0, 0.99, (0.0, 0.6, 0.3, 0.9)),  # a "cat" where the bird is: IoU 0 with both cats
        phrases=["a cat", "a dog", "a bird"],
    )
    result = match_entities(layout, found, iou_threshold=0.5)
    assert [round(e.iou, 6) for e in result.entities] == [0.8, 0.5, 0.9, 0.0]
    assert [e.success for e in result.entities] == [True, True, True, False]
    assert [e.score for e in result.entities] == pytest.approx([0.9, 0.8, 0.3, 0.0])
    assert result.entities[2].detected_box == pytest.approx((0.55, 0.0, 1.0, 0.5))
    assert result.entities[3].detected_box is None  # the bird was never detected
    assert result.success_rate == 0.75
    assert result.mean_iou == pytest.approx((0.8 + 0.5 + 0.9) / 4)
    assert not match_entities(layout, found, iou_threshold=0.51).entities[1].success


def test_entities_with_one_phrase_never_share_a_detection():
    layout = layout_of(("a cat", (0.0, 0.0, 0.5, 1.0)), ("a cat", (0.25, 0.0, 0.75, 1.0)))
    found = detections((0, 0.9, (0.0, 0.0, 0.5, 1.0)), phrases=["a cat"])
    first, second = match_entities(layout, found).entities
    assert (first.iou, first.success) == (1.0, True)
    assert (second.iou, second.detected_box, second.success) == (0.0, None, False)
    # with a second detection the other entity takes it: inter 0.25, union 0.5 + 0.5 - 0.25
    found = detections((0, 0.9, (0.0, 0.0, 0.5, 1.0)), (0, 0.4, (0.5, 0.0, 1.0, 1.0)), phrases=["a cat"])
    assert match_entities(layout, found).entities[1].iou == pytest.approx(0.25 / 0.75)


def test_summarize_pools_entities_over_images():
    def check(iou: float) -> EntityCheck:
        return EntityCheck("x", (0, 0, 1, 1), (0, 0, 1, 1), 0.5, iou, iou >= 0.5)

    sets = [Verification([check(0.9), check(0.2)]), Verification([check(0.6)]), Verification([])]
    assert summarize(sets) == {
        "instance_success_rate": pytest.approx(2 / 3),
        "mean_iou": pytest.approx((0.9 + 0.2 + 0.6) / 3),
        "image_success_rate": pytest.approx(2 / 3),  # the empty layout passes vacuously
        "num_entities": 3,
        "num_images": 3,
    }
    assert json.loads(json.dumps(sets[0].to_dict()))["entities"][1]["success"] is False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp("verify") / "tiny")


def picture(seed: int, size=(96, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


LAYOUTS = [
    layout_of(("a red square", (0.1, 0.1, 0.6, 0.7)), ("a blue circle", (0.5, 0.2, 0.9, 0.9))),
    layout_of(("a cat", (0.0, 0.0, 0.5, 0.5)), ("a cat", (0.5, 0.5, 1.0, 1.0)), ("a tree", (0.2, 0.1, 0.8, 0.9))),
]


def plain_iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def test_verify_with_the_tiny_detector(tiny):
    detector = OpenSetDetector.from_pretrained(str(tiny))
    image = picture(0)
    result = verify(detector, image, LAYOUTS[0], box_threshold=0.0, text_threshold=0.0)
    found = detector.detect(image, ["a red square", "a blue circle"], box_threshold=0.0, text_threshold=0.0)[0]
    for pid, (entity, check) in enumerate(zip(LAYOUTS[0].entities, result.entities)):
        mine = [(plain_iou(entity.box, b), b) for b, p in zip(found.boxes.tolist(), found.phrase_ids.tolist()) if p == pid]
        best_iou, best_box = max(mine)
        assert check.iou == pytest.approx(best_iou, abs=1e-6)
        assert check.detected_box == pytest.approx(tuple(best_box))
        assert check.success == (best_iou >= 0.5)
    # one batched call over two images and layouts gives what one call per image gives
    images = [image, picture(1)]
    batched = verify_batch(detector, images, LAYOUTS, box_threshold=0.0, text_threshold=0.0)
    for im, lay, got in zip(images, LAYOUTS, batched):
        alone = verify(detector, im, lay, box_threshold=0.0, text_threshold=0.0)
        assert [e.iou for e in got.entities] == pytest.approx([e.iou for e in alone.entities], abs=1e-4)
    assert len(batched[1].entities) == 3 and batched[1].entities[0].detected_box != batched[1].entities[1].detected_box


def test_verify_cli(tiny, tmp_path, capsys):
    image_path = tmp_path / "gen.png"
    picture(0).save(image_path)
    save_layouts(tmp_path / "layout.json", [LAYOUTS[0]])
    args = [str(image_path), "--layout", str(tmp_path / "layout.json"), "--model", str(tiny), "--box-threshold", "0"]
    assert main(["verify", *args, "--text-threshold", "0", "--out", str(tmp_path / "r.json"),
                 "--overlay", str(tmp_path / "ov")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    expected = verify(OpenSetDetector.from_pretrained(str(tiny)), picture(0), LAYOUTS[0], box_threshold=0.0, text_threshold=0.0)
    assert report["summary"] == pytest.approx(summarize([expected]))
    assert [e["iou"] for e in report["images"][0]["entities"]] == pytest.approx([e.iou for e in expected.entities], abs=1e-5)
    assert Image.open(tmp_path / "ov" / "gen.png").size == (384, 256)  # enlarged 4 times to label it

    save_layouts(tmp_path / "two.jsonl", LAYOUTS)
    capsys.readouterr()
    assert main(["verify", str(image_path), "--layout", str(tmp_path / "two.jsonl"), "--model", str(tiny)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "two.jsonl: holds 2 layouts for 1 images" in err
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert main(["verify", str(tmp_path / "bad.png"), "--layout", str(tmp_path / "layout.json"), "--model", str(tiny)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.png: cannot read the image" in err


def test_reference_images_are_checked_as_exemplars(tmp_path, capsys):
    """An entity with a reference image is looked for by that image too (OWLv2), and both checks are recorded."""
    from tests.test_detector_owlv2 import shape_patch
    from tests.tiny_detector import save_tiny_owlv2

    owl_dir = save_tiny_owlv2(tmp_path / "owl")
    owl = OpenSetDetector.from_pretrained(str(owl_dir))
    rng = np.random.default_rng(3)
    mug, other = shape_patch(rng), shape_patch(rng)
    mug.save(tmp_path / "mug.png")
    generated = picture(5, (64, 64))
    generated.paste(mug, (32, 8))
    generated.paste(other, (8, 32))
    generated.save(tmp_path / "gen.png")
    layout = Layout("a mug and a cat", (Entity("a mug", (0.5, 0.125, 0.875, 0.5), image=str(tmp_path / "mug.png")),
                                        Entity("a cat", (0.125, 0.5, 0.5, 0.875))))
    result = verify(owl, generated, layout, box_threshold=0.0)
    mug_check, cat_check = result.entities
    assert cat_check.exemplar is None and mug_check.exemplar is not None
    # the exemplar check is the best-overlapping detection of the reference image's query
    [found] = owl.detect(generated, ["a mug", "a cat"], [Exemplar(mug, None, "ref")], box_threshold=0.0)
    ious = box_iou(torch.tensor([layout.entities[0].box]), found.boxes[found.phrase_ids == 2])[0]
    assert mug_check.exemplar.iou == pytest.approx(float(ious.max()), abs=1e-6) and mug_check.exemplar.iou > 0.3
    assert mug_check.exemplar.success and mug_check.exemplar.score > 0.8  # the mug is where the layout put it
    record = result.to_dict()["entities"][0]
    assert set(record["exemplar"]) == {"detected_box", "score", "iou", "success"} and "exemplar" not in result.to_dict()["entities"][1]
    summary = summarize([result])
    assert summary["num_exemplar_entities"] == 1 and summary["exemplar_mean_iou"] == pytest.approx(mug_check.exemplar.iou)

    # the command line: the same record; a detector without exemplars says it checked phrases only
    save_layouts(tmp_path / "layout.json", [layout])
    args = [str(tmp_path / "gen.png"), "--layout", str(tmp_path / "layout.json"), "--box-threshold", "0"]
    assert main(["verify", *args, "--model", str(owl_dir), "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["images"][0]["entities"][0]["exemplar"] == record["exemplar"]
    gdino = save_tiny_detector(tmp_path / "gd", shortest_edge=96, longest_edge=160)
    capsys.readouterr()
    assert main(["verify", *args, "--model", str(gdino), "--out", str(tmp_path / "g.json")]) == 0
    assert "1 entities have reference images" in capsys.readouterr().err
    assert "exemplar" not in json.loads((tmp_path / "g.json").read_text())["images"][0]["entities"][0]
    (tmp_path / "mug.png").write_bytes(b"broken")
    assert main(["verify", *args, "--model", str(owl_dir)]) == 1
    assert "mug.png: cannot read the image" in capsys.readouterr().err
