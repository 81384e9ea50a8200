"""Parity with transformers' Qwen3-VL processor (the oracle) on the real shared frames and G1 AV1 videos.

transformers' image / video processors need torchvision, which does not import beside the CPU torch
the project runs on, so these tests skip here and run in a separate venv (torch 2.14.1 +
torchvision 0.29.1): ``bash .ci/hf_parity.sh``. HF's processor is built offline with Qwen3-VL's
checkpoint settings; it carries no chat template, so both sides get the same rendered text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import SHARED_DATA

try:
    import torchvision  # noqa: F401
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata, load_video
except Exception as e:  # torchvision missing or broken beside this torch
    if os.environ.get("RYNNSCALE_REQUIRE_HF_PARITY") == "1":  # .ci/hf_parity.sh: skipping would hide a broken venv
        raise
    pytest.skip(f"transformers' Qwen3-VL processors need torchvision ({type(e).__name__}: {e}); "
                "run these tests with `bash .ci/hf_parity.sh`", allow_module_level=True)

from PIL import Image  # noqa: E402

from rynnscale.data.encode import EncoderConfig, SampleEncoder  # noqa: E402
from rynnscale.data.tokenizer import default_tokenizer_dir, load_tokenizer  # noqa: E402
from rynnscale.data.video import decode_frames  # noqa: E402
from rynnscale.data.vision_preprocess import (  # noqa: E402
    VisionSpec,
    decode_image,
    format_timestamp,
    normalize_patches,
    preprocess_image,
    preprocess_video,
)


def shared_data() -> Path:
    return SHARED_DATA


DATA = shared_data()
G1_DIR = DATA / "lerobot_g1_subset/videos/chunk-000/observation.images.cam_high"
FRAMES = DATA / "rynnbrain_frames"
if not (G1_DIR.is_dir() and FRAMES.is_dir()):
    if os.environ.get("RYNNSCALE_REQUIRE_HF_PARITY") == "1":
        raise FileNotFoundError(f"shared data not found under {DATA} (set RYNNSCALE_SHARED_DATA)")
    pytest.skip(f"shared data not found under {DATA} (set RYNNSCALE_SHARED_DATA)", allow_module_level=True)

G1_VIDEOS = sorted(G1_DIR.glob("*.mp4"))
ALL_JPGS = sorted(FRAMES.glob("*/*.jpg"))
TOL = dict(rtol=0, atol=1e-6)
EXACT = dict(rtol=0, atol=0)  # our uint8 patches normalised with HF's fused float32 arithmetic: bitwise


def hf_image_processor(spec: VisionSpec) -> Qwen2VLImageProcessor:
    return Qwen2VLImageProcessor(patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size,
                                 merge_size=spec.merge_size, image_mean=list(spec.image_mean),
                                 image_std=list(spec.image_std),
                                 size={"shortest_edge": spec.image_min_pixels, "longest_edge": spec.image_max_pixels})


def hf_video_processor(spec: VisionSpec, fps: float = 2, min_frames: int = 4, max_frames: int = 768
                       ) -> Qwen3VLVideoProcessor:
    return Qwen3VLVideoProcessor(patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size,
                                 merge_size=spec.merge_size, image_mean=list(spec.image_mean),
                                 image_std=list(spec.image_std), fps=fps, min_frames=min_frames,
                                 max_frames=max_frames, cap_pixels_per_frame=spec.cap_pixels_per_frame,
                                 max_video_tokens=spec.max_video_tokens,
                                 size={"shortest_edge": spec.video_min_pixels, "longest_edge": spec.video_max_pixels})


@pytest.fixture(scope="module")
def hf_processor():
    spec = VisionSpec()
    tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    return Qwen3VLProcessor(image_processor=hf_image_processor(spec), tokenizer=tok,
                            video_processor=hf_video_processor(spec))


# ----------------------------------------------------------------------------- images
def test_all_real_frames_default_settings():
    """92 real jpgs (720x480 are resized to 704x480 by bicubic+antialias; 640x480 are not)."""
    hf = hf_image_processor(VisionSpec())
    for f in ALL_JPGS:
        want = hf(images=[Image.open(f)], return_tensors="pt")
        got = preprocess_image(decode_image(f.read_bytes()))
        assert want["image_grid_thw"].tolist() == [list(got.grid_thw)], f
        assert got.pixel_values.dtype == torch.uint8
        torch.testing.assert_close(normalize_patches(got.pixel_values, VisionSpec()), want["pixel_values"], **EXACT,
                                   msg=str(f))


@pytest.mark.parametrize("lo,hi", [(4096, 200 * 200), (1024 * 1024, 2048 * 2048), (65536, 300 * 257)])
def test_real_frames_resized(lo, hi):
    spec = VisionSpec(image_min_pixels=lo, image_max_pixels=hi)
    hf = hf_image_processor(spec)
    for f in ALL_JPGS[::23]:
        want = hf(images=[Image.open(f)], return_tensors="pt")
        got = preprocess_image(decode_image(f.read_bytes()), spec)
        assert want["image_grid_thw"].tolist() == [list(got.grid_thw)]
        torch.testing.assert_close(normalize_patches(got.pixel_values, spec), want["pixel_values"], **EXACT)


# ----------------------------------------------------------------------------- videos
def _hf_video(path: Path, vp: Qwen3VLVideoProcessor):
    frames, md = load_video(str(path), backend="pyav", sample_indices_fn=vp.sample_frames)
    out = vp(videos=[frames], video_metadata=[md], do_sample_frames=False, return_tensors="pt")
    return out, md


@pytest.mark.parametrize("path", G1_VIDEOS, ids=lambda p: p.stem)
def test_g1_videos_default_settings(path):
    spec = VisionSpec()
    want, md = _hf_video(path, hf_video_processor(spec))
    dv = decode_frames(path.read_bytes())
    np.testing.assert_array_equal(dv.indices, md.frames_indices)
    got = preprocess_video(dv.frames_thwc, dv.timestamps_s, spec)
    assert want["video_grid_thw"].tolist() == [list(got.grid_thw)]
    torch.testing.assert_close(normalize_patches(got.pixel_values, spec), want["pixel_values_videos"], **EXACT)
    hf_times = Qwen3VLProcessor._calculate_timestamps(None, md.frames_indices, md.fps, 2)
    assert [format_timestamp(t) for t in got.patch_times_s] == [format_timestamp(t) for t in hf_times]


@pytest.mark.parametrize("fps,spec", [
    (1.0, VisionSpec(video_max_pixels=25165824 // 12)),                  # 13 frames (odd) + downscale
    (2.0, VisionSpec(cap_pixels_per_frame=True, max_video_tokens=128)),   # qwen-vl-utils per-frame cap
    (0.2, VisionSpec(video_min_pixels=6 * 1024 * 1024)),                  # 4 frames (min_frames) + upscale
], ids=["odd_downscale", "per_frame_cap", "min_frames_upscale"])
def test_g1_video_resized_and_odd(fps, spec):
    path = G1_VIDEOS[0]
    want, md = _hf_video(path, hf_video_processor(spec, fps=fps))
    dv = decode_frames(path.read_bytes(), fps=fps)
    np.testing.assert_array_equal(dv.indices, md.frames_indices)
    got = preprocess_video(dv.frames_thwc, dv.timestamps_s, spec)
    assert want["video_grid_thw"].tolist() == [list(got.grid_thw)]
    torch.testing.assert_close(normalize_patches(got.pixel_values, spec), want["pixel_values_videos"], **EXACT)


# ----------------------------------------------------------------------------- whole conversations
def _template(conv: list[dict]) -> str:
    """Qwen3-VL-Instruct chat template output (one pad per media item; the processor expands it)."""
    out = ""
    for m in conv:
        out += f"<|im_start|>{m['role']}\n"
        items = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for it in items:
            if it["type"] == "text":
                out += it["text"]
            else:
                out += "<|vision_start|><|image_pad|><|vision_end|>" if it["type"] == "image" else \
                    "<|vision_start|><|video_pad|><|vision_end|>"
        out += "<|im_end|>\n"
    return out


def test_conversation_matches_hf_processor(hf_processor):
    nav = sorted((FRAMES / "navigation").glob("*.jpg"))[:12]
    nav_names = [f"f{i:03d}.jpg" for i in range(len(nav))]
    img_a, img_b = ALL_JPGS[0], (FRAMES / "navigation" / "030.jpg")
    conv = [
        {"role": "system", "content": "You are RynnBrain, an embodied assistant."},
        {"role": "user", "content": [{"type": "video", "video": "video.head.mp4"},
                                     {"type": "image", "image": "img_a.jpg"},
                                     {"type": "text", "text": "Where is the cup? Answer with a trajectory."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<trajectory>(120, 340), (400, 512)</trajectory>"}]},
        {"role": "user", "content": [{"type": "video", "video": nav_names}, {"type": "image", "image": "img_b.jpg"},
                                     {"type": "text", "text": "Now navigate."}]},
        {"role": "assistant", "content": "Turn left <frame 3> then go straight."},
    ]
    meta_fps = 3.0
    members = {"conv.json": json.dumps({"conversation": conv}).encode(), "meta.json": json.dumps({"video": {"fps": meta_fps}}).encode(),
               "video.head.mp4": G1_VIDEOS[1].read_bytes(), "img_a.jpg": img_a.read_bytes(), "img_b.jpg": img_b.read_bytes(),
               **{n: p.read_bytes() for n, p in zip(nav_names, nav)}}
    ours = SampleEncoder(load_tokenizer(None), EncoderConfig()).encode("conv-1", members)

    vp = hf_processor.video_processor
    g1_frames, g1_md = load_video(str(G1_VIDEOS[1]), backend="pyav", sample_indices_fn=vp.sample_frames)
    nav_md = VideoMetadata(total_num_frames=len(nav), fps=meta_fps)
    nav_idx = vp.sample_frames(nav_md)
    nav_md.frames_indices = nav_idx
    nav_frames = np.stack([np.asarray(Image.open(nav[i]).convert("RGB")) for i in nav_idx])
    hf = hf_processor(text=[_template(conv)], images=[Image.open(img_a), Image.open(img_b)],
                      videos=[g1_frames, nav_frames], video_metadata=[g1_md, nav_md], do_sample_frames=False,
                      return_tensors="pt")

    assert ours.input_ids_l.tolist() == hf["input_ids"][0].tolist()
    for tid in (hf_processor.image_token_id, hf_processor.video_token_id):
        assert int((ours.input_ids_l == tid).sum()) == int((hf["input_ids"][0] == tid).sum())
    assert ours.image_grid_thw.tolist() == hf["image_grid_thw"].tolist()
    assert ours.video_grid_thw.tolist() == hf["video_grid_thw"].tolist()
    torch.testing.assert_close(ours.pixel_values, hf["pixel_values"], **EXACT)
    torch.testing.assert_close(ours.pixel_values_videos, hf["pixel_values_videos"], **EXACT)
    # the training loader's form: raw uint8 + pixel_norm, normalised where the model runs
    raw = SampleEncoder(load_tokenizer(None), EncoderConfig()).encode("conv-1", members, normalize=False)
    assert raw.pixel_values.dtype == raw.pixel_values_videos.dtype == torch.uint8
    torch.testing.assert_close(raw.pixel_norm.normalize(raw.pixel_values), hf["pixel_values"], **EXACT)
    torch.testing.assert_close(raw.pixel_norm.normalize(raw.pixel_values_videos), hf["pixel_values_videos"], **EXACT)
    # the two answers (and their <|im_end|>) are the only labeled tokens
    lab = ours.labels_l[ours.labels_l != -100].tolist()
    assert hf_processor.tokenizer.decode(lab) == (
        "<trajectory>(120, 340), (400, 512)</trajectory><|im_end|>Turn left <frame 3> then go straight.<|im_end|>")
