"""Tests never reach a model hub: everything they load is built in the test."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny test models are dominated by per-op overhead: one thread is as fast and keeps
# two-core machines responsive when several test processes share them.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gligen_dir(tmp_path_factory):
    """A tiny GLIGEN pipeline directory (base + text-box adapter), built once per test module."""
    from tests.tiny import save_tiny_gligen

    return save_tiny_gligen(tmp_path_factory.mktemp("gligen"))[1]
