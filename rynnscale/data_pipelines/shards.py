"""Shard writer and ``manifest.json`` writer: webdataset-compatible, deterministic, atomic, restartable.

A shard is a POSIX (pax/ustar) tar of samples; sample ``key`` is stored as members
``{key}.meta.json``, ``{key}.conv.json``, ``{key}.video.mp4``, ... (meta.json first, conv.json
second, the rest sorted), so ``webdataset.WebDataset`` and plain ``tarfile`` both read it.
Tar headers are fixed (mtime 0, uid/gid 0, empty owner names, mode 0644): the same samples
give byte-identical shards. A shard is written under a hidden temporary name in the same
directory and renamed only when complete, so a final-named shard is never half-written.

``manifest.json`` beside the shards lists every finished shard (name, sample count, byte size,
sha256, optional per-sample cost hints) and is itself replaced atomically. A shard counts as
finished for restarts (``completed_shards``) only when the manifest lists it and its size
matches, so a crash between the shard rename and the manifest update just redoes that shard.
Reading and validating a manifest is ``rynnscale.data.manifest`` (the loader needs it too).
The format is documented in ``docs/data_format.md``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rynnscale.data.manifest import (
    COST_NAME_RE,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    completed_shards,
    manifest_from_json,
    read_manifest,
)
from rynnscale.data.schema import CONV_MEMBER, META_MEMBER, SchemaError, validate_key, validate_member_name
from rynnscale.fsutil import TMP_MARK, atomic_write_bytes, directory_lock, fsync_dir

__all__ = [
    "ConvertError",
    "ConvertUsageError",
    "ShardWriter",
    "shard_name",
    "write_manifest",
    "update_manifest",
    "remove_stale_temp_files",
    "check_dataset_info",
    "ShardJob",
    "run_shard_jobs",
]

log = logging.getLogger(__name__)

TAR_MTIME = 0
TAR_MODE = 0o644
_PREFIX_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_TAR_BLOCK = 512
_TAR_RECORD = 10240  # tarfile pads the archive to a multiple of this


class ConvertError(RuntimeError):
    """A conversion that cannot go on (too many bad inputs, inconsistent source data): ``data convert`` exits 1."""


class ConvertUsageError(ConvertError):
    """A path or option the user gave is wrong (a missing source, an unusable output directory, an episode, camera
    or column the dataset does not have): ``data convert`` exits 2, as ``train`` does for a bad config or path."""


def shard_name(prefix: str, index: int) -> str:
    """Final file name of shard ``index``: ``{prefix}-{index:06d}.tar``."""
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"shard prefix {prefix!r} must be 1-64 characters of letters, digits, '_' or '-' starting with a letter or '_'")
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{prefix}-{index:06d}.tar"



def _dump_manifest(m: Manifest) -> str:
    """JSON text of a manifest: top level indented, one compact line per shard (diff-friendly
    and small even with per-sample cost lists)."""
    obj = m.to_json()
    shards = obj.pop("shards")
    head = json.dumps(obj, indent=1)[:-2]  # drop the closing "\n}"
    lines = [json.dumps(s, separators=(",", ":")) for s in shards]
    body = ",\n  ".join(lines)
    return f'{head},\n "shards": [\n  {body}\n ]\n}}\n' if lines else f'{head},\n "shards": []\n}}\n'



def write_manifest(out_dir: str | os.PathLike, shards: Iterable[ShardInfo], info: Mapping | None = None) -> Path:
    """Write ``out_dir/manifest.json`` atomically (temp file + rename); returns its path."""
    out = Path(out_dir)
    m = Manifest(shards=tuple(sorted(shards, key=lambda s: s.name)), info=dict(info or {}))
    manifest_from_json(json.loads(json.dumps(m.to_json())), where=str(out / MANIFEST_NAME))  # refuse to write a bad one
    return atomic_write_bytes(out / MANIFEST_NAME, _dump_manifest(m).encode())


def update_manifest(out_dir: str | os.PathLike, shards: Iterable[ShardInfo], info: Mapping | None = None) -> Path:
    """Merge ``shards`` into the existing manifest (same name replaces) and rewrite it atomically.

    ``info`` replaces the stored info when given. Not safe against concurrent writers: in a
    multi-process converter only the parent process calls this."""
    out = Path(out_dir)
    old = read_manifest(out) if (out / MANIFEST_NAME).exists() else Manifest(shards=())
    merged = old.by_name()
    for s in shards:
        merged[s.name] = s
    return write_manifest(out, merged.values(), old.info if info is None else info)




def remove_stale_temp_files(out_dir: str | os.PathLike) -> list[str]:
    """Delete temporary shard/manifest files left by a crashed run; returns their names.

    Call it only while no writer is active in ``out_dir`` (e.g. in a converter's parent
    process before it starts workers)."""
    removed = []
    for p in Path(out_dir).glob(f".*{TMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)


# --------------------------------------------------------------------------------------- writer


class _HashingFile:
    """Write-only file wrapper that hashes and counts everything written (for tarfile)."""

    def __init__(self, f):
        self._f = f
        self._h = hashlib.sha256()
        self.num_bytes = 0

    def write(self, b) -> int:
        self._f.write(b)
        self._h.update(b)
        self.num_bytes += len(b)
        return len(b)

    def tell(self) -> int:
        return self.num_bytes

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = TAR_MTIME
    ti.mode = TAR_MODE
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def _sample_tar_bytes(payload: list[tuple[str, bytes]]) -> int:
    """Bytes the members take in the tar: a header block each (plus a pax header and its
    record block for names over 100 bytes) and the data padded to whole blocks."""
    n = 0
    for name, data in payload:
        n += _TAR_BLOCK * (1 if len(name.encode()) <= 100 else 3)
        n += -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK
    return n


def _final_tar_size(content_bytes: int) -> int:
    """Size of the closed archive: content + two zero blocks, padded to a whole record."""
    return -(-(content_bytes + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def _member_order(name: str) -> tuple[int, str]:
    return ({META_MEMBER: 0, CONV_MEMBER: 1}.get(name, 2), name)


class ShardWriter:
    """Write samples into size-capped tar shards ``{prefix}-{index:06d}.tar`` in ``out_dir``.

    A new shard starts when the current one holds ``max_samples`` samples or the next sample
    would push it past ``max_bytes`` (a single larger sample gets a shard of its own).
    With ``update_manifest`` (default) every finished shard is merged into
    ``out_dir/manifest.json`` at once, so a crash loses at most the shard being written; a
    multi-process converter passes ``update_manifest=False`` to its workers and merges
    ``writer.shards`` in the parent. Used as a context manager, an exception inside the
    ``with`` block deletes the unfinished shard (finished ones stay).

    Example::

        with ShardWriter(out, max_samples=1000) as w:
            w.write("ep0001_clip000", {"meta.json": b"...", "conv.json": b"...", "video.mp4": mp4},
                    costs={"num_tokens": 812, "vision_patches": 1024})
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int = 1 << 30,
        *,
        start_index: int = 0,
        update_manifest: bool = True,
        manifest_info: Mapping | None = None,
    ):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        shard_name(prefix, start_index)  # validates prefix and index
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.update_manifest = update_manifest
        self.manifest_info = dict(manifest_info) if manifest_info is not None else None
        self.shards: list[ShardInfo] = []  # finished shards, in order
        self._next_index = start_index
        self._keys: set[str] = set()
        self._closed = False
        self._cur: dict[str, Any] | None = None  # the shard being written

    # -- context manager
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- shard lifecycle
    def _open_shard(self) -> None:
        name = shard_name(self.prefix, self._next_index)
        self._next_index += 1
        tmp = self.out_dir / f".{name}{TMP_MARK}{os.getpid()}"
        f = open(tmp, "wb")
        hf = _HashingFile(f)
        tar = tarfile.open(fileobj=hf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8")
        self._cur = {"name": name, "tmp": tmp, "file": f, "hfile": hf, "tar": tar, "n": 0, "costs": None}

    def _finish_shard(self) -> ShardInfo:
        cur, self._cur = self._cur, None
        try:
            cur["tar"].close()  # writes the end-of-archive blocks, leaves our file open
            cur["file"].flush()
            os.fsync(cur["file"].fileno())
            cur["file"].close()
            os.replace(cur["tmp"], self.out_dir / cur["name"])
        except BaseException:
            cur["file"].close()
            Path(cur["tmp"]).unlink(missing_ok=True)
            raise
        fsync_dir(self.out_dir)
        info = ShardInfo(
            name=cur["name"],
            num_samples=cur["n"],
            num_bytes=cur["hfile"].num_bytes,
            sha256=cur["hfile"].hexdigest(),
            sample_costs=cur["costs"] or {},
        )
        self.shards.append(info)
        if self.update_manifest:
            update_manifest(self.out_dir, [info], self.manifest_info)
        return info

    def write(self, key: str, members: Mapping[str, bytes], costs: Mapping[str, float | int] | None = None) -> str:
        """Add one sample; returns the shard file name it went into.

        ``members`` maps member names (``meta.json``, ``video.mp4``, ...) to bytes; every name
        is checked with the schema before anything is written, so a rejected sample leaves
        the shard untouched. ``costs`` are optional per-sample hints for load balancing; all
        samples of a shard must give the same hint names."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        where = f"sample {key!r}"
        validate_key(key, where=where)
        if key in self._keys:
            raise SchemaError(f"{where}: key written twice (keys must be unique within a writer)")
        if not members:
            raise SchemaError(f"{where}: has no members")
        for m in members:
            validate_member_name(m, where=where)
        payload: list[tuple[str, bytes]] = []
        for m in sorted(members, key=_member_order):
            data = members[m]
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"{where}: member {m!r} must be bytes, got {type(data).__name__}")
            payload.append((f"{key}.{m}", bytes(data)))
        costs = dict(costs or {})
        for cname, v in costs.items():
            if not isinstance(cname, str) or not COST_NAME_RE.fullmatch(cname):
                raise ValueError(f"{where}: cost hint name {cname!r} must be a lowercase identifier")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{where}: cost hint {cname!r} must be a finite number, got {v!r}")

        if self._cur is not None and (
            self._cur["n"] >= self.max_samples
            or _final_tar_size(self._cur["hfile"].num_bytes + _sample_tar_bytes(payload)) > self.max_bytes
        ):
            self._finish_shard()
        if self._cur is None:
            self._open_shard()
        cur = self._cur
        if cur["costs"] is None:
            cur["costs"] = {k: [] for k in sorted(costs)}
        elif set(costs) != set(cur["costs"]):
            raise ValueError(
                f"{where}: cost hints {sorted(costs)} differ from the other samples of shard {cur['name']} "
                f"({sorted(cur['costs'])}); give the same hints for every sample"
            )
        for name, data in payload:
            cur["tar"].addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        for k, v in costs.items():
            cur["costs"][k].append(v)
        cur["n"] += 1
        self._keys.add(key)
        return cur["name"]

    def close(self) -> list[ShardInfo]:
        """Finish the current shard (if any) and return all shards this writer finished."""
        if not self._closed:
            self._closed = True
            if self._cur is not None and self._cur["n"] > 0:
                self._finish_shard()
            elif self._cur is not None:
                self.abort()
        return list(self.shards)

    def abort(self) -> None:
        """Drop the shard being written (its temp file is deleted); finished shards stay."""
        self._closed = True
        cur, self._cur = self._cur, None
        if cur is not None:
            try:
                cur["file"].close()
            finally:
                Path(cur["tmp"]).unlink(missing_ok=True)


# ------------------------------------------------------------------------ converter job runner


def check_dataset_info(out_dir: str | os.PathLike, info: Mapping) -> None:
    """Refuse to resume into ``out_dir`` when its manifest was written with other settings.

    Compares every key of ``info`` with the stored manifest info; raises ValueError listing the
    differences (nothing is changed on disk). No manifest yet, or one listing no shard (a run stopped before its
    first shard, e.g. by a bad option found at the first sample) -> nothing to resume, nothing to check."""
    out = Path(out_dir)
    if not (out / MANIFEST_NAME).exists():
        return
    manifest = read_manifest(out)
    old = manifest.info
    info = json.loads(json.dumps(info))  # compare as stored (tuples -> lists, ...)
    diff = dict(_differing_leaves(old, info))
    if isinstance(old.get("cost_hints"), Mapping) and "tokenizer_sha256" not in old["cost_hints"]:
        # converted before the tokenizer's fingerprint was recorded: resumed by its path (compared), as then
        diff.pop("cost_hints.tokenizer_sha256", None)
    if diff:
        detail = "; ".join(f"{k}: {str(a)[:120]!r} -> {str(b)[:120]!r}" for k, (a, b) in diff.items())
        if not manifest.shards:
            log.info("%s holds no finished shard: starting over with the new settings (%s)", out, detail)
            return
        raise ValueError(f"{out} holds a dataset made with other settings or inputs ({detail}); "
                         "use an empty directory (or the original settings to resume)")


def _differing_leaves(old: Mapping, new: Mapping, prefix: str = ""):
    """(dotted key, (old value, new value)) of each key of ``new`` whose value differs, nested objects (the cost
    hints' encoder settings) compared key by key so that the key named is the one that differs."""
    for k, v in new.items():
        o = old.get(k)
        if isinstance(o, Mapping) and isinstance(v, Mapping):
            yield from _differing_leaves(o, v, f"{prefix}{k}.")
            yield from ((f"{prefix}{k}.{g}", (o[g], None)) for g in o if g not in v)
        elif o != v:
            yield f"{prefix}{k}", (o, v)


CONVERT_LOCK = ".convert.lock"


def locks_output_dir(convert: Any) -> Any:
    """Decorates a converter ``convert(src, out_dir, ...)``: it runs holding ``out_dir``'s lock, so that a second
    conversion into the same directory (a restarted command while the first still runs, two users) fails at once
    naming the holder instead of both writing the same shards, manifest and reports."""
    sig = inspect.signature(convert)

    @functools.wraps(convert)
    def locked(*args: Any, **kwargs: Any) -> Any:
        out = Path(sig.bind(*args, **kwargs).arguments["out_dir"])
        created = not out.exists()
        try:   # here rather than in the lock: an OSError of the conversion itself is no usage error
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConvertUsageError(f"output directory {out} " + ("is a file" if out.is_file() else
                                                                  f"cannot be created: {e.strerror or e}")) from None
        with directory_lock(out, "output directory", "conversion", "wait for it to end, or convert into another "
                            "directory", name=CONVERT_LOCK):
            try:
                return convert(*args, **kwargs)
            except Exception:   # a mistyped source or option: leave no OUT that holds only our lock behind
                if created and {p.name for p in out.iterdir()} == {CONVERT_LOCK}:
                    (out / CONVERT_LOCK).unlink()
                    out.rmdir()
                raise

    return locked


@dataclass(frozen=True)
class ShardJob:
    """One unit of converter work that writes at most one shard ``{prefix}-{index:06d}.tar``.

    ``payload`` must be picklable (it travels to a worker process); ``weight`` is what the
    progress bar counts for it (episodes, lines, clips)."""

    index: int
    payload: Any
    weight: int = 1


def run_shard_jobs(
    out_dir: str | os.PathLike,
    jobs: Iterable[ShardJob],
    fn: Any,
    *,
    info: Mapping,
    prefix: str,
    workers: int = 1,
    progress: bool = True,
    desc: str = "convert",
    unit: str = "item",
    on_result: Any = None,
) -> tuple[dict[int, Any], list[int]]:
    """Run converter jobs over processes, restartably; the shared driver of all converters.

    ``fn(out_dir: str, prefix: str, index: int, payload) -> (ShardInfo | None, result)`` runs in a
    worker (a picklable top-level function) and writes shard ``index`` with a ``ShardWriter``
    (``start_index=index, update_manifest=False``); None means the job produced no sample. The
    parent checks ``info`` against an existing manifest (:func:`check_dataset_info`), removes
    stale temp files, drops manifest entries whose files are missing or truncated, skips jobs
    whose shard is complete, merges each finished shard into the manifest as it lands and calls
    ``on_result(job, result)`` (which may raise to abort: pending jobs are cancelled, finished
    shards stay). Returns ({index: result} of the jobs run now, indices skipped as complete)."""
    from tqdm.auto import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = list(jobs)
    if len({j.index for j in jobs}) != len(jobs):
        raise ValueError("shard jobs must have distinct indices")
    info = json.loads(json.dumps(info))
    check_dataset_info(out, info)
    remove_stale_temp_files(out)
    done = completed_shards(out)
    # records the settings and forgets shards that are gone; ``complete`` turns true once every job ran, so a
    # stopped conversion's directory is not taken for a whole (smaller) dataset (the loader warns, inspect says so)
    write_manifest(out, done.values(), {**info, "complete": False})
    skipped = [j.index for j in jobs if shard_name(prefix, j.index) in done]
    todo = [j for j in jobs if shard_name(prefix, j.index) not in done]
    results: dict[int, Any] = {}
    bar = tqdm(total=sum(j.weight for j in jobs), initial=sum(j.weight for j in jobs if j.index in set(skipped)),
               unit=unit, desc=desc, disable=not progress)

    def land(job: ShardJob, res: tuple) -> None:
        shard, result = res
        if shard is not None:
            update_manifest(out, [shard])
        results[job.index] = result
        bar.update(job.weight)
        if on_result is not None:
            on_result(job, result)

    try:
        if workers == 1 or len(todo) <= 1:
            for job in todo:
                land(job, fn(str(out), prefix, job.index, job.payload))
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed
            from multiprocessing import get_context

            ex = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=get_context("spawn"))
            try:
                futs = {ex.submit(fn, str(out), prefix, job.index, job.payload): job for job in todo}
                for f in as_completed(futs):
                    land(futs[f], f.result())
            except BaseException:
                ex.shutdown(wait=True, cancel_futures=True)
                raise
            ex.shutdown(wait=True)
    finally:
        bar.close()
    update_manifest(out, [], {**info, "complete": True})
    return results, skipped
