"""Frame folders -> shards (``rynnscale data convert frames DIR OUT --fps F --clip-frames N --task ...``).

A folder of jpg/png frames of one episode, in natural name order (``2.jpg`` before ``10.jpg``),
recorded at ``fps``, is cut into clips of ``clip_frames`` frames every ``stride`` frames (a tail
shorter than a clip is dropped unless ``keep_tail``). Each clip becomes one sample whose frames are
stored unchanged as members ``f000.jpg`` ... (bytes copied; every frame is decoded once to check it
and its size), with ``meta.json`` giving fps, source frame indices and timestamps on the clip's
clock (``i / fps``) and ``clip_start_s`` on the folder's clock.

The conversation is either a template (``question`` / ``answer`` with ``{task}``, ``{clip_index}``,
``{num_frames}``, ``{start_s}``, ``{end_s}``, ``{duration_s}``, ``{first_frame}``, ``{last_frame}``
placeholders; by default the clip is a task-recognition sample: "What task is being performed in
this video?" -> the task string), or an annotations jsonl with one sample per line::

    {"start_frame": 8, "end_frame": 24, "question": "...", "answer": "... <traj> <frame 0>: ... </traj>"}

(``end_frame`` exclusive; optional ``task``). Answers are checked with ``tags.parse_tags``
(strict) and every ``<frame n>`` must fall inside the clip. Frame files are untrusted names in a
given directory: symlinks that lead outside it are rejected.

``detect_licence`` (shared with the LeRobot converter) reads a licence from dataset files.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rynnscale.data.manifest import completed_shards
from rynnscale.data.schema import IMAGE_EXTENSIONS, build_sample_members
from rynnscale.data.tags import TagError, parse_tags
from rynnscale.data_pipelines.jsonl import BadItem, _old_job_reports, resolve_under
from rynnscale.data_pipelines.shard_stats import REPORT_NAME, hint_settings
from rynnscale.data_pipelines.shards import (
    ConvertError,
    ConvertUsageError,
    ShardJob,
    ShardWriter,
    check_dataset_info,
    locks_output_dir,
    run_shard_jobs,
    shard_name,
)
from rynnscale.fsutil import atomic_write_bytes

__all__ = ["detect_licence", "natural_key", "list_frames", "FramesConfig", "frame_clips", "convert_frames"]

log = logging.getLogger(__name__)

DEFAULT_QUESTION = "What task is being performed in this video?"
DEFAULT_ANSWER = "{task}"

# ----------------------------------------------------------------------------------- licences

# (pattern on the licence text, SPDX id); first match wins
_LICENCE_TEXTS = [
    (r"\bMIT License\b|Permission is hereby granted, free of charge", "MIT"),
    (r"Apache License,?\s+Version 2\.0", "Apache-2.0"),
    (r"Creative Commons Attribution-NonCommercial-ShareAlike 4\.0|CC BY-NC-SA 4\.0", "CC-BY-NC-SA-4.0"),
    (r"Creative Commons Attribution-NonCommercial 4\.0|CC BY-NC 4\.0", "CC-BY-NC-4.0"),
    (r"Creative Commons Attribution-ShareAlike 4\.0|CC BY-SA 4\.0", "CC-BY-SA-4.0"),
    (r"Creative Commons Attribution 4\.0|CC BY 4\.0", "CC-BY-4.0"),
    (r"CC0 1\.0|Creative Commons Zero", "CC0-1.0"),
    (r"GNU GENERAL PUBLIC LICENSE\s+Version 3", "GPL-3.0"),
    (r"BSD 3-Clause|Redistributions of source code.*?Neither the name", "BSD-3-Clause"),
    (r"BSD 2-Clause", "BSD-2-Clause"),
]
_LICENCE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "LICENCE.md", "COPYING")
_FRONT_MATTER_RE = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.DOTALL)
_YAML_LICENCE_RE = re.compile(r"^licen[cs]e:\s*['\"]?([A-Za-z0-9.+-]+)['\"]?\s*$", re.MULTILINE)


def detect_licence(*dirs: str | os.PathLike, info: dict | None = None) -> tuple[str, str | None]:
    """(licence, where it was found) from ``info["license"|"licence"]``, a README's YAML front
    matter (``license: mit``, as Hugging Face dataset cards) or a LICENSE file's text, searching
    ``dirs`` in order; ("unknown", None) if none is found. Only small files are read."""
    for k in ("license", "licence"):
        if info and isinstance(info.get(k), str) and info[k].strip():
            return info[k].strip(), f"info.json:{k}"
    for d in dirs:
        d = Path(d)
        readme = d / "README.md"
        if readme.is_file() and readme.stat().st_size < (1 << 20):
            text = readme.read_text(encoding="utf-8", errors="replace")
            fm = _FRONT_MATTER_RE.match(text)
            if fm and (m := _YAML_LICENCE_RE.search(fm.group(1))):
                return m.group(1), str(readme)
        for name in _LICENCE_FILES:
            f = d / name
            if f.is_file() and f.stat().st_size < (1 << 20):
                text = f.read_text(encoding="utf-8", errors="replace")
                for pat, spdx in _LICENCE_TEXTS:
                    if re.search(pat, text, re.DOTALL):
                        return spdx, str(f)
    return "unknown", None


# ----------------------------------------------------------------------------------- frames


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers numerically (``f2.jpg`` < ``f10.jpg``). Only ASCII digits count
    as a number: ``\\d`` and ``str.isdigit`` also take '²' or '①', which ``int`` refuses."""
    return [int(t) if i % 2 else t.lower() for i, t in enumerate(re.split(r"([0-9]+)", name))]


def list_frames(directory: str | os.PathLike) -> list[str]:
    """Names of the jpg/png files directly in ``directory``, in natural order (hidden files skipped)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"frame folder {d} is not a directory")
    names = [p.name for p in d.iterdir() if not p.name.startswith(".") and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
    return sorted(names, key=natural_key)


@dataclass
class FramesConfig:
    """Settings of a frame-folder conversion (stored in the manifest ``info``)."""

    fps: float
    clip_frames: int
    stride: int | None = None        # default: clip_frames (no overlap)
    keep_tail: bool = False
    task: str = ""
    question: str = DEFAULT_QUESTION
    answer: str = DEFAULT_ANSWER
    source: str | None = None        # default "frames/<folder name>"
    licence: str | None = None       # default: detect_licence(folder, its parent)
    embodiment: str = "unknown"
    max_frame_pixels: int = 4096 * 4096
    cost_hints: bool = True
    tokenizer: str | None = None
    encoder_cfg: Any = None
    recipe: Any = None                  # a loaded training recipe: the hints are its encoder's (shard_stats.hint_recipe)

    def validate(self) -> None:
        if not (self.fps > 0 and self.fps < float("inf")):
            raise ValueError(f"fps must be a positive number, got {self.fps}")
        if self.clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {self.clip_frames}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")


def frame_clips(num_frames: int, clip_frames: int, stride: int | None = None, keep_tail: bool = False) -> list[tuple[int, int]]:
    """[start, end) frame ranges of the clips: every ``stride`` frames, full clips only unless ``keep_tail``."""
    stride = stride or clip_frames
    out = []
    for s in range(0, num_frames, stride):
        e = s + clip_frames
        if e <= num_frames:
            out.append((s, e))
        elif keep_tail and num_frames - s > 0 and (not out or out[-1][1] < num_frames):
            out.append((s, num_frames))
            break
        else:
            break
    return out


def _fill(template: str, values: dict, what: str) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{what} template {template!r}: {type(e).__name__}: {e} (placeholders: "
                         f"{', '.join('{' + k + '}' for k in values)})") from None


def _check_answer(text: str, n_frames: int, where: str) -> None:
    try:
        tags = parse_tags(text, strict=True)
    except TagError as e:
        raise ValueError(f"{where}: {e}") from None
    for g in tags:
        if g.frame is not None and g.frame >= n_frames:
            raise ValueError(f"{where}: tag {g.to_text()!r} names frame {g.frame} but the clip has {n_frames} frames")


def _read_annotations(path: str | os.PathLike, num_frames: int) -> list[dict]:
    """Parse and check the annotations jsonl (errors name the line)."""
    out = []
    with open(path, encoding="utf-8-sig") as f:   # -sig: a byte order mark (Windows editors) is not JSON
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {ln}"
            try:
                a = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e}") from None
            if not isinstance(a, dict):
                raise ValueError(f"{where}: must be an object")
            unknown = set(a) - {"start_frame", "end_frame", "question", "answer", "task"}
            if unknown:
                raise ValueError(f"{where}: unknown fields {sorted(unknown)} (allowed: start_frame, end_frame, question, answer, task)")
            s, e = a.get("start_frame"), a.get("end_frame")
            if not (isinstance(s, int) and isinstance(e, int) and 0 <= s < e <= num_frames):
                raise ValueError(f"{where}: need integers 0 <= start_frame < end_frame <= {num_frames} (the folder's frame count), got {s!r}, {e!r}")
            for k in ("question", "answer"):
                if not isinstance(a.get(k), str) or not a[k].strip():
                    raise ValueError(f"{where}: {k!r} must be a non-empty string")
            if "task" in a and not isinstance(a["task"], str):
                raise ValueError(f"{where}: 'task' must be a string")
            _check_answer(a["answer"], e - s, where)
            out.append({"start": s, "end": e, "question": a["question"], "answer": a["answer"], "task": a.get("task"),
                        "line": ln})
    if not out:
        raise ValueError(f"{path}: no annotations")
    return out


def _clip_sample(folder: str, names: list[str], clip: dict, cfg: FramesConfig, key: str, source: str, licence: str
                 ) -> dict[str, bytes]:
    """Members of one clip (frames copied, each decoded once to check it)."""
    from rynnscale.data.vision_preprocess import ImageError, decode_image

    s, e = clip["start"], clip["end"]
    n = e - s
    width = max(3, len(str(n - 1)))
    members: dict[str, bytes] = {}
    frame_names, size = [], None
    for i, src_i in enumerate(range(s, e)):
        name = names[src_i]
        path = resolve_under(folder, name, f"frame {name}")
        data = path.read_bytes()
        try:
            hw = decode_image(data, max_pixels=cfg.max_frame_pixels).shape[:2]
        except ImageError as err:
            raise BadItem("bad_media", f"frame file {path}: {err.detail}") from None
        if size is None:
            size = hw
        elif hw != size:
            raise BadItem("bad_media", f"frame file {path} is {hw[1]}x{hw[0]}, the clip's first frame "
                                       f"{names[s]} is {size[1]}x{size[0]} (a clip's frames must share one size)")
        ext = Path(name).suffix.lower().lstrip(".")
        member = f"f{i:0{width}d}.{ext}"
        members[member] = data
        frame_names.append(member)
    fps = float(cfg.fps)
    task = clip["task"] if clip.get("task") is not None else cfg.task
    values = {"task": task, "clip_index": clip["index"], "num_frames": n, "start_s": round(s / fps, 3),
              "end_s": round(e / fps, 3), "duration_s": round(n / fps, 3), "first_frame": names[s], "last_frame": names[e - 1]}
    question = clip["question"] if "question" in clip else _fill(cfg.question, values, "question")
    answer = clip["answer"] if "answer" in clip else _fill(cfg.answer, values, "answer")
    if not answer.strip():
        raise ValueError(f"clip {clip['index']}: the answer is empty (give --task, --answer or --annotations)")
    _check_answer(answer, n, f"clip {clip['index']} answer")
    meta = {
        "source": source,
        "licence": licence,
        "task": task,
        "embodiment": cfg.embodiment,
        "episode": Path(folder).name,
        "clip_start_s": s / fps,
        "video": {"fps": fps, "num_frames": n, "width": int(size[1]), "height": int(size[0]),
                  "frame_indices": list(range(s, e)), "timestamps": [i / fps for i in range(n)]},
        "extra": {"frames": [names[i] for i in range(s, e)], "clip_index": clip["index"]},
    }
    if "line" in clip:
        meta["extra"]["annotation_line"] = clip["line"]
    conv = {"conversation": [
        {"role": "user", "content": [{"type": "video", "video": frame_names}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}
    return build_sample_members(meta, conv, members)


def _frames_job(out_dir: str, prefix: str, index: int, payload: dict) -> tuple:
    """Worker: the clips of one job -> shard ``index``; returns (ShardInfo|None, {clips, good, bad: [[key, reason,
    detail]]}). A clip with an unreadable or mis-sized frame (``BadItem``) is skipped and listed, the others go on."""
    from rynnscale.data.encode import SampleError
    from rynnscale.data_pipelines.shard_stats import cost_hints

    cfg: FramesConfig = payload["cfg"]
    bad = []
    with ShardWriter(out_dir, prefix, max_samples=1 << 62, max_bytes=1 << 62, start_index=index,
                     update_manifest=False) as w:
        for clip in payload["clips"]:
            key = f"{prefix}-{payload['stem']}-c{clip['index']:05d}"
            try:
                members = _clip_sample(payload["folder"], payload["names"], clip, cfg, key, payload["source"],
                                       payload["licence"])
                costs = cost_hints(key, members, cfg.tokenizer, cfg.encoder_cfg, cfg.recipe) if cfg.cost_hints else None
            except BadItem as e:
                bad.append([key, e.reason, f"clip {clip['index']}: {e.detail}"])
                continue
            except SampleError as e:  # e.g. too_long for the training encoder: training would skip it too
                bad.append([key, e.reason, f"clip {clip['index']}: {e.detail}"])
                continue
            w.write(key, members, costs=costs)
    n = len(payload["clips"])
    return (w.shards[0] if w.shards else None), {"clips": n, "good": n - len(bad), "bad": bad}


@dataclass
class _FramesRun:
    """Bad-clip bookkeeping of one conversion (as jsonl's ``_JsonlRun`` for lines): the per-job results
    (``str(job index)`` -> {clips, good, bad}), the ``max_bad_fraction`` threshold, and the report beside the
    shards, rewritten after every finished job (``complete`` false until the end)."""

    folder: Path
    out: Path
    n_clips: int
    max_bad_fraction: float
    base: dict          # the report's fixed part: totals of the folder, warnings, licence
    per_job: dict

    def n_bad(self) -> int:
        return sum(len(r["bad"]) for r in self.per_job.values())

    def write_report(self, final: bool) -> dict:
        """Write ``convert_report.json`` (bad clips by reason, the first 1000 listed) and return it."""
        bad: dict[str, int] = {}
        items = []
        for j in sorted(self.per_job, key=int):
            for key, reason, detail in self.per_job[j]["bad"]:
                bad[reason] = bad.get(reason, 0) + 1
                if len(items) < 1000:
                    items.append({"key": key, "reason": reason, "detail": detail[:500]})
        rep = {"converter": "frames", "input": str(self.folder), "complete": final,
               "totals": {**self.base["totals"], "samples": sum(r["good"] for r in self.per_job.values()),
                          "bad_clips": sum(bad.values())},
               "bad": dict(sorted(bad.items())), "bad_items": items, "warnings": self.base["warnings"],
               "licence": self.base["licence"], "jobs": self.per_job}
        atomic_write_bytes(self.out / REPORT_NAME, json.dumps(rep, indent=1).encode())
        return rep

    def on_result(self, job: ShardJob, res: dict) -> None:
        """Record a finished job, log its bad clips, rewrite the report; stop once the bad clips pass the threshold."""
        self.per_job[str(job.index)] = res
        for _key, _reason, detail in res["bad"]:
            log.warning("frames %s: skipped %s", self.folder.name, detail)
        self.write_report(False)
        if self.n_bad() > self.max_bad_fraction * self.n_clips:
            first = next(b for j in sorted(self.per_job, key=int) for b in self.per_job[j]["bad"])
            raise ConvertError(f"{self.folder}: {self.n_bad()} of {self.n_clips} clips are bad, more than "
                               f"max_bad_fraction={self.max_bad_fraction} (e.g. {first[2]}); see "
                               f"{self.out / REPORT_NAME} (shards written so far are kept)")

    def resume(self, jobs: list[ShardJob], prefix: str) -> None:
        """Keep the report entries of shards finished earlier; a finished shard whose entry is lost is redone (its
        skipped clips must be counted again)."""
        old = _old_job_reports(self.out / REPORT_NAME)
        done = completed_shards(self.out)
        for jb in jobs:
            name = shard_name(prefix, jb.index)
            if name in done and isinstance(old.get(str(jb.index)), dict) and "bad" in old[str(jb.index)]:
                self.per_job[str(jb.index)] = old[str(jb.index)]
            elif name in done:
                (self.out / name).unlink()


@locks_output_dir
def convert_frames(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fps: float,
    clip_frames: int,
    stride: int | None = None,
    keep_tail: bool = False,
    task: str = "",
    question: str = DEFAULT_QUESTION,
    answer: str = DEFAULT_ANSWER,
    annotations: str | os.PathLike | None = None,
    source: str | None = None,
    licence: str | None = None,
    embodiment: str = "unknown",
    clips_per_shard: int = 256,
    max_bad_fraction: float = 0.05,
    workers: int = 1,
    prefix: str = "frames",
    cost_hints: bool = True,
    tokenizer: str | None = None,
    encoder_cfg: Any = None,
    recipe: Any = None,
    progress: bool = True,
) -> dict:
    """Convert one frame folder into clip samples under ``out_dir``; returns the run report.

    Restartable (finished shards are kept; a rerun with other settings or other frames is an
    error); ``workers`` processes over shards of ``clips_per_shard`` clips. A clip with an unreadable or
    mis-sized frame is skipped and reported; ``ConvertError`` once more than ``max_bad_fraction`` of the clips are."""
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    cfg = FramesConfig(fps=float(fps), clip_frames=int(clip_frames), stride=stride, keep_tail=keep_tail, task=task,
                       question=question, answer=answer, source=source, licence=licence, embodiment=embodiment,
                       cost_hints=cost_hints, tokenizer=tokenizer, encoder_cfg=encoder_cfg, recipe=recipe)
    cfg.validate()
    folder = Path(folder)
    names = list_frames(folder)
    if not names:
        raise ConvertUsageError(f"{folder}: no jpg/png frames")
    warnings = []
    lic = licence
    if lic is None:
        lic, found = detect_licence(folder, folder.parent)
        if found is None:
            warnings.append(f"{folder}: no licence found (README front matter / LICENSE); marked 'unknown'")
            log.warning(warnings[-1])
    if annotations is not None:
        clips = [{"index": i, **a} for i, a in enumerate(_read_annotations(annotations, len(names)))]
        ann = {"path": str(Path(annotations).resolve()), "text": Path(annotations).read_text(encoding="utf-8")}
    else:
        if not task.strip() and "{task}" in answer:
            raise ValueError("the default answer is the task string: give --task (or --answer / --annotations)")
        spans = frame_clips(len(names), cfg.clip_frames, cfg.stride, cfg.keep_tail)
        if not spans:
            raise ConvertUsageError(f"{folder}: {len(names)} frames, fewer than one clip of --clip-frames "
                                    f"{cfg.clip_frames}")
        clips = [{"index": i, "start": s, "end": e} for i, (s, e) in enumerate(spans)]
        ann = None
        used = spans[-1][1]
        if used < len(names):
            warnings.append(f"{folder}: the last {len(names) - used} frames do not fill a clip and are dropped")
            log.info(warnings[-1])
    source = source or f"frames/{folder.name}"
    info = {"converter": "rynnscale.data_pipelines.frames", "input": str(folder.resolve()), "frames": names,
            "annotations": ann, "prefix": prefix, "clips_per_shard": clips_per_shard, "licence_used": lic,
            "source_used": source, **{k: v for k, v in asdict(cfg).items() if k not in ("tokenizer", "encoder_cfg", "recipe", "cost_hints")},
            "cost_hints": hint_settings(cost_hints, tokenizer, encoder_cfg, recipe)}
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", folder.name)[:40] or "frames"
    jobs = []
    for j in range(0, len(clips), clips_per_shard):
        chunk = clips[j:j + clips_per_shard]
        jobs.append(ShardJob(j // clips_per_shard, {"cfg": cfg, "folder": str(folder), "names": names, "clips": chunk,
                                                    "stem": stem, "source": source, "licence": lic}, weight=len(chunk)))
    base = {"totals": {"frames": len(names), "clips": len(clips),
                       "frames_in_clips": sum(c["end"] - c["start"] for c in clips)}, "warnings": warnings, "licence": lic}
    run = _FramesRun(folder, Path(out_dir), len(clips), max_bad_fraction, base, {})
    check_dataset_info(run.out, info)  # before trusting anything in out_dir
    run.out.mkdir(parents=True, exist_ok=True)
    run.resume(jobs, prefix)
    run_shard_jobs(out_dir, jobs, _frames_job, info=info, prefix=prefix, workers=workers, progress=progress,
                   desc=f"frames {folder.name}", unit="clip", on_result=run.on_result)
    return run.write_report(True)
