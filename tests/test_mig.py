"""The COCO-MIG protocol (`gligen.eval.mig`): the colour check, MIG layouts, the per-level report, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from detector.detections import Detections
from gligen.eval.annotations import Record
from gligen.eval.generate import image_name
from gligen.eval.mig import (
    COLORS, LEVELS, Instance, MigSettings, Sampling, build_mig_records, color_check, color_pixels, load_mig_set,
    mig_layout, read_mig_bench, rgb_to_hsv, score_mig,
)
from gligen.layout import Entity, Layout, load_layouts, save_layouts
from tests.test_eval_end_to_end import cli, write

# A colour well inside each of MIG-Bench's ranges, and inside no other.
SWATCHES = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (40, 170, 60), "yellow": (240, 220, 40),
            "black": (10, 10, 10), "white": (250, 250, 250), "brown": (140, 80, 30)}
GREY = (128, 128, 128)


def colours_of(rgb: tuple[int, int, int]) -> list[str]:
    return [c for c in COLORS if color_pixels(np.array(rgb, np.uint8), c)]


# --- the colour check --------------------------------------------------------------------------------------------


def test_hsv_equals_opencv_on_every_8bit_colour():
    cv2 = pytest.importorskip("cv2")
    values = np.arange(256, dtype=np.uint8)
    for red in range(256):
        rgb = np.stack(np.broadcast_arrays(np.uint8(red), values[:, None], values[None, :]), axis=-1)
        np.testing.assert_array_equal(rgb_to_hsv(rgb), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV))


@pytest.mark.parametrize("color", list(COLORS))
def test_each_colour_passes_on_itself_and_fails_on_the_others(color):
    image = np.zeros((8, 8, 3), np.uint8)
    image[:] = SWATCHES[color]
    mask = np.ones((8, 8), bool)
    for other in COLORS:
        assert color_check(image, mask, other) == ((1.0, True) if other == color else (0.0, False))


def test_red_wraps_around_the_hue_circle():
    assert colours_of((255, 20, 0)) == ["red"]  # H 2
    assert colours_of((255, 0, 40)) == ["red"]  # H 175: past 156, the other end of the circle
    assert colours_of((255, 60, 0)) == ["brown"]  # H 7: just past red's low end
    assert colours_of((200, 0, 255)) == []  # H 144: purple, between blue (<= 124) and red (>= 156)


def test_black_white_and_grey_by_value_and_saturation():
    assert colours_of((35, 35, 35)) == ["black"]  # V 35: black's bound, inclusive
    assert colours_of((36, 36, 36)) == []
    assert colours_of(GREY) == []  # no saturation, middle value: no colour of the list
    assert colours_of((221, 221, 221)) == ["white"]  # V 221: white's bound
    assert colours_of((220, 220, 220)) == []
    assert colours_of((255, 214, 214)) == ["white"]  # S 41 <= 43: a pale pink is white, not red
    assert colours_of((255, 200, 200)) == ["red"]  # S 55


def test_fraction_counts_the_mask_only_and_passes_at_the_threshold():
    image = np.zeros((1, 20, 3), np.uint8)
    image[:] = GREY
    image[0, :2] = SWATCHES["red"]
    image[0, 15:] = SWATCHES["red"]  # outside the mask: never counted
    mask = np.zeros((1, 20), bool)
    mask[0, :10] = True
    assert color_check(image, mask, "red") == (0.2, True)  # 2 of 10: exactly the default 0.2 passes
    assert color_check(image, mask, "red", 0.21) == (0.2, False)
    image[0, 1] = GREY
    assert color_check(image, mask, "red") == (0.1, False)
    wide = np.zeros((1, 15, 3), np.uint8)
    wide[:] = GREY
    wide[0, :3] = SWATCHES["red"]
    assert color_check(wide, np.ones((1, 15), bool), "red")[1]  # 3 / 15 is 0.2 too, not a hair under
    assert color_check(image, np.zeros((1, 20), bool), "red", 0.0) == (0.0, False)  # no pixels: nothing to see


# --- layouts -----------------------------------------------------------------------------------------------------

CATEGORIES = ["car", "dog", "cup", "person", "dining table"]


def coco(counts: list[int], person_in: int | None = None) -> dict:
    """A COCO instances file: image i (100 x 80) with counts[i] big boxes, one tiny box, a person in `person_in`."""
    images, annotations = [], []
    for image_id, count in enumerate(counts, 1):
        images.append({"id": image_id, "width": 100, "height": 80, "file_name": f"{image_id:03d}.jpg"})
        boxes = [(1, [2 * k, 2 * k, 20 + 5 * k, 12 + k]) for k in range(count)]  # dogs: widths 20.., heights 12..
        boxes.append((2, [90, 70, 9, 9]))  # 9 px wide: under 1/8 of 100, dropped
        if image_id == person_in:
            boxes.append((3, [0, 0, 50, 50]))
        for category, bbox in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category + 1,
                                "bbox": bbox, "iscrowd": 0, "area": bbox[2] * bbox[3]})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CATEGORIES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def test_mig_layouts_from_coco(tmp_path):
    path = write(tmp_path / "instances.json", coco([2, 3, 1, 8, 6, 2, 4, 5, 2, 2], person_in=9))
    eval_set = load_mig_set(path, size=64, sampling=Sampling(per_level=2, seed=3))
    records = eval_set.records
    ids = sorted(r.image_id for r in records)
    # image 3: one big box; image 9: a person; L2 holds two of images 1, 6, 10 (the third is over the quota)
    assert 3 not in ids and 9 not in ids and len([i for i in ids if i in (1, 6, 10)]) == 2
    assert {2, 4, 5, 7, 8} <= set(ids) and len(ids) == 7
    for record in records:
        layout = record.layout
        assert LEVELS[0] <= len(layout.entities) <= LEVELS[-1] and (layout.width, layout.height) == (64, 64)
        assert layout.prompt == "a photo of " + " and ".join(layout.phrases)
        for entity in layout.entities:
            color, category = layout.meta["mig"][entity.phrase]["color"], layout.meta["mig"][entity.phrase]["category"]
            assert entity.phrase == f"a {color} {category}" and color in COLORS and category == "dog"
            assert entity.box[2] - entity.box[0] >= 1 / 8 and entity.box[3] - entity.box[1] >= 1 / 8
    eight = next(r for r in records if r.image_id == 4)  # 8 big boxes: the 6 largest are kept
    assert [round(e.box[2] - e.box[0], 2) for e in eight.layout.entities] == [0.3, 0.35, 0.4, 0.45, 0.5, 0.55]

    again = load_mig_set(path, size=64, sampling=Sampling(per_level=2, seed=3)).records
    assert [r.layout.to_dict() for r in again] == [r.layout.to_dict() for r in records]  # a seed rebuilds the set
    other = load_mig_set(path, size=64, sampling=Sampling(per_level=2, seed=4)).records
    assert [r.layout.phrases for r in other] != [r.layout.phrases for r in records]
    assert [c.name for c in eval_set.categories] == ["dog"]


def test_build_never_repeats_a_prompt():
    box = (0.0, 0.0, 0.5, 0.5)
    records = [Record(Layout("", (Entity("cat", box), Entity("cat", box))), i, "") for i in range(400)]
    built = build_mig_records(records, Sampling(per_level=100, seed=0))
    prompts = [r.layout.prompt for r in built]
    assert len(prompts) == len(set(prompts)) == len(COLORS) ** 2  # every colour pair once, then no new prompt


LONG = ("a photo of a brown teddy bear and a brown teddy bear and a black teddy bear and a green teddy bear "
        "and a green teddy bear and a yellow teddy bear")


def test_read_migc_annotation_file(tmp_path):
    data = {
        "a photo of a red car and a blue car and a white dog": {
            "a blue car": [[0.1, 0.1, 0.4, 0.5]], "a red car": [[0.5, 0.5, 1.0000000000000002, 0.9]],
            "a white dog": [[0.0, 0.6, 0.3, 1.0]], "coco_id": "17"},
        LONG: {"a brown teddy bear": [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]], "a black teddy bear": [[0, 0, 1, 1]],
               "a green teddy bear": [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5]], "a yellow teddy bear": [[0, 0, 1, 1]],
               "coco_id": "3"},
    }
    path = tmp_path / "mig_bench_anno.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert "? a photo of a brown teddy bear" in path.read_text()  # a key over 128 characters, as in MIGC's file
    records = read_mig_bench(path, size=64)
    assert [(r.image_id, len(r.layout.entities)) for r in records] == [(17, 3), (3, 6)]
    assert records[0].layout.prompt == "a photo of a red car and a blue car and a white dog"
    assert records[0].layout.entities[1].box == (0.5, 0.5, 1.0, 0.9)  # float noise past the edge clipped
    assert records[1].layout.meta["mig"]["a brown teddy bear"] == {"category": "teddy bear", "color": "brown"}
    assert records[1].layout.prompt == LONG


@pytest.mark.parametrize("prompt, phrases, message", [
    ("a photo of a red car and a blue car", {"a red car": [[0.5, 0.5, 0.5, 0.9]], "a blue car": [[0, 0, 1, 1]]},
     "'a photo of a red car and a blue car': 'a red car': box [0.5, 0.5, 0.5, 0.9] covers no area of the image"),
    ("a photo of a purple car and a red car", {"a purple car": [[0, 0, 1, 1]], "a red car": [[0, 0, 1, 1]]},
     "'a photo of a purple car and a red car': phrase 'a purple car' is not 'a <colour> <category>'"),
    ("a photo of a red car and a blue car", {"a red car": [[0, 0, 1, 1]], "a blue car": [[0, 0, 1, 1]], "coco_id": "3"},
     "'a photo of a red car and a blue car': coco_id 3 appears twice"),
])
def test_a_bad_migc_file_is_one_line(tmp_path, prompt, phrases, message):
    data = {"a photo of a blue car and a red car": {"a blue car": [[0, 0, 1, 1]], "a red car": [[0, 0, 1, 1]],
                                                    "coco_id": "3"},
            prompt: {"coco_id": "4", **phrases}}
    path = tmp_path / "mig_bench_anno.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    status, stderr = cli("score", "--protocol", "mig", "--annotations", str(path), "--images", str(tmp_path),
                         "--out", str(tmp_path / "out"))
    assert status == 1 and stderr.count("\n") == 1 and stderr.startswith(f"gligen: error: {path}: {message}")


# --- scoring -----------------------------------------------------------------------------------------------------


class GivenDetector:
    """A detector whose detections are given per category; records what it was asked."""

    def __init__(self, boxes: dict[str, list[tuple[float, float, float, float]]]):
        self.boxes, self.calls = boxes, []

    def detect(self, images, phrases, **kwargs):
        self.calls.append(([list(p) for p in phrases], kwargs))
        found = []
        for image, (category,) in zip(images, phrases):
            boxes = torch.tensor(self.boxes.get(category, []), dtype=torch.float32).reshape(-1, 4)
            found.append(Detections(boxes, torch.full((len(boxes),), 0.9), torch.zeros(len(boxes), dtype=torch.long),
                                    [category], image.size))
        return found


class GivenSegmenter:
    """A segmenter returning, for each box it is given, the mask listed for that box."""

    name = "given"

    def __init__(self, masks: dict[tuple[float, ...], np.ndarray]):
        self.masks, self.boxes = masks, []

    def segment(self, images, boxes, multimask_output=False):
        assert multimask_output  # MIG-Bench keeps the best of SAM's three masks
        self.boxes.extend(tuple(round(v, 4) for v in box) for b in boxes for box in b.tolist())
        return [torch.from_numpy(np.stack([self.masks[tuple(round(v, 4) for v in box)] for box in b.tolist()]))
                for b in boxes]


def painted(regions: list[tuple[tuple[float, float, float, float], str]], size: int = 40) -> Image.Image:
    """A grey image with each normalized box filled with its swatch colour."""
    pixels = np.full((size, size, 3), GREY, np.uint8)
    for (x0, y0, x1, y1), color in regions:
        pixels[round(y0 * size):round(y1 * size), round(x0 * size):round(x1 * size)] = SWATCHES[color]
    return Image.fromarray(pixels)


CAR, DOG = (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)
CUP, CAT, BED = (0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)


def hand_made_set(tmp_path: Path) -> tuple[Path, Path]:
    """Two MIG layouts (L2, L3) and their images: what each instance should score is worked out in the test."""
    layouts = [
        mig_layout([Instance("car", "red", CAR), Instance("dog", "blue", DOG)], 40, {"image_id": 1}),
        mig_layout([Instance("cup", "green", CUP), Instance("cat", "white", CAT), Instance("bed", "black", BED)], 40,
                   {"image_id": 2}),
        mig_layout([Instance("cup", "red", CUP)] * 4, 40, {"image_id": 3}),  # its image is missing
    ]
    folder = tmp_path / "images"
    folder.mkdir()
    painted([(CAR, "red"), (DOG, "blue")]).save(folder / image_name(1))
    painted([(CUP, "red"), (CAT, "white"), (BED, "black")]).save(folder / image_name(2))  # the cup is red, not green
    save_layouts(folder / "layouts.jsonl", layouts)
    return folder / "layouts.jsonl", folder


def check_levels(report: dict, expected: dict[str, tuple[int, int, float, float]]) -> None:
    """Every level L2..L6 and overall: (layouts, instances, success rate, mIoU); a level without layouts has None."""
    assert list(report["mig"]) == ["L2", "L3", "L4", "L5", "L6", "overall"]
    for level, row in report["mig"].items():
        layouts, instances, rate, miou = expected.get(level, (0, 0, None, None))
        assert (row["layouts"], row["instances"]) == (layouts, instances), level
        if rate is None:
            assert row["instance_success_rate"] is None and row["miou"] is None
        else:
            assert row["instance_success_rate"] == pytest.approx(rate) and row["miou"] == pytest.approx(miou), level


def test_report_has_every_level_with_the_right_numbers(tmp_path):
    layouts, images = hand_made_set(tmp_path)
    detector = GivenDetector({
        "car": [CAR, (0.6, 0.0, 1.0, 0.3)],  # IoU 1 (the other detection is elsewhere)
        "dog": [(0.5, 0.5, 1.0, 0.9)],  # IoU 0.8, its pixels blue
        "cup": [CUP],  # IoU 1, but red: colour fails, counted IoU 0
        "bed": [(0.0, 0.5, 0.4, 1.0)],  # IoU 0.4: fails, counted as it is (not colour-checked)
    })  # no cat: IoU 0
    eval_set = load_mig_set(layouts, sampling=None)
    report = score_mig(detector, eval_set, images, tmp_path / "out")
    check_levels(report, {"L2": (1, 2, 1.0, 0.9), "L3": (1, 3, 0.0, 0.4 / 3), "overall": (2, 5, 0.4, 2.2 / 5)})
    assert report["num_images"] == 2 and report["missing_images"] == [str(images / image_name(3))]
    # One prompt per category of an image, at MIG-Bench's thresholds and NMS.
    [(phrases, kwargs)] = detector.calls
    assert phrases == [["car"], ["dog"], ["cup"], ["cat"], ["bed"]]
    assert (kwargs["box_threshold"], kwargs["text_threshold"], kwargs["nms_iou"]) == (0.25, 0.25, 0.8)

    instances = json.loads((tmp_path / "out" / "instances.json").read_text())
    assert [(i["phrase"], i["level"], i["success"], i["color_fraction"]) for i in instances] == [
        ("a red car", 2, True, 1.0), ("a blue dog", 2, True, 1.0), ("a green cup", 3, False, 0.0),
        ("a white cat", 3, False, None), ("a black bed", 3, False, None)]
    assert [i["counted_iou"] for i in instances] == pytest.approx([1.0, 0.8, 0.0, 0.0, 0.4])
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| L2 | 1 | 2 | 100.0 | 0.900 |" in markdown and "| overall | 2 | 5 | 40.0 | 0.440 |" in markdown
    assert markdown.count("| no layouts | no layouts |") == 3 and "the detected box (no segmenter)" in markdown
    assert f"## Missing images (1)\n\n- {images / image_name(3)}" in markdown
    with Image.open(tmp_path / "out" / "samples.png") as grid:
        assert grid.size[0] > 256

    # A lower colour fraction does not rescue the red cup (0 of its pixels are green); a segmenter's masks,
    # asked for at the layout boxes, replace the boxes' pixels: the dog's mask on grey fails it.
    no_pixels = np.zeros((40, 40), bool)
    blue = np.asarray(painted([(DOG, "blue")]))[..., 2] == SWATCHES["blue"][2]
    segmenter = GivenSegmenter({CAR: ~no_pixels, DOG: ~blue, CUP: ~no_pixels, CAT: ~no_pixels, BED: ~no_pixels})
    report = score_mig(detector, eval_set, images, tmp_path / "sam", settings=MigSettings(color_fraction=0.05),
                       segmenter=segmenter)
    assert sorted(set(segmenter.boxes)) == sorted({CAR, DOG, CUP, CAT, BED})
    # the car's mask is the whole image: a quarter red passes at 0.05; the dog's is the grey outside it
    check_levels(report, {"L2": (1, 2, 0.5, 0.5), "L3": (1, 3, 0.0, 0.4 / 3), "overall": (2, 5, 0.2, 1.4 / 5)})
    assert report["segmenter"] == "given" and report["settings"]["color_fraction"] == 0.05


def test_score_protocol_mig_end_to_end(tmp_path, gligen_dir):
    """`eval generate --mig` from a COCO file, then `eval score --protocol mig` with a tiny random Grounding DINO."""
    from tests.tiny_detector import save_tiny_detector

    annotations = write(tmp_path / "instances.json", coco([2, 3, 4, 2]))
    out = tmp_path / "run"
    status, stderr = cli("generate", "--mig", "--per-level", "1", "--annotations", str(annotations), "--model",
                         str(gligen_dir), "--size", "32", "--steps", "1", "--guidance", "1", "--out", str(out))
    assert status == 0, stderr
    layouts = load_layouts(out / "layouts.jsonl")
    assert sorted(len(layout.entities) for layout in layouts) == [2, 3, 4]  # one layout per level present
    assert all(layout.meta["mig"] and layout.prompt.startswith("a photo of a ") for layout in layouts)

    detector = save_tiny_detector(tmp_path / "detector")
    status, stderr = cli("score", "--protocol", "mig", "--annotations", str(out / "layouts.jsonl"),
                         "--detector", str(detector), "--box-threshold", "0", "--text-threshold", "0", "--color-fraction", "0.1",
                         "--out", str(out / "score"))
    assert status == 0, stderr
    report = json.loads((out / "score" / "report.json").read_text())
    instances = json.loads((out / "score" / "instances.json").read_text())
    assert len(instances) == 9 and report["num_images"] == 3 and report["settings"]["color_fraction"] == 0.1
    expected = {}
    for level in ("L2", "L3", "L4", "overall"):
        group = [i for i in instances if level == "overall" or i["level"] == int(level[1])]
        expected[level] = (len({i["image_id"] for i in group}), len(group),
                           sum(i["success"] for i in group) / len(group), sum(i["counted_iou"] for i in group) / len(group))
    check_levels(report, expected)
    for instance in instances:  # every instance found (threshold 0): its IoU decided whether its colour was checked
        assert instance["detected_box"] is not None
        assert (instance["color_fraction"] is not None) == (instance["iou"] >= 0.5)
        assert instance["success"] == (instance["iou"] >= 0.5 and instance["color_fraction"] >= 0.1)
    assert "| L5 | 0 | 0 | no layouts | no layouts |" in (out / "score" / "report.md").read_text()

    # With a SAM: the colour of each instance whose IoU passes is read on SAM's mask for its layout box.
    from detector.segment import Segmenter
    from tests.tiny_segmenter import save_tiny_sam

    sam = save_tiny_sam(tmp_path / "sam")
    status, stderr = cli("score", "--protocol", "mig", "--annotations", str(out / "layouts.jsonl"),
                         "--detector", str(detector), "--segmenter", str(sam), "--box-threshold", "0",
                         "--text-threshold", "0", "--out", str(out / "sam"))
    assert status == 0, stderr
    report = json.loads((out / "sam" / "report.json").read_text())
    assert report["segmenter"] == str(sam) and f"instance pixels: {sam}" in (out / "sam" / "report.md").read_text()
    segmenter = Segmenter.from_pretrained(str(sam))
    checked = 0
    for layout, instance_list in ((lay, [i for i in json.loads((out / "sam" / "instances.json").read_text())
                                          if i["image_id"] == lay.meta["image_id"]]) for lay in layouts):
        image = Image.open(out / image_name(layout.meta["image_id"])).convert("RGB")
        [masks] = segmenter.segment([image], [torch.tensor(layout.boxes)], multimask_output=True)
        for instance, mask in zip(instance_list, masks.numpy()):
            if instance["color_fraction"] is not None:
                fraction, _ = color_check(np.asarray(image), mask, instance["color"])
                assert instance["color_fraction"] == pytest.approx(fraction, abs=1e-6)
                checked += 1
    assert checked and checked == sum(i["iou"] >= 0.5 for i in instances)  # same detections as without SAM


@pytest.mark.parametrize("argv, message", [
    (["--color-fraction", "0.3"], "--color-fraction belongs to --protocol mig"),
    (["--protocol", "mig", "--pose-model", "x"], "--pose-model belongs to --protocol ap"),
    (["--protocol", "mig", "--captions", "c.json"], "--captions: MIG prompts are made from the instances"),
])
def test_options_of_the_other_protocol_are_refused(tmp_path, argv, message):
    layouts, images = hand_made_set(tmp_path)
    status, stderr = cli("score", "--annotations", str(layouts), *argv, "--out", str(tmp_path / "out"))
    assert status == 1 and stderr.count("\n") == 1 and message in stderr
    assert not (tmp_path / "out").exists()


def test_mig_scoring_needs_mig_layouts(tmp_path):
    plain = write(tmp_path / "instances.json", coco([2]))
    status, stderr = cli("score", "--protocol", "mig", "--annotations", str(plain), "--images", str(tmp_path),
                         "--out", str(tmp_path / "out"))
    assert status == 1 and "score the layouts.jsonl that `gligen eval generate --mig` wrote" in stderr

    layouts = tmp_path / "layouts.jsonl"
    save_layouts(layouts, [Layout("a cat", (Entity("a cat", (0, 0, 1, 1)), Entity("a dog", (0, 0, 1, 1))))])
    status, stderr = cli("score", "--protocol", "mig", "--annotations", str(layouts), "--out", str(tmp_path / "out"))
    assert status == 1 and stderr.count("\n") == 1
    assert "image_id 0: no 'mig' categories and colours in the layout; make MIG layouts with" in stderr
