"""RynnScale-style conversation jsonl -> shards (``rynnscale data convert jsonl FILE OUT --media-root DIR``).

One line = one sample::

    {"conversation": [{"role": "user", "content": [{"type": "video", "video": "clips/a.mp4"},
                                                   {"type": "text", "text": "Where did the cup go?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "... <traj> ... </traj>"}]}],
     "source": "...", "licence": "...", "task": "...", "fps": 2, "id": "..."}   (all but conversation optional)

Media items name files: ``{"type": "image", "image": PATH}``, ``{"type": "video", "video": PATH}`` or
``{"type": "video", "video": [PATH, ...]}`` (a frame sequence). The jsonl is untrusted: a PATH is
resolved under ``--media-root`` only; absolute paths, ``..`` components and symlinks that lead
outside the root are rejected (``unsafe_path``), naming the line. Every media file is read,
checked (images decoded; videos indexed and their first frame decoded) and copied into the sample
as ``f000.jpg`` ... / ``video.mp4`` (``video.v0.mp4``, ``video.v1.mp4`` when a line has several).
Grounding tags in text are validated with ``tags.parse_tags`` (strict); both ``<traj>`` and
``<trajectory>`` are accepted and kept as written.

Bad lines are skipped, counted by reason and listed (line number, reason, detail) in
``convert_report.json``; the run fails (``ConvertError``) once more than ``max_bad_fraction`` of
all lines are bad. Work is split into jobs of ``lines_per_shard`` consecutive lines, one shard
each, over processes; restartable like every converter (finished shards are kept).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rynnscale.data.manifest import completed_shards
from rynnscale.data.schema import VIDEO_EXTENSIONS, SchemaError, build_sample_members, parse_json
from rynnscale.data.tags import TagError, parse_tags
from rynnscale.data_pipelines.shard_stats import REPORT_NAME
from rynnscale.data_pipelines.shards import (
    ConvertError,
    ShardJob,
    ShardWriter,
    check_dataset_info,
    locks_output_dir,
    run_shard_jobs,
    shard_name,
)
from rynnscale.fsutil import atomic_write_bytes

__all__ = [
    "ConvertError",
    "BadItem",
    "resolve_under",
    "JsonlConfig",
    "line_to_sample",
    "convert_jsonl",
]

log = logging.getLogger(__name__)

#: why a jsonl line was skipped (plus the encoder's reasons, e.g. ``too_long``, from the cost hints)
LINE_REASONS = ("bad_json", "bad_conversation", "unsafe_path", "missing_media", "bad_media", "bad_tags", "too_large")


class BadItem(ValueError):
    """One input item (jsonl line, media file) that cannot become a sample: ``reason`` + detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ------------------------------------------------------------------------------ safe paths


def resolve_under(root: str | os.PathLike, rel: Any, where: str = "") -> Path:
    """Resolve the untrusted relative path ``rel`` inside ``root`` and return the real file path.

    Raises ``BadItem("unsafe_path")`` for non-strings, absolute / drive / home paths, ``..``
    components, NUL bytes, or a path whose real location (after symlinks) is outside ``root``;
    ``BadItem("missing_media")`` when it is not an existing regular file."""
    pre = f"{where}: " if where else ""
    if not isinstance(rel, str) or not rel:
        raise BadItem("unsafe_path", f"{pre}media path must be a non-empty string, got {rel!r:.80}")
    if "\x00" in rel or any(ord(c) < 32 for c in rel):
        raise BadItem("unsafe_path", f"{pre}media path {rel!r:.120} contains control characters")
    if rel.startswith(("/", "\\", "~")) or (len(rel) > 1 and rel[1] == ":") or os.path.isabs(rel):
        raise BadItem("unsafe_path", f"{pre}media path {rel!r:.120} is absolute; paths must be relative to the media root")
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise BadItem("unsafe_path", f"{pre}media path {rel!r:.120} contains '..'")
    root_real = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root_real, *parts))
    if os.path.commonpath([root_real, real]) != root_real:
        raise BadItem("unsafe_path", f"{pre}media path {rel!r:.120} resolves to {real!r}, outside the media root "
                                     f"{root_real!r} (symlink?)")
    if not os.path.isfile(real):
        raise BadItem("missing_media", f"{pre}media file {rel!r:.120} does not exist under {root_real!r}")
    return Path(real)


def _read_limited(path: Path, max_bytes: int, where: str, limit: str | None = None) -> bytes:
    limit = limit or f"max_media_bytes={max_bytes}"
    size = path.stat().st_size
    if size > max_bytes:
        raise BadItem("too_large", f"{where}: {path.name} has {size} bytes > {limit}")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadItem("too_large", f"{where}: {path.name} grew past {limit} while reading")
    return data


# ------------------------------------------------------------------------------ one line


@dataclass
class JsonlConfig:
    """Settings of a jsonl conversion (stored in the manifest ``info``; picklable for workers)."""

    media_root: str
    source: str | None = None           # default for lines without "source": "jsonl/<file stem>"
    licence: str = "unknown"            # default for lines without "licence"/"license"
    frames_fps: float = 2.0             # fps of frame-list videos / images when the line has no "fps"
    max_line_bytes: int = 16 << 20
    max_media_bytes: int = 1 << 30
    max_line_media_bytes: int = 2 << 30  # all media of one line: the loader's max_sample_bytes, over which it skips it
    max_media: int = 256                # media items per line
    max_frame_pixels: int = 4096 * 4096
    cost_hints: bool = True
    tokenizer: str | None = None
    encoder_cfg: Any = None             # rynnscale.data.encode.EncoderConfig for the hints
    recipe: Any = None                  # a loaded training recipe: the hints are its encoder's (shard_stats.hint_recipe)

    def settings(self) -> dict:
        from rynnscale.data_pipelines.shard_stats import hint_settings

        d = {k: v for k, v in asdict(self).items() if k not in ("tokenizer", "encoder_cfg", "recipe", "cost_hints")}
        if self.max_line_media_bytes == 2 << 30:   # the default is absent: conversions begun before it still resume
            del d["max_line_media_bytes"]
        d["media_root"] = os.path.realpath(self.media_root)
        d["cost_hints"] = hint_settings(self.cost_hints, self.tokenizer, self.encoder_cfg, self.recipe)
        return d


_LINE_KEYS = {"conversation", "id", "source", "licence", "license", "task", "embodiment", "fps", "meta", "extra"}
_IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png"}


def _image_member(data: bytes, cfg: JsonlConfig, where: str) -> tuple[str, tuple[int, int]]:
    """Check an image fully decodes; -> (member extension, (H, W))."""
    from PIL import Image

    from rynnscale.data.vision_preprocess import ImageError, decode_image

    try:
        fmt = Image.open(io.BytesIO(data)).format
    except Exception as e:
        raise BadItem("bad_media", f"{where}: not an image: {type(e).__name__}: {e}") from None
    if fmt not in _IMAGE_FORMATS:
        raise BadItem("bad_media", f"{where}: image format {fmt} is not supported (allowed: JPEG, PNG)")
    try:
        hw = decode_image(data, max_pixels=cfg.max_frame_pixels, max_bytes=cfg.max_media_bytes).shape[:2]
    except ImageError as e:
        raise BadItem("too_large" if e.reason == "too_large" else "bad_media", f"{where}: {e.detail}") from None
    return _IMAGE_FORMATS[fmt], (int(hw[0]), int(hw[1]))


def _video_check(data: bytes, cfg: JsonlConfig, where: str):
    """Index the video and decode its first frame; -> VideoInfo."""
    from rynnscale.data.video import VideoError, VideoLimits, decode_frames, probe_video

    lim = VideoLimits(max_bytes=cfg.max_media_bytes, max_pixels=cfg.max_frame_pixels)
    try:
        info = probe_video(data, lim)
        decode_frames(data, indices=[0], limits=lim)
    except VideoError as e:
        raise BadItem("too_large" if e.reason == "too_large" else "bad_media", f"{where}: {e.detail}") from None
    return info


def _check_tags(text: str, where: str) -> None:
    try:
        parse_tags(text, strict=True)
    except TagError as e:
        raise BadItem("bad_tags", f"{where}: {e}") from None


@dataclass
class _LineMedia:
    """The media of one line as it is read, before member names are given.

    Names depend on the whole line (frames are numbered ``f000``... across all items, a lone
    video is ``video.<ext>`` but several are ``video.v<i>.<ext>``), so each item first gets a
    placeholder dict that ``_name_media`` fills in once every item has been read."""

    # (placeholder item, None for a frame list | 0 for an image, [(ext, bytes)] per frame)
    frames: list[tuple[dict, int | None, list[tuple[str, bytes]]]] = field(default_factory=list)
    videos: list[tuple[dict, bytes, str, Any]] = field(default_factory=list)  # (placeholder item, data, ext, VideoInfo)
    n_frames: int = 0
    n_media: int = 0
    n_bytes: int = 0

    def read(self, path: Path, cfg: JsonlConfig, where: str) -> bytes:
        """One media file's bytes, within ``max_media_bytes`` and the line's ``max_line_media_bytes`` (a frame list
        may name any number of files: the line would otherwise be held in memory whatever its size)."""
        left = cfg.max_line_media_bytes - self.n_bytes
        if left < cfg.max_media_bytes:
            data = _read_limited(path, max(left, 0), where, f"the {max(left, 0)} bytes left of max_line_media_bytes="
                                 f"{cfg.max_line_media_bytes} (the line's media before it took {self.n_bytes})")
        else:
            data = _read_limited(path, cfg.max_media_bytes, where)
        self.n_bytes += len(data)
        return data


def _parse_line(raw: bytes | str, where: str) -> dict:
    """The line's JSON object (``schema.parse_json``: deep nesting, huge integers and lone surrogates are
    ``bad_json`` too); it must carry a ``conversation`` list."""
    try:
        obj = parse_json(raw, where)
    except SchemaError as e:
        raise BadItem("bad_json", str(e)) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("conversation"), list):
        raise BadItem("bad_conversation", f"{where}: a line must be an object with a 'conversation' list")
    return obj


def _read_frame_list(refs: list, cfg: JsonlConfig, iw: str, media: _LineMedia) -> list[tuple[str, bytes]]:
    """Read and decode every frame of a ``{"type": "video", "video": [PATH, ...]}`` item -> [(ext, bytes)]."""
    if not refs:
        raise BadItem("bad_conversation", f"{iw}: empty frame list")
    frames = []
    for fi, r in enumerate(refs):
        data = media.read(resolve_under(cfg.media_root, r, f"{iw} frame {fi}"), cfg, f"{iw} frame {fi}")
        ext, _ = _image_member(data, cfg, f"{iw} frame {fi} ({r!s:.80})")
        frames.append((ext, data))
    return frames


def _media_item(typ: str, ref: Any, cfg: JsonlConfig, iw: str, media: _LineMedia) -> dict:
    """Read and check one image / video file / frame-list item, record its bytes in ``media`` and
    return the item's placeholder for conv.json (member names are filled in by ``_name_media``)."""
    if typ == "video" and isinstance(ref, list):
        frames = _read_frame_list(ref, cfg, iw, media)
        new = {"type": "video", "video": []}
        media.frames.append((new, None, frames))
        media.n_frames += len(frames)
        return new
    path = resolve_under(cfg.media_root, ref, iw)
    data = media.read(path, cfg, iw)
    if typ == "image":
        ext, _ = _image_member(data, cfg, f"{iw} ({ref!s:.80})")
        new = {"type": "image", "image": ""}
        media.frames.append((new, 0, [(ext, data)]))
        media.n_frames += 1
        return new
    ext = path.suffix.lower().lstrip(".")
    if ext not in VIDEO_EXTENSIONS:
        raise BadItem("bad_media", f"{iw}: video {ref!s:.80} must end in one of {VIDEO_EXTENSIONS}")
    info = _video_check(data, cfg, f"{iw} ({ref!s:.80})")
    new = {"type": "video", "video": ""}
    media.videos.append((new, data, ext, info))
    return new


def _content_item(item: Any, cfg: JsonlConfig, iw: str, where: str, media: _LineMedia) -> dict:
    """One ``content`` entry -> its conv.json item: text is tag-checked, media read (at most ``max_media``)."""
    if not isinstance(item, dict):
        raise BadItem("bad_conversation", f"{iw}: must be an object")
    typ = item.get("type")
    if typ == "text":
        if not isinstance(item.get("text"), str):
            raise BadItem("bad_conversation", f"{iw}: text item needs a string 'text'")
        _check_tags(item["text"], iw)
        return {"type": "text", "text": item["text"]}
    if typ not in ("image", "video"):
        raise BadItem("bad_conversation", f"{iw}: type must be text, image or video, got {typ!r:.40}")
    if item.get(typ) is None:
        misplaced = next(((k, item[k]) for k in ("text", "path", "url", f"{typ}_url", "file")
                          if isinstance(item.get(k), str) and item[k]), None)
        if misplaced is not None:   # RynnScale's own README writes {"type": "image", "text": PATH}
            k, v = misplaced
            raise BadItem("bad_conversation", f"{iw}: {typ} item has no {typ!r} key but a path under {k!r}; did you "
                          f"mean {typ!r}: {{\"type\": \"{typ}\", \"{typ}\": {json.dumps(v)[:120]}}}?")
    media.n_media += 1
    if media.n_media > cfg.max_media:
        raise BadItem("too_large", f"{where}: more than max_media={cfg.max_media} media items")
    return _media_item(typ, item.get(typ), cfg, iw, media)


def _read_conversation(conversation: list, cfg: JsonlConfig, where: str) -> tuple[list[dict], _LineMedia]:
    """The line's turns with every item checked and every media file read, in order of appearance."""
    media = _LineMedia()
    turns = []
    for ti, turn in enumerate(conversation):
        tw = f"{where}: conversation[{ti}]"
        if not isinstance(turn, dict):
            raise BadItem("bad_conversation", f"{tw}: must be an object with 'role' and 'content'")
        content = turn.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise BadItem("bad_conversation", f"{tw}: content must be a list of items or a string")
        items = [_content_item(item, cfg, f"{tw}.content[{ci}]", where, media) for ci, item in enumerate(content)]
        turns.append({"role": turn.get("role"), "content": items})
    return turns, media


def _name_media(media: _LineMedia, where: str) -> dict[str, bytes]:
    """Give the media their member names (frames ``f000``... in order of appearance, then videos)
    and write the names into the placeholders; -> {member name: bytes}."""
    n_frames = media.n_frames
    width = max(3, len(str(max(n_frames - 1, 0))))
    if width > 6:
        raise BadItem("too_large", f"{where}: {n_frames} frames, more than the schema's f999999 naming allows")
    members: dict[str, bytes] = {}
    k = 0
    for new, single, lst in media.frames:
        names = []
        for ext, data in lst:
            name = f"f{k:0{width}d}.{ext}"
            members[name] = data
            names.append(name)
            k += 1
        if single is None:
            new["video"] = names
        else:
            new["image"] = names[0]
    for vi, (new, data, ext, _) in enumerate(media.videos):
        name = f"video.{ext}" if len(media.videos) == 1 else f"video.v{vi}.{ext}"
        new["video"] = name
        members[name] = data
    return members


def _line_video_meta(fps_line: Any, media: _LineMedia, cfg: JsonlConfig) -> dict[str, Any]:
    """meta.json ``video``: the line's fps, else a lone video file's own fps, else ``frames_fps``;
    a line with exactly one video file (and no frames) also records its size and frame count."""
    frames, videos = media.frames, media.videos
    if fps_line is not None:
        fps = fps_line
    elif videos and not frames:
        fps = videos[0][3].fps
    else:
        fps = cfg.frames_fps
    video: dict[str, Any] = {"fps": fps}
    if len(videos) == 1 and not frames:
        info = videos[0][3]
        video.update(num_frames=info.total_frames, width=info.width, height=info.height)
    return video


def _line_meta(obj: dict, line_no: int, cfg: JsonlConfig, default_source: str, media: _LineMedia) -> dict[str, Any]:
    """meta.json of a line: its own fields, else the run's defaults; the line number, id, free-form
    ``extra``/``meta`` and the names of unknown fields go under ``extra``."""
    ignored = sorted(str(k)[:40] for k in obj if k not in _LINE_KEYS)
    meta: dict[str, Any] = {
        "source": obj.get("source") or cfg.source or default_source,
        "licence": obj.get("licence") or obj.get("license") or cfg.licence,
        "task": obj.get("task", ""),
        "extra": {"jsonl_line": line_no},
    }
    if obj.get("embodiment"):
        meta["embodiment"] = obj["embodiment"]
    if "id" in obj:
        meta["extra"]["id"] = obj["id"] if isinstance(obj["id"], (str, int)) else str(obj["id"])[:200]
    if isinstance(obj.get("extra") or obj.get("meta"), dict):
        meta["extra"]["line"] = obj.get("extra") or obj.get("meta")
    if ignored:
        meta["extra"]["ignored_fields"] = ignored
    if media.frames or media.videos:
        meta["video"] = _line_video_meta(obj.get("fps"), media, cfg)
    return meta


def line_to_sample(line_no: int, raw: bytes | str, cfg: JsonlConfig, *, default_source: str, key_prefix: str = "jsonl"
                   ) -> tuple[str, dict[str, bytes]]:
    """One jsonl line -> (key, members); raises ``BadItem`` naming the line and the reason."""
    where = f"line {line_no}"
    obj = _parse_line(raw, where)
    turns, media = _read_conversation(obj["conversation"], cfg, where)
    members = _name_media(media, where)
    meta = _line_meta(obj, line_no, cfg, default_source, media)
    try:
        members = build_sample_members(meta, {"conversation": turns}, members, where=where,
                                       meta_where=f"{where}: meta", conv_where=f"{where}: conversation")
    except SchemaError as e:
        raise BadItem("bad_conversation", str(e)) from None
    return f"{key_prefix}-{line_no:09d}", members


# ------------------------------------------------------------------------------ driver


def _read_lines(path: str, offset: int, count: int, max_line_bytes: int):
    """Yield (raw bytes or None if over the limit) for ``count`` lines starting at byte ``offset``. A UTF-8 byte
    order mark opening the file (Windows editors write one) is dropped: json refuses it, which lost line 1."""
    with open(path, "rb") as f:
        f.seek(offset)
        for i in range(count):
            line = f.readline(max_line_bytes + 1)
            if not line:
                return
            if offset == 0 and i == 0 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield None
                continue
            yield line


def _jsonl_job(out_dir: str, prefix: str, index: int, payload: dict) -> tuple:
    """Worker: lines [first, first + count) -> shard ``index``; returns (ShardInfo|None, job report)."""
    from rynnscale.data.encode import SampleError
    from rynnscale.data_pipelines.shard_stats import cost_hints

    cfg: JsonlConfig = payload["cfg"]
    first, bad, good = payload["first_line"], [], 0
    with ShardWriter(out_dir, prefix, max_samples=1 << 62, max_bytes=1 << 62, start_index=index,
                     update_manifest=False) as w:
        for i, raw in enumerate(_read_lines(payload["path"], payload["offset"], payload["count"], cfg.max_line_bytes)):
            line_no = first + i
            if raw is None:
                bad.append([line_no, "too_large", f"line {line_no}: longer than max_line_bytes={cfg.max_line_bytes}"])
                continue
            if not raw.strip():
                continue  # blank lines are not samples
            try:
                key, members = line_to_sample(line_no, raw, cfg, default_source=payload["default_source"],
                                              key_prefix=prefix)
                costs = cost_hints(key, members, cfg.tokenizer, cfg.encoder_cfg, cfg.recipe) if cfg.cost_hints else None
            except BadItem as e:
                bad.append([line_no, e.reason, e.detail])
                continue
            except SampleError as e:
                bad.append([line_no, e.reason, f"line {line_no}: {e.detail}"])
                continue
            except RecursionError:   # parsed, but too deep to copy or write back (json.dumps) this far down the stack
                bad.append([line_no, "bad_json", f"line {line_no}: nested too deeply to convert (RecursionError)"])
                continue
            w.write(key, members, costs=costs)
            good += 1
    return (w.shards[0] if w.shards else None), {"lines": payload["count"], "good": good, "bad": bad}


def _scan(path: Path, lines_per_shard: int) -> tuple[list[tuple[int, int, int]], int, str]:
    """[(first line number, byte offset, line count)] per job, total lines, sha256 of the file."""
    h = hashlib.sha256()
    jobs, n, offset = [], 0, 0
    with open(path, "rb") as f:
        for line in f:
            if n % lines_per_shard == 0:
                jobs.append([n + 1, offset, 0])
            jobs[-1][2] += 1
            h.update(line)
            offset += len(line)
            n += 1
    return [tuple(j) for j in jobs], n, h.hexdigest()


def _check_jsonl_args(path: Path, media_root: str | os.PathLike, lines_per_shard: int, max_bad_fraction: float,
                      licence: str) -> None:
    """Refuse a missing input / media root and out-of-range settings; warn when no licence is given."""
    if not path.is_file():
        raise FileNotFoundError(f"jsonl file {path} " + ("is a directory, not a file" if path.is_dir() else "does not exist"))
    if not Path(media_root).is_dir():
        raise FileNotFoundError(f"--media-root {media_root} is not a directory")
    if lines_per_shard < 1:
        raise ValueError(f"lines_per_shard must be >= 1, got {lines_per_shard}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    if licence == "unknown":
        log.warning("jsonl %s: no --licence given; lines without a 'licence' field are marked 'unknown'", path)


def _old_job_reports(report_path: Path) -> dict:
    """The per-job entries of an earlier run's report ({} when there is none or it is unreadable)."""
    if not report_path.is_file():
        return {}
    try:
        return json.loads(report_path.read_text(encoding="utf-8")).get("jobs", {})
    except (ValueError, OSError, AttributeError):
        return {}


@dataclass
class _JsonlRun:
    """Bad-line bookkeeping of one conversion: the per-job results (``str(job index)`` ->
    {lines, good, bad}), the ``max_bad_fraction`` threshold and the report beside the shards."""

    path: Path
    out: Path
    n_lines: int
    max_bad_fraction: float
    per_job: dict[str, dict] = field(default_factory=dict)

    @property
    def report_path(self) -> Path:
        return self.out / REPORT_NAME

    @property
    def allowed_bad(self) -> float:
        return self.max_bad_fraction * self.n_lines

    def n_bad(self) -> int:
        return sum(len(r["bad"]) for r in self.per_job.values())

    def write_report(self, final: bool) -> dict:
        """Write ``convert_report.json`` (totals, bad lines by reason, the first 1000 bad lines) and return it."""
        bad = Counter()
        items, good = [], 0
        for j in sorted(self.per_job, key=int):
            r = self.per_job[j]
            good += r["good"]
            for ln, reason, detail in r["bad"]:
                bad[reason] += 1
                if len(items) < 1000:
                    items.append({"line": ln, "reason": reason, "detail": detail[:500]})
        rep = {"converter": "jsonl", "input": str(self.path), "complete": final,
               "totals": {"lines": self.n_lines, "samples": good, "bad_lines": sum(bad.values())},
               "bad": dict(sorted(bad.items())), "bad_items": items, "jobs": self.per_job}
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.report_path, json.dumps(rep, indent=1).encode())
        return rep

    def on_result(self, job: ShardJob, res: dict) -> None:
        """Record a finished job; stop the run (report written) once the bad lines pass the threshold."""
        self.per_job[str(job.index)] = res
        for ln, _reason, detail in res["bad"]:
            log.warning("jsonl %s: skipped %s", self.path.name, detail if detail.startswith("line ") else f"line {ln}: {detail}")
        n_bad = self.n_bad()
        if n_bad > self.allowed_bad:
            self.write_report(False)
            raise ConvertError(f"{self.path}: {n_bad} of {self.n_lines} lines are bad, more than max_bad_fraction="
                               f"{self.max_bad_fraction}; see {self.report_path} (shards written so far are kept)")

    def resume(self, jobs: list[ShardJob], prefix: str, old: dict) -> None:
        """Keep the report entries of shards finished earlier; a finished shard whose entry is lost
        is redone (its skipped lines must be counted again). Fails if they already pass the threshold."""
        done = completed_shards(self.out)
        for jb in jobs:
            name = shard_name(prefix, jb.index)
            if name in done and str(jb.index) in old:
                self.per_job[str(jb.index)] = old[str(jb.index)]
            elif name in done:
                (self.out / name).unlink()
        if self.n_bad() > self.allowed_bad:
            raise ConvertError(f"{self.path}: more than max_bad_fraction={self.max_bad_fraction} of the lines are bad; "
                               f"see {self.report_path}")


@locks_output_dir
def convert_jsonl(
    jsonl: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    media_root: str | os.PathLike,
    source: str | None = None,
    licence: str = "unknown",
    frames_fps: float = 2.0,
    lines_per_shard: int = 500,
    max_bad_fraction: float = 0.05,
    workers: int = 1,
    prefix: str = "jsonl",
    cost_hints: bool = True,
    tokenizer: str | None = None,
    encoder_cfg: Any = None,
    recipe: Any = None,
    progress: bool = True,
    max_line_media_bytes: int = 2 << 30,
) -> dict:
    """Convert a conversation jsonl into shards under ``out_dir``; returns the run report.

    Lines ``[j * lines_per_shard, (j + 1) * lines_per_shard)`` go to shard ``j``. Bad lines are
    skipped and reported; ``ConvertError`` once the bad lines exceed ``max_bad_fraction`` of all
    lines (raised as soon as that is certain; finished shards stay and a rerun resumes).
    Rerunning into a directory made from another file or with other settings is an error. A line whose media
    add up to more than ``max_line_media_bytes`` (default: the loader's ``max_sample_bytes``) is a bad line."""
    path = Path(jsonl)
    _check_jsonl_args(path, media_root, lines_per_shard, max_bad_fraction, licence)
    cfg = JsonlConfig(media_root=str(media_root), source=source, licence=licence, frames_fps=float(frames_fps),
                      cost_hints=cost_hints, tokenizer=tokenizer, encoder_cfg=encoder_cfg, recipe=recipe,
                      max_line_media_bytes=max_line_media_bytes)
    spans, n_lines, sha = _scan(path, lines_per_shard)
    default_source = f"jsonl/{path.stem}"
    info = {"converter": "rynnscale.data_pipelines.jsonl", "input": str(path.resolve()), "input_sha256": sha,
            "input_lines": n_lines, "lines_per_shard": lines_per_shard, "prefix": prefix, **cfg.settings()}
    run = _JsonlRun(path, Path(out_dir), n_lines, max_bad_fraction)
    old = _old_job_reports(run.report_path)
    jobs = [ShardJob(j, {"cfg": cfg, "path": str(path), "first_line": first, "offset": off, "count": cnt,
                         "default_source": default_source}, weight=cnt) for j, (first, off, cnt) in enumerate(spans)]
    check_dataset_info(run.out, info)  # before trusting anything in out_dir
    run.resume(jobs, prefix, old)
    run_shard_jobs(run.out, jobs, _jsonl_job, info=info, prefix=prefix, workers=workers, progress=progress,
                   desc=f"jsonl {path.name}", unit="line", on_result=run.on_result)
    return run.write_report(True)
