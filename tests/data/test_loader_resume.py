"""The per-rank SplitLoader (exact resume, 2 ranks x 2 workers; epoch coverage) and what both loaders share:
bad data skipped and counted, the bad-fraction guard, the real writer and encoder end to end."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from rynnscale.batch import EncodedSample, PackedBatch
from rynnscale.data.encode import SampleError
from rynnscale.data.loader import BadDataError, LoaderConfig, LoaderStateError, SplitLoader, TrainLoader


class ByteEncoder:
    """Test fixture encoder: a sample's ``conv.json`` {"text": ...} -> its UTF-8 bytes as token ids,
    positions 0..L-1 on all three MRoPE rows, labels = ids except the first (-100). Texts starting
    with BAD raise SampleError like the real encoder does for a broken conversation."""

    def encode(self, key: str, members: dict[str, bytes]) -> EncodedSample:
        if "conv.json" not in members:
            raise SampleError("missing_member", key, "no conv.json")
        try:
            text = json.loads(members["conv.json"])["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise SampleError("bad_json", key, str(e)) from None
        if text.startswith("BAD"):
            raise SampleError("bad_conversation", key, "marked bad by the test")
        ids = torch.tensor(list(text.encode()), dtype=torch.int64)
        labels = ids.clone()
        labels[0] = -100
        return EncodedSample(key, ids, labels, torch.arange(len(ids)).expand(3, -1).clone())


def text_of(key: str, rng: np.random.Generator) -> str:
    return (key + " ") * int(rng.integers(2, 12))


def write_text_shards(d: Path, n_shards: int, per_shard: int, seed: int = 0) -> list[str]:
    """Shards written with webdataset's TarWriter; returns all sample keys."""
    rng = np.random.default_rng(seed)
    keys = []
    for s in range(n_shards):
        with wds.TarWriter(str(d / f"shard-{s:03d}.tar")) as w:
            for i in range(per_shard):
                k = f"s{s}-{i:02d}"
                w.write({"__key__": k, "conv.json": json.dumps({"text": text_of(k, rng)}).encode()})
                keys.append(k)
    return keys


def batch_fingerprint(b: PackedBatch) -> tuple:
    return (tuple(b.sample_keys), b.input_ids_l.tolist(), b.labels_l.tolist(), b.position_ids_3l.tolist(),
            b.cu_seqlens.tolist(), b.max_seqlen)


def take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def micro_batches(loader) -> list[PackedBatch]:
    """Every micro-batch a loader yields: a SplitLoader's batches, or the micro-batches of a TrainLoader's steps."""
    return [b for item in loader for b in (item.micro_batches if isinstance(loader, TrainLoader) else [item])]


def config(d: Path, **kw) -> LoaderConfig:
    base = dict(train_shards=[str(d / "shard-{000..007}.tar")], seed=5, micro_batch_tokens=300, pack_window=8,
                shuffle_buffer=6, num_workers=2)
    base.update(kw)
    return LoaderConfig(**base)


def test_resume_two_ranks_two_workers(tmp_path: Path) -> None:
    """Read N batches, save, read M more; a fresh loader restored from the state yields the same M
    (across an epoch boundary: 48 samples per rank and epoch, ~5 per batch)."""
    torch.manual_seed(0)
    write_text_shards(tmp_path, 8, 12)
    # a window of several packs, so the saved state holds packs not yet emitted as well as carry-over
    # (half an epoch: a window of a whole worker's epoch is packed out at the epoch barrier)
    cfg = config(tmp_path, micro_batch_tokens=200, pack_window=12)
    N, M = 3, 14
    seen_by_rank = []
    for rank in range(2):
        loader = SplitLoader(cfg, ByteEncoder(), rank=rank, world_size=2)
        it = iter(loader)
        head = take(it, N)
        state = json.loads(json.dumps(loader.state_dict()))  # plain data, checkpointable as JSON
        workers = state["workers"]
        assert all(w["shuffle"]["buffer"] and w["packer"]["items"] for w in workers)
        assert any(w["pending"] for w in workers)  # the restore below must rebuild pending packs
        tail = take(it, M)
        it.close()
        for b in head + tail:
            b.validate()
            assert b.num_tokens <= cfg.micro_batch_tokens
        fresh = SplitLoader(cfg, ByteEncoder(), rank=rank, world_size=2)
        fresh.load_state_dict(state)
        it2 = iter(fresh)
        again = take(it2, M)
        it2.close()
        assert [batch_fingerprint(b) for b in again] == [batch_fingerprint(b) for b in tail]
        assert fresh.stats()["batches"] == loader.stats()["batches"] == N + M
        # iterating the same loader again also continues where it stopped
        it3 = iter(fresh)
        nxt = next(it3)
        it3.close()
        assert nxt.sample_keys != again[-1].sample_keys
        seen_by_rank.append({k for b in head[:3] for k in b.sample_keys})  # within epoch 0 (48 samples per rank)
    assert not seen_by_rank[0] & seen_by_rank[1]  # ranks read different samples


def test_a_finite_split_with_no_samples_just_ends(tmp_path: Path) -> None:
    """Evaluation's one-epoch split loaders over a held-out set of 3 samples on 4 ranks: rank 3 gets none and yields
    nothing (it used to raise ShardPatternError, leaving the other ranks waiting in the evaluation's collectives);
    the 4 ranks together see every sample once."""
    keys = write_text_shards(tmp_path, 1, 3)
    seen = []
    for rank in range(4):
        lc = LoaderConfig(train_shards=[str(tmp_path / "shard-000.tar")], num_epochs=1, shuffle_buffer=0,
                          shuffle_shards=False, micro_batch_tokens=300, min_samples_for_bad_check=1 << 62,
                          num_workers=0)
        seen.append([k for b in SplitLoader(lc, ByteEncoder(), rank=rank, world_size=4) for k in b.sample_keys])
    assert seen[3] == [] and sorted(k for ks in seen for k in ks) == sorted(keys)


def test_state_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    write_text_shards(tmp_path, 8, 4)
    cfg = config(tmp_path, num_workers=0)
    a = SplitLoader(cfg, ByteEncoder(), rank=0, world_size=2)
    it = iter(a)
    next(it)
    sd = a.state_dict()
    b = SplitLoader(cfg, ByteEncoder(), rank=0, world_size=4)
    with pytest.raises(LoaderStateError, match="world_size=2 but this loader has world_size=4"):
        b.load_state_dict(sd)
    c = SplitLoader(config(tmp_path, num_workers=0, micro_batch_tokens=512), ByteEncoder(), rank=0, world_size=2)
    with pytest.raises(LoaderStateError, match="micro_batch_tokens"):
        c.load_state_dict(sd)


def test_epoch_covers_every_sample_exactly_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    keys = write_text_shards(tmp_path, 8, 12)
    cfg = config(tmp_path, num_epochs=1)
    per_rank = []
    for rank in range(2):
        got = [k for b in SplitLoader(cfg, ByteEncoder(), rank=rank, world_size=2) for k in b.sample_keys]
        assert len(got) == len(set(got))
        per_rank.append(got)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)


def add_bad_shards(d: Path, budget: int) -> None:
    """shard-008: one bad member name, one sample the encoder rejects, one too long for the budget;
    shard-009: a tar truncated inside the data of its third sample."""
    entries = [("b8-00.conv.json", json.dumps({"text": "fine sample"}).encode()),
               ("b8-01.conv.json", json.dumps({"text": "has a traversal"}).encode()),
               ("b8-01.video.../../../../etc/cron.d/x", b"payload"),
               ("b8-02.conv.json", json.dumps({"text": "BAD conversation"}).encode()),
               ("b8-03.conv.json", json.dumps({"text": "x" * (budget + 1)}).encode()),
               ("b8-04.conv.json", json.dumps({"text": "another fine one"}).encode())]
    with tarfile.open(d / "shard-008.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    p = d / "shard-009.tar"
    with wds.TarWriter(str(p)) as w:
        for i in range(4):
            w.write({"__key__": f"b9-{i:02d}", "conv.json": json.dumps({"text": f"sample {i} " * 4}).encode()})
    third = tarfile.open(p).getmembers()[2]
    p.write_bytes(p.read_bytes()[: third.offset_data + 5])


def test_bad_samples_are_skipped_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    keys = write_text_shards(tmp_path, 8, 3)
    add_bad_shards(tmp_path, 300)
    cfg = config(tmp_path, train_shards=[str(tmp_path / "shard-*.tar")], num_epochs=1, num_workers=0)
    loader = SplitLoader(cfg, ByteEncoder())
    with caplog.at_level(logging.WARNING, logger="rynnscale.data"):
        got = [k for b in loader for k in b.sample_keys]
    assert loader.bad_counts == {"bad_member": 1, "bad_conversation": 1, "too_long": 1, "corrupt_tar": 1}
    assert sorted(got) == sorted(keys + ["b8-00", "b8-04", "b9-00", "b9-01"])
    assert loader.samples_seen == len(keys) + 5 + 3
    log = caplog.text
    for reason, key in [("bad_member", "b8-01"), ("bad_conversation", "b8-02"), ("too_long", "b8-03"),
                        ("corrupt_tar", "b9-02")]:
        assert f"({reason})" in log and f"key={key}" in log
    assert "shard-008.tar" in log and "shard-009.tar" in log
    assert loader.stats()["bad"] == loader.bad_counts



@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_after_a_splits_last_batch_are_counted(tmp_path: Path, workers: int) -> None:
    """Evaluation's one-epoch splits: bad samples read after a reader's last batch, or by a reader whose share
    yields no batch at all, are counted too (the counts used to arrive only with a batch: 0 here)."""
    with wds.TarWriter(str(tmp_path / "shard-000.tar")) as w:   # rank 0's split: a good sample, then 2 bad
        for i, text in enumerate(["fine sample", "BAD one", "BAD two"]):
            w.write({"__key__": f"a{i}", "conv.json": json.dumps({"text": text}).encode()})
    with wds.TarWriter(str(tmp_path / "shard-001.tar")) as w:   # rank 1's split: bad only
        for i in range(3):
            w.write({"__key__": f"b{i}", "conv.json": json.dumps({"text": f"BAD {i}"}).encode()})
    counts, seen = [], []
    for rank in range(2):
        lc = LoaderConfig(train_shards=[str(tmp_path / "shard-00{0,1}.tar")], num_epochs=1, shuffle_buffer=0,
                          shuffle_shards=False, micro_batch_tokens=300, max_bad_fraction=1.0, num_workers=workers)
        loader = SplitLoader(lc, ByteEncoder(), rank=rank, world_size=2)
        seen += [k for b in loader for k in b.sample_keys]
        counts.append(loader.bad_counts.get("bad_conversation", 0))
    assert seen == ["a0"] and sum(counts) == 5, counts

def _too_long_shard(d: Path, n: int, budget: int) -> None:
    with wds.TarWriter(str(d / "shard-009.tar")) as w:
        for i in range(n):
            w.write({"__key__": f"long{i:02d}", "conv.json": json.dumps({"text": "x" * (budget + 1 + i)}).encode()})


@pytest.mark.parametrize("global_order", [True, False])
def test_a_flood_of_bad_samples_is_summarised_and_counted_distinct(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                   global_order: bool) -> None:
    """20 too-long samples read in each of 4 epochs: the first 5 are named, then a count summary at 8, 16, 32
    and 64 (not 80 warnings); the counts say 80 skipped, 20 distinct samples."""
    write_text_shards(tmp_path, 2, 20)
    _too_long_shard(tmp_path, 20, 300)
    cfg = config(tmp_path, train_shards=[str(tmp_path / "shard-00[019].tar")], num_workers=0, num_epochs=4,
                 max_bad_fraction=0.5)
    loader = (TrainLoader if global_order else SplitLoader)(cfg, ByteEncoder())
    with caplog.at_level(logging.WARNING, logger="rynnscale.data"):
        assert sum(b.num_samples for b in micro_batches(loader)) == 4 * 40
    assert loader.bad_counts == {"too_long": 80} and loader.bad_distinct == {"too_long": 20}
    assert loader.bad_summary() == "too_long=80 (20 distinct)"
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("skipping bad sample (too_long)" in m for m in msgs) == 5
    summaries = [m for m in msgs if "bad samples so far" in m]
    assert [m.split(": ")[1].split(" bad")[0] for m in summaries] == ["8", "16", "32", "64"], summaries
    assert summaries[-1].endswith("64 bad samples so far (too_long=64 (20 distinct))")


def test_bad_fraction_is_checked_once_a_small_data_set_was_read(tmp_path: Path) -> None:
    """Fewer samples than ``min_samples_for_bad_check``: the global order checks the bad fraction once the
    data was read once (not after reading the same 60 samples again and again up to 200)."""
    write_text_shards(tmp_path, 2, 20)
    _too_long_shard(tmp_path, 20, 300)
    cfg = config(tmp_path, train_shards=[str(tmp_path / "shard-00[019].tar")], num_workers=0)
    with pytest.raises(BadDataError, match=r"^20 of 60 samples \(33.3%\) were bad in rank 0 worker 0 \(global order\), "
                                           r"more than max_bad_fraction=0.05 \(too_long=20\); too_long: .*"
                                           r"micro_batch_tokens=300: raise train.micro_batch_tokens"):
        for _ in TrainLoader(cfg, ByteEncoder()):
            pass


def test_bad_fraction_is_checked_in_a_one_epoch_run_and_all_bad_data_is_an_error(tmp_path: Path) -> None:
    """One epoch of fewer samples than ``min_samples_for_bad_check``: the fraction is judged when the stream ends
    (before: never, as no next epoch came). Every sample bad with the guard off (max_bad_fraction=1): an error
    once a whole epoch gave nothing (before: the endless loader re-read the data forever, no step, no error)."""
    with wds.TarWriter(str(tmp_path / "shard-000.tar")) as w:
        for i in range(10):
            w.write({"__key__": f"k{i}", "conv.json": json.dumps({"text": ("BAD " if i < 6 else "ok ") + str(i)}
                                                                 ).encode()})
    one = config(tmp_path, train_shards=[str(tmp_path / "shard-000.tar")], num_workers=0, num_epochs=1,
                 micro_batch_tokens=100, pack_window=2, shuffle_buffer=4)
    with pytest.raises(BadDataError, match=r"6 of 10 samples .* max_bad_fraction=0.05"):
        for _ in TrainLoader(one, ByteEncoder()):
            pass
    allbad = config(tmp_path, train_shards=[str(tmp_path / "shard-000.tar")], num_workers=0, micro_batch_tokens=3,
                    pack_window=2, shuffle_buffer=4, max_bad_fraction=1.0)
    with pytest.raises(BadDataError, match="a whole epoch of every data source held no usable sample"):
        next(iter(TrainLoader(allbad, ByteEncoder())))


def test_bad_fraction_guard(tmp_path: Path) -> None:
    torch.manual_seed(0)
    write_text_shards(tmp_path, 1, 10)
    with wds.TarWriter(str(tmp_path / "shard-001.tar")) as w:
        for i in range(10):
            w.write({"__key__": f"bad{i}", "conv.json": json.dumps({"text": "BAD " * 5}).encode()})
    cfg = config(tmp_path, train_shards=[str(tmp_path / "shard-00[01].tar")], num_workers=0, shuffle_shards=False,
                 shuffle_buffer=0, max_bad_fraction=0.3, min_samples_for_bad_check=12)
    with pytest.raises(BadDataError, match=r"of 1\d samples .* rank 0 worker 0.*max_bad_fraction=0.3 \(bad_conversation=\d+\)"):
        for _ in SplitLoader(cfg, ByteEncoder()):
            pass
    # at the limit (10 good shard first, then 10 bad: 50% bad, limit 0.5) the epoch runs through
    ok = config(tmp_path, train_shards=[str(tmp_path / "shard-00[01].tar")], num_workers=0, num_epochs=1,
                shuffle_shards=False, shuffle_buffer=0, max_bad_fraction=0.5, min_samples_for_bad_check=5)
    loader = SplitLoader(ok, ByteEncoder())
    assert sum(b.num_samples for b in loader) == 10
    assert loader.bad_counts == {"bad_conversation": 10} and loader.samples_seen == 20


def test_real_writer_and_encoder_end_to_end(tmp_path: Path) -> None:
    """Synthetic shards from the real generator/ShardWriter, the real SampleEncoder, 2 ranks of the global
    order: with exact manifest cost hints the plan equals the one made by encoding every sample, nothing
    overflows, every sample comes out once, and transformers recovers our cu_seqlens from the position ids."""
    from rynnscale.data.encode import SampleEncoder
    from rynnscale.data.tokenizer import load_tokenizer
    from rynnscale.data_pipelines.synthetic import generate_synthetic

    torch.manual_seed(0)
    enc = SampleEncoder(load_tokenizer())

    def hints(key, members):
        e = enc.encode(key, members)
        return {"num_tokens": e.num_tokens, "vision_patches": e.num_vision_patches}

    generate_synthetic(tmp_path / "hinted", 24, seed=3, samples_per_shard=6, cost_fn=hints, progress=False)
    generate_synthetic(tmp_path / "plain", 24, seed=3, samples_per_shard=6, progress=False)  # no num_tokens hints
    out = {}
    for name in ("hinted", "plain"):
        cfg = LoaderConfig(train_shards=[str(tmp_path / name / "*.tar")], seed=1, micro_batch_tokens=400,
                           pack_window=6, shuffle_buffer=4, num_workers=1, num_epochs=1, micro_batches_per_step=2)
        ranks = [TrainLoader(cfg, enc, rank=r, world_size=2) for r in range(2)]
        out[name] = [[batch_fingerprint(b) for b in micro_batches(L) if not b.filler] for L in ranks]
        for L in ranks:
            assert L.stats()["estimate_overflow"] == 0 and L.bad_counts == {}
    assert out["hinted"] == out["plain"]
    keys = [k for r in out["hinted"] for fp in r for k in fp[0]]
    assert len(keys) == len(set(keys)) == 24
    cfg = LoaderConfig(train_shards=[str(tmp_path / "hinted" / "*.tar")], micro_batch_tokens=400, pack_window=6,
                       num_workers=0, num_epochs=1)
    for b in SplitLoader(cfg, enc):
        b.validate()
        assert b.video_grid_thw is not None and b.video_grid_thw.shape[0] == b.num_samples
        (cu_hf, _), _ = prepare_fa_kwargs_from_position_ids(b.position_ids_3l[0][None])
        assert torch.equal(cu_hf, b.cu_seqlens)


def test_config_from_run_config(tmp_path: Path) -> None:
    from rynnscale.config.schema import RootConfig

    rc = RootConfig()
    rc.data.train_shards = [str(tmp_path / "x-*.tar")]
    rc.data.pack_window, rc.train.micro_batch_tokens, rc.train.grad_accum = 16, 2048, 4
    cfg = LoaderConfig.from_run_config(rc, balance="tokens")
    assert (cfg.pack_window, cfg.micro_batch_tokens, cfg.micro_batches_per_step, cfg.balance) == (16, 2048, 4, "tokens")
    from rynnscale.data.reader import ShardPatternError

    with pytest.raises(ShardPatternError, match="x-\\*.tar' matches no file"):
        TrainLoader(cfg, ByteEncoder())


@pytest.mark.parametrize("global_order", [False, True])
def test_iterating_draws_nothing_from_the_global_generators(tmp_path: Path, global_order: bool) -> None:
    """A resumed run restores torch's generator and then starts a new iterator: a draw there (DataLoader's worker
    base seed, by default) would shift every later dropout mask against the straight run."""
    write_text_shards(tmp_path, 8, 4)
    loader = (TrainLoader if global_order else SplitLoader)(config(tmp_path, num_workers=0), ByteEncoder(), rank=0,
                                                          world_size=2)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    it = iter(loader)
    take(it, 2)
    it.close()
    assert torch.equal(torch.get_rng_state(), before)


class _HangingEncoder(ByteEncoder):
    """Hangs on one sample, as a decode stuck on a stalled file system would."""

    def encode(self, key, members):
        if key == "s0-03":
            import time
            time.sleep(3600)
        return super().encode(key, members)


def test_a_hung_worker_is_a_data_stall_error_not_a_hang(tmp_path):
    """A data worker stuck in one sample's decode hung a single-process run forever (torch's DataLoader waits
    without limit by default; a multi-rank run hit the collective timeout instead, naming nothing about the data).
    With workers, no batch for ``worker_timeout_s`` is a DataStallError naming the setting, so a restart resumes."""
    from rynnscale.data.loader import DataStallError

    write_text_shards(tmp_path, 1, 8)
    cfg = LoaderConfig(train_shards=[str(tmp_path / "*.tar")], micro_batch_tokens=64, pack_window=2,
                       shuffle_buffer=0, num_workers=1, worker_timeout_s=2, num_epochs=1,
                       multiprocessing_context="fork")
    with pytest.raises(DataStallError, match=r"no batch from its 1 data workers in 2 s \(data.worker_timeout_s\)"):
        for _ in TrainLoader(cfg, _HangingEncoder()):
            pass
    with pytest.raises(ValueError, match="worker_timeout_s"):
        LoaderConfig(train_shards=["x"], worker_timeout_s=float("inf")).validate()


class _KilledEncoder(ByteEncoder):
    """SIGKILLs the data worker process on one sample, as the kernel's out-of-memory killer would."""

    def encode(self, key, members):
        from torch.utils.data import get_worker_info

        if key == "s0-03" and get_worker_info() is not None:   # never the test process itself
            import os
            import signal
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode(key, members)


def test_a_killed_worker_is_a_data_worker_error_saying_what_to_do(tmp_path):
    """A data worker killed by the OOM killer surfaced as torch's bare ``RuntimeError: DataLoader worker (pid(s) N)
    exited unexpectedly`` with a traceback, naming neither the rank nor what to change."""
    from rynnscale.data.loader import DataWorkerError, data_worker_error

    write_text_shards(tmp_path, 1, 8)
    cfg = LoaderConfig(train_shards=[str(tmp_path / "*.tar")], micro_batch_tokens=64, pack_window=2,
                       shuffle_buffer=0, num_workers=1, worker_timeout_s=60, num_epochs=1,
                       multiprocessing_context="fork")
    with pytest.raises(DataWorkerError, match=r"rank 0: one of its 1 data workers died .*data.num_workers"):
        for _ in TrainLoader(cfg, _KilledEncoder()):
            pass
    # torch's other message, raised by its SIGCHLD handler wherever the main thread is (the trainer converts it)
    died = data_worker_error(RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed. "), 2, 4)
    assert isinstance(died, DataWorkerError) and "rank 2: one of its 4 data workers died" in str(died)
    assert data_worker_error(RuntimeError("CUDA out of memory"), 0, 1) is None


def test_closing_an_iteration_stops_its_data_workers(tmp_path):
    """An iteration closed early (evaluation's, a test's) leaves no data worker process behind."""
    import gc
    import multiprocessing
    import time

    write_text_shards(tmp_path, 2, 10)
    loader = TrainLoader(LoaderConfig(train_shards=[str(tmp_path / "*.tar")], micro_batch_tokens=100, num_workers=2,
                                      multiprocessing_context="fork"), ByteEncoder())
    others = set(multiprocessing.active_children())   # children of other tests in this (xdist worker) process

    def workers() -> set:
        return set(multiprocessing.active_children()) - others

    it = iter(loader)
    next(it)
    assert len(workers()) == 2
    it.close()
    del it
    gc.collect()
    deadline = time.monotonic() + 10
    while workers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not workers()
