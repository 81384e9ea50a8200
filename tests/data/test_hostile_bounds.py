"""Byte bounds on untrusted shards (issues 15 and 17): compressed shards are refused (a member of a gzip'd tar
expands ~1000x past the header checks), the shuffle buffer holds at most ``data.shuffle_buffer_bytes`` of
payload (emitting early, counted), and the per-member / per-sample caps are recipe keys, validated."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import tarfile
from pathlib import Path

import pytest

from rynnscale.config.load import ConfigError, load_config
from rynnscale.data.loader import LoaderConfig
from rynnscale.data.reader import (
    RawSample,
    ReaderLimits,
    ShardStream,
    ShuffleBuffer,
    iter_tar_samples,
    sample_bytes,
    shuffled,
)

REPO = Path(__file__).resolve().parents[2]
CONV = json.dumps({"conversation": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})


def _tar_bytes(entries: list[tuple[str, bytes]]) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return bio.getvalue()


@pytest.mark.parametrize("codec", ["gzip", "xz"])
def test_compressed_shard_is_refused_not_expanded(tmp_path, codec):
    """A 64 MiB member in a ~64 KiB gzip'd (or xz'd) shard: before, tarfile's ``r:*`` inflated it into memory
    as a good sample (a 1000 MiB one passed the 1 GiB member cap); now one counted corrupt_tar naming the
    compression."""
    raw = _tar_bytes([("k000.conv.json", CONV.encode()), ("k000.action.npy", bytes(64 << 20))])
    shard = tmp_path / "bomb.tar"
    shard.write_bytes(gzip.compress(raw, 1) if codec == "gzip" else lzma.compress(raw, preset=0))
    assert shard.stat().st_size < (1 << 20)
    out = list(iter_tar_samples(str(shard)))
    assert len(out) == 1 and out[0].bad_reason == "corrupt_tar" and not out[0].members, out
    assert f"{codec}-compressed" in out[0].bad_detail and "bomb.tar" in out[0].bad_detail


def test_plain_tar_whose_first_key_looks_like_a_magic_still_reads(tmp_path):
    shard = tmp_path / "s.tar"
    shard.write_bytes(_tar_bytes([("BZh91AY.conv.json", CONV.encode())]))
    out = list(iter_tar_samples(str(shard)))
    assert [(s.key, s.bad_reason) for s in out] == [("BZh91AY", None)]


def _samples(sizes: list[int]) -> list[RawSample]:
    return [RawSample("s.tar", i, f"k{i:03d}", {"conv.json": bytes(n)}) for i, n in enumerate(sizes)]


def test_shuffle_buffer_bytes_bound_emits_early_and_counts():
    """Before: 64 samples of 1 MiB sat in a 64-sample buffer (64 MiB); with max_bytes=8 MiB it never holds more
    than 8 MiB after a push, every sample still comes out exactly once, and the early emits are counted."""
    sizes = [1 << 20] * 200
    buf = ShuffleBuffer(64, seed=1, stream=0, max_bytes=8 << 20)
    peak = 0
    out = []
    for s in _samples(sizes):
        if (o := buf.push(s)) is not None:
            out.append(o)
        while (o := buf.pop_excess()) is not None:
            out.append(o)
        peak = max(peak, buf.nbytes)
        assert buf.nbytes == sum(sample_bytes(x) for x in buf.buf)
    while (o := buf.pop()) is not None:
        out.append(o)
    assert peak <= 8 << 20 and len(buf.buf) == 0 and buf.nbytes == 0
    assert sorted(s.index for s in out) == list(range(200))
    assert [s.index for s in out] != list(range(200))   # still shuffled, within the smaller window
    assert buf.early_emits >= 190


def test_shuffle_buffer_one_huge_sample_leaves_at_once():
    buf = ShuffleBuffer(16, seed=0, stream=0, max_bytes=1000)
    small, huge = _samples([10, 5000])
    assert buf.push(small) is None and buf.pop_excess() is None
    assert buf.push(huge) is None
    gone = [buf.pop_excess(), buf.pop_excess()]
    assert buf.nbytes <= 1000 and gone[0] is not None and buf.early_emits >= 1


def test_shuffle_buffer_without_bound_is_unchanged(tmp_path):
    """Same order as before the bound existed when it is never reached (default 1 GiB, tiny samples)."""
    shard = tmp_path / "s.tar"
    shard.write_bytes(_tar_bytes([(f"k{i:03d}.conv.json", CONV.encode()) for i in range(40)]))

    def order(max_bytes: int) -> list[str]:
        st = ShardStream([str(shard)], seed=3, split=0, num_splits=1, epochs=1)
        return [s.key for s in shuffled(iter(st), ShuffleBuffer(8, seed=3, stream=0, max_bytes=max_bytes))]

    assert order(0) == order(1 << 30)
    assert order(len(CONV) * 3) != order(0)   # a 3-sample byte window shuffles differently


def test_state_restore_recomputes_bytes(tmp_path):
    shard = tmp_path / "s.tar"
    shard.write_bytes(_tar_bytes([(f"k{i:03d}.conv.json", CONV.encode()) for i in range(10)]))
    st = ShardStream([str(shard)], seed=3, split=0, num_splits=1, epochs=1)
    buf = ShuffleBuffer(4, seed=3, stream=0, max_bytes=1 << 20)
    it = shuffled(iter(st), buf)
    head = [next(it).key for _ in range(3)]
    state = (dict(st.state), buf.state)
    tail = [s.key for s in it]
    st2 = ShardStream([str(shard)], seed=3, split=0, num_splits=1, epochs=1)
    buf2 = ShuffleBuffer(4, seed=3, stream=0, max_bytes=1 << 20)
    st2.load_state(state[0])
    buf2.load_state(state[1])
    assert buf2.nbytes == 4 * len(CONV)
    assert [s.key for s in shuffled(iter(st2), buf2)] == tail and len(head + tail) == 10


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text((REPO / "recipes" / "demo_tiny.yaml").read_text())
    return p


@pytest.mark.parametrize("override,match", [
    ("data.max_member_bytes=0", "'data.max_member_bytes' = 0 must be >= 1"),
    ("data.max_sample_bytes=-5", "'data.max_sample_bytes' = -5 must be >= 0"),
    ("data.shuffle_buffer_bytes=0", "'data.shuffle_buffer_bytes' = 0 must be >= 1"),
    ("data.max_image_pixels=0", "'data.max_image_pixels' = 0 must be >= 1"),
    ("data.max_member_bytes=4096", None),
])
def test_byte_bound_keys_are_validated(recipe, override, match):
    if match is None:   # max_member_bytes above max_sample_bytes
        with pytest.raises(ConfigError, match="'data.max_member_bytes' = 100 must be <= 'data.max_sample_bytes' = 10"):
            load_config(recipe, ["data.max_member_bytes=100", "data.max_sample_bytes=10"], check_paths=False)
        return
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, [override], check_paths=False)


def test_recipe_keys_reach_the_loader_and_encoder(recipe):
    cfg = load_config(recipe, ["data.max_member_bytes=1000", "data.max_sample_bytes=5000",
                               "data.shuffle_buffer_bytes=7000", "data.max_image_pixels=123456"], check_paths=False)
    lc = LoaderConfig.from_run_config(cfg, train_shards=["x.tar"])
    assert lc.limits == ReaderLimits(max_member_bytes=1000, max_sample_bytes=5000)
    assert lc.shuffle_buffer_bytes == 7000
    from rynnscale.config.model_args import resolve_model_args
    from rynnscale.data.pipeline import build_encoder
    enc = build_encoder(cfg, resolve_model_args(cfg.model).args)
    assert enc.cfg.max_frame_pixels == 123456 and enc.cfg.max_media_bytes == 1000


def _conv_naming(*refs) -> bytes:
    return json.dumps({"conversation": [{"role": "user", "content": [{"type": "image", "image": r} for r in refs]},
                                        {"role": "assistant", "content": "ok"}]}).encode()


def test_unreferenced_media_members_are_not_read(tmp_path):
    """Before: a 32 MiB video.mp4 (and a frame) that conv.json never names was read into the sample's members
    (held by the shuffle buffer, counted against the byte caps). Now, when conv.json comes first in the tar (as
    rynnscale's ShardWriter writes it), unnamed media are skipped without reading their payload."""
    shard = tmp_path / "s.tar"
    shard.write_bytes(_tar_bytes([
        ("k000.meta.json", b"{}"), ("k000.conv.json", _conv_naming("f000.png", "k000.f002.png")),
        ("k000.f000.png", b"a"), ("k000.f001.png", b"b"), ("k000.f002.png", b"c"),
        ("k000.video.mp4", bytes(32 << 20)), ("k000.action.npy", b"npy"),
        ("k001.conv.json", b"[not json"), ("k001.video.mp4", b"v"),            # unparsable: everything read
        ("k002.video.mp4", b"v"), ("k002.conv.json", _conv_naming("f000.png")),  # media before conv: read
    ]))
    out = {s.key: sorted(s.members) for s in iter_tar_samples(str(shard))}
    assert out["k000"] == ["action.npy", "conv.json", "f000.png", "f002.png", "meta.json"], out
    assert out["k001"] == ["conv.json", "video.mp4"] and out["k002"] == ["conv.json", "video.mp4"]


# ---------------------------------------------------------------------------- the per-sample caps, each on its own
def _group_tar(path: Path, groups: list[tuple[str, list[tuple[str, bytes]]]]) -> None:
    """A plain shard of samples ``(key, [(member, bytes), ...])`` in the given member order."""
    path.write_bytes(_tar_bytes([(f"{key}.{m}", data) for key, members in groups for m, data in members]))


def test_max_sample_bytes_refuses_a_sample_from_its_headers(tmp_path, monkeypatch):
    """Three 100-byte members under a 250-byte sample cap (each under the 1000-byte member cap): the third member
    crosses the sum, the sample is one ``too_large`` naming the cap, the crossing member and everything after it
    are never read, and the next sample (300 bytes under a 300-byte cap elsewhere) still reads."""
    conv = _conv_naming("f000.png", "f001.png")
    pad = b"x" * (100 - len(conv))
    shard = tmp_path / "s.tar"
    _group_tar(shard, [("k000", [("meta.json", pad), ("conv.json", conv), ("f000.png", bytes(100)),
                                 ("f001.png", bytes(100))]),
                       ("k001", [("conv.json", CONV.encode())])])
    read: list[str] = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, ti: read.append(ti.name) or real(self, ti))
    limits = ReaderLimits(max_member_bytes=1000, max_sample_bytes=250)
    out = {s.key: s for s in iter_tar_samples(str(shard), limits)}
    bad = out["k000"]
    assert bad.bad_reason == "too_large" and "sample has more than 250 bytes" in bad.bad_detail and not bad.members
    assert read == ["k000.meta.json", "k000.conv.json", "k001.conv.json"], read   # f000/f001 payloads never read
    assert out["k001"].bad_reason is None and out["k001"].members["conv.json"] == CONV.encode()
    # at the cap exactly: readable
    exact = ReaderLimits(max_member_bytes=1000, max_sample_bytes=100 + len(conv) + 200)
    ok = next(iter_tar_samples(str(shard), exact))
    assert ok.bad_reason is None and sorted(ok.members) == ["conv.json", "f000.png", "f001.png", "meta.json"]


def test_max_sample_bytes_recipe_key_makes_the_loader_skip_and_count(recipe, tmp_path):
    """``data.max_sample_bytes`` from a recipe reaches the loader's reader: the sample over it (two 1500-byte members,
    each under ``data.max_member_bytes``) is a counted ``too_large`` skip, the one under it trains."""
    import torch

    from rynnscale.batch import EncodedSample
    from rynnscale.data.loader import TrainLoader

    class Lengths:   # one token per byte of conv.json: no tokenizer needed
        def encode(self, key, members):
            n = len(members["conv.json"])
            labels = torch.arange(n)
            labels[0] = -100
            return EncodedSample(key, torch.arange(n), labels, torch.arange(n).expand(3, -1).clone())

    small = b'{"a": 1}'
    _group_tar(tmp_path / "s.tar", [("k000", [("conv.json", small), ("action.npy", bytes(1500)),
                                              ("state.npy", bytes(1500))]),
                                    ("k001", [("conv.json", small), ("action.npy", bytes(1500))])])
    cfg = load_config(recipe, ["data.max_sample_bytes=2000", "data.max_member_bytes=1600"], check_paths=False)
    lc = LoaderConfig.from_run_config(cfg, train_shards=[str(tmp_path / "s.tar")], num_workers=0, num_epochs=1,
                                      shuffle_buffer=0, pack_window=2, max_bad_fraction=1.0, micro_batch_tokens=64)
    assert lc.limits.max_sample_bytes == 2000
    loader = TrainLoader(lc, Lengths())
    keys = [k for st in loader for b in st.micro_batches for k in b.sample_keys]
    assert keys == ["k001"] and loader.bad_counts == {"too_large": 1}


@pytest.mark.parametrize("limit", [None, 5])
def test_member_count_cap_refuses_a_sample_with_too_many_members(tmp_path, limit):
    """A frame list of more members than ``ReaderLimits.max_members`` (default 4096; 5 here): a ``too_large``
    skip naming the cap (before: every member was read into the sample, ~1 KiB of tar per member). A sample with
    exactly the cap's number of members reads."""
    cap = ReaderLimits().max_members if limit is None else limit
    names = [f"f{i:05d}.png" for i in range(cap + 1)]
    many = [("conv.json", _conv_naming(*names))] + [(n, b"p") for n in names]
    at_cap = [("conv.json", _conv_naming(*names[: cap - 1]))] + [(n, b"p") for n in names[: cap - 1]]
    shard = tmp_path / "s.tar"
    _group_tar(shard, [("k000", many), ("k001", at_cap)])
    limits = ReaderLimits() if limit is None else ReaderLimits(max_members=limit)
    out = {s.key: s for s in iter_tar_samples(str(shard), limits)}
    assert out["k000"].bad_reason == "too_large" and f"more than {cap} members" in out["k000"].bad_detail
    assert not out["k000"].members
    assert out["k001"].bad_reason is None and len(out["k001"].members) == cap
