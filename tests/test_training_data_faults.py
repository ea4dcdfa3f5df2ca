"""Training-data faults: truncated and corrupt shards are skipped and counted by reason, never silently
shortened; shards without one readable sample stop the reader within one pass; a shard source that
matches nothing is refused before anything loads."""

from __future__ import annotations

import tarfile
import time

import pytest

from gligen.data.format import shard_urls, tar_is_complete
from gligen.data.shapes import write_shards
from gligen.errors import UserError
from gligen.training.config import DataConfig
from gligen.training.dataset import ShardDataset, check_shards


@pytest.fixture
def shards(tmp_path):
    out = tmp_path / "shards"
    write_shards(str(out), 12, size=16, samples_per_shard=4)  # 3 shards of 4 samples
    return out


def one_epoch(directory, batches: int = 4):
    """The positions after `batches` batches of 3 (12 samples: one epoch of 3 shards)."""
    stream = iter(ShardDataset(DataConfig(shards=str(directory), resolution=16, num_workers=0), batch_size=1, seed=0))
    return [next(stream)["position"] for _ in range(batches)]


def members(path):
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_a_shard_cut_at_a_member_boundary_is_counted_not_silently_shorter(shards):
    whole = (shards / "shard-000001.tar").read_bytes()
    assert tar_is_complete(shards / "shard-000001.tar")
    cut = members(shards / "shard-000001.tar")[4].offset  # after the first 2 samples (json + png each)
    (shards / "shard-000001.tar").write_bytes(whole[:cut])
    assert not tar_is_complete(shards / "shard-000001.tar")
    with pytest.warns(UserWarning, match="truncated shard"):
        positions = one_epoch(shards, 10)  # 4 + 2 + 4 samples
    assert positions[-1]["skipped_by_reason"] == {"truncated shard": 1}
    assert positions[-1]["skipped"] == 1


def test_a_shard_cut_inside_a_member_counts_the_broken_data(shards):
    whole = (shards / "shard-000002.tar").read_bytes()
    cut = members(shards / "shard-000002.tar")[3].offset_data + 20  # inside the second sample's image
    (shards / "shard-000002.tar").write_bytes(whole[:cut])
    with pytest.warns(UserWarning):
        positions = one_epoch(shards, 9)
    reasons = positions[-1]["skipped_by_reason"]
    assert reasons.get("truncated shard") == 1 and reasons.get("unreadable tar data", 0) >= 1


def test_shards_without_a_readable_sample_stop_within_one_pass(shards):
    for path in shards.glob("*.tar"):
        path.write_bytes(b"not a tar file at all" * 30)
    start = time.perf_counter()
    with pytest.warns(UserWarning), pytest.raises(UserError) as error:
        one_epoch(shards, 1)
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert message.startswith("data.shards: no readable sample in 3 shards (") and "shard-000000.tar" in message
    assert "skipped so far:" in message and "unreadable tar data" in message


def test_a_shard_source_that_matches_nothing_is_refused(shards, tmp_path):
    for source, message in [
        (f"{tmp_path}/nothing-{{000..003}}.tar", "matches no shard file (e.g. "),
        (f"{shards}/shard-{{000000..000005}}.tar", "3 of 6 shards do not exist, e.g. "),
        (f"{tmp_path}/*.tar", "matches no shard"),
        (str(tmp_path / "empty"), "matches no shard file"),
    ]:
        with pytest.raises(UserError) as error:
            check_shards(DataConfig(shards=source))
        assert str(error.value).startswith("data.shards: ") and message in str(error.value), str(error.value)
    assert check_shards(DataConfig(shards=f"{shards}/*.tar")) == sorted(str(p) for p in shards.glob("*.tar"))
    assert shard_urls("pipe:cat x.tar") == ["pipe:cat x.tar"]  # commands and URLs are webdataset's to open
