"""OpenSetDetector against transformers' own Grounding DINO pipeline, on a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForZeroShotObjectDetection, GroundingDinoProcessor
from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

from detector import OpenSetDetector, box_iou, split_prompts
from detector.box_ops import batched_nms
from detector.cli import main
from detector.grounding_dino import GroundingDinoDetector
from detector.preprocess import ImageSettings, preprocess
from tests.tiny_detector import save_tiny_detector


def random_image(height: int, width: int, seed: int) -> Image.Image:
    """Smooth colour blobs plus noise, so resizing has real structure to get right."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * x + c) * np.cos(5 * y - c) for c in range(3)], -1) * 100 + 128
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # small resize settings keep the CPU forward fast; the 800/1333 resize is tested on its own below
    return save_tiny_detector(tmp_path_factory.mktemp("tiny") / "det", shortest_edge=96, longest_edge=160)


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp("tiny") / "mm", shortest_edge=96, longest_edge=160, mm=True)


@pytest.fixture(scope="module")
def detector(tiny_dir):
    return OpenSetDetector.from_pretrained(str(tiny_dir))


def test_preprocessing_equals_processor_at_800_1333():
    # portrait, landscape limited by the longest edge, tiny upscaled, already the right size
    images = [random_image(480, 360, 0), random_image(300, 1000, 1), random_image(37, 53, 2), random_image(800, 900, 3)]
    ref = GroundingDinoImageProcessorPil()(images=images, return_tensors="pt")
    ours = preprocess(images, ImageSettings(), "cpu", torch.float32)
    assert ours.pixel_values.shape == ref["pixel_values"].shape == (4, 3, 1066, 1333)
    assert torch.equal(ours.pixel_mask, ref["pixel_mask"])
    # bit-exact Pillow resize: one grey level of difference would be 1/255/0.229 = 0.017
    assert (ours.pixel_values - ref["pixel_values"]).abs().max() < 1e-5


def test_preprocessing_resizes_same_sized_images_together():
    # images of one size are resized as one batch; the others' padding and order must not change
    images = [random_image(64, 64, 6), random_image(90, 40, 7), random_image(64, 64, 8), random_image(64, 64, 9)]
    settings = ImageSettings(shortest_edge=128, longest_edge=213)
    size = {"shortest_edge": 128, "longest_edge": 213}
    ref = GroundingDinoImageProcessorPil(size=size)(images=images, return_tensors="pt")
    ours = preprocess(images, settings, "cpu", torch.float32)
    assert ours.pixel_values.shape == ref["pixel_values"].shape == (4, 3, 213, 128)
    assert torch.equal(ours.pixel_mask, ref["pixel_mask"])
    assert (ours.pixel_values - ref["pixel_values"]).abs().max() < 1e-5


def special_token_ids(tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "."]))


@pytest.mark.parametrize("family", ["grounding-dino", "mm-grounding-dino"])
def test_detections_equal_transformers_pipeline(family, request):
    """Grounding DINO and MM-Grounding-DINO (LLMDet's class too): ours equals processor + model + post-processing."""
    checkpoint = request.getfixturevalue("tiny_dir" if family == "grounding-dino" else "mm_dir")
    detector = OpenSetDetector.from_pretrained(str(checkpoint))
    assert detector.model.config.model_type == family
    images = [random_image(120, 90, 4), random_image(70, 200, 5)]
    phrases = [["a cat", "a small brown dog", "Sofa"], ["the red car", "tree"]]
    processor = GroundingDinoProcessor.from_pretrained(checkpoint)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(checkpoint).eval()
    inputs = processor(images=images, text=phrases, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    probs = out.logits.sigmoid()[:, :, : inputs["input_ids"].shape[1]]  # beyond the text: -inf logits
    threshold = float(probs.amax(-1).median())  # about half of the queries pass
    sizes = [(im.height, im.width) for im in images]
    ref = processor.post_process_grounded_object_detection(
        out, inputs["input_ids"], threshold=threshold, text_threshold=0.0, target_sizes=sizes
    )
    ours = detector.detect(images, phrases, box_threshold=threshold, text_threshold=0.0, nms_iou=None)

    special = special_token_ids(processor.tokenizer)
    compared = 0
    for b, (image, result) in enumerate(zip(images, ours)):
        ids = inputs["input_ids"][b]
        phrase_token = inputs["attention_mask"][b].bool() & ~torch.isin(ids, special)
        kept = probs[b].amax(-1) > threshold
        best_token = probs[b].argmax(-1)[kept]
        # transformers' score is the max over all tokens, [CLS]/[SEP]/"." included; ours only over
        # phrase tokens. Where a phrase token is the best, both must agree exactly.
        named = phrase_token[best_token]
        dots = (ids == special[2]).long().cumsum(0)  # phrase of a token = "." separators before it
        expected_ids = dots[best_token][named]
        w, h = image.size
        expected_boxes = (ref[b]["boxes"][named] / torch.tensor([w, h, w, h])).clamp(0, 1)  # we clip to the image
        expected_scores = ref[b]["scores"][named]
        assert len(result) == int((probs[b][:, phrase_token].amax(-1) > threshold).sum())
        assert result.image_size == (w, h)
        for box, score, pid in zip(expected_boxes, expected_scores, expected_ids):
            j = (result.boxes - box).abs().sum(-1).argmin()
            assert (result.boxes[j] - box).abs().max() < 1e-3
            assert abs(float(result.scores[j]) - float(score)) < 1e-3
            assert int(result.phrase_ids[j]) == int(pid)
            compared += 1
        assert torch.allclose(result.pixel_boxes().float(), result.boxes * torch.tensor([w, h, w, h]))
        assert result.labels == [phrases[b][i] for i in result.phrase_ids.tolist()]
        assert torch.all(result.scores[:-1] >= result.scores[1:])
    assert compared >= 10


def test_mean_phrase_score_is_mean_of_token_probabilities(detector):
    image = random_image(90, 120, 6)
    phrases = ["a small brown dog", "cat"]
    result = detector.detect(image, phrases, box_threshold=0.0, text_threshold=0.0, phrase_score="mean", nms_iou=None)[0]
    [prompt] = detector.encode_phrases(phrases)
    out = detector.forward([image], [prompt])
    probs = out.logits[0].sigmoid()
    tokens = detector.tokenizer(prompt.prompt.caption, return_offsets_mapping=True)
    # the tokens of each phrase, found from the text itself
    words = [detector.tokenizer(p, add_special_tokens=False)["input_ids"] for p in phrases]
    starts = [1, 1 + len(words[0]) + 1]
    per_phrase = torch.stack([probs[:, s : s + len(w)].mean(-1) for s, w in zip(starts, words)], -1)
    assert tokens["input_ids"][starts[1] : starts[1] + len(words[1])] == words[1]
    expected = per_phrase.max(-1).values.sort(descending=True).values
    assert len(result) == len(expected)
    assert torch.allclose(result.scores, expected, atol=1e-5)


def test_chunked_prompts_merge_like_separate_prompts(detector):
    image = random_image(100, 140, 7)
    phrases = ["a cat", "a dog", "a red car", "tree", "a tall person", "sofa", "lamp"]
    chunked = GroundingDinoDetector(detector.model, detector.tokenizer, detector.settings)
    chunked.max_tokens = 8  # forces several prompts
    prompts = split_prompts(phrases, detector.tokenizer, 8)
    assert len(prompts) >= 3
    merged = chunked.detect(image, phrases, box_threshold=0.5, nms_iou=None)[0]
    expected = []
    for prompt in prompts:
        part = detector.detect(image, [phrases[i] for i in prompt.phrase_ids], box_threshold=0.5, nms_iou=None)[0]
        for box, score, pid in zip(part.boxes, part.scores, part.phrase_ids):
            expected.append((prompt.phrase_ids[int(pid)], box, float(score)))
    assert len(merged) == len(expected) > 0
    for pid, box, score in expected:
        j = ((merged.boxes - box).abs().sum(-1) + (merged.phrase_ids != pid) * 10).argmin()
        assert int(merged.phrase_ids[j]) == pid and abs(float(merged.scores[j]) - score) < 1e-5
        assert torch.allclose(merged.boxes[j], box, atol=1e-5)


def test_many_phrases_and_per_image_lists(detector):
    names = [f"object {chr(97 + i % 26)}{chr(97 + i // 26 % 26)} thing" for i in range(1203)]  # LVIS-sized
    images = [random_image(80, 100, 8), random_image(100, 80, 9)]
    results = detector.detect(images, [names, ["a cat", "a dog"]], box_threshold=0.3)
    assert len(split_prompts(names, detector.tokenizer)) > 1
    assert results[0].phrases == names and results[1].phrases == ["a cat", "a dog"]
    assert len(results[0]) > 0 and int(results[0].phrase_ids.max()) < 1203
    assert int(results[1].phrase_ids.max()) < 2


def test_nms_removes_overlaps_within_a_phrase_only():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    classes = torch.tensor([0, 0, 1, 0])
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == [0, 2, 3]
    assert box_iou(boxes[:1], boxes[1:2]).item() == pytest.approx(81 / 100)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(tiny_dir, dtype):
    detector = OpenSetDetector.from_pretrained(str(tiny_dir), dtype=dtype)
    assert detector.dtype == dtype
    [result] = detector.detect(random_image(90, 120, 10), ["a cat", "a dog"], box_threshold=0.0)
    assert result.boxes.dtype == torch.float32 and len(result) > 0
    assert torch.isfinite(result.scores).all() and (result.boxes >= 0).all() and (result.boxes <= 1).all()


def test_cli_detect_writes_json_and_overlays(tiny_dir, tmp_path):
    paths = []
    for i, size in enumerate([(90, 120), (120, 90)]):
        paths.append(tmp_path / f"im{i}.png")
        random_image(*size, 11 + i).save(paths[-1])
    out = tmp_path / "result.json"
    code = main(["detect", *map(str, paths), "--phrases", "a cat", "a dog", "--model", str(tiny_dir),
                 "--device", "cpu", "--box-threshold", "0.3", "--out", str(out), "--overlay", str(tmp_path / "ov")])
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["image"] for r in report["images"]] == list(map(str, paths))
    first = report["images"][0]
    assert first["image_size"] == [120, 90] and first["detections"]
    assert {d["phrase"] for d in first["detections"]} <= {"a cat", "a dog"}
    with Image.open(tmp_path / "ov" / "im1.png") as overlay:
        assert overlay.size == (270, 360)  # enlarged 3 times: the shorter side reaches 256


def run_cli(args, capsys):
    """Exit code and the error lines on stderr (transformers' weight-loading progress bar aside)."""
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if "Loading weights" not in line]


def test_cli_bad_inputs(tiny_dir, tmp_path, capsys):
    good = tmp_path / "good.png"
    random_image(50, 50, 12).save(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    model = ["--model", str(tiny_dir), "--device", "cpu"]
    cases = {
        "corrupt.jpg": ["detect", str(corrupt), "--phrases", "a cat", *model],
        "missing.png": ["detect", str(tmp_path / "missing.png"), "--phrases", "a cat", *model],
        "empty": ["detect", str(good), "--phrases", *model],
        "phrase 1": ["detect", str(good), "--phrases", "a cat", " ".join(["word"] * 300), *model],
        "no config.json": ["detect", str(good), "--phrases", "a cat", "--model", str(tmp_path)],
        "not a detector": ["detect", str(good), "--phrases", "a cat", "--model", str(good)],
    }
    for needle, args in cases.items():
        code, err = run_cli(args, capsys)
        assert code == 1, needle
        assert len(err) == 1 and err[0].startswith("detector: error: "), err
        assert needle in err[0].replace("is a file, not a detector", "not a detector"), err


def test_cli_detect_over_a_directory_and_shards(tiny_dir, tmp_path):
    """A directory (or tar shards) gives one JSONL per input shard, unreadable images counted, resumable."""
    import webdataset as wds

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    pictures = {f"im{i}": random_image(60 + 10 * i, 90, 20 + i) for i in range(4)}
    for name, picture in pictures.items():
        picture.save(images / ("sub" if name == "im3" else "") / f"{name}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    model = ["--model", str(tiny_dir), "--device", "cpu", "--box-threshold", "0.3", "--workers", "1"]
    assert main(["detect", str(images), "--phrases", "a cat", "a dog", "--images-per-shard", "2",
                 "--out", str(tmp_path / "out"), *model]) == 0
    detector = OpenSetDetector.from_pretrained(str(tiny_dir))
    lines = []
    for path in sorted((tmp_path / "out").glob("detections-*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    assert len(list((tmp_path / "out").glob("detections-*.jsonl"))) == 3  # 5 files in shards of 2
    assert [line["key"] for line in lines] == ["im0", "im1", "im2", "sub/im3"]  # broken.jpg sorts first, dropped
    # each shard's readable images went through the detector as one batch: broken.jpg + im0 | im1, im2 | im3
    expected = [found for batch in (["im0"], ["im1", "im2"], ["im3"])
                for found in detector.detect([pictures[n] for n in batch], ["a cat", "a dog"], box_threshold=0.3)]
    for line, expected in zip(lines, expected):
        assert line["image_size"] == list(expected.image_size) and len(line["detections"]) == len(expected)
        assert [d["score"] for d in line["detections"]] == pytest.approx(expected.scores.tolist(), abs=1e-4)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["inputs"], summary["images"], summary["shards_done"]) == (5, 4, 3)
    assert summary["dropped"] == {"unreadable image": 1} and summary["detections"] == sum(len(x["detections"]) for x in lines)
    assert main(["detect", str(images), "--phrases", "a cat", "a dog", "--images-per-shard", "2",
                 "--out", str(tmp_path / "out"), *model]) == 0  # a rerun finds every shard done

    with wds.TarWriter(str(tmp_path / "data-000000.tar"), encoder=False) as tar:
        for name in ("im0", "im1"):
            tar.write({"__key__": name, "png": (images / f"{name}.png").read_bytes()})
    assert main(["detect", str(tmp_path / "data-{000000..000000}.tar"), "--phrases", "a cat", "a dog",
                 "--out", str(tmp_path / "tar"), *model]) == 0
    from_tar = [json.loads(line) for line in (tmp_path / "tar" / "detections-000000.jsonl").read_text().splitlines()]
    assert [x["key"] for x in from_tar] == ["im0", "im1"]
    for line, expected in zip(from_tar, detector.detect([pictures["im0"], pictures["im1"]], ["a cat", "a dog"],
                                                        box_threshold=0.3)):
        assert [d["score"] for d in line["detections"]] == pytest.approx(expected.scores.tolist(), abs=1e-4)


def test_detect_in_two_launched_processes_equals_one(tiny_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes: each detects in its own input shards; the JSONL files and the
    merged summary equal a single process's."""
    from tests.launch import accelerate_launch

    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        random_image(50 + 10 * i, 80, 40 + i).save(images / f"im{i}.png")
    args = ["detect", str(images), "--phrases", "a cat", "a dog", "--images-per-shard", "2", "--model", str(tiny_dir),
            "--device", "cpu", "--box-threshold", "0.3", "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    done = accelerate_launch("-m", "detector.cli", *args, "--out", str(tmp_path / "two"), env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 1" in done.stderr  # the second process took shards too
    one, two = (sorted(p.name for p in (tmp_path / d).glob("detections-*.jsonl")) for d in ("one", "two"))
    assert one == two == ["detections-000000.jsonl", "detections-000001.jsonl", "detections-000002.jsonl"]
    for name in one:
        a, b = ([json.loads(line) for line in (tmp_path / d / name).read_text().splitlines()] for d in ("one", "two"))
        assert [(x["key"], x["image_size"], len(x["detections"])) for x in a] == \
            [(x["key"], x["image_size"], len(x["detections"])) for x in b]
        for x, y in zip(a, b):
            assert [d["phrase"] for d in x["detections"]] == [d["phrase"] for d in y["detections"]]
            assert [d["score"] for d in x["detections"]] == pytest.approx([d["score"] for d in y["detections"]], abs=1e-5)
            assert np.allclose([d["box"] for d in x["detections"]], [d["box"] for d in y["detections"]], atol=1e-5)
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two")]
    assert {k: v for k, v in summaries[0].items() if k != "out"} == {k: v for k, v in summaries[1].items() if k != "out"}
    assert (summaries[0]["inputs"], summaries[0]["images"]) == (5, 5) and summaries[0]["detections"] > 0
