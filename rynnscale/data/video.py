"""Video decoding from memory with PyAV (AV1, H.264, VP9 in mp4 / webm / mkv).

Frames are chosen with the same rule as transformers' ``Qwen3VLVideoProcessor.sample_frames``
(``fps`` frames per second of video, clamped to ``[min_frames, max_frames]`` and to the frame
count, spread with ``np.linspace(...).round()``) and decoded by SEEKING to the keyframe before
each needed frame (5x faster than decoding every frame on the G1 clips, keyframe every 2 frames).
Any seek trouble (missing / duplicate pts, a frame not where the index says) falls back to plain
sequential decoding, which is the reference the seek path is tested against.

The packet index (demuxed once, no decoding) is the source of truth for the frame count and the
presentation time of every frame; container metadata is only a hint. Untrusted input: byte, frame
count and per-frame pixel limits are checked before anything is decoded.

Opening. FFmpeg's ``avformat_find_stream_info`` decodes frames while it opens a container (for H.264:
at least 7, to guess the reorder depth), and those frames are thrown away: 2.9 ms of a 448x448
16-frame H.264 clip's ~35 ms. Containers are therefore opened with ``skip_frame=all`` for that step
(:func:`_open`; 0.2-0.7 ms), which leaves only the pixel format unknown until the first real frame.
The probe needs nothing more. A decode does too, except for an H.264 / HEVC stream whose packets are
reordered (B-frames) while its parameter sets do not declare a reorder depth: only the frames
``find_stream_info`` decodes would tell the decoder, so such a stream is re-opened the plain way
(:func:`_needs_plain_open`). The decoded frames are bitwise those of the plain open (tested).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

try:  # PyAV is a hard dependency of the data path; without it, decoding raises a clear ImportError
    import av
except ImportError as _e:  # pragma: no cover - the environment ships av
    av = None
    _AV_IMPORT_ERROR = _e


class VideoError(ValueError):
    """A video could not be used. ``reason`` is ``"undecodable_video"`` or ``"too_large"``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VideoLimits:
    """Hard limits for untrusted video input (checked before decoding)."""

    max_bytes: int = 1 << 30            # encoded size
    max_total_frames: int = 200_000     # frames in the container (bounds the packet index)
    max_pixels: int = 4096 * 4096       # width * height of one frame
    max_frames: int = 768               # frames actually decoded for one sample


@dataclass
class VideoInfo:
    """What the packet index says about a video stream (no frame decoded)."""

    total_frames: int
    fps: float                  # average frame rate (what transformers' PyAV reader reports)
    width: int
    height: int
    codec: str
    pts: np.ndarray             # int64 [total_frames] presentation timestamps, display order
    keyframe_pts: np.ndarray    # int64 [K] sorted pts of keyframes
    time_base: Fraction
    reordered: bool = False     # some packet's pts differs from its dts (B-frames: decode order != display)

    def timestamps_s(self, indices: np.ndarray) -> np.ndarray:
        """Seconds since the first frame for frame ``indices`` (exact rational pts arithmetic): the clip clock
        the vision encoder sees."""
        p0 = int(self.pts[0])
        return np.array([float((int(self.pts[i]) - p0) * self.time_base) for i in indices], dtype=np.float64)

    def pts_s(self, indices: np.ndarray) -> np.ndarray:
        """Presentation times ``pts * time_base`` in seconds for frame ``indices``: the file's own clock, on which
        LeRobot addresses frames (a video missing its first frame starts after 0)."""
        return np.array([float(int(self.pts[i]) * self.time_base) for i in indices], dtype=np.float64)


@dataclass
class DecodedVideo:
    """Selected frames of one video."""

    frames_thwc: np.ndarray     # uint8 [T, H, W, 3] RGB
    timestamps_s: np.ndarray    # float64 [T] seconds since the first frame (pts based)
    indices: np.ndarray         # int64 [T] frame indices into the whole video
    total_frames: int
    fps: float
    method: str                 # "seek" or "sequential" (what actually produced the frames)
    source_hw: tuple[int, int] = (0, 0)   # (height, width) of the stream's frames before any resize


def sample_frame_indices(
    total_frames: int, video_fps: float | None, fps: float | None = 2.0, min_frames: int = 4,
    max_frames: int = 768, num_frames: int | None = None,
) -> np.ndarray:
    """Indices of the frames to keep, int64 [T]; same rule as ``Qwen3VLVideoProcessor.sample_frames``.

    ``num_frames`` (exclusive with ``fps``) asks for a fixed count. ``video_fps`` None means 24, as
    transformers assumes."""
    if total_frames <= 0:
        raise ValueError(f"video has no frames (total_frames={total_frames})")
    if fps is not None and num_frames is not None:
        raise ValueError("fps and num_frames are mutually exclusive")
    if num_frames is None and fps is not None:
        vfps = 24.0 if not video_fps else float(video_fps)
        wanted = total_frames / vfps * fps
        num_frames = int(wanted) if math.isfinite(wanted) else max_frames   # absurd rates: as many as allowed
        num_frames = min(max(num_frames, min_frames), max_frames, total_frames)
    if num_frames is None:
        num_frames = min(max(total_frames, min_frames), max_frames)
    return np.linspace(0, total_frames - 1, num_frames).round().astype(np.int64)


def _require_av() -> None:
    if av is None:  # pragma: no cover
        raise ImportError(f"PyAV (`av`) is needed to decode videos: {_AV_IMPORT_ERROR}")


# find_stream_info's decoders skip every frame. Given as ``options`` (PyAV hands them to every stream known before
# find_stream_info on 18 and 19), not ``stream_options``: PyAV 19 dropped that keyword, and the TypeError sent every
# open down the plain (decoding) path without a word
_OPEN_WITHOUT_DECODING = {"skip_frame": "all"}
_REORDER_CODECS = ("h264", "hevc")   # find_stream_info guesses their reorder depth by decoding frames


def _open(data: bytes, limits: VideoLimits, plain: bool = False):
    """The container of ``data``, opened without decoding frames (see the module docstring) unless
    ``plain``; raises VideoError."""
    _require_av()
    if len(data) > limits.max_bytes:
        raise VideoError("too_large", f"{len(data)} bytes > max_bytes={limits.max_bytes}")
    if len(data) == 0:
        raise VideoError("undecodable_video", "empty file")
    container = None
    if not plain:
        try:
            container = av.open(io.BytesIO(data), mode="r", options=_OPEN_WITHOUT_DECODING)
        except Exception:  # the plain open decides (and names the error)
            container = None
    try:
        if container is None:
            container = av.open(io.BytesIO(data), mode="r")
    except Exception as e:  # av raises many error types (InvalidDataError, OSError, ...)
        raise VideoError("undecodable_video", f"cannot open container: {type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise VideoError("undecodable_video", "no video stream")
    return container


def _index(container, limits: VideoLimits) -> VideoInfo:
    """Demux every packet of the first video stream (cheap: no decoding) into a frame index."""
    stream = container.streams.video[0]
    w, h = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if w * h > limits.max_pixels:
        raise VideoError("too_large", f"frame {w}x{h} = {w * h} pixels > max_pixels={limits.max_pixels}")
    pts, keys = [], []
    reordered = False
    try:
        for pkt in container.demux(stream):
            if pkt.size == 0:  # flush packet at the end
                continue
            if len(pts) >= limits.max_total_frames:
                raise VideoError("too_large", f"more than max_total_frames={limits.max_total_frames} frames")
            pts.append(pkt.pts)
            keys.append(bool(pkt.is_keyframe))
            reordered = reordered or pkt.pts != pkt.dts
    except VideoError:
        raise
    except Exception as e:
        raise VideoError("undecodable_video", f"demux failed: {type(e).__name__}: {e}") from None
    if not pts:
        raise VideoError("undecodable_video", "video stream has no packets")
    declared = int(stream.frames or 0)
    if declared > len(pts):  # the header knows more frames than the file holds: truncated
        raise VideoError("undecodable_video", f"truncated: header declares {declared} frames, file holds {len(pts)}")
    has_pts = all(p is not None for p in pts)
    pts_sorted = np.array(sorted(pts) if has_pts else [], dtype=np.int64)
    key_pts = np.array(sorted(p for p, k in zip(pts, keys) if k) if has_pts else [], dtype=np.int64)
    rate = stream.average_rate or stream.guessed_rate
    tb = stream.time_base
    if rate:
        fps = float(rate)
    elif has_pts and len(pts_sorted) > 1 and tb:  # estimate from the pts span
        fps = float((len(pts_sorted) - 1) / ((int(pts_sorted[-1]) - int(pts_sorted[0])) * tb))
    else:
        fps = 24.0
    if not has_pts or tb is None:
        tb = Fraction(1, 1) if tb is None else tb
        pts_sorted = np.zeros(0, dtype=np.int64)
    return VideoInfo(total_frames=len(pts), fps=fps, width=w, height=h, codec=stream.codec_context.name,
                     pts=pts_sorted, keyframe_pts=key_pts, time_base=Fraction(tb), reordered=reordered)


def _needs_plain_open(container, info: VideoInfo) -> bool:
    """True when decoding needs the frames a plain open decodes: an H.264 / HEVC stream with reordered
    packets whose parameter sets declare no reorder depth (the decoder would start with none)."""
    cc = container.streams.video[0].codec_context
    return info.reordered and cc.name in _REORDER_CODECS and not cc.has_b_frames


def probe_video(data: bytes, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    """Frame count, fps, size and per-frame pts of a video, without decoding it."""
    container = _open(data, limits)
    try:
        return _index(container, limits)
    finally:
        container.close()


class _SeekFailed(Exception):
    pass


def _to_rgb(frame, out_hwc: np.ndarray, w: int, h: int, reformatter=None) -> None:
    """RGB pixels of ``frame`` into ``out_hwc``, resized to its size when that differs from the stream's
    (torch's bicubic + antialias kernel, as :func:`~rynnscale.data.vision_preprocess.resize_thwc`)."""
    if frame.width != w or frame.height != h:
        raise VideoError("undecodable_video", f"frame size changed mid-stream: {frame.width}x{frame.height} "
                                              f"vs {w}x{h} in the stream header")
    if out_hwc.shape[:2] == (h, w):
        if out_hwc.strides[-1] == 1 or w % 16:
            out_hwc[...] = frame.to_ndarray(format="rgb24")
        else:   # channel-planar memory: libswscale writes planar RGB (gbrp), each plane copied contiguously.
            # Bitwise rgb24's values (what transformers' reader asks for) when the width is a multiple of 16;
            # other widths differ in their last columns (swscale's rgb24 tail), so they take the rgb24 path.
            chw = out_hwc.transpose(2, 0, 1)
            # one reformatter per clip keeps its libswscale context across frames (half the cost per frame)
            fmt = reformatter.reformat(frame, format="gbrp") if reformatter is not None else frame.reformat(format="gbrp")
            planes = fmt.planes   # G, B, R
            for c, p in ((0, planes[2]), (1, planes[0]), (2, planes[1])):
                chw[c] = np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width]
        return
    import torch

    from rynnscale.data.vision_preprocess import resize_thwc

    full = torch.from_numpy(frame.to_ndarray(format="rgb24"))
    torch.from_numpy(out_hwc).copy_(resize_thwc(full.unsqueeze(0), out_hwc.shape[:2])[0])


def _decode_seek(container, info: VideoInfo, indices: np.ndarray, out: np.ndarray, reformatter=None) -> None:
    """Decode ``indices`` by seeking to the keyframe before a target whenever that skips frames.

    Decoding continues in order while the next target is reachable without passing a keyframe
    (nothing to skip); otherwise it seeks to the keyframe at or before the next target. If a seek
    lands after the target (demuxers that index by dts), it retries from an earlier keyframe."""
    if info.pts.size != info.total_frames or info.keyframe_pts.size == 0 or np.any(np.diff(info.pts) <= 0):
        raise _SeekFailed("pts missing or not strictly increasing")
    stream = container.streams.video[0]
    targets = info.pts[indices]
    # keyframe at or before each target in display order: where decoding must start for that target
    anchor_ki = np.searchsorted(info.keyframe_pts, targets, side="right") - 1
    if np.any(anchor_ki < 0):
        raise _SeekFailed("a target precedes the first keyframe")
    anchor_frame = np.searchsorted(info.pts, info.keyframe_pts[anchor_ki])  # frame index of that keyframe
    k, n = 0, len(indices)
    back = 0  # how many keyframes before the anchor the current seek starts (dts-indexed demuxers)
    while k < n:
        ki = int(anchor_ki[k]) - back
        if ki < 0:
            raise _SeekFailed(f"no keyframe lets the decoder reach pts {int(targets[k])}")
        container.seek(int(info.keyframe_pts[ki]), stream=stream, backward=True, any_frame=False)
        first, overshot = True, False
        for frame in container.decode(stream):
            if frame.pts is None:
                raise _SeekFailed("decoded frame without pts")
            if frame.pts < targets[k]:
                first = False
                continue
            if frame.pts != targets[k]:
                if first:  # the seek landed past the target: start from an earlier keyframe
                    overshot = True
                    break
                raise _SeekFailed(f"expected pts {int(targets[k])}, decoder gave {frame.pts}")
            first = False
            _to_rgb(frame, out[k], info.width, info.height, reformatter)
            k += 1
            while k < n and targets[k] == targets[k - 1]:  # same frame twice (short clip): reuse it
                out[k] = out[k - 1]
                k += 1
            if k == n:
                break
            if anchor_frame[k] > indices[k - 1] + 1:
                break  # a keyframe lies beyond the next frame: seeking skips decoding work
        else:
            if k < n:
                raise _SeekFailed(f"stream ended before pts {int(targets[k])}")
        if overshot:
            back += 1
            if back > 4:
                raise _SeekFailed(f"seeking never landed at or before pts {int(targets[k])}")
        else:
            back = 0


def _decode_sequential(container, info: VideoInfo, indices: np.ndarray, out: np.ndarray, reformatter=None) -> None:
    """Decode frames in order and keep those at ``indices`` (decode order == display order count)."""
    stream = container.streams.video[0]
    container.seek(0)
    k, n = 0, len(indices)
    check_pts = info.pts.size == info.total_frames
    for i, frame in enumerate(container.decode(stream)):
        if check_pts and i < info.total_frames and frame.pts is not None and frame.pts != info.pts[i]:
            raise VideoError("undecodable_video", f"decoded frame {i} has pts {frame.pts}, the packet index says "
                                                  f"{int(info.pts[i])} (a frame was dropped?)")
        while k < n and indices[k] == i:
            if k > 0 and indices[k - 1] == i:
                out[k] = out[k - 1]
            else:
                _to_rgb(frame, out[k], info.width, info.height, reformatter)
            k += 1
        if k == n:
            return
    raise VideoError("undecodable_video", f"stream ended after fewer frames than the index needs "
                                          f"(frame {int(indices[k])} of {info.total_frames})")


def decode_frames(
    data: bytes, indices: np.ndarray | None = None, *, fps: float | None = 2.0, min_frames: int = 4,
    max_frames: int = 768, num_frames: int | None = None, method: str = "auto",
    limits: VideoLimits = VideoLimits(), threads: int = 1,
    resize_to: Callable[[int, int, int], tuple[int, int]] | None = None, channels_first: bool = False,
    info: VideoInfo | None = None,
) -> DecodedVideo:
    """Decode the frames of a video held in ``data``.

    ``indices`` (int [T], sorted) picks frames explicitly; otherwise they are sampled with
    :func:`sample_frame_indices` (``fps`` / ``num_frames``, ``min_frames``, ``max_frames``).
    ``method``: ``"seek"`` (fails if seeking is unusable), ``"sequential"``, or ``"auto"`` (seek,
    falling back to sequential). ``resize_to(T, H, W) -> (h, w)`` resizes every frame as it is
    decoded (the output is [T, h, w, 3]; one full-size frame is alive at a time, bitwise the same as
    resizing the full-size clip afterwards). Memory: the packet index (``max_total_frames``) plus
    ``T`` output frames, ``T <= max_frames``; the pixel count of a frame is checked from the stream
    header before anything is decoded. ``channels_first``: ``frames_thwc`` is a [T, H, W, 3] view of
    channel-planar [T, 3, H, W] memory (what :func:`~rynnscale.data.vision_preprocess.patchify` reads
    without a reorder copy; same values). ``info``: :func:`probe_video` of the same ``data`` under the same
    ``limits``, which then is not demuxed again (a caller decoding one long file in many calls). Raises
    :class:`VideoError`."""
    if method not in ("auto", "seek", "sequential"):
        raise ValueError(f"method must be auto|seek|sequential, got {method!r}")
    container = _open(data, limits)
    try:
        if info is None:
            info = _index(container, limits)
        if _needs_plain_open(container, info):
            container.close()
            container = _open(data, limits, plain=True)
        if indices is None:
            indices = sample_frame_indices(info.total_frames, info.fps, fps=fps, min_frames=min_frames,
                                           max_frames=max_frames, num_frames=num_frames)
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size == 0:
            raise ValueError("no frame indices requested")
        if indices.min() < 0 or indices.max() >= info.total_frames or np.any(np.diff(indices) < 0):
            raise ValueError(f"frame indices must be sorted and within [0, {info.total_frames}), "
                             f"got {indices.tolist()}")
        if indices.size > limits.max_frames:
            raise VideoError("too_large", f"{indices.size} frames requested > max_frames={limits.max_frames}")
        hw = (info.height, info.width)
        if resize_to is not None:
            try:
                hw = tuple(int(x) for x in resize_to(int(indices.size), info.height, info.width))
            except ValueError as e:
                raise VideoError("undecodable_video", f"frame {info.width}x{info.height}: {e}") from None
        if channels_first:
            out = np.empty((indices.size, 3) + hw, dtype=np.uint8).transpose(0, 2, 3, 1)
        else:
            out = np.empty((indices.size,) + hw + (3,), dtype=np.uint8)
        stream = container.streams.video[0]
        stream.codec_context.thread_count = max(1, int(threads))
        used = method
        if channels_first:
            from av.video.reformatter import VideoReformatter
        rf = VideoReformatter() if channels_first else None
        try:
            if method == "sequential":
                _decode_sequential(container, info, indices, out, rf)
            else:
                try:
                    _decode_seek(container, info, indices, out, rf)
                    used = "seek"
                except (_SeekFailed, av.FFmpegError) as e:
                    if method == "seek":
                        raise VideoError("undecodable_video", f"seek decode failed: {e}") from None
                    _decode_sequential(container, info, indices, out, rf)
                    used = "sequential"
        except VideoError:
            raise
        except Exception as e:
            raise VideoError("undecodable_video", f"decode failed: {type(e).__name__}: {e}") from None
        if info.pts.size == info.total_frames:
            ts = info.timestamps_s(indices)
        else:  # no usable pts: nominal frame clock
            ts = indices.astype(np.float64) / info.fps
        return DecodedVideo(frames_thwc=out, timestamps_s=ts, indices=indices, total_frames=info.total_frames,
                            fps=info.fps, method=used, source_hw=(info.height, info.width))
    finally:
        container.close()
