"""Segmentation: COCO RLE against pycocotools, box masks, SAM through `Segmenter` against transformers'
own way of running it, `OpenSetDetector.segment`, and `detector segment` end to end."""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as coco_mask
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import SamModel, SamProcessor

from detector import OpenSetDetector
from detector.rle import decode, encode
from detector.segment import Segmenter, box_masks
from gligen.draw import draw_masks
from gligen.errors import UserError
from tests.test_detector_detect import random_image, run_cli
from tests.tiny_detector import save_tiny_detector
from tests.tiny_segmenter import save_tiny_sam

# ----------------------------------------------------------------------------- RLE


def sample_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    masks = [rng.random((h, w)) < p for (h, w), p in [((1, 1), 0.5), ((3, 7), 0.5), ((13, 5), 0.2), ((64, 48), 0.7),
                                                      ((31, 97), 0.05), ((200, 3), 0.5)]]
    blob = np.zeros((37, 53), bool)
    blob[5:30, 10:41] = True  # long runs: counts of several characters each
    return masks + [blob, np.zeros((9, 11), bool), np.ones((9, 11), bool), np.zeros((0, 4), bool)]


def test_rle_round_trips_and_equals_pycocotools():
    for mask in sample_masks():
        rle = encode(mask)
        theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle == {"size": list(mask.shape), "counts": theirs["counts"].decode("ascii")}
        assert isinstance(rle["counts"], str) and json.loads(json.dumps(rle)) == rle  # JSON as it is
        back = decode(rle)
        assert back.dtype == bool and back.shape == mask.shape and np.array_equal(back, mask)
        assert np.array_equal(coco_mask.decode(rle).astype(bool), mask)  # pycocotools reads ours
        assert np.array_equal(decode(theirs), mask)  # and we read theirs (bytes counts)
    assert encode(np.arange(12).reshape(3, 4) % 3 == 0) == encode((np.arange(12).reshape(3, 4) % 3 == 0).astype(np.uint8))


def test_rle_reads_uncompressed_counts():
    mask = np.zeros((3, 4), bool)
    mask[1, 1:3] = True  # column-major: 4 zeros, 1 one, 2 zeros, 1 one, 4 zeros
    assert np.array_equal(decode({"size": [3, 4], "counts": [4, 1, 2, 1, 4]}), mask)
    assert decode({"size": [3, 4], "counts": [4, 1, 2, 1, 4]}).tolist() == coco_mask.decode(
        coco_mask.frPyObjects({"size": [3, 4], "counts": [4, 1, 2, 1, 4]}, 3, 4)).astype(bool).tolist()


@pytest.mark.parametrize("record, needle", [
    ({"size": [4, 5]}, "not a COCO RLE mask"),
    ({"counts": "92203"}, "not a COCO RLE mask"),
    ({"size": [4, 5], "counts": 3}, "must be a string or a list of run lengths, not int"),
    ({"size": [4, 5], "counts": "5"}, "do not describe a 4x5 mask"),
    ({"size": [4, 5], "counts": "\u00e9"}, "do not describe a 4x5 mask"),
    ({"size": [4, 5], "counts": [5, 2, 2]}, "runs add up to 9 pixels, the size says 20"),
    ({"size": [4, 5], "counts": [-1, 21]}, "non-negative integers"),
    ({"size": [-4, 5], "counts": ""}, "negative"),
])
def test_rle_bad_records(record, needle):
    with pytest.raises(UserError, match=needle):
        decode(record)


# ----------------------------------------------------------------------------- box masks


def overlap_reference(box: list[float], width: int, height: int) -> np.ndarray:
    """Pixel by pixel: does the unit square of pixel (x, y) overlap the box by a positive area?"""
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    return np.array([[min(x + 1, x1) - max(x, x0) > 0 and min(y + 1, y1) - max(y, y0) > 0 for x in range(width)]
                     for y in range(height)])


def test_box_masks():
    masks = box_masks(torch.tensor([[0.25, 0.5, 0.75, 1.0], [0.3, 0.0, 0.31, 0.2], [0.0, 0.0, 1.0, 1.0]]), (4, 2))
    assert masks.dtype == torch.bool and masks.shape == (3, 2, 4)
    assert masks[0].int().tolist() == [[0, 0, 0, 0], [0, 1, 1, 0]]
    assert masks[1].int().tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]  # thinner than a pixel: still its pixel
    assert masks[2].all()
    rng = np.random.default_rng(1)
    for width, height in [(17, 9), (8, 31), (1, 1)]:
        corners = np.sort(rng.random((20, 2, 2)), axis=1)  # (x0, x1) and (y0, y1) sorted
        boxes = torch.tensor(np.stack([corners[:, 0, 0], corners[:, 0, 1], corners[:, 1, 0], corners[:, 1, 1]], 1),
                             dtype=torch.float32)
        masks = box_masks(boxes, (width, height))
        assert masks.shape == (20, height, width)
        for box, mask in zip(boxes.double().tolist(), masks):
            assert np.array_equal(mask.numpy(), overlap_reference(box, width, height))
    assert box_masks(torch.zeros(0, 4), (5, 3)).shape == (0, 3, 5)


def test_draw_masks_tints_only_inside():
    image = Image.new("RGB", (6, 4), (100, 100, 100))
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    pixels = np.asarray(draw_masks(image, [mask], colors=[(200, 0, 50)], alpha=0.5))
    assert (pixels[mask] == [150, 50, 75]).all() and (pixels[~mask] == 100).all()
    with pytest.raises(ValueError, match="mask 0 is 5x4, the image 6x4"):
        draw_masks(image, [np.zeros((4, 5), bool)])


# ----------------------------------------------------------------------------- SAM


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("sam") / "sam")


@pytest.fixture(scope="module")
def segmenter(sam_dir):
    return Segmenter.from_pretrained(str(sam_dir))


@pytest.fixture(scope="module")
def det_dir(tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp("det") / "det", shortest_edge=64, longest_edge=96)


IMAGES = [random_image(50, 90, 0), random_image(40, 30, 1), random_image(64, 64, 2), random_image(33, 70, 3)]
BOXES = [torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.3, 0.2, 0.9, 0.9], [0.0, 0.5, 0.2, 1.0]]), torch.zeros(0, 4),
         torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.6, 0.1, 0.95, 0.4], [0.2, 0.3, 0.5, 0.7]])]


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return 1.0 if a.numel() == 0 else (a == b).float().mean().item()


def transformers_reference(sam_dir, image: Image.Image, boxes: torch.Tensor, multimask: bool) -> torch.Tensor:
    """SAM run as transformers' model card runs it: one image, its boxes in pixels, post_process_masks."""
    model, processor = SamModel.from_pretrained(sam_dir).eval(), SamProcessor.from_pretrained(sam_dir)
    w, h = image.size
    inputs = processor(images=image, input_boxes=[(boxes * torch.tensor([w, h, w, h])).tolist()], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, multimask_output=multimask)
    masks = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
    best = outputs.iou_scores[0].argmax(-1)  # (K,): with one mask per box, always 0
    return masks[torch.arange(len(boxes)), best]


def test_segmenter_shapes_and_batching(segmenter):
    masks = segmenter.segment(IMAGES, BOXES, batch_size=3)
    assert [m.shape for m in masks] == [(3, 50, 90), (0, 40, 30), (1, 64, 64), (2, 33, 70)]
    assert all(m.dtype == torch.bool and m.device.type == "cpu" for m in masks)
    assert 0.05 < torch.cat([m.flatten() for m in masks]).float().mean() < 0.999  # masks, not one value everywhere
    # batches (padded to the most boxes) give what one image at a time gives; different batch shapes may
    # round differently in the last bit, which can flip a pixel whose logit is within that of 0
    for image, boxes, batched in zip(IMAGES, BOXES, masks):
        [alone] = segmenter.segment([image], [boxes])
        assert alone.shape == batched.shape and agreement(alone, batched) > 0.999
    assert all(agreement(a, b) > 0.999 for a, b in zip(segmenter.segment(IMAGES, BOXES, batch_size=1), masks))
    assert segmenter.segment([IMAGES[1]], [torch.zeros(0, 4)])[0].shape == (0, 40, 30)


@pytest.mark.parametrize("multimask", [False, True])
def test_segmenter_equals_transformers(sam_dir, segmenter, multimask):
    masks = segmenter.segment(IMAGES, BOXES, multimask_output=multimask)
    for image, boxes, ours in zip(IMAGES, BOXES, masks):
        if len(boxes):
            assert agreement(ours, transformers_reference(sam_dir, image, boxes, multimask)) > 0.999
    assert any(agreement(a, b) < 0.99 for a, b in zip(masks, segmenter.segment(IMAGES, BOXES, multimask_output=not multimask)))


def test_segmenter_half_precision(sam_dir, segmenter):
    half = Segmenter.from_pretrained(str(sam_dir), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.model.vision_encoder.patch_embed.projection.weight.dtype == torch.bfloat16
    for a, b in zip(half.segment(IMAGES, BOXES), segmenter.segment(IMAGES, BOXES)):
        assert a.shape == b.shape and a.dtype == torch.bool and agreement(a, b) > 0.9


def test_segmenter_refuses_what_is_not_sam(det_dir, segmenter, tmp_path):
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"x")
    cases = {str(file): "is a file, not a SAM checkpoint directory",
             str(tmp_path): "has no config.json, so it is no SAM checkpoint directory",
             str(det_dir): "model_type 'grounding-dino' is no SAM checkpoint"}
    for path, needle in cases.items():
        with pytest.raises(UserError, match=needle):
            Segmenter.from_pretrained(path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load a SAM checkpoint"):
        Segmenter.from_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="got 1 box tensors for 2 images"):
        segmenter.segment(IMAGES[:2], BOXES[:1])


# ----------------------------------------------------------------------------- OpenSetDetector.segment


def test_detector_segment_masks_and_json(det_dir, segmenter):
    detector = OpenSetDetector.from_pretrained(str(det_dir))
    images = IMAGES[:2]
    plain = detector.detect(images, ["a cat", "a dog"], box_threshold=0.3)
    boxed = detector.segment(images, ["a cat", "a dog"], box_threshold=0.3)
    sam = detector.segment(images, ["a cat", "a dog"], segmenter, box_threshold=0.3)
    assert plain[0].masks is None and len(plain[0]) > 0
    for p, b, s, image in zip(plain, boxed, sam, images):
        assert torch.equal(b.boxes, p.boxes) and torch.equal(s.boxes, p.boxes) and torch.equal(s.scores, p.scores)
        assert torch.equal(b.masks, box_masks(p.boxes, image.size))
        assert s.masks.shape == (len(p), image.height, image.width)
        assert agreement(s.masks, segmenter.segment([image], [p.boxes])[0]) > 0.999
        record = s.to_dict()
        assert "segmentation" not in json.dumps(p.to_dict())
        assert len(record["detections"]) == len(s)
        for detection, mask in zip(record["detections"], s.masks):
            assert np.array_equal(decode(detection["segmentation"]), mask.numpy())
        for result, mask in zip(s.to_coco(1, [3, 4]), s.masks):
            assert np.array_equal(coco_mask.decode(result["segmentation"]).astype(bool), mask.numpy())


# ----------------------------------------------------------------------------- detector segment


def png_mask(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        pixels = np.asarray(image)
    assert set(np.unique(pixels).tolist()) <= {0, 255}
    return pixels == 255


def test_cli_segment_writes_masks_json_and_overlays(det_dir, sam_dir, tmp_path, capsys):
    paths = [tmp_path / "wide.png", tmp_path / "tall.jpg"]
    IMAGES[0].save(paths[0])
    IMAGES[3].transpose(Image.Transpose.TRANSPOSE).save(paths[1], quality=95)
    out = tmp_path / "out"
    common = ["segment", *map(str, paths), "--phrases", "a cat", "a dog", "--model", str(det_dir), "--device", "cpu",
              "--out", str(out)]
    code, err = run_cli([*common, "--segmenter", str(sam_dir), "--box-threshold", "0.3"], capsys)
    assert code == 0, err
    for path, (width, height) in zip(paths, [(90, 50), (33, 70)]):
        stem = path.stem
        report = json.loads((out / f"{stem}.json").read_text())
        assert report["image"] == str(path) and report["segmenter"] == str(sam_dir) and report["model"] == str(det_dir)
        assert report["image_size"] == [width, height] and report["phrases"] == ["a cat", "a dog"]
        assert len(report["detections"]) > 0
        for k, detection in enumerate(report["detections"]):
            assert detection["mask_file"] == f"{stem}.{k}.png"
            mask = png_mask(out / detection["mask_file"])
            assert mask.shape == (height, width) and np.array_equal(decode(detection["segmentation"]), mask)
        assert not (out / f"{stem}.{len(report['detections'])}.png").exists()
        with Image.open(out / f"{stem}.overlay.png") as overlay:
            assert overlay.mode == "RGB" and overlay.width / overlay.height == pytest.approx(width / height, rel=0.05)
    # the same run without a segmenter: box masks, and the masks of the first run beyond its count are gone
    before = len(json.loads((out / "wide.json").read_text())["detections"])
    code, err = run_cli([*common, "--box-threshold", "0.5"], capsys)
    assert code == 0 and err[0].startswith("note: no --segmenter"), err
    report = json.loads((out / "wide.json").read_text())
    assert report["segmenter"] == "boxes" and len(report["detections"]) < before
    for k, detection in enumerate(report["detections"]):
        expected = box_masks(torch.tensor([detection["box"]]), (90, 50))[0].numpy()
        assert np.array_equal(png_mask(out / f"wide.{k}.png"), expected)
    assert sorted(p.name for p in out.glob("wide.*.png")) == sorted(
        [f"wide.{k}.png" for k in range(len(report["detections"]))] + ["wide.overlay.png"])
    assert not list(out.glob(".*.tmp"))


def test_cli_segment_demo_uses_box_masks(tmp_path, capsys):
    image = Image.new("RGB", (32, 32), (128, 128, 128))  # the demo world: coloured shapes on grey
    draw = ImageDraw.Draw(image)
    draw.ellipse([3, 3, 14, 14], fill=(220, 30, 30))
    draw.rectangle([18, 18, 29, 29], fill=(30, 60, 220))
    image.save(tmp_path / "shapes.png")
    code, err = run_cli(["segment", str(tmp_path / "shapes.png"), "--phrases", "a red circle", "a blue square",
                         "--model", "demo", "--device", "cpu", "--box-threshold", "0.2", "--out", str(tmp_path / "out")],
                        capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "shapes.json").read_text())
    assert report["segmenter"] == "boxes" and report["model"] == "demo"
    found = {d["phrase"]: d for d in report["detections"]}
    assert set(found) == {"a red circle", "a blue square"}
    assert found["a red circle"]["box"][2] < 0.5 < found["a blue square"]["box"][0]
    for detection in report["detections"]:
        expected = box_masks(torch.tensor([detection["box"]]), (32, 32))[0].numpy()
        assert np.array_equal(decode(detection["segmentation"]), expected)
        assert np.array_equal(png_mask(tmp_path / "out" / detection["mask_file"]), expected)


def test_cli_segment_errors(det_dir, sam_dir, tmp_path, capsys):
    good = tmp_path / "good.png"
    random_image(40, 40, 6).save(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    model = ["--model", str(det_dir), "--device", "cpu", "--out", str(out)]
    cases = {
        "corrupt.jpg: cannot read the image": ["segment", str(corrupt), "--phrases", "a cat", *model],
        "missing.png: image not found": ["segment", str(tmp_path / "missing.png"), "--phrases", "a cat", *model],
        f"{det_dir}: model_type 'grounding-dino' is no SAM checkpoint":
            ["segment", str(good), "--phrases", "a cat", "--segmenter", str(det_dir), *model],
        f"{tmp_path}: has no config.json, so it is no SAM checkpoint directory":
            ["segment", str(good), "--phrases", "a cat", "--segmenter", str(tmp_path), *model],
        f"{sam_dir}: model_type 'sam' is no": ["segment", str(good), "--phrases", "a cat", "--model", str(sam_dir),
                                               "--segmenter", str(sam_dir), "--out", str(out)],
        "--phrases: phrase 1 is empty": ["segment", str(good), "--phrases", "a cat", " ", "--segmenter", str(sam_dir), *model],
    }
    for needle, args in cases.items():
        code, err = run_cli(args, capsys)
        assert code == 1, needle
        assert len(err) == 1 and err[0].startswith("detector: error: ") and needle in err[0], err
        assert not out.exists() or not any(out.iterdir()), needle


def test_sam2_without_its_image_processor_is_one_line(tmp_path):
    """SAM 2's image processor needs torchvision; where it is missing, loading says so in one line."""
    import importlib.util

    from transformers import Sam2Config

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: SAM 2's processor loads")
    Sam2Config().save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Sam2Processor", "image_processor": {"image_processor_type": "Sam2ImageProcessor"}}))
    with pytest.raises(UserError, match=f"{tmp_path}: cannot load the segmenter .*torchvision"):
        Segmenter.from_pretrained(str(tmp_path))
