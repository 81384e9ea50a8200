"""Data-path throughput per CPU core: our shards -> PackedBatch vs transformers' Qwen3-VL processor.

Inputs (built once, cached under ``--work-dir``): 16-frame 448x448 clips cut from the real Unitree G1
head-camera episodes in ``../shared/data/lerobot_g1_subset`` (640x480 AV1, 30 fps): a centre 480x480
crop resized to 448x448 (bicubic + antialias), every 15th frame (2 fps, 8 s), re-encoded as

- ``av1``:          AV1 (SVT-AV1 preset 8, its default CRF) at 2 fps, 16 frames (a converter that samples
                    frames at the training fps stores this);
- ``h264``:         H.264 (x264 preset medium, CRF 23) at 2 fps, 16 frames;
- ``av1_lerobot``:  (full mode) 8 s at the native 30 fps (240 frames) encoded as LeRobot writes its videos
                    (SVT-AV1, keyframe every 2 frames, CRF 30; the G1 files are stored so); the 2 fps
                    sampling picks 16 of them, so the decode strategy (seek vs sequential) matters;
- ``av1_30fps_gop30``: (on request) the same 240 frames with a keyframe every second.

Each clip gets a short templated conversation (the episode's task, or a RynnBrain-style ``<traj>`` /
``<object>`` answer with placeholder coordinates: only the token count matters here) and is written
with ``ShardWriter`` (8 samples per shard) next to a ``manifest.json``.

Measured in ONE child process pinned to one core (``os.sched_setaffinity``), ``torch.set_num_threads(1)``,
OMP/MKL threads 1, the two paths interleaved pass by pass. "samples/s per core" = samples per CPU-second
of that process (``time.process_time``: user + system time of all its threads, so page faults count):
other tenants of a shared core stretch the wall clock but not this (they still share caches and memory
bandwidth, so figures stay noisy). Wall-clock rates of our loader are printed too.

- ours:  ``TrainLoader`` as training builds it (global order, num_workers=0) over the shards, whose
  manifest carries the exact per-sample cost hints the converters write (so samples are packed without
  an estimate pass; a second row reads the same tars beside a manifest without hints, where every
  sample is first sized by ``SampleEncoder.estimate``): tar reader -> shuffle -> ``SampleEncoder``
  (PyAV seek decode, Qwen3-VL resize/patchify into uint8, chat tokenisation with labels, MRoPE positions)
  -> ``WindowPacker`` -> ``PackedBatch`` of ``--budget`` tokens (raw uint8 pixels + ``pixel_norm``: the
  model normalises on its device), every sample of the shards once. For a like-for-like row, the same
  pass is also timed with the rescale/normalise to float32 done on the CPU (what the GPU does).
- HF:    transformers' own PyAV reader (``read_video_pyav``: sequential decode, what ``load_video``
  does) on the same clip bytes held in memory (no tar reading: favours HF), then
  ``Qwen3VLProcessor(text=..., videos=...)`` -> tensors (input_ids, pixel_values_videos, grid).
  No labels, no packing, no positions (all favour HF). Also timed alone on pre-decoded frames.

Before timing, sample 0 of each variant is checked to give the same input_ids, grid and pixel values
(ours: the uint8 patches normalised with ``pixel_norm``; bitwise) on both paths, so both do the same
work. Each path is measured with glibc's default malloc (the loader's own tuning switched off:
``LoaderConfig(tune_malloc=False)``) and then after ``tune_malloc_for_pixel_buffers()`` (process-wide,
so always second).

The breakdown (ms per sample) times the components one by one on the same samples: tar read, video
decode and visual preprocessing (as ``encode`` does them: resized as decoded into channel-planar
frames, patchified from those), tokenisation (``estimate`` minus the container probe), MRoPE positions,
the rest of ``encode``, packing (``build_packed_batch`` on FFD groups); HF: decode, video processor,
tokenisation + placeholder expansion (processor minus video processor).

Feeding arithmetic: cores per H100 = target tokens/s / tokens per clip / (samples/s per core), with
``--target-tokens-per-s`` (default 74,000 = 1.25x the transformers+liger A3B-slice anchor of
59,074 tokens/s, issue 7's target; an 8-layer slice, so a full 48-layer A3B step needs far fewer).
Every token is assumed to come from such a clip (video-only data is the costliest per token).

    /work/venvs/hfparity/bin/python bench/data_throughput.py [--quick] [--json out.json]

Without torchvision (the main CPU env), transformers' video processor cannot run: only our path is
measured, and the run says so. Figures are best / median over ``--repeats`` passes; ratios use medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SHARED = Path(os.environ.get("RYNNSCALE_SHARED_DATA", ROOT / ".." / "shared" / "data")).resolve()
G1 = SHARED / "lerobot_g1_subset"
G1_VIDEOS = G1 / "videos" / "chunk-000" / "observation.images.cam_high"
SIZE = 448                    # clip side (pixels)
FRAMES = 16                   # frames per clip after 2 fps sampling
SRC_STEP = 15                 # 30 fps source -> 2 fps
FPS = 2.0
SHARD_SAMPLES = 8
BUILD_VERSION = 2             # bump when the clip recipe changes (invalidates the cache); 2: manifest cost hints

VARIANTS = {
    # name: (codec, encoder options, stored fps, stored frames, keyframe interval)
    "av1": ("libsvtav1", {"preset": "8"}, 2, FRAMES, None),
    "h264": ("libx264", {"preset": "medium", "crf": "23"}, 2, FRAMES, None),
    "av1_lerobot": ("libsvtav1", {"preset": "10", "crf": "30"}, 30, (FRAMES - 1) * SRC_STEP + 15, 2),
    "av1_30fps_gop30": ("libsvtav1", {"preset": "10"}, 30, (FRAMES - 1) * SRC_STEP + 15, 30),
}
QUICK_VARIANTS = "av1,h264"
FULL_VARIANTS = "av1,h264,av1_lerobot"
ANCHOR_A3B_SLICE_HF = 59074   # tokens/s, transformers + liger, A3B slice, H100 (../shared/ANCHORS.md)


# ----------------------------------------------------------------------------- building the shards


def _conversation(i: int, task: str) -> dict:
    """Short templated conversation for clip ``i`` (answers' coordinates are placeholders)."""
    from rynnscale.data.tags import format_object, format_traj

    kind = i % 3
    if kind == 0:
        user, answer, system = "What is the robot doing in this clip?", f"It is carrying out the task: {task}", None
    elif kind == 1:
        pts = [(180 + 37 * k + (i * 13) % 50, 820 - 41 * k) for k in range(6)]
        user = "Show the path of the right hand to the bottle as a trajectory."
        answer, system = format_traj(pts, frame=(i % FRAMES)), None
    else:
        user = "Which object does the robot pick up? Give its box."
        answer = f"The yellow bottle: {format_object([(410, 395), (520 + i % 40, 610)], frame=FRAMES - 1)}"
        system = "You are RynnBrain, an embodied assistant for a humanoid robot."
    conv = []
    if system:
        conv.append({"role": "system", "content": system})
    conv.append({"role": "user", "content": [{"type": "video", "video": "video.mp4"}, {"type": "text", "text": user}]})
    conv.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return {"conversation": conv}


# AV1 encoders PyAV may carry, in order of preference, with options for a comparable fast preset
_AV1_FALLBACKS = (("libaom-av1", {"cpu-used": "8", "row-mt": "0"}), ("librav1e", {"speed": "10"}))


def _available_encoder(codec: str, options: dict) -> tuple[str, dict]:
    """``codec`` if this PyAV build can encode with it, else another AV1 encoder; clear error if none."""
    import av

    def has(name: str) -> bool:
        try:
            av.codec.Codec(name, "w")
            return True
        except Exception:
            return False

    if has(codec):
        return codec, options
    if codec == "libsvtav1":
        for name, opts in _AV1_FALLBACKS:
            if has(name):
                return name, opts
    raise RuntimeError(f"this PyAV build has no {codec} encoder (nor another AV1 encoder); "
                       f"run with --variants h264, or use a PyAV wheel that ships SVT-AV1")


def _encode_clip(frames_thwc, codec: str, options: dict, fps: int, gop: int | None) -> bytes:
    """uint8 [T, H, W, 3] RGB -> mp4 bytes."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as oc:
        st = oc.add_stream(codec, rate=fps)
        st.width, st.height, st.pix_fmt = frames_thwc.shape[2], frames_thwc.shape[1], "yuv420p"
        st.options = dict(options)
        if gop:
            st.codec_context.gop_size = gop
        for f in frames_thwc:
            for p in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                oc.mux(p)
        for p in st.encode():
            oc.mux(p)
    return buf.getvalue()


def _episode_frames_448(path: Path):
    """All frames of a G1 episode, centre-cropped to a square and resized to 448x448: uint8 [N, 448, 448, 3]."""
    import av
    import numpy as np
    import torch
    import torch.nn.functional as F

    out = []
    with av.open(str(path)) as c:
        batch = []
        for fr in c.decode(c.streams.video[0]):
            a = fr.to_ndarray(format="rgb24")
            h, w = a.shape[:2]
            s = min(h, w)
            batch.append(a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s])
            if len(batch) == 64:
                out.append(_resize(batch, torch, F))
                batch = []
        if batch:
            out.append(_resize(batch, torch, F))
    return np.concatenate(out)


def _resize(batch, torch, F):
    import numpy as np

    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
    y = F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", align_corners=False, antialias=True)
    return y.permute(0, 2, 3, 1).contiguous().numpy()


def build_shards(work: Path, variants: list[str], n_clips: int, log) -> dict[str, Path]:
    """Shards of ``n_clips`` clips per variant under ``work`` (reused if complete). Returns variant -> dir."""
    from rynnscale.data.encode import EncoderConfig
    from rynnscale.data.manifest import completed_shards
    from rynnscale.data.schema import validate_meta
    from rynnscale.data_pipelines.shard_stats import cost_hints
    from rynnscale.data_pipelines.shards import ShardWriter

    episodes = sorted(G1_VIDEOS.glob("episode_*.mp4"))
    if not episodes:
        raise FileNotFoundError(f"no G1 episodes under {G1_VIDEOS} (set RYNNSCALE_SHARED_DATA to the shared data dir)")
    task = json.loads((G1 / "meta" / "tasks.jsonl").read_text().splitlines()[0])["task"]
    dirs, todo, recipe = {}, [], {}
    for v in variants:
        codec, opts, fps, stored, gop = VARIANTS[v]
        recipe[v] = (*_available_encoder(codec, opts), fps, stored, gop)
        tag = hashlib.sha256(json.dumps([BUILD_VERSION, v, recipe[v], n_clips, [e.name for e in episodes]],
                                        sort_keys=True).encode()).hexdigest()[:10]
        d = work / f"{v}-{n_clips}-{tag}"
        dirs[v] = d
        done = completed_shards(d) if d.is_dir() else {}
        if sum(s.num_samples for s in done.values()) != n_clips:
            todo.append(v)
    if not todo:
        return dirs
    log(f"building shards for {todo} ({n_clips} clips each) under {work} (once; cached): "
        + ", ".join(f"{v} with {recipe[v][0]} {recipe[v][1]}" for v in todo))
    t0 = time.perf_counter()
    clips: dict[str, list] = {v: [] for v in todo}
    for e_i, ep in enumerate(episodes):
        ids = [i for i in range(n_clips) if i % len(episodes) == e_i]
        if not ids:
            continue
        frames = _episode_frames_448(ep)
        n = len(frames)
        for v in todo:
            codec, opts, fps, stored, gop = recipe[v]
            span = (FRAMES - 1) * SRC_STEP + 1 if fps == 2 else stored
            if n < span:
                raise ValueError(f"{ep.name} has {n} frames, fewer than the {span} a {v} clip needs")
            for i in ids:
                start = ((i // len(episodes)) * 11) % (n - span + 1)
                idx = list(range(start, start + span, SRC_STEP if fps == 2 else 1))
                mp4 = _encode_clip(frames[idx], codec, opts, fps, gop)
                meta = validate_meta({
                    "source": "lerobot_g1_subset (re-encoded for bench/data_throughput.py)", "licence": "MIT",
                    "task": task, "embodiment": "unitree_g1_inspire_head_camera", "episode": ep.stem,
                    "clip_start_s": start / 30.0,
                    "video": {"fps": float(fps), "num_frames": len(idx), "width": SIZE, "height": SIZE}})
                conv = _conversation(i, task)
                clips[v].append((i, {"meta.json": json.dumps(meta).encode(), "conv.json": json.dumps(conv).encode(),
                                     "video.mp4": mp4}))
        del frames
    for v in todo:
        d = dirs[v]
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=work))
        with ShardWriter(tmp, prefix=v, max_samples=SHARD_SAMPLES) as w:
            for i, members in sorted(clips[v], key=lambda x: x[0]):
                key = f"g1clip{i:05d}"   # exact size hints, as the converters write them
                w.write(key, members, costs=cost_hints(key, members, encoder_cfg=EncoderConfig(fps=FPS)))
        if d.exists():
            shutil.rmtree(d)
        os.replace(tmp, d)
    log(f"built in {time.perf_counter() - t0:.1f} s")
    return dirs


# ----------------------------------------------------------------------------- the measuring child


def _hf_template(conv: list[dict]) -> str:
    """Qwen3-VL-Instruct chat template text (one video pad per video; the processor expands it)."""
    out = ""
    for m in conv:
        out += f"<|im_start|>{m['role']}\n"
        items = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for it in items:
            if it["type"] == "text":
                out += it["text"]
            elif it["type"] == "video":
                out += "<|vision_start|><|video_pad|><|vision_end|>"
            else:
                out += "<|vision_start|><|image_pad|><|vision_end|>"
        out += "<|im_end|>\n"
    return out


class _HF:
    """transformers' Qwen3-VL processor path (needs torchvision)."""

    def __init__(self, spec):
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
        from transformers.video_utils import read_video_pyav

        from rynnscale.data.tokenizer import default_tokenizer_dir

        common = dict(patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size,
                      merge_size=spec.merge_size, image_mean=list(spec.image_mean), image_std=list(spec.image_std))
        self.vp = Qwen3VLVideoProcessor(**common, fps=FPS, min_frames=4, max_frames=768,
                                        cap_pixels_per_frame=spec.cap_pixels_per_frame,
                                        max_video_tokens=spec.max_video_tokens,
                                        size={"shortest_edge": spec.video_min_pixels,
                                              "longest_edge": spec.video_max_pixels})
        ip = Qwen2VLImageProcessor(**common, size={"shortest_edge": spec.image_min_pixels,
                                                   "longest_edge": spec.image_max_pixels})
        tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
        self.proc = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=self.vp)
        self._read = read_video_pyav

    def decode(self, video: bytes):
        """Sequential PyAV decode of the sampled frames, as transformers' ``load_video(backend="pyav")``."""
        return self._read(io.BytesIO(video), sample_indices_fn=self.vp.sample_frames)

    def process(self, text: str, frames, md):
        return self.proc(text=[text], videos=[frames], video_metadata=[md], do_sample_frames=False,
                         return_tensors="pt")

    def video_only(self, frames, md):
        return self.vp(videos=[frames], video_metadata=[md], do_sample_frames=False, return_tensors="pt")


def decode_as_encoder(enc, video: bytes):
    """``video`` decoded with the call ``SampleEncoder.encode`` makes (rynnscale/data/encode.py): frames resized
    to the model's size as they are decoded, into channel-planar memory. The breakdown times this call, so its
    decode and preprocess parts are the loader's own work (a plain ``decode_frames`` converts to packed RGB,
    2-4 ms more per clip, and patchify then reorders: "rest of encode" came out negative)."""
    from rynnscale.data import video as video_mod
    from rynnscale.data.vision_preprocess import video_target_size

    cfg, spec = enc.cfg, enc.cfg.vision
    return video_mod.decode_frames(video, fps=cfg.fps, min_frames=cfg.min_frames, max_frames=cfg.max_frames,
                                   method=cfg.decode_method, limits=enc._video_limits, threads=cfg.decode_threads,
                                   resize_to=lambda t, h, w: video_target_size(t, h, w, spec), channels_first=True)


def preprocess_as_encoder(enc, dv):
    """uint8 patches of ``decode_as_encoder``'s frames, made as ``encode`` makes them: resize (a no-op at the
    decoded size) and patchify straight from the channel-planar frames (``preprocess_video`` first copies
    them to packed RGB, ~15 ms a clip that encode never spends)."""
    import torch

    from rynnscale.data.vision_preprocess import patchify, resize_thwc, video_target_size

    spec = enc.cfg.vision
    frames = torch.from_numpy(dv.frames_thwc)
    return patchify(resize_thwc(frames, video_target_size(*frames.shape[:3], spec)), spec, normalize=False)[0]


def _rate_stats(samples: int, secs: list[float]) -> dict:
    """samples/s per pass -> best / median / all."""
    xs = [samples / t for t in secs]
    return {"best": max(xs), "median": statistics.median(xs), "all": xs}


def _measure(spec_path: str) -> None:
    """Child entry point: pinned to one core, single-threaded; writes the results JSON to spec['out'].

    Times are process CPU seconds (``time.process_time``: all threads of this process, user + system,
    so page faults count): a core shared with other tenants slows the wall clock, not this. The loader
    passes also record wall time."""
    spec = json.loads(Path(spec_path).read_text())
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {spec["core"]})
    import resource

    import torch

    torch.set_num_threads(1)
    from rynnscale.data.encode import EncoderConfig, SampleEncoder
    from rynnscale.data.loader import LoaderConfig, TrainLoader
    from rynnscale.data.packing import build_packed_batch
    from rynnscale.data.reader import expand_shard_patterns, iter_tar_samples
    from rynnscale.data.tokenizer import load_tokenizer
    from rynnscale.data.video import probe_video
    from rynnscale.data.vision_preprocess import tune_malloc_for_pixel_buffers
    from rynnscale.models.mrope import mrope_position_ids

    cpu = time.process_time
    ecfg = EncoderConfig(fps=FPS)
    enc = SampleEncoder(load_tokenizer(None), ecfg)
    vspec = ecfg.vision
    hf, hf_note = None, "--no-hf given"
    if spec["hf"]:
        try:
            import torchvision  # noqa: F401

            hf = _HF(vspec)
        except Exception as e:  # torchvision missing, or broken beside this torch
            hf_note = f"{type(e).__name__}: {e}"
    budget = spec["budget"]
    res: dict = {"hf_available": hf is not None, "hf_unavailable_reason": None if hf else hf_note, "variants": {},
                 "torch": torch.__version__, "core": spec["core"]}

    # ---- inputs, parity of sample 0 (also warms both paths up)
    data: dict = {}
    for v, d in spec["dirs"].items():
        shards = expand_shard_patterns(str(Path(d) / "*.tar"))
        items = [(s.key, s.members, _hf_template(json.loads(s.members["conv.json"])["conversation"]))
                 for sh in shards for s in iter_tar_samples(sh)]
        data[v] = (shards, items)
        e0 = enc.encode(items[0][0], items[0][1], normalize=False)  # the loader's form: raw uint8 + pixel_norm
        info: dict = {
            "samples": len(items),
            "tokens_per_clip": statistics.mean(enc.estimate(k, m)[0] for k, m, _ in items),
            "vision_tokens_per_clip": int((e0.input_ids_l == enc.ids.video_pad).sum()),
            "video_grid_thw": e0.video_grid_thw[0].tolist(),
            "pixel_values_mb_per_clip": e0.pixel_values_videos.numel() * e0.pixel_values_videos.element_size() / 1e6,
            "clip_kb": statistics.mean(len(m["video.mp4"]) for _, m, _ in items) / 1e3,
            "stored_frames": probe_video(items[0][1]["video.mp4"]).total_frames,
        }
        if hf is not None:
            frames, md = hf.decode(items[0][1]["video.mp4"])
            out = hf.process(items[0][2], frames, md)
            same_ids = out["input_ids"][0].tolist() == e0.input_ids_l.tolist()
            same_grid = out["video_grid_thw"].tolist() == e0.video_grid_thw.tolist()
            pv_hf, pv = out["pixel_values_videos"], e0.pixel_norm.normalize(e0.pixel_values_videos)
            diff = float((pv_hf - pv).abs().max()) if pv_hf.shape == pv.shape else float("inf")
            info["parity"] = {"input_ids_equal": same_ids, "grid_equal": same_grid, "pixel_max_abs_diff": diff,
                              "ok": same_ids and same_grid and diff <= 1e-6}
            del out, frames
        res["variants"][v] = info
        del e0

    # the same tars beside a manifest without cost hints (links; the manifest's sizes and hashes still match)
    from rynnscale.data.manifest import MANIFEST_NAME, read_manifest

    unhinted: dict = {}
    for v, d in spec["dirs"].items():
        nd = Path(tempfile.mkdtemp(prefix=f"{v}-nohints-"))
        m = read_manifest(d)
        m = dataclasses.replace(m, shards=tuple(dataclasses.replace(x, sample_costs={}) for x in m.shards))
        (nd / MANIFEST_NAME).write_text(json.dumps(m.to_json()))
        for sh in data[v][0]:
            os.symlink(sh, nd / Path(sh).name)
        unhinted[v] = sorted(str(p) for p in nd.glob("*.tar"))

    # ---- one pass of each measurement
    def rusage_cpu() -> float:
        """CPU seconds of this process and of its reaped children (loader workers exit after each pass)."""
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    def loader_pass(v: str, seed: int, tuned: bool, workers: int = 0, epochs: int = 1, normalize: bool = False,
                    hints: bool = True) -> dict:
        """Ours end to end: TrainLoader as training builds it (global order) over the variant's shards, every
        sample once. With workers, the CPU time is the main process's plus the (exited) worker's. ``tuned``:
        the loader's malloc tuning (off in the default-malloc passes). ``normalize``: also turn each batch's
        uint8 pixels into the model's float32 input on the CPU (``pixel_norm.normalize``, what the model does
        on its GPU). ``hints``: the shards' manifest has the converters' cost hints; without them (the same
        tars beside a manifest without hints) every sample is sized by ``estimate`` first (a container probe
        and a tokenisation more per sample)."""
        shards, items = data[v] if hints else (unhinted[v], data[v][1])
        cfg = LoaderConfig(train_shards=shards, seed=seed, micro_batch_tokens=budget, pack_window=spec["pack_window"],
                           num_workers=workers, num_epochs=epochs, tune_malloc=tuned)
        loader = TrainLoader(cfg, enc)
        n = 0
        clock = cpu if workers == 0 else rusage_cpu
        w0, c0 = time.perf_counter(), clock()
        it = (b for step in loader for b in step.micro_batches)
        for b in it:
            n += 0 if b.filler else b.num_samples
            if normalize and not b.filler:
                for pv in (b.pixel_values, b.pixel_values_videos):
                    if pv is not None:
                        del_me = b.pixel_norm.normalize(pv)
                        del del_me
            del b
        del it  # shuts the workers down, so their CPU time is accounted
        c1, w1 = clock(), time.perf_counter()
        if n != epochs * len(items):
            raise RuntimeError(f"{v}: the loader yielded {n} samples in {epochs} epoch(s) of {len(items)} samples")
        return {"cpu": c1 - c0, "wall": w1 - w0, "packing_efficiency": loader.stats()["packing_efficiency"]}

    def ours_components(v: str) -> dict:
        """Our components one by one on the same samples (CPU ms per sample)."""
        shards, items = data[v]
        t = dict.fromkeys(("read", "decode", "preprocess", "tokenise", "positions", "encode", "pack"), 0.0)
        c0 = cpu()
        for sh in shards:
            for _ in iter_tar_samples(sh):
                pass
        t["read"] = cpu() - c0
        group: list = []

        def pack() -> None:
            c0 = cpu()
            pb = build_packed_batch(group)
            t["pack"] += cpu() - c0
            del pb
            group.clear()

        for key, members, _ in items:
            video = members["video.mp4"]
            c0 = cpu()
            dv = decode_as_encoder(enc, video)
            c1 = cpu()
            vi = preprocess_as_encoder(enc, dv)
            c2 = cpu()
            del dv, vi
            c3 = cpu()
            enc.estimate(key, members)         # json + render + container probe + tokenise
            c4 = cpu()
            probe_video(video)
            c5 = cpu()
            es = enc.encode(key, members, normalize=False)
            c6 = cpu()
            mrope_position_ids(es.input_ids_l, es.image_grid_thw, es.video_grid_thw,
                               spatial_merge_size=ecfg.vision.merge_size, image_token_id=enc.ids.image_pad,
                               video_token_id=enc.ids.video_pad)
            c7 = cpu()
            t["decode"] += c1 - c0
            t["preprocess"] += c2 - c1
            t["tokenise"] += (c4 - c3) - (c5 - c4)
            t["encode"] += c6 - c5
            t["positions"] += c7 - c6
            if group and sum(s.num_tokens for s in group) + es.num_tokens > budget:
                pack()
            group.append(es)
            del es
        if group:
            pack()
        return {k: 1000 * x / len(items) for k, x in t.items()}

    def hf_components(v: str, split: bool) -> dict:
        """transformers: sequential PyAV decode, processor on those frames, (``split``) video processor alone.
        CPU ms per sample."""
        _, items = data[v]
        t = dict.fromkeys(("decode", "process") + (("video_processor",) if split else ()), 0.0)
        for _, members, text in items:
            c0 = cpu()
            frames, md = hf.decode(members["video.mp4"])
            c1 = cpu()
            out = hf.process(text, frames, md)
            c2 = cpu()
            del out
            if split:
                c3 = cpu()
                out = hf.video_only(frames, md)
                t["video_processor"] += cpu() - c3
                del out
            del frames
            t["decode"] += c1 - c0
            t["process"] += c2 - c1
        if split:
            t["tokenise_expand"] = t["process"] - t["video_processor"]
        return {k: 1000 * x / len(items) for k, x in t.items()}

    # ---- passes: default malloc first, then tuned (process-wide, irreversible); paths interleaved
    R = spec["repeats"]
    for mode in ("default_malloc", "tuned_malloc"):
        if mode == "tuned_malloc":
            res["malloc_tuned"] = tune_malloc_for_pixel_buffers()
        tuned = mode == "tuned_malloc"
        for v in data:  # untimed warm-up: tokenizer caches, and (tuned) the heap grows to its working size
            loader_pass(v, seed=0, tuned=tuned)
            if hf is not None:
                for _, members, text in data[v][1]:
                    hf.process(text, *hf.decode(members["video.mp4"]))
        acc = {v: {"loader": [], "loader_norm": [], "loader_nohints": [], "ours": [], "hf": []} for v in data}
        for rep in range(R):
            breakdown = rep == R - 1 or not spec["quick"]  # quick: component timings in the last pass only
            for v in data:
                n = len(data[v][1])
                lp = loader_pass(v, seed=rep, tuned=tuned)
                acc[v]["loader"].append(lp)
                lpn = loader_pass(v, seed=rep, tuned=tuned, normalize=True)
                acc[v]["loader_norm"].append(lpn)
                acc[v]["loader_nohints"].append(loader_pass(v, seed=rep, tuned=tuned, hints=False))
                msg = (f"  [{mode}] pass {rep + 1}/{R} {v}: ours {n / lp['cpu']:.1f} samples/cpu-s ({n / lp['wall']:.1f}/s "
                       f"wall), + CPU normalise {n / lpn['cpu']:.1f}")
                if hf is not None:
                    h = hf_components(v, split=breakdown)
                    acc[v]["hf"].append(h)
                    msg += f", HF {1000 / (h['decode'] + h['process']):.1f} samples/cpu-s"
                if breakdown:
                    acc[v]["ours"].append(ours_components(v))
                print(msg, flush=True)
        for v in data:
            a, n = acc[v], len(data[v][1])
            med = lambda rows, k: statistics.median(r[k] for r in rows if k in r)  # noqa: E731
            r = {"ours": _rate_stats(n, [x["cpu"] for x in a["loader"]]),
                 "ours_normalized": _rate_stats(n, [x["cpu"] for x in a["loader_norm"]]),
                 "ours_nohints": _rate_stats(n, [x["cpu"] for x in a["loader_nohints"]]),
                 "ours_wall": _rate_stats(n, [x["wall"] for x in a["loader"]]),
                 "packing_efficiency": a["loader"][-1]["packing_efficiency"],
                 "ours_breakdown_ms": {k: med(a["ours"], k) for k in a["ours"][0]}}
            if spec["worker_epochs"]:
                # training runs loader workers: pixel tensors then cross into the main process through shared
                # memory. One pass of several epochs (the worker's start-up amortised), CPU of worker + main.
                wp = loader_pass(v, seed=R, tuned=tuned, workers=1, epochs=spec["worker_epochs"])
                r["ours_1worker"] = _rate_stats(n * spec["worker_epochs"], [wp["cpu"]])
                print(f"  [{mode}] {v}, 1 loader worker, {spec['worker_epochs']} epochs: "
                      f"{r['ours_1worker']['median']:.1f} samples/cpu-s", flush=True)
            if hf is not None:
                r["hf"] = _rate_stats(1, [(c["decode"] + c["process"]) / 1000 for c in a["hf"]])
                r["hf_predecoded"] = _rate_stats(1, [c["process"] / 1000 for c in a["hf"]])
                r["hf_breakdown_ms"] = {k: med(a["hf"], k) for k in a["hf"][-1]}
            res["variants"][v][mode] = r
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["out"]).write_text(json.dumps(res))


# ----------------------------------------------------------------------------- report


def _cores(target: float, tokens_per_clip: float, sps: float) -> float:
    """Cores needed to feed ``target`` tokens/s at ``sps`` clips/s per core."""
    return target / tokens_per_clip / sps


def report(res: dict, args, log) -> dict:
    """Print the tables; return the summary that goes into the JSON."""
    hf = res["hf_available"]
    target = args.target_tokens_per_s
    summary: dict = {"target_tokens_per_s": target, "variants": {}}
    log("")
    if not hf:
        log(f"transformers' path NOT measured ({res['hf_unavailable_reason']}): our path only. Run in the venv made by "
            ".ci/hf_parity.sh (/work/venvs/hfparity/bin/python) for the comparison.")
    log(f"one core (cpu {res['core']}), torch {res['torch']}, 1 thread. samples/s per core = samples per CPU-second of "
        f"the process (best / median of {args.repeats} passes); the ratio uses medians. Shared machine: noisy figures.")
    for v, info in res["variants"].items():
        par = info.get("parity")
        par_s = "" if par is None else (
            f"; same output as HF: {'yes' if par['ok'] else 'NO'} (input_ids "
            f"{'equal' if par['input_ids_equal'] else 'DIFFER'}, max |d pixel| {par['pixel_max_abs_diff']:.1e})")
        log(f"\n== {v}: {info['samples']} clips, {info['stored_frames']} stored frames -> {FRAMES} sampled, "
            f"{info['clip_kb']:.0f} kB/clip, grid {info['video_grid_thw']}, {info['tokens_per_clip']:.0f} tokens/clip "
            f"({info['vision_tokens_per_clip']} visual), pixel_values {info['pixel_values_mb_per_clip']:.1f} MB/clip"
            + par_s)
        log(f"   {'malloc':8s} {'path':42s} {'samples/s/core':>15s} {'ms/sample':>9s} {'ours/HF':>7s} {'cores/H100':>10s}")
        sv: dict = {}
        for mode in ("default_malloc", "tuned_malloc"):
            r = info[mode]
            m = mode.split("_")[0]
            o = r["ours"]
            rows = [("ours: shards -> uint8 PackedBatch (TrainLoader)", o, False),
                    ("ours + normalise to float32 on the CPU", r["ours_normalized"], True),
                    ("ours, shards without cost hints", r["ours_nohints"], True)]
            if "ours_1worker" in r:
                rows.append(("ours, 1 loader worker (worker + main CPU)", r["ours_1worker"], False))
            if hf:
                rows += [("HF: PyAV sequential decode + processor", r["hf"], True),
                         ("HF: processor on pre-decoded frames", r["hf_predecoded"], False)]
            h_med = r["hf"]["median"] if hf else None
            for name, s, with_ratio in rows:
                # ours rows: ours/HF of that row; HF rows: ours (uint8) / HF
                if not with_ratio or h_med is None:
                    ratio = ""
                elif name.startswith("ours"):
                    ratio = f"{s['median'] / h_med:6.2f}x"
                else:
                    ratio = f"{o['median'] / s['median']:6.2f}x"
                log(f"   {m:8s} {name:42s} {s['best']:6.1f} / {s['median']:6.1f} {1000 / s['median']:9.1f} {ratio:>7s} "
                    f"{_cores(target, info['tokens_per_clip'], s['median']):10.2f}")
            b = r["ours_breakdown_ms"]
            enc_rest = b["encode"] - b["decode"] - b["preprocess"] - b["tokenise"] - b["positions"]
            loader_rest = 1000 / o["median"] - b["read"] - b["encode"] - b["pack"]
            log(f"   {'':8s}   ours ms: read {b['read']:.1f} | decode {b['decode']:.1f} | preprocess {b['preprocess']:.1f} "
                f"| tokenise {b['tokenise']:.1f} | positions {b['positions']:.1f} | rest of encode {enc_rest:.1f} | pack "
                f"{b['pack']:.1f} | loader rest {loader_rest:.1f}   (wall {r['ours_wall']['median']:.1f} samples/s; "
                f"packing efficiency {100 * r['packing_efficiency']:.1f}%)")
            entry = {"ours_samples_per_s": o["median"], "ours_samples_per_s_best": o["best"],
                     "ours_normalized_samples_per_s": r["ours_normalized"]["median"],
                     "cores_per_h100_ours": _cores(target, info["tokens_per_clip"], o["median"])}
            if "ours_1worker" in r:
                entry.update(ours_1worker_samples_per_s=r["ours_1worker"]["median"],
                             cores_per_h100_ours_1worker=_cores(target, info["tokens_per_clip"], r["ours_1worker"]["median"]))
            if hf:
                h = r["hf_breakdown_ms"]
                log(f"   {'':8s}   HF   ms: decode {h['decode']:.1f} | video processor {h['video_processor']:.1f} | "
                    f"tokenise + expand {h['tokenise_expand']:.1f}")
                ours_nodec = 1000 / o["median"] - b["decode"]
                log(f"   {'':8s}   decode excluded: ours {ours_nodec:.1f} ms vs HF processor {h['process']:.1f} ms "
                    f"-> {h['process'] / ours_nodec:.2f}x")
                entry.update(hf_samples_per_s=r["hf"]["median"], ratio_vs_hf=o["median"] / r["hf"]["median"],
                             ratio_normalized_vs_hf=r["ours_normalized"]["median"] / r["hf"]["median"],
                             ratio_nohints_vs_hf=r["ours_nohints"]["median"] / r["hf"]["median"],
                             ratio_vs_hf_best=o["best"] / r["hf"]["best"],
                             ratio_without_decode=h["process"] / ours_nodec,
                             cores_per_h100_hf=_cores(target, info["tokens_per_clip"], r["hf"]["median"]))
            sv[mode] = entry
        if hf:
            sv["ratio_ours_tuned_vs_hf_default"] = sv["tuned_malloc"]["ours_samples_per_s"] / \
                sv["default_malloc"]["hf_samples_per_s"]
            log(f"   ours with tuned malloc vs HF as shipped (default malloc): "
                f"{sv['ratio_ours_tuned_vs_hf_default']:.2f}x")
        summary["variants"][v] = sv
    log(f"\nfeeding one H100: cores = {target:,.0f} tokens/s / tokens per clip / (samples/s/core), medians. Assumed: "
        f"{target:,.0f} tokens/s = issue 7's A3B-slice target (1.25 x the {ANCHOR_A3B_SLICE_HF:,} tokens/s of "
        "transformers + liger; 8 decoder layers, no vision tower on the GPU) with every token from a 16-frame "
        "448x448 clip. A full 48-layer A3B step, or the video-heavy case with the vision tower, consumes far fewer "
        "tokens/s per GPU, so this is an upper bound on the cores needed.")
    for mode in ("default_malloc", "tuned_malloc"):
        parts = []
        for v, sv in summary["variants"].items():
            e = sv[mode]
            cores = max(e["cores_per_h100_ours"], e.get("cores_per_h100_ours_1worker", 0.0))
            parts.append(f"{v} {cores:.1f} cores {'MET' if cores <= 8 else 'NOT MET'}" + (
                f", {e['ratio_vs_hf']:.2f}x HF {'MET' if e['ratio_vs_hf'] >= 2 else 'NOT MET'}"
                f" ({e['ratio_normalized_vs_hf']:.2f}x with the normalise on the CPU, {e['ratio_nohints_vs_hf']:.2f}x "
                f"without cost hints)" if hf else ""))
        with_w = any("cores_per_h100_ours_1worker" in sv[mode] for sv in summary["variants"].values())
        log(f"targets with {mode.replace('_', ' ')} on both paths (<= 8 cores per H100"
            + (", worst of 0/1 loader workers" if with_w else "") + ("; >= 2x HF" if hf else "; HF not measured")
            + "): " + "; ".join(parts))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 clips, av1 + h264, 2 passes (< 60 s with cached shards)")
    ap.add_argument("--clips", type=int, default=None, help="clips per variant (default 24; quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes (default 3; quick 2)")
    ap.add_argument("--variants", default=None, help=f"comma list of {sorted(VARIANTS)} (default {FULL_VARIANTS}; quick {QUICK_VARIANTS})")
    ap.add_argument("--budget", type=int, default=16384, help="tokens per packed micro-batch")
    ap.add_argument("--pack-window", type=int, default=16, help="packer look-ahead (samples; compressed until their pack is built)")
    ap.add_argument("--target-tokens-per-s", type=float, default=74000.0, help="trainer tokens/s per H100 to feed")
    ap.add_argument("--core", type=int, default=None, help="CPU to pin the measurement to (default: the last allowed)")
    ap.add_argument("--worker-epochs", type=int, default=3,
                    help="epochs of the 1-loader-worker pass (0: skip it; quick mode skips it)")
    ap.add_argument("--no-hf", action="store_true", help="measure our path only")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "rynnscale_databench"),
                    help="where the shards are built and cached")
    ap.add_argument("--json", default=None, help="write the results as JSON to this file")
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        _measure(args._measure)
        return
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only
    clips = args.clips or (8 if args.quick else 24)
    repeats = args.repeats or (2 if args.quick else 3)
    args.repeats = repeats
    variants = (args.variants or (QUICK_VARIANTS if args.quick else FULL_VARIANTS)).split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; allowed: {sorted(VARIANTS)}")
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    dirs = build_shards(work, variants, clips, log)
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    core = allowed[-1] if args.core is None else args.core
    if core not in allowed:
        ap.error(f"--core {core} is not among the CPUs this process may use: {allowed}")
    with tempfile.TemporaryDirectory() as td:
        spec = {"dirs": {v: str(dirs[v]) for v in variants}, "core": core, "repeats": repeats, "budget": args.budget,
                "pack_window": args.pack_window, "hf": not args.no_hf, "out": str(Path(td) / "res.json"),
                "quick": args.quick, "worker_epochs": 0 if args.quick else args.worker_epochs}
        Path(td, "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT) + (
            os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        log(f"measuring on cpu {core} (one child process; {repeats} passes x {variants}, {clips} clips each)")
        subprocess.run([sys.executable, __file__, "--_measure", str(Path(td, "spec.json"))], env=env, check=True)
        res = json.loads(Path(spec["out"]).read_text())
    summary = report(res, args, log)
    bad_parity = [v for v, i in res["variants"].items() if i.get("parity") and not i["parity"]["ok"]]
    if bad_parity:
        log(f"WARNING: our output differs from HF's on {bad_parity}: the comparison is not like for like")
    log(f"child peak RSS {res['peak_rss_mb']:.0f} MB; total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        out = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "clips": clips,
               "variants": variants, "results": res, "summary": summary}
        Path(args.json).write_text(json.dumps(out, indent=1))
        log(f"wrote {args.json}")
    raise SystemExit(1 if bad_parity else 0)


if __name__ == "__main__":
    main()
