"""Weighted data mixtures: source frequencies follow the weights, sources cycle independently,
small sources split at the sample level, exact resume (2 ranks x 2 workers), the single-source
path is unchanged, bad-sample accounting, clear errors, and a real recipe's ``data.mixture``."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from test_loader_resume import (
    ByteEncoder,
    add_bad_shards,
    batch_fingerprint,
    take,
    text_of,
)

from rynnscale.data.loader import LoaderConfig, LoaderStateError, MixtureSource, SplitLoader, TrainLoader
from rynnscale.data.reader import (
    MixtureStream,
    ShardPatternError,
    ShardStream,
    expand_shard_patterns,
    iter_tar_samples,
)

REPO = Path(__file__).resolve().parents[2]


def write_source(d: Path, name: str, n_shards: int, per_shard: int, seed: int = 0) -> list[str]:
    """``n_shards`` tars of ``per_shard`` short text samples under ``d/name``; returns the keys."""
    d = d / name
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys = []
    for s in range(n_shards):
        with wds.TarWriter(str(d / f"{name}-{s:03d}.tar")) as w:
            for i in range(per_shard):
                k = f"{name}{s}-{i:02d}"
                w.write({"__key__": k, "conv.json": json.dumps({"text": text_of(k, rng)}).encode()})
                keys.append(k)
    return keys


def source_of(key: str) -> str:
    return key.rstrip("-0123456789").rstrip("0123456789")


# sizes differ a lot: "big" 4 shards x 40, "mid" 2 shards x 6 (fewer shards than 4 readers), "small" 1 x 8
SOURCES = [("big", 4, 40, 0.5), ("mid", 2, 6, 0.3), ("small", 1, 8, 0.2)]


@pytest.fixture
def mix_dir(tmp_path: Path) -> Path:
    for i, (name, n, per, _) in enumerate(SOURCES):
        write_source(tmp_path, name, n, per, seed=i)
    return tmp_path


def mixture(d: Path, weights: dict[str, float] | None = None) -> list[MixtureSource]:
    return [MixtureSource(name, [str(d / name / "*.tar")], (weights or {}).get(name, w)) for name, _, _, w in SOURCES]


def stream_sources(d: Path) -> list[tuple[str, float, list[str]]]:
    return [(name, w, sorted(str(p) for p in (d / name).glob("*.tar"))) for name, _, _, w in SOURCES]


def test_source_frequencies_match_weights(mix_dir: Path) -> None:
    """3000 draws of one reader split (1 of 4): each source's count within 3 binomial sigma of
    N * weight; the small source restarts its epochs while the big one continues."""
    torch.manual_seed(0)
    N = 3000
    st = MixtureStream(stream_sources(mix_dir), seed=11, split=1, num_splits=4)
    it = iter(st)
    got = [source_of(next(it).key) for _ in range(N)]
    total_w = sum(w for _, _, _, w in SOURCES)
    for k, (name, _, _, w) in enumerate(SOURCES):
        p = w / total_w
        n = got.count(name)
        assert n == st.taken[k]
        assert abs(n - N * p) <= 3 * math.sqrt(N * p * (1 - p)), (name, n, N * p)
    # every source cycles through its own epochs: (samples taken - 1) // (samples per epoch of this split)
    for k, (name, _, shards) in enumerate(stream_sources(mix_dir)):
        per_epoch = len(list(ShardStream(shards, seed=0, split=1, num_splits=4, epochs=1, sample_split=True)))
        assert st.state["sources"][k]["epoch"] == (st.taken[k] - 1) // per_epoch, name
    assert st.state["sources"][2]["epoch"] > 1.5 * st.state["sources"][0]["epoch"]  # "small" repeats far more often
    # the draws are a pure function of (seed, split, counter): another seed gives another sequence
    again = iter(MixtureStream(stream_sources(mix_dir), seed=11, split=1, num_splits=4))
    assert [source_of(next(again).key) for _ in range(200)] == got[:200]
    other = iter(MixtureStream(stream_sources(mix_dir), seed=12, split=1, num_splits=4))
    assert [source_of(next(other).key) for _ in range(200)] != got[:200]


def test_sample_level_split_of_small_source(tmp_path: Path) -> None:
    """2 shards over 4 readers: every epoch, the readers' samples are disjoint and cover the
    source once; too few samples for the readers is an error naming the source, not a hang."""
    keys = write_source(tmp_path, "mid", 2, 6)
    shards = sorted(str(p) for p in (tmp_path / "mid").glob("*.tar"))
    for epoch in range(2):
        per_split = []
        for split in range(4):
            s = ShardStream(shards, seed=3, split=split, num_splits=4, epochs=epoch + 1, sample_split=True)
            s.epoch = epoch
            per_split.append([x.key for x in s])
        flat = [k for ks in per_split for k in ks]
        assert sorted(flat) == sorted(keys)
        assert max(map(len, per_split)) - min(map(len, per_split)) <= len(shards)  # within one sample per shard
    with pytest.raises(ShardPatternError, match="cannot feed 4 readers"):
        ShardStream(shards, seed=3, split=0, num_splits=4)  # without sample_split: as before
    tiny = write_source(tmp_path, "tiny", 1, 2)
    assert len(tiny) == 2
    s = ShardStream([str(tmp_path / "tiny" / "tiny-000.tar")], seed=0, split=3, num_splits=4, sample_split=True,
                    name="tiny")
    with pytest.raises(ShardPatternError, match="source 'tiny': reader split 3/4 got no samples"):
        next(iter(s))


def test_mixture_resume_two_ranks_two_workers(mix_dir: Path) -> None:
    """Read N batches, save (as JSON), read M more; a fresh loader restored from the state yields
    the same M batches and the same per-source counters; the small sources pass several epochs."""
    torch.manual_seed(0)
    cfg = LoaderConfig(mixture=mixture(mix_dir), seed=7, micro_batch_tokens=200, pack_window=16, shuffle_buffer=5,
                       num_workers=2)
    N, M = 8, 12
    for rank in range(2):
        loader = SplitLoader(cfg, ByteEncoder(), rank=rank, world_size=2)
        it = iter(loader)
        head = take(it, N)
        state = json.loads(json.dumps(loader.state_dict()))
        assert all(w["shuffle"]["buffer"] and w["packer"]["items"] for w in state["workers"])
        tail = take(it, M)
        it.close()
        for b in head + tail:
            b.validate()
        fresh = SplitLoader(cfg, ByteEncoder(), rank=rank, world_size=2)
        fresh.load_state_dict(state)
        it2 = iter(fresh)
        again = take(it2, M)
        it2.close()
        assert [batch_fingerprint(b) for b in again] == [batch_fingerprint(b) for b in tail]
        st = loader.stats()
        assert fresh.stats() == st
        src = st["sources"]
        assert set(src) == {"big", "mid", "small"}
        assert sum(s["samples_seen"] for s in src.values()) == st["samples_seen"]
        assert src["big"]["epochs"] == 0 and src["small"]["epochs"] >= 2  # independent cycling
        assert {source_of(k) for b in tail for k in b.sample_keys} == {"big", "mid", "small"}


def test_one_source_mixture_reads_like_train_shards(tmp_path: Path) -> None:
    """mixture=[one source, weight 1] gives byte-identical batches to train_shards (2 ranks x 2
    workers, 6 shards of 5: 15 samples per rank and epoch, so 15 batches cross several epochs)."""
    torch.manual_seed(0)
    write_source(tmp_path, "one", 6, 5)
    pattern = [str(tmp_path / "one" / "*.tar")]
    base = dict(seed=3, micro_batch_tokens=200, pack_window=8, shuffle_buffer=4, num_workers=2)
    for rank in range(2):
        out = []
        for kw in (dict(train_shards=pattern), dict(mixture=[MixtureSource("only", pattern, 1.0)])):
            it = iter(SplitLoader(LoaderConfig(**base, **kw), ByteEncoder(), rank=rank, world_size=2))
            out.append([batch_fingerprint(b) for b in take(it, 15)])
            it.close()
        assert out[0] == out[1]


@pytest.mark.parametrize("num_epochs", [1, 2])
def test_finite_mixture_reads_every_sample_num_epochs_times(mix_dir: Path, num_epochs: int) -> None:
    """A source that finished its epochs drops out of the draw; over 2 ranks every sample of every
    source comes out exactly num_epochs times (in one epoch the ranks' samples are disjoint)."""
    torch.manual_seed(0)
    cfg = LoaderConfig(mixture=mixture(mix_dir), seed=1, micro_batch_tokens=300, pack_window=8, shuffle_buffer=0,
                       num_workers=2, num_epochs=num_epochs)
    all_keys = [s.key for name, _, _, _ in SOURCES for p in sorted((mix_dir / name).glob("*.tar"))
                for s in iter_tar_samples(str(p))]
    per_rank = []
    for rank in range(2):
        loader = SplitLoader(cfg, ByteEncoder(), rank=rank, world_size=2)
        per_rank.append([k for b in loader for k in b.sample_keys])
        src = loader.stats()["sources"]
        assert all(s["epochs"] == num_epochs for s in src.values())
    got = per_rank[0] + per_rank[1]
    assert sorted(got) == sorted(all_keys * num_epochs)
    if num_epochs == 1:
        assert set(per_rank[0]).isdisjoint(per_rank[1])  # every sample belongs to one reader split


def test_bad_samples_in_a_mixture_are_counted_once(mix_dir: Path) -> None:
    """A source with bad shards: the same reasons and counts as a plain loader reports; the
    per-source samples_seen count the bad ones of their source."""
    torch.manual_seed(0)
    bad_dir = mix_dir / "bad"
    bad_dir.mkdir()
    add_bad_shards(bad_dir, 300)
    mix = [MixtureSource("small", [str(mix_dir / "small" / "*.tar")], 1.0),
           MixtureSource("bad", [str(bad_dir / "*.tar")], 1.0)]
    cfg = LoaderConfig(mixture=mix, seed=2, micro_batch_tokens=300, pack_window=4, shuffle_buffer=3, num_workers=0,
                       num_epochs=1)
    loader = SplitLoader(cfg, ByteEncoder())
    got = [k for b in loader for k in b.sample_keys]
    assert loader.bad_counts == {"bad_member": 1, "bad_conversation": 1, "too_long": 1, "corrupt_tar": 1}
    assert sorted(got) == sorted([f"small0-{i:02d}" for i in range(8)] + ["b8-00", "b8-04", "b9-00", "b9-01"])
    src = loader.stats()["sources"]
    assert (src["small"]["samples_seen"], src["bad"]["samples_seen"]) == (8, 5 + 3)
    assert loader.samples_seen == 16


def test_mixture_errors_are_clear(mix_dir: Path) -> None:
    big, small = [str(mix_dir / "big" / "*.tar")], [str(mix_dir / "small" / "*.tar")]
    with pytest.raises(ValueError, match="both train_shards=.* and a mixture"):
        SplitLoader(LoaderConfig(train_shards=big, mixture=[MixtureSource("a", small)]), ByteEncoder())
    with pytest.raises(ValueError, match=r"mixture\[1\].weight' = 0 of source 'b' must be a finite number > 0"):
        SplitLoader(LoaderConfig(mixture=[MixtureSource("a", small), MixtureSource("b", big, 0)]), ByteEncoder())
    with pytest.raises(ValueError, match=r"the weights sum to inf .* scale them down"):   # draws: all the last's
        SplitLoader(LoaderConfig(mixture=[MixtureSource("a", small, 1e308), MixtureSource("b", big, 1e308)]),
                    ByteEncoder())
    with pytest.raises(ValueError, match=r"weights \[1e\+308, 1e\+308\] sum to inf"):
        MixtureStream([("a", 1e308, small), ("b", 1e308, big)], seed=0, split=0, num_splits=1)
    with pytest.raises(ValueError, match=r"mixture\[1\].name' = 'a' must be a non-empty name unique"):
        SplitLoader(LoaderConfig(mixture=[MixtureSource("a", small), MixtureSource("a", big)]), ByteEncoder())
    with pytest.raises(ShardPatternError, match="mixture source 'gone': shard pattern .* matches no file"):
        SplitLoader(LoaderConfig(mixture=[MixtureSource("gone", [str(mix_dir / "nope-*.tar")])]), ByteEncoder())
    with pytest.raises(ShardPatternError, match="is in mixture sources 'a' and 'b'"):
        SplitLoader(LoaderConfig(mixture=[MixtureSource("a", small + big), MixtureSource("b", big)]), ByteEncoder())
    # the same files through a symlinked directory: one source's shards once, two sources' refused
    (mix_dir / "biglink").symlink_to(mix_dir / "big")
    linked = [str(mix_dir / "biglink" / "*.tar")]
    assert expand_shard_patterns(big + linked) == expand_shard_patterns(big)
    with pytest.raises(ShardPatternError, match="is in mixture sources 'a' and 'b'"):
        SplitLoader(LoaderConfig(mixture=[MixtureSource("a", big), MixtureSource("b", linked)]), ByteEncoder())
    # a state cannot be replayed under other weights, nor into a train_shards loader
    cfg = LoaderConfig(mixture=mixture(mix_dir), micro_batch_tokens=200, num_workers=0)
    a = SplitLoader(cfg, ByteEncoder())
    it = iter(a)
    next(it)
    it.close()
    sd = a.state_dict()
    b = SplitLoader(LoaderConfig(mixture=mixture(mix_dir, {"small": 0.5}), micro_batch_tokens=200, num_workers=0),
                    ByteEncoder())
    with pytest.raises(LoaderStateError, match="saved with mixture=.*'small', 0.2.*but this loader has mixture="):
        b.load_state_dict(sd)
    shards = [s for m in mixture(mix_dir) for s in m.shards]
    c = SplitLoader(LoaderConfig(train_shards=shards, micro_batch_tokens=200, num_workers=0), ByteEncoder())
    with pytest.raises(LoaderStateError, match="but this loader has mixture=None"):
        c.load_state_dict(sd)


def test_recipe_mixture_reaches_the_loader(tmp_path: Path) -> None:
    """recipes/finetune/planning.yaml's data.mixture (planning 0.8, spatial_grounding 0.2) -> a loader
    that reads both sources under data.root."""
    from rynnscale.config.load import load_config

    torch.manual_seed(0)
    write_source(tmp_path, "planning", 2, 10)
    write_source(tmp_path, "spatial_grounding", 1, 10)
    rc = load_config(REPO / "recipes" / "finetune" / "planning.yaml", [f"data.root={tmp_path}"], check_paths=False)
    cfg = LoaderConfig.from_run_config(rc, micro_batch_tokens=300, num_workers=0, shuffle_buffer=4, pack_window=4)
    assert [(m.name, m.weight) for m in cfg.mixture] == [("planning", 0.8), ("spatial_grounding", 0.2)]
    loader = SplitLoader(cfg, ByteEncoder())
    it = iter(loader)
    keys = [k for b in take(it, 12) for k in b.sample_keys]
    it.close()
    assert {source_of(k) for k in keys} == {"planning", "spatial_grounding"}
    assert set(loader.stats()["sources"]) == {"planning", "spatial_grounding"}


@pytest.mark.parametrize("pack_window,hot_weight", [(4, 0.5), (8, 0.9)])
def test_a_source_left_alone_does_not_stall_behind_the_epoch_barrier(tmp_path: Path, pack_window: int,
                                                                     hot_weight: float) -> None:
    """Global order, a finite mixture whose light source finishes its epochs first: the heavy one's next-epoch
    samples wait behind the barrier for a window that nothing else fills any more. They wait for at most a
    window (then it is packed out at once); before, a whole epoch of them (200 samples) was read and held in
    memory with no step made. Every sample still comes out num_epochs times."""
    write_source(tmp_path, "hot", 4, 50, seed=1)
    write_source(tmp_path, "cold", 2, 10, seed=2)
    mix = [MixtureSource("hot", [str(tmp_path / "hot" / "*.tar")], hot_weight),
           MixtureSource("cold", [str(tmp_path / "cold" / "*.tar")], 1 - hot_weight)]
    cfg = LoaderConfig(mixture=mix, seed=1, micro_batch_tokens=300, pack_window=pack_window, shuffle_buffer=4,
                       num_epochs=3)
    loader = TrainLoader(cfg, ByteEncoder(), rank=0, world_size=2)
    seen, names = [0], []
    for step in loader:
        seen.append(loader.samples_seen)
        names += step.samples
    window = pack_window * 2
    assert max(b - a for a, b in zip(seen, seen[1:])) <= 3 * window + cfg.shuffle_buffer
    assert len(names) == 3 * 220 and set(Counter(names).values()) == {3}
