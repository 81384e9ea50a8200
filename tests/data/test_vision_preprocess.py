"""Qwen3-VL visual preprocessing against the parts of transformers that import without torchvision
(smart_resize, patchify layouts, timestamps, RGB conversion) and torch's own resize call as
torchvision makes it. End-to-end parity with the full HF processors: test_hf_processor_parity.py."""

from __future__ import annotations

import io
import itertools
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from shared_data import SHARED_DATA

from rynnscale.data.vision_preprocess import (
    ImageError,
    VisionSpec,
    decode_image,
    normalize_patches,
    patch_times,
    patchify,
    patchify_normalize,
    preprocess_image,
    preprocess_video,
    resize_thwc,
    smart_resize_image,
    smart_resize_video,
    tune_malloc_for_pixel_buffers,
    video_target_size,
)


def shared_data() -> Path:
    return SHARED_DATA


FRAMES = shared_data() / "rynnbrain_frames"
needs_frames = pytest.mark.skipif(not FRAMES.is_dir(), reason=f"shared frames not found at {FRAMES} "
                                                              "(set RYNNSCALE_SHARED_DATA)")


def hf_normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """HF's fused rescale+normalise for mean = std = 0.5: (x - 0.5/(1/255)) / (0.5/(1/255)) in float32."""
    mean = torch.tensor([0.5] * 3) * (1.0 / (1 / 255))
    std = torch.tensor([0.5] * 3) * (1.0 / (1 / 255))
    return x_uint8.float().sub(mean.view(-1, 1, 1)).div(std.view(-1, 1, 1))


# ----------------------------------------------------------------------------- sizes
def test_smart_resize_image_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    sizes = [(480, 720), (480, 640), (2, 300), (33, 33), (1080, 1920), (4000, 3000), (17, 2000), (256, 256)]
    bounds = [(65536, 16777216), (4096, 200 * 200), (256 * 256, 512 * 512)]
    for (h, w), (lo, hi) in itertools.product(sizes, bounds):
        assert smart_resize_image(h, w, 32, lo, hi) == hf_smart_resize(h, w, factor=32, min_pixels=lo, max_pixels=hi)
    assert smart_resize_image(480, 720, 32, 65536, 16777216) == (480, 704)  # ANCHORS: 720x480 -> 704x480
    for fn in (smart_resize_image, hf_smart_resize):  # both refuse extreme aspect ratios
        with pytest.raises(ValueError, match="aspect ratio"):
            fn(1, 300, 32, 4096, 16777216)


def test_smart_resize_video_matches_transformers():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_smart_resize

    for t, (h, w), (lo, hi) in itertools.product(
            [2, 3, 16, 26, 27, 768], [(480, 640), (448, 448), (20, 500), (1080, 1920), (97, 33)],
            [(4096, 25165824), (4096, 2_000_000), (128 * 32 * 32, 768 * 32 * 32)]):
        assert smart_resize_video(t, h, w, 2, 32, lo, hi) == hf_smart_resize(t, h, w, 2, 32, lo, hi), (t, h, w, lo, hi)
    # one frame: HF refuses; we size it as two frames (what patchify pads it to)
    assert smart_resize_video(1, 480, 640, 2, 32, 4096, 25165824) == hf_smart_resize(2, 480, 640, 2, 32, 4096, 25165824)


def test_per_frame_cap_matches_transformers_rule():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_smart_resize

    spec = VisionSpec(cap_pixels_per_frame=True)
    for t in (4, 16, 64, 512):
        per_frame = max(min(768 * 32 * 32, 25165824 // t), int(4096 * 1.05))
        assert video_target_size(t, 1080, 1920, spec) == hf_smart_resize(t, 1080, 1920, 2, 32, 4096, per_frame * t)


# ----------------------------------------------------------------------------- resize kernel
@pytest.mark.parametrize("src,dst", [((96, 160), (64, 96)), ((50, 70), (96, 128)), ((64, 64), (64, 64))])
def test_resize_equals_torchvision_call(src, dst):
    """torchvision (what HF calls) runs F.interpolate(uint8 NCHW contiguous, bicubic, antialias) on CPU;
    our channels-last view must give the same bytes."""
    torch.manual_seed(0)
    x_thwc = torch.randint(0, 256, (3, *src, 3), dtype=torch.uint8)
    want = x_thwc.permute(0, 3, 1, 2).contiguous()
    if src != dst:
        want = F.interpolate(want, size=dst, mode="bicubic", align_corners=False, antialias=True)
    got = resize_thwc(x_thwc, dst)
    assert got.is_contiguous() and got.dtype == torch.uint8
    torch.testing.assert_close(got.permute(0, 3, 1, 2), want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- patchify layout
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5])
def test_patchify_matches_transformers_video_layout(T):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    torch.manual_seed(T)
    spec = VisionSpec()
    x_thwc = torch.randint(0, 256, (T, 64, 96, 3), dtype=torch.uint8)
    got, grid = patchify_normalize(x_thwc, spec)
    video = hf_normalize(x_thwc.permute(0, 3, 1, 2)).unsqueeze(0)  # [1, T, C, H, W] float, as HF holds it
    want, gt, gh, gw = Qwen3VLVideoProcessor.patchify(None, video, patch_size=16, merge_size=2, temporal_patch_size=2)
    assert grid == (gt, gh, gw) == ((T + 1) // 2, 4, 6)
    torch.testing.assert_close(got, want[0], rtol=0, atol=0)
    # the uint8 path: the same rearrangement of the raw values; normalising it gives HF's floats bitwise
    raw, grid_raw = patchify(x_thwc, spec)
    want_raw = Qwen3VLVideoProcessor.patchify(None, x_thwc.permute(0, 3, 1, 2).float().unsqueeze(0), patch_size=16,
                                              merge_size=2, temporal_patch_size=2)[0]
    assert raw.dtype == torch.uint8 and grid_raw == grid
    torch.testing.assert_close(raw.float(), want_raw[0], rtol=0, atol=0)
    torch.testing.assert_close(normalize_patches(raw, spec), want[0], rtol=0, atol=0)


def test_image_patchify_matches_transformers_image_layout():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    x_hwc = torch.randint(0, 256, (96, 64, 3), dtype=torch.uint8)
    got, grid = patchify_normalize(x_hwc.unsqueeze(0), VisionSpec())
    chw = hf_normalize(x_hwc.permute(2, 0, 1)).numpy()
    want, gh, gw = Qwen2VLImageProcessorPil.patchify(None, chw, patch_size=16, merge_size=2, temporal_patch_size=2)
    assert grid == (1, gh, gw) == (1, 6, 4)
    np.testing.assert_array_equal(got.numpy(), want)
    raw, _ = patchify(x_hwc.unsqueeze(0), VisionSpec())
    np.testing.assert_array_equal(normalize_patches(raw, VisionSpec()).numpy(), want)


def test_patchify_writes_into_out_and_checks_it():
    spec = VisionSpec()
    x = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    big = torch.zeros(10, 1536)
    ref, _ = patchify_normalize(x, spec)
    patchify_normalize(x, spec, out=big[2:10])
    torch.testing.assert_close(big[2:10], ref, rtol=0, atol=0)
    assert (big[:2] == 0).all()
    with pytest.raises(ValueError, match="out must be"):
        patchify_normalize(x, spec, out=big[:5])
    with pytest.raises(ValueError, match="out must be a contiguous torch.uint8"):
        patchify(x, spec, out=big[2:10])  # raw patches need a uint8 buffer
    raw_big = torch.zeros(10, 1536, dtype=torch.uint8)
    patchify(x, spec, out=raw_big[2:10])
    torch.testing.assert_close(normalize_patches(raw_big[2:10], spec), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of"):
        patchify_normalize(torch.zeros(2, 40, 32, 3, dtype=torch.uint8), spec)


# ----------------------------------------------------------------------------- timestamps + images
@pytest.mark.parametrize("indices,fps", [([0, 16, 31, 47, 63], 30.0), ([0, 3, 6, 10], 10.0), ([5], 2.0),
                                         (list(range(0, 392, 15)), 30.0)])
def test_patch_times_match_transformers(indices, fps):
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    want = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)
    got = patch_times([i / fps for i in indices], 2)
    assert [f"{t:.1f}" for t in got] == [f"{t:.1f}" for t in want]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def _png(mode: str, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(0)
    chans = {"RGBA": 4, "RGB": 3, "L": 1, "LA": 2}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], chans), dtype=np.uint8).squeeze()
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "RGB", "L", "LA"])
def test_decode_image_rgb_conversion_matches_transformers(mode):
    import inspect

    from transformers.image_transforms import convert_to_rgb

    if "A" in mode and "return_numpy" not in inspect.signature(convert_to_rgb).parameters:
        pytest.skip("this transformers' convert_to_rgb drops transparency (e.g. 5.17); newer ones composite it onto "
                    "white, as decode_image does")
    data = _png(mode)
    want = np.asarray(convert_to_rgb(Image.open(io.BytesIO(data))))
    np.testing.assert_array_equal(decode_image(data), want)


def test_decode_image_errors():
    with pytest.raises(ImageError) as e:
        decode_image(b"not an image at all")
    assert e.value.reason == "undecodable_image"
    with pytest.raises(ImageError) as e:
        decode_image(_png("RGB", (100, 100)), max_pixels=100 * 100 - 1)
    assert e.value.reason == "too_large"
    with pytest.raises(ImageError) as e:
        decode_image(_png("RGB"), max_bytes=10)
    assert e.value.reason == "too_large"


@needs_frames
def test_real_frame_shapes_and_values():
    f = sorted((FRAMES / "trajectory_location").glob("*.jpg"))[0]
    img = decode_image(f.read_bytes())
    assert img.shape == (480, 720, 3)
    out = preprocess_image(img)
    assert out.grid_thw == (1, 30, 44) and out.num_tokens(2) == 330  # ANCHORS: 720x480 -> 704x480, 330 tokens
    assert out.pixel_values.shape == (1320, 1536) and out.pixel_values.dtype == torch.uint8
    assert normalize_patches(out.pixel_values, VisionSpec()).abs().max() <= 1
    # both temporal copies of an image patch are identical
    pv = out.pixel_values.view(1320, 3, 2, 256)
    torch.testing.assert_close(pv[:, :, 0], pv[:, :, 1], rtol=0, atol=0)


def test_preprocess_video_odd_length_repeats_last_frame():
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    out = preprocess_video(frames.numpy(), [0.0, 0.5, 1.0], VisionSpec(video_min_pixels=16))
    assert out.grid_thw == (2, 4, 4) and out.patch_times_s == [0.25, 1.0]
    last = out.pixel_values[16:].view(16, 3, 2, 256)
    torch.testing.assert_close(last[:, :, 0], last[:, :, 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="timestamps"):
        preprocess_video(frames.numpy(), [0.0], VisionSpec())


def test_malloc_tuning_on_glibc_keeps_results():
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    before = preprocess_video(frames, [0.0, 0.5, 1.0, 1.5]).pixel_values
    assert tune_malloc_for_pixel_buffers() is (platform.libc_ver()[0] == "glibc")
    torch.testing.assert_close(preprocess_video(frames, [0.0, 0.5, 1.0, 1.5]).pixel_values, before, rtol=0, atol=0)


def test_pixel_norm_other_settings_and_errors():
    """Non-default mean / std / rescale follow HF's fused float32 arithmetic per channel."""
    torch.manual_seed(0)
    spec = VisionSpec(image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711),
                      rescale_factor=1 / 127.5)
    raw, _ = patchify(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8), spec)
    mean = torch.tensor(spec.image_mean) * (1.0 / spec.rescale_factor)
    std = torch.tensor(spec.image_std) * (1.0 / spec.rescale_factor)
    want = raw.float().view(-1, 3, 512).sub(mean.view(1, 3, 1)).div(std.view(1, 3, 1)).view(-1, 1536)
    torch.testing.assert_close(normalize_patches(raw, spec), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected uint8"):
        spec.pixel_norm.normalize(raw.float())
    with pytest.raises(ValueError, match="non-zero"):
        _ = VisionSpec(image_std=(0.5, 0.0, 0.5)).pixel_norm  # the property validates


@pytest.mark.parametrize("T", [1, 2, 3, 6])
@pytest.mark.parametrize("planar", [False, True])
def test_wide_patch_copy_and_planar_frames_equal_the_byte_copy(T, planar):
    """The uint8 patch copy moves 16-byte patch rows as one element, and channel-planar frames (the video
    decoder's ``channels_first`` buffer, seen as [T, H, W, 3]) skip the channel reorder: both bitwise equal to
    the plain byte-by-byte permute-copy, into a slice of a larger buffer as the loader does."""
    spec = VisionSpec()
    g = torch.Generator().manual_seed(T)
    thwc = torch.randint(0, 256, (T, 64, 96, 3), dtype=torch.uint8, generator=g)
    frames = thwc.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1) if planar else thwc
    assert torch.equal(frames, thwc) and frames.is_contiguous() != planar
    ps, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    x = thwc.permute(0, 3, 1, 2)
    x = torch.cat([x, x[-1:].expand((-T) % tp, *x.shape[1:])]) if T % tp else x
    gt, gh, gw = x.shape[0] // tp, 64 // ps, 96 // ps
    ref = (x.reshape(gt, tp, 3, gh // m, m, ps, gw // m, m, ps).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
           .reshape(gt * gh * gw, -1))
    buf = torch.zeros(ref.shape[0] + 7, ref.shape[1], dtype=torch.uint8)
    out, grid = patchify(frames, spec, out=buf[5:5 + ref.shape[0]])
    assert grid == (gt, gh, gw) and torch.equal(out, ref)
    assert not buf[:5].any() and not buf[5 + ref.shape[0]:].any()
    assert torch.equal(resize_thwc(frames, (64, 96)), thwc)   # unchanged size: returned as is
    assert torch.equal(resize_thwc(frames, (32, 64)), resize_thwc(thwc, (32, 64)))


def _with_orientation(fmt: str, orientation: int, size=(6, 4)) -> bytes:
    rng = np.random.default_rng(orientation)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_image_applies_exif_orientation_as_transformers_load_image(fmt, orientation):
    """A photo whose EXIF says "rotated" (phones write orientation 6 for portrait shots) is decoded upright, as
    transformers' ``load_image`` does (``ImageOps.exif_transpose``); ``image_size`` gives the upright (H, W) from the
    header, so token budgets match the decoded pixels. Before, the stored (sideways) pixels were used."""
    from transformers.image_transforms import convert_to_rgb
    from transformers.image_utils import load_image

    from rynnscale.data.vision_preprocess import image_size

    data = _with_orientation(fmt, orientation)
    want = np.asarray(convert_to_rgb(load_image(Image.open(io.BytesIO(data)))))
    got = decode_image(data)
    np.testing.assert_array_equal(got, want)
    assert image_size(data) == want.shape[:2] == ((4, 6) if orientation < 5 else (6, 4))
