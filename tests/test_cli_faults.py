"""Every command line on every class of fault: one line, a known exit status, no traceback, no partial output.

Classes (issue 18): operating-system faults on output, interrupts, bad layouts, bad model files,
images of every kind, numeric options, evaluation inputs, unexpected errors. Training-data faults
are in test_training_data_faults.py; property-based tests of the parsers in test_properties.py.

The tests run as root and as a normal user: where root ignores a permission, the fault is
simulated; where a real file system can be mounted (root), it is also tested for real.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gligen.files
from gligen.cli import main as gligen_main
from detector.cli import main as detector_main

REPO = Path(__file__).resolve().parents[1]
LAYOUT = {"prompt": "a cat and a dog", "width": 16, "height": 16, "seed": 3,
          "entities": [{"phrase": "a cat", "box": [0.1, 0.2, 0.5, 0.9]},
                       {"phrase": "a dog", "box": [0.55, 0.25, 0.95, 0.8]}]}


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    """No progress bars; library log handlers write to the process's stderr, not to an earlier test's capture."""
    import logging

    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("GLIGEN_DEBUG", raising=False)
    for name in ("transformers", "diffusers"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:  # not pytest's own capturing handlers
                handler.stream = sys.__stderr__


def call(main, *argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def one_line(capsys, main, *argv, status: int = 1) -> str:
    """Run a command that must fail with `status`; its one line on stderr (tracebacks fail the test)."""
    code = call(main, *argv)
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err, err
    prog = "gligen" if main is gligen_main else "detector"
    lines = [line for line in err.splitlines() if line.startswith(prog)]
    assert len(lines) == 1, err
    return lines[0]


def leftovers(directory: Path) -> list[str]:
    """Temporary files a writer left behind (none may remain after a failure)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".*") if p.name.endswith((".tmp", ".old")))


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    from tests.tiny_detector import save_tiny_detector

    return save_tiny_detector(tmp_path_factory.mktemp("detector") / "det", shortest_edge=64, longest_edge=96)


@pytest.fixture
def inputs(tmp_path):
    """Small valid inputs of every command: a layout, an image, COCO ground truth and detections."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    gt = {"images": [{"id": 1, "width": 32, "height": 24, "file_name": "a.png"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8]}],
          "categories": [{"id": 1, "name": "cat"}]}
    return {
        "layout": write_json(tmp_path / "layout.json", LAYOUT),
        "image": tmp_path / "a.png",
        "gt": write_json(tmp_path / "gt.json", gt),
        "dt": write_json(tmp_path / "dt.json", [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8], "score": 0.9}]),
    }


def commands_writing_to(out: Path, inputs: dict) -> list[tuple]:
    """Each command that writes, with --out (or --overlay) set to `out`; no model is needed before the check."""
    return [
        (gligen_main, "generate", "--model", "nowhere", "--layout", inputs["layout"], "--out", out),
        (gligen_main, "data", "shapes", "--n", 3, "--size", 16, "--out", out),
        (gligen_main, "data", "from-coco", inputs["gt"], inputs["image"].parent, "--out", out),
        (gligen_main, "eval", "generate", "--annotations", inputs["gt"], "--model", "nowhere", "--out", out),
        (gligen_main, "eval", "score", "--annotations", inputs["gt"], "--detections", inputs["dt"], "--out", out),
        (gligen_main, "convert", "nowhere.bin", "--out", out),
        (detector_main, "detect", inputs["image"], "--phrases", "a cat", "--model", "nowhere", "--overlay", out),
        (detector_main, "train", "--images", ".", "--annotations", inputs["gt"], "--model", "nowhere", "--out", out),
        (detector_main, "convert", "nowhere.pth", "--out", out),
        (gligen_main, "train", "--config", "tiny_test", "model.base=nowhere", "data.shards=nowhere", f"output_dir={out}"),
    ]


COMMAND_IDS = ["generate", "data shapes", "data from-coco", "eval generate", "eval score", "convert",
               "detector detect", "detector train", "detector convert", "train"]


# --- 1. operating-system faults on output ---


@pytest.mark.parametrize("index", range(len(COMMAND_IDS)), ids=COMMAND_IDS)
def test_out_naming_a_regular_file_is_one_line(index, tmp_path, inputs, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    main, *argv = commands_writing_to(taken, inputs)[index]
    prog = "gligen" if main is gligen_main else "detector"
    assert one_line(capsys, main, *argv) == f"{prog}: error: {taken}: is a file, not a directory"
    assert taken.read_text() == "keep me" and not leftovers(tmp_path)


@pytest.mark.parametrize("index", range(len(COMMAND_IDS)), ids=COMMAND_IDS)
def test_out_below_a_regular_file_and_too_long_names(index, tmp_path, inputs, capsys):
    (tmp_path / "file").write_text("")
    main, *argv = commands_writing_to(tmp_path / "file" / "out", inputs)[index]
    assert one_line(capsys, main, *argv).endswith(f"error: {tmp_path / 'file'}: is a file, not a directory")
    main, *argv = commands_writing_to(tmp_path / ("x" * 300), inputs)[index]
    assert one_line(capsys, main, *argv).endswith(f"error: {tmp_path / ('x' * 300)}: file name too long")
    assert sorted(os.listdir(tmp_path)) == sorted(["file", "a.png", "layout.json", "gt.json", "dt.json"])


@pytest.mark.parametrize("index", range(len(COMMAND_IDS)), ids=COMMAND_IDS)
def test_out_in_a_directory_without_write_permission(index, tmp_path, inputs, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: simulate what a normal user meets
        real_access = os.access
        monkeypatch.setattr(gligen.files.os, "access",
                            lambda path, mode: not Path(path).resolve().is_relative_to(locked) and real_access(path, mode))
    main, *argv = commands_writing_to(locked / "out", inputs)[index]
    try:
        assert one_line(capsys, main, *argv).endswith(f"error: {locked}: permission denied")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_disk_full_while_writing_leaves_nothing_half_written(gligen_dir, tmp_path, inputs, capsys, monkeypatch):
    """ENOSPC from the write itself (no file name in the error): the line names the file; no temporary file stays."""
    real_save = Image.Image.save

    def full_disk(image, fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)):
            Path(fp).write_bytes(b"\x89PNG partial")  # some bytes made it before the disk filled up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "out"
    line = one_line(capsys, gligen_main, "generate", "--model", gligen_dir, "--layout", inputs["layout"],
                    "--out", out, "--steps", 2, "--device", "cpu")
    assert line == f"gligen: error: {out / 'layout.png'}: no space left on the device"
    assert os.listdir(out) == []
    line = one_line(capsys, gligen_main, "data", "shapes", "--n", 2, "--size", 16, "--format", "coco", "--out", out)
    assert line == f"gligen: error: {out / 'images' / '00000000.png'}: no space left on the device"
    assert leftovers(out) == [] and not list(out.rglob("*.png"))


def test_disk_full_in_a_shard_keeps_the_complete_shards(tmp_path, capsys, monkeypatch):
    from gligen.data import writer

    real = writer.wds.TarWriter.write
    calls = []

    def fill_up(self, sample):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, sample)

    monkeypatch.setattr(writer.wds.TarWriter, "write", fill_up)
    out = tmp_path / "shards"
    line = one_line(capsys, gligen_main, "data", "shapes", "--n", 8, "--size", 16, "--samples-per-shard", 2,
                    "--out", out)
    assert line == f"gligen: error: {out / 'shard-000002.tar'}: no space left on the device"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]
    assert json.loads((out / "manifest.json").read_text())["inputs"] == 4
    monkeypatch.undo()
    assert call(gligen_main, "data", "shapes", "--n", 8, "--size", 16, "--samples-per-shard", 2, "--out", out) == 0
    assert len(list(out.glob("shard-*.tar"))) == 4


def test_ctrl_c_while_a_shard_opens_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    """The signal may come after a shard's temporary file exists and before anything holds it to delete it."""
    from gligen.data import writer

    real, opened = writer.atomic_path, []

    class MadeThenInterrupted:
        def __init__(self, path):
            self.path = path

        def __enter__(self):
            tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            raise KeyboardInterrupt

        def __exit__(self, *exc):  # never called: entering failed
            raise AssertionError("unreachable")

    def third_is_interrupted(path):
        opened.append(path)
        return MadeThenInterrupted(path) if len(opened) == 3 else real(path)

    monkeypatch.setattr(writer, "atomic_path", third_is_interrupted)
    out = tmp_path / "shards"
    line = one_line(capsys, gligen_main, "data", "shapes", "--n", 8, "--size", 16, "--samples-per-shard", 2,
                    "--out", out, status=130)
    assert line == f"gligen: interrupted (2 complete shards (4 inputs) in {out}); rerun the same command to resume"
    assert leftovers(out) == [] and sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]


@pytest.fixture
def small_file_system(tmp_path):
    """A 200 KiB tmpfs (needs root and mount permission; skipped elsewhere)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_disk_and_a_real_read_only_file_system(small_file_system, tmp_path, capsys):
    out = small_file_system / "shards"
    line = one_line(capsys, gligen_main, "data", "shapes", "--n", 400, "--size", 64, "--samples-per-shard", 50,
                    "--out", out)
    assert line.startswith(f"gligen: error: {out}/") and line.endswith(": no space left on the device")
    assert leftovers(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in manifest["shards"]]
    subprocess.run(["mount", "-o", "remount,ro", str(small_file_system)], check=True)
    line = one_line(capsys, gligen_main, "data", "shapes", "--n", 4, "--size", 16, "--out", small_file_system / "more")
    assert line == f"gligen: error: {small_file_system}: read-only file system"


# --- 2. interrupts ---


def test_ctrl_c_in_generate_says_what_was_finished_and_the_rerun_resumes(gligen_dir, tmp_path, capsys, monkeypatch):
    from gligen import generate

    layouts = tmp_path / "three.jsonl"
    layouts.write_text("".join(json.dumps({**LAYOUT, "seed": s}) + "\n" for s in range(3)))
    out = tmp_path / "out"
    real_write, written = generate._write, []

    def interrupted_after_one(*args, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(real_write(*args, **kwargs))

    monkeypatch.setattr(generate, "_write", interrupted_after_one)
    argv = ["generate", "--model", gligen_dir, "--layout", layouts, "--out", out, "--steps", 2, "--device", "cpu"]
    line = one_line(capsys, gligen_main, *argv, status=130)
    assert line == f"gligen: interrupted (1 of 3 layouts written to {out}); rerun the same command to resume"
    assert sorted(os.listdir(out)) == ["three_0000.json", "three_0000.png"]
    monkeypatch.undo()
    assert call(gligen_main, *argv) == 0
    assert "1 of 3 layouts already done" in capsys.readouterr().err
    assert len(list(out.glob("*.png"))) == 3 and leftovers(out) == []


def test_sigterm_in_eval_generate_says_what_was_finished(gligen_dir, tmp_path, inputs, capsys, monkeypatch):
    from gligen.pipeline import GligenPipeline

    gt = json.loads(inputs["gt"].read_text())
    gt["images"] += [{"id": i, "width": 32, "height": 24, "file_name": f"{i}.png"} for i in (2, 3)]
    gt["annotations"] += [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 8]} for i in (2, 3)]
    real_call, calls = GligenPipeline.__call__, []

    def terminated_in_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(GligenPipeline, "__call__", terminated_in_the_second_batch)
    out = tmp_path / "eval"
    line = one_line(capsys, gligen_main, "eval", "generate", "--annotations", write_json(tmp_path / "gt3.json", gt),
                    "--model", gligen_dir, "--size", 16, "--steps", 2, "--device", "cpu", "--out", out, status=143)
    assert line == f"gligen: terminated (1 of 3 images written to {out}); rerun the same command to resume"
    assert len(list(out.glob("*.png"))) == 1 and leftovers(out) == []


def test_sigterm_and_ctrl_c_to_a_running_shard_writer(tmp_path):
    """Real signals to a real `gligen data shapes` process: exit 143 / 130, one line, complete shards only, resumable."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    out = tmp_path / "shards"
    command = [sys.executable, "-m", "gligen.cli", "data", "shapes", "--n", "2000", "--size", "32",
               "--samples-per-shard", "20", "--out", str(out)]
    def shards_done() -> int:
        return len(json.loads((out / "manifest.json").read_text())["shards"]) if (out / "manifest.json").exists() else 0

    for sig, status, word in ((signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")):
        before = shards_done()
        # a shell starts background jobs with SIGINT ignored, and an ignored SIGINT stays ignored in children (as
        # POSIX wants): the writer must start with the default, as in a terminal
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while shards_done() < before + 2:  # the signal comes while shards are being written
            assert time.time() < deadline and process.poll() is None
            time.sleep(0.02)
        process.send_signal(sig)
        _, err = process.communicate(timeout=30)
        assert process.returncode == status, err
        lines = [line for line in err.splitlines() if line.startswith("gligen")]
        assert len(lines) == 1 and "Traceback" not in err, err
        manifest = json.loads((out / "manifest.json").read_text())
        assert lines[0] == (f"gligen: {word} ({len(manifest['shards'])} complete shards ({manifest['inputs']} inputs) "
                            f"in {out}); rerun the same command to resume")
        assert leftovers(out) == []
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert json.loads((out / "manifest.json").read_text())["complete"]


# --- 4. layouts ---

BAD_LAYOUTS = {
    "empty": (b"", "the file is empty"),
    "no layouts": (b"[]", "holds no layouts"),
    "not utf-8": ('{"prompt": "caf\u00e9"}'.encode("latin-1"), "not UTF-8 text (byte offset 15: b'\\xe9')"),
    "too wide": (json.dumps({**LAYOUT, "width": 8192}).encode(), "'width' is 8192 pixels, above the limit of 4096"),
    "seed too large": (json.dumps({**LAYOUT, "seed": 2**64}).encode(), "'seed' must be an integer in [0, 2**64 - 1]"),
    "negative seed": (json.dumps({**LAYOUT, "seed": -1}).encode(), "'seed' must be an integer in [0, 2**64 - 1]"),
    "prompt type": (json.dumps({**LAYOUT, "prompt": 3}).encode(), "'prompt' must be a string, got a number"),
    "negative prompt type": (json.dumps({**LAYOUT, "negative_prompt": 0}).encode(), "'negative_prompt' must be a string"),
    "entities type": (json.dumps({**LAYOUT, "entities": "a cat"}).encode(), "'entities' must be a list, got a string"),
    "phrase type": (json.dumps({**LAYOUT, "entities": [{"phrase": 5, "box": [0, 0, 1, 1]}]}).encode(),
                    "entity 0: 'phrase' must be a string, got a number"),
    "phrase missing": (json.dumps({**LAYOUT, "entities": [{"box": [0, 0, 1, 1]}]}).encode(), "entity 0: 'phrase' is missing"),
    "huge number": (b'{"entities": [{"phrase": "a", "box": [0, 0, 1, 1e400]}]}', "has a NaN, infinite or huge value"),
    "huge integer": (('{"entities": [{"phrase": "a", "box": [0, 0, 1, 1%s]}]}' % ("0" * 400)).encode(),
                     "has a NaN, infinite or huge value"),
    "boolean box": (b'{"entities": [{"phrase": "a", "box": [0, 0, true, 1]}]}', "has a value that is not a number"),
    "image type": (json.dumps({**LAYOUT, "entities": [{"phrase": "a", "box": [0, 0, 1, 1], "image": 5}]}).encode(),
                   "entity 0 ('a'): 'image' must be a path, got 5"),
    "spans": (json.dumps({**LAYOUT, "entities": [{"phrase": "a", "box": [0, 0, 1, 1], "tokens_positive": [[3, 1e400]]}]}
                         ).encode(), "'tokens_positive' must be a list of [start, end] integer pairs"),
    "spans past the prompt": (json.dumps({**LAYOUT, "entities": [{"phrase": "a", "box": [0, 0, 1, 1],
                                                                   "tokens_positive": [[3, 99]]}]}).encode(),
                              "reaches past the end of the 15-character prompt"),
    "deep nesting": (b"[" * 100000 + b"]" * 100000, "invalid JSON: nested too deeply"),
}


@pytest.mark.parametrize("case", BAD_LAYOUTS, ids=list(BAD_LAYOUTS))
def test_bad_layouts_are_one_line_naming_the_file(case, tmp_path, capsys):
    content, message = BAD_LAYOUTS[case]
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    out = tmp_path / "out"
    line = one_line(capsys, gligen_main, "generate", "--model", "nowhere", "--layout", path, "--out", out)
    assert line.startswith(f"gligen: error: {path}") and message in line, line
    assert not out.exists()


def test_a_layout_with_a_typo_fails_before_torch_is_imported(tmp_path):
    path = write_json(tmp_path / "typo.json", {**LAYOUT, "entities": [{"phrase": "a cat", "box": [0.5, 0.1, 0.2, 0.9]}]})
    code = ("import sys; from gligen.cli import main; status = main(sys.argv[1:]); "
            "print(status, *[m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code, "generate", "--model", "x", "--layout", str(path),
                             "--out", str(tmp_path / "out"), "--seed", "1"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.stdout.split() == ["1"]  # exit 1, and none of the heavy libraries loaded
    assert result.stderr == f"gligen: error: {path}: entity 0 ('a cat'): box [0.5, 0.1, 0.2, 0.9] has x1 <= x0\n"


def test_the_side_limit_is_an_option_and_normalized_boxes_in_pixels_warn(tmp_path, capsys):
    from gligen.layout import Layout

    wide = write_json(tmp_path / "wide.json", {**LAYOUT, "width": 1024})
    assert "above the limit of 512 (--max-side)" in one_line(
        capsys, gligen_main, "generate", "--model", "x", "--layout", wide, "--out", tmp_path / "o", "--max-side", 512)
    with pytest.warns(UserWarning, match=r"tiny.json: every box is smaller than 1 pixel although 'box_units' is"):
        Layout.from_dict({**LAYOUT, "box_units": "pixels"}, "tiny.json")


def test_best_of_may_not_carry_a_seed_past_the_largest(tmp_path, capsys):
    path = write_json(tmp_path / "last.json", {**LAYOUT, "seed": 2**64 - 1})
    line = one_line(capsys, gligen_main, "generate", "--model", "x", "--layout", path, "--out", tmp_path / "o",
                    "--best-of", 2)
    assert line == "gligen: error: layout last: seed 18446744073709551615 + --best-of 2 - 1 passes the largest seed, 2**64 - 1"


# --- 5. models and checkpoints ---


@pytest.mark.parametrize("config, message", [
    ({"feature_type": "text-box"}, "missing key 'blocks'"),
    ({"blocks": {"b": [32, 2, 16]}, "feature_type": "keypoints"}, "'feature_type' must be one of text-box, text-image-box"),
    ({"blocks": {"b": [32, "2", 16]}}, "'blocks' -> 'b' must be 3 positive integers"),
    ({"blocks": {"b": [32, 2, 16]}, "positive_len": 7.5}, "'positive_len' must be a positive integer, got 7.5"),
    ({"blocks": {"b": [32, 2, 16]}, "colour": "red"}, "unknown key 'colour'"),
    ({"blocks": {"b": [32, 2, 16]}, "schedule": [0.5, 0.5]},
     "'schedule': schedule [0.5, 0.5] must be three non-negative fractions a,b,c"),
    ({"blocks": {"b": [32, 2, 16]}, "schedule": [0.5, 0, 0.2]}, "'schedule': schedule [0.5, 0, 0.2] must sum to 1"),
    ({"blocks": {"b": [32, 2, 16]}, "schedule": 0.8}, "'schedule' must be a list [a, b, c] of fractions or null, got 0.8"),
    ([1, 2], "expected a JSON object, got list"),
])
def test_a_malformed_adapter_config_is_one_line_naming_file_and_key(config, message, tmp_path, capsys):
    from gligen.adapter import GroundingAdapter
    from gligen.errors import UserError

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_json(adapter / "adapter_config.json", config)
    (adapter / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as error:
        GroundingAdapter.from_pretrained(adapter)
    assert str(error.value) == f"{adapter / 'adapter_config.json'}: {message}" or message in str(error.value)
    assert str(error.value).startswith(f"{adapter / 'adapter_config.json'}: ")


def test_a_malformed_adapter_config_through_generate(gligen_dir, tmp_path, inputs, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_json(adapter / "adapter_config.json", {"blocks": {"b": [32, 2, 16]}, "max_entities": "30"})
    (adapter / "adapter.safetensors").write_bytes(b"")
    line = one_line(capsys, gligen_main, "generate", "--model", gligen_dir, "--adapter", adapter,
                    "--layout", inputs["layout"], "--out", tmp_path / "out", "--steps", 2, "--device", "cpu")
    assert line == f"gligen: error: {adapter / 'adapter_config.json'}: 'max_entities' must be a positive integer, got '30'"


class _Marker:
    """Pickled as a call that creates a file: shows whether code from a checkpoint ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("main, command", [(detector_main, "convert"), (gligen_main, "convert")])
def test_a_pickle_that_needs_code_runs_none_without_trust_pickle(main, command, tmp_path, capsys):
    checkpoint = tmp_path / "evil.pth"
    marker = tmp_path / "code-ran"
    torch.save({"model": {"weight": _Marker(marker)}}, checkpoint)
    line = one_line(capsys, main, command, checkpoint, "--out", tmp_path / "out")
    assert "only code could rebuild" in line or "needs its code to load" in line, line
    assert "--trust-pickle" in line and not marker.exists() and not (tmp_path / "out").exists()
    one_line(capsys, main, command, checkpoint, "--out", tmp_path / "out", "--trust-pickle")  # refused later, for lack of weights
    assert marker.exists()  # the opt-in is the only way through


# --- 6. images ---


def test_every_pil_mode_becomes_the_rgb_it_shows():
    from gligen.files import to_rgb

    gray = np.arange(0, 256, 17, dtype=np.uint8).reshape(4, 4)
    expected = np.repeat(gray[..., None], 3, axis=2)
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)  # I;16: the same picture at 16 bits
    as_int32 = Image.fromarray(gray.astype(np.int32) * 257)  # I, as PIL opens some 16-bit files
    as_float = Image.fromarray(gray.astype(np.float32) / 255)  # F in [0, 1]
    for image in (sixteen, as_int32, as_float):
        np.testing.assert_array_equal(np.asarray(to_rgb(image)), expected, err_msg=image.mode)
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 1000.0, np.float32)))).max() == 255  # F above 1: clipped

    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))  # half-transparent black on white: mid grey
    assert tuple(np.asarray(to_rgb(half))[0, 0]) == (127, 127, 127)
    assert tuple(np.asarray(to_rgb(Image.new("LA", (2, 2), (0, 0))))[0, 0]) == (255, 255, 255)
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 1  # colour 1 (blue) is transparent: white shows
    assert tuple(np.asarray(to_rgb(palette))[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))))[0, 0]) == (255, 0, 0)
    rotated = Image.new("RGB", (4, 2), (10, 20, 30))
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display
    rotated.info["exif"] = exif.tobytes()
    assert to_rgb(Image.open(_saved(rotated, "jpg", exif=exif.tobytes()))).size == (2, 4)


def _saved(image, suffix, **kwargs):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "png": "PNG"}[suffix], **kwargs)
    buffer.seek(0)
    return buffer


def test_a_16_bit_image_and_its_8_bit_version_give_the_same_detections(tiny_detector, tmp_path, capsys):
    pixels = np.random.default_rng(3).integers(0, 256, (48, 64), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "eight.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    for name in ("eight", "sixteen"):
        assert call(detector_main, "detect", tmp_path / f"{name}.png", "--phrases", "a cat", "a dog", "--model",
                    tiny_detector, "--box-threshold", 0, "--text-threshold", 0, "--out", tmp_path / f"{name}.json",
                    "--device", "cpu") == 0
    eight, sixteen = (json.loads((tmp_path / f"{n}.json").read_text())["images"][0] for n in ("eight", "sixteen"))
    assert eight.pop("image") != sixteen.pop("image")
    assert eight == sixteen and len(eight["detections"]) > 0


def test_too_many_pixels_is_refused_before_decoding(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gligen.files, "MAX_IMAGE_PIXELS", 1000)
    Image.new("L", (40, 30)).save(tmp_path / "bomb.png")
    line = one_line(capsys, detector_main, "detect", tmp_path / "bomb.png", "--phrases", "a cat", "--model", "x")
    assert line == (f"detector: error: {tmp_path / 'bomb.png'}: image is 40x30 = 1200 pixels, above the limit "
                    "of 1000 (gligen.files.MAX_IMAGE_PIXELS)")


# --- 7. numeric options ---

NUMBERS = [
    (gligen_main, ["generate", "--model", "m", "--layout", "l.json", "--out", "o", "--guidance", "nan"], "--guidance"),
    (gligen_main, ["generate", "--model", "m", "--layout", "l.json", "--out", "o", "--steps", "0"], "--steps"),
    (gligen_main, ["generate", "--model", "m", "--layout", "l.json", "--out", "o", "--beta", "inf"], "--beta"),
    (gligen_main, ["generate", "--model", "m", "--layout", "l.json", "--out", "o", "--seed", str(2**64)], "--seed"),
    (gligen_main, ["generate", "--model", "m", "--layout", "l.json", "--out", "o", "--iou-threshold", "-1"],
     "--iou-threshold"),
    (gligen_main, ["eval", "generate", "--annotations", "a", "--model", "m", "--out", "o", "--guidance", "-1"],
     "--guidance"),
    (gligen_main, ["eval", "score", "--annotations", "a", "--out", "o", "--limit", "-1"], "--limit"),
    (gligen_main, ["eval", "score", "--annotations", "a", "--out", "o", "--min-area", "nan"], "--min-area"),
    (gligen_main, ["data", "shapes", "--out", "o", "--n", "0"], "--n"),
    (gligen_main, ["data", "pseudo-label", "s", "--model", "m", "--out", "o", "--box-threshold", "2"], "--box-threshold"),
    (detector_main, ["detect", "a.png", "--phrases", "x", "--text-threshold", "nan"], "--text-threshold"),
    (detector_main, ["detect", "a.png", "--phrases", "x", "--nms-iou", "nan"], "--nms-iou"),
    (detector_main, ["verify", "a.png", "--layout", "l", "--iou-threshold", "inf"], "--iou-threshold"),
    (detector_main, ["train", "--images", "i", "--annotations", "a", "--model", "m", "--out", "o", "--lr", "nan"], "--lr"),
]


@pytest.mark.parametrize("main, argv, option", NUMBERS, ids=[" ".join(a[:1] + a[-2:]) for _, a, _ in NUMBERS])
def test_numeric_options_refuse_nan_infinities_and_out_of_range(main, argv, option, capsys):
    line = one_line(capsys, main, *argv, status=2)
    assert f"argument {option}: must be " in line and repr(argv[-1]) in line, line


def test_schedule_refuses_nan(tmp_path, capsys):
    line = one_line(capsys, gligen_main, "generate", "--model", "m", "--layout", "l.json", "--out", tmp_path / "o",
                    "--schedule", "nan,0,1")
    assert line == "gligen: error: schedule [nan, 0.0, 1.0] must be three non-negative fractions a,b,c"


# --- 8. evaluation inputs ---

GT = {"images": [{"id": 1, "width": 32, "height": 24}], "categories": [{"id": 1, "name": "cat"}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8]}]}
DT = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8], "score": 0.9}]
EVAL_INPUTS = {
    "score NaN": (GT, [{**DT[0], "score": float("nan")}], "dt.json: [0]: 'score' must be a finite number"),
    "score missing": (GT, [{k: v for k, v in DT[0].items() if k != "score"}], "dt.json: [0]: missing 'score'"),
    "bbox of 3": (GT, [{**DT[0], "bbox": [1, 2, 3]}], "dt.json: [0]: 'bbox' must be 4 finite numbers"),
    "bbox infinite": (GT, [{**DT[0], "bbox": [1, 2, 3, float("inf")]}], "dt.json: [0]: 'bbox' must be 4 finite numbers"),
    "string id": (GT, [{**DT[0], "image_id": "1"}], "dt.json: [0]: 'image_id' must be an integer, got '1'"),
    "zero width": ({**GT, "images": [{"id": 1, "width": 0, "height": 24}]}, DT,
                   "gt.json: images[0]: 'width' must be a positive number of pixels"),
    "repeated image": ({**GT, "images": GT["images"] * 2}, DT, "gt.json: images[1]: image id 1 appears twice"),
    "negative box": ({**GT, "annotations": [{**GT["annotations"][0], "bbox": [0, 0, -5, 3]}]}, DT,
                     "gt.json: annotations[0]: 'bbox' [0, 0, -5, 3] has a negative width or height"),
    "category name": ({**GT, "categories": [{"id": 1, "name": 7}]}, DT,
                      "gt.json: categories[0]: 'name' must be a non-empty string"),
}


@pytest.mark.parametrize("case", EVAL_INPUTS, ids=list(EVAL_INPUTS))
def test_evaluation_inputs_are_checked_field_by_field(case, tmp_path, capsys):
    gt, dt, message = EVAL_INPUTS[case]
    gt_path, dt_path = write_json(tmp_path / "gt.json", gt), tmp_path / "dt.json"
    dt_path.write_text(json.dumps(dt))  # NaN and Infinity as Python's json writes them
    line = one_line(capsys, gligen_main, "eval", "score", "--annotations", gt_path, "--detections", dt_path,
                    "--out", tmp_path / "report")
    assert line.startswith("gligen: error: ") and line.endswith(message) or message in line, line
    assert str(tmp_path) in line and not (tmp_path / "report").exists()


def test_an_instances_file_with_a_zero_size_image_is_one_line(tmp_path, capsys):
    gt = write_json(tmp_path / "gt.json", {**GT, "images": [{"id": 1, "width": 0, "height": 24, "file_name": "a.png"}]})
    line = one_line(capsys, gligen_main, "eval", "generate", "--annotations", gt, "--model", "m", "--out", tmp_path / "o")
    assert line == f"gligen: error: {gt}: images[0]: 'width' must be a positive number of pixels, got 0"


# --- 9. unexpected errors ---


def _broken_command(subparsers):
    def run(args):
        raise ValueError("something nobody expected\nwith a second line")

    subparsers.add_parser("broken").set_defaults(func=run)


@pytest.mark.parametrize("how", ["plain", "--debug", "GLIGEN_DEBUG"])
def test_an_unexpected_error_is_one_line_unless_debugging(how, capsys, monkeypatch):
    import argparse

    from gligen.errors import run_cli

    parser = argparse.ArgumentParser(prog="gligen")
    _broken_command(parser.add_subparsers())
    argv = ["broken", "--debug"] if how == "--debug" else ["broken"]
    if how == "GLIGEN_DEBUG":
        monkeypatch.setenv("GLIGEN_DEBUG", "1")
    assert run_cli(parser, argv) == 1
    err = capsys.readouterr().err
    last = ("gligen: error: unexpected ValueError: something nobody expected with a second line; "
            "run with --debug for the traceback")
    assert err.splitlines()[-1] == last
    if how == "plain":
        assert err == last + "\n"
    else:
        assert "Traceback (most recent call last)" in err and 'raise ValueError("something nobody expected' in err


def test_a_command_that_ends_well_frees_its_process_group_and_the_models_holding_it(tmp_path):
    """A launched run's group dies before exit, also one that only a DDP model in a reference cycle still holds.

    Left to interpreter shutdown, gloo's threads abort the process (exit -6). accelerate's
    `end_training` unregisters the group, as the "fine" command does here, but the model keeps it.
    """
    import argparse
    import gc
    import weakref

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gligen.errors import run_cli

    models = []

    def train_like_accelerate(args):
        model = DistributedDataParallel(torch.nn.Linear(2, 2))
        cycle = [model]
        cycle.append(cycle)  # as the trainer's objects make one
        model(torch.ones(1, 2)).sum().backward()
        models.append(weakref.ref(model))
        dist.destroy_process_group()

    gc.disable()  # only run_cli's own collection may free the cycle
    try:
        for command, status, left in (("fine", 0, True), ("broken", 1, False)):
            parser = argparse.ArgumentParser(prog="gligen")
            subparsers = parser.add_subparsers()
            subparsers.add_parser("fine").set_defaults(func=train_like_accelerate)
            subparsers.add_parser("broken").set_defaults(func=lambda args: 1 / 0)
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / command}", rank=0, world_size=1)
            try:
                assert run_cli(parser, [command]) == status
                assert dist.is_initialized() is not left  # after an error another process may wait in a collective
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()
    finally:
        gc.enable()
    assert len(models) == 1 and models[0]() is None


def test_os_errors_are_described_in_words():
    from gligen.errors import describe_os_error

    assert describe_os_error(OSError(errno.EACCES, "Permission denied", "out/")) == "out/: permission denied"
    assert describe_os_error(OSError(errno.EROFS, "Read-only file system", "/mnt")) == "/mnt: read-only file system"
    assert describe_os_error(OSError(errno.EDQUOT, "Disk quota exceeded", "a")) == "a: disk quota exceeded"
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device")) == "no space left on the device"
