"""Shard reader: pattern expansion, tar streaming and validation, splits, shuffle-buffer resume."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from rynnscale.data.reader import (
    ReaderLimits,
    ReaderStateError,
    ShardPatternError,
    ShardStream,
    ShuffleBuffer,
    expand_shard_patterns,
    iter_tar_samples,
    read_positions,
    shuffled,
)


def conv(text: str) -> bytes:
    return json.dumps({"conversation": [{"role": "user", "content": text}]}).encode()


def write_shard(path: Path, keys: list[str]) -> None:
    """A webdataset shard written by webdataset's own TarWriter (members conv.json + meta.json)."""
    with wds.TarWriter(str(path)) as w:
        for k in keys:
            w.write({"__key__": k, "conv.json": conv(f"text of {k}"), "meta.json": b"{}"})


def write_raw_tar(path: Path, entries: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    out = []
    for s in range(6):
        p = tmp_path / f"shard-{s:03d}.tar"
        write_shard(p, [f"s{s}_k{i:02d}" for i in range(5 + s)])  # unequal shard sizes
        out.append(p)
    return out


def test_expand_patterns(tmp_path: Path, shards: list[Path]) -> None:
    brace = expand_shard_patterns(str(tmp_path / "shard-{000..002}.tar"))
    assert [Path(p).name for p in brace] == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    globbed = expand_shard_patterns([str(tmp_path / "shard-00[45].tar"), str(shards[0]), str(shards[4])])
    assert [Path(p).name for p in globbed] == ["shard-004.tar", "shard-005.tar", "shard-000.tar"]  # dedup, order kept
    with pytest.raises(ShardPatternError, match="nothing-.*matches no file"):
        expand_shard_patterns([str(shards[0]), str(tmp_path / "nothing-*.tar")])
    with pytest.raises(ShardPatternError, match="shard-006.tar.*is not a file"):
        expand_shard_patterns(str(tmp_path / "shard-{004..007}.tar"))
    with pytest.raises(ShardPatternError, match="empty"):
        expand_shard_patterns([])


def test_iter_tar_groups_members_and_validates(tmp_path: Path) -> None:
    p = tmp_path / "mixed.tar"
    write_raw_tar(p, [
        ("a.conv.json", conv("a")), ("a.meta.json", b"{}"), ("a.notes.txt", b"dropped"),  # unknown member dropped
        ("b.conv.json", conv("b")), ("b.video.../../etc/passwd", b"x"),                   # path traversal
        ("../c.conv.json", conv("c")),                                                    # unsafe key
        ("d.conv.json", conv("d")), ("d.conv.json", conv("d2")),                          # duplicate member
        ("e.conv.json", b"x" * 100),                                                      # over the size limit
        ("f.conv.json", conv("f")),
    ])
    got = list(iter_tar_samples(str(p), ReaderLimits(max_member_bytes=64)))
    assert [s.index for s in got] == list(range(6))
    by = {s.index: s for s in got}
    assert by[0].key == "a" and not by[0].is_bad and set(by[0].members) == {"conv.json", "meta.json"}
    assert by[0].members["conv.json"] == conv("a")
    assert by[1].bad_reason == "bad_member" and "path separator" in by[1].bad_detail and by[1].members == {}
    assert by[2].bad_reason == "bad_member"
    assert by[3].bad_reason == "bad_member" and "twice" in by[3].bad_detail
    assert by[4].bad_reason == "too_large" and "limit 64" in by[4].bad_detail
    assert by[5].key == "f" and not by[5].is_bad
    # start= and wanted= skip groups but keep ordinals
    assert [s.index for s in iter_tar_samples(str(p), start=4)] == [4, 5]
    assert [s.key for s in iter_tar_samples(str(p), wanted={0, 5})] == ["a", "f"]


@pytest.mark.parametrize("damage", ["truncate_member", "truncate_header", "garbage_header", "not_a_tar", "symlink"])
def test_corrupt_tar_is_reported_not_raised(tmp_path: Path, damage: str) -> None:
    p = tmp_path / "bad.tar"
    write_shard(p, [f"k{i}" for i in range(4)])
    raw = p.read_bytes()
    k2 = tarfile.open(p).getmembers()[4]  # k2.conv.json: (pax) header at .offset, data at .offset_data
    assert k2.name == "k2.conv.json"
    if damage == "truncate_member":      # file ends inside the data of k2's first member
        p.write_bytes(raw[: k2.offset_data + 3])
    elif damage == "truncate_header":    # file ends right after sample k1 (no end-of-archive blocks)
        p.write_bytes(raw[: k2.offset])
    elif damage == "garbage_header":     # k2's header overwritten: tarfile would silently stop here
        p.write_bytes(raw[: k2.offset] + b"\x07" * 512 + raw[k2.offset + 512:])
    elif damage == "not_a_tar":
        p.write_bytes(b"this is not a tar file at all" * 100)
    elif damage == "symlink":
        with tarfile.open(p, "w") as tf:
            ti = tarfile.TarInfo("k0.conv.json")
            ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(ti)
    got = list(iter_tar_samples(str(p)))
    bad = [s for s in got if s.is_bad]
    assert len(bad) == 1, got
    assert bad[0].bad_reason == ("bad_member" if damage == "symlink" else "corrupt_tar")
    good = [s.key for s in got if not s.is_bad]
    # a cut at a sample boundary cannot be told from a cut inside the last sample: that one is dropped too
    expected_good = {"truncate_member": ["k0", "k1"], "truncate_header": ["k0"], "garbage_header": ["k0"],
                     "not_a_tar": [], "symlink": []}[damage]
    assert good == expected_good
    assert got == sorted(got, key=lambda s: s.index)


def test_split_disjoint_and_covers_every_epoch(shards: list[Path]) -> None:
    paths = [str(p) for p in shards]
    all_keys = {s.key for p in paths for s in iter_tar_samples(p)}
    ranks, workers = 2, 2
    for epoch in range(2):
        per_split = []
        for r in range(ranks):
            for w in range(workers):
                st = ShardStream(paths, seed=7, split=r * workers + w, num_splits=ranks * workers, epochs=epoch + 1)
                st.epoch = epoch
                per_split.append([s.key for s in st])
        flat = [k for ks in per_split for k in ks]
        assert len(flat) == len(set(flat)) == len(all_keys) and set(flat) == all_keys
        if epoch == 0:
            first = per_split
    assert per_split != first  # epoch 1 reshuffles the shard order
    # deterministic
    again = [s.key for s in ShardStream(paths, seed=7, split=1, num_splits=4, epochs=1)]
    assert again == first[1]
    with pytest.raises(ShardPatternError, match="6 shards cannot feed 8 readers"):
        ShardStream(paths, seed=0, split=0, num_splits=8)


def test_split_of_empty_shards_is_an_error_not_a_hang(tmp_path: Path) -> None:
    for i in range(2):
        tarfile.open(tmp_path / f"empty-{i}.tar", "w").close()
    st = ShardStream([str(tmp_path / "empty-0.tar"), str(tmp_path / "empty-1.tar")], seed=0, split=0, num_splits=1)
    with pytest.raises(ShardPatternError, match="hold no samples at all"):
        next(iter(st))


def test_shuffle_buffer_resume_is_exact(shards: list[Path]) -> None:
    torch.manual_seed(0)
    paths = [str(p) for p in shards]

    def make():
        return ShardStream(paths, seed=3, split=0, num_splits=1, epochs=3), ShuffleBuffer(8, seed=3, stream=0)

    stream, buf = make()
    it = shuffled(iter(stream), buf)
    head = [next(it).key for _ in range(23)]
    state = (dict(stream.state), buf.state)
    tail = [s.key for s in it]
    keys = sorted(s.key for p in paths for s in iter_tar_samples(p))
    assert sorted(head + tail) == sorted(keys * 3)  # 3 epochs, every sample once per epoch
    assert head != sorted(head)  # actually shuffled

    stream2, buf2 = make()
    stream2.load_state(state[0])
    buf2.load_state(state[1])
    assert [s.key for s in shuffled(iter(stream2), buf2)] == tail


def test_read_positions_detects_changed_data(tmp_path: Path, shards: list[Path]) -> None:
    pos = [(str(shards[1]), 3, "s1_k03"), (str(shards[0]), 0, "s0_k00")]
    assert [s.key for s in read_positions(pos)] == ["s1_k03", "s0_k00"]
    with pytest.raises(ReaderStateError, match="should be key 's1_k04'"):
        read_positions([(str(shards[1]), 3, "s1_k04")])
    with pytest.raises(ReaderStateError, match="no longer exists"):
        read_positions([(str(tmp_path / "gone.tar"), 0, "x")])
