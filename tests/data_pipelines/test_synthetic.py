"""Synthetic egocentric generator: determinism (across runs and worker counts), restartability,
PyAV decoding, schema validity, and that the answers' coordinates point at the named object in the
decoded frames (colour check allowing codec error)."""

from __future__ import annotations

import io
import json
import re

import av
import numpy as np
import pytest
import torch
import webdataset as wds

from rynnscale.data.manifest import MANIFEST_NAME, completed_shards, read_manifest
from rynnscale.data.schema import validate_conv, validate_meta, validate_sample_members
from rynnscale.data.tags import norm_to_pixel, parse_tags
from rynnscale.data_pipelines.synthetic import (
    OBJECTS,
    PALETTE,
    QUESTION_TYPES,
    generate_synthetic,
    pick_video_codec,
    synthetic_sample,
)

W, H, T = 64, 64, 4
COLOR_TOL = 40  # max |decoded - rendered| per channel at an object's centre (measured worst: 18 with libx264 crf 16)


def _decode(video: bytes) -> np.ndarray:
    with av.open(io.BytesIO(video)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _answer(members) -> str:
    conv = json.loads(members["conv.json"])
    return conv["conversation"][-1]["content"][0]["text"]


def _colour_at(frames: np.ndarray, t: int, point: tuple[float, float], width: int = W, height: int = H) -> np.ndarray:
    x, y = norm_to_pixel(*point, width, height)
    return frames[t, int(y), int(x)].astype(int)


def _nearest_palette(rgb: np.ndarray) -> str:
    return min(PALETTE, key=lambda c: int(np.abs(np.asarray(PALETTE[c]) - rgb).sum()))


def test_sample_is_deterministic():
    torch.manual_seed(0)
    a = synthetic_sample(3, seed=11)
    b = synthetic_sample(3, seed=11)
    assert a == b
    c = synthetic_sample(3, seed=12)
    assert c[0] != a[0] and c[1]["video.mp4"] != a[1]["video.mp4"]


def test_schema_decode_and_actions():
    key, m = synthetic_sample(0, seed=5, frames=6, width=96, height=64, fps=3.0)
    meta = validate_meta(json.loads(m["meta.json"]))
    validate_conv(json.loads(m["conv.json"]), m)
    validate_sample_members(m, meta)
    assert meta["source"] == "synthetic" and meta["licence"]
    assert (meta["video"]["fps"], meta["video"]["num_frames"], meta["video"]["width"], meta["video"]["height"]) == (3.0, 6, 96, 64)
    assert meta["video"]["timestamps"] == pytest.approx([t / 3.0 for t in range(6)])
    video_member = next(n for n in m if n.startswith("video."))
    assert video_member == ("video.mp4" if pick_video_codec() in ("libx264", "mpeg4") else "video.webm")
    frames = _decode(m[video_member])
    assert frames.shape == (6, 64, 96, 3)
    act = np.load(io.BytesIO(m["action.npy"]), allow_pickle=False)
    ts = np.load(io.BytesIO(m["action_ts.npy"]), allow_pickle=False)
    assert act.shape == (6, 2) and act.dtype == np.float32 and ts.shape == (6,)
    assert ts.dtype == np.float64 and ts.tolist() == meta["video"]["timestamps"]
    # the action track is the moving object's centre: its colour is there in every decoded frame
    moving = next(o for o in meta["extra"]["objects"] if o["moving"])
    for t in range(6):
        rgb = frames[t, int(act[t, 1]), int(act[t, 0])].astype(int)
        assert np.abs(rgb - np.asarray(moving["rgb"])).max() <= COLOR_TOL, (t, rgb, moving["name"])


def _blob_centre(frame: np.ndarray, rgb: tuple[int, int, int], near_px: tuple[float, float], half: float) -> tuple[float, float]:
    """Centroid (x, y), in continuous pixel coords, of the pixels whose chromaticity (invariant to
    the shading) matches ``rgb``, within ``half`` px of ``near_px``."""
    f = frame.astype(np.float64)
    want = np.asarray(rgb, np.float64)
    chroma = f / np.maximum(f.sum(-1, keepdims=True), 1.0)
    mask = (np.abs(chroma - want / want.sum()).max(-1) < 0.08) & (f.sum(-1) > 0.5 * want.sum())
    yy, xx = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]] + 0.5
    mask &= (np.abs(xx - near_px[0]) <= half) & (np.abs(yy - near_px[1]) <= half)
    assert mask.sum() >= 9, "no object of that colour near the stated point"
    return float(xx[mask].mean()), float(yy[mask].mean())


@pytest.mark.parametrize("width, height", [(64, 64), (128, 96)])
def test_answer_coordinates_match_rendered_objects(width, height):
    """Every tag in every answer points at the named object in the stated decoded frame: the colour
    there is the object's, and the object's colour blob is centred on the point (unbiased to
    0.2 px on average, so half-pixel, 1 px or camera-sway mistakes show)."""
    torch.manual_seed(0)
    seen_types, seen_kinds, centre_err = set(), set(), []
    half = 0.12 * min(width, height) + 2  # > largest object radius (0.09 * min side)
    for i in range(30):
        _, m = synthetic_sample(i, seed=2, frames=T, width=width, height=height)
        frames = _decode(next(v for n, v in m.items() if n.startswith("video.")))
        assert frames.shape == (T, height, width, 3)
        seen_types.add(json.loads(m["meta.json"])["extra"]["question_type"])
        answer = _answer(m)
        colour = re.search(r"\bthe (\w+) (?:cube|ball)\b", answer, re.IGNORECASE).group(1).lower()
        want = np.asarray(PALETTE[colour])
        tags = parse_tags(answer)  # strict: answers are well-formed training targets
        assert tags, answer
        for g in tags:
            seen_kinds.add(g.kind)
            if g.kind == "traj":
                assert len(g.points) == T and g.frame == 0
                pts = [(g.frame + k, p) for k, p in enumerate(g.points)]  # point k is in frame k
                # it really moved: at its start position in the last frame its colour is gone
                assert np.abs(_colour_at(frames, T - 1, g.points[0], width, height) - want).max() > COLOR_TOL
            elif g.kind == "object":
                (x1, y1), (x2, y2) = g.points
                pts = [(g.frame, ((x1 + x2) / 2, (y1 + y2) / 2))]
            else:
                assert g.kind == "affordance"
                pts = [(g.frame, g.points[0])]
            for t, p in pts:
                rgb = _colour_at(frames, t, p, width, height)
                assert np.abs(rgb - want).max() <= COLOR_TOL, (i, t, p, rgb, colour, answer)
                assert _nearest_palette(rgb) == colour
                px = norm_to_pixel(*p, width, height)
                cx, cy = _blob_centre(frames[t], PALETTE[colour], px, half)
                centre_err.append((cx - px[0], cy - px[1]))
    assert seen_types == {"traj", "locate_last", "locate_frame", "which_moved", "affordance"}
    assert seen_kinds == {"traj", "object", "affordance"}
    assert len(centre_err) > 40
    # blob centroid - stated point, [N, 2] px. Measured with libx264: mean (0.00, -0.08), max |.| 0.96,
    # median distance 0.3-0.4 (4:2:0 chroma blurs edges). Stating the centre 0.5 px off moves the
    # mean by ~0.25-0.3, 1 px off on traj/affordance points by ~0.45; camera-sway errors are larger.
    d = np.asarray(centre_err)
    assert np.all(np.abs(d.mean(0)) <= 0.2), d.mean(0)
    assert np.abs(d).max() <= 1.5 and np.median(np.hypot(*d.T)) <= 0.6, (np.abs(d).max(), np.median(np.hypot(*d.T)))


def test_generate_deterministic_parallel_and_restartable(tmp_path):
    torch.manual_seed(0)
    kw = dict(seed=4, frames=T, width=W, height=H, samples_per_shard=4, progress=False)
    one = tmp_path / "one"
    path = generate_synthetic(one, 10, workers=1, **kw)
    assert path == one / MANIFEST_NAME
    m = read_manifest(one)
    assert [s.num_samples for s in m.shards] == [4, 4, 2] and m.total_samples == 10
    assert m.info["seed"] == 4 and m.info["codec"] == pick_video_codec()
    assert set(m.shards[0].sample_costs) == {"text_bytes", "video_pixels"}

    # same bytes with 2 worker processes
    two = tmp_path / "two"
    generate_synthetic(two, 10, workers=2, **kw)
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir()) == [MANIFEST_NAME] + [f"synthetic-00000{i}.tar" for i in range(3)]
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f

    # readable with webdataset: 10 whole samples in key order
    got = list(wds.WebDataset([str(one / s.name) for s in m.shards], shardshuffle=False))
    assert [g["__key__"] for g in got] == [f"syn-s4-{i:08d}" for i in range(10)]
    assert all({"meta.json", "conv.json", "video.mp4", "action.npy", "action_ts.npy"} <= set(g) for g in got)

    # restart after losing a shard: only that shard is rewritten (same bytes), the others untouched
    stamps = {f: (one / f).stat().st_mtime_ns for f in files if f.endswith(".tar")}
    lost = (one / "synthetic-000001.tar").read_bytes()
    (one / "synthetic-000001.tar").unlink()
    (one / ".synthetic-000002.tar.tmp-999").write_bytes(b"half-written leftover")
    generate_synthetic(one, 10, workers=1, **kw)
    assert (one / "synthetic-000001.tar").read_bytes() == lost
    assert (one / "synthetic-000000.tar").stat().st_mtime_ns == stamps["synthetic-000000.tar"]
    assert (one / "synthetic-000002.tar").stat().st_mtime_ns == stamps["synthetic-000002.tar"]
    assert not list(one.glob(".*tmp*"))
    assert sorted(completed_shards(one, verify_sha256=True)) == [f for f in files if f.endswith(".tar")]

    # other settings into the same directory: refused, nothing changed
    with pytest.raises(ValueError, match="seed"):
        generate_synthetic(one, 10, workers=1, **{**kw, "seed": 5})
    assert (one / "synthetic-000001.tar").read_bytes() == lost


def test_bad_arguments():
    with pytest.raises(ValueError, match="even"):
        generate_synthetic("/nonexistent/never-created", 4, width=63, progress=False)
    with pytest.raises(ValueError, match=">= 1"):
        generate_synthetic("/nonexistent/never-created", 0, progress=False)
    with pytest.raises(ValueError, match="codec"):
        synthetic_sample(0, codec="h265-magic")
    with pytest.raises(ValueError, match="frames >= 2"):
        synthetic_sample(0, frames=1)


def test_question_types_narrow_the_set(tmp_path):
    """``questions`` draws each clip's question from a subset; the default is every type with the same bytes as
    before the option; a directory generated with other types is refused, both ways."""
    assert synthetic_sample(7, seed=3) == synthetic_sample(7, seed=3, questions=QUESTION_TYPES)
    for i in range(12):
        _, m = synthetic_sample(i, seed=3, questions=["affordance", "locate_frame"])
        qtype = json.loads(m["meta.json"])["extra"]["question_type"]
        assert qtype in ("affordance", "locate_frame")
        kinds = {g.kind for g in parse_tags(_answer(m))}
        assert kinds == ({"affordance"} if qtype == "affordance" else {"object"}), (i, _answer(m))
    kw = dict(seed=3, samples_per_shard=4, progress=False)
    narrow = generate_synthetic(tmp_path / "narrow", 4, questions=["affordance"], **kw).parent
    assert read_manifest(narrow).info["questions"] == ["affordance"]
    with pytest.raises(ValueError, match="questions"):
        generate_synthetic(narrow, 4, **kw)
    full = generate_synthetic(tmp_path / "full", 4, **kw).parent
    assert "questions" not in read_manifest(full).info
    with pytest.raises(ValueError, match="questions"):
        generate_synthetic(full, 4, questions=["traj"], **kw)
    for bad in ([], ["pointing"], ["traj", "traj"]):
        with pytest.raises(ValueError, match="question types"):
            synthetic_sample(0, questions=bad)


def test_object_counts(tmp_path):
    """``objects`` = [fewest, most] objects per clip: the default [2, 4] keeps the bytes; [1, 1] renders one (the
    moving one, which every question then names); a mismatch with the directory's manifest is refused."""
    assert synthetic_sample(5, seed=2) == synthetic_sample(5, seed=2, objects=OBJECTS) and OBJECTS == (2, 4)
    counts = set()
    for i in range(8):
        _, m = synthetic_sample(i, seed=2, objects=[1, 1])
        extra = json.loads(m["meta.json"])["extra"]
        counts.add(len(extra["objects"]))
        assert extra["objects"][0]["name"] in _answer(m)
        frames = _decode(m["video.mp4"])
        for g in parse_tags(_answer(m)):  # every tag points at the one object's colour
            x, y = g.points[0] if len(g.points) != 2 or g.kind != "object" else np.mean(g.points, axis=0)
            assert _nearest_palette(_colour_at(frames, g.frame or 0, (x, y))) == extra["objects"][0]["color"]
    assert counts == {1}
    assert {len(json.loads(synthetic_sample(i, seed=2, objects=[4, 5])[1]["meta.json"])["extra"]["objects"])
            for i in range(12)} == {4, 5}
    d = generate_synthetic(tmp_path / "one", 2, seed=2, objects=[1, 1], progress=False).parent
    assert read_manifest(d).info["objects"] == [1, 1]
    with pytest.raises(ValueError, match="objects"):
        generate_synthetic(d, 2, seed=2, progress=False)
    for bad in ([0, 1], [3, 2], [1, 6], [2]):
        with pytest.raises(ValueError, match="object counts"):
            synthetic_sample(0, objects=bad)


def test_cli_synth_narrows_and_defaults(tmp_path):
    from rynnscale.cli import main as cli_main

    assert cli_main(["data", "synth", str(tmp_path / "n"), "--num-samples", "2", "--questions", "affordance,traj",
                     "--objects", "1,2"]) == 0
    info = read_manifest(tmp_path / "n").info
    assert info["questions"] == ["affordance", "traj"] and info["objects"] == [1, 2]
    assert cli_main(["data", "synth", str(tmp_path / "d"), "--num-samples", "2"]) == 0
    assert not {"questions", "objects"} & set(read_manifest(tmp_path / "d").info)


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", "0"], "num_samples, samples_per_shard and workers must be >= 1"),
    (["--frames", "1"], "'frames' = 1 must be >= 2"),
    (["--width", "33"], "'width' = 33 must be even and >= 16"),
    (["--questions", "bogus"], "synthetic question types must be distinct names"),
    (["--workers", "0"], "workers must be >= 1"),
    (["--objects", "2,x"], "--objects '2,x': expected fewest,most"),
])
def test_cli_synth_bad_arguments_are_messages_with_exit_code_2(tmp_path, capsys, flags, message):
    """Checked before anything is written: no directory is left behind."""
    from rynnscale.cli import main as cli_main

    assert cli_main(["data", "synth", str(tmp_path / "out"), "--num-samples", "4", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_synth_into_a_file_is_a_message(tmp_path, capsys):
    from rynnscale.cli import main as cli_main

    (tmp_path / "file").write_text("x")
    assert cli_main(["data", "synth", str(tmp_path / "file"), "--num-samples", "4"]) == 2
    assert "rynnscale data synth:" in capsys.readouterr().err
