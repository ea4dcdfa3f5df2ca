"""The training engine's edges: typed batches, `gligen train` with shipped configs, trackers, stops and resumes."""

import json
import os
import signal
import subprocess
import tarfile
import sys
import time
from dataclasses import asdict
from fractions import Fraction

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from gligen.adapter import GroundingAdapter
from gligen.errors import UserError
from gligen.training import Trainer, TrainingBatch, load_config
from gligen.training.dataset import ShardDataset
from tests.launch import ROOT
from gligen.data.shapes import write_shards
from tests.test_training import config
from tests.tiny import save_tiny_sd, tiny_train_args


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    write_shards(str(root / "shards"), 8, size=40, samples_per_shard=4)
    return {"sd": save_tiny_sd(root / "sd"), "shards": root / "shards", "root": root}


@pytest.fixture(autouse=True)
def fresh_accelerator():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def run_command(*args, cwd=ROOT, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def tiny_args(setup, out, *overrides):
    return tiny_train_args(setup["sd"], setup["shards"], out, *overrides)


def test_batches_are_typed_and_read_by_key_as_before(setup):
    cfg = load_config("tiny_test", tiny_args(setup, "x"))  # a shipped config by name
    batches = iter(ShardDataset(cfg.data, batch_size=3, seed=5))
    batch, second = next(batches), next(batches)
    assert isinstance(batch, TrainingBatch) and batch.pixels.shape == (3, 3, 16, 16) and batch.boxes.shape == (3, 30, 4)
    assert batch["position"] == {"worker": 0, **asdict(batch.position)} and batch["captions"] is batch.captions
    assert batch.position != second.position  # a snapshot per batch, not the reader's live position
    again = TrainingBatch.of({**batch})
    assert again.captions == batch.captions and again.pixels is batch.pixels and again.position is None
    with pytest.raises(UserError, match=r"nope: config file not found, nor a shipped config \(demo_shapes, sd14_"):
        load_config("nope")


def test_adapter_records_its_slots_and_old_configs_load(setup, tmp_path):
    trainer = Trainer(config(setup, "slots", "max_steps=1", "log_every=1", "data.max_entities=7", "report_to=none"))
    out = trainer.train()
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["max_entities"] == 7 and "extra" not in saved
    assert not list((setup["root"] / "slots" / "logs").glob("events.out.tfevents.*"))  # report_to=none
    assert (setup["root"] / "slots" / "logs" / "metrics.jsonl").is_file()
    saved["extra"] = {}  # as adapters saved before carry it
    (out / "adapter_config.json").write_text(json.dumps(saved))
    assert GroundingAdapter.from_pretrained(out).config.max_entities == 7
    with pytest.raises(UserError, match="config key report_to: 'paper' is not one of"):
        config(setup, "x", "report_to=[tensorboard, paper]")


def test_tensorboard_gets_the_metrics_and_8bit_adam_needs_bitsandbytes(setup):
    Trainer(config(setup, "tracked", "max_steps=2", "log_every=1", "report_to=tensorboard")).train()
    assert list((setup["root"] / "tracked" / "logs").rglob("events.out.tfevents.*"))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="config key optim.use_8bit_adam: bitsandbytes is not installed"):
            Trainer(config(setup, "adam8", "optim.use_8bit_adam=true"))


def test_gligen_train_runs_a_shipped_config_from_outside_the_repository(setup, tmp_path):
    done = run_command("-m", "gligen.cli", "train", "--config", "tiny_test",
                       *tiny_args(setup, tmp_path / "run", "max_steps=2"), cwd=tmp_path)
    stdout, stderr = done.communicate(timeout=900)
    assert done.returncode == 0, stderr[-2000:]
    assert f"adapter saved to {tmp_path / 'run' / 'adapter'}" in stdout
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()
    bad = run_command("-m", "gligen.cli", "train", "--config", "sd15_nothing", cwd=tmp_path)
    _, stderr = bad.communicate(timeout=120)
    assert bad.returncode == 1 and stderr.strip().splitlines()[-1].startswith(
        "gligen: error: sd15_nothing: config file not found, nor a shipped config (demo_shapes, ")


def test_sigterm_saves_a_checkpoint_and_the_rerun_ends_as_an_uninterrupted_run(setup, tmp_path):
    common = ["max_steps=8", "checkpoint_every=100", "log_every=1", "ema_decay=0.9", "optim.lr_schedule=cosine",
              "optim.warmup_steps=2", "report_to=none"]

    def command(out):
        return ["train.py", "--config", "configs/tiny_test.yaml", *tiny_args(setup, tmp_path / out, *common)]

    straight = run_command(*command("straight"))  # the uninterrupted run, alongside
    metrics = tmp_path / "stopped" / "logs" / "metrics.jsonl"
    first = run_command(*command("stopped"))
    deadline = time.monotonic() + 900
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and first.poll() is None:
        assert time.monotonic() < deadline, "the run logged no 3 steps in time"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "train.py: terminated; rerun the same command to resume"
    [saved] = (tmp_path / "stopped" / "checkpoints").iterdir()
    stopped_at = int(saved.name.split("-")[1])
    assert 3 <= stopped_at < 8 and not (tmp_path / "stopped" / "adapter").exists()

    rerun = run_command(*command("stopped"))
    _, stderr = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, stderr[-2000:]
    assert f"resumed from {saved} at step {stopped_at}" in stderr
    _, stderr = straight.communicate(timeout=900)
    assert straight.returncode == 0, stderr[-2000:]
    for name in ("adapter", "checkpoints/checkpoint-00000008/trained_adapter"):
        expected = load_file(str(tmp_path / "straight" / name / "adapter.safetensors"))
        got = load_file(str(tmp_path / "stopped" / name / "adapter.safetensors"))
        assert expected.keys() == got.keys() and all(torch.equal(v, got[k]) for k, v in expected.items()), name


def test_sigterm_to_the_whole_job_with_data_workers_still_saves_and_stops_cleanly(setup, tmp_path):
    """A cluster (or a terminal's Ctrl-C) signals every process of the job, the DataLoader workers too."""
    out = tmp_path / "group"
    run = run_command("train.py", "--config", "configs/tiny_test.yaml",
                      *tiny_args(setup, out, "max_steps=50", "checkpoint_every=100", "log_every=1", "report_to=none",
                                 "data.num_workers=1"), start_new_session=True)
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 900
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2) and run.poll() is None:
        assert time.monotonic() < deadline, "the run logged no 2 steps in time"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGTERM)
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "train.py: terminated; rerun the same command to resume"
    assert len(list((out / "checkpoints").iterdir())) == 1


def test_timestep_range_bounds_the_training_timesteps(setup, monkeypatch):
    with pytest.raises(UserError, match=r"config key timestep_range must be \[first, end\)"):
        load_config("tiny_test", tiny_args(setup, "x", "timestep_range=[500, 400]"))
    with pytest.raises(UserError, match=r"timestep_range \[0, 2000\] ends past the base's 1000 training timesteps"):
        Trainer(load_config("tiny_test", tiny_args(setup, setup["root"] / "range_bad", "timestep_range=[0, 2000]")))
    trainer = Trainer(load_config("tiny_test", tiny_args(setup, setup["root"] / "range", "timestep_range=[900, 1000]")))
    seen = []
    add_noise = trainer.noise_scheduler.add_noise
    monkeypatch.setattr(trainer.noise_scheduler, "add_noise", lambda x, n, t: seen.append(t) or add_noise(x, n, t))
    batch = next(iter(ShardDataset(trainer.config.data, batch_size=8, seed=0)))
    for _ in range(4):
        trainer.loss(batch)
    timesteps = torch.cat(seen)
    assert len(timesteps) == 32 and timesteps.min() >= 900 and timesteps.max() < 1000


def test_a_data_source_matching_nothing_is_refused_before_the_model_loads(setup, tmp_path, monkeypatch):
    from gligen.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "load_base", lambda *a: pytest.fail("the model loaded before data.shards was checked"))
    with pytest.raises(UserError, match=r"^data.shards: .*matches no shard"):
        Trainer(load_config("tiny_test", tiny_args(setup, tmp_path / "run", f"data.shards={tmp_path}/none-*.tar")))


def test_lost_data_is_summed_by_reason_in_the_metrics_and_at_the_end(setup, tmp_path, capsys):
    shards = tmp_path / "cut"
    shards.mkdir()
    for path in sorted(setup["shards"].glob("*.tar")):
        whole = path.read_bytes()
        with tarfile.open(path) as tar:
            cut = tar.getmembers()[-2].offset  # each shard loses its last sample at a member boundary
        (shards / path.name).write_bytes(whole[:cut])
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="truncated shard"):
        Trainer(load_config("tiny_test", tiny_args(setup, out, f"data.shards={shards}", "max_steps=6", "log_every=3",
                                                   "report_to=none"))).train()
    last = json.loads((out / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
    shards_read = last["skipped_by_reason"]["truncated shard"]
    assert last["skipped_samples"] == shards_read >= 1 and last["skipped_by_reason"] == {"truncated shard": shards_read}
    assert f"training: skipped {shards_read} corrupt samples ({shards_read} truncated shard)" in capsys.readouterr().err


def test_resume_drops_metrics_after_the_checkpoint_and_refuses_state_that_needs_code(setup, tmp_path):
    out = tmp_path / "run"

    def run(steps, *overrides):
        AcceleratorState._reset_state(True)
        return Trainer(load_config("tiny_test", tiny_args(setup, out, f"max_steps={steps}", "log_every=1",
                                                          "checkpoint_every=2", "report_to=none", *overrides))).train()

    run(2)
    metrics = out / "logs" / "metrics.jsonl"
    with open(metrics, "a") as f:  # what a killed run leaves after its checkpoint: a later step and a cut line
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    run(4)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]

    latest = out / "checkpoints" / "checkpoint-00000004"
    optimizer = torch.load(latest / "optimizer.bin", weights_only=True)
    optimizer["param_groups"][0]["note"] = Fraction(1, 3)  # an object that a weights-only load refuses
    torch.save(optimizer, latest / "optimizer.bin")
    with pytest.raises(UserError) as error:
        run(6)
    assert str(error.value) == (f"{latest}: a state file is a pickle that needs code to load; refused (no code ran). "
                                "Rerun with --trust-pickle only if you trust it, or remove this checkpoint to resume "
                                "from the one before it")
    run(6, "trust_pickle=true")
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "checkpoint-00000006"
