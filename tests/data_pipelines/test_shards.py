"""Shard writer, manifest and sample-schema checks (rynnscale.data_pipelines.shards, rynnscale.data.schema).

webdataset and Python's tarfile are the readers we must satisfy; hashes are recomputed with hashlib."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from rynnscale.data.manifest import MANIFEST_NAME, ManifestError, ShardInfo, completed_shards, read_manifest
from rynnscale.data.schema import (
    SchemaError,
    member_kind,
    split_tar_name,
    validate_conv,
    validate_key,
    validate_member_name,
    validate_meta,
    validate_sample_members,
)
from rynnscale.data_pipelines.shards import (
    ShardWriter,
    remove_stale_temp_files,
    shard_name,
    update_manifest,
    write_manifest,
)


def _samples(n: int, seed: int = 0) -> list[tuple[str, dict[str, bytes], dict[str, int]]]:
    """n small samples with random payloads of varying size and simple cost hints."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        video = rng.integers(0, 256, size=int(rng.integers(1, 3000)), dtype=np.uint8).tobytes()
        meta = json.dumps({"source": "test", "licence": "CC0-1.0", "task": f"t{i}", "video": {"fps": 2.0}}).encode()
        conv = json.dumps(
            {
                "conversation": [
                    {"role": "user", "content": [{"type": "video", "video": "video.mp4"}, {"type": "text", "text": "q"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": f"answer {i}"}]},
                ]
            }
        ).encode()
        buf = io.BytesIO()
        np.save(buf, rng.standard_normal((3, 2)).astype(np.float32), allow_pickle=False)
        members = {"video.mp4": video, "conv.json": conv, "meta.json": meta, "action.npy": buf.getvalue(), "action_ts.npy": buf.getvalue()}
        out.append((f"ep{i:04d}_clip-a", members, {"num_tokens": 10 + i, "vision_patches": 4 * i}))
    return out


def _write(out: Path, samples, **kw) -> list[ShardInfo]:
    with ShardWriter(out, **kw) as w:
        for key, members, costs in samples:
            w.write(key, members, costs=costs)
    return w.shards


def test_readable_by_webdataset_and_tarfile(tmp_path):
    torch.manual_seed(0)
    samples = _samples(7)
    shards = _write(tmp_path, samples, max_samples=3)
    assert [s.name for s in shards] == [shard_name("shard", i) for i in range(3)]
    assert [s.num_samples for s in shards] == [3, 3, 1]

    # tarfile: names {key}.{member}, meta.json then conv.json then sorted rest, fixed headers
    names = []
    for s in shards:
        with tarfile.open(tmp_path / s.name) as tf:
            for ti in tf.getmembers():
                assert ti.isreg() and ti.mtime == 0 and ti.uid == 0 and ti.gid == 0 and ti.mode == 0o644
                assert ti.uname == "" and ti.gname == ""
                names.append(ti.name)
    want = []
    for key, members, _ in samples:
        want += [f"{key}.meta.json", f"{key}.conv.json"] + [f"{key}.{m}" for m in sorted(members) if m not in ("meta.json", "conv.json")]
    assert names == want

    # webdataset: every sample comes back whole, in order, with identical bytes
    ds = wds.WebDataset([str(tmp_path / s.name) for s in shards], shardshuffle=False)
    got = list(ds)
    assert [g["__key__"] for g in got] == [k for k, _, _ in samples]
    for g, (_, members, _) in zip(got, samples):
        assert {k: v for k, v in g.items() if not k.startswith("__")} == members


def test_manifest_counts_hashes_costs(tmp_path):
    samples = _samples(7)
    _write(tmp_path, samples, max_samples=3, manifest_info={"converter": "test"})
    m = read_manifest(tmp_path)
    assert m.info == {"converter": "test"}
    assert m.total_samples == 7
    off = 0
    for s in m.shards:
        data = (tmp_path / s.name).read_bytes()
        assert s.num_bytes == len(data)
        assert s.sha256 == hashlib.sha256(data).hexdigest()
        with tarfile.open(tmp_path / s.name) as tf:
            keys = sorted({n.split(".", 1)[0] for n in tf.getnames()})
        assert s.num_samples == len(keys)
        assert s.sample_costs["num_tokens"] == [c["num_tokens"] for _, _, c in samples[off : off + s.num_samples]]
        assert s.sample_costs["vision_patches"] == [c["vision_patches"] for _, _, c in samples[off : off + s.num_samples]]
        off += s.num_samples
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert raw["total_samples"] == 7 and raw["total_bytes"] == sum(s.num_bytes for s in m.shards)


@pytest.mark.parametrize("digits", [401, 5000])
def test_a_manifest_with_a_huge_integer_is_a_manifest_error(tmp_path, digits):
    """A cost of 401 digits (too large for a float) or 5,000 (past json's integer limit): ManifestError naming the
    file, as for any other malformed manifest (callers skip on it), not an OverflowError / ValueError."""
    _write(tmp_path, _samples(3), manifest_info={"converter": "test"})
    path = tmp_path / MANIFEST_NAME
    text = path.read_text()
    raw = json.loads(text)
    first = raw["shards"][0]["sample_costs"]["num_tokens"][0]
    path.write_text(text.replace(f"[{first},", "[1" + "0" * (digits - 1) + ",", 1))
    with pytest.raises(ManifestError, match=str(tmp_path)):
        read_manifest(tmp_path)


def test_max_bytes_rollover(tmp_path):
    samples = _samples(12, seed=1)
    cap = 12 * 1024
    shards = _write(tmp_path, samples, max_samples=1000, max_bytes=cap)
    assert len(shards) > 1 and sum(s.num_samples for s in shards) == 12
    for s in shards:
        assert s.num_bytes == (tmp_path / s.name).stat().st_size <= cap
    # a sample bigger than the cap gets a shard of its own instead of failing
    big = [("big0", {"meta.json": b"{}", "conv.json": b"{}", "video.mp4": b"x" * (3 * cap)}, {}), ("small1", {"meta.json": b"{}", "conv.json": b"{}"}, {})]
    shards = _write(tmp_path / "big", big, max_bytes=cap)
    assert [s.num_samples for s in shards] == [1, 1] and shards[0].num_bytes > cap


def test_exception_leaves_no_partial_shard(tmp_path):
    samples = _samples(5)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, max_samples=3) as w:
            for key, members, costs in samples[:4]:
                w.write(key, members, costs=costs)
            # shard 0 is finished; shard 1 is being written under a hidden temp name only
            assert (tmp_path / "shard-000000.tar").exists()
            assert not (tmp_path / "shard-000001.tar").exists()
            assert len(list(tmp_path.glob(".shard-000001.tar.tmp-*"))) == 1
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, "shard-000000.tar"]
    m = read_manifest(tmp_path)
    assert [s.name for s in m.shards] == ["shard-000000.tar"] and m.total_samples == 3
    assert list(completed_shards(tmp_path)) == ["shard-000000.tar"]


def test_deterministic_bytes(tmp_path):
    samples = _samples(6, seed=3)
    _write(tmp_path / "a", samples, max_samples=4)
    # same samples with members given in another dict order: same bytes
    shuffled = [(k, dict(reversed(list(m.items()))), c) for k, m, c in samples]
    _write(tmp_path / "b", shuffled, max_samples=4)
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_long_names_use_pax_and_stay_readable(tmp_path):
    key = "k" * 120  # key + member > 100 bytes: needs a pax header
    members = {"meta.json": b"{}", "conv.json": b"{}", "video.wrist_camera_left.mp4": b"abc"}
    _write(tmp_path / "a", [(key, members, {})])
    _write(tmp_path / "b", [(key, members, {})])
    assert (tmp_path / "a" / "shard-000000.tar").read_bytes() == (tmp_path / "b" / "shard-000000.tar").read_bytes()
    got = list(wds.WebDataset(str(tmp_path / "a" / "shard-000000.tar"), shardshuffle=False))
    assert got[0]["__key__"] == key and got[0]["video.wrist_camera_left.mp4"] == b"abc"


@pytest.mark.parametrize(
    "member",
    ["../meta.json", "/etc/passwd", "a/video.mp4", "sub\\video.mp4", "video.mp4\x00", "meta.json\n", "f" + "0" * 80 + ".jpg",
     "unknown.bin", "..", "", ".hidden", "video..mp4", "video.a.b.mp4", "f12.jpg", "vidéo.mp4", 5],
)
def test_bad_member_names_rejected(tmp_path, member):
    with ShardWriter(tmp_path) as w:
        with pytest.raises((SchemaError, TypeError)):
            w.write("good_key", {"meta.json": b"{}", "conv.json": b"{}", member: b"x"})
        w.write("next_key", {"meta.json": b"{}", "conv.json": b"{}"})  # the writer is still usable
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        assert tf.getnames() == ["next_key.meta.json", "next_key.conv.json"]  # no trace of the rejected sample


@pytest.mark.parametrize("key", ["a.b", "a/b", "../x", "", "k\x01", "k" * 129, "ключ", " spaced"])
def test_bad_keys_rejected(tmp_path, key):
    with ShardWriter(tmp_path) as w:
        with pytest.raises(SchemaError):
            w.write(key, {"meta.json": b"{}", "conv.json": b"{}"})
    assert not list(tmp_path.glob("*.tar"))


def test_writer_misuse_errors(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write("k1", {"meta.json": b"{}", "conv.json": b"{}"}, costs={"num_tokens": 3})
        with pytest.raises(SchemaError, match="twice"):
            w.write("k1", {"meta.json": b"{}", "conv.json": b"{}"}, costs={"num_tokens": 3})
        with pytest.raises(ValueError, match="cost hints"):
            w.write("k2", {"meta.json": b"{}", "conv.json": b"{}"}, costs={"other": 3})
        with pytest.raises(TypeError, match="bytes"):
            w.write("k3", {"meta.json": "not bytes", "conv.json": b"{}"})
        with pytest.raises(ValueError, match="finite"):
            w.write("k4", {"meta.json": b"{}", "conv.json": b"{}"}, costs={"num_tokens": float("nan")})
    assert read_manifest(tmp_path).total_samples == 1
    with pytest.raises(ValueError, match="prefix"):
        ShardWriter(tmp_path, prefix="../evil")


def _good_manifest() -> dict:
    return {
        "format": "rynnscale-shards",
        "version": 1,
        "info": {},
        "shards": [{"name": "shard-000000.tar", "num_samples": 2, "num_bytes": 10240, "sha256": "ab" * 32, "sample_costs": {"num_tokens": [1, 2]}}],
    }


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: m["shards"][0].update(name="../evil.tar"), r"shards\[0\]\.name"),
        (lambda m: m["shards"][0].update(name="sub/x.tar"), r"shards\[0\]\.name"),
        (lambda m: m["shards"][0].update(sha256="abc"), r"shards\[0\]\.sha256"),
        (lambda m: m["shards"][0].update(num_samples=-1), r"shards\[0\]\.num_samples"),
        (lambda m: m["shards"][0]["sample_costs"].update(num_tokens=[1]), r"sample_costs\.num_tokens"),
        (lambda m: m.update(version=99), "version"),
        (lambda m: m.update(format="other"), "format"),
        (lambda m: m.update(total_samples=5), "total_samples"),
        (lambda m: m["shards"].append(dict(m["shards"][0])), "listed twice"),
    ],
)
def test_read_manifest_rejects_bad_fields(tmp_path, mutate, match):
    m = _good_manifest()
    mutate(m)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=match) as ei:
        read_manifest(tmp_path)
    assert MANIFEST_NAME in str(ei.value)


def test_read_manifest_bad_json_and_missing(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="invalid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(tmp_path / "nowhere")
    m = _good_manifest()
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(m))
    assert read_manifest(tmp_path / MANIFEST_NAME).shards[0].sample_costs == {"num_tokens": [1, 2]}


def test_completed_shards_for_restarts(tmp_path):
    samples = _samples(9)
    _write(tmp_path, samples, max_samples=3)
    assert sorted(completed_shards(tmp_path)) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    (tmp_path / "shard-000001.tar").unlink()
    with open(tmp_path / "shard-000002.tar", "r+b") as f:  # same size, different content
        f.seek(600)
        f.write(b"corrupt")
    assert sorted(completed_shards(tmp_path)) == ["shard-000000.tar", "shard-000002.tar"]
    assert sorted(completed_shards(tmp_path, verify_sha256=True)) == ["shard-000000.tar"]
    (tmp_path / "shard-000000.tar").write_bytes(b"short")
    assert completed_shards(tmp_path) == {"shard-000002.tar": read_manifest(tmp_path).by_name()["shard-000002.tar"]}
    assert completed_shards(tmp_path / "empty_dir_without_manifest") == {}

    # a restarted writer for shard 1 alone (one shard per task, parent merges the manifest)
    with ShardWriter(tmp_path, max_samples=3, start_index=1, update_manifest=False) as w:
        for key, members, costs in samples[3:6]:
            w.write(key, members, costs=costs)
    update_manifest(tmp_path, w.shards)
    assert "shard-000001.tar" in completed_shards(tmp_path, verify_sha256=True)


def test_stale_temp_files_removed(tmp_path):
    (tmp_path / ".shard-000004.tar.tmp-123").write_bytes(b"partial")
    (tmp_path / ".manifest.json.tmp-abc").write_bytes(b"partial")
    (tmp_path / "shard-000000.tar").write_bytes(b"keep")
    assert remove_stale_temp_files(tmp_path) == [".manifest.json.tmp-abc", ".shard-000004.tar.tmp-123"]
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]


def test_write_manifest_refuses_invalid(tmp_path):
    with pytest.raises(ManifestError):
        write_manifest(tmp_path, [ShardInfo(name="x.tar", num_samples=1, num_bytes=1, sha256="zz")])
    assert not (tmp_path / MANIFEST_NAME).exists()
    assert not [p for p in tmp_path.iterdir()]


# ------------------------------------------------------------------------------- schema


def test_member_kinds_and_split():
    assert member_kind("video.mp4") == "video" and member_kind("video.wrist-1.webm") == "video"
    assert member_kind("f000.jpg") == "frame" and member_kind("f123456.png") == "frame"
    assert member_kind("action_ts.npy") == "action_ts" and member_kind("state.npy") == "state"
    assert member_kind("video.mov") is None and member_kind("f1.jpg") is None
    assert split_tar_name("ep1_c2.video.left.mp4") == ("ep1_c2", "video.left.mp4")
    assert split_tar_name("ep1.extra.bin", allow_unknown=True) == ("ep1", "extra.bin")
    with pytest.raises(SchemaError):
        split_tar_name("dir/ep1.meta.json")
    with pytest.raises(SchemaError):
        split_tar_name("ep1.extra.bin")
    with pytest.raises(SchemaError, match="path separator"):
        validate_member_name("../../etc/passwd", allow_unknown=True)
    assert validate_key("ep-0001_clip_3") == "ep-0001_clip_3"


def _meta(**over) -> dict:
    m = {
        "source": "lerobot",
        "licence": "MIT",
        "task": "pick up the cup",
        "video": {"fps": 2.0, "num_frames": 3, "frame_indices": [0, 15, 30], "timestamps": [0.0, 0.5, 1.0]},
        "action": {"space": "joint_position", "units": ["rad", "rad"], "dims": ["a", "b"]},
    }
    m.update(over)
    return m


def test_validate_meta_ok_and_defaults():
    out = validate_meta(_meta())
    assert out["embodiment"] == "unknown" and out["schema_version"] == 1
    assert out["video"]["timestamps"] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    "over, field",
    [
        ({"source": ""}, "source"),
        ({"licence": None}, "licence"),
        ({"license": "MIT"}, "license"),  # typo of licence: unknown field, with a hint
        ({"video": {"fps": 0}}, "fps"),
        ({"video": {"fps": 2, "num_frames": 3, "timestamps": [0, 1]}}, "timestamps"),
        ({"video": {"fps": 2, "frame_indices": [3, 1]}}, "frame_indices"),
        ({"video": {"fps": 2, "timestamps": [0.0, float("nan")]}}, "timestamps"),
        ({"action": {"space": "x", "units": ["m"], "dims": ["a", "b"]}}, "units"),
        ({"action": {"space": "x"}}, "units"),
        ({"schema_version": 7}, "schema_version"),
        ({"extra": [1]}, "extra"),
    ],
)
def test_validate_meta_names_bad_field(over, field):
    m = _meta(**over)
    if over.get("licence", 1) is None:
        del m["licence"]
    with pytest.raises(SchemaError, match=field) as ei:
        validate_meta(m)
    assert "meta.json" in str(ei.value)
    if "license" in over:
        assert "did you mean 'licence'" in str(ei.value)


def test_validate_conv_and_members():
    conv = {
        "conversation": [
            {"role": "user", "content": [{"type": "video", "video": ["f000.jpg", "f001.jpg"]}, {"type": "image", "image": "f002.png"}, {"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
        ]
    }
    names = ["meta.json", "conv.json", "f000.jpg", "f001.jpg", "f002.png"]
    assert len(validate_conv(conv, names)) == 2
    with pytest.raises(SchemaError, match="does not contain"):
        validate_conv(conv, names[:-1])
    bad = json.loads(json.dumps(conv))
    bad["conversation"][0]["content"][0]["video"] = "../../secret.mp4"
    with pytest.raises(SchemaError, match="path separator"):
        validate_conv(bad)
    bad = json.loads(json.dumps(conv))
    bad["conversation"][1]["content"].append({"type": "image", "image": "f000.jpg"})
    with pytest.raises(SchemaError, match="assistant"):
        validate_conv(bad)
    bad = json.loads(json.dumps(conv))
    bad["conversation"] = bad["conversation"][:1]
    with pytest.raises(SchemaError, match="no assistant turn"):
        validate_conv(bad)
    bad = json.loads(json.dumps(conv))
    bad["conversation"][0]["content"][1] = {"type": "image", "image": "video.mp4"}
    with pytest.raises(SchemaError, match="not a frame member"):
        validate_conv(bad)

    kinds = validate_sample_members(names + ["action.npy", "action_ts.npy"], validate_meta(_meta()))
    assert kinds["frame"] == ["f000.jpg", "f001.jpg", "f002.png"]
    with pytest.raises(SchemaError, match="together"):
        validate_sample_members(names + ["action.npy"])
    with pytest.raises(SchemaError, match="conv.json"):
        validate_sample_members(["meta.json"])
    with pytest.raises(SchemaError, match="'video' section"):
        validate_sample_members(names, validate_meta({"source": "s", "licence": "l", "task": ""}))
