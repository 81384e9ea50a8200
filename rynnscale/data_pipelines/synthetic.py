"""Built-in synthetic egocentric dataset for the demo and tests.

Each sample is a short first-person clip rendered with numpy: a head camera looks at a table
(wall, tiled floor, wooden table in perspective) with 2-4 coloured cubes/balls of distinct
colours; one object slides along a smooth curved path while the camera sways slightly
(integer-pixel ego-motion). The clip is encoded with PyAV (H.264 via libx264 when the wheel has
it, else MPEG-4 part 2, else VP9 in webm) and written as a normal shard sample:

- ``meta.json``: source "synthetic", licence "CC0-1.0", task, fps, frame indices/timestamps, the
  action space, and under ``extra`` the full ground truth (per-frame centres and radii).
- ``conv.json``: a user turn with the video and a templated question, and an assistant answer
  with RynnBrain tags (``<traj>``, ``<object>``, ``<affordance>``) holding the TRUE rendered
  positions in 0..1000 coordinates. Trajectory convention here: point k is the object's centre
  in frame k (``<frame 0>`` marks the start frame).
- ``action.npy`` [T, 2] float32: the moving object's centre (continuous pixel coords, pixel i's
  centre at i + 0.5) in each frame; ``action_ts.npy`` [T] float64: the frame times in seconds.

Sample ``i`` depends only on (seed, i) and the render settings, so the dataset is the same for
any ``workers`` or ``samples_per_shard``; ``generate_synthetic`` writes one shard per task over
processes, skips shards a previous run finished, and shows a tqdm bar.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from rynnscale.config.schema import (
    SYNTHETIC_MAX_OBJECTS,
    check_object_counts,
    check_question_types,
    check_synthetic_size,
)
from rynnscale.config.schema import SYNTHETIC_QUESTION_TYPES as QUESTION_TYPES
from rynnscale.data.manifest import MANIFEST_NAME, ShardInfo, completed_shards, read_manifest
from rynnscale.data.schema import validate_conv, validate_meta, validate_sample_members
from rynnscale.data.tags import (
    box_pixel_to_norm,
    format_affordance,
    format_object,
    format_traj,
    pixel_to_norm,
)
from rynnscale.data_pipelines.shards import ShardWriter, remove_stale_temp_files, shard_name, update_manifest

__all__ = [
    "GENERATOR_VERSION",
    "PALETTE",
    "OBJECTS",
    "QUESTION_TYPES",
    "check_object_counts",
    "check_question_types",
    "SceneTruth",
    "render_clip",
    "encode_video_frames",
    "pick_video_codec",
    "synthetic_sample",
    "generate_synthetic",
]

GENERATOR_VERSION = 1
LICENCE = "CC0-1.0"
# object colours (RGB); far from the wall/floor/table colours and from each other
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 80, 225),
    "green": (40, 175, 65),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 195),
}
assert len(PALETTE) == SYNTHETIC_MAX_OBJECTS, "config.schema.SYNTHETIC_MAX_OBJECTS is the palette's size"
SHAPES = ("cube", "ball")
OBJECTS = (2, 4)  # fewest and most objects per clip
# codec preference for codec="auto": (PyAV encoder, container format, member extension)
_CODECS = {
    # bf=0 and no mb-tree lookahead: with B-frames + mb-tree, libx264 (PyAV 18 wheel) gave
    # run-to-run different bytes for ~10% of these tiny clips; this setting is byte-stable
    # (and P-only streams are also cheaper to seek in).
    "libx264": ("mp4", "mp4", {"crf": "16", "preset": "veryfast", "threads": "1", "bf": "0", "x264-params": "rc-lookahead=0:mbtree=0"}),
    "mpeg4": ("mp4", "mp4", {"qscale": "2", "threads": "1"}),
    "libvpx-vp9": ("webm", "webm", {"crf": "20", "b": "0", "threads": "1", "deadline": "realtime", "cpu-used": "8"}),
}


# ------------------------------------------------------------------------------------ rendering


@dataclass
class SceneTruth:
    """Ground truth of one rendered clip, in frame pixel coordinates (continuous: pixel i's
    centre is at i + 0.5). ``centers_t`` [T, 2] (x, y) and ``radii_t`` [T] per object."""

    names: list[str]  # e.g. "red cube"
    colors: list[str]
    shapes: list[str]
    moving: int  # index of the moving object
    centers: list[np.ndarray]  # per object [T, 2] float64
    radii: list[np.ndarray]  # per object [T] float64
    camera_offsets: np.ndarray  # [T, 2] int (ox, oy): the frame shows the world shifted by -offset
    table_top: float  # y of the table's far edge with the camera at rest

    def box(self, obj: int, t: int, width: int, height: int) -> tuple[float, float, float, float]:
        """Pixel box (x1, y1, x2, y2) of object ``obj`` in frame ``t``, clipped to the frame."""
        (cx, cy), r = self.centers[obj][t], self.radii[obj][t]
        return max(0.0, cx - r), max(0.0, cy - r), min(float(width), cx + r), min(float(height), cy + r)


class _Layout:
    """Scene geometry in frame coordinates (camera at rest) for a W x H image."""

    def __init__(self, width: int, height: int, rng: np.random.Generator):
        self.w, self.h = width, height
        self.sway = max(1, round(0.03 * min(width, height)))  # max camera offset, px
        self.margin = self.sway + 1  # canvas border so every shifted frame is fully defined
        self.horizon = height * rng.uniform(0.15, 0.25)
        self.table_top = height * rng.uniform(0.28, 0.36)
        self.top_l, self.top_r = width * rng.uniform(0.08, 0.16), width * rng.uniform(0.84, 0.92)
        self.bot_l, self.bot_r = -0.15 * width, 1.15 * width
        self.r0 = 0.075 * min(width, height)

    def table_x(self, y: float) -> tuple[float, float]:
        a = (y - self.table_top) / (self.h - self.table_top)
        return self.top_l + a * (self.bot_l - self.top_l), self.top_r + a * (self.bot_r - self.top_r)

    def radius(self, y: float) -> float:
        a = min(1.0, max(0.0, (y - self.table_top) / (self.h - self.table_top)))
        return self.r0 * (0.8 + 0.4 * a)  # nearer (lower) objects look bigger

    def fits(self, x: float, y: float) -> bool:
        """Object at world (x, y) lies on the table and inside every (swayed) frame."""
        r, s = self.radius(y), self.sway
        lo, hi = self.table_x(y - r)
        return (
            y - r >= self.table_top + 1
            and y + r + s <= self.h - 1
            and x - r >= lo + 1
            and x + r <= hi - 1
            and x - r - s >= 1
            and x + r + s <= self.w - 1
        )


def _background(lay: _Layout, rng: np.random.Generator) -> np.ndarray:
    """Canvas [H + 2m, W + 2m, 3] float32 of wall, tiled floor and wooden table (no objects)."""
    m = lay.margin
    ys = np.arange(lay.h + 2 * m, dtype=np.float32)[:, None] - m + 0.5
    xs = np.arange(lay.w + 2 * m, dtype=np.float32)[None, :] - m + 0.5
    jitter = lambda base: np.asarray(base, np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)  # noqa: E731
    wall, floor, wood = jitter((196, 192, 182)), jitter((118, 112, 104)), jitter((158, 108, 66))
    tile = max(4.0, lay.w / 8)
    checker = ((np.floor(xs / tile) + np.floor(ys / tile)) % 2).astype(np.float32)
    img = np.where((ys < lay.horizon)[..., None], wall, floor * (0.94 + 0.08 * checker)[..., None])
    a = (ys - lay.table_top) / (lay.h - lay.table_top)
    left = lay.top_l + a * (lay.bot_l - lay.top_l)
    right = lay.top_r + a * (lay.bot_r - lay.top_r)
    on_table = (ys >= lay.table_top) & (xs >= left) & (xs <= right)
    grain = 1.0 + 0.06 * np.sin(ys * (2 * np.pi / rng.uniform(3.0, 6.0)) + rng.uniform(0, 2 * np.pi) + 0.15 * xs)
    img = np.where(on_table[..., None], wood * grain[..., None], img)
    return img.astype(np.float32)


def _window(cx: float, cy: float, ext: float, w: int, h: int):
    x0, x1 = max(0, int(math.floor(cx - ext))), min(w, int(math.ceil(cx + ext)) + 1)
    y0, y1 = max(0, int(math.floor(cy - ext))), min(h, int(math.ceil(cy + ext)) + 1)
    px = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    py = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    return (slice(y0, y1), slice(x0, x1)), px, py


def _draw_shadow(img: np.ndarray, cx: float, cy: float, r: float) -> None:
    h, w = img.shape[:2]
    sl, px, py = _window(cx + 0.25 * r, cy + 0.8 * r, 1.2 * r, w, h)
    mask = (px / (1.1 * r)) ** 2 + (py / (0.5 * r)) ** 2 <= 1.0
    img[sl][mask] *= 0.65


def _draw_object(img: np.ndarray, shape: str, color: np.ndarray, cx: float, cy: float, r: float) -> None:
    h, w = img.shape[:2]
    sl, px, py = _window(cx, cy, r + 1, w, h)
    if shape == "ball":
        mask = px**2 + py**2 <= r * r
        dh = np.sqrt((px + 0.35 * r) ** 2 + (py + 0.35 * r) ** 2)  # distance to the highlight
        shade = 1.1 - 0.3 * np.clip(dh / (1.5 * r), 0.0, 1.0)
    else:  # cube: front face plus darker bottom/right side strips
        mask = (np.abs(px) <= r) & (np.abs(py) <= r)
        shade = np.ones(np.broadcast_shapes(px.shape, py.shape), np.float32)
        shade = np.where(px > 0.6 * r, 0.85, shade)
        shade = np.where(py > 0.55 * r, 0.75, shade)
    region = img[sl]
    region[mask] = (color[None, :] * shade[mask][:, None]).astype(np.float32)


def render_clip(
    rng: np.random.Generator, frames: int = 4, width: int = 64, height: int = 64, objects: Sequence[int] = OBJECTS
) -> tuple[np.ndarray, SceneTruth]:
    """Render one clip with ``objects[0]``..``objects[1]`` objects: uint8 frames [T, H, W, 3] (RGB) and its ground
    truth."""
    if frames < 2 or width < 16 or height < 16:
        raise ValueError(f"need frames >= 2 (Qwen3-VL's temporal patch) and width, height >= 16, got {frames} frames of {width}x{height}")
    fewest, most = check_object_counts(objects)
    lay = _Layout(width, height, rng)
    canvas = _background(lay, rng)
    n_obj = int(rng.integers(fewest, most + 1))
    colors = [str(c) for c in rng.choice(list(PALETTE), size=n_obj, replace=False)]
    shapes = [str(s) for s in rng.choice(SHAPES, size=n_obj)]
    names = [f"{c} {s}" for c, s in zip(colors, shapes)]
    moving = int(rng.integers(n_obj))

    # camera sway: smooth integer offsets, |offset| <= lay.sway
    u = np.arange(frames) / max(frames - 1, 1)
    phase, freq = rng.uniform(0, 2 * np.pi, 2), rng.uniform(0.5, 1.0, 2)
    offsets = np.rint(lay.sway * np.sin(2 * np.pi * freq[None, :] * u[:, None] + phase[None, :])).astype(np.int64)

    # moving object: quadratic Bezier from p0 to p1 with eased speed, must stay on the table
    s = (1 - np.cos(np.pi * u)) / 2
    for _ in range(2000):
        p0 = np.array([rng.uniform(0, width), rng.uniform(lay.table_top, height)])
        p1 = np.array([rng.uniform(0, width), rng.uniform(lay.table_top, height)])
        d = p1 - p0
        if np.hypot(*d) < 0.35 * min(width, height):
            continue
        ctrl = (p0 + p1) / 2 + np.array([-d[1], d[0]]) * rng.uniform(-0.4, 0.4)
        path = ((1 - s) ** 2)[:, None] * p0 + (2 * (1 - s) * s)[:, None] * ctrl + (s**2)[:, None] * p1
        if all(lay.fits(x, y) for x, y in path):
            break
    else:
        raise RuntimeError("could not place the moving object's path on the table (image too small?)")
    world = [None] * n_obj
    world[moving] = path
    # static objects: on the table, clear of the moving path and of each other
    placed = [(path, np.array([lay.radius(y) for y in path[:, 1]]))]
    for i in range(n_obj):
        if i == moving:
            continue
        for _ in range(2000):
            p = np.array([rng.uniform(0, width), rng.uniform(lay.table_top, height)])
            r = lay.radius(p[1])
            if lay.fits(*p) and all(np.all(np.hypot(*(q - p).T) >= rq + r + 3) for q, rq in placed):
                break
        else:
            raise RuntimeError("could not place the static objects (image too small?)")
        world[i] = np.repeat(p[None, :], frames, axis=0)
        placed.append((p[None, :], np.array([r])))

    centers = [wp - offsets for wp in world]
    radii = [np.array([lay.radius(y) for y in wp[:, 1]]) for wp in world]
    m = lay.margin
    out = np.empty((frames, height, width, 3), np.uint8)
    order = [i for i in range(n_obj) if i != moving] + [moving]  # moving object drawn on top
    for t in range(frames):
        ox, oy = offsets[t]
        img = canvas[m + oy : m + oy + height, m + ox : m + ox + width].copy()
        for i in order:
            _draw_shadow(img, *centers[i][t], radii[i][t])
        for i in order:
            _draw_object(img, shapes[i], np.asarray(PALETTE[colors[i]], np.float32), *centers[i][t], radii[i][t])
        out[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    truth = SceneTruth(names, colors, shapes, moving, centers, radii, offsets, float(lay.table_top))
    return out, truth


# ------------------------------------------------------------------------------------- encoding


@functools.cache
def pick_video_codec(preference: str = "auto") -> str:
    """The encoder to use: ``preference`` if PyAV has it, for "auto" the first available of
    libx264 (H.264), mpeg4 (MPEG-4 part 2), libvpx-vp9. Raises if none is available."""
    import av

    names = list(_CODECS) if preference == "auto" else [preference]
    for name in names:
        if name not in _CODECS:
            raise ValueError(f"unsupported codec {name!r}; choose 'auto' or one of {list(_CODECS)}")
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # UnknownCodecError and friends differ across PyAV versions
            continue
    raise RuntimeError(f"PyAV has none of the video encoders {names}")


def encode_video_frames(frames_thwc: np.ndarray, fps: float, codec: str = "auto") -> tuple[bytes, str]:
    """Encode uint8 RGB frames [T, H, W, 3] (H, W even) at ``fps``; returns (bytes, member name
    such as ``video.mp4``). libx264/mpeg4 output is byte-identical for identical input."""
    import av

    if frames_thwc.dtype != np.uint8 or frames_thwc.ndim != 4 or frames_thwc.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames_thwc.dtype} {frames_thwc.shape}")
    t, h, w, _ = frames_thwc.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size must be even for yuv420p, got {w}x{h}")
    name = pick_video_codec(codec)
    fmt, ext, opts = _CODECS[name]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(name, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = dict(opts)
        for i in range(t):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames_thwc[i]), format="rgb24")
            vf.pts = i
            for pkt in stream.encode(vf):
                container.mux(pkt)
        for pkt in stream.encode():
            container.mux(pkt)
    return buf.getvalue(), f"video.{ext}"


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


# -------------------------------------------------------------------------------------- samples


def _region(x: float, y: float, width: int, height: int, table_top: float) -> str:
    side = ("left", "middle", "right")[min(2, int(3 * x / width))]
    depth = "far" if y < (table_top + height) / 2 else "near"
    return f"{depth} {side}"


def _question_answer(
    rng: np.random.Generator, truth: SceneTruth, width: int, height: int, questions: Sequence[str] = QUESTION_TYPES
) -> tuple[str, str, str]:
    """(question type, question, answer) with tags of the true positions; the type is drawn from ``questions``."""
    T = len(truth.camera_offsets)
    table_top = truth.table_top
    qtype = str(rng.choice(questions))
    mv = truth.moving
    obj = int(rng.integers(len(truth.names)))
    pick = lambda options: str(rng.choice(options))  # noqa: E731

    def box_tag(i: int, t: int) -> str:
        return format_object(box_pixel_to_norm(truth.box(i, t, width, height), width, height), frame=t)

    def centre(i: int, t: int) -> tuple[int, int]:
        return pixel_to_norm(*truth.centers[i][t], width, height)

    if qtype == "traj":
        o = truth.names[mv]
        q = pick([f"Where did the {o} move?", f"Track the {o} through the video.", f"Trace the path of the {o} across the table."])
        a0 = _region(*truth.centers[mv][0], width, height, table_top)
        a1 = _region(*truth.centers[mv][-1], width, height, table_top)
        moved = f"moved from the {a0} to the {a1} of the table" if a0 != a1 else f"moved within the {a0} of the table"
        a = f"The {o} {moved}. {format_traj([centre(mv, t) for t in range(T)], frame=0)}"
    elif qtype == "locate_last":
        o = truth.names[obj]
        q = pick([f"Locate the {o} in the last frame.", f"Where is the {o} at the end of the clip?"])
        a = f"The {o} is at the {_region(*truth.centers[obj][-1], width, height, table_top)} of the table. {box_tag(obj, T - 1)}"
    elif qtype == "locate_frame":
        o, t = truth.names[obj], int(rng.integers(T))
        q = pick([f"Find the {o} in frame {t}.", f"Where is the {o} in frame {t}?"])
        a = f"Here is the {o} in frame {t}: {box_tag(obj, t)}"
    elif qtype == "which_moved":
        o = truth.names[mv]
        q = pick(["Which object moved?", "Which object is moving in this video?"])
        a = f"The {o} moved. It starts at {box_tag(mv, 0)} and ends at {box_tag(mv, T - 1)}."
    else:  # affordance
        o = truth.names[obj]
        q = pick([f"Where should the robot grasp the {o}? Point to it in the first frame.", f"Point to the {o} in frame 0."])
        a = f"Grasp the {o} at its centre: {format_affordance(centre(obj, 0), frame=0)}"
    return qtype, q, a


def synthetic_sample(
    index: int,
    *,
    seed: int = 0,
    frames: int = 4,
    width: int = 64,
    height: int = 64,
    fps: float = 2.0,
    codec: str = "auto",
    with_actions: bool = True,
    questions: Sequence[str] = QUESTION_TYPES,
    objects: Sequence[int] = OBJECTS,
) -> tuple[str, dict[str, bytes]]:
    """Build sample ``index`` of the dataset ``seed`` in memory: (key, {member: bytes}); its question is of one
    of the types ``questions`` (default all; the clip does not depend on them), its clip has ``objects`` =
    [fewest, most] objects."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got {index}, {seed}")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps}")
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    clip, truth = render_clip(rng, frames, width, height, objects)
    qtype, question, answer = _question_answer(rng, truth, width, height, check_question_types(questions))
    video, video_name = encode_video_frames(clip, fps, codec)
    timestamps = [t / fps for t in range(frames)]  # seconds on the video clock
    mv = truth.moving
    meta = {
        "schema_version": 1,
        "source": "synthetic",
        "licence": LICENCE,
        "task": f"Watch the {truth.names[mv]} move across the table.",
        "embodiment": "head_camera",
        "episode": index,
        "video": {
            "fps": float(fps),
            "num_frames": frames,
            "width": width,
            "height": height,
            "frame_indices": list(range(frames)),
            "timestamps": timestamps,
        },
        "extra": {
            "generator": "rynnscale.data_pipelines.synthetic",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "index": index,
            "question_type": qtype,
            "moving": truth.names[mv],
            "objects": [
                {
                    "name": truth.names[i],
                    "color": truth.colors[i],
                    "rgb": list(PALETTE[truth.colors[i]]),
                    "shape": truth.shapes[i],
                    "moving": i == mv,
                    "center_px": np.round(truth.centers[i], 4).tolist(),
                    "radius_px": np.round(truth.radii[i], 4).tolist(),
                }
                for i in range(len(truth.names))
            ],
            "camera_offset_px": truth.camera_offsets.tolist(),
        },
    }
    if with_actions:
        meta["action"] = {"space": "object_xy_image", "units": "px", "dims": ["x", "y"]}
    conv = {
        "conversation": [
            {"role": "user", "content": [{"type": "video", "video": video_name}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    }
    members = {
        "meta.json": json.dumps(validate_meta(meta), separators=(",", ":")).encode(),
        "conv.json": json.dumps(conv, separators=(",", ":")).encode(),
        video_name: video,
    }
    if with_actions:
        members["action.npy"] = _npy(truth.centers[mv].astype(np.float32))
        members["action_ts.npy"] = _npy(np.asarray(timestamps, np.float64))
    validate_conv(conv, members)
    validate_sample_members(members, meta)
    return f"syn-s{seed}-{index:08d}", members


def _default_costs(key: str, members: Mapping[str, bytes]) -> dict[str, int]:
    """Raw-size cost hints: conversation text bytes and video pixels (T * H * W)."""
    conv = json.loads(members["conv.json"])
    text = sum(len(c["text"].encode()) for turn in conv["conversation"] for c in turn["content"] if c["type"] == "text")
    v = json.loads(members["meta.json"])["video"]
    return {"text_bytes": text, "video_pixels": v["num_frames"] * v["width"] * v["height"]}


def _write_one_shard(out_dir: str, prefix: str, shard: int, cfg: dict, cost_fn: Callable | None) -> ShardInfo:
    """Worker task: write shard ``shard`` (samples [shard * sps, ...)) and return its record."""
    sps, n = cfg["samples_per_shard"], cfg["num_samples"]
    cost_fn = cost_fn or _default_costs
    with ShardWriter(out_dir, prefix, max_samples=sps, max_bytes=1 << 62, start_index=shard, update_manifest=False) as w:
        for i in range(shard * sps, min((shard + 1) * sps, n)):
            key, members = synthetic_sample(
                i,
                seed=cfg["seed"],
                frames=cfg["frames"],
                width=cfg["width"],
                height=cfg["height"],
                fps=cfg["fps"],
                codec=cfg["codec"],
                with_actions=cfg["with_actions"],
                questions=cfg.get("questions", QUESTION_TYPES),
                objects=cfg.get("objects", OBJECTS),
            )
            w.write(key, members, costs=cost_fn(key, members))
    (info,) = w.shards
    return info


def generate_synthetic(
    out_dir: str | os.PathLike,
    num_samples: int,
    *,
    seed: int = 0,
    frames: int = 4,
    width: int = 64,
    height: int = 64,
    fps: float = 2.0,
    samples_per_shard: int = 500,
    workers: int = 1,
    prefix: str = "synthetic",
    codec: str = "auto",
    with_actions: bool = True,
    questions: Sequence[str] = QUESTION_TYPES,
    objects: Sequence[int] = OBJECTS,
    cost_fn: Callable[[str, Mapping[str, bytes]], Mapping[str, float]] | None = None,
    progress: bool = True,
) -> Path:
    """Generate ``num_samples`` synthetic samples into shards under ``out_dir``; returns the
    manifest path. Deterministic given ``seed`` (and the render settings); one shard per task,
    ``workers`` processes; restartable: shards the manifest already lists are kept, so rerunning
    after a crash only writes the missing ones. Rerunning into a directory generated with other
    settings is an error. ``questions``: the question types to draw from (default all of
    ``QUESTION_TYPES``; a subset, e.g. only pointing, gives a narrower task); ``objects``: [fewest, most]
    objects per clip (default [2, 4]; [1, 1] leaves no doubt which object a question means).
    ``cost_fn(key, members)`` may supply per-sample cost hints (default: ``text_bytes`` and
    ``video_pixels``); with workers > 1 it must be picklable."""
    from tqdm.auto import tqdm

    if num_samples < 1 or samples_per_shard < 1 or workers < 1:
        raise ValueError(f"num_samples, samples_per_shard and workers must be >= 1, got {num_samples}, {samples_per_shard}, {workers}")
    check_synthetic_size(frames, width, height)   # before any file is written (a ConfigError, a ValueError)
    check_question_types(questions)
    check_object_counts(objects)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "generator": "rynnscale.data_pipelines.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_samples": int(num_samples),
        "frames": int(frames),
        "width": int(width),
        "height": int(height),
        "fps": float(fps),
        "samples_per_shard": int(samples_per_shard),
        "prefix": prefix,
        "codec": pick_video_codec(codec),
        "with_actions": bool(with_actions),
        "cost_fn": None if cost_fn is None else f"{cost_fn.__module__}.{cost_fn.__qualname__}",
    }
    # recorded only when not the default: manifests written before these options stay valid
    if check_question_types(questions) != QUESTION_TYPES:
        cfg["questions"] = list(questions)
    if check_object_counts(objects) != OBJECTS:
        cfg["objects"] = list(objects)
    if (out / MANIFEST_NAME).exists():
        old = read_manifest(out).info
        diff = {k: (old.get(k), cfg.get(k)) for k in {**old, **cfg} if old.get(k) != cfg.get(k)}
        if diff:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds a dataset generated with other settings ({detail}); use an empty directory")
    remove_stale_temp_files(out)
    done = completed_shards(out)
    n_shards = -(-num_samples // samples_per_shard)
    todo = [j for j in range(n_shards) if shard_name(prefix, j) not in done]
    update_manifest(out, [], info=cfg)  # records the settings even before the first shard lands
    bar = tqdm(total=num_samples, initial=sum(s.num_samples for s in done.values()), unit="sample", desc="synthetic", disable=not progress)
    try:
        if workers == 1 or len(todo) <= 1:
            for j in todo:
                info = _write_one_shard(str(out), prefix, j, cfg, cost_fn)
                update_manifest(out, [info])
                bar.update(info.num_samples)
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=get_context("spawn")) as ex:
                futs = [ex.submit(_write_one_shard, str(out), prefix, j, cfg, cost_fn) for j in todo]
                for f in as_completed(futs):
                    info = f.result()
                    update_manifest(out, [info])
                    bar.update(info.num_samples)
    finally:
        bar.close()
    m = read_manifest(out)
    if m.total_samples != num_samples:
        raise RuntimeError(f"{out / MANIFEST_NAME} lists {m.total_samples} samples, expected {num_samples}")
    return out / MANIFEST_NAME
