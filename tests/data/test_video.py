"""Video decoding: frame selection (vs transformers' rule), seek == sequential, real G1 AV1 clips
(frame counts and timestamps vs the LeRobot metadata / parquet), H.264 and VP9, size limits."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from shared_data import SHARED_DATA

av = pytest.importorskip("av")

from rynnscale.data.video import (  # noqa: E402
    VideoError,
    VideoLimits,
    decode_frames,
    probe_video,
    sample_frame_indices,
)


def shared_data() -> Path:
    return SHARED_DATA


G1 = shared_data() / "lerobot_g1_subset"
needs_g1 = pytest.mark.skipif(not G1.is_dir(), reason=f"shared G1 data not found at {G1} (set RYNNSCALE_SHARED_DATA)")
G1_EPISODES = (1, 2, 4)


def g1_video(ep: int) -> bytes:
    return (G1 / "videos/chunk-000/observation.images.cam_high" / f"episode_{ep:06d}.mp4").read_bytes()


def g1_lengths() -> dict[int, int]:
    rows = [json.loads(line) for line in (G1 / "meta/episodes.jsonl").read_text().splitlines() if line.strip()]
    return {r["episode_index"]: r["length"] for r in rows}


# ----------------------------------------------------------------------------- sampling rule
@pytest.mark.parametrize("total,vfps,fps,min_f,max_f", [
    (393, 30.0, 2, 4, 768), (343, 30.0, 2, 4, 768), (10, 30.0, 2, 4, 768), (3, 30.0, 2, 4, 768),
    (1, 30.0, 2, 4, 768), (5000, 25.0, 2, 4, 64), (300, 29.97, 1.5, 4, 768), (7, 2.0, 2, 4, 768),
])
def test_sample_indices_match_transformers(total, vfps, fps, min_f, max_f):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    fake_self = SimpleNamespace(fps=fps, min_frames=min_f, max_frames=max_f)
    want = Qwen3VLVideoProcessor.sample_frames(fake_self, VideoMetadata(total_num_frames=total, fps=vfps), fps=fps)
    got = sample_frame_indices(total, vfps, fps=fps, min_frames=min_f, max_frames=max_f)
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- real AV1 clips
@needs_g1
@pytest.mark.parametrize("ep", G1_EPISODES)
def test_g1_seek_equals_sequential_and_matches_metadata(ep):
    data = g1_video(ep)
    info = probe_video(data)
    assert info.codec in ("libdav1d", "av1", "libaom-av1")
    assert info.total_frames == g1_lengths()[ep]  # parquet rows == video frames per LeRobot meta
    assert (info.width, info.height, info.fps) == (640, 480, 30.0)

    seek = decode_frames(data, method="seek")
    seq = decode_frames(data, method="sequential")
    assert seek.method == "seek" and seq.method == "sequential"
    np.testing.assert_array_equal(seek.indices, seq.indices)
    assert seek.frames_thwc.shape == (len(seek.indices), 480, 640, 3) and seek.frames_thwc.dtype == np.uint8
    np.testing.assert_array_equal(seek.frames_thwc, seq.frames_thwc)
    assert int(info.total_frames / 30 * 2) == len(seek.indices)  # fps 2 sampling
    np.testing.assert_allclose(seek.timestamps_s, seek.indices / 30.0, rtol=0, atol=1e-9)


@needs_g1
@pytest.mark.parametrize("ep", G1_EPISODES)
def test_g1_frame_times_match_parquet(ep):
    if os.environ.get("RYNNSCALE_REQUIRE_HF_PARITY") == "1":  # .ci/hf_parity.sh installs pyarrow: must run
        import pyarrow.parquet as pq
    else:
        pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow not installed: parquet timestamp check skipped")
    data = g1_video(ep)
    info = probe_video(data)
    seek = decode_frames(data, method="seek")
    table = pq.read_table(G1 / "data/chunk-000" / f"episode_{ep:06d}.parquet", columns=["timestamp", "frame_index"])
    ts = np.asarray(table.column("timestamp").to_numpy(), dtype=np.float64)
    assert len(ts) == info.total_frames
    np.testing.assert_array_equal(table.column("frame_index").to_numpy(), np.arange(len(ts)))
    np.testing.assert_allclose(seek.timestamps_s, ts[seek.indices], rtol=0, atol=1e-4)


@needs_g1
def test_g1_explicit_indices_and_adjacent_frames():
    data = g1_video(2)
    idx = np.array([0, 1, 2, 3, 50, 51, 52, 200, 201, 342])  # runs of neighbours + jumps + the last frame
    a = decode_frames(data, idx, method="seek")
    b = decode_frames(data, idx, method="sequential")
    np.testing.assert_array_equal(a.frames_thwc, b.frames_thwc)
    assert a.method == "seek"
    assert not np.array_equal(a.frames_thwc[0], a.frames_thwc[-1])


# ----------------------------------------------------------------------------- other codecs
def _encode(codec: str, fmt: str, n: int = 40, rate: int = 10, w: int = 64, h: int = 48, **opts) -> bytes:
    """n frames whose uniform grey level encodes the frame index (5*i + 20)."""
    buf = io.BytesIO()
    c = av.open(buf, "w", format=fmt)
    s = c.add_stream(codec, rate=rate)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {k: str(v) for k, v in opts.items()}
    for i in range(n):
        img = np.full((h, w, 3), 5 * i + 20, dtype=np.uint8)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return buf.getvalue()


@pytest.mark.parametrize("codec,fmt,opts", [
    ("libx264", "mp4", {"g": 8, "bf": 2}),          # B-frames: decode order != display order
    ("libx264", "matroska", {"g": 5, "bf": 3}),
    ("libvpx-vp9", "webm", {"g": 8}),
])
def test_synthetic_codecs_pick_the_right_frames(codec, fmt, opts):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} encoder not in this PyAV build")
    data = _encode(codec, fmt, **opts)
    info = probe_video(data)
    assert info.total_frames == 40 and info.fps == 10.0
    a = decode_frames(data, fps=None, num_frames=13, method="seek")
    b = decode_frames(data, fps=None, num_frames=13, method="sequential")
    np.testing.assert_array_equal(a.frames_thwc, b.frames_thwc)
    levels = a.frames_thwc.reshape(13, -1).mean(1)
    np.testing.assert_allclose(levels, 5 * a.indices + 20, atol=3)  # frame k really is frame indices[k]
    np.testing.assert_allclose(a.timestamps_s, a.indices / 10.0, atol=1e-9)


def test_truncated_faststart_mp4_is_undecodable():
    data = _encode("libx264", "mp4", n=40, g=4, movflags="faststart")
    assert probe_video(data).total_frames == 40
    with pytest.raises(VideoError) as e:
        decode_frames(data[: len(data) * 2 // 3])
    assert e.value.reason == "undecodable_video"


# ----------------------------------------------------------------------------- limits and garbage
def test_limits_and_garbage():
    data = _encode("libx264", "mp4", n=20, w=64, h=48)
    for limits, what in [(VideoLimits(max_bytes=100), "bytes"), (VideoLimits(max_pixels=64 * 48 - 1), "pixels"),
                         (VideoLimits(max_total_frames=10), "frames"), (VideoLimits(max_frames=3), "max_frames")]:
        with pytest.raises(VideoError) as e:
            decode_frames(data, fps=None, num_frames=5, limits=limits)
        assert e.value.reason == "too_large", what
    rng = np.random.default_rng(0)
    for bad in (b"", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), data[:200]):
        with pytest.raises(VideoError) as e:
            decode_frames(bad)
        assert e.value.reason == "undecodable_video"


# ----------------------------------------------------------------------------- channel-planar output
def _noisy(codec: str, fmt: str, w: int, h: int, n: int = 6) -> bytes:
    """Random-texture frames (so chroma rounding differences would show), odd sizes allowed."""
    rng = np.random.default_rng(w * h)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for _ in range(n):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.mark.parametrize("codec,fmt,w,h", [
    ("libx264", "mp4", 448, 448), ("libx264", "mp4", 640, 50), ("libx264", "mp4", 66, 50), ("libx264", "mp4", 854, 48),
    ("libvpx-vp9", "webm", 100, 62), ("libvpx-vp9", "webm", 128, 62), ("libsvtav1", "mp4", 192, 128)])
def test_channels_first_decode_equals_rgb24(codec, fmt, w, h):
    """libswscale's planar RGB (gbrp) gives exactly the rgb24 values transformers' reader uses (widths that are
    multiples of 16; other widths decode as rgb24 into the planar buffer); the planar buffer is what patchify
    reads without a channel reorder (issue 14's throughput item)."""
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} encoder not in this PyAV build")
    data = _noisy(codec, fmt, w, h)
    a = decode_frames(data, fps=None, num_frames=5)
    b = decode_frames(data, fps=None, num_frames=5, channels_first=True)
    assert b.frames_thwc.shape == a.frames_thwc.shape and b.frames_thwc.strides[-1] == h * w
    np.testing.assert_array_equal(a.frames_thwc, b.frames_thwc)


@needs_g1
def test_g1_channels_first_decode_equals_rgb24():
    data = g1_video(1)
    a = decode_frames(data, fps=2.0)
    b = decode_frames(data, fps=2.0, channels_first=True)
    np.testing.assert_array_equal(a.frames_thwc, b.frames_thwc)


# ----------------------------------------------------------------------------- opening without decoding
def _plain_pyav_frames(data: bytes) -> np.ndarray:
    """Every frame, rgb24, in display order, from a plain PyAV open and decode (the reference)."""
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


@pytest.mark.parametrize("codec,fmt,opts", [
    ("libx264", "mp4", {"g": 8, "bf": 2}), ("libx264", "mp4", {"g": 8, "bf": 0}),
    ("libx264", "matroska", {"g": 5, "bf": 3}), ("libx264", "mpegts", {"g": 6, "bf": 2}),
    ("libvpx-vp9", "webm", {"g": 8}), ("libsvtav1", "mp4", {})])
def test_open_without_decoding_gives_the_plain_frames(codec, fmt, opts):
    """Containers are opened with find_stream_info's decoding skipped (video.py's docstring); every frame must
    still be the one a plain PyAV open decodes, bitwise, by seek and by sequential decoding, and the probe
    must report the same stream."""
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} encoder not in this PyAV build")
    data = _noisy(codec, fmt, 96, 64, n=24) if not opts else _noisy_gop(codec, fmt, opts)
    ref = _plain_pyav_frames(data)
    idx = np.arange(len(ref))
    for method in ("auto", "sequential"):   # auto: seek (MPEG-TS falls back to sequential, as before)
        got = decode_frames(data, idx, method=method)
        np.testing.assert_array_equal(got.frames_thwc, ref)
    assert fmt == "mpegts" or got.method == "sequential" and decode_frames(data, idx).method == "seek"
    info = probe_video(data)
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        assert (info.width, info.height) == (s.codec_context.width, s.codec_context.height)
    assert info.total_frames == len(ref)


def _noisy_gop(codec: str, fmt: str, opts: dict, w: int = 96, h: int = 64, n: int = 24) -> bytes:
    rng = np.random.default_rng(n)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {k: str(v) for k, v in opts.items()}
        base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for i in range(n):   # a moving texture, so P/B-frames predict from neighbours
            for p in s.encode(av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_h264_open_skips_the_frames_find_stream_info_would_decode():
    """The H.264 open really skips decoding (pixel format unknown until the first frame), and a stream with
    B-frames keeps the declared reorder depth, so no plain re-open is needed. On PyAV 19 the open passed
    ``stream_options``, a keyword it no longer has: the TypeError fell back to the plain open, which decodes."""
    from rynnscale.data.video import _index, _needs_plain_open, _open
    data = _noisy_gop("libx264", "mp4", {"g": 8, "bf": 2})
    c = _open(data, VideoLimits())
    try:
        assert c.streams.video[0].codec_context.format is None
        info = _index(c, VideoLimits())
        assert info.reordered and not _needs_plain_open(c, info)
    finally:
        c.close()
    c = _open(data, VideoLimits(), plain=True)
    try:
        assert c.streams.video[0].codec_context.format is not None
    finally:
        c.close()
