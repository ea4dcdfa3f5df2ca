"""Adapters on the Hub, offline: a local Hub cache built in the test stands in for huggingface.co.

`from_pretrained` and `gligen generate --adapter` take repository ids (and revisions) and read the
cached snapshot; `push_to_hub` uploads the adapter, its config and a generated model card.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, constants
from PIL import Image

from gligen.adapter import GroundingAdapter, ModelCard
from gligen.cli import main
from gligen.errors import UserError
from gligen.layout import Entity, Layout
from gligen.pipeline import GligenPipeline
from tests.tiny import randomize_grounding, save_tiny_sd, tiny_unet

MAIN, TAGGED = "a" * 40, "b" * 40


def _adapter(seed: int) -> GroundingAdapter:
    adapter = GroundingAdapter.for_unet(tiny_unet(), base_model="tiny/sd", max_entities=4)
    randomize_grounding(adapter, seed=seed)
    return adapter


def _cache(cache, repo_id, folder, commit, ref=None):
    """Put `folder` in the Hub cache as snapshot `commit` of model repository `repo_id` (`ref` -> commit)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    if ref is not None:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hub cache holding user/adapter (main and tag v2) and user/pipe (a GligenPipeline directory)."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    adapters = [_adapter(1), _adapter(2)]
    for adapter, commit, ref in zip(adapters, (MAIN, TAGGED), ("main", "v2")):
        adapter.save_pretrained(tmp_path / commit)
        _cache(cache, "user/adapter", tmp_path / commit, commit, ref)
    sd = save_tiny_sd(tmp_path / "sd")
    pipe = GligenPipeline.from_pretrained(str(sd), adapter=adapters[0])
    pipe.save_pretrained(tmp_path / "pipe")
    _cache(cache, "user/pipe", tmp_path / "pipe", MAIN, "main")
    return {"adapters": adapters, "sd": sd, "root": tmp_path}


def _same(adapter, expected):
    assert adapter.config == expected.config
    for key, value in expected.adapter_state_dict().items():
        assert torch.equal(adapter.adapter_state_dict()[key], value), key


def test_adapter_from_a_hub_id_and_revision(hub):
    first, second = hub["adapters"]
    _same(GroundingAdapter.from_pretrained("user/adapter"), first)
    _same(GroundingAdapter.from_pretrained("user/adapter", revision="v2"), second)
    _same(GroundingAdapter.from_pretrained("user/adapter", revision=TAGGED), second)
    with pytest.raises(UserError, match="user/missing: cannot load an adapter from the hub"):
        GroundingAdapter.from_pretrained("user/missing")
    with pytest.raises(UserError, match="user/adapter at revision v3: cannot load"):
        GroundingAdapter.from_pretrained("user/adapter", revision="v3")
    with pytest.raises(UserError, match="not an adapter directory"):
        GroundingAdapter.from_pretrained(str(hub["root"] / "sd"))


def test_pipeline_and_cli_take_hub_ids(hub):
    first, second = hub["adapters"]
    pipe = GligenPipeline.from_pretrained("user/pipe")  # base and adapter from the cached pipeline repository
    _same(pipe.adapter, first)
    pipe = GligenPipeline.from_pretrained(str(hub["sd"]), adapter="user/adapter", adapter_revision="v2")
    _same(pipe.adapter, second)
    layout = Layout("a cat", (Entity("a cat", (0.1, 0.2, 0.5, 0.9)),), width=16, height=16, seed=1)
    expected = pipe(layout, num_inference_steps=2, output_type="np").images[0]

    layouts = hub["root"] / "layouts.jsonl"
    layouts.write_text(json.dumps({"prompt": "a cat", "width": 16, "height": 16, "seed": 1, "name": "cat",
                                   "entities": [{"phrase": "a cat", "box": [0.1, 0.2, 0.5, 0.9]}]}) + "\n")
    out = hub["root"] / "out"
    status = main(["generate", "--device", "cpu", "--steps", "2", "--model", str(hub["sd"]), "--adapter",
                   "user/adapter", "--adapter-revision", "v2", "--layout", str(layouts), "--out", str(out)])
    assert status == 0
    record = json.loads((out / "cat.json").read_text())
    assert record["adapter"] == "user/adapter"
    got = np.asarray(Image.open(out / "cat.png")).astype(np.float32) / 255
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-6


def test_push_to_hub_uploads_adapter_config_and_model_card(hub, tmp_path, monkeypatch):
    uploads = {}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        uploads["private"] = private
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None, **kwargs):
        shutil.copytree(folder_path, tmp_path / "uploaded")
        uploads.update(repo_id=repo_id, revision=revision, message=commit_message)
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{'c' * 40}"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    adapter = hub["adapters"][0]
    card = ModelCard(training_data="COCO 2014 train (grounding boxes)", steps=1200, scores={"AP": 0.2134})
    url = adapter.push_to_hub("me/my-adapter", card=card, private=True)

    assert url.endswith("/commit/" + "c" * 40) and uploads["repo_id"] == "me/my-adapter" and uploads["private"]
    assert sorted(p.name for p in (tmp_path / "uploaded").iterdir()) == [
        "README.md", "adapter.safetensors", "adapter_config.json"]
    _same(GroundingAdapter.from_pretrained(tmp_path / "uploaded"), adapter)
    readme = (tmp_path / "uploaded" / "README.md").read_text()
    assert readme.startswith("---\nlibrary_name: gligen\n") and "base_model: tiny/sd\n" in readme
    for fact in ("| training data | COCO 2014 train (grounding boxes) |", "| training steps | 1200 |",
                 "| AP | 0.2134 |", "| grounding | text-box |", "--adapter me/my-adapter"):
        assert fact in readme, fact
