"""Deferred media (``ReaderLimits.defer_media``, ``data.defer_media``): in global order a rank reads the
media bytes of its own samples only, by position, while every rank still walks the same tar headers and
plans the same steps. Batches must be bitwise those of the eager reader; each sample's media must be
read by exactly one rank when the manifest has cost hints; the tar walk must give the same samples, keys
and bad reasons either way; a shard that changes under the loader is a counted bad sample."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rynnscale.data.encode import SampleEncoder
from rynnscale.data.loader import LoaderConfig, TrainLoader
from rynnscale.data.reader import (
    DeferredMedia,
    MediaReadError,
    ReaderLimits,
    iter_tar_samples,
    read_deferred,
    read_positions,
    sample_bytes,
)
from rynnscale.data.tokenizer import load_tokenizer
from rynnscale.data_pipelines.shard_stats import cost_hints
from rynnscale.data_pipelines.synthetic import generate_synthetic

DEFER = ReaderLimits(defer_media=True)


@pytest.fixture(scope="module")
def enc() -> SampleEncoder:
    return SampleEncoder(load_tokenizer())


@pytest.fixture(scope="module")
def hinted(tmp_path_factory) -> Path:
    """24 synthetic egocentric clips in 4 shards, with the converters' exact cost hints in the manifest."""
    d = tmp_path_factory.mktemp("deferred")
    generate_synthetic(d, 24, seed=11, samples_per_shard=6, frames=4, progress=False, cost_fn=cost_hints)
    return d


def _full(s) -> dict:
    return s.members | (read_deferred(s.shard, s.deferred) if s.deferred is not None else {})


def _tar(path: Path, entries: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return str(path)


def _conv(*media: str) -> bytes:
    content = [{"type": "video", "video": m} for m in media] + [{"type": "text", "text": "what moved?"}]
    return json.dumps({"conversation": [{"role": "user", "content": content},
                                        {"role": "assistant", "content": "the cup"}]}).encode()


def test_walk_is_the_same_and_media_read_back_bitwise(hinted: Path, tmp_path: Path) -> None:
    """Same (index, key, bad reason, byte count) in both modes, over good shards and hostile ones; reading the
    deferred spans back gives the eager members exactly; media are never read during a deferred walk."""
    hostile = [
        _tar(tmp_path / "order.tar", [("a.video.mp4", b"v" * 700), ("a.conv.json", _conv("video.mp4")),
                                      ("b.conv.json", _conv("video.mp4")), ("b.video.mp4", b"w" * 900),
                                      ("b.extra.mp4", b"x" * 50)]),          # named by nobody: skipped after conv
        _tar(tmp_path / "dup.tar", [("c.conv.json", _conv("video.mp4")), ("c.video.mp4", b"1" * 10),
                                    ("c.video.mp4", b"2" * 10), ("d.conv.json", _conv("video.mp4")),
                                    ("d.video.mp4", b"3" * 30)]),
    ]
    cut = tmp_path / "cut.tar"   # truncated inside b.video.mp4 (its data starts at byte 4096)
    cut.write_bytes(Path(hostile[0]).read_bytes()[:4096 + 500])
    shards = sorted(str(p) for p in hinted.glob("*.tar")) + hostile + [str(cut)]
    for shard in shards:
        eager = list(iter_tar_samples(shard))
        lazy = list(iter_tar_samples(shard, DEFER))
        assert [(s.index, s.key, s.bad_reason) for s in eager] == [(s.index, s.key, s.bad_reason) for s in lazy], shard
        for e, z in zip(eager, lazy):
            assert sample_bytes(e) == sample_bytes(z)
            if not e.is_bad:
                assert not any(m.endswith((".mp4", ".jpg", ".png")) for m in z.members)   # nothing media read yet
                assert _full(z) == e.members
    assert any(s.bad_reason == "bad_member" for s in iter_tar_samples(hostile[1], DEFER))
    assert list(iter_tar_samples(str(cut), DEFER))[-1].bad_reason == "corrupt_tar"
    pos = [s.position for s in iter_tar_samples(shards[0])][::2]   # restore path: read by position, deferred
    assert [_full(s) for s in read_positions(pos, DEFER)] == [s.members for s in read_positions(pos)]


def test_changed_shard_is_refused_by_name(tmp_path: Path) -> None:
    shard = _tar(tmp_path / "s.tar", [("k.conv.json", _conv("video.mp4")), ("k.video.mp4", b"z" * 4000)])
    (s,) = list(iter_tar_samples(shard, DEFER))
    assert isinstance(s.deferred, DeferredMedia) and s.deferred.nbytes == 4000
    with open(shard, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(MediaReadError, match="s.tar has .* it changed"):
        read_deferred(shard, s.deferred)
    with pytest.raises(MediaReadError, match="truncated"):
        read_deferred(shard, replace(s.deferred, shard_bytes=os.path.getsize(shard),
                                     spans=(("video.mp4", os.path.getsize(shard) - 100, 4000),)))


def _cfg(d: Path, **kw) -> LoaderConfig:
    base = dict(train_shards=[str(d / "*.tar")], seed=4, micro_batch_tokens=700, pack_window=3, shuffle_buffer=5,
                num_epochs=1)
    return LoaderConfig(**(base | kw))


def _batches(loader: TrainLoader) -> list:
    return [b for st in loader for b in st.micro_batches]


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k, v in vars(x).items():
            w = getattr(y, k)
            assert (torch.equal(v, w) and v.dtype == w.dtype) if isinstance(v, torch.Tensor) else v == w, k


@pytest.mark.parametrize("world,ga,workers", [(2, 1, 0), (4, 1, 1), (1, 2, 0)])
def test_each_rank_reads_only_its_own_media(hinted: Path, enc, world: int, ga: int, workers: int) -> None:
    total_media = sum(sample_bytes(s) - sum(len(v) for v in s.members.values())
                      for p in sorted(hinted.glob("*.tar")) for s in iter_tar_samples(str(p), DEFER))
    read = []
    for rank in range(world):
        kw = dict(micro_batches_per_step=ga, num_workers=workers)
        torch.manual_seed(0)
        lazy = TrainLoader(_cfg(hinted, **kw), enc, rank=rank, world_size=world)
        got = _batches(lazy)
        torch.manual_seed(0)
        _assert_same(got, _batches(TrainLoader(_cfg(hinted, defer_media=False, **kw), enc, rank=rank, world_size=world)))
        assert lazy.bad_counts == {} and got
        read.append(lazy.stats()["media_bytes_read"])
    assert sum(read) == total_media                      # every clip's media read once, by the rank that trains it
    assert world == 1 or max(read) < 0.75 * total_media  # and not by the others


def test_media_that_cannot_be_read_back_are_counted_not_fatal(hinted: Path, enc, monkeypatch, caplog) -> None:
    """Deferred media that fail to read (the shard changed after its headers were walked): the rank that
    decodes the sample counts it bad (``corrupt_tar``, shard and key in the warning) and trains the rest."""
    import rynnscale.data.worker as loader_mod

    victims = {s.key for s in iter_tar_samples(str(sorted(hinted.glob("*.tar"))[1]))}
    real = loader_mod.read_deferred

    def flaky(shard, media):
        if os.path.basename(shard) == sorted(hinted.glob("*.tar"))[1].name:
            raise MediaReadError(f"shard {os.path.basename(shard)} has 1 bytes, 2 when it was indexed: it changed")
        return real(shard, media)

    monkeypatch.setattr(loader_mod, "read_deferred", flaky)
    loader = TrainLoader(_cfg(hinted, max_bad_fraction=0.5), enc)   # 6 of 24: within this limit, over the default
    keys = [k for b in _batches(loader) for k in b.sample_keys]
    assert loader.bad_counts == {"corrupt_tar": len(victims)}
    assert len(keys) == 24 - len(victims) and not victims & set(keys)
    assert "it changed" in caplog.text and sorted(victims)[0] in caplog.text


def test_without_hints_every_rank_measures_then_lets_the_media_go(hinted: Path, enc, tmp_path: Path) -> None:
    """No cost hints: every rank reads each sample's media to measure it and drops them (the packing window
    holds no media at any world size); the decoding rank reads them again. Batches stay bitwise the eager ones."""
    from rynnscale.data.global_order import GlobalPipeline
    from rynnscale.data.loader import _expand_sources
    from rynnscale.data.manifest import MANIFEST_NAME, read_manifest

    m = read_manifest(hinted)
    m = replace(m, shards=tuple(replace(x, sample_costs={}) for x in m.shards))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(m.to_json()))
    for p in hinted.glob("*.tar"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    total_media = sum(s.deferred.nbytes for p in sorted(tmp_path.glob("*.tar"))
                      for s in iter_tar_samples(str(p), DEFER) if s.deferred is not None)
    read = []
    for rank in range(2):
        torch.manual_seed(0)
        lazy = TrainLoader(_cfg(tmp_path), enc, rank=rank, world_size=2)
        got = _batches(lazy)
        torch.manual_seed(0)
        _assert_same(got, _batches(TrainLoader(_cfg(tmp_path, defer_media=False), enc, rank=rank, world_size=2)))
        read.append(lazy.stats()["media_bytes_read"])
    assert sum(read) == 3 * total_media   # measured by both ranks, decoded by one
    cfg = _cfg(tmp_path)
    pipe = GlobalPipeline(cfg, enc, None, _expand_sources(cfg), 0, 2, 0, 0, None)
    it = iter(pipe)
    next(it)
    held = [it_.ref for it_ in pipe.packer.items] + [x.ref for st in pipe.steps for b in st for x in b]
    assert held and all(e.deferred is not None and not any(k.endswith(".mp4") for k in e.members) for e in held)
