"""Frame-folder converter on the real RynnBrain navigation frames (66 x 640x480 jpg): clips and
timestamps, frames copied unchanged, licence detection, annotation files, restart after a corrupt
frame, the same bytes with 2 worker processes, the CLI, and the shards through TrainLoader with
the real SampleEncoder."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from shared_data import SHARED_DATA

from rynnscale.data.manifest import completed_shards, read_manifest
from rynnscale.data.tags import parse_tags
from rynnscale.data_pipelines.frames import convert_frames, detect_licence, frame_clips, list_frames, natural_key

SHARED = SHARED_DATA
NAV = SHARED / "rynnbrain_frames" / "navigation"
pytestmark = pytest.mark.skipif(not NAV.is_dir(), reason=f"shared navigation frames not found at {NAV} (set RYNNSCALE_SHARED_DATA)")
TASK = "Walk down the corridor."


def _samples(d: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for s in read_manifest(d).shards:
        with tarfile.open(d / s.name) as tf:
            for m in tf.getmembers():
                k, member = m.name.split(".", 1)
                out.setdefault(k, {})[member] = tf.extractfile(m).read()
    return out

def _copy_writable(src: Path, dst: Path) -> None:
    """Copy a read-only shared tree as plain writable files (no permission bits copied)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for d, _, _ in os.walk(dst):
        os.chmod(d, 0o755)



def test_clip_ranges_and_sorting():
    assert frame_clips(66, 16) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert frame_clips(66, 16, keep_tail=True)[-1] == (64, 66)
    assert frame_clips(66, 16, stride=8) == [(s, s + 16) for s in range(0, 51, 8)]
    assert frame_clips(10, 16) == [] and frame_clips(10, 16, keep_tail=True) == [(0, 10)]
    assert sorted(["f10.jpg", "f2.jpg", "f1.jpg"], key=natural_key) == ["f1.jpg", "f2.jpg", "f10.jpg"]
    assert list_frames(NAV) == [f"{i:03d}.jpg" for i in range(66)]
    assert detect_licence(NAV, NAV.parent)[0] == "Apache-2.0"


def test_navigation_folder_converts(tmp_path: Path):
    torch.manual_seed(0)
    out = tmp_path / "out"
    rep = convert_frames(NAV, out, fps=2.0, clip_frames=16, task=TASK, clips_per_shard=3, progress=False)
    assert rep["totals"] == {"frames": 66, "clips": 4, "frames_in_clips": 64, "samples": 4, "bad_clips": 0}
    assert rep["licence"] == "Apache-2.0" and "last 2 frames" in rep["warnings"][0]
    samples = _samples(out)
    assert sorted(samples) == [f"frames-navigation-c{i:05d}" for i in range(4)]
    assert [s.num_samples for s in read_manifest(out).shards] == [3, 1]
    for c, (_key, m) in enumerate(sorted(samples.items())):
        meta = json.loads(m["meta.json"])
        v = meta["video"]
        assert v["frame_indices"] == list(range(16 * c, 16 * c + 16))
        assert v["timestamps"] == [i / 2.0 for i in range(16)] and v["fps"] == 2.0
        assert (v["num_frames"], v["width"], v["height"]) == (16, 640, 480)
        assert meta["clip_start_s"] == 8.0 * c and meta["licence"] == "Apache-2.0" and meta["task"] == TASK
        assert meta["source"] == "frames/navigation"
        for i in range(16):
            assert m[f"f{i:03d}.jpg"] == (NAV / f"{16 * c + i:03d}.jpg").read_bytes()
        conv = json.loads(m["conv.json"])["conversation"]
        assert conv[0]["content"][0]["video"] == [f"f{i:03d}.jpg" for i in range(16)]
        assert conv[1]["content"][0]["text"] == TASK


def test_annotations(tmp_path: Path):
    ann = tmp_path / "ann.jsonl"
    ann.write_text(
        json.dumps({"start_frame": 4, "end_frame": 12, "question": "Where will I go?",
                    "answer": "Ahead and to the left. <trajectory> <frame 0>: (500, 900), (420, 600) </trajectory>"}) + "\n"
        + json.dumps({"start_frame": 50, "end_frame": 66, "question": "Find the door.", "task": "find door",
                      "answer": "<object> <frame 15>: (100, 100), (300, 800) </object>"}) + "\n")
    out = tmp_path / "out"
    rep = convert_frames(NAV, out, fps=1.0, clip_frames=16, annotations=ann, progress=False)
    assert rep["totals"]["clips"] == 2
    (_, m0), (_, m1) = sorted(_samples(out).items())
    meta0, meta1 = json.loads(m0["meta.json"]), json.loads(m1["meta.json"])
    assert meta0["video"]["frame_indices"] == list(range(4, 12)) and meta0["clip_start_s"] == 4.0
    assert meta1["video"]["num_frames"] == 16 and meta1["task"] == "find door" and m1["f015.jpg"] == (NAV / "065.jpg").read_bytes()
    a0 = json.loads(m0["conv.json"])["conversation"][1]["content"][0]["text"]
    assert parse_tags(a0)[0].tag == "trajectory"
    ann.write_text(json.dumps({"start_frame": 0, "end_frame": 8, "question": "q",
                               "answer": "<affordance> <frame 8>: (1, 2) </affordance>"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: .*frame 8 but the clip has 8 frames"):
        convert_frames(NAV, tmp_path / "bad", fps=1.0, clip_frames=16, annotations=ann, progress=False)
    with pytest.raises(ValueError, match="--task"):
        convert_frames(NAV, tmp_path / "bad2", fps=1.0, clip_frames=16, progress=False)


def test_restart_after_corrupt_frame_and_parallel_bytes(tmp_path: Path):
    """Frame 40 is truncated: its clip is skipped and listed in the report; one bad clip of 4 passes
    max_bad_fraction (0.05), so shards 0-1 land and the run stops naming the file; repaired, the rerun
    writes shards 2-3 only, and the result equals a clean run with 2 worker processes."""
    torch.manual_seed(0)
    src = tmp_path / "navigation"
    _copy_writable(NAV, src)
    shutil.copy(NAV.parent / "LICENSE", tmp_path / "LICENSE")
    f40 = src / "040.jpg"
    good = f40.read_bytes()
    f40.write_bytes(good[:3000])
    kw = dict(fps=2.0, clip_frames=16, task=TASK, clips_per_shard=1, progress=False)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="040.jpg"):
        convert_frames(src, out, **kw)
    assert sorted(completed_shards(out)) == ["frames-000000.tar", "frames-000001.tar"]
    assert not list(out.glob(".*tmp*"))
    partial = json.loads((out / "convert_report.json").read_text())
    assert partial["complete"] is False and partial["bad"] == {"bad_media": 1} and "040.jpg" in partial["bad_items"][0]["detail"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    f40.write_bytes(good)
    convert_frames(src, out, **kw)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("frames-00000[01].tar")} == stamps
    par = tmp_path / "par"
    convert_frames(src, par, workers=2, **kw)
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == sorted(p.name for p in par.glob("*.tar")) == [f"frames-00000{i}.tar" for i in range(4)]
    for n in names:
        assert (out / n).read_bytes() == (par / n).read_bytes(), n
    assert read_manifest(out).shards == read_manifest(par).shards
    with pytest.raises(ValueError, match="clip_frames"):
        convert_frames(src, out, **{**kw, "clip_frames": 8})


def test_cli_and_train_loader(tmp_path: Path, capsys):
    from rynnscale.cli import main
    from rynnscale.data.encode import SampleEncoder
    from rynnscale.data.loader import LoaderConfig, TrainLoader
    from rynnscale.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    out = tmp_path / "out"
    rc = main(["data", "convert", "frames", str(NAV), str(out), "--fps", "2", "--clip-frames", "8", "--stride", "24",
               "--task", TASK, "--clips-per-shard", "2", "--no-progress"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["totals"]["clips"] == 3  # starts 0, 24, 48
    loader = TrainLoader(LoaderConfig(train_shards=[str(out / "*.tar")], micro_batch_tokens=8192, pack_window=4,
                                      shuffle_buffer=0, num_workers=0, num_epochs=1), SampleEncoder(load_tokenizer()))
    hints = [t for s in read_manifest(out).shards for t in s.sample_costs["num_tokens"]]
    lens, keys = [], []
    for b in (b for st in loader for b in st.micro_batches):
        b.validate()
        keys += b.sample_keys
        lens += (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
        assert b.video_grid_thw[:, 0].tolist() == [4] * b.num_samples  # 8 frames -> 4 temporal patches
    assert sorted(keys) == [f"frames-navigation-c{i:05d}" for i in range(3)]
    assert sorted(lens) == sorted(hints) and loader.bad_counts == {}
