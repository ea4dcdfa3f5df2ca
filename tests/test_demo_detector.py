"""The demo detector: its shapes tokenizer, its size, and its training script end to end on a few images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors import safe_open
from transformers import BertTokenizerFast, MMGroundingDinoForObjectDetection
from transformers.models.mm_grounding_dino.modeling_mm_grounding_dino import SPECIAL_TOKENS

from detector.detect import OpenSetDetector
from detector.detections import Detections
from detector.model import load_detector
from detector.train import CaptionedExamples, CocoDetection, collate, model_inputs, training_settings
from gligen.data.shapes import categories, render, sample_scene
from gligen.demo import train_detector
from gligen.demo.detector_model import MAX_TEXT_TOKENS, build_tokenizer, demo_config, minilm_vocab_file
from gligen.layout import Entity, Layout

STEPS = 24


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizerFast:
    return build_tokenizer()


def test_tokenizer_keeps_bert_separator_ids_and_knows_every_caption_word(tokenizer):
    # transformers' Grounding DINO splits phrases at these hard-coded BERT ids: [CLS] [SEP] . ?
    assert tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?", "[PAD]"]) == [*SPECIAL_TOKENS, 0]
    bert = BertTokenizerFast(str(minilm_vocab_file()))
    captions = [render(sample_scene(7, i))[1].prompt for i in range(40)] + [c["name"] for c in categories()]
    for caption in captions:
        # the same wordpieces as BERT-uncased, and none of them unknown
        assert tokenizer.tokenize(caption) == bert.tokenize(caption)
        assert tokenizer.unk_token_id not in tokenizer(caption)["input_ids"]
    assert tokenizer.tokenize("a zebra") == ["a", "[UNK]"]
    # all 48 categories do not fit in one training caption: negatives are a random subset
    assert sum(len(tokenizer.tokenize(c["name"])) + 1 for c in categories()) + 2 > MAX_TEXT_TOKENS


def test_demo_config_is_small():
    config = demo_config()
    assert config.text_config.vocab_size == len(build_tokenizer()) == 1030
    parameters = sum(p.numel() for p in MMGroundingDinoForObjectDetection(config).parameters())
    assert parameters < 3.5e6  # at most 7 MB in fp16, the bundle's share for the detector


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; each run is a new "process"."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def fixed_batch_loss(model_dir: Path, data: Path) -> float:
    """transformers' loss of a detector on every training image with fixed captions, eval mode."""
    model, tokenizer, settings = load_detector(str(model_dir))
    examples = CaptionedExamples(CocoDetection(data / "images", data / "instances.json"), tokenizer, seed=123,
                                 max_tokens=model.config.max_text_len)
    batch = collate([examples[p] for p in range(len(examples.coco.items))])
    with torch.no_grad():
        return model(**model_inputs(batch, tokenizer, training_settings(settings, 128), "cpu")).loss.item()


def test_train_detector_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--n-train", "8", "--n-eval", "4", "--steps", str(STEPS), "--minutes", "30",
            "--batch-size", "2", "--lr", "3e-4", "--workers", "0", "--save-every", "12", "--resume"]
    with pytest.raises(SystemExit) as exit:
        train_detector.main(args)  # --resume with nothing to resume starts the run, as train_base's does
    assert exit.value.code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # the calibration measured a step time; 30 minutes fit all --steps
    assert "steps fit in the 30.0 minute budget" in capsys.readouterr().out
    assert not (out / "calibration").exists()
    assert metrics["steps"] == STEPS and json.loads((out / "plan.json").read_text())["steps"] == STEPS
    assert metrics["eval_images"] == 4 and metrics["train_images"] == 8
    assert metrics["command"] == "python -m gligen.demo.train_detector " + " ".join(args)
    assert 0 <= metrics["AP50"] <= 1 and 0 <= metrics["instance_success_rate"] <= 1
    assert metrics["parameters"] == sum(p.numel() for p in load_detector(str(out / "initial"))[0].parameters())
    # the held-out images are other scenes than the training ones
    train_gt = json.loads((out / "data" / "train" / "instances.json").read_text())
    heldout_gt = json.loads((out / "data" / "heldout" / "instances.json").read_text())
    assert [i["caption"] for i in heldout_gt["images"]] != [i["caption"] for i in train_gt["images"][:4]]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["metrics"]["AP50"] == metrics["AP50"] and report["mode"] == "real images"

    # training learned: transformers' loss on the training images fell
    before = fixed_batch_loss(out / "initial", out / "data" / "train")
    after = fixed_batch_loss(out / "run" / "model", out / "data" / "train")
    assert after < 0.9 * before, (before, after)  # 44.3 -> 36.3 on the machine this was written on

    # the bundled form: fp16 safetensors, 5-6 MB, loaded by the detector's own entry point, detecting
    with safe_open(out / "model" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float16}
    assert metrics["model_mb"] < 8
    detector = OpenSetDetector.from_pretrained(str(out / "model"))
    assert detector.dtype == torch.float32 and detector.max_tokens == MAX_TEXT_TOKENS
    # its default thresholds are the calibrated ones its config.json names
    config = json.loads((out / "model" / "config.json").read_text())
    assert metrics["threshold"] in train_detector.THRESHOLDS and 0 <= metrics["calibration_f1"] <= 1
    assert config["box_threshold"] == config["text_threshold"] == metrics["threshold"]
    assert detector.default_box_threshold == detector.default_text_threshold == metrics["threshold"]
    assert detector.settings.shortest_edge == 128
    image = render(sample_scene(1, 0))[0]
    found = detector.detect(image, ["a red circle", "a blue star"], box_threshold=0.0, text_threshold=0.0)[0]
    assert len(found) > 0 and set(found.labels) <= {"a red circle", "a blue star"}
    assert found.boxes.min() >= 0 and found.boxes.max() <= 1

    # without --resume a finished run is not trained over
    with pytest.raises(SystemExit) as exit:
        train_detector.main([arg for arg in args if arg != "--resume"])
    assert exit.value.code == 1
    assert capsys.readouterr().err.strip().endswith(f"{out} holds a previous run; pass --resume to continue it or use an empty --out")
    # --resume keeps the data and the plan (no new calibration, the planned steps) and finds the run done
    mtime = (out / "data" / "train" / "instances.json").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit:
        train_detector.main([*args, "--steps", "100", "--resume"])
    assert exit.value.code == 0 and "calibration" not in capsys.readouterr().out
    assert (out / "data" / "train" / "instances.json").stat().st_mtime_ns == mtime
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["steps"] == STEPS and resumed["final_loss"] is None and resumed["AP50"] == metrics["AP50"]


def test_detection_f1_matches_phrase_and_box_once_best_first():
    """F1 of the detections above a threshold, each right when it takes a free true box of its phrase at IoU 0.5."""
    layout = Layout("", (Entity("a red star", (0.0, 0.0, 0.5, 0.5)), Entity("a red star", (0.5, 0.5, 1.0, 1.0)),
                         Entity("a blue ring", (0.5, 0.0, 1.0, 0.5))), width=64, height=64)
    found = Detections(
        boxes=torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.02, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], [0.5, 0.5, 1.0, 1.0]]),
        scores=torch.tensor([0.9, 0.6, 0.4, 0.1]), phrase_ids=torch.tensor([0, 0, 0, 0]),
        phrases=["a red star", "a blue ring"], image_size=(64, 64))

    def f1(threshold):
        return train_detector.detection_f1([layout], [found], threshold)

    assert f1(0.95) == 0  # nothing kept
    assert f1(0.8) == 2 * 1 / (1 + 3)  # the first red star, right
    assert f1(0.5) == 2 * 1 / (2 + 3)  # the duplicate of that box finds its true box taken
    assert f1(0.3) == 2 * 1 / (3 + 3)  # "a red star" where the blue ring is: wrong phrase
    assert f1(0.0) == 2 * 2 / (4 + 3)  # the second red star


def test_thresholds_in_a_checkpoint_config_are_its_defaults_and_checked(tmp_path):
    from gligen.demo import MODELS_DIR
    from gligen.errors import UserError

    for value, expected in ((0.3, 0.3), (None, 0.35)):
        model = tmp_path / f"detector-{value}"
        shutil.copytree(MODELS_DIR / "detector", model)
        config = json.loads((model / "config.json").read_text())
        config.pop("box_threshold", None)
        if value is not None:
            config["box_threshold"] = value
        (model / "config.json").write_text(json.dumps(config))
        assert OpenSetDetector.from_pretrained(str(model)).default_box_threshold == expected  # else the family's
    config["box_threshold"] = "high"
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config.json's 'box_threshold' must be a number in \[0, 1\], got 'high'"):
        OpenSetDetector.from_pretrained(str(model))
