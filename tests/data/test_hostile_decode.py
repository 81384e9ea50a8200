"""Decode-side memory bounds on hostile media (issues 15 and 17): every input here is real bytes.

- a frame list naming one 49 KB 4096x4096 PNG 768 times (or 768 members with the same bytes) is decoded ONCE
  and each frame resized as it is decoded: before, 768 full-size decodes into a 36 GiB buffer;
- an image whose header claims more than ``data.max_image_pixels`` (or PIL's decompression-bomb ceiling) is a
  ``too_large`` skip before any pixel is decoded;
- a video whose header claims 16000x16000 (too_large) or 100000x100000 pixels (FFmpeg refuses to open it), a
  header claiming 10^6 frames in an 8-frame file, a 0-byte video: counted skips with a reason;
- resizing while decoding is bitwise what decoding everything and resizing afterwards gives (so HF parity holds);
- a loader worker over a shard of all of them stays below a stated peak RSS (measured in a subprocess).
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import SHARED_DATA

from rynnscale.data import encode as encode_mod
from rynnscale.data.encode import EncoderConfig, SampleEncoder, SampleError
from rynnscale.data.tokenizer import load_tokenizer
from rynnscale.data.video import decode_frames
from rynnscale.data.vision_preprocess import VisionSpec, decode_image, resize_thwc, video_target_size

REPO = Path(__file__).resolve().parents[2]


def png(w: int, h: int, seed: int = 0) -> bytes:
    """A PNG that compresses well (a few flat bands): 4096x4096 is ~50 KB."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2] = (seed * 37 % 256, 80, 160)
    bio = io.BytesIO()
    Image.fromarray(a).save(bio, format="PNG")
    return bio.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to claim ``w`` x ``h`` (CRC fixed): a decompression-bomb header."""
    data = bytearray(png(1, 1))
    i = data.index(b"IHDR")
    data[i + 4:i + 12] = struct.pack(">II", w, h)
    data[i + 17:i + 21] = struct.pack(">I", zlib.crc32(bytes(data[i:i + 17])))
    return bytes(data)


def y4m(w: int, h: int, frames: int = 3) -> bytes:
    """A raw YUV4MPEG2 video whose text header claims ``w`` x ``h`` (only 16x16 of pixel data follows)."""
    return f"YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg\n".encode() + (b"FRAME\n" + bytes(384)) * frames


def mp4(n: int = 8, w: int = 64, h: int = 64) -> bytes:
    import av

    bio = io.BytesIO()
    with av.open(bio, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((h, w, 3), i * 20, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return bio.getvalue()


def mp4_claiming_frames(n: int) -> bytes:
    """An 8-frame mp4 whose stts (time-to-sample) entry claims ``n`` frames."""
    data = bytearray(mp4())
    k = data.index(b"stts")
    assert struct.unpack(">I", data[k + 8:k + 12])[0] == 1   # one entry: (count, delta)
    data[k + 12:k + 16] = struct.pack(">I", n)
    return bytes(data)


def conv_video(ref) -> bytes:
    return json.dumps({"conversation": [{"role": "user", "content": [{"type": "video", "video": ref},
                                                                     {"type": "text", "text": "what?"}]},
                                        {"role": "assistant", "content": "a cup"}]}).encode()


def conv_image(ref: str) -> bytes:
    return json.dumps({"conversation": [{"role": "user", "content": [{"type": "image", "image": ref}]},
                                        {"role": "assistant", "content": "a cup"}]}).encode()


@pytest.fixture(scope="module")
def enc():
    return SampleEncoder(load_tokenizer())


def _count_decodes(monkeypatch) -> list[int]:
    calls = []
    real = encode_mod.decode_image

    def counting(data, **kw):
        calls.append(len(data))
        return real(data, **kw)

    monkeypatch.setattr(encode_mod, "decode_image", counting)
    return calls


@pytest.mark.parametrize("distinct_names", [False, True])
def test_repeated_frame_is_decoded_once_and_resized_while_decoding(enc, monkeypatch, distinct_names):
    """768 references to one 512x512 PNG (one member, or 768 members with the same bytes): before, 768 decodes and
    a [768, 512, 512, 3] buffer (604 MB); now one decode and the clip at its target size only."""
    frame = png(512, 512)
    names = [f"f{i:03d}.png" for i in range(768)] if distinct_names else ["f000.png"] * 768
    members = {"conv.json": conv_video(names)} | {n: frame for n in set(names)}
    calls = _count_decodes(monkeypatch)
    p = enc.prepare("rep", members)
    assert len(calls) == 1, f"{len(calls)} decodes of one frame"
    (m,) = p.media
    T, h, w, _ = m.frames_thwc.shape
    assert T == 768 and (h, w) == m.size_hw == video_target_size(768, 512, 512, enc.spec)
    assert m.frames_thwc.numel() <= 3 * enc.cfg.vision.video_max_pixels   # the resized clip, not T full-size frames
    assert torch.equal(m.frames_thwc[0], m.frames_thwc[-1])


def test_distinct_frames_equal_decode_all_then_resize(enc):
    """Resizing each frame as it is decoded is bitwise the old path (decode all full-size, resize the clip)."""
    frames = sorted((SHARED_DATA / "rynnbrain_frames").rglob("*.jpg"))[:5]
    if len(frames) < 5:
        pytest.skip("shared frames missing")
    raw = [f.read_bytes() for f in frames]
    order = [0, 1, 1, 2, 3, 4, 4, 0]   # repeats, and a member equal to an earlier one
    names = [f"f{i:03d}.jpg" for i in order]
    members = {"conv.json": conv_video(names)} | {f"f{i:03d}.jpg": raw[i] for i in set(order)}
    p = enc.prepare("real", members)
    (m,) = p.media
    full = torch.from_numpy(np.stack([decode_image(raw[i]) for i in order]))
    assert torch.equal(m.frames_thwc, resize_thwc(full, m.size_hw))
    ref = enc.encode("real", members)
    assert ref.pixel_values_videos.shape[0] == m.grid_thw[0] * m.grid_thw[1] * m.grid_thw[2]


def test_video_resized_while_decoding_equals_resize_after():
    videos = sorted((SHARED_DATA / "lerobot_g1_subset").rglob("*.mp4"))
    data = videos[0].read_bytes() if videos else mp4(12, 96, 80)
    spec = VisionSpec()
    full = decode_frames(data, fps=2.0)
    small = decode_frames(data, fps=2.0, resize_to=lambda t, h, w: video_target_size(t, h, w, spec))
    T, H, W, _ = full.frames_thwc.shape
    size = video_target_size(T, H, W, spec)
    assert small.source_hw == (H, W) and small.frames_thwc.shape[1:3] == size
    assert torch.equal(torch.from_numpy(small.frames_thwc), resize_thwc(torch.from_numpy(full.frames_thwc), size))


@pytest.mark.parametrize("case,make,reason,detail", [
    ("bomb-header", lambda: png_claiming(30000, 30000), "too_large", "decompression bomb refused before decoding"),
    ("over-bound", lambda: png_claiming(5000, 5000), "too_large", "5000x5000 = 25000000 pixels > max_pixels"),
])
def test_image_header_over_the_bound_is_refused_before_decoding(enc, monkeypatch, case, make, reason, detail):
    data = make()
    assert len(data) < 200
    members = {"conv.json": conv_image("f000.png"), "f000.png": data}
    for call in (enc.encode, enc.estimate):
        with pytest.raises(SampleError) as ei:
            call(case, members)
        assert ei.value.reason == reason and detail in ei.value.detail and "message 0 item 0" in ei.value.detail
    frames = {"conv.json": conv_video(["f000.png"] * 8), "f000.png": data}
    with pytest.raises(SampleError, match=reason):
        enc.encode(case, frames)


def test_max_image_pixels_is_configurable():
    small = SampleEncoder(load_tokenizer(), EncoderConfig(max_frame_pixels=100 * 100))
    members = {"conv.json": conv_image("f000.png"), "f000.png": png(128, 128)}
    with pytest.raises(SampleError, match=r"128x128 = 16384 pixels > max_pixels=10000 \(data.max_image_pixels"):
        small.encode("k", members)


@pytest.mark.parametrize("case,make,reason,detail", [
    ("header-16000x16000", lambda: y4m(16000, 16000), "too_large", "frame 16000x16000 = 256000000 pixels"),
    ("header-100000x100000", lambda: y4m(100000, 100000), "undecodable_video", "cannot open container"),
    ("header-1e6-frames", lambda: mp4_claiming_frames(10**6), "undecodable_video",
     "header declares 1000000 frames, file holds 8"),
    ("zero-bytes", lambda: b"", "undecodable_video", "empty file"),
])
def test_hostile_video_headers_are_refused_before_decoding(enc, case, make, reason, detail):
    members = {"conv.json": conv_video("video.mp4"), "video.mp4": make()}
    for call in (enc.encode, enc.estimate):
        with pytest.raises(SampleError) as ei:
            call(case, members)
        assert ei.value.reason == reason and detail in ei.value.detail and ei.value.key == case, ei.value.detail
        assert "video.mp4" in ei.value.detail


# ------------------------------------------------------------------------------ measured peak of a loader worker

#: Stated bound on a loader worker's peak RSS growth over its baseline (interpreter, torch, tokenizer) for
#: this shard, i.e. the README's per-worker formula at default settings: one full-size decode of a
#: data.max_image_pixels image (PIL's 4-byte copy + the RGB array, <= 16.7 Mpx x 7 B = 117 MB) + the resized
#: clip (<= 3 B x video_max_pixels = 75 MB) + its patches (the same again) + the shuffle buffer's payload.
PEAK_GROWTH_BOUND_MIB = 512

_WORKER = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))   # the old path asked 36 GiB: fail, do not swap
sys.path.insert(0, sys.argv[1])
from rynnscale.data.encode import SampleEncoder
from rynnscale.data.loader import LoaderConfig, TrainLoader
from rynnscale.data.tokenizer import load_tokenizer
enc = SampleEncoder(load_tokenizer())
cfg = LoaderConfig(train_shards=json.loads(sys.argv[2]), micro_batch_tokens=16384, pack_window=4, shuffle_buffer=16,
                   num_workers=0, num_epochs=1, max_bad_fraction=1.0, tune_malloc=False)
loader = TrainLoader(cfg, enc)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
keys = [k for st in loader for b in st.micro_batches for k in b.sample_keys]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"keys": sorted(keys), "bad": loader.bad_counts, "base_kib": base, "peak_kib": peak}))
"""


@pytest.mark.slow
def test_loader_worker_peak_rss_on_a_hostile_shard_is_bounded(tmp_path):
    import gzip

    from rynnscale.data_pipelines.shards import ShardWriter

    big = png(4096, 4096)
    assert len(big) < 100_000
    hostile = {
        "framebomb": {"conv.json": conv_video(["f000.png"] * 768), "f000.png": big},
        "framebomb2": {"conv.json": conv_video([f"f{i:03d}.png" for i in range(64)])} |
                      {f"f{i:03d}.png": big for i in range(64)},
        "imgbomb": {"conv.json": conv_image("f000.png"), "f000.png": png_claiming(30000, 30000)},
        "bigheader": {"conv.json": conv_video("video.mp4"), "video.mp4": y4m(16000, 16000)},
        "hugeheader": {"conv.json": conv_video("video.mp4"), "video.mp4": y4m(100000, 100000)},
        "manyframes": {"conv.json": conv_video("video.mp4"), "video.mp4": mp4_claiming_frames(10**6)},
        "empty": {"conv.json": conv_video("video.mp4"), "video.mp4": b""},
        "good": {"conv.json": conv_video("video.mp4"), "video.mp4": mp4()},
    }
    d = tmp_path / "hostile"
    with ShardWriter(d, max_samples=100) as w:
        for k, members in hostile.items():
            w.write(k, members)
    gz = tmp_path / "gz" / "bomb.tar"   # a compressed shard: one 1000 MiB member in ~1 MB of gzip
    gz.parent.mkdir()
    size = 1000 << 20
    ti = tarfile.TarInfo("gzbomb.action.npy")
    ti.size = size
    with gzip.open(gz, "wb", compresslevel=1) as f:
        f.write(ti.tobuf(format=tarfile.PAX_FORMAT))
        zeros = bytes(16 << 20)
        for _ in range(size // len(zeros)):
            f.write(zeros)
        f.write(bytes(2 * 512))
    assert gz.stat().st_size < 8 << 20
    shards = sorted(str(p) for p in d.glob("*.tar")) + [str(gz)]
    r = subprocess.run([sys.executable, "-c", _WORKER, str(REPO), json.dumps(shards)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    growth_mib = (out["peak_kib"] - out["base_kib"]) / 1024
    print(f"loader worker: baseline {out['base_kib'] / 1024:.0f} MiB, peak {out['peak_kib'] / 1024:.0f} MiB, "
          f"growth {growth_mib:.0f} MiB (bound {PEAK_GROWTH_BOUND_MIB} MiB)")
    assert out["keys"] == ["framebomb", "framebomb2", "good"], out
    assert out["bad"] == {"too_large": 2, "undecodable_video": 3, "corrupt_tar": 1}, out["bad"]
    assert growth_mib < PEAK_GROWTH_BOUND_MIB, out


@pytest.mark.parametrize("truncate", [False, True])
def test_media_past_max_tokens_are_not_decoded(monkeypatch, truncate):
    """64 image items naming one 1024x1024 PNG (1024 tokens each) under max_tokens=4096: before, all 64 were
    decoded (and held at 1024x1024) before the length check; now only the items starting below max_tokens."""
    enc = SampleEncoder(load_tokenizer(), EncoderConfig(max_tokens=4096, truncate=truncate))
    conv = json.dumps({"conversation": [
        {"role": "user", "content": [{"type": "text", "text": "look"}] + [{"type": "image", "image": "f000.png"}] * 64},
        {"role": "assistant", "content": "a cup"}]}).encode()
    members = {"conv.json": conv, "f000.png": png(1024, 1024)}
    calls = _count_decodes(monkeypatch)
    if truncate:   # nothing trainable survives the cut: too_long either way, after at most 4 decodes
        with pytest.raises(SampleError, match="no assistant token is left"):
            enc.encode("many", members)
    else:
        with pytest.raises(SampleError, match="too_long"):
            enc.encode("many", members)
    assert 1 <= len(calls) <= 4, len(calls)
    # an answer before the images: truncation keeps it and the images that fit, all decoded
    conv2 = json.dumps({"conversation": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "a cup"},
        {"role": "user", "content": [{"type": "image", "image": "f000.png"}] * 64},
        {"role": "assistant", "content": "ok"}]}).encode()
    if truncate:
        calls.clear()
        s = enc.encode("many2", {"conv.json": conv2, "f000.png": members["f000.png"]})
        kept = s.image_grid_thw.shape[0]
        assert 1 <= kept <= 3 and len(calls) <= 4 and s.num_tokens <= 4096, (kept, len(calls))


@pytest.mark.parametrize("where", ["item", "meta.video", "meta"])
@pytest.mark.parametrize("fps", ["1e-308", "1" + "0" * 400, "1e308", "0", "-2", "true", "\"2\""])
def test_absurd_frame_list_fps_is_a_counted_bad_sample(enc, where: str, fps: str) -> None:
    """A frame rate from the conversation or meta.json that overflows (a 400-digit int), makes the frame times
    infinite (1e-308) or is no positive number: the sample is refused with SampleError (skipped and counted),
    not an OverflowError that ends the run."""
    item = '{"type":"video","video":["f0.png","f1.png"]' + (f',"fps":{fps}' if where == "item" else "") + "}"
    meta = {"item": "{}", "meta.video": '{"video":{"fps":' + fps + "}}", "meta": '{"fps":' + fps + "}"}[where]
    conv = ('{"conversation":[{"role":"user","content":[' + item + ',{"type":"text","text":"q"}]},'
            '{"role":"assistant","content":"a"}]}')
    members = {"conv.json": conv.encode(), "meta.json": meta.encode(), "f0.png": png(32, 32), "f1.png": png(32, 32, 1)}
    for call in (enc.estimate, enc.encode):
        with pytest.raises(SampleError, match="fps must be a number in"):
            call("k1", members)
