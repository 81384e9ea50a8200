"""Shards against their manifest and moved data (issue 17): the size recorded in ``manifest.json`` is
checked whenever a shard is opened, the sha256 with ``data.verify_shards``; a mismatch is a clear error
naming the shard. Loader states name shards relative to their common directory, so a moved run / data
directory resumes; states saved with absolute-path fingerprints still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rynnscale.batch import EncodedSample
from rynnscale.config import load_config
from rynnscale.data.encode import SampleError
from rynnscale.data.loader import LoaderConfig, SplitLoader, TrainLoader
from rynnscale.data.manifest import read_manifest
from rynnscale.data.reader import ReaderLimits, ShardIntegrityError, iter_tar_samples
from rynnscale.data_pipelines.shards import ShardWriter

REPO = Path(__file__).resolve().parents[2]


class ByteEncoder:
    def encode(self, key: str, members: dict[str, bytes]) -> EncodedSample:
        if "conv.json" not in members:
            raise SampleError("missing_member", key, "no conv.json")
        ids = torch.tensor(list(json.loads(members["conv.json"])["text"].encode()), dtype=torch.int64)
        labels = ids.clone()
        labels[0] = -100
        return EncodedSample(key, ids, labels, torch.arange(len(ids)).expand(3, -1).clone())


def write(d: Path, n: int = 24, per_shard: int = 6) -> None:
    with ShardWriter(d, max_samples=per_shard) as w:
        for i in range(n):
            w.write(f"k{i:03d}", {"conv.json": json.dumps({"text": f"sample {i} " * (2 + i % 7)}).encode()})


def cfg(d: Path, **kw) -> LoaderConfig:
    base = dict(train_shards=[str(d / "*.tar")], seed=3, micro_batch_tokens=200, pack_window=4, shuffle_buffer=4,
                num_workers=0)
    base.update(kw)
    return LoaderConfig(**base)


def keys(items) -> list[list[str]]:
    """Sample keys of each batch (a SplitLoader's) or of each step (a TrainLoader's, all its micro-batches)."""
    return [[k for b in getattr(x, "micro_batches", [x]) for k in b.sample_keys] for x in items]


# ---------------------------------------------------------------------------------------- 8. manifest checks
def test_size_mismatch_is_an_error_naming_the_shard(tmp_path):
    write(tmp_path)
    shard = tmp_path / read_manifest(tmp_path).shards[1].name
    with open(shard, "ab") as f:
        f.write(b"\0" * 10240)   # still a valid tar, just not the file the manifest describes
    with pytest.raises(ShardIntegrityError, match=rf"shard .*{shard.name}: \d+ bytes but its manifest.json records"):
        list(iter_tar_samples(str(shard)))
    with pytest.raises(ShardIntegrityError, match=shard.name):
        for _ in TrainLoader(cfg(tmp_path, num_epochs=1), ByteEncoder()):
            pass


def test_a_data_workers_error_reaches_the_main_process_as_its_own_message(tmp_path):
    """With data workers, torch re-raised a worker's error as ``Caught ShardIntegrityError in DataLoader worker
    process 0. Original Traceback ...``: the trainer's one-line report of a changed shard or of too much bad data
    printed the worker's whole traceback. The error now arrives as raised, its message alone."""
    from rynnscale.data.loader import BadDataError

    write(tmp_path)
    shard = tmp_path / read_manifest(tmp_path).shards[1].name
    with open(shard, "ab") as f:
        f.write(b"\0" * 10240)
    with pytest.raises(ShardIntegrityError) as e:
        for _ in TrainLoader(cfg(tmp_path, num_epochs=1, num_workers=1), ByteEncoder()):
            pass
    assert str(e.value).startswith(f"shard {shard}: ") and "Traceback" not in str(e.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    with ShardWriter(bad, max_samples=50) as w:
        for i in range(20):
            w.write(f"k{i:03d}", {"meta.json": b"{}"})   # no conv.json: missing_member
    with pytest.raises(BadDataError) as e:
        for _ in TrainLoader(cfg(bad, num_epochs=1, num_workers=1), ByteEncoder()):
            pass
    assert str(e.value).startswith("20 of 20 samples (100.0%) were bad") and "Traceback" not in str(e.value)


def test_sha256_is_checked_with_verify_shards(tmp_path):
    write(tmp_path)
    shard = tmp_path / read_manifest(tmp_path).shards[2].name
    data = bytearray(shard.read_bytes())
    i = data.index(b"sample") + 1
    data[i] ^= 0x01   # same size, one byte differs inside a member's data
    shard.write_bytes(bytes(data))
    assert len(list(iter_tar_samples(str(shard)))) == 6   # size matches: read without the hash check
    with pytest.raises(ShardIntegrityError, match=rf"{shard.name}: sha256 .* \(data.verify_shards=true\)"):
        list(iter_tar_samples(str(shard), ReaderLimits(verify_sha256=True)))
    with pytest.raises(ShardIntegrityError, match=shard.name):
        for _ in TrainLoader(cfg(tmp_path, num_epochs=1, limits=ReaderLimits(verify_sha256=True)), ByteEncoder()):
            pass


def test_verify_shards_config_key(tmp_path):
    r = load_config(REPO / "recipes" / "demo_tiny.yaml", ["data.verify_shards=true"], check_paths=False)
    assert LoaderConfig.from_run_config(r).limits.verify_sha256 is True
    r = load_config(REPO / "recipes" / "demo_tiny.yaml", check_paths=False)
    assert r.data.verify_shards is False and LoaderConfig.from_run_config(r).limits.verify_sha256 is False


# ---------------------------------------------------------------------------------------- 8. moved directory
def test_moved_data_directory_resumes(tmp_path):
    a, b = tmp_path / "run_a" / "data", tmp_path / "run_b" / "data"
    write(a)
    ref = TrainLoader(cfg(a), ByteEncoder())
    it = iter(ref)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(ref.state_dict()))
    expected = keys(next(it) for _ in range(4))
    shutil.move(str(tmp_path / "run_a"), str(tmp_path / "run_b"))   # the whole run directory moved
    moved = TrainLoader(cfg(b), ByteEncoder())
    moved.load_state_dict(state)
    it2 = iter(moved)
    assert keys(next(it2) for _ in range(4)) == expected


def test_old_state_with_absolute_fingerprint_still_loads(tmp_path):
    """A per-rank (SplitLoader) state saved before shard names became relative to their directory."""
    write(tmp_path)
    ref = SplitLoader(cfg(tmp_path), ByteEncoder())
    it = iter(ref)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(ref.state_dict()))
    expected = keys(next(it) for _ in range(3))
    state["config"] = ref._fingerprint(absolute=True)   # what loaders wrote before relative names
    assert "shard_paths" not in state["config"]
    again = SplitLoader(cfg(tmp_path), ByteEncoder())
    again.load_state_dict(state)
    it2 = iter(again)
    assert keys(next(it2) for _ in range(3)) == expected
