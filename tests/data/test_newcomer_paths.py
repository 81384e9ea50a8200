"""A shard pattern naming a directory means its shards: the manifest's (in manifest order), else its ``*.tar``
(issue 15: ``data.train_shards=OUT`` where OUT is what ``rynnscale data convert`` wrote)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rynnscale.data.reader import ShardPatternError, expand_shard_patterns
from rynnscale.data_pipelines.shards import ShardWriter


def _write(out: Path, n: int, per_shard: int = 1) -> None:
    with ShardWriter(out, max_samples=per_shard) as w:
        for i in range(n):
            w.write(f"s{i:03d}", {"conv.json": b'{"conversation": []}', "meta.json": b"{}"})


def test_directory_with_manifest_means_its_listed_shards(tmp_path: Path) -> None:
    out = tmp_path / "converted"
    _write(out, 3)
    (out / "stray.tar").write_bytes(b"")    # not in the manifest: not a shard of this set
    got = expand_shard_patterns(str(out))
    assert [Path(p).name for p in got] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert expand_shard_patterns(str(out) + "/") == got
    assert expand_shard_patterns([str(out), str(out / "shard-000000.tar")]) == got   # dedup still holds


def test_directory_without_manifest_means_its_tars(tmp_path: Path) -> None:
    for name in ("b.tar", "a.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [Path(p).name for p in expand_shard_patterns(str(tmp_path))] == ["a.tar", "b.tar"]


def test_empty_directory_and_missing_listed_shard_say_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ShardPatternError, match=r"directory .* holds no manifest.json and no \*\.tar"):
        expand_shard_patterns(str(tmp_path))
    out = tmp_path / "converted"
    _write(out, 2)
    (out / "shard-000001.tar").unlink()
    with pytest.raises(ShardPatternError, match=r"manifest.json lists shard-000001.tar.*missing"):
        expand_shard_patterns(str(out))


def test_mixture_sources_accept_directories(tmp_path: Path) -> None:
    """The loader's mixture sources go through the same expansion (eval.shards too: train/evaluate.py)."""
    from rynnscale.data.loader import LoaderConfig, MixtureSource, _expand_sources

    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, 2)
    _write(b, 1)
    srcs = _expand_sources(LoaderConfig(mixture=[MixtureSource("a", [str(a)], 1.0), MixtureSource("b", [str(b)], 1.0)]))
    assert [len(s.shards) for s in srcs] == [2, 1]
