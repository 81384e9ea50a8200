"""LeRobotDataset (v2.0/v2.1 and v3.0) -> shards (``rynnscale data convert lerobot SRC OUT``).

Each episode's video frames and parquet rows are paired by time (unpaired ones, misaligned or non-finite
episodes skipped and counted, never the whole run), cut into clips, re-encoded (or stored as frames) with
their action / state arrays and a RynnBrain-style answer (optionally with discretised action tokens), in
parallel over episodes, restartable. The layouts read, the alignment rule, the members, the answer format
and the action bins: docs/data_format.md, "LeRobot".
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import string
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rynnscale.data.manifest import completed_shards
from rynnscale.data.schema import build_sample_members
from rynnscale.data_pipelines.frames import detect_licence
from rynnscale.data_pipelines.jsonl import BadItem, resolve_under
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

__all__ = [
    "STATS_NAME",
    "EpisodeError",
    "Episode",
    "LeRobotMeta",
    "LeRobotConfig",
    "read_lerobot",
    "read_episode_table",
    "episode_video_frames",
    "plan_clips",
    "compute_action_stats",
    "action_to_bins",
    "bin_centres",
    "format_action_bins",
    "parse_action_bins",
    "describe_actions",
    "episode_samples",
    "convert_lerobot",
]

log = logging.getLogger(__name__)

STATS_NAME = "action_stats.json"
_EPS = 1e-6


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading LeRobot parquet files needs pyarrow: pip install pyarrow "
                          "(or pip install -e '.[lerobot]')") from None
    return pq


class EpisodeError(ConvertError):
    """One episode that cannot become samples (``reason``): skipped and counted in the report, the others go on."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ------------------------------------------------------------------------------------ metadata


@dataclass
class Episode:
    """One episode: where its rows and video frames are (paths relative to the dataset root)."""

    index: int
    length: int | None
    tasks: list[str]
    data_file: str
    video_file: str | None
    video_from_s: float = 0.0        # v3: start of the episode in the (shared) video file
    video_to_s: float | None = None  # v3: end (exclusive)


@dataclass
class LeRobotMeta:
    """What ``meta/`` says about a dataset, restricted to the episodes whose files exist."""

    root: str
    version: str
    fps: float
    robot_type: str
    info: dict
    tasks: dict[int, str]
    episodes: list[Episode]
    missing: list[int]
    video_key: str | None
    video_keys: list[str]
    missing_detail: str = ""   # the first listed episode's expected path that is missing, and what is there


_TEMPLATE_FIELDS = {"v2": {"episode_chunk", "episode_index", "video_key"}, "v3": {"chunk_index", "file_index", "video_key"}}


def _format_path(template: Any, fields: dict, allowed: set[str], what: str) -> str:
    """Fill an info.json path template, allowing only plain ``{name[:spec]}`` fields from ``allowed``."""
    if not isinstance(template, str) or not template:
        raise ConvertError(f"meta/info.json: {what} must be a non-empty string, got {template!r:.80}")
    try:
        for _, name, _, _ in string.Formatter().parse(template):
            if name is not None and name not in allowed:
                raise ConvertError(f"meta/info.json: {what} {template!r} uses field {{{name}}}; allowed: {sorted(allowed)}")
        return template.format(**fields)
    except (ValueError, KeyError, IndexError) as e:
        raise ConvertError(f"meta/info.json: {what} {template!r} cannot be filled: {e}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertUsageError(f"{path} does not exist (is this a LeRobot dataset root?)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: invalid JSON: {e}") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-empty line of ``path``; a line that is not a JSON object is a ConvertError."""
    out = []
    if not path.is_file():
        raise ConvertError(f"{path} does not exist (is this a LeRobot v2 dataset root?)")
    with open(path, encoding="utf-8", errors="replace") as f:
        for ln, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ConvertError(f"{path}: line {ln}: invalid JSON: {e}") from None
                if not isinstance(obj, dict):
                    raise ConvertError(f"{path}: line {ln}: expected an object")
                out.append((ln, obj))
    return out


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ConvertError(f"{what}: expected an integer, got {v!r:.60}")
    return int(v)


def _length(v: Any, what: str) -> int | None:
    """An episode's metadata ``length``: an integer >= 0, or None when absent."""
    if v is None:
        return None
    n = _int(v, what)
    if n < 0:
        raise ConvertError(f"{what}: expected an integer >= 0, got {n}")
    return n


def _tasks_list(v: Any, what: str) -> list[str]:
    """An episode's metadata ``tasks``: a list of strings (absent or null: none). A string is refused, not split
    into its characters."""
    if v is None:
        return []
    if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) for t in v):
        raise ConvertError(f"{what}: expected a list of strings, got {v!r:.80}")
    return list(v)


def _parquet(path: Path, what: str, read: str = "table", **kw: Any) -> Any:
    """``pq.read_table`` / ``pq.read_schema`` of ``path``; an unreadable file is a ConvertError naming it."""
    pq = _pq()
    try:
        return pq.read_schema(path) if read == "schema" else pq.read_table(path, **kw)
    except (OSError, ValueError, TypeError) as e:   # pyarrow's ArrowInvalid / ArrowIOError derive from these
        raise ConvertError(f"{what} ({path}): cannot read the parquet file: {type(e).__name__}: {e}") from None


def _exists(root: Path, rel: str, where: str) -> bool:
    try:
        resolve_under(root, rel, where)
        return True
    except BadItem as e:
        if e.reason == "missing_media":
            return False
        raise ConvertError(str(e)) from None


def _tasks_v3(root: Path) -> dict[int, str]:
    p = root / "meta" / "tasks.parquet"
    if not p.is_file():
        raise ConvertError(f"{p} does not exist (v3.0 datasets keep their tasks there)")
    t = _parquet(p, "meta/tasks.parquet")
    names = t.column_names
    task_col = "task" if "task" in names else None
    if task_col is None:  # pandas writes the task strings as the index
        pmeta = t.schema.pandas_metadata or {}
        idx = [c for c in pmeta.get("index_columns", []) if isinstance(c, str)]
        task_col = idx[0] if idx and idx[0] in names else ("__index_level_0__" if "__index_level_0__" in names else None)
    if task_col is None or "task_index" not in names:
        raise ConvertError(f"{p}: expected columns task_index and task (or the task strings as the index), got {names}")
    return {_int(i, f"{p}: task_index"): str(s) for i, s in zip(t.column("task_index").to_pylist(), t.column(task_col).to_pylist())}


def _read_info(root: Path) -> tuple[dict, str, str, float]:
    """``meta/info.json`` checked: (info, codebase_version, major "v2" | "v3", fps)."""
    if not root.is_dir():
        raise ConvertUsageError(f"LeRobot dataset root {root} " + ("is a file, not a directory" if root.exists()
                                                                   else "does not exist"))
    info = _read_json(root / "meta" / "info.json")
    if not isinstance(info, dict):
        raise ConvertError(f"{root / 'meta/info.json'}: expected an object")
    version = str(info.get("codebase_version", ""))
    major = "v3" if version.startswith("v3") else "v2" if version.startswith("v2") else None
    if major is None:
        raise ConvertError(f"{root}: codebase_version {version!r} is not supported (v2.0, v2.1, v3.0)")
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ConvertError(f"{root / 'meta/info.json'}: fps must be a positive number, got {fps!r}")
    return info, version, major, fps


def _pick_video_key(root: Path, info: dict, video_key: str | None) -> tuple[str, list[str]]:
    """(the camera to convert, all video feature keys); ``video_key`` defaults to the first one."""
    feats = info.get("features")
    if not isinstance(feats, dict):
        raise ConvertError(f"{root / 'meta/info.json'}: features must be an object")
    vkeys = [k for k, v in feats.items() if isinstance(v, dict) and v.get("dtype") == "video"]
    if video_key is None:
        if not vkeys:
            raise ConvertError(f"{root}: no video feature in meta/info.json (image-only datasets are not supported)")
        video_key = vkeys[0]
    elif video_key not in vkeys:
        raise ConvertUsageError(f"{root}: video key {video_key!r} is not a video feature (have: {vkeys})")
    return video_key, vkeys


def _episodes_v2(root: Path, info: dict, video_key: str) -> tuple[dict[int, str], list[Episode]]:
    """v2.x: (tasks from ``meta/tasks.jsonl``, episodes from ``meta/episodes.jsonl``), one file per episode."""
    allowed = _TEMPLATE_FIELDS["v2"]
    chunks = _int(info.get("chunks_size", 1000), f"{root / 'meta/info.json'}: chunks_size")
    if chunks < 1:
        raise ConvertError(f"{root / 'meta/info.json'}: chunks_size must be >= 1, got {chunks}")
    tp, ep_path = root / "meta" / "tasks.jsonl", root / "meta" / "episodes.jsonl"
    tasks = {_int(t.get("task_index"), f"{tp}: line {ln}: task_index"): str(t.get("task", ""))
             for ln, t in _read_jsonl(tp)}
    eps = []
    for ln, e in _read_jsonl(ep_path):
        w = f"{ep_path}: line {ln}"
        idx = _int(e.get("episode_index"), f"{w}: episode_index")
        f = {"episode_chunk": idx // chunks, "episode_index": idx, "video_key": video_key}
        eps.append(Episode(idx, _length(e.get("length"), f"{w}: length"), _tasks_list(e.get("tasks"), f"{w}: tasks"),
                           _format_path(info.get("data_path"), f, allowed, "data_path"),
                           _format_path(info.get("video_path"), f, allowed, "video_path")))
    return tasks, eps


def _episode_v3(r: dict, p: Path, info: dict, video_key: str) -> Episode:
    """One row of a v3.0 ``meta/episodes`` parquet ``p`` -> Episode (data / video file and time span)."""
    allowed, vp = _TEMPLATE_FIELDS["v3"], f"videos/{video_key}/"
    idx = _int(r["episode_index"], f"{p}: episode_index")
    fd = {"chunk_index": _int(r["data/chunk_index"], f"{p}: data/chunk_index"),
          "file_index": _int(r["data/file_index"], f"{p}: data/file_index"), "video_key": video_key}
    fv = {"chunk_index": _int(r[vp + "chunk_index"], f"{p}: {vp}chunk_index"),
          "file_index": _int(r[vp + "file_index"], f"{p}: {vp}file_index"), "video_key": video_key}
    return Episode(idx, _length(r["length"], f"{p}: episode {idx}: length"), _tasks_list(r["tasks"], f"{p}: episode {idx}: tasks"),
                   _format_path(info.get("data_path"), fd, allowed, "data_path"),
                   _format_path(info.get("video_path"), fv, allowed, "video_path"),
                   float(r[vp + "from_timestamp"]), float(r[vp + "to_timestamp"]))


def _episodes_v3(root: Path, info: dict, video_key: str) -> tuple[dict[int, str], list[Episode]]:
    """v3.0: (tasks from ``meta/tasks.parquet``, episodes from ``meta/episodes/chunk-*/file-*.parquet``)."""
    tasks = _tasks_v3(root)
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise ConvertError(f"{root}: no meta/episodes/chunk-*/file-*.parquet (v3.0 episode metadata)")
    vp = f"videos/{video_key}/"
    want = ["episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
            vp + "chunk_index", vp + "file_index", vp + "from_timestamp", vp + "to_timestamp"]
    eps = []
    for p in files:
        names = _parquet(p, "episode metadata", "schema").names
        missing = [c for c in want if c not in names]
        if missing:
            raise ConvertError(f"{p}: missing columns {missing}")
        eps += [_episode_v3(r, p, info, video_key) for r in _parquet(p, "episode metadata", columns=want).to_pylist()]
    return tasks, eps


def _select_episodes(root: Path, eps: list[Episode], episodes: list[int] | None) -> list[Episode]:
    """Refuse duplicate episode indices; keep the requested ``episodes`` (all when None), which must be listed."""
    if len({e.index for e in eps}) != len(eps):
        raise ConvertError(f"{root}: an episode index is listed twice in the episode metadata")
    if episodes is not None:
        known = {e.index for e in eps}
        unknown = sorted(set(episodes) - known)
        if unknown:
            raise ConvertUsageError(f"{root}: episodes {unknown[:10]} are not in the episode metadata")
        eps = [e for e in eps if e.index in set(episodes)]
    return eps


def _split_present(root: Path, eps: list[Episode]) -> tuple[list[Episode], list[int]]:
    """(episodes whose data and video files exist, indices of the others), by episode index."""
    present, missing = [], []
    for e in sorted(eps, key=lambda e: e.index):
        w = f"episode {e.index}"
        if _exists(root, e.data_file, w) and _exists(root, e.video_file, w):
            present.append(e)
        else:
            missing.append(e.index)
    return present, missing


_KINDS = (("data_file", "data_path", "--data-path"), ("video_file", "video_path", "--video-path"))


def _relocations(root: Path, rel: str) -> list[tuple[str, Any]]:
    """Plausible other places of ``rel``: one folder name differing only in plurality (``video/`` for
    ``videos/``), or the same relative path under another top folder of ``root``. [(what, rel -> rel')]."""
    parts = rel.split("/")
    out = []
    for i, c in enumerate(parts[:-1]):
        if c in ("", ".", ".."):
            continue
        alt = c[:-1] if c.endswith("s") and len(c) > 1 else c + "s"

        def swap(r: str, i: int = i, c: str = c, alt: str = alt) -> str:
            q = r.split("/")
            return "/".join(q[:i] + [alt] + q[i + 1:]) if len(q) > i and q[i] == c else r
        out.append((f"folder {alt!r} instead of {c!r}", swap))
    try:
        tops = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError:
        tops = []
    for d in tops:
        if d not in (parts[0], "meta"):
            out.append((f"the same path under {d + '/'!r}", lambda r, d=d: f"{d}/{r}"))
    return out


def _relocate(root: Path, eps: list[Episode]) -> list[Episode]:
    """No listed episode has its files where info.json's templates say: look where they plausibly are (per kind,
    judged on the first episode, applied to all), with a warning naming the template and the fix."""
    first = eps[0]
    for attr, template, flag in _KINDS:
        rel = getattr(first, attr)
        if rel is None or _exists(root, rel, f"episode {first.index}"):
            continue
        for what, fn in _relocations(root, rel):
            if _exists(root, fn(rel), f"episode {first.index}"):
                log.warning("%s: meta/info.json's %s gives %s for episode %d, which does not exist; found %s (%s) and "
                            "use it for every episode; pass %s TEMPLATE to say where the files are", root, template,
                            rel, first.index, fn(rel), what, flag)
                eps = [replace(e, **{attr: fn(getattr(e, attr))}) for e in eps]
                break
    return eps


def _what_is_there(root: Path, rel: str) -> str:
    """The nearest existing folder on the way to ``rel`` and (up to 12 of) its entries."""
    parts = rel.split("/")[:-1]
    d, shown = root, "the dataset root"
    for c in parts:
        if not (d / c).is_dir():
            break
        d, shown = d / c, f"{(d / c).relative_to(root)}/"
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in d.iterdir())
    except OSError:
        names = []
    return f"{shown} holds {names[:12]}{' ...' if len(names) > 12 else ''}"


def _missing_detail(root: Path, eps: list[Episode]) -> str:
    """The first missing expected path of the first listed episode, what is there instead and the fix."""
    if not eps:
        return ""
    e = eps[0]
    for attr, template, flag in _KINDS:
        rel = getattr(e, attr)
        if rel is not None and not _exists(root, rel, f"episode {e.index}"):
            return (f"episode {e.index}: expected {rel} (meta/info.json {template}), not found; {_what_is_there(root, rel)}; "
                    f"pass {flag} TEMPLATE (fields as in info.json, e.g. {{episode_chunk:03d}}, {{episode_index:06d}}"
                    f"{', {video_key}' if attr == 'video_file' else ''}) if the files sit elsewhere")
    return ""


def read_lerobot(root: str | os.PathLike, video_key: str | None = None, episodes: list[int] | None = None, *,
                 video_path: str | None = None, data_path: str | None = None) -> LeRobotMeta:
    """Parse a LeRobot dataset's metadata; keeps the episodes (of ``episodes``, default all)
    whose data (and video) files exist. ``video_key`` defaults to the first video feature.
    ``video_path`` / ``data_path`` replace info.json's path templates (same fields). When no listed episode has
    its files where the templates say, plausible other places are tried (``_relocate``, with a warning)."""
    root = Path(root)
    info, version, major, fps = _read_info(root)
    overrides = {k: v for k, v in (("video_path", video_path), ("data_path", data_path)) if v is not None}
    if overrides:
        log.info("%s: path templates from the command line instead of meta/info.json: %s", root, overrides)
        info = {**info, **overrides}
    video_key, vkeys = _pick_video_key(root, info, video_key)
    tasks, eps = (_episodes_v2 if major == "v2" else _episodes_v3)(root, info, video_key)
    eps = _select_episodes(root, eps, episodes)
    present, missing = _split_present(root, eps)
    detail = ""
    if not present and eps:
        detail = _missing_detail(root, sorted(eps, key=lambda e: e.index))
        present, missing = _split_present(root, _relocate(root, sorted(eps, key=lambda e: e.index)))
    return LeRobotMeta(root=str(root), version=version, fps=float(fps), robot_type=str(info.get("robot_type") or "unknown"),
                       info=info, tasks=tasks, episodes=present, missing=missing, video_key=video_key, video_keys=vkeys,
                       missing_detail=detail)


def _dim_names(info: dict, key: str, d: int) -> list[str]:
    """Per-dimension names of feature ``key`` from info.json (list, nested list or {"motors": [...]})."""
    names = (info.get("features", {}).get(key) or {}).get("names")
    cand = names
    if isinstance(cand, dict) and len(cand) == 1:
        cand = next(iter(cand.values()))
    if isinstance(cand, list) and len(cand) == 1 and isinstance(cand[0], list):
        cand = cand[0]
    if isinstance(cand, list) and len(cand) == d and all(isinstance(n, str) and n for n in cand) and len(set(cand)) == d:
        return [n[:64] for n in cand]
    return [f"{key.split('.')[-1]}_{i}" for i in range(d)]


# ------------------------------------------------------------------------------------ episode data


def _col2d(table, name: str, where: str) -> np.ndarray:
    """A list / fixed-size-list (or scalar) numeric column -> float32 [N, D]."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(name).combine_chunks()
    n = len(col)
    if col.null_count:
        raise ConvertError(f"{where}: column {name!r} has {col.null_count} null values")
    t = col.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        lens = pc.list_value_length(col).to_numpy(zero_copy_only=False) if n else np.zeros(0, np.int64)
        if n and (lens.min() != lens.max() or lens[0] == 0):
            raise ConvertError(f"{where}: column {name!r} has rows of different lengths ({lens.min()}..{lens.max()})")
        flat = col.flatten().to_numpy(zero_copy_only=False)
        out = flat.reshape(n, int(lens[0]) if n else 0)
    else:
        out = col.to_numpy(zero_copy_only=False).reshape(n, 1)
    out = out.astype(np.float32)
    if not np.isfinite(out).all():
        rows = np.flatnonzero(~np.isfinite(out).all(axis=1))
        raise EpisodeError("nonfinite_values", f"{where}: column {name!r} has non-finite values (NaN / inf) in "
                                               f"{len(rows)} rows, e.g. {rows[:5].tolist()}; pass --skip-nonfinite "
                                               "(skip_nonfinite=True) to skip and count such episodes")
    return out


_ACTION_WORDS = ("action", "joint", "command", "cmd", "target", "state", "qpos", "position", "effort")


def _column_hint(schema, missing: str) -> str:
    """Columns that may hold what ``missing`` names: names with action / joint / command / state ... in them and
    float list columns (the LeRobot layout of per-frame vectors), those sharing a word with it first."""
    import pyarrow as pa

    def float_list(t) -> bool:
        return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and \
            pa.types.is_floating(t.value_type)

    own = [w for w in re.split(r"[._\W]+", missing.lower()) if len(w) > 2]

    def rank(name: str) -> int:   # like the name asked for, then action-ish names, then other float vectors
        low = name.lower()
        return 0 if any(w in low for w in own) else 1 if any(w in low for w in _ACTION_WORDS) else 2

    cands = [f.name for f in schema if any(w in f.name.lower() for w in _ACTION_WORDS) or float_list(f.type)]
    return ", ".join(repr(c) for c in sorted(cands, key=rank)) or "none"


_TABLE_CACHE: dict[str, Any] = {}


def _data_file_table(path: Path, columns: list[str], what: str) -> Any:
    """Columns ``columns`` of the parquet file ``path``; the last file read is cached, since a v3 file holds many
    consecutive episodes (reading it whole once per episode made the reading quadratic in episodes per file)."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size, tuple(columns))   # a file rewritten in place is read again
    if _TABLE_CACHE.get("key") != key:
        _TABLE_CACHE.clear()
        _TABLE_CACHE.update(key=key, table=_parquet(path, what, columns=columns))
    return _TABLE_CACHE["table"]


def _clear_caches() -> None:
    """Drop the cached video file and parquet table (end of a pass over the episodes)."""
    _VIDEO_CACHE.clear()
    _TABLE_CACHE.clear()


def read_episode_table(meta: LeRobotMeta, ep: Episode, action_key: str, state_key: str | None) -> dict[str, np.ndarray]:
    """The episode's rows sorted by time: ``timestamp`` float64 [N], ``action`` [N, D],
    ``state`` [N, S] (if ``state_key``), ``task_index`` int64 [N] (if present), ``frame_index``."""
    path = resolve_under(meta.root, ep.data_file, f"episode {ep.index}")
    where = f"episode {ep.index} ({ep.data_file})"
    schema = _parquet(path, f"episode {ep.index}", "schema")
    names = schema.names
    want = [c for c in ("timestamp", "frame_index", "episode_index", "task_index", action_key, state_key) if c and c in names]
    if "timestamp" not in names:
        raise ConvertError(f"{where}: no column 'timestamp' (columns: {names})")
    for c, flag, extra in ((action_key, "--action-key", ""), (state_key, "--state-key", " (or 'none' to leave out "
                                                                                        "state.npy)")):
        if c and c not in names:
            raise ConvertUsageError(f"{where}: no column {c!r}; pass {flag} NAME{extra}: columns that look like per-frame "
                               f"vectors: {_column_hint(schema, c)} (all columns: {names})")
    filters = [("episode_index", "=", ep.index)] if meta.version.startswith("v3") or "episode_index" in names else None
    if filters and "episode_index" not in names:
        raise ConvertError(f"{where}: v3 data files need an episode_index column")
    t = _data_file_table(path, want, f"episode {ep.index}")
    if filters:
        import pyarrow.compute as pc

        t = t.filter(pc.equal(t.column("episode_index"), ep.index))
    if t.num_rows == 0:
        raise EpisodeError("empty_episode", f"{where}: no rows for this episode")
    ts = t.column("timestamp").to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.argsort(ts, kind="stable")
    if not np.isfinite(ts).all() or np.any(np.diff(ts[order]) <= 0):
        k = int(np.argmax(np.diff(ts[order]) <= 0)) if len(ts) > 1 else 0
        raise EpisodeError("bad_timestamps", f"{where}: timestamps are not finite and strictly increasing "
                                             f"(duplicate times? e.g. {ts[order][k:k + 2].tolist()})")
    out = {"timestamp": ts[order], "action": _col2d(t, action_key, where)[order]}
    if state_key:
        out["state"] = _col2d(t, state_key, where)[order]
    for c in ("task_index", "frame_index"):
        if c in t.column_names:
            out[c] = t.column(c).to_numpy(zero_copy_only=False).astype(np.int64)[order]
    return out


_VIDEO_CACHE: dict[str, Any] = {}

#: frames decoded from a source video in one call (a bounded chunk of the episode's clips, resized before the next)
DECODE_CHUNK_FRAMES = 128


def source_video_limits() -> Any:
    """Limits for a LeRobot source video: a whole episode (v2) or many (v3), so far larger than the training limits
    of one sample (``VideoLimits()``: 768 frames decoded, 200,000 in the file); decoding is done in chunks of
    ``DECODE_CHUNK_FRAMES``."""
    from rynnscale.data.video import VideoLimits

    return VideoLimits(max_bytes=1 << 34, max_total_frames=5_000_000, max_frames=DECODE_CHUNK_FRAMES)


def _video(meta: LeRobotMeta, ep: Episode, limits) -> tuple[bytes, Any]:
    """(bytes, VideoInfo) of the episode's video file; the last file is cached (v3 files hold many episodes).
    A file that cannot be indexed is an EpisodeError with the video's reason (the episode is skipped)."""
    from rynnscale.data.video import VideoError, probe_video

    path = str(resolve_under(meta.root, ep.video_file, f"episode {ep.index}"))
    if _VIDEO_CACHE.get("path") != path:
        _VIDEO_CACHE.clear()
        data = Path(path).read_bytes()
        try:
            info = probe_video(data, limits)
        except VideoError as e:
            raise EpisodeError(e.reason, f"episode {ep.index}: video {ep.video_file}: {e}") from None
        _VIDEO_CACHE.update(path=path, data=data, info=info)
    return _VIDEO_CACHE["data"], _VIDEO_CACHE["info"]


def episode_video_frames(info: Any, ep: Episode, src_fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the video file [F], their times on the episode clock [F] in seconds).

    Times are the file's absolute clock (``pts * time_base``, as LeRobot reads them), not times since the first
    frame: a video missing its first frame must not shift every frame onto the row before its own.
    v2: every frame of the file; v3: the frames whose times fall in [from, to) of the episode
    (half a source frame of slack at both ends). Times are rounded to whole nanoseconds."""
    if info.pts.size != info.total_frames:
        raise EpisodeError("undecodable_video", f"episode {ep.index}: video {ep.video_file} has frames without timestamps")
    t = info.pts_s(np.arange(info.total_frames))
    half = 0.5 / src_fps
    if ep.video_to_s is None:
        idx = np.arange(info.total_frames)
    else:
        idx = np.nonzero((t >= ep.video_from_s - half) & (t < ep.video_to_s - half))[0]
    return idx, np.round(t[idx] - ep.video_from_s, 9)  # nanosecond grid: v2 and v3 files give the same times


def plan_clips(duration_s: float, t0: float, clip_s: float, stride_s: float, fps: float) -> list[np.ndarray]:
    """Wanted sample times of each clip (episode clock): clips start at t0, t0 + stride, ...
    while a whole clip fits before ``t0 + duration_s``; an episode shorter than one clip gives one
    clip of what it has."""
    n = max(1, math.floor(clip_s * fps + _EPS))
    starts = []
    k = 0
    while t0 + k * stride_s + clip_s <= t0 + duration_s + _EPS:
        starts.append(t0 + k * stride_s)
        k += 1
    if not starts:
        n = max(1, math.floor(duration_s * fps + _EPS))
        starts = [t0]
    return [s + np.arange(n) / fps for s in starts]


def _nearest(sorted_vals: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the nearest value in ``sorted_vals`` for each ``x`` (ties go to the earlier one)."""
    x = np.asarray(x, np.float64)
    if len(sorted_vals) == 1:
        return np.zeros(len(x), np.int64)
    j = np.clip(np.searchsorted(sorted_vals, x), 1, len(sorted_vals) - 1)
    return np.where(x - sorted_vals[j - 1] <= sorted_vals[j] - x, j - 1, j).astype(np.int64)


# ------------------------------------------------------------------------------------ action text


def compute_action_stats(actions: list[np.ndarray], dims: list[str], units: str | list[str], key: str,
                         num_bins: int = 0, binning: str = "quantile") -> dict:
    """Per-dimension statistics over all rows (``actions`` is a list of [N_e, D] arrays) and, with
    ``num_bins``, the bin edges [D][num_bins + 1]. The dict is what ``action_stats.json`` holds."""
    if binning not in ("quantile", "minmax"):
        raise ValueError(f"binning must be 'quantile' or 'minmax', got {binning!r}")
    x = np.concatenate(actions, axis=0).astype(np.float64)
    st = {"format": "rynnscale-action-stats", "version": 1, "key": key, "dims": list(dims), "units": units,
          "count": int(x.shape[0]), "min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
          "std": x.std(0).tolist(), "num_bins": int(num_bins), "binning": binning if num_bins else None, "edges": None}
    if num_bins:
        if num_bins < 2:
            raise ValueError(f"action_bins must be >= 2 (or 0 for none), got {num_bins}")
        if binning == "quantile":
            edges = np.quantile(x, np.linspace(0.0, 1.0, num_bins + 1), axis=0).T
        else:
            edges = np.linspace(x.min(0), x.max(0), num_bins + 1).T
        st["edges"] = np.round(edges, 9).tolist()
    return st


def action_to_bins(actions_td: np.ndarray, stats: dict) -> np.ndarray:
    """Bin index per value, int64 [T, D]: the number of inner edges <= value (clamped to 0..N-1), except that a
    value equal to a repeated edge (quantile edges of a value many rows share, e.g. a closed gripper) goes into the
    zero-width bin [value, value] just below, so that it decodes (``bin_centres``) to itself rather than to the
    middle of the next bin up."""
    edges = np.asarray(stats["edges"], np.float64)
    a = np.asarray(actions_td, np.float64)
    if a.ndim != 2 or a.shape[1] != edges.shape[0]:
        raise ValueError(f"actions must be [T, {edges.shape[0]}], got {a.shape}")
    out = np.empty(a.shape, np.int64)
    for d in range(a.shape[1]):
        e = edges[d]
        b = np.searchsorted(e[1:-1], a[:, d], side="right")
        tied = (b >= 1) & (e[b] == a[:, d]) & (e[np.maximum(b - 1, 0)] == a[:, d])
        out[:, d] = np.where(tied, b - 1, b)
    return out


def bin_centres(bins_td: np.ndarray, stats: dict) -> np.ndarray:
    """Mid-points of the bins, float64 [T, D] (the value a bin token decodes to)."""
    edges = np.asarray(stats["edges"], np.float64)
    b = np.asarray(bins_td, np.int64)
    d = np.arange(b.shape[1])[None, :]
    return (edges[d, b] + edges[d, b + 1]) / 2


def format_action_bins(bins_td: np.ndarray, num_bins: int) -> str:
    """``<frame i> 017 250 003 ...`` lines (zero-padded to the width of ``num_bins - 1``)."""
    w = len(str(num_bins - 1))
    return "\n".join(f"<frame {i}> " + " ".join(f"{int(v):0{w}d}" for v in row) for i, row in enumerate(bins_td))


_BIN_LINE_RE = re.compile(r"<frame (\d+)>((?: \d+)+)")


def parse_action_bins(text: str, stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of the answer's "Action bins" block: (bins int64 [T, D], bin centres float64 [T, D])."""
    rows, frames = [], []
    d, n = len(stats["dims"]), int(stats["num_bins"])
    for m in _BIN_LINE_RE.finditer(text):
        vals = [int(v) for v in m.group(2).split()]
        if len(vals) != d or max(vals) >= n:
            raise ValueError(f"action bin line {m.group(0)[:80]!r}: need {d} values in 0..{n - 1}")
        frames.append(int(m.group(1)))
        rows.append(vals)
    if not rows:
        raise ValueError("no '<frame i> b b b ...' action bin lines in the text")
    if frames != list(range(len(frames))):
        raise ValueError(f"action bin lines must be frames 0..T-1 in order, got {frames[:10]}")
    b = np.asarray(rows, np.int64)
    return b, bin_centres(b, stats)


def _unit(units: str | list[str], d: int) -> str:
    u = units if isinstance(units, str) else units[d]
    return "" if u == "unknown" else f" {u}"


def describe_actions(actions_td: np.ndarray, dims: list[str], units: str | list[str], fps: float, std: np.ndarray,
                     show: list[int], decimals: int = 2, top_k: int = 3) -> str:
    """The assistant's text: the dims that change most over the clip (|end - start| in dataset
    std units) and the per-step values of the ``show`` dims."""
    a = np.asarray(actions_td, np.float64)
    T = a.shape[0]
    delta = a[-1] - a[0]
    score = np.where(std > 0, np.abs(delta) / np.where(std > 0, std, 1.0), 0.0)
    order = [int(i) for i in np.argsort(-score, kind="stable")[:top_k] if score[i] >= 0.05]
    dur = f"{T / fps:.1f} s"
    if order:
        parts = [f"{dims[i]} {delta[i]:+.{decimals}f}{_unit(units, i)}" for i in order]
        said = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f" and {parts[-1]}"
        text = f"Over {dur} the largest action changes are {said}." if len(parts) > 1 else f"Over {dur} the largest action change is {said}."
    else:
        text = f"Over {dur} the action stays nearly constant."
    if show:
        steps = " ".join(f"<frame {t}> (" + ", ".join(f"{a[t, i]:.{decimals}f}" for i in show) + ")" for t in range(T))
        text += f"\nPer step ({', '.join(dims[i] for i in show)}): {steps}"
    return text


# ------------------------------------------------------------------------------------ samples


@dataclass
class LeRobotConfig:
    """Settings of a LeRobot conversion (stored in the manifest ``info``; picklable for workers)."""

    clip_seconds: float = 4.0
    stride_seconds: float | None = None   # default: clip_seconds (no overlap)
    fps: float = 2.0                      # frames sampled per second (use the training fps)
    video_key: str | None = None          # default: the first video feature
    video_path: str | None = None         # default: meta/info.json's video_path template
    data_path: str | None = None          # default: meta/info.json's data_path template
    media: str = "video"                  # "video": re-encode (H.264); "frames": f000.jpg ...
    codec: str = "auto"
    jpeg_quality: int = 95
    max_side: int | None = None           # downscale so the longer side is at most this (even sizes)
    tolerance_s: float | None = None      # frame <-> row pairing tolerance; default half a source frame
    skip_nonfinite: bool = False          # skip (and count) episodes with NaN / inf actions or states
    action_key: str = "action"
    state_key: str | None = "observation.state"
    action_space: str | None = None       # default: the feature key
    action_units: str | None = None       # default: info.json's "units"/"unit" of the feature, else "unknown"
    action_bins: int = 0                  # 0 = no discretised action tokens
    binning: str = "quantile"
    answer_dims: list[str] | None = None  # per-step dims in the answer; default: answer_top_k by std
    answer_top_k: int = 4
    decimals: int = 2
    question: str = "{task}"
    source: str | None = None             # default: "lerobot/<dataset folder name>"
    licence: str | None = None            # default: detected (info.json, README front matter, LICENSE)
    cost_hints: bool = True
    tokenizer: str | None = None
    encoder_cfg: Any = None
    recipe: Any = None                  # a loaded training recipe: the hints are its encoder's (shard_stats.hint_recipe)

    def validate(self) -> None:
        for k in ("clip_seconds", "fps"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{k} must be a positive number, got {v!r}")
        if self.stride_seconds is not None and not self.stride_seconds > 0:
            raise ValueError(f"stride_seconds must be > 0, got {self.stride_seconds}")
        if self.media not in ("video", "frames"):
            raise ValueError(f"media must be 'video' or 'frames', got {self.media!r}")
        if self.action_bins and self.action_bins < 2:
            raise ValueError(f"action_bins must be 0 (off) or >= 2, got {self.action_bins}")
        if self.binning not in ("quantile", "minmax"):
            raise ValueError(f"binning must be 'quantile' or 'minmax', got {self.binning!r}")
        if self.tolerance_s is not None and not self.tolerance_s >= 0:
            raise ValueError(f"tolerance_s must be >= 0, got {self.tolerance_s}")
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be >= 16, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        # found at the first clip these stopped the run only after every episode had been read and indexed
        fill_question(self.question, task="t", fps=1.0, duration_s=1.0, num_frames=1, robot="r")
        if self.media == "video":
            from rynnscale.data_pipelines.synthetic import pick_video_codec

            pick_video_codec(self.codec)


def fill_question(template: str, *, task: str, fps: float, duration_s: float, num_frames: int, robot: str) -> str:
    """The user's text of a clip: ``template`` (``--question``) with its placeholders filled; a ValueError naming
    the template and the placeholders there are."""
    values = {"task": task, "fps": fps, "duration_s": duration_s, "num_frames": num_frames, "robot": robot}
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ValueError(f"question template {template!r}: {type(e).__name__}: {e} (placeholders: "
                         f"{sorted(values)})") from None


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _resize(frames_thwc: np.ndarray, max_side: int | None, even: bool = False) -> np.ndarray:
    """Downscale so the longer side is at most ``max_side`` (even sizes); ``even`` (H.264 output: yuv420p needs even
    sizes) also crops the last row / column of an odd-sized frame that is not downscaled."""
    T, H, W, _ = frames_thwc.shape
    if max_side is None or max(H, W) <= max_side:
        if even and (H % 2 or W % 2) and H > 1 and W > 1:
            return np.ascontiguousarray(frames_thwc[:, : H // 2 * 2, : W // 2 * 2])
        return frames_thwc
    from PIL import Image

    s = max_side / max(H, W)
    w, h = max(2, int(round(W * s / 2)) * 2), max(2, int(round(H * s / 2)) * 2)
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in frames_thwc])


def _jpeg(frame_hwc: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame_hwc).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _episode_video(meta: LeRobotMeta, ep: Episode, limits: Any) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(video file bytes, the episode's frame indices ``vidx`` [F] in it, their times ``vt`` [F] on its clock)."""
    data, vinfo = _video(meta, ep, limits)
    vidx, vt = episode_video_frames(vinfo, ep, meta.fps)
    return data, vidx, vt


#: an episode whose frames and rows pair up for less than this share of the shorter of the two is skipped
MIN_MATCHED = 0.5


def match_frames_rows(vt: np.ndarray, ts: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Pair video frames (times ``vt``) with parquet rows (``ts``), both sorted: a frame and a row pair when
    each is the other's nearest and they lie within ``tol`` seconds. -> (frame indices, row indices), increasing;
    frames and rows left out have no partner (a video one frame short of its table, a dropped frame)."""
    if not len(vt) or not len(ts):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    r = _nearest(ts, vt)
    back = _nearest(vt, ts)
    ok = (back[r] == np.arange(len(vt))) & (np.abs(ts[r] - vt) <= tol + _EPS)
    return np.flatnonzero(ok), r[ok]


def _align_clip(tau: np.ndarray, vt: np.ndarray, src_dt: float, where: str) -> np.ndarray:
    """Wanted times ``tau`` [T] -> the nearest paired video frames ``j`` [T] (indices into ``vt``); a wanted time
    with no frame within half a source frame (a gap where frames or rows were dropped) is an EpisodeError."""
    j = _nearest(vt, tau)
    off = np.abs(vt[j] - tau)
    if np.any(off > 0.5 * src_dt + _EPS):
        k = int(np.argmax(off))
        raise EpisodeError("no_frame_near_time", f"{where}: no paired video frame within half a frame of "
                                                 f"t={tau[k]:.4f} s (nearest at {vt[j[k]]:.4f} s)")
    return j


def _pick_clips(meta: LeRobotMeta, cfg: LeRobotConfig, ts: np.ndarray, vt: np.ndarray, where: str
                ) -> list[np.ndarray | EpisodeError]:
    """Plan the episode's clips over its paired frames / rows (``vt[i]`` goes with row ``ts[i]``) and align each:
    per clip the frames ``j`` [T] (row i is frame i's), or the EpisodeError saying why the clip is skipped."""
    src_dt = 1.0 / meta.fps
    stride = cfg.stride_seconds or cfg.clip_seconds
    clips = plan_clips(ts[-1] - ts[0] + src_dt, float(ts[0]), cfg.clip_seconds, stride, cfg.fps)
    out: list[np.ndarray | EpisodeError] = []
    for k, tau in enumerate(clips):
        try:
            out.append(_align_clip(tau, vt, src_dt, f"{where} clip {k}"))
        except EpisodeError as e:
            out.append(e)
    return out


def _clip_frames(data: bytes, vinfo: Any, vidx: np.ndarray, picked: list, limits: Any, ep: Episode, where: str,
                 max_side: int | None, even: bool):
    """Yield (k, frames [T, h, w, 3]) for each good clip ``k`` of ``picked``, in order, resized. Consecutive clips
    are decoded together while the frames they need stay within ``limits.max_frames`` (a longer clip alone), each
    frame once per chunk: memory is one chunk of source frames, whatever the episode's length. Every chunk reuses
    the file's index ``vinfo`` (a v3 file of many episodes is demuxed once, not once per chunk). A decode failure
    is an EpisodeError (the episode is skipped)."""
    from rynnscale.data.video import VideoError, decode_frames

    def decode(group: list[int]):
        need = np.unique(np.concatenate([vidx[picked[k]] for k in group]))
        lim = replace(limits, max_frames=max(limits.max_frames, len(need)))
        try:
            dv = decode_frames(data, indices=need, limits=lim, info=vinfo)
        except VideoError as e:
            raise EpisodeError(e.reason, f"{where}: video {ep.video_file}: {e}") from None
        pos = {int(g): i for i, g in enumerate(need)}
        for k in group:
            yield k, _resize(dv.frames_thwc[[pos[int(g)] for g in vidx[picked[k]]]], max_side, even)

    group: list[int] = []
    frames: set[int] = set()
    for k, j in enumerate(picked):
        if isinstance(j, EpisodeError):
            continue
        new = frames | {int(g) for g in vidx[j]}
        if group and len(new) > limits.max_frames:
            yield from decode(group)
            group, new = [], {int(g) for g in vidx[j]}
        group.append(k)
        frames = new
    if group:
        yield from decode(group)


@dataclass
class _EpisodeClips:
    """What every clip sample of one episode is built from: the dataset, the episode, the settings,
    the parent's ``ctx`` (see ``episode_samples``), and the episode's paired frames and rows: ``rows`` (parquet
    columns, row i belongs to frame i), the frames' indices ``vidx`` [P] into the file and times ``vt`` [P] on the
    episode clock, and where each pair came from (``frame_index`` / ``row_index`` into the episode's frames and
    its rows sorted by time, of ``n_frames`` / ``n_rows``)."""

    meta: LeRobotMeta
    ep: Episode
    cfg: LeRobotConfig
    ctx: dict
    rows: dict[str, np.ndarray]
    vidx: np.ndarray
    vt: np.ndarray
    frame_index: np.ndarray
    row_index: np.ndarray
    n_frames: int
    n_rows: int

    def sample(self, k: int, j: np.ndarray, r: np.ndarray, frames_thwc: np.ndarray, key_prefix: str
               ) -> tuple[str, dict[str, bytes]]:
        """Clip ``k`` (video frames ``j`` [T], rows ``r`` [T], its frames resized) -> (key, members)."""
        cfg, ep = self.cfg, self.ep
        T = frames_thwc.shape[0]
        key = f"{key_prefix}-e{ep.index:06d}-c{k:04d}"
        members, media_ref = self._media(frames_thwc)
        actions_td = self.rows["action"][r]
        task = self._task(int(r[0]))
        t_clip = [i / cfg.fps for i in range(T)]
        question = self._question(task, T)
        answer = self._answer(actions_td)
        meta_json = self._meta_json(k, j, r, task, frames_thwc.shape, t_clip)
        members["action.npy"] = _npy(actions_td.astype(np.float32))
        members["action_ts.npy"] = _npy(np.asarray(t_clip, np.float64))
        if cfg.state_key:
            members["state.npy"] = _npy(self.rows["state"][r].astype(np.float32))
        conv = {"conversation": [
            {"role": "user", "content": [{"type": "video", "video": media_ref}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]}
        where = f"episode {ep.index} clip {k}"
        return key, build_sample_members(meta_json, conv, members, where=where,
                                         meta_where=f"{where}: meta.json", conv_where=f"{where}: conv.json")

    def _media(self, frames_thwc: np.ndarray) -> tuple[dict[str, bytes], Any]:
        """The clip's frames [T, H, W, 3] as ``video.mp4`` (re-encoded at ``fps``) or ``f000.jpg``...;
        -> (members, what conv.json's video item names)."""
        from rynnscale.data_pipelines.synthetic import encode_video_frames

        cfg = self.cfg
        if cfg.media == "video":
            vid, vname = encode_video_frames(frames_thwc, cfg.fps, cfg.codec)
            return {vname: vid}, vname
        names = [f"f{i:03d}.jpg" for i in range(frames_thwc.shape[0])]
        return {name: _jpeg(frames_thwc[i], cfg.jpeg_quality) for i, name in enumerate(names)}, names

    def _task(self, r0: int) -> str:
        """The task of the clip's first row (``task_index``), else the episode's first task, else ""."""
        rows, ep = self.rows, self.ep
        task = self.meta.tasks.get(int(rows["task_index"][r0])) if "task_index" in rows else None
        return task or (ep.tasks[0] if ep.tasks else "")

    def _question(self, task: str, T: int) -> str:
        """The user's text: the ``question`` template filled with the clip's task, fps, duration, ..."""
        cfg = self.cfg
        return fill_question(cfg.question, task=task, fps=cfg.fps, duration_s=round(T / cfg.fps, 3), num_frames=T,
                             robot=self.meta.robot_type)

    def _answer(self, actions_td: np.ndarray) -> str:
        """The assistant's text for the clip's actions [T, D], with the action-bin block when asked for."""
        cfg, ctx = self.cfg, self.ctx
        stats = ctx["stats"]
        std = np.asarray(stats["std"], np.float64)
        answer = describe_actions(actions_td, ctx["dims"], ctx["units"], cfg.fps, std, ctx["show"], cfg.decimals)
        if cfg.action_bins:
            answer += "\nAction bins:\n" + format_action_bins(action_to_bins(actions_td, stats), cfg.action_bins)
        return answer

    def _meta_json(self, k: int, j: np.ndarray, r: np.ndarray, task: str, shape_thwc: tuple, t_clip: list[float]) -> dict:
        """meta.json of clip ``k``: provenance, the sampled frames' indices and clip-clock times, the
        action (and state) description; source times and rows go under ``extra``."""
        meta, ep, cfg, ctx, vt = self.meta, self.ep, self.cfg, self.ctx, self.vt
        T, H, W, _ = shape_thwc
        ts = self.rows["timestamp"]
        meta_json = {
            "source": ctx["source"],
            "licence": ctx["licence"],
            "task": task,
            "embodiment": meta.robot_type,
            "episode": ep.index,
            "clip_start_s": float(vt[j[0]]),
            "video": {"fps": float(cfg.fps), "num_frames": T, "width": int(W), "height": int(H),
                      "frame_indices": [int(x) for x in self.frame_index[j]], "timestamps": t_clip},
            "action": {"space": cfg.action_space or cfg.action_key, "units": ctx["units"], "dims": ctx["dims"]},
            "extra": {
                "lerobot_version": meta.version, "video_key": meta.video_key, "clip_index": k, "source_fps": meta.fps,
                "source_timestamps": [round(float(x), 6) for x in vt[j]],
                "rows": [int(x) for x in self.row_index[r]], "row_timestamps": [round(float(x), 6) for x in ts[r]],
                "episode_rows": self.n_rows, "episode_video_frames": self.n_frames, "tasks": ep.tasks,
            },
        }
        if cfg.state_key:
            meta_json["state"] = {"space": cfg.state_key, "units": ctx["state_units"], "dims": ctx["state_dims"]}
        return meta_json


def episode_samples(meta: LeRobotMeta, ep: Episode, cfg: LeRobotConfig, ctx: dict, key_prefix: str = "lerobot"
                    ) -> tuple[list[tuple[str, dict[str, bytes]]], dict]:
    """All clip samples of one episode: ([(key, members)], episode report).

    Video frames and parquet rows are paired by time (``match_frames_rows``, within ``tolerance_s``); unpaired
    ones are left out and counted (``frames_unpaired`` / ``rows_unpaired``), a clip with a wanted time in a gap
    is skipped and counted, an episode pairing less than ``MIN_MATCHED`` of its frames or rows is an
    EpisodeError (``frames_rows_misaligned``). ``ctx`` holds what the parent computed once: ``stats`` (action
    statistics), ``dims`` / ``state_dims``, ``units``, ``show`` (per-step answer dims), ``source``, ``licence``."""
    where = f"episode {ep.index}"
    rows = read_episode_table(meta, ep, cfg.action_key, cfg.state_key)
    limits = source_video_limits()
    data, vidx, vt, fi, ri, rep = _pair_episode(meta, ep, cfg, rows, limits)
    N = rep["rows"]
    rows = {k: v[ri] for k, v in rows.items()}
    vidx, vt = vidx[fi], vt[fi]
    picked = _pick_clips(meta, cfg, rows["timestamp"], vt, where)
    clips = _EpisodeClips(meta, ep, cfg, ctx, rows, vidx, vt, fi, ri, rep["video_frames"], N)
    for k, j in enumerate(picked):
        if isinstance(j, EpisodeError):
            rep["skipped"].append([f"{key_prefix}-e{ep.index:06d}-c{k:04d}", j.reason, str(j)])
    vinfo = _video(meta, ep, limits)[1]   # the index _pair_episode made (cached with the file)
    samples = [clips.sample(k, picked[k], picked[k], frames_thwc, key_prefix) for k, frames_thwc in
               _clip_frames(data, vinfo, vidx, picked, limits, ep, where, cfg.max_side, cfg.media == "video")]
    rep.update(clips=len(picked), frames_sampled=sum(len(j) for j in picked if not isinstance(j, EpisodeError)))
    return samples, rep


def _pair_episode(meta: LeRobotMeta, ep: Episode, cfg: LeRobotConfig, rows: dict[str, np.ndarray], limits: Any,
                  quiet: bool = False) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Index the episode's video (no decoding) and pair its frames with its ``rows`` by time:
    (video bytes, frame indices ``vidx`` [F] and times ``vt`` [F], paired frames ``fi`` and rows ``ri``, the episode
    report so far). An EpisodeError when the video cannot be indexed or too few pair (``frames_rows_misaligned``).
    Cheap enough for the parent to run over every episode before the action statistics (``quiet``: no warnings)."""
    where = f"episode {ep.index}"
    N = len(rows["timestamp"])
    data, vidx, vt = _episode_video(meta, ep, limits)
    tol = cfg.tolerance_s if cfg.tolerance_s is not None else 0.5 / meta.fps
    fi, ri = match_frames_rows(vt, rows["timestamp"], tol)
    rep = {"episode": ep.index, "rows": N, "video_frames": int(len(vidx)), "rows_unpaired": N - len(ri),
           "frames_unpaired": int(len(vidx)) - len(fi), "clips": 0, "frames_sampled": 0, "skipped": []}
    if len(fi) < max(1.0, MIN_MATCHED * min(N, len(vidx))):
        raise EpisodeError("frames_rows_misaligned", f"{where}: only {len(fi)} of its {len(vidx)} video frames "
                           f"({ep.video_file}) and {N} parquet rows lie within tolerance_s={tol:.4g} of each other; "
                           "are the timestamps on one clock? (--tolerance-s widens the pairing)")
    if quiet:
        return data, vidx, vt, fi, ri, rep
    if len(fi) < len(vidx) or len(ri) < N:
        log.warning("%s: %d video frames and %d parquet rows have no partner within tolerance_s=%.4g and are left out "
                    "(video %d frames, parquet %d rows)", where, len(vidx) - len(fi), N - len(ri), tol, len(vidx), N)
    if ep.length is not None and ep.length != N:
        log.warning("%s: the episode metadata says length %s but the parquet has %d rows", where, ep.length, N)
    return data, vidx, vt, fi, ri, rep


def _lerobot_job(out_dir: str, prefix: str, index: int, payload: dict) -> tuple:
    """Worker: the episodes of one job -> shard ``index``; returns (ShardInfo|None, [episode reports]). An
    EpisodeError skips its episode (reported) unless it is non-finite values without ``skip_nonfinite``."""
    # the parent ran the same checks before computing the statistics; a skip here is a file changed since
    from rynnscale.data.encode import SampleError
    from rynnscale.data_pipelines.shard_stats import cost_hints

    cfg: LeRobotConfig = payload["cfg"]
    reports = []
    with ShardWriter(out_dir, prefix, max_samples=1 << 62, max_bytes=1 << 62, start_index=index,
                     update_manifest=False) as w:
        for ep in payload["episodes"]:
            try:
                samples, rep = episode_samples(payload["meta"], ep, cfg, payload["ctx"], key_prefix=prefix)
            except EpisodeError as e:
                if e.reason == "nonfinite_values" and not cfg.skip_nonfinite:
                    raise
                log.warning("skipping %s", e)
                reports.append({"episode": ep.index, "rows": 0, "video_frames": 0, "clips": 0, "skipped": [],
                                "skipped_episode": {"reason": e.reason, "detail": str(e)}})
                continue
            for key, members in samples:
                try:
                    costs = cost_hints(key, members, cfg.tokenizer, cfg.encoder_cfg, cfg.recipe) if cfg.cost_hints else None
                except SampleError as e:  # e.g. too_long for the training encoder: training would skip it too
                    rep["skipped"].append([key, e.reason, e.detail])
                    continue
                w.write(key, members, costs=costs)
            reports.append(rep)
    return (w.shards[0] if w.shards else None), reports


def _units_of(info: dict, key: str, override: str | None) -> str | list[str]:
    if override:
        return override
    f = (info.get("features", {}).get(key) or {})
    u = f.get("units", f.get("unit"))
    if isinstance(u, str) and u.strip():
        return u
    if isinstance(u, list) and u and all(isinstance(x, str) and x.strip() for x in u):
        return u
    return "unknown"


def _episode_warnings(root: Path, meta: LeRobotMeta) -> list[str]:
    """Warnings (also logged) about listed episodes without files; no episode with files is an error."""
    warnings = []
    if meta.missing:
        warnings.append(f"{len(meta.missing)} of {len(meta.missing) + len(meta.episodes)} episodes listed in {root}/meta "
                        f"have no data/video files and are skipped: {meta.missing[:20]}{' ...' if len(meta.missing) > 20 else ''}")
        log.warning(warnings[-1])
    if not meta.episodes:
        raise ConvertError(f"{root}: none of the listed episodes has its files"
                           + (f" ({meta.missing_detail})" if meta.missing_detail else ""))
    return warnings


def _licence_and_source(root: Path, meta: LeRobotMeta, cfg: LeRobotConfig, warnings: list[str]) -> tuple[str, str]:
    """(licence: the option, else detected, else "unknown" with a warning; source: the option, else lerobot/<folder>)."""
    licence, found = (cfg.licence, "option") if cfg.licence else detect_licence(root, info=meta.info)
    if found is None:
        warnings.append(f"{root}: no licence in info.json, README front matter or LICENSE; marked 'unknown'")
        log.warning(warnings[-1])
    return licence, cfg.source or f"lerobot/{root.resolve().name}"


def _answer_dims(cfg: LeRobotConfig, dims: list[str], D: int, std: np.ndarray) -> list[int]:
    """Indices of the per-step answer dims: ``answer_dims`` (names or indices), else the
    ``answer_top_k`` dims with the largest dataset std, in dim order."""
    if cfg.answer_dims is None:
        return sorted(int(i) for i in np.argsort(-std, kind="stable")[: cfg.answer_top_k])
    show = []
    for name in cfg.answer_dims:
        if name in dims:
            show.append(dims.index(name))
        elif str(name).isdigit() and int(name) < D:
            show.append(int(name))
        else:
            raise ValueError(f"answer_dims: {name!r} is neither a dim name of {cfg.action_key} ({dims[:6]}...) nor an index < {D}")
    return show


def _usable_tables(root: Path, meta: LeRobotMeta, cfg: LeRobotConfig) -> tuple[list[tuple[int, dict]], list[dict]]:
    """The parquet rows of every episode that will be converted, and the others, skipped and counted:
    ([(episode index, rows)], [{episode, reason, detail}]). Runs the cheap checks of the workers (table, video
    index, frame/row pairing; nothing decoded) first, so that the action statistics cover exactly the converted
    episodes. Non-finite values stop the run (the message says how to skip) unless ``skip_nonfinite``."""
    tables, skipped = [], []
    limits = source_video_limits()
    try:
        for ep in meta.episodes:
            try:
                rows = read_episode_table(meta, ep, cfg.action_key, cfg.state_key)
                _pair_episode(meta, ep, cfg, rows, limits, quiet=True)
                tables.append((ep.index, rows))
            except EpisodeError as e:
                if e.reason == "nonfinite_values" and not cfg.skip_nonfinite:
                    raise
                log.warning("skipping %s", e)
                skipped.append({"episode": ep.index, "reason": e.reason, "detail": str(e)})
    finally:
        _clear_caches()
    if not tables:
        raise ConvertError(f"{root}: every episode was skipped ({skipped[0]['detail'] if skipped else 'none listed'})")
    return tables, skipped


def _same_width(root: Path, tables: list[tuple[int, dict]], col: str, key: str) -> int:
    """The width of column ``col`` (feature ``key``) shared by every episode; else a ConvertError naming the widths
    and (up to 5 of) the episodes of each."""
    widths: dict[int, list[int]] = {}
    for e, t in tables:
        widths.setdefault(int(t[col].shape[1]), []).append(e)
    if len(widths) > 1:
        said = "; ".join(f"{w} in episodes {eps[:5]}{' ...' if len(eps) > 5 else ''}" for w, eps in sorted(widths.items()))
        raise ConvertError(f"{root}: episodes have different {key} widths ({said}); convert the episodes of one width "
                           "at a time (--episodes)")
    return next(iter(widths))


def _dataset_context(root: Path, meta: LeRobotMeta, cfg: LeRobotConfig, licence: str, source: str,
                     tables: list[tuple[int, dict]]) -> dict:
    """The ``ctx`` every episode's samples share: dataset-wide action statistics (bins, answer dims)
    from every row of the converted episodes (``tables``), dim names / units, source and licence."""
    D = _same_width(root, tables, "action", cfg.action_key)
    dims = _dim_names(meta.info, cfg.action_key, D)
    units = _units_of(meta.info, cfg.action_key, cfg.action_units)
    if isinstance(units, list) and len(units) != D:
        raise ConvertError(f"{root}: {cfg.action_key} has {D} dims but {len(units)} units")
    stats = compute_action_stats([t["action"] for _, t in tables], dims, units, cfg.action_key, cfg.action_bins, cfg.binning)
    show = _answer_dims(cfg, dims, D, np.asarray(stats["std"]))
    ctx = {"stats": stats, "dims": dims, "units": units, "show": show, "source": source, "licence": licence}
    if cfg.state_key:
        S = _same_width(root, tables, "state", cfg.state_key)
        ctx["state_dims"] = _dim_names(meta.info, cfg.state_key, S)
        ctx["state_units"] = _units_of(meta.info, cfg.state_key, None)
    return ctx


def _lerobot_info(root: Path, meta: LeRobotMeta, cfg: LeRobotConfig, ctx: dict, stats_json: bytes,
                  episodes_per_shard: int, prefix: str) -> dict:
    """The manifest ``info`` of the run: input, episodes, resolved defaults and every setting (a
    rerun with any of them changed is refused)."""
    return {"converter": "rynnscale.data_pipelines.lerobot", "input": str(root.resolve()), "lerobot_version": meta.version,
            "episodes": [e.index for e in meta.episodes], "episodes_per_shard": episodes_per_shard, "prefix": prefix,
            "source_used": ctx["source"], "licence_used": ctx["licence"], "answer_dims_used": [ctx["dims"][i] for i in ctx["show"]],
            "action_stats_sha256": hashlib.sha256(stats_json).hexdigest(),
            **{k: v for k, v in asdict(cfg).items() if k not in ("tokenizer", "encoder_cfg", "recipe", "cost_hints")
               and not (k in ("video_path", "data_path") and v is None)   # absent unless given: older runs resume
               and not (k == "skip_nonfinite" and not v)},
            "cost_hints": hint_settings(cfg.cost_hints, cfg.tokenizer, cfg.encoder_cfg, cfg.recipe)}


def _episode_jobs(meta: LeRobotMeta, cfg: LeRobotConfig, ctx: dict, episodes_per_shard: int) -> list[ShardJob]:
    """One job (one shard) per ``episodes_per_shard`` consecutive episodes."""
    jobs = []
    for j in range(0, len(meta.episodes), episodes_per_shard):
        chunk = meta.episodes[j:j + episodes_per_shard]
        jobs.append(ShardJob(j // episodes_per_shard, {"cfg": cfg, "meta": meta, "episodes": chunk, "ctx": ctx},
                             weight=len(chunk)))
    return jobs


def _old_episode_reports(out: Path) -> dict[int, dict]:
    """The per-episode reports of an earlier run's ``convert_report.json`` ({} when there is none or it is unreadable)."""
    if not (out / REPORT_NAME).is_file():
        return {}
    try:
        return {int(e["episode"]): e for e in json.loads((out / REPORT_NAME).read_text()).get("episodes", [])}
    except (ValueError, OSError, KeyError, TypeError, AttributeError):
        return {}


def _redo_unreported(out: Path, jobs: list[ShardJob], prefix: str, old: dict[int, dict]) -> None:
    """Delete the finished shards of jobs whose episode reports the earlier report lacks, so they are redone and
    counted (the report is written after every job, so only a crash between a shard and its report loses one)."""
    done = completed_shards(out)
    for jb in jobs:
        name = shard_name(prefix, jb.index)
        if name in done and any(ep.index not in old for ep in jb.payload["episodes"]):
            (out / name).unlink()


def _episode_reports(old: dict[int, dict], landed: dict, jobs: list[ShardJob]) -> list[dict]:
    """Per-episode reports by episode index: this run's (``landed`` job index -> reports), plus (from the old
    report) those of the other jobs' episodes, finished in an earlier run."""
    by_ep = {int(e["episode"]): e for res in landed.values() for e in res}
    for jb in jobs:
        if jb.index not in landed:
            for ep in jb.payload["episodes"]:
                if ep.index in old:
                    by_ep[ep.index] = old[ep.index]
    return [by_ep[k] for k in sorted(by_ep)]


def _lerobot_report(root: Path, meta: LeRobotMeta, licence: str, warnings: list[str], episodes_rep: list[dict],
                    skipped_before: list[dict], final: bool = True) -> dict:
    """``convert_report.json``: totals over the episodes, skipped samples and skipped episodes counted by reason
    (``bad`` / ``bad_episodes``), unpaired frames and rows, the episode reports."""
    bad: dict[str, int] = {}
    for e in episodes_rep:
        for _, reason, _ in e.get("skipped", []):
            bad[reason] = bad.get(reason, 0) + 1
    skipped = skipped_before + [{"episode": e["episode"], **e["skipped_episode"]} for e in episodes_rep
                                if "skipped_episode" in e]
    bad_episodes: dict[str, int] = {}
    for e in skipped:
        bad_episodes[e["reason"]] = bad_episodes.get(e["reason"], 0) + 1
    if skipped:
        warnings = warnings + [f"{len(skipped)} episodes skipped: " + ", ".join(f"{k} {v}" for k, v in
                                                                           sorted(bad_episodes.items()))]
    return {"converter": "lerobot", "input": str(root), "complete": final, "licence": licence, "warnings": warnings,
            "totals": {"episodes": len(meta.episodes) + len(skipped_before), "episodes_missing": len(meta.missing),
                       "episodes_skipped": len(skipped),
                       "rows": sum(e["rows"] for e in episodes_rep), "clips": sum(e["clips"] for e in episodes_rep),
                       "samples": sum(e["clips"] - len(e.get("skipped", [])) for e in episodes_rep),
                       "rows_unpaired": sum(e.get("rows_unpaired", 0) for e in episodes_rep),
                       "frames_unpaired": sum(e.get("frames_unpaired", 0) for e in episodes_rep)},
            "bad": bad, "bad_episodes": bad_episodes, "skipped_episodes": skipped, "episodes": episodes_rep}


@locks_output_dir
def convert_lerobot(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    episodes: list[int] | None = None,
    episodes_per_shard: int = 8,
    workers: int = 1,
    prefix: str = "lerobot",
    progress: bool = True,
    **options: Any,
) -> dict:
    """Convert a LeRobot dataset at ``src`` into clip shards under ``out_dir``; returns the report.

    ``options`` are :class:`LeRobotConfig` fields. Writes ``action_stats.json`` and
    ``convert_report.json`` beside the shards. Restartable; a rerun with other settings, other
    episodes or changed action statistics is refused."""
    cfg = LeRobotConfig(**options)
    cfg.validate()
    if episodes_per_shard < 1:
        raise ValueError(f"episodes_per_shard must be >= 1, got {episodes_per_shard}")
    root = Path(src)
    meta = read_lerobot(root, cfg.video_key, episodes, video_path=cfg.video_path, data_path=cfg.data_path)
    warnings = _episode_warnings(root, meta)
    licence, source = _licence_and_source(root, meta, cfg, warnings)
    tables, skipped_before = _usable_tables(root, meta, cfg)
    gone = {e["episode"] for e in skipped_before}
    meta = replace(meta, episodes=[e for e in meta.episodes if e.index not in gone])
    ctx = _dataset_context(root, meta, cfg, licence, source, tables)
    del tables   # every row of every episode: not to be held while the episodes convert
    stats_json = json.dumps(ctx["stats"], indent=1).encode()
    info = _lerobot_info(root, meta, cfg, ctx, stats_json, episodes_per_shard, prefix)
    out = Path(out_dir)
    jobs = _episode_jobs(meta, cfg, ctx, episodes_per_shard)
    check_dataset_info(out, info)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / STATS_NAME, stats_json)
    old = _old_episode_reports(out)
    _redo_unreported(out, jobs, prefix, old)
    landed: dict[int, list[dict]] = {}

    def report(final: bool) -> dict:
        rep = _lerobot_report(root, meta, licence, warnings, _episode_reports(old, landed, jobs), skipped_before, final)
        atomic_write_bytes(out / REPORT_NAME, json.dumps(rep, indent=1).encode())
        return rep

    def on_result(job: ShardJob, res: list[dict]) -> None:   # after every job: a stopped run leaves its counts
        landed[job.index] = res
        report(False)

    try:
        run_shard_jobs(out, jobs, _lerobot_job, info=info, prefix=prefix, workers=workers, progress=progress,
                       desc=f"lerobot {root.name}", unit="episode", on_result=on_result)
    finally:
        _clear_caches()
    return report(True)
