"""Converters on hostile or unusual input (review of the dataset converters): small synthetic LeRobot v2.1
datasets (32x32 H.264 at 30 fps, each frame's grey level its frame number, each row's action its row index) and
frame folders built in tmp_path. A bad episode or clip is skipped and counted, never the whole run; frames pair
with rows on the video's absolute clock; tied quantile bins decode to the tied value; malformed metadata is a
ConvertError naming the file and field."""

from __future__ import annotations

import io
import json
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="LeRobot parquet needs pyarrow: pip install pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")

from rynnscale.data.manifest import read_manifest  # noqa: E402
from rynnscale.data_pipelines.frames import convert_frames, list_frames, natural_key  # noqa: E402
from rynnscale.data_pipelines.jsonl import ConvertError  # noqa: E402
from rynnscale.data_pipelines.lerobot import (  # noqa: E402
    action_to_bins,
    bin_centres,
    compute_action_stats,
    convert_lerobot,
    format_action_bins,
    parse_action_bins,
)

CAM = "observation.images.cam"
FPS = 30
FAST = dict(progress=False, cost_hints=False, episodes_per_shard=1)


def _write_video(path: Path, frames: list[int], *, w: int = 32, h: int = 32, codec: str = "libx264") -> None:
    """Frames with pts ``frames`` (time base 1/FPS); frame k's pixels are grey level 4 * (k % 64)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=FPS)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            s.options = {"bf": "0"}
        s.codec_context.time_base = Fraction(1, FPS)
        for k in frames:
            f = av.VideoFrame.from_ndarray(np.full((h, w, 3), 4 * (k % 64), np.uint8), format="rgb24")
            f.pts, f.time_base = k, Fraction(1, FPS)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _table(ep: int, n: int, D: int = 3, S: int | None = None, action=None, ts=None) -> pa.Table:
    act = np.tile(np.arange(n, dtype=np.float32)[:, None], (1, D)) if action is None else np.asarray(action, np.float32)
    state = np.tile(np.arange(n, dtype=np.float32)[:, None], (1, S or D))
    ts = np.arange(n) / FPS if ts is None else np.asarray(ts)
    return pa.table({"timestamp": pa.array(ts.astype(np.float32)), "frame_index": pa.array(np.arange(n)),
                     "episode_index": pa.array(np.full(n, ep)), "task_index": pa.array(np.zeros(n, np.int64)),
                     "action": pa.array(list(act), pa.list_(pa.float32())),
                     "observation.state": pa.array(list(state), pa.list_(pa.float32()))})


def _make(root: Path, episodes: dict[int, int], *, info: dict | None = None, lines: dict[int, dict] | None = None,
          tables: dict[int, pa.Table] | None = None, videos: dict[int, list[int]] | None = None, size=(32, 32)) -> Path:
    """A LeRobot v2.1 dataset: ``episodes`` {index: frames}; a row per frame unless ``tables`` gives the table,
    a frame per row unless ``videos`` gives the pts; ``lines`` overrides fields of an episodes.jsonl line."""
    (root / "meta").mkdir(parents=True)
    inf = {"codebase_version": "v2.1", "robot_type": "toy", "fps": FPS, "chunks_size": 1000, "license": "mit",
           "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
           "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
           "features": {CAM: {"dtype": "video", "shape": [size[1], size[0], 3]}, "action": {"dtype": "float32", "shape": [3]},
                        "observation.state": {"dtype": "float32", "shape": [3]}}}
    (root / "meta/info.json").write_text(json.dumps({**inf, **(info or {})}))
    (root / "meta/tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": "do the thing"}) + "\n")
    out = []
    for e, n in episodes.items():
        out.append(json.dumps({"episode_index": e, "tasks": ["do the thing"], "length": n, **(lines or {}).get(e, {})}))
        p = root / f"data/chunk-000/episode_{e:06d}.parquet"
        p.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table((tables or {})[e] if e in (tables or {}) else _table(e, n), p)
        _write_video(root / f"videos/chunk-000/{CAM}/episode_{e:06d}.mp4", (videos or {}).get(e, list(range(n))),
                     w=size[0], h=size[1])
    (root / "meta/episodes.jsonl").write_text("\n".join(out) + "\n")
    return root


def _samples(d: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for s in read_manifest(d).shards:
        with tarfile.open(d / s.name) as tf:
            for m in tf.getmembers():
                key, member = m.name.split(".", 1)
                out.setdefault(key, {})[member] = tf.extractfile(m).read()
    return out


def _grey(jpg: bytes) -> int:
    from PIL import Image

    return int(round(np.asarray(Image.open(io.BytesIO(jpg))).mean() / 4))


# ------------------------------------------------------------------------------------ LeRobot


def test_video_missing_its_first_frame_pairs_on_the_absolute_clock(tmp_path):
    """Frames at 1/30 .. 59/30 s (the first frame is gone), rows at 0 .. 59/30 s: before, times were measured from
    the first frame, so every frame paired with the row before its own (action k with the image of frame k + 1)
    and meta.json said 0.0 for the frame at 1/30 s. Now row 0 is the unpaired one and every frame keeps its row."""
    root = _make(tmp_path / "src", {0: 60}, videos={0: list(range(1, 60))})
    rep = convert_lerobot(root, tmp_path / "out", clip_seconds=1.0, fps=10, media="frames", state_key=None, **FAST)
    ep = rep["episodes"][0]
    assert (ep["rows_unpaired"], ep["frames_unpaired"]) == (1, 0)
    for key, m in _samples(tmp_path / "out").items():
        meta = json.loads(m["meta.json"])
        acts = np.load(io.BytesIO(m["action.npy"]))[:, 0].astype(int).tolist()
        seen = [_grey(m[f"f{i:03d}.jpg"]) for i in range(len(acts))]
        assert seen == acts, key                      # the image of frame k goes with row k
        assert 0 not in meta["extra"]["rows"]
        np.testing.assert_allclose(meta["extra"]["source_timestamps"], np.asarray(acts) / FPS, atol=1e-3)


def test_tied_quantile_bins_decode_to_the_tied_value():
    """A gripper closed (0.0) in 80% of rows: its quantile edges repeat 0.0; closed went into the bin [0, 1] and
    decoded to 0.5. Now every value decodes to itself or within its bin's range."""
    rng = np.random.default_rng(0)
    grip = np.where(rng.random(1000) < 0.8, 0.0, 1.0)
    a = np.stack([rng.uniform(-1, 1, 1000), grip], 1).astype(np.float32)
    st = compute_action_stats([a], ["arm", "gripper"], "unknown", "action", 16, "quantile")
    assert st["edges"][1][:3] == [0.0, 0.0, 0.0]
    _, dec = parse_action_bins(format_action_bins(action_to_bins([[0.0, 0.0], [0.0, 1.0]], st), 16), st)
    assert dec[:, 1].tolist() == [0.0, 1.0]
    bins = action_to_bins(a, st)
    e = np.asarray(st["edges"])
    d = np.arange(2)[None, :]
    assert np.all(e[d, bins] <= a) and np.all(a <= e[d, bins + 1])
    assert np.all(bin_centres(bins, st)[:, 1] == a[:, 1])


def test_action_stats_cover_only_the_converted_episodes(tmp_path):
    """Episode 1's timestamps are in milliseconds (skipped: frames_rows_misaligned) and its actions are 1000: before,
    its rows set the statistics and the bin edges (max 1000; every action of episode 0 fell into bin 0)."""
    ms = _table(1, 60, action=np.full((60, 3), 1000.0), ts=np.arange(60) / FPS * 1000)
    root = _make(tmp_path / "src", {0: 60, 1: 60}, tables={1: ms})
    rep = convert_lerobot(root, tmp_path / "out", clip_seconds=1.0, fps=10, action_bins=4, media="frames", **FAST)
    assert rep["bad_episodes"] == {"frames_rows_misaligned": 1} and rep["totals"]["rows"] == 60
    st = json.loads((tmp_path / "out/action_stats.json").read_text())
    assert st["count"] == 60 and st["max"] == [59.0] * 3
    assert st["edges"][0] == pytest.approx([0.0, 14.75, 29.5, 44.25, 59.0])
    assert read_manifest(tmp_path / "out").info["episodes"] == [0]


def test_state_width_differing_between_episodes_is_refused(tmp_path):
    """Episode 1's observation.state has 5 dims, episode 0's 3: before, both converted and meta.json named 3 state
    dims for episode 1's 5-wide state.npy. Now refused up front like differing action widths, naming both."""
    root = _make(tmp_path / "src", {0: 30, 1: 30}, tables={1: _table(1, 30, S=5)})
    with pytest.raises(ConvertError, match=r"observation.state widths \(3 in episodes \[0\]; 5 in episodes \[1\]\)"):
        convert_lerobot(root, tmp_path / "out", clip_seconds=1.0, media="frames", **FAST)
    assert not list((tmp_path / "out").glob("*.tar"))
    bad_act = _table(1, 30, action=np.zeros((30, 4)))
    root = _make(tmp_path / "src2", {0: 30, 1: 30}, tables={1: bad_act})
    with pytest.raises(ConvertError, match=r"action widths \(3 in episodes \[0\]; 4 in episodes \[1\]\)"):
        convert_lerobot(root, tmp_path / "out2", clip_seconds=1.0, media="frames", **FAST)


def test_bad_episodes_are_skipped_and_counted(tmp_path):
    """A corrupt video, a duplicated timestamp and an episode without parquet rows each stopped the whole run
    (a ConvertError, even with --skip-nonfinite); now each is skipped and counted, and the rest convert."""
    dup = np.arange(30) / FPS
    dup[10] = dup[9]
    root = _make(tmp_path / "src", {0: 30, 1: 30, 2: 30, 3: 30},
                 tables={2: _table(2, 30, ts=dup), 3: _table(3, 30).slice(0, 0)})
    v1 = root / f"videos/chunk-000/{CAM}/episode_000001.mp4"
    v1.write_bytes(v1.read_bytes()[:200] + b"\0" * 3000)
    rep = convert_lerobot(root, tmp_path / "out", clip_seconds=1.0, media="frames", **FAST)
    assert rep["bad_episodes"] == {"undecodable_video": 1, "bad_timestamps": 1, "empty_episode": 1}
    by_ep = {e["episode"]: e for e in rep["skipped_episodes"]}
    assert "episode 1" in by_ep[1]["detail"] and "episode_000001.mp4" in by_ep[1]["detail"]
    assert "duplicate" in by_ep[2]["detail"] and "no rows" in by_ep[3]["detail"]
    assert rep["totals"]["samples"] == 1 and read_manifest(tmp_path / "out").info["episodes"] == [0]


def test_long_episode_converts(tmp_path):
    """A 1000-frame episode sampled at its full 30 fps needs 1000 frames, more than the training limit of one
    sample (max_frames=768), which stopped the run ('too_large: 1000 frames requested > max_frames=768'); the
    converter now decodes a source video in bounded chunks under its own limits."""
    root = _make(tmp_path / "src", {0: 1000}, size=(16, 16))
    rep = convert_lerobot(root, tmp_path / "out", clip_seconds=10.0, fps=30, media="frames", state_key=None, **FAST)
    assert rep["totals"]["samples"] == 3 and rep["bad_episodes"] == {}
    for m in _samples(tmp_path / "out").values():
        acts = np.load(io.BytesIO(m["action.npy"]))[:, 0].astype(int)
        assert len(acts) == 300
        assert [_grey(m[f"f{i:03d}.jpg"]) for i in range(0, 300, 37)] == [int(a) % 64 for a in acts[::37]]


def test_odd_frame_size_converts_to_video(tmp_path):
    """A 33x31 source (valid for AV1 / mpeg4) with --media video failed in the H.264 encoder ('frame size must be
    even for yuv420p'); the frames are now cropped to 32x30."""
    root = _make(tmp_path / "src", {0: 30}, videos={0: []})
    _write_video(root / f"videos/chunk-000/{CAM}/episode_000000.mp4", list(range(30)), w=33, h=31, codec="mpeg4")
    rep = convert_lerobot(root, tmp_path / "out", clip_seconds=1.0, media="video", **FAST)
    assert rep["totals"]["samples"] == 1
    meta = json.loads(next(iter(_samples(tmp_path / "out").values()))["meta.json"])
    assert (meta["video"]["width"], meta["video"]["height"]) == (32, 30)


@pytest.mark.parametrize("case,match", [
    ("length", r"episodes.jsonl: line 2: length: expected an integer, got 'abc'"),
    ("tasks_null", None),
    ("tasks_str", r"episodes.jsonl: line 1: tasks: expected a list of strings, got 'Pick up'"),
    ("chunks_zero", r"info.json: chunks_size must be >= 1, got 0"),
    ("chunks_str", r"info.json: chunks_size: expected an integer, got '1000'"),
    ("parquet", r"episode 1 \(.*episode_000001.parquet\): cannot read the parquet file"),
])
def test_malformed_metadata_names_the_file_and_field(tmp_path, case, match):
    """Before: int('abc') mid-run after shard 0 was written, a TypeError / ZeroDivisionError traceback, a pyarrow
    message naming no file, and tasks "Pick up" split into characters. Now a ConvertError up front naming the file,
    line and field (tasks null is no tasks)."""
    lines = {"length": {1: {"length": "abc"}}, "tasks_null": {0: {"tasks": None}},
             "tasks_str": {0: {"tasks": "Pick up"}}}.get(case)
    info = {"chunks_zero": {"chunks_size": 0}, "chunks_str": {"chunks_size": "1000"}}.get(case)
    root = _make(tmp_path / "src", {0: 30, 1: 30}, lines=lines, info=info)
    if case == "parquet":
        (root / "data/chunk-000/episode_000001.parquet").write_bytes(b"not a parquet file" * 10)
    if match is None:
        assert convert_lerobot(root, tmp_path / "out", clip_seconds=1.0, media="frames", **FAST)["totals"]["samples"] == 2
        return
    with pytest.raises(ConvertError, match=match):
        convert_lerobot(root, tmp_path / "out", clip_seconds=1.0, media="frames", **FAST)
    assert not list((tmp_path / "out").glob("*.tar"))



def test_report_after_a_restart_counts_every_episode(tmp_path):
    """The report was written only at the end of a run, so a run that stopped left none and the resumed run's report
    counted only the episodes it converted itself, yet said complete. It is now rewritten after every shard."""
    root = _make(tmp_path / "src", {0: 30, 1: 31, 2: 32})
    kw = dict(clip_seconds=1.0, media="frames", **FAST)
    whole = convert_lerobot(root, tmp_path / "whole", **kw)
    out = tmp_path / "out"
    (out / "lerobot-000002.tar").mkdir(parents=True)   # the last shard cannot be renamed into place: the run stops
    with pytest.raises(OSError):
        convert_lerobot(root, out, **kw)
    partial = json.loads((out / "convert_report.json").read_text())
    assert partial["complete"] is False and [e["episode"] for e in partial["episodes"]] == [0, 1]
    (out / "lerobot-000002.tar").rmdir()
    rep = convert_lerobot(root, out, **kw)
    assert rep["complete"] and rep["totals"] == whole["totals"] and rep["totals"]["rows"] == 93
    assert rep["episodes"] == whole["episodes"]


# ------------------------------------------------------------------------------------ frame folders


def _frames(d: Path, n: int) -> Path:
    from PIL import Image

    d.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 4 * i, np.uint8)).save(d / f"{i:03d}.jpg", quality=95)
    return d


def test_unicode_digit_in_a_frame_name_sorts(tmp_path):
    """'²1.jpg': natural_key split on \\d (which takes '²') and int('²') raised ValueError naming no file."""
    d = _frames(tmp_path / "nav", 3)
    (d / "\u00b21.jpg").write_bytes((d / "000.jpg").read_bytes())
    assert list_frames(d) == ["000.jpg", "001.jpg", "002.jpg", "\u00b21.jpg"]
    assert sorted(["f10.jpg", "f\u2460.jpg", "f2.jpg"], key=natural_key) == ["f2.jpg", "f10.jpg", "f\u2460.jpg"]


def test_truncated_frame_skips_its_clip_and_the_report_lists_it(tmp_path):
    """A truncated jpg stopped the whole run with an uncaught BadItem and the report always said "bad": {}. Now its
    clip is skipped and listed (under max_bad_fraction), the other clips convert, and the report is rewritten after
    every shard, so a run that stops still leaves one (complete: false) and a resumed run keeps the earlier counts."""
    d = _frames(tmp_path / "nav", 40)
    good = (d / "013.jpg").read_bytes()
    (d / "013.jpg").write_bytes(good[:200])
    kw = dict(fps=2.0, clip_frames=4, task="walk", clips_per_shard=2, progress=False, cost_hints=False)
    rep = convert_frames(d, tmp_path / "out", max_bad_fraction=0.2, **kw)
    assert rep["complete"] and rep["bad"] == {"bad_media": 1} and rep["totals"]["samples"] == 9
    assert rep["bad_items"][0]["key"] == "frames-nav-c00003" and "013.jpg" in rep["bad_items"][0]["detail"]
    assert read_manifest(tmp_path / "out").total_samples == 9
    with pytest.raises(ConvertError, match=r"1 of 10 clips are bad, more than max_bad_fraction=0.05 .*013.jpg"):
        convert_frames(d, tmp_path / "strict", **kw)
    partial = json.loads((tmp_path / "strict/convert_report.json").read_text())
    assert partial["complete"] is False and partial["bad"] == {"bad_media": 1}
    rep = convert_frames(d, tmp_path / "strict", max_bad_fraction=0.2, **kw)   # resumes: shard 0 kept, counts kept
    assert rep["complete"] and rep["bad"] == {"bad_media": 1} and rep["totals"]["samples"] == 9


def test_a_second_conversion_into_the_same_directory_is_refused(tmp_path, capsys):
    """Two conversions into one directory (a command restarted while the first still runs) both wrote its shards,
    manifest and report. The second now stops at once naming the holder, writing nothing; once the first is gone
    the directory converts."""
    import os
    import subprocess
    import sys
    import time

    from rynnscale.cli import main
    from rynnscale.data_pipelines.shards import CONVERT_LOCK

    d, out, flag = _frames(tmp_path / "nav", 8), tmp_path / "out", tmp_path / "flag"
    holder = ("import sys, time\nfrom rynnscale.fsutil import directory_lock\n"
              f"with directory_lock(sys.argv[1], 'output directory', 'conversion', '', name={CONVERT_LOCK!r}):\n"
              "    open(sys.argv[2], 'w').write('x')\n    time.sleep(60)\n")
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out), str(flag)],
                            env=dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")))
    try:
        for _ in range(300):
            if flag.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert flag.exists(), "holder did not take the lock"
        rc = main(["data", "convert", "frames", str(d), str(out), "--fps", "2", "--clip-frames", "4",
                   "--task", "walk", "--no-progress", "--no-cost-hints"])
        assert rc == 1
        err = capsys.readouterr().err
        assert "in use by another conversion (host" in err and f"pid {proc.pid}" in err, err
        assert sorted(p.name for p in out.iterdir()) == [CONVERT_LOCK]
    finally:
        proc.kill()
        proc.wait()
    rep = convert_frames(d, out, fps=2.0, clip_frames=4, task="walk", progress=False, cost_hints=False)
    assert rep["complete"] and rep["totals"]["samples"] == 2
