"""Qwen3-VL visual preprocessing: smart resize, rescale + normalise, temporal padding, patchify.

Numerically equal to transformers' ``Qwen2VLImageProcessor`` (torchvision backend, the "fast"
one) and ``Qwen3VLVideoProcessor`` with Qwen3-VL's checkpoint settings (patch 16, temporal patch
2, merge 2, mean = std = 0.5, image pixels in [65536, 16777216], video pixels in
[4096, 25165824] counted over ALL frames of the clip): the resize is torch's native uint8
bicubic + antialias kernel (what torchvision calls on CPU), and patches come out as
``[P, C*T*ps*ps]`` in HF's order.

Patches are uint8 by default: the raw pixel values in HF's patch order, NOT normalised. The
rescale + normalisation (``VisionSpec.pixel_norm``, i.e. ``(x - mean / rescale) / (std / rescale)``
in float32, HF's fused arithmetic) runs where the pixels are used -- the model does it on its
device -- which makes host pixel memory, DataLoader worker transfer and H2D copies 4x smaller.
``normalize_patches(uint8, spec)`` gives exactly HF's float32 ``pixel_values`` (tests: bitwise).

It is faster than the HF path because it stays in uint8: frames arrive as ``[T, H, W, 3]`` (what
decoders produce) and are resized as a channels-last view (no layout copy); the patch permutation,
the temporal padding (last frame repeated) and the image's temporal duplication are ONE strided
copy straight into the output tensor (float32 output: the copy converts, normalisation then runs
in place). HF copies a float tensor 3-4 times.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rynnscale.batch import PixelNorm


class ImageError(ValueError):
    """An image could not be used. ``reason`` is ``"undecodable_image"`` or ``"too_large"``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VisionSpec:
    """Qwen3-VL preprocessing settings. Defaults are the Qwen3-VL checkpoints' processor configs.

    Pixel bounds follow HF's ``size`` keys: ``shortest_edge`` is the MIN pixel count and
    ``longest_edge`` the MAX pixel count (not edge lengths); for video both count pixels summed
    over the (rounded-to-even) frames of the clip. ``cap_pixels_per_frame`` is HF's optional
    qwen-vl-utils style per-frame cap (off by default, as in transformers)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    image_min_pixels: int = 65536
    image_max_pixels: int = 16777216
    video_min_pixels: int = 4096
    video_max_pixels: int = 25165824
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768

    def validate(self, where: str = "VisionSpec") -> None:
        """ValueError naming the field unless every size is a positive int and every min <= its max."""
        for k in ("patch_size", "temporal_patch_size", "merge_size", "image_min_pixels", "image_max_pixels",
                  "video_min_pixels", "video_max_pixels", "max_video_tokens"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{where}.{k}={v!r} is invalid: must be a positive int")
        for kind in ("image", "video"):
            lo, hi = getattr(self, f"{kind}_min_pixels"), getattr(self, f"{kind}_max_pixels")
            if lo > hi:
                raise ValueError(f"{where}.{kind}_min_pixels={lo} is invalid: must be <= {kind}_max_pixels={hi}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def pixel_norm(self) -> PixelNorm:
        """The rescale + normalisation that turns this spec's uint8 patches into model input."""
        return PixelNorm(tuple(self.image_mean), tuple(self.image_std), self.rescale_factor)


@dataclass
class VisualInput:
    """One preprocessed image or video."""

    pixel_values: torch.Tensor          # uint8 [P, C*T*ps*ps], P = t*h*w (raw; see normalize_patches)
    grid_thw: tuple[int, int, int]      # patch grid before the spatial merge
    patch_times_s: list[float] | None = None   # video only: mean time of each temporal patch

    def tokens_per_temporal_patch(self, merge_size: int) -> int:
        return self.grid_thw[1] * self.grid_thw[2] // (merge_size * merge_size)

    def num_tokens(self, merge_size: int) -> int:
        return self.grid_thw[0] * self.tokens_per_temporal_patch(merge_size)


# ----------------------------------------------------------------------------- sizes
def smart_resize_image(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (h, w), multiples of ``factor``, pixel count within [min_pixels, max_pixels], aspect kept.

    Same arithmetic as ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize``."""
    if min(height, width) <= 0:
        raise ValueError(f"image has an empty side: {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (h, w) of every frame; the pixel bounds apply to all frames together.

    Same arithmetic as ``transformers.models.qwen3_vl.video_processing_qwen3_vl.smart_resize``.
    HF rejects clips shorter than ``temporal_factor``; we size them as if they had
    ``temporal_factor`` frames (the patchify step repeats the last frame anyway)."""
    num_frames = max(num_frames, temporal_factor)
    if min(height, width) <= 0:
        raise ValueError(f"video has an empty side: {height}x{width}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_target_size(num_frames: int, height: int, width: int, spec: VisionSpec) -> tuple[int, int]:
    """Resized (h, w) of a clip's frames under ``spec`` (including the optional per-frame cap)."""
    max_pixels = spec.video_max_pixels
    if spec.cap_pixels_per_frame:
        frame_cap = spec.max_video_tokens * spec.factor * spec.factor
        per_frame = max(min(frame_cap, spec.video_max_pixels // num_frames), int(spec.video_min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    return smart_resize_video(num_frames, height, width, spec.temporal_patch_size, spec.factor,
                              spec.video_min_pixels, max_pixels)


def image_target_size(height: int, width: int, spec: VisionSpec) -> tuple[int, int]:
    return smart_resize_image(height, width, spec.factor, spec.image_min_pixels, spec.image_max_pixels)


# ----------------------------------------------------------------------------- kernels
def resize_thwc(frames_thwc: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bicubic + antialias resize of uint8 frames [T, H, W, C] -> uint8 [T, h, w, C] (contiguous).

    Runs torch's native uint8 kernel on a channels-last view (no NCHW copy); identical to
    torchvision's ``resize`` (which HF calls) on the same frames. A no-op returning the input itself
    (whatever its strides) when the size is unchanged, as in torchvision."""
    if frames_thwc.dtype != torch.uint8 or frames_thwc.dim() != 4:
        raise ValueError(f"expected uint8 [T, H, W, C] frames, got {frames_thwc.dtype} {tuple(frames_thwc.shape)}")
    h, w = size_hw
    if (frames_thwc.shape[1], frames_thwc.shape[2]) == (h, w):
        return frames_thwc   # as given: a channel-planar view (the video decoder's) stays planar for patchify
    x_tchw = frames_thwc.permute(0, 3, 1, 2)  # channels_last view (of contiguous [T, H, W, C] frames)
    if not x_tchw.is_contiguous(memory_format=torch.channels_last):
        x_tchw = x_tchw.contiguous(memory_format=torch.channels_last)   # the kernel HF's torchvision call runs
    y_tchw = F.interpolate(x_tchw, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return y_tchw.permute(0, 2, 3, 1).contiguous()  # no copy when the kernel kept channels_last


def normalize_patches(x_pd: torch.Tensor, spec: VisionSpec) -> torch.Tensor:
    """uint8 patches [P, C*T*ps*ps] -> float32 model input, exactly HF's ``pixel_values``
    (``spec.pixel_norm.normalize``; the model does the same on its device)."""
    return spec.pixel_norm.normalize(x_pd)


def patchify(frames_thwc: torch.Tensor, spec: VisionSpec, out: torch.Tensor | None = None, *,
             normalize: bool = False) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 frames [T, H, W, C] (H, W multiples of patch*merge) -> patches [P, C*tp*ps*ps], grid.

    uint8 raw patches by default; ``normalize=True``: float32 normalised (HF's ``pixel_values``).
    Row order: temporal patch, merged-block row, merged-block column, row in block, column in block;
    column order: channel, frame in temporal patch, patch row, patch column (HF's layout). A clip
    whose length is not a multiple of ``tp`` is padded by repeating its last frame; an image
    (T = 1) becomes one temporal patch of ``tp`` identical frames. ``out`` ([P, D], contiguous, uint8
    or float32 per ``normalize``) receives the result in place, e.g. a slice of a pack's buffer."""
    T, H, W, C = frames_thwc.shape
    ps, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if H % (ps * m) or W % (ps * m):
        raise ValueError(f"frame size {H}x{W} is not a multiple of patch*merge={ps * m}")
    # Channel-planar frames first, so the patch copy below reads runs of ps contiguous bytes instead of
    # stride-C single bytes. Frames from ``decode_frames(channels_first=True)`` already are (their
    # [T, H, W, C] is a view of [T, C, H, W] memory): no copy; others pay one uint8 reorder.
    x_tchw = frames_thwc.permute(0, 3, 1, 2)
    if not x_tchw.is_contiguous():
        x_tchw = x_tchw.contiguous()
    gh, gw = H // ps, W // ps
    gt_full, rem = divmod(T, tp)
    gt = gt_full + (1 if rem else 0)
    P_per_t = gh * gw
    shape = (gt * P_per_t, C * tp * ps * ps)
    dtype = torch.float32 if normalize else torch.uint8
    if out is None:
        out_pd = torch.empty(shape, dtype=dtype)
    else:
        if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {dtype} {shape} tensor (normalize={normalize}), "
                             f"got {out.dtype} {tuple(out.shape)}")
        out_pd = out
    # The copy moves runs of ps bytes (one patch row). For uint8 output, each run is moved as ONE wide
    # element (ps=16: complex128, a plain 16-byte copy; no arithmetic touches the bytes), so the
    # strided copy has ps x fewer elements: 2.6x faster than byte by byte, bitwise the same.
    wide = _wide_dtype(ps) if not normalize else None
    if wide is not None and any(t.data_ptr() % wide.itemsize or any(st % wide.itemsize for st in t.stride()[:-1])
                                for t in (x_tchw, out_pd)):
        wide = None   # a misaligned view (never from our buffers): byte copy
    q = ps if wide is None else 1
    # output block view: [gt, gh/m, gw/m, m, m, C, tp, ps, ps/q]
    out_w = out_pd if wide is None else out_pd.view(wide)
    out_blocks = out_w.view(gt, gh // m, gw // m, m, m, C, tp, ps, q)
    # source view [gt, tp, C, gh/m, m, ps, gw/m, m, ps/q] -> permuted to the output's dim order
    order = (0, 3, 6, 4, 7, 2, 1, 5, 8)

    def src_of(x: torch.Tensor, n: int) -> torch.Tensor:
        x = x if wide is None else x.view(wide)
        return x.reshape(n, tp, C, gh // m, m, ps, gw // m, m, q).permute(order)

    if gt_full:
        out_blocks[:gt_full].copy_(src_of(x_tchw[: gt_full * tp], gt_full))
    if rem:
        # last temporal patch: the remaining frames, then the last frame repeated. With one frame
        # left (always, for tp = 2) that is a stride-0 view of it: no copy.
        if rem == 1:
            tail = x_tchw[T - 1:].expand(tp, C, H, W)
        else:
            tail = torch.cat([x_tchw[gt_full * tp:], x_tchw[T - 1:].expand(tp - rem, C, H, W)])
        out_blocks[gt_full:].copy_(src_of(tail, 1))
    if normalize:
        spec.pixel_norm.normalize_(out_pd)
    return out_pd, (gt, gh, gw)


def _wide_dtype(ps: int) -> torch.dtype | None:
    """The widest plain-copy dtype whose size divides ``ps`` bytes (None: copy bytes)."""
    for dt in (torch.complex128, torch.int64, torch.int32, torch.int16):
        if ps % dt.itemsize == 0:
            return dt
    return None


def patchify_normalize(frames_thwc: torch.Tensor, spec: VisionSpec, out: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """:func:`patchify` into float32 normalised patches (HF's ``pixel_values``)."""
    return patchify(frames_thwc, spec, out, normalize=True)


# ----------------------------------------------------------------------------- public API
def as_uint8_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        if not x.flags.writeable:  # e.g. np.asarray(PIL image); we never write to it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return as_uint8_tensor(torch.from_numpy(x), what)
        x = torch.from_numpy(x)
    t = x
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise ValueError(f"{what}: expected uint8 numpy array / tensor, got {type(x).__name__}")
    return t


def preprocess_image(image_hwc, spec: VisionSpec = VisionSpec()) -> VisualInput:
    """RGB uint8 image [H, W, 3] -> uint8 patches [h*w, 3*tp*ps*ps] with grid (1, h, w)."""
    img = as_uint8_tensor(image_hwc, "image")
    if img.dim() != 3 or img.shape[-1] != 3:
        raise ValueError(f"image: expected [H, W, 3], got {tuple(img.shape)}")
    h, w = image_target_size(int(img.shape[0]), int(img.shape[1]), spec)
    frames = resize_thwc(img.unsqueeze(0), (h, w))
    pv, grid = patchify(frames, spec)
    return VisualInput(pv, grid)


def preprocess_video(frames_thwc, timestamps_s, spec: VisionSpec = VisionSpec()) -> VisualInput:
    """RGB uint8 frames [T, H, W, 3] + their times (s) -> uint8 patches [t*h*w, 3*tp*ps*ps], grid, patch times."""
    frames = as_uint8_tensor(frames_thwc, "video")
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"video: expected [T>0, H, W, 3], got {tuple(frames.shape)}")
    ts = [float(t) for t in timestamps_s]
    if len(ts) != frames.shape[0]:
        raise ValueError(f"video: {frames.shape[0]} frames but {len(ts)} timestamps")
    T, H, W, _ = frames.shape
    h, w = video_target_size(int(T), int(H), int(W), spec)
    pv, grid = patchify(resize_thwc(frames, (h, w)), spec)
    return VisualInput(pv, grid, patch_times(ts, spec.temporal_patch_size))


def patch_times(timestamps_s: list[float], temporal_patch_size: int) -> list[float]:
    """Mean of the first and last frame time of each temporal patch (last frame repeated to pad),
    as ``Qwen3VLProcessor._calculate_timestamps``."""
    ts = list(timestamps_s)
    if len(ts) % temporal_patch_size:
        ts.extend(ts[-1] for _ in range(temporal_patch_size - len(ts) % temporal_patch_size))
    return [(ts[i] + ts[i + temporal_patch_size - 1]) / 2 for i in range(0, len(ts), temporal_patch_size)]


def format_timestamp(seconds: float) -> str:
    """The text Qwen3-VL puts before each temporal patch."""
    return f"<{seconds:.1f} seconds>"


def _open_image(data: bytes, max_pixels: int, max_bytes: int):
    """PIL image with its header read and the size limits checked; pixels not decoded yet.

    ``max_pixels`` (``data.max_image_pixels``) is the pixel bound, checked right after the header is read.
    PIL's own decompression-bomb guard is subsumed: its warning (above ``Image.MAX_IMAGE_PIXELS``, 89 Mpx)
    is silenced because the check below decides, and its error (above twice that, 179 Mpx, so also the
    ceiling of ``max_pixels``) becomes the same ``too_large`` refusal instead of an exception of another
    type."""
    from PIL import Image

    if len(data) > max_bytes:
        raise ImageError("too_large", f"{len(data)} bytes > max_bytes={max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"decompression bomb refused before decoding: {e}") from None
    except Exception as e:
        raise ImageError("undecodable_image", f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError("too_large", f"image header says {w}x{h} = {w * h} pixels > max_pixels={max_pixels} "
                                      "(data.max_image_pixels; refused before decoding)")
    return im


_EXIF_ORIENTATION = 0x0112   # 1 = upright; 5-8 are transposed (width and height swap)


def _orientation(im) -> int:
    """The EXIF orientation of a PIL image (1 when absent or unreadable)."""
    try:
        o = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:   # noqa: BLE001 - a damaged EXIF block: the pixels are used as stored
        return 1
    return o if isinstance(o, int) and 1 <= o <= 8 else 1


def image_size(data: bytes, max_pixels: int = 8192 * 8192, max_bytes: int = 256 << 20) -> tuple[int, int]:
    """(H, W) of an encoded image, upright (its EXIF orientation applied), from its header alone (no pixel
    decoding)."""
    im = _open_image(data, max_pixels, max_bytes)
    w, h = im.size
    return (w, h) if _orientation(im) >= 5 else (h, w)


def decode_image(data: bytes, max_pixels: int = 8192 * 8192, max_bytes: int = 256 << 20) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 [H, W, 3], upright (the EXIF orientation a camera wrote applied, as
    transformers' ``load_image`` does), transparency composited onto white (as HF does).

    The pixel count is checked from the header before the pixels are decoded."""
    from PIL import Image, ImageOps

    im = _open_image(data, max_pixels, max_bytes)
    try:
        if _orientation(im) != 1:
            im = ImageOps.exif_transpose(im)
        has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
        if has_alpha:
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im).convert("RGB")
            del bg
        elif im.mode != "RGB":
            im = im.convert("RGB")
        arr = np.asarray(im)
        del im   # PIL's own copy of the pixels: freed before the caller resizes
    except Exception as e:
        raise ImageError("undecodable_image", f"{type(e).__name__}: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ImageError("undecodable_image", f"decoded to {arr.dtype} {arr.shape}, expected uint8 [H, W, 3]")
    return arr


def tune_malloc_for_pixel_buffers(threshold_bytes: int = 1 << 30) -> bool:
    """Let glibc reuse freed large blocks instead of mmap-ing fresh pages for every pixel tensor.

    A 16-frame 448x448 clip makes a 9.6 MB uint8 (38 MB float32) ``pixel_values``; glibc serves blocks that big
    with a fresh ``mmap`` each time, and first-touch page faults then cost more than the
    preprocessing itself (measured: 34 ms -> 13 ms per clip on one core). Raising the mmap and trim
    thresholds keeps freed blocks in the heap for reuse. Process-wide, so it is opt-in: call it once
    in each data-loader worker. Returns False where glibc's ``mallopt`` is unavailable."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc malloc.h
        return bool(libc.mallopt(m_mmap_threshold, int(threshold_bytes))) and \
            bool(libc.mallopt(m_trim_threshold, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False
