"""LeRobot converter on the real G1 subset (v2.1, AV1): frame/action alignment in time against the
parquet rows and the source video (decoded here with PyAV directly), row counts, answer text and
action bins, a v3.0 fixture built from the same data giving the same samples, restart after a
mid-run failure, and the shards through TrainLoader with the real SampleEncoder.

Needs pyarrow (`pip install pyarrow`, the `lerobot` extra); skipped without it."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import SHARED_DATA

pa = pytest.importorskip("pyarrow", reason="LeRobot parquet needs pyarrow: pip install pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")

from rynnscale.data.manifest import MANIFEST_NAME, completed_shards, read_manifest  # noqa: E402
from rynnscale.data_pipelines.jsonl import ConvertError  # noqa: E402
from rynnscale.data_pipelines.lerobot import (  # noqa: E402
    STATS_NAME,
    action_to_bins,
    convert_lerobot,
    parse_action_bins,
    plan_clips,
)

SHARED = SHARED_DATA
G1 = SHARED / "lerobot_g1_subset"
pytestmark = pytest.mark.skipif(not (G1 / "meta" / "info.json").is_file(),
                                reason=f"shared G1 LeRobot subset not found at {G1} (set RYNNSCALE_SHARED_DATA)")
VKEY = "observation.images.cam_high"
EPISODES = (1, 2, 4)
# 2 s clips every 4 s at 2 fps: 4 frames per clip, 3 clips per ~12 s episode; 16 quantile bins
OPTS = dict(clip_seconds=2.0, stride_seconds=4.0, fps=2.0, action_bins=16, source="lerobot/g1", progress=False,
            episodes_per_shard=1)
CODEC_MAE, CODEC_PSNR = 2.5, 38.0  # H.264 crf 16 re-encode of the AV1 source: measured MAE ~1.45, PSNR ~42.8 dB


def _samples(d: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for s in read_manifest(d).shards:
        with tarfile.open(d / s.name) as tf:
            for m in tf.getmembers():
                key, member = m.name.split(".", 1)
                out.setdefault(key, {})[member] = tf.extractfile(m).read()
    return out

def _copy_writable(src: Path, dst: Path) -> None:
    """Copy a read-only shared tree as plain writable files (no permission bits copied)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for d, _, _ in os.walk(dst):
        os.chmod(d, 0o755)



def _npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def _decode_all(video: bytes) -> np.ndarray:
    with av.open(io.BytesIO(video)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _source_frames(path: Path, times: list[float]) -> list[tuple[float, np.ndarray]]:
    """(pts time, RGB) of the source frame shown at each time, by seeking with PyAV (independent of our decoder)."""
    out = []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        for t in times:
            c.seek(int(max(t - 0.2, 0.0) / s.time_base), stream=s, backward=True)
            for f in c.decode(s):
                if f.time >= t - 0.5 / 30:
                    out.append((f.time, f.to_ndarray(format="rgb24")))
                    break
    return out


def _parquet(ep: int) -> dict[str, np.ndarray]:
    t = pq.read_table(G1 / f"data/chunk-000/episode_{ep:06d}.parquet")
    return {"timestamp": np.asarray(t.column("timestamp").to_pylist(), np.float64),
            "action": np.asarray(t.column("action").to_pylist(), np.float32),
            "state": np.asarray(t.column("observation.state").to_pylist(), np.float32)}


@pytest.fixture(scope="module")
def v21(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("g1_v21")
    report = convert_lerobot(G1, out, **OPTS)
    return out, report


def test_clip_plan():
    clips = plan_clips(13.1, 0.0, 2.0, 4.0, 2.0)
    assert [c.tolist() for c in clips] == [[0.0, 0.5, 1.0, 1.5], [4.0, 4.5, 5.0, 5.5], [8.0, 8.5, 9.0, 9.5]]
    assert len(plan_clips(13.1, 0.0, 4.0, 3.0, 2.0)) == 4  # starts 0, 3, 6, 9 (9 + 4 <= 13.1)
    short = plan_clips(1.2, 0.0, 4.0, 4.0, 2.0)  # shorter than a clip: one clip of what there is
    assert len(short) == 1 and short[0].tolist() == [0.0, 0.5]


def test_frames_and_actions_align_in_time(v21):
    """Frame i of each clip: its source time t_i is a real frame of the source video at the planned
    time (clip start + i / fps); action/state rows are the parquet rows nearest t_i; the clip's frame
    i decodes to the source frame at t_i within codec tolerance."""
    out, report = v21
    samples = _samples(out)
    assert len(samples) == 9 and report["totals"]["samples"] == 9
    tables = {e: _parquet(e) for e in EPISODES}
    seen = set()
    for key, m in sorted(samples.items()):
        meta = json.loads(m["meta.json"])
        ep, k = meta["episode"], meta["extra"]["clip_index"]
        seen.add((ep, k))
        tab = tables[ep]
        t_src = np.asarray(meta["extra"]["source_timestamps"])
        planned = 4.0 * k + np.arange(4) / 2.0  # stride 4 s, fps 2
        assert np.all(np.abs(t_src - planned) <= 0.5 / 30 + 1e-6), (key, t_src)
        rows = np.abs(tab["timestamp"][None, :] - t_src[:, None]).argmin(1)  # nearest parquet row per frame
        assert meta["extra"]["rows"] == rows.tolist()
        np.testing.assert_array_equal(_npy(m["action.npy"]), tab["action"][rows])
        np.testing.assert_array_equal(_npy(m["state.npy"]), tab["state"][rows])
        ts = _npy(m["action_ts.npy"])
        assert ts.dtype == np.float64 and ts.tolist() == [0.0, 0.5, 1.0, 1.5] == meta["video"]["timestamps"]
        assert meta["video"]["frame_indices"] == rows.tolist()  # source fps 30, frame j at j / 30
        assert meta["clip_start_s"] == pytest.approx(t_src[0])
        out_frames = _decode_all(m["video.mp4"])
        assert out_frames.shape == (4, 480, 640, 3)
        src = _source_frames(G1 / f"videos/chunk-000/{VKEY}/episode_{ep:06d}.mp4", t_src.tolist())
        for i, (t_pts, ref) in enumerate(src):
            assert t_pts == pytest.approx(t_src[i], abs=1e-6)
            err = out_frames[i].astype(np.float64) - ref
            psnr = 10 * np.log10(255.0**2 / np.mean(err**2))
            assert np.abs(err).mean() < CODEC_MAE and psnr > CODEC_PSNR, (key, i, np.abs(err).mean(), psnr)
    assert seen == {(e, k) for e in EPISODES for k in range(3)}


def test_counts_meta_answer_and_bins(v21, caplog):
    out, report = v21
    eps = {e["episode"]: e for e in report["episodes"]}
    for e in EPISODES:
        n = pq.read_metadata(G1 / f"data/chunk-000/episode_{e:06d}.parquet").num_rows
        assert eps[e]["rows"] == eps[e]["video_frames"] == n
    assert report["totals"]["rows"] == 393 + 343 + 357
    assert report["totals"]["episodes_missing"] == 97 and "97 of 100 episodes" in report["warnings"][0]
    stats = json.loads((out / STATS_NAME).read_text())
    allact = np.concatenate([_parquet(e)["action"] for e in EPISODES]).astype(np.float64)
    assert stats["count"] == len(allact) and stats["num_bins"] == 16 and stats["binning"] == "quantile"
    np.testing.assert_allclose(stats["min"], allact.min(0), rtol=0, atol=1e-7)
    np.testing.assert_allclose(stats["max"], allact.max(0), rtol=0, atol=1e-7)
    # quantile bins: each bin holds 1/16 of all rows in every dimension without heavily repeated values
    counts = np.stack([np.bincount(b, minlength=16) for b in action_to_bins(allact, stats).T])
    few_ties = np.array([np.unique(col, return_counts=True)[1].max() <= 4 for col in allact.T])
    assert few_ties.sum() >= 10
    assert np.abs(counts[few_ties] - len(allact) / 16).max() <= 6

    key, m = sorted(_samples(out).items())[4]
    meta = json.loads(m["meta.json"])
    conv = json.loads(m["conv.json"])["conversation"]
    assert meta["licence"] == "MIT" and meta["source"] == "lerobot/g1" and meta["embodiment"] == "Unitree_G1_Inspire"
    assert meta["task"] == "Pick up the yellow bottle on the table."
    assert len(meta["action"]["dims"]) == 26 and meta["action"]["dims"][0] == "kLeftShoulderPitch"
    assert conv[0]["content"] == [{"type": "video", "video": "video.mp4"}, {"type": "text", "text": meta["task"]}]
    answer = conv[1]["content"][0]["text"]
    act = _npy(m["action.npy"]).astype(np.float64)
    # per-step values are the actions (2 decimals) of the dims the manifest names
    shown = read_manifest(out).info["answer_dims_used"]
    idx = [meta["action"]["dims"].index(n) for n in shown]
    line = next(s for s in answer.split("\n") if s.startswith("Per step ("))
    assert line.startswith(f"Per step ({', '.join(shown)}): <frame 0> (")
    vals = [[float(v) for v in grp.split(", ")] for grp in line.split("(")[2:] for grp in [grp.split(")")[0]]]
    np.testing.assert_allclose(vals, act[:, idx], atol=0.0051)
    # the bins decode to centres of bins that contain the true values
    bins, centres = parse_action_bins(answer, stats)
    np.testing.assert_array_equal(bins, action_to_bins(act, stats))
    edges = np.asarray(stats["edges"])
    d = np.arange(26)[None, :]
    assert np.all(edges[d, bins] <= act + 1e-6) and np.all(act <= edges[d, bins + 1] + 1e-6)
    assert np.all(np.abs(centres - act) <= (edges[d, bins + 1] - edges[d, bins]) / 2 + 1e-6)


def _remux(paths: list[Path], dst: Path) -> list[float]:
    """Concatenate AV1 mp4s without re-encoding (packets re-timed); returns each part's start time."""
    starts, offset = [], 0
    with av.open(str(dst), "w", format="mp4") as oc:
        ost = None
        for p in paths:
            with av.open(str(p)) as ic:
                ist = ic.streams.video[0]
                time_base = ist.time_base   # read while open: PyAV >= 19 refuses a closed container's streams
                ost = ost or oc.add_stream_from_template(ist, opaque=True)
                starts.append(float(offset * time_base))
                end = 0
                for pkt in ic.demux(ist):
                    if pkt.dts is None:
                        continue
                    end = max(end, pkt.pts + pkt.duration)
                    pkt.pts += offset
                    pkt.dts += offset
                    pkt.stream = ost
                    oc.mux(pkt)
                offset += end
    return starts + [float(offset * time_base)]


def _make_v3(dst: Path, *, extra_row: int | None = None, ms_timestamps: int | None = None,
             action_name: str = "action") -> None:
    """LeRobot v3.0 layout of the same three episodes: one data file, one concatenated video,
    meta/episodes parquet with data/video file indices and from/to timestamps, tasks parquet.
    Defects of recorded data: ``extra_row`` (an episode) gets one more parquet row than its video has frames,
    a copy of its last row 1/fps later; ``ms_timestamps`` (an episode) writes its timestamps in milliseconds;
    ``action_name`` renames the action column (and feature)."""
    info = json.loads((G1 / "meta/info.json").read_text())
    info.update(codebase_version="v3.0", total_episodes=3, data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                video_path="videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4")
    info["features"] = {(action_name if k == "action" else k): v for k, v in info["features"].items()}
    (dst / "meta/episodes/chunk-000").mkdir(parents=True)
    (dst / "data/chunk-000").mkdir(parents=True)
    (dst / f"videos/{VKEY}/chunk-000").mkdir(parents=True)
    (dst / "meta/info.json").write_text(json.dumps(info))
    shutil.copy(G1 / "LICENSE", dst / "LICENSE")
    tables, lengths = [], []
    for e in EPISODES:
        t = pq.read_table(G1 / f"data/chunk-000/episode_{e:06d}.parquet")
        if e == extra_row:
            last = t.slice(t.num_rows - 1).to_pylist()[0]
            last.update(timestamp=last["timestamp"] + 1 / info["fps"], frame_index=last["frame_index"] + 1)
            t = pa.concat_tables([t, pa.Table.from_pylist([last], schema=t.schema)])
        if e == ms_timestamps:
            ms = np.asarray(t.column("timestamp").to_pylist()) * 1000.0
            t = t.set_column(t.schema.get_field_index("timestamp"), "timestamp", pa.array(ms, t.schema.field("timestamp").type))
        tables.append(t.rename_columns([action_name if c == "action" else c for c in t.column_names]))
        lengths.append(t.num_rows)
    data = pa.concat_tables(tables)
    data = data.set_column(data.schema.get_field_index("index"), "index", pa.array(np.arange(data.num_rows), pa.int64()))
    pq.write_table(data, dst / "data/chunk-000/file-000.parquet")
    bounds = _remux([G1 / f"videos/chunk-000/{VKEY}/episode_{e:06d}.mp4" for e in EPISODES],
                    dst / f"videos/{VKEY}/chunk-000/file-000.mp4")
    cum = np.concatenate([[0], np.cumsum(lengths)])
    task = "Pick up the yellow bottle on the table."
    vp = f"videos/{VKEY}/"
    pq.write_table(pa.table({
        "episode_index": pa.array(list(EPISODES), pa.int64()), "tasks": pa.array([[task]] * 3),
        "length": pa.array(lengths, pa.int64()),
        "data/chunk_index": pa.array([0] * 3, pa.int64()), "data/file_index": pa.array([0] * 3, pa.int64()),
        "dataset_from_index": pa.array(cum[:-1].tolist(), pa.int64()), "dataset_to_index": pa.array(cum[1:].tolist(), pa.int64()),
        vp + "chunk_index": pa.array([0] * 3, pa.int64()), vp + "file_index": pa.array([0] * 3, pa.int64()),
        vp + "from_timestamp": pa.array(bounds[:-1]), vp + "to_timestamp": pa.array(bounds[1:]),
    }), dst / "meta/episodes/chunk-000/file-000.parquet")
    # as pandas writes it: task strings as the index, task_index as the column
    tasks = pa.table({"task_index": pa.array([0], pa.int64()), "__index_level_0__": pa.array([task])})
    tasks = tasks.replace_schema_metadata({b"pandas": json.dumps({"index_columns": ["__index_level_0__"]}).encode()})
    pq.write_table(tasks, dst / "meta/tasks.parquet")


def test_v3_fixture_gives_the_same_samples(v21, tmp_path):
    torch.manual_seed(0)
    out21, _ = v21
    src = tmp_path / "g1_v3"
    _make_v3(src)
    out3 = tmp_path / "out3"
    rep = convert_lerobot(src, out3, **OPTS)
    assert rep["totals"]["rows"] == 1093 and rep["totals"]["episodes_missing"] == 0
    assert [(e["rows"], e["video_frames"]) for e in rep["episodes"]] == [(393, 393), (343, 343), (357, 357)]
    a, b = _samples(out21), _samples(out3)
    assert sorted(a) == sorted(b)
    for key in a:
        for member in ("action.npy", "action_ts.npy", "state.npy", "conv.json"):
            assert a[key][member] == b[key][member], (key, member)
        ma, mb = json.loads(a[key]["meta.json"]), json.loads(b[key]["meta.json"])
        assert (ma["extra"].pop("lerobot_version"), mb["extra"].pop("lerobot_version")) == ("v2.1", "v3.0")
        assert ma == mb
        # the remux keeps the AV1 frames bit-exact, so the re-encoded clips decode identically
        np.testing.assert_array_equal(_decode_all(a[key]["video.mp4"]), _decode_all(b[key]["video.mp4"]))
    assert (out21 / STATS_NAME).read_bytes() == (out3 / STATS_NAME).read_bytes()


def test_v3_shared_files_are_read_and_indexed_once_per_pass(tmp_path, monkeypatch):
    """A v3 file holds many episodes: each episode read the whole data parquet (and its filter pruned nothing, one
    row group), and each decode chunk demuxed the whole video file again, so both grew with episodes x file size.
    Now the parent's checks and the writing pass each read the parquet file once and index the video once (the
    samples are unchanged: test_v3_fixture_gives_the_same_samples)."""
    import rynnscale.data.video as video
    import rynnscale.data_pipelines.lerobot as lr

    src = tmp_path / "g1_v3"
    _make_v3(src)
    reads, indexed = [], []
    real_parquet, real_index = lr._parquet, video._index

    def parquet(path, what, read="table", **kw):
        if read == "table" and Path(path).parent.name == "chunk-000" and Path(path).parents[1].name == "data":
            reads.append(what)
        return real_parquet(path, what, read, **kw)

    def index(container, limits):
        indexed.append(1)
        return real_index(container, limits)

    monkeypatch.setattr(lr, "_parquet", parquet)
    monkeypatch.setattr(video, "_index", index)
    # 2 s clips every 2 s at 15 fps: 30 frames a clip, chunks of 32 frames: one decode call per clip
    monkeypatch.setattr(lr, "DECODE_CHUNK_FRAMES", 32)
    rep = convert_lerobot(src, tmp_path / "out", **{**OPTS, "stride_seconds": 2.0, "fps": 15.0}, cost_hints=False,
                          media="frames")
    assert rep["totals"]["samples"] == 16 and rep["totals"]["episodes"] == 3
    assert len(reads) == 2, reads          # was 6: every episode, in both passes
    assert len(indexed) == 2, len(indexed)  # was 2 + one per decode chunk (16 clips, one per chunk)


def test_rows_read_for_the_statistics_are_freed_before_converting(tmp_path, monkeypatch):
    """The parent reads every row of every episode for the action statistics; it held them (~0.8 GB for 10k
    episodes of a 26-D humanoid) for the whole conversion. Checked from inside a job, after a gc."""
    import gc
    import weakref

    import rynnscale.data_pipelines.lerobot as lr

    first_pass, alive = [], []
    real_read, real_job = lr.read_episode_table, lr._lerobot_job

    def read(*a, **kw):
        rows = real_read(*a, **kw)
        if len(first_pass) < 2:   # the parent's checks read episodes 1 and 2 first, then the jobs read them again
            first_pass.append(weakref.ref(rows["action"]))
        return rows

    def job(*a, **kw):
        gc.collect()
        alive.append(sum(r() is not None for r in first_pass))
        return real_job(*a, **kw)

    monkeypatch.setattr(lr, "read_episode_table", read)
    monkeypatch.setattr(lr, "_lerobot_job", job)
    rep = convert_lerobot(G1, tmp_path / "out", episodes=[1, 2], clip_seconds=2.0, stride_seconds=6.0, fps=1.0,
                          media="frames", cost_hints=False, progress=False)
    assert rep["totals"]["episodes"] == 2 and len(first_pass) == 2
    assert alive == [0], alive


def test_v3_video_a_frame_short_of_its_table_pairs_by_time(v21, tmp_path):
    """Issue 28.5: episode 2's table has one row more than its video has frames (427 vs 426 in the report) and
    episode 4's timestamps are in milliseconds. Before, the whole conversion stopped at the first ('video has 343
    frames ... parquet has 344 rows (must match one to one)'), and --tolerance-s did not help. Now frames and rows
    pair by time: episode 2's extra row is left out and counted, its clips are exactly the v2.1 ones; episode 4
    pairs one frame of 357 and is skipped and counted (frames_rows_misaligned); episode 1 converts as before."""
    torch.manual_seed(0)
    out21, _ = v21
    src = tmp_path / "g1_v3"
    _make_v3(src, extra_row=2, ms_timestamps=4)
    out = tmp_path / "out"
    rep = convert_lerobot(src, out, **OPTS)
    eps = {e["episode"]: e for e in rep["episodes"]}
    assert (eps[2]["rows"], eps[2]["video_frames"], eps[2]["rows_unpaired"], eps[2]["frames_unpaired"]) == (344, 343, 1, 0)
    assert eps[1]["rows_unpaired"] == eps[1]["frames_unpaired"] == 0
    skipped = {e["episode"]: e for e in rep["skipped_episodes"]}   # found before the statistics: not converted
    assert 4 not in eps and skipped[4]["reason"] == "frames_rows_misaligned"
    assert "episode 4" in skipped[4]["detail"] and "--tolerance-s" in skipped[4]["detail"]
    assert rep["totals"]["episodes_skipped"] == 1 and rep["bad_episodes"] == {"frames_rows_misaligned": 1}
    assert rep["totals"]["rows_unpaired"] == 1 and rep["totals"]["samples"] == 6
    saved = json.loads((out / "convert_report.json").read_text())
    assert saved["bad_episodes"] == {"frames_rows_misaligned": 1} and saved["skipped_episodes"][0]["episode"] == 4
    a, b = _samples(out21), _samples(out)
    assert sorted(b) == sorted(k for k in a if "-e000004-" not in k)
    for key in b:
        for member in ("action.npy", "action_ts.npy", "state.npy"):
            assert a[key][member] == b[key][member], (key, member)
        ma, mb = json.loads(a[key]["meta.json"]), json.loads(b[key]["meta.json"])
        assert ma["video"] == mb["video"] and ma["clip_start_s"] == mb["clip_start_s"]
        for f in ("rows", "row_timestamps", "source_timestamps"):
            assert ma["extra"][f] == mb["extra"][f], (key, f)
        assert mb["extra"]["episode_rows"] == (344 if "-e000002-" in key else 393)
        np.testing.assert_array_equal(_decode_all(a[key]["video.mp4"]), _decode_all(b[key]["video.mp4"]))


def test_v3_action_column_named_differently_names_the_flag_and_the_candidates(v21, tmp_path):
    """Issue 28.5: 'no column action' said nothing about --action-key; now it names the flag and the columns that
    look like actions, and with --action-key the dataset converts."""
    torch.manual_seed(0)
    out21, _ = v21
    src = tmp_path / "g1_v3"
    _make_v3(src, action_name="actions.joint_position")
    with pytest.raises(ConvertError) as e:
        convert_lerobot(src, tmp_path / "out", **{**OPTS, "episodes": [1]})
    msg = str(e.value)
    assert "no column 'action'" in msg and "--action-key" in msg, msg
    candidates = msg.split("vectors: ")[1].split(" (all columns")[0]
    assert candidates.startswith("'actions.joint_position'") and "'observation.state'" in candidates, msg
    rep = convert_lerobot(src, tmp_path / "out", **{**OPTS, "episodes": [1], "action_key": "actions.joint_position"})
    assert rep["totals"]["samples"] == 3
    a, b = _samples(out21), _samples(tmp_path / "out")
    for key in b:
        assert a[key]["action.npy"] == b[key]["action.npy"]
    assert json.loads(b[key]["meta.json"])["action"]["dims"][0] == "kLeftShoulderPitch"   # names follow the feature


def test_nonfinite_actions_stop_the_run_or_are_skipped_and_counted(tmp_path, capsys):
    """Issue 27.3: an episode with a NaN action stopped the run with no way on; the message now says how to skip,
    and --skip-nonfinite skips and counts such episodes (CLI and report)."""
    from rynnscale.cli import main

    src = tmp_path / "g1"
    _copy_writable(G1, src)
    p = src / "data/chunk-000/episode_000004.parquet"
    t = pq.read_table(p)
    acts = t.column("action").to_pylist()
    acts[5][3] = float("nan")
    pq.write_table(t.set_column(t.schema.get_field_index("action"), "action", pa.array(acts, t.schema.field("action").type)), p)
    with pytest.raises(ConvertError, match=r"episode 4 .*'action' has non-finite values .* --skip-nonfinite"):
        convert_lerobot(src, tmp_path / "strict", **{**OPTS, "episodes": [2, 4]})
    assert not list((tmp_path / "strict").glob("*.tar"))
    args = ["data", "convert", "lerobot", str(src), str(tmp_path / "out"), "--episodes", "2,4", "--clip-seconds", "2",
            "--stride-seconds", "4", "--no-progress", "--skip-nonfinite"]
    assert main(args) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed["totals"]["episodes_skipped"] == 1 and printed["totals"]["samples"] == 3
    rep = json.loads((tmp_path / "out" / "convert_report.json").read_text())
    assert rep["bad_episodes"] == {"nonfinite_values": 1} and rep["skipped_episodes"][0]["episode"] == 4
    assert read_manifest(tmp_path / "out").info["episodes"] == [2]


def test_restart_after_failure_redoes_only_missing_shards(v21, tmp_path, caplog):
    """Episode 4's video is corrupt: it is skipped and counted (before, the whole run stopped), and a rerun after
    repairing it into the same directory is refused (its rows change the action statistics). A run that does stop
    after shards 0-1 landed (shard 2 cannot be renamed into place) leaves no temporaries; the rerun writes only
    shard 2, and the result equals an uninterrupted run."""
    torch.manual_seed(0)
    out21, _ = v21
    src = tmp_path / "g1"
    _copy_writable(G1, src)
    bad = src / f"videos/chunk-000/{VKEY}/episode_000004.mp4"
    good = bad.read_bytes()
    bad.write_bytes(good[:2000] + b"\0" * 5000)  # header intact, stream destroyed
    skipped = tmp_path / "skipped"
    rep = convert_lerobot(src, skipped, **OPTS)
    assert rep["bad_episodes"] == {"undecodable_video": 1} and rep["skipped_episodes"][0]["episode"] == 4
    assert "episode 4" in rep["skipped_episodes"][0]["detail"] and rep["totals"]["samples"] == 6
    assert sorted(completed_shards(skipped)) == ["lerobot-000000.tar", "lerobot-000001.tar"]
    bad.write_bytes(good)
    with pytest.raises(ValueError, match="episodes"):
        convert_lerobot(src, skipped, **OPTS)
    out = tmp_path / "out"
    (out / "lerobot-000002.tar").mkdir(parents=True)   # the last shard cannot be renamed into place
    with pytest.raises(OSError):
        convert_lerobot(src, out, **OPTS)
    (out / "lerobot-000002.tar").rmdir()
    assert sorted(completed_shards(out)) == ["lerobot-000000.tar", "lerobot-000001.tar"]
    # the stopped conversion's directory says so: the loader warns, inspect exits 1 (not a whole, smaller dataset)
    assert read_manifest(out).info["complete"] is False and read_manifest(skipped).info["complete"] is True
    from rynnscale.cli import main as cli_main
    from rynnscale.data.reader import expand_shard_patterns
    with caplog.at_level(logging.WARNING, logger="rynnscale.data.reader"):
        assert len(expand_shard_patterns([str(out)])) == 2
    assert "its conversion did not finish" in caplog.text
    assert cli_main(["data", "inspect", str(out), "--no-estimate"]) == 1
    assert cli_main(["data", "inspect", str(skipped), "--no-estimate"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["lerobot-000000.tar", "lerobot-000001.tar"]
    assert not list(out.glob(".*tmp*"))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / ".lerobot-000002.tar.tmp-4242").write_bytes(b"leftover of a killed worker")
    convert_lerobot(src, out, **OPTS)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("lerobot-00000[01].tar")} == stamps
    assert not list(out.glob(".*tmp*"))
    for s in read_manifest(out).shards:
        assert (out / s.name).read_bytes() == (out21 / s.name).read_bytes(), s.name
    # a truncated shard (listed, wrong size) is rewritten; other settings are refused
    (out / "lerobot-000001.tar").write_bytes((out / "lerobot-000001.tar").read_bytes()[:5000])
    convert_lerobot(src, out, **OPTS)
    assert (out / "lerobot-000001.tar").read_bytes() == (out21 / "lerobot-000001.tar").read_bytes()
    with pytest.raises(ValueError, match="fps"):
        convert_lerobot(src, out, **{**OPTS, "fps": 4.0})
    assert sorted(completed_shards(out, verify_sha256=True)) == [f"lerobot-00000{i}.tar" for i in range(3)]
    assert json.loads((out / MANIFEST_NAME).read_text())["total_samples"] == 9
    assert read_manifest(out).info["complete"] is True


def test_jpg_frames_through_train_loader(v21, tmp_path):
    """Both media modes load through TrainLoader with the real SampleEncoder; manifest hints are exact."""
    from rynnscale.data.encode import SampleEncoder
    from rynnscale.data.loader import LoaderConfig, TrainLoader
    from rynnscale.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    out21, _ = v21
    out = tmp_path / "frames"
    convert_lerobot(G1, out, **{**OPTS, "episodes": [2], "media": "frames", "max_side": 320})
    m = next(iter(_samples(out).values()))
    assert sorted(n for n in m if n.startswith("f")) == ["f000.jpg", "f001.jpg", "f002.jpg", "f003.jpg"]
    assert json.loads(m["conv.json"])["conversation"][0]["content"][0]["video"] == ["f000.jpg", "f001.jpg", "f002.jpg", "f003.jpg"]
    assert json.loads(m["meta.json"])["video"]["width"] == 320
    enc = SampleEncoder(load_tokenizer())
    for d, n in ((out21, 9), (out, 3)):
        hints = {}
        for s in read_manifest(d).shards:
            with tarfile.open(d / s.name) as tf:
                keys = list(dict.fromkeys(x.name.split(".", 1)[0] for x in tf.getmembers()))
            hints.update(zip(keys, s.sample_costs["num_tokens"]))
        cfg = LoaderConfig(train_shards=[str(d / "*.tar")], micro_batch_tokens=4096, pack_window=4, shuffle_buffer=0,
                           num_workers=0, num_epochs=1)
        loader = TrainLoader(cfg, enc)
        keys = []
        for b in (b for st in loader for b in st.micro_batches):
            b.validate()
            assert b.pixel_values_videos is not None
            keys += b.sample_keys
            lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
            assert lens == [hints[k] for k in b.sample_keys]
        assert sorted(keys) == sorted(hints) and len(keys) == n
        assert loader.bad_counts == {}
