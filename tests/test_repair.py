"""Self-repairing generation (`gligen generate --repair N`, gligen/repair.py) on tiny models.

The rounds are replayed here from their record (the same pipeline calls and detector), so every
recorded score is checked against the image it describes. Where a test needs entities to pass or fail
at will, a scripted detector answers (`ScriptedDetector`); the painting is always the real pipeline's.
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from detector.detections import Detections
from detector.verify import distinct_phrases, verify_batch
from gligen.generate import Candidate
from gligen.layout import Layout
from gligen.masks import DEFAULT_FEATHER, box_pixels, feather_weights
from gligen.pipeline import GligenPipeline
from gligen.repair import repair
from tests.test_generate_cli import CAT, DOG, LAYOUT, gligen_cli
from tests.test_generate_cli import write_jsonl as write_layouts
from tests.tiny import save_tiny_gligen, tiny_components, tiny_unet

STEPS = 2  # gligen_cli's --steps
CALL = dict(num_inference_steps=STEPS, guidance_scale=7.5, schedule=None, max_entities=30, progress=False)
REPAINT = dict(CALL, keep_outside=True)  # a round's own settings on top of generation's


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    from tests.tiny_detector import save_tiny_detector

    return save_tiny_detector(tmp_path_factory.mktemp("detector") / "tiny", shortest_edge=96, longest_edge=160)


@pytest.fixture(scope="module")
def detector(detector_dir):
    from detector.detect import OpenSetDetector

    return OpenSetDetector.from_pretrained(str(detector_dir))


@pytest.fixture(scope="module")
def pipe(gligen_dir):
    return GligenPipeline.from_pretrained(str(gligen_dir))


@pytest.fixture(scope="module")
def inpainting_bases(tmp_path_factory):
    """Repair models with a 9-channel inpainting UNet: a plain SD inpainting pipeline (no adapter: it takes the
    generating model's) and a GLIGEN inpainting pipeline (its own adapter)."""
    root = tmp_path_factory.mktemp("inpainting")
    plain = StableDiffusionInpaintPipeline(**tiny_components(root / "_build", tiny_unet(in_channels=9)),
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    plain.save_pretrained(root / "sd-inpainting")
    return {"sd-inpainting": root / "sd-inpainting", "gligen-inpainting": save_tiny_gligen(root, in_channels=9)[1]}


def replay(record, painter, detector, generator_pipe, iou_threshold):
    """Each recorded round remade as `--repair` makes it: round 0 generated, round r the failed entities of its
    source round repainted with its seed, the rest kept; each verified against the whole layout.
    -> [(image, Verification)]"""
    layout = Layout.from_dict(record["layout"])
    rounds = []
    for entry in record["repair"]["rounds"]:
        if entry["round"] == 0:
            [image] = generator_pipe(layout, **CALL).images
        else:
            entities = tuple(layout.entities[i] for i in entry["repainted"])
            part = replace(layout, entities=entities, seed=entry["seed"])
            [image] = painter(part, inpaint_image=rounds[entry["source"]][0], **REPAINT).images
        [check] = verify_batch(detector, [image], [layout], iou_threshold)
        rounds.append((image, check))
    return rounds


def check_rounds(record, rounds_asked: int):
    """The rules every record obeys: seeds, sources, what was repainted, when rounds stop, the image kept."""
    seed, rounds = record["seed"], record["repair"]["rounds"]
    score = lambda r: (r["success_rate"], r["mean_iou"])  # noqa: E731
    failed = lambda r: [i for i, e in enumerate(r["entities"]) if not e["success"]]  # noqa: E731
    assert rounds[0] == {**rounds[0], "round": 0, "seed": seed, "repainted": [], "source": None, "unet_calls": STEPS}
    for index, entry in enumerate(rounds[1:], 1):
        earlier = rounds[:index]
        best = max(range(index), key=lambda r: score(earlier[r]))  # the first of equals
        assert entry["round"] == index and entry["seed"] == seed + index and entry["unet_calls"] == STEPS
        assert entry["source"] == best and entry["repainted"] == failed(earlier[best]) != []
    kept = max(range(len(rounds)), key=lambda r: score(rounds[r]))
    assert record["repair"]["kept"] == kept
    assert len(rounds) == rounds_asked + 1 or not failed(rounds[kept])  # early stop only when all pass
    assert score(rounds[kept]) >= score(rounds[0])
    assert record["verification"] == {k: rounds[kept][k] for k in ("success_rate", "mean_iou", "entities")}
    assert record["repair"]["unet_calls"] == STEPS * (len(rounds) - 1)
    assert record["unet_calls"] == STEPS * (record["settings"]["best_of"] + len(rounds) - 1)


# --- the command ---


def test_repair_records_every_round_and_keeps_the_best(gligen_dir, detector_dir, detector, pipe, tmp_path):
    out = tmp_path / "out"
    assert gligen_cli("--model", gligen_dir, "--layout", write_layouts(tmp_path / "r.jsonl", LAYOUT), "--out", out,
                      "--repair", 3, "--detector", detector_dir, "--overlay") == 0
    record = json.loads((out / "r.json").read_text())
    assert record["settings"]["repair"] == 3 and record["settings"]["repair_model"] is None
    rounds = record["repair"]["rounds"]
    assert len(rounds) == 4 and all(r["entities"] for r in rounds)  # the tiny detector fails them: all rounds run
    check_rounds(record, 3)
    remade = replay(record, pipe, detector, pipe, 0.5)
    for entry, (image, check) in zip(rounds, remade):
        assert {k: entry[k] for k in ("success_rate", "mean_iou", "entities")} == check.to_dict()
    kept_image = remade[record["repair"]["kept"]][0]
    assert np.array_equal(np.asarray(Image.open(out / "r.png")), np.asarray(kept_image))
    first, second = (np.asarray(remade[i][0], dtype=np.int16) for i in (0, 1))
    assert np.abs(first - second).max() > 0  # a round repaints something
    assert (out / "r.overlay.png").is_file()


@pytest.mark.parametrize("seed, iou_threshold", [(0, 0.05), (7, 0.05), (11, 0.5)])
def test_the_image_kept_never_scores_below_the_first(gligen_dir, detector_dir, tmp_path, seed, iou_threshold):
    out = tmp_path / "out"
    assert gligen_cli("--model", gligen_dir, "--layout", write_layouts(tmp_path / "s.jsonl", LAYOUT), "--out", out,
                      "--repair", 3, "--seed", seed, "--detector", detector_dir, "--iou-threshold", iou_threshold) == 0
    check_rounds(json.loads((out / "s.json").read_text()), 3)


def test_repair_starts_from_the_best_of_choice(gligen_dir, detector_dir, tmp_path):
    out = tmp_path / "out"
    assert gligen_cli("--model", gligen_dir, "--layout", write_layouts(tmp_path / "b.jsonl", LAYOUT), "--out", out,
                      "--best-of", 3, "--repair", 1, "--seed", 20, "--detector", detector_dir,
                      "--iou-threshold", 0.1) == 0
    record = json.loads((out / "b.json").read_text())
    candidates = record["candidates"]
    chosen = max(candidates, key=lambda c: (c["success_rate"], c["mean_iou"]))
    first = record["repair"]["rounds"][0]
    assert record["seed"] == chosen["seed"] == first["seed"]
    assert (first["success_rate"], first["mean_iou"]) == (chosen["success_rate"], chosen["mean_iou"])
    assert record["unet_calls"] == STEPS * 3 + record["repair"]["unet_calls"]
    check_rounds(record, 1)


@pytest.mark.parametrize("kind", ["sd-inpainting", "gligen-inpainting"])
def test_a_repair_model_repaints_loaded_once(gligen_dir, detector_dir, detector, pipe, inpainting_bases, tmp_path,
                                             monkeypatch, kind):
    loads = []
    real = GligenPipeline.from_pretrained.__func__

    def counted(cls, model, *args, **kwargs):
        loads.append(str(model))
        return real(cls, model, *args, **kwargs)

    monkeypatch.setattr(GligenPipeline, "from_pretrained", classmethod(counted))
    out, model = tmp_path / "out", inpainting_bases[kind]
    layouts = write_layouts(tmp_path / "m.jsonl", LAYOUT, {**LAYOUT, "seed": 4})
    assert gligen_cli("--model", gligen_dir, "--layout", layouts, "--out", out, "--repair", 1,
                      "--repair-model", model, "--detector", detector_dir) == 0
    assert loads == [str(gligen_dir), str(model)]
    monkeypatch.undo()

    painter = GligenPipeline.from_pretrained(str(model))
    if kind == "sd-inpainting":
        assert painter.adapter is None
        painter.set_adapter(GligenPipeline.from_pretrained(str(gligen_dir)).adapter)  # the generating model's
    assert painter.inpaints and painter.adapter is not None
    for name in ("m_0000", "m_0001"):
        record = json.loads((out / f"{name}.json").read_text())
        assert record["settings"]["repair_model"] == str(model)
        check_rounds(record, 1)
        remade = replay(record, painter, detector, pipe, 0.5)
        for entry, (_, check) in zip(record["repair"]["rounds"], remade):
            assert {k: entry[k] for k in ("success_rate", "mean_iou", "entities")} == check.to_dict()
        assert np.array_equal(np.asarray(Image.open(out / f"{name}.png")), np.asarray(remade[record["repair"]["kept"]][0]))
        # the repair model, not the generating one, made round 1
        layout = Layout.from_dict(record["layout"])
        entry = record["repair"]["rounds"][1]
        part = replace(layout, entities=tuple(layout.entities[i] for i in entry["repainted"]), seed=entry["seed"])
        [by_generator] = pipe(part, inpaint_image=remade[0][0], **REPAINT).images
        assert not np.array_equal(np.asarray(by_generator), np.asarray(remade[1][0]))


# --- the rounds, with a detector whose answers the test chooses ---


class ScriptedDetector:
    """Finds phrases where a script says: each `detect` call takes the script's next answer, per image a list of
    boxes, one per distinct phrase of its layout (None: not found)."""

    takes_exemplars = False

    def __init__(self, *answers):
        self.answers = list(answers)

    def detect(self, images, phrases, exemplars=None, box_threshold=None, text_threshold=None):
        answer = self.answers.pop(0)
        assert len(answer) == len(images)
        found = []
        for image, names, boxes in zip(images, phrases, answer):
            ids = [i for i, box in enumerate(boxes) if box is not None]
            found.append(Detections(torch.tensor([boxes[i] for i in ids], dtype=torch.float32).reshape(-1, 4),
                                    torch.full((len(ids),), 0.9), torch.tensor(ids, dtype=torch.int64),
                                    list(names), image.size))
        return found


SHIFT = 0.3  # moves a box far enough to fail at IoU 0.5


def shifted(box, by=SHIFT):
    return [box[0] + by, box[1], box[2] + by, box[3]]


def first_candidate(pipe, detector, layout):
    [image] = pipe(layout, **CALL).images
    [check] = verify_batch(detector, [image], [layout])
    return Candidate(layout, image, check, unet_calls=STEPS)


def test_rounds_stop_once_every_entity_passes(pipe):
    layout = Layout.from_dict(LAYOUT)
    assert distinct_phrases(layout) == ["a cat", "a dog"]
    detector = ScriptedDetector([[CAT["box"], None]],  # round 0: the dog is missing
                                [[CAT["box"], DOG["box"]]])  # round 1: both found
    start = first_candidate(pipe, detector, layout)
    [result] = repair(pipe, detector, [start], 5, CALL)
    assert len(result.rounds) == 2 and detector.answers == []  # no third round was asked for
    assert result.rounds[1].repainted == (1,) and result.rounds[1].seed == layout.seed + 1
    assert result.kept == 1 and result.failed == () and result.unet_calls == STEPS
    [expected] = pipe(replace(layout, entities=layout.entities[1:], seed=layout.seed + 1), inpaint_image=start.image,
                      **REPAINT).images
    repainted = np.asarray(result.rounds[1].candidate.image)
    assert np.array_equal(repainted, np.asarray(expected))
    # every pixel farther than the feather from the dog's box is the first image's, exactly
    outside = feather_weights(box_pixels(DOG["box"], layout.width, layout.height), DEFAULT_FEATHER).numpy() == 0
    assert 0 < outside.sum() < outside.size
    assert np.array_equal(repainted[outside], np.asarray(start.image)[outside])
    assert not np.array_equal(repainted[~outside], np.asarray(start.image)[~outside])


def test_a_worse_round_is_not_kept_and_the_next_repaints_the_best(pipe):
    layout = Layout.from_dict(LAYOUT)
    detector = ScriptedDetector([[CAT["box"], None]],  # round 0: 1 of 2, mean IoU 0.5
                                [[shifted(CAT["box"]), None]],  # round 1: 0 of 2, worse
                                [[CAT["box"], shifted(DOG["box"], 0.05)]])  # round 2: 2 of 2
    start = first_candidate(pipe, detector, layout)
    [result] = repair(pipe, detector, [start], 2, CALL)
    scores = [r.candidate.score for r in result.rounds]
    assert scores[0] == (0.5, 0.5) and scores[1][0] == 0.0 and scores[2][0] == 1.0
    assert result.rounds[2].source == 0 and result.rounds[2].repainted == (1,)  # not round 1's failures
    assert result.rounds[2].candidate.layout == layout  # verified against the whole layout
    assert result.kept == 2

    detector = ScriptedDetector([[CAT["box"], None]], [[None, None]], [[None, shifted(DOG["box"], -SHIFT)]])
    [worse] = repair(pipe, detector, [first_candidate(pipe, detector, layout)], 2, CALL)
    assert worse.kept == 0 and worse.rounds[0].candidate.image is not None
    assert [r.source for r in worse.rounds] == [None, 0, 0]
    assert all(r.candidate.score <= worse.rounds[0].candidate.score for r in worse.rounds)


def test_a_batch_repairs_only_the_images_that_fail(pipe):
    layouts = [Layout.from_dict(LAYOUT), Layout.from_dict({**LAYOUT, "seed": 9})]
    detector = ScriptedDetector([[CAT["box"], DOG["box"]], [None, DOG["box"]]],  # round 0: the 2nd misses the cat
                                [[CAT["box"], DOG["box"]]])  # round 1 checks the 2nd image alone
    images = pipe(layouts, **CALL).images
    starts = [Candidate(layout, image, check, STEPS)
              for layout, image, check in zip(layouts, images, verify_batch(detector, images, layouts))]
    done, repaired = repair(pipe, detector, starts, 3, CALL)
    assert len(done.rounds) == 1 and done.kept == 0
    assert len(repaired.rounds) == 2 and repaired.rounds[1].repainted == (0,) and repaired.rounds[1].seed == 10


# --- bad combinations: one line, exit 1, nothing written ---


def one_line(capsys, *argv, status=1):
    code = gligen_cli(*argv)
    err = capsys.readouterr().err
    assert code == status and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("gligen")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_combinations_are_one_line(gligen_dir, detector_dir, tmp_path, capsys):
    layouts = write_layouts(tmp_path / "x.jsonl", LAYOUT)
    out = tmp_path / "out"
    line = one_line(capsys, "--model", gligen_dir, "--layout", layouts, "--out", out, "--repair-model", gligen_dir)
    assert line == "gligen: error: --repair-model goes with --repair N"
    # no --detector, and the default (Grounding DINO-T from the hub) cannot load offline
    line = one_line(capsys, "--model", gligen_dir, "--layout", layouts, "--out", out, "--repair", 2)
    assert line.startswith("gligen: error: IDEA-Research/grounding-dino-tiny: ")
    assert line.endswith("; --repair needs a detector: name one with --detector")
    missing = tmp_path / "nowhere"
    line = one_line(capsys, "--model", gligen_dir, "--layout", layouts, "--out", out, "--repair", 1,
                    "--repair-model", missing, "--detector", detector_dir)
    assert line.startswith(f"gligen: error: --repair-model {missing}: ")
    line = one_line(capsys, "--model", gligen_dir, "--layout", layouts, "--out", out, "--repair", -1, status=2)
    assert "argument --repair: must be an integer >= 0, got '-1'" in line
    last = write_layouts(tmp_path / "last.jsonl", {**LAYOUT, "seed": 2**64 - 2})
    line = one_line(capsys, "--model", gligen_dir, "--layout", last, "--out", out, "--repair", 2,
                    "--detector", detector_dir)
    assert line == ("gligen: error: layout last: seed 18446744073709551614 + --best-of 1 - 1 + --repair 2 passes the "
                    "largest seed, 2**64 - 1")
    assert not out.exists() or not any(out.iterdir())


def test_a_repair_model_that_does_not_fit_the_adapter_is_named(gligen_dir, detector_dir, tmp_path, capsys):
    from tests.tiny import save_tiny_sdxl

    sdxl = save_tiny_sdxl(tmp_path / "sdxl")
    out = tmp_path / "out"
    line = one_line(capsys, "--model", gligen_dir, "--layout", write_layouts(tmp_path / "x.jsonl", LAYOUT), "--out",
                    out, "--repair", 1, "--repair-model", sdxl, "--detector", detector_dir)
    assert line.startswith(f"gligen: error: --repair-model {sdxl}: adapter does not fit the base UNet")
    assert not out.exists() or not any(out.iterdir())

