"""Training data: shard format round trips, the writers, resume, dropped-input accounting, shapes."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from gligen.data import shapes
from gligen.data.cli import register
from gligen.data.format import Sample, SampleError, decode_sample, encode_sample, read_shards
from gligen.data.pseudo_label import pairs_from_directory, write_pseudo_label_shards
from gligen.data.sharded import list_shards, tar_shards
from gligen.data.writer import ShardWriter
from gligen.errors import UserError, run_cli
from gligen.layout import Entity, Layout

REPO = Path(__file__).resolve().parents[1]


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="gligen")
    register(parser.add_subparsers())
    return run_cli(parser, [str(a) for a in argv])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def same_entities(a: list[Entity], b: list[Entity], spans: bool = True) -> bool:
    return len(a) == len(b) and all(
        x.phrase == y.phrase
        and max(abs(u - v) for u, v in zip(x.box, y.box)) < 1e-6
        and (not spans or x.spans == y.spans)
        for x, y in zip(a, b)
    )


@pytest.fixture(scope="module")
def shapes_coco(tmp_path_factory) -> Path:
    """24 shapes scenes of seed 0 as COCO/MDETR data (images/, instances.json, captions.json)."""
    out = tmp_path_factory.mktemp("coco")
    assert cli("data", "shapes", "--n", 24, "--format", "coco", "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def reference() -> list[Sample]:
    return [shapes.shape_sample(0, i) for i in range(24)]


# -- format ------------------------------------------------------------------------------------


def test_sample_round_trip_with_references_and_spans(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    ref = Image.new("RGB", (16, 16), (10, 200, 30))
    entities = [Entity("a cat", (0.1, 0.2, 0.5, 0.9), spans=((2, 7),)), Entity("a dog", (0.5, 0.0, 1.0, 0.4))]
    sample = Sample("img_01", image, "a cat and a dog", entities, [None, ref])
    with ShardWriter(tmp_path, {"command": "test"}, image_format="png") as writer:
        writer.write([sample])
    [back] = read_shards(tmp_path)
    assert back.key == "img_01" and back.caption == "a cat and a dog"
    assert same_entities(back.entities, entities)
    assert np.array_equal(pixels(back.image), pixels(image))
    assert back.references[0] is None and np.array_equal(pixels(back.references[1]), pixels(ref))
    meta = json.loads(encode_sample(sample, "png")["json"])
    assert meta == {"caption": "a cat and a dog", "width": 40, "height": 24, "entities": [
        {"phrase": "a cat", "box": [0.1, 0.2, 0.5, 0.9], "tokens_positive": [[2, 7]]},
        {"phrase": "a dog", "box": [0.5, 0.0, 1.0, 0.4]}]}


def test_keys_with_dots_are_refused():
    with pytest.raises(ValueError, match="img.1"):
        encode_sample(Sample("img.1", Image.new("RGB", (8, 8)), "", []))


def test_local_brace_list_and_pipe_sources_read_the_same(tmp_path):
    shapes.write_shards(str(tmp_path), n=10, samples_per_shard=4)
    paths = sorted(str(p) for p in tmp_path.glob("shard-*.tar"))
    assert len(paths) == 3
    sources = [
        tmp_path,
        f"{tmp_path}/shard-{{000000..000002}}.tar",
        paths,
        [f"pipe:cat {p}" for p in paths],
    ]
    expected = [shapes.key(i) for i in range(10)]
    for source in sources:
        assert [s.key for s in read_shards(source)] == expected, source
    # and through webdataset's own WebDataset class, decoding with ours
    dataset = wds.WebDataset(f"pipe:cat {paths[1]}", shardshuffle=False).map(decode_sample)
    assert [s.key for s in dataset] == expected[4:8]


def test_corrupt_samples_in_a_shard_are_skipped_and_counted(tmp_path):
    good = encode_sample(shapes.shape_sample(0, 0), "png")
    bad_image = dict(good, __key__="bad_image", png=good["png"][: len(good["png"]) // 2])
    bad_json = dict(good, __key__="bad_json", json=b"{not json")
    bad_box = dict(good, __key__="bad_box", json=json.dumps(
        {"caption": "x", "entities": [{"phrase": "a star", "box": [0.5, 0.1, 0.2, 0.9]}]}).encode())
    no_image = {"__key__": "no_image", "json": good["json"]}
    with wds.TarWriter(str(tmp_path / "s.tar"), encoder=False) as tar:
        for raw in (bad_image, good, bad_json, bad_box, no_image):
            tar.write(raw)
    dropped = Counter()
    with pytest.warns(UserWarning) as warned:
        kept = list(read_shards(str(tmp_path / "s.tar"), dropped))
    keys = ["bad_image", "bad_json", "bad_box", "no_image"]
    messages = [str(w.message) for w in warned if w.category is UserWarning]
    assert len(messages) == 4 and all(f"key {k}" in m for k, m in zip(keys, messages))
    assert [s.key for s in kept] == [good["__key__"]]
    assert dropped == {"unreadable image": 1, "invalid json": 1, "invalid entity": 1, "no image": 1}
    with pytest.raises(SampleError, match=r"key bad_box: invalid entity .*x1 <= x0") as info:
        decode_sample(bad_box)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


# -- shapes ------------------------------------------------------------------------------------


def test_shapes_are_deterministic_per_seed(tmp_path):
    a, b = shapes.shape_sample(3, 7), shapes.shape_sample(3, 7)
    assert np.array_equal(pixels(a.image), pixels(b.image)) and a.caption == b.caption
    assert a.entities == b.entities
    other = [shapes.shape_sample(4, i).caption for i in range(5)]
    assert other != [shapes.shape_sample(3, i).caption for i in range(5)]
    shapes.write_shards(str(tmp_path / "x"), n=6, seed=3, samples_per_shard=4)
    shapes.write_shards(str(tmp_path / "y"), n=6, seed=3, samples_per_shard=4)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()


def test_shapes_scenes_follow_the_rules():
    counts = Counter()
    for i in range(200):
        scene = shapes.sample_scene(0, i)
        sample = shapes.shape_sample(0, i)
        assert 1 <= len(sample.entities) <= shapes.MAX_OBJECTS
        counts[len(sample.entities)] += 1
        background = shapes.BACKGROUNDS[scene.background]
        assert sample.caption.endswith(f" on a {scene.background} background")
        kinds = [(o.shape, o.color) for o in scene.objects]
        assert len(set(kinds)) == len(kinds)
        for obj in scene.objects:
            assert math.dist(shapes.COLORS[obj.color], background) >= shapes.MIN_CONTRAST
        for entity in sample.entities:
            [(start, end)] = entity.spans
            assert sample.caption[start:end] == entity.phrase
    assert set(counts) == set(range(1, shapes.MAX_OBJECTS + 1))


def _grow(box: tuple[int, int, int, int], margin: int, size: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return max(x0 - margin, 0), max(y0 - margin, 0), min(x1 + margin, size), min(y1 + margin, size)


def test_shape_boxes_are_tight_around_the_drawn_pixels():
    """Each isolated object's box is the bounding box of the pixels at least half its colour."""
    size, checked = 64, 0
    for i in range(200):
        scene, sample = shapes.sample_scene(1, i), shapes.shape_sample(1, i, size)
        image = pixels(sample.image).astype(np.float64)
        background = np.array(shapes.BACKGROUNDS[scene.background], np.float64)
        boxes = [tuple(round(v * size) for v in e.box) for e in sample.entities]
        for j, (obj, box) in enumerate(zip(scene.objects, boxes)):
            x0, y0, x1, y1 = region = _grow(box, 2, size)
            others = [_grow(b, 2, size) for k, b in enumerate(boxes) if k != j]
            if any(o[0] < x1 and x0 < o[2] and o[1] < y1 and y0 < o[3] for o in others):
                continue  # near another object: its fringe would mix in
            color = np.array(shapes.COLORS[obj.color], np.float64)
            # the fraction of the object's colour in each pixel, from the image alone
            fraction = (image - background) @ (color - background) / np.sum((color - background) ** 2)
            mask = np.zeros((size, size), bool)
            mask[y0:y1, x0:x1] = fraction[y0:y1, x0:x1] > 0.47  # between coverage 7/16 and 8/16
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == box, (i, obj, region)
            checked += 1
    assert checked > 150


def test_held_out_layouts_match_the_rendered_data():
    layouts = list(shapes.shape_layouts(5, size=64, seed=9))
    for i, layout in enumerate(layouts):
        sample = shapes.shape_sample(9, i)
        assert (layout.prompt, list(layout.entities), layout.seed) == (sample.caption, sample.entities, i)
        assert (layout.width, layout.height) == (64, 64)


# -- writers -----------------------------------------------------------------------------------


def _break_inputs(coco: Path, into: Path) -> Path:
    """A copy of the shapes COCO data with a crowd box, an empty box, a corrupt and a missing image."""
    data = json.loads((coco / "instances.json").read_text())
    data["annotations"] += [
        {"id": 9001, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 1},
        {"id": 9002, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10], "iscrowd": 0},
        {"id": 9003, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0,
         "tokens_positive": [[200, 210]]},
    ]
    images = into / "images"
    images.mkdir(parents=True)
    for path in (coco / "images").iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    (images / "00000002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (images / "00000003.png").unlink()
    (into / "instances.json").write_text(json.dumps(data))
    return into


def test_from_coco_round_trips_shapes_and_counts_what_it_drops(tmp_path, shapes_coco, reference):
    out = tmp_path / "captioned"
    assert cli("data", "from-coco", shapes_coco / "instances.json", shapes_coco / "images",
               "--captions", shapes_coco / "captions.json", "--out", out, "--image-format", "png") == 0
    samples = list(read_shards(out))
    assert [s.key for s in samples] == [str(i + 1) for i in range(24)]
    for sample, ref in zip(samples, reference):
        assert sample.caption == ref.caption
        assert same_entities(sample.entities, ref.entities, spans=False)
        assert np.array_equal(pixels(sample.image), pixels(ref.image))

    broken = _break_inputs(shapes_coco, tmp_path / "broken")
    out = tmp_path / "detection"
    assert cli("data", "from-coco", broken / "instances.json", broken / "images", "--out", out) == 0
    samples = list(read_shards(out))
    assert len(samples) == 22 and all(s.caption == "" for s in samples)
    first = samples[0]  # image 1: the crowd and the empty box are gone, the extra plain box stays
    assert [e.phrase for e in first.entities] == [e.phrase for e in reference[0].entities] + ["a red circle"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 22 and summary["inputs"] == 24
    assert summary["dropped"] == {
        "annotation with empty or malformed box": 1,
        "crowd annotation (skipped)": 1,
        "missing image file": 1,
        "unreadable image": 1,
    }


def test_from_coco_one_sample_per_caption(tmp_path, shapes_coco):
    captions = json.loads((shapes_coco / "captions.json").read_text())
    captions["annotations"].append({"id": 500, "image_id": 2, "caption": "two things"})
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    out = tmp_path / "out"
    assert cli("data", "from-coco", shapes_coco / "instances.json", shapes_coco / "images",
               "--captions", tmp_path / "captions.json", "--all-captions", "--out", out) == 0
    samples = list(read_shards(out))
    assert len(samples) == 25
    assert [(s.key, s.caption) for s in samples[1:3]] == [("2_2", captions["annotations"][1]["caption"]),
                                                          ("2_500", "two things")]
    assert samples[1].entities == samples[2].entities


def test_from_grounding_keeps_phrases_and_spans(tmp_path, shapes_coco, reference):
    broken = _break_inputs(shapes_coco, tmp_path / "broken")
    data = json.loads((broken / "instances.json").read_text())
    data["images"][4]["caption"] = ""
    (broken / "instances.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    assert cli("data", "from-grounding", broken / "instances.json", broken / "images", "--out", out) == 0
    samples = {s.key: s for s in read_shards(out)}
    assert sorted(samples, key=int) == [str(i + 1) for i in range(24) if i not in (2, 3, 4)]
    for key, sample in samples.items():
        ref = reference[int(key) - 1]
        assert sample.caption == ref.caption and same_entities(sample.entities, ref.entities)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped"] == {
        "annotation with empty or malformed box": 1,
        "annotation without valid tokens_positive": 1,
        "crowd annotation (skipped)": 1,
        "entry without caption": 1,
        "missing image file": 1,
        "unreadable image": 1,
    }


def test_grounding_phrase_is_the_caption_text_of_its_spans(tmp_path):
    Image.new("RGB", (32, 16), "white").save(tmp_path / "a.jpg")
    caption = "A man in a red hat"
    data = {"images": [{"id": 7, "file_name": "a.jpg", "width": 32, "height": 16, "caption": caption}],
            "annotations": [{"id": 1, "image_id": 7, "bbox": [8, 4, 16, 8], "iscrowd": 0,
                             "tokens_positive": [[11, 18], [0, 5]]}]}
    (tmp_path / "g.json").write_text(json.dumps(data))
    assert cli("data", "from-grounding", tmp_path / "g.json", tmp_path, "--out", tmp_path / "out") == 0
    [sample] = read_shards(tmp_path / "out")
    assert sample.entities == [Entity("A man red hat", (0.25, 0.25, 0.75, 0.75), spans=((0, 5), (11, 18)))]


class TruthLabeler:
    """Stands in for detector.label.label_batch (tested with the detector): the true shapes layouts.

    Like label_batch it refuses a whole batch with a UserError when one caption has no phrase to
    label; `refuse` lists such captions, `blind_to` captions whose phrases it finds nowhere."""

    def __init__(self, samples: list[Sample], blind_to: set[str] = frozenset(), refuse: set[str] = frozenset()):
        self.truth = {s.caption: s for s in samples}
        self.blind_to, self.refuse = blind_to, refuse
        self.batch_sizes = []

    def __call__(self, images, captions):
        self.batch_sizes.append(len(images))
        if self.refuse & set(captions):
            raise UserError(f"caption {sorted(self.refuse & set(captions))[0]!r}: no noun phrases found to label")
        layouts = []
        for image, caption in zip(images, captions):
            sample = self.truth[caption]
            assert np.array_equal(pixels(image), pixels(sample.image))
            entities = () if caption in self.blind_to else tuple(sample.entities)
            layouts.append(Layout(caption, entities, width=image.width, height=image.height))
        return layouts


def test_pseudo_label_from_a_directory_and_from_shards(tmp_path, shapes_coco, reference):
    lines = [json.dumps({"image": f"images/{shapes.key(i)}.png", "caption": ref.caption})
             for i, ref in enumerate(reference)]
    lines[5] = json.dumps({"image": "images/nowhere.png", "caption": reference[5].caption})
    (shapes_coco / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    labeler = TruthLabeler(reference, blind_to={reference[7].caption}, refuse={reference[9].caption})
    pairs = pairs_from_directory(shapes_coco, shapes_coco / "pairs.jsonl")
    summary = write_pseudo_label_shards(list_shards(pairs, 1000, "pairs.jsonl"), labeler, tmp_path / "dir",
                                        {"source": "test"}, image_format="png", batch_size=4, workers=0)
    assert summary["dropped"] == {"caption not labelled": 1, "missing image file": 1,
                                  "no phrase of the caption detected": 1}
    assert (summary["inputs"], summary["samples"], summary["shards_done"]) == (24, 21, 1)
    # batches of 4 (one short of a missing image); the refused batch retried pair by pair
    assert labeler.batch_sizes == [4, 3, 4, 1, 1, 1, 1, 4, 4, 4]
    samples = list(read_shards(tmp_path / "dir"))
    assert [s.key for s in samples] == [f"{i + 1:09d}" for i in range(24) if i not in (5, 7, 9)]
    for sample in samples:
        ref = reference[int(sample.key) - 1]
        assert sample.caption == ref.caption and same_entities(sample.entities, ref.entities)

    # img2dataset-style shards: png + txt per sample
    with wds.TarWriter(str(tmp_path / "pairs.tar"), encoder=False) as tar:
        for ref in reference[:6]:
            tar.write({"__key__": ref.key, "png": encode_sample(ref, "png")["png"], "txt": ref.caption.encode()})
        tar.write({"__key__": "captionless", "png": encode_sample(ref, "png")["png"]})
    summary = write_pseudo_label_shards(tar_shards(str(tmp_path / "pairs.tar")), TruthLabeler(reference),
                                        tmp_path / "tar", {"source": "tar"}, image_format="png", batch_size=3,
                                        workers=2)
    assert summary["dropped"] == {"pair without caption": 1}
    assert [s.key for s in read_shards(tmp_path / "tar")] == [ref.key for ref in reference[:6]]


# -- resume ------------------------------------------------------------------------------------


def _convert(i: int) -> list[Sample]:
    if i % 5 == 4:
        raise SampleError(f"input {i}", "every fifth input")
    return [shapes.shape_sample(0, i, 32)]


def test_resume_after_an_exception_writes_no_duplicates(tmp_path):
    options = {"command": "test"}

    def interrupted(i: int) -> list[Sample]:
        if i == 23:
            raise KeyboardInterrupt
        return _convert(i)

    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path / "a", options, samples_per_shard=3, image_format="png") as writer:
            writer.consume(range(40), interrupted)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["shards"]) == 6
    assert not list((tmp_path / "a").glob(".*.tmp"))

    with ShardWriter(tmp_path / "a", options, samples_per_shard=3, image_format="png") as writer:
        assert writer.start == manifest["inputs"] and 0 < writer.start < 23
        writer.consume(range(40), _convert)
    with ShardWriter(tmp_path / "b", options, samples_per_shard=3, image_format="png") as writer:
        writer.consume(range(40), _convert)

    resumed, straight = writer.summary(), json.loads((tmp_path / "a" / "summary.json").read_text())
    assert {k: v for k, v in resumed.items() if k != "out"} == {k: v for k, v in straight.items() if k != "out"}
    assert straight["dropped"] == {"every fifth input": 8} and straight["samples"] == 32
    assert [s.key for s in read_shards(tmp_path / "a")] == [shapes.key(i) for i in range(40) if i % 5 != 4]
    for a, b in zip(sorted((tmp_path / "a").glob("*.tar")), sorted((tmp_path / "b").glob("*.tar"))):
        assert a.read_bytes() == b.read_bytes()


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL a real `gligen data shapes` mid-run, rerun it: the shards equal a run never stopped."""
    code = ("import argparse, sys; from gligen.data.cli import register; from gligen.errors import run_cli; "
            "p = argparse.ArgumentParser(); register(p.add_subparsers()); sys.exit(run_cli(p, sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def command(out: Path) -> list[str]:
        return [sys.executable, "-c", code, "data", "shapes", "--n", "600", "--size", "32",
                "--samples-per-shard", "20", "--out", str(out)]

    process = subprocess.Popen(command(tmp_path / "killed"), env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    manifest = tmp_path / "killed" / "manifest.json"
    while not (manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = json.loads(manifest.read_text())
    assert not state["complete"] and 3 <= len(state["shards"]) < 30
    subprocess.run(command(tmp_path / "killed"), env=env, check=True, capture_output=True)
    shapes.write_shards(str(tmp_path / "straight"), n=600, size=32, samples_per_shard=20)
    killed, straight = sorted((tmp_path / "killed").glob("*.tar")), sorted((tmp_path / "straight").glob("*.tar"))
    assert len(killed) == len(straight) == 30
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(killed, straight))
    assert not list((tmp_path / "killed").glob(".*.tmp"))


# -- command line ------------------------------------------------------------------------------


def test_cli_errors_are_one_line(tmp_path, capsys, shapes_coco):
    assert cli("data", "from-coco", tmp_path / "missing.json", tmp_path, "--out", tmp_path / "o") == 1
    assert capsys.readouterr().err.strip() == f"gligen: error: {tmp_path / 'missing.json'}: file not found"
    assert cli("data", "shapes", "--n", 3, "--size", 60, "--out", tmp_path / "s") == 1
    assert "--size must be a multiple of 8" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "shard-000000.tar").write_bytes(b"")
    assert cli("data", "shapes", "--n", 3, "--out", tmp_path / "full") == 1
    assert "holds shards but no manifest.json" in capsys.readouterr().err
    assert cli("data", "shapes", "--n", 3, "--out", tmp_path / "s") == 0
    assert cli("data", "shapes", "--n", 4, "--out", tmp_path / "s") == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert last.startswith(f"gligen: error: {tmp_path / 's'}: was written with other options: n=3 (now 4);")
    with pytest.raises(SystemExit) as info:
        cli("data", "nonsense")
    assert info.value.code == 2


def test_coco_export_is_valid_coco(shapes_coco, reference):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(shapes_coco / "instances.json"))
    assert len(coco.getCatIds()) == 48 and len(coco.getImgIds()) == 24
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert [names[a["category_id"]] for a in anns] == [e.phrase for e in reference[0].entities]
    x0, y0, x1, y1 = (v * 64 for v in reference[0].entities[0].box)
    assert anns[0]["bbox"] == [x0, y0, x1 - x0, y1 - y0]


def test_pseudo_label_command_with_a_tiny_detector(tmp_path, shapes_coco, reference):
    """`gligen data pseudo-label` loads a detector directory and stores what label_batch finds."""
    from detector import OpenSetDetector
    from detector.label import label_batch
    from tests.tiny_detector import save_tiny_detector

    model = save_tiny_detector(tmp_path / "det", shortest_edge=96, longest_edge=160)
    (tmp_path / "pairs.tsv").write_text("".join(f"images/{r.key}.png\t{r.caption}\n" for r in reference[:3]))
    assert cli("data", "pseudo-label", shapes_coco, "--captions", tmp_path / "pairs.tsv", "--model", model,
               "--box-threshold", 0.0, "--text-threshold", 0.0, "--batch-size", 2, "--workers", 1,
               "--out", tmp_path / "out") == 0
    samples = list(read_shards(tmp_path / "out"))
    expected = label_batch(OpenSetDetector.from_pretrained(str(model)), [r.image for r in reference[:3]],
                           [r.caption for r in reference[:3]], box_threshold=0.0, text_threshold=0.0)
    assert [s.caption for s in samples] == [r.caption for r in reference[:3]]
    for sample, layout in zip(samples, expected):
        assert sample.entities and same_entities(sample.entities, list(layout.entities))
        assert all(sample.caption[a:b] == e.phrase for e in sample.entities for a, b in e.spans)


def test_pseudo_labelling_in_two_launched_processes_equals_one(tmp_path, shapes_coco, reference):
    """`accelerate launch` with 2 CPU processes: each labels its own input shards; the shards and the merged
    summary equal a single process's; a rerun skips finished shards and redoes a missing one."""
    from tests.launch import accelerate_launch
    from tests.tiny_detector import save_tiny_detector

    model = save_tiny_detector(tmp_path / "det", shortest_edge=96, longest_edge=160)
    lines = [f"images/{r.key}.png\t{r.caption}\n" for r in reference[:11]]
    lines[4] = "images/nowhere.png\ta red square\n"
    (tmp_path / "pairs.tsv").write_text("".join(lines))
    args = ["data", "pseudo-label", str(shapes_coco), "--captions", str(tmp_path / "pairs.tsv"), "--model", str(model),
            "--box-threshold", "0.3", "--text-threshold", "0.2", "--batch-size", "2", "--samples-per-shard", "3",
            "--workers", "1", "--device", "cpu", "--image-format", "png"]
    assert cli(*args, "--out", tmp_path / "one") == 0
    env = {"OMP_NUM_THREADS": "1"}  # the same CPU kernels in both runs
    done = accelerate_launch("-m", "gligen.cli", *args, "--out", str(tmp_path / "two"), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (sorted(p.name for p in (tmp_path / d).glob("shard-*.tar")) for d in ("one", "two"))
    assert one == two and len(one) == 4  # 11 pairs in input shards of 3
    for name in one:
        a, b = (list(read_shards(tmp_path / d / name)) for d in ("one", "two"))
        assert [(s.key, s.caption) for s in a] == [(s.key, s.caption) for s in b] and a
        assert all(same_entities(x.entities, y.entities) and np.array_equal(pixels(x.image), pixels(y.image))
                   for x, y in zip(a, b))
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two")]
    assert {k: v for k, v in summaries[0].items() if k != "out"} == {k: v for k, v in summaries[1].items() if k != "out"}
    assert summaries[0]["inputs"] == 11 and summaries[0]["dropped"]["missing image file"] == 1
    assert "process 1" in done.stderr  # the second process labelled shards too

    # resume: a shard whose output and progress are gone is redone, the others are skipped
    (tmp_path / "two" / "shard-000002.tar").unlink()
    (tmp_path / "two" / "progress" / "shard-000002.json").unlink()
    done = accelerate_launch("-m", "gligen.cli", *args, "--out", str(tmp_path / "two"), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 of 2 shards already done" in done.stderr and "2 of 2 shards already done" in done.stderr
    assert (tmp_path / "two" / "shard-000002.tar").read_bytes() == (tmp_path / "one" / "shard-000002.tar").read_bytes()
    assert cli(*args, "--batch-size", "3", "--out", tmp_path / "two") == 1  # other options: refused
