"""Training checkpoints: atomic, sharded (DCP) saves; resume with exact continuation or resharding.

Layout of one checkpoint (``<output_dir>/checkpoints/step_000100/``)::

    dcp/.metadata, dcp/__<rank>_0.distcp   model + optimiser, sharded (``get_state_dict``), one file per rank
    trainer_state.json                      step, tokens seen, scheduler, world size, layout, config (rank 0)
    rank_00000.json ...                     per rank: loader state and RNG states (python/numpy/torch/CUDA)
    COMPLETE                                written last, before the rename (JSON: step, world size, files)

Atomicity. Everything is written into ``step_000100.tmp-<id>/``; when every rank has finished, rank 0
writes ``COMPLETE``, renames the directory to ``step_000100/``, then rewrites ``checkpoints/latest``
(a one-line file, replaced atomically) and prunes to ``keep_last``. A crash at any point leaves either
the previous checkpoints untouched plus a ``*.tmp-*`` directory (ignored by ``auto`` with a warning), or
a complete new checkpoint. Assumes all ranks see one shared filesystem.

Resume. ``find_resume_checkpoint`` picks the checkpoint; ``load_checkpoint`` loads model and optimiser
through DCP into however the model is sharded now (resharding is DCP's job), restores the scheduler and,
when world size and layout are the ones saved, returns this rank's per-rank state and restores its RNG
(exact continuation; ``rynnscale.checkpoint.rng``). Otherwise the per-rank state is ``None`` and a warning says the data order restarts
deterministically from the recorded progress. Before any tensor is read, ``trainer_state.json`` is validated field by
field, the recorded model config is compared with the caller's (any architectural difference is refused, naming each
field; see ``config_changes``), and every saved tensor's shape with the model's.

Safe loading. Stock DCP reads ``.metadata`` with ``pickle.load`` and non-tensor items (e.g. optimiser
``lr``) with ``torch.load(weights_only=False)``: a checkpoint from elsewhere could run code. We read with
``SafeFileSystemReader`` (metadata through an allow-listed unpickler) and ``SafeLoadPlanner``
(``weights_only=True``); everything else is JSON. Nothing here calls ``pickle.load`` or unrestricted
``torch.load``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from rynnscale.checkpoint.rng import capture_rng_state, restore_rng_state
from rynnscale.config.schema import ConfigError
from rynnscale.fsutil import atomic_write_bytes, fsync_dir
from rynnscale.parallel.fqn import clean_fqn

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
DCP_DIR = "dcp"
TRAINER_STATE = "trainer_state.json"
COMPLETE = "COMPLETE"
LATEST = "latest"
ROLLBACK = "rollback.json"     # checkpoints a resume=PATH to an older one abandoned (``record_rollback``)
_FINAL_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^step_(\d+)\.tmp-([0-9A-Za-z]+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, unsafe or does not fit; the message names the path / key."""


class ResumePathError(CheckpointError, ConfigError):
    """``checkpoint.resume=PATH`` names no complete checkpoint: a setting to fix (``rynnscale train`` exits 2, as
    for a PATH that does not exist, which the recipe's load refuses)."""


class CheckpointCommittedError(CheckpointError):
    """A save failed after its checkpoint was committed (complete under its final name): only ``latest`` or the
    pruning is behind."""


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after optimiser step ``step`` (zero-padded so names sort)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


# ------------------------------------------------------------------------------------------ safe reading
# Every global a DCP ``.metadata`` pickle of this torch version references (checked on dense, MoE, FSDP2 saves).
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("pathlib", "Path"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the classes DCP metadata is made of (and torch dtypes)."""

    def __init__(self, f, where: str):
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.where}: refuses to unpickle global {module}.{name} (not part of DCP metadata; "
                              "the checkpoint may be malicious or written by an unsupported torch version)")


def read_dcp_metadata(dcp_dir: str | os.PathLike) -> Metadata:
    """DCP ``.metadata`` of ``dcp_dir`` through the allow-listed unpickler."""
    path = Path(dcp_dir) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (not a DCP checkpoint directory)")
    with open(path, "rb") as f:
        try:
            md = _MetadataUnpickler(f, str(path)).load()
        except CheckpointError:
            raise
        except Exception as e:  # truncated / corrupt file
            raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from e
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: holds a {type(md).__name__}, not DCP Metadata")
    _check_storage_paths(md, path)
    return md


def _check_storage_paths(md: Metadata, where: Path) -> None:
    """Every storage item must name a file inside the DCP directory: a ``../`` or absolute
    ``relative_path`` would make the reader open (and ``inspect`` trust) files anywhere."""
    for index, info in (getattr(md, "storage_data", None) or {}).items():
        rel = getattr(info, "relative_path", None)
        fqn = getattr(index, "fqn", index)
        if not isinstance(rel, str) or not rel:
            raise CheckpointError(f"{where}: storage item {fqn!r} has no file name ({rel!r})")
        parts = rel.replace("\\", "/").split("/")
        if rel.startswith(("/", "\\")) or os.path.isabs(rel) or ".." in parts or (len(rel) > 1 and rel[1] == ":") \
                or "\0" in rel:
            raise CheckpointError(f"{where}: storage item {fqn!r} points outside the checkpoint directory "
                                  f"({rel!r}); refusing to read it (the checkpoint may be malicious)")
        for attr in ("offset", "length"):
            v = getattr(info, attr, 0)
            if not isinstance(v, int) or v < 0:
                raise CheckpointError(f"{where}: storage item {fqn!r} has an invalid {attr} ({v!r})")


def missing_storage_files(dcp_dir: str | os.PathLike, md: Metadata | None = None) -> list[str]:
    """Problems with the data files ``.metadata`` references: absent, or shorter than an item's end."""
    dcp_dir = Path(dcp_dir)
    md = md if md is not None else read_dcp_metadata(dcp_dir)
    need: dict[str, int] = {}
    for info in (getattr(md, "storage_data", None) or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), int(info.offset) + int(info.length))
    out = []
    for rel, end in sorted(need.items()):
        f = dcp_dir / rel
        if not f.is_file():
            out.append(f"{DCP_DIR}/{rel} missing")
        elif f.stat().st_size < end:
            out.append(f"{DCP_DIR}/{rel} truncated ({f.stat().st_size} bytes, metadata needs {end})")
    return out


class SafeFileSystemReader(FileSystemReader):
    """DCP ``FileSystemReader`` whose metadata goes through the allow-listed unpickler (tensor data is
    already read with ``torch.load(weights_only=True)`` by the base class)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = read_dcp_metadata(self.path)
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor items (optimiser hyper-parameters) with
    ``torch.load(weights_only=True)`` instead of unrestricted pickle."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"DCP item {read_item.dest_index.fqn!r}: refused by the weights_only loader "
                                  f"({type(e).__name__}: {e})") from e
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_dcp_load(state_dict: dict[str, Any], dcp_dir: str | os.PathLike, process_group=None, *,
                  local_only: bool = False) -> None:
    """``dcp.load`` in place with the safe reader and planner: a collective over ``process_group`` when
    torch.distributed is on, else (or with ``local_only``: this process alone, e.g. rank 0 exporting
    while the others wait) a single-process load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(dcp_dir), planner=SafeLoadPlanner(),
                 process_group=process_group, no_dist=local_only or not _dist_on())


# ------------------------------------------------------------------------------------------ small helpers
def _dist_on(group=None) -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank(group=None) -> int:
    return dist.get_rank(group) if _dist_on() else 0


def _world(group=None) -> int:
    return dist.get_world_size(group) if _dist_on() else 1


def _barrier(group=None) -> None:
    if _dist_on() and _world(group) > 1:
        dist.barrier(group=group)


def _agree(what: str, error: BaseException | None, group=None) -> None:
    """Collective: every rank learns whether any rank failed ``what``; if one did, every rank raises at once (the
    failing rank its own error, the others a ``CheckpointError`` naming the rank and its error), where the others
    would wait at the next barrier or inside DCP's collectives until the process group's timeout."""
    if _dist_on() and _world(group) > 1:
        mine = None if error is None else (type(error).__name__, str(error)[:300])
        everyone: list[Any] = [None] * _world(group)
        dist.all_gather_object(everyone, mine, group=group)
        failed = [(r, e) for r, e in enumerate(everyone) if e is not None]
        if failed and error is None:
            rank, (kind, message) = failed[0]
            cls = CheckpointCommittedError if kind == CheckpointCommittedError.__name__ else CheckpointError
            raise cls(f"{what} failed on rank {rank}: {kind}: {message}")
    if error is not None:
        raise error


def _error_of(fn: Callable[[], None]) -> Exception | None:
    """Run ``fn``; the exception it raised, or None (handed to ``_agree``, which re-raises it on this rank)."""
    try:
        fn()
    except Exception as e:   # noqa: BLE001
        return e
    return None


def _broadcast(obj: Any, group=None) -> Any:
    """Rank 0's ``obj`` on every rank (small JSON-able values only)."""
    if not _dist_on() or _world(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return box[0]


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file, fsync, replace)."""
    try:
        text = json.dumps(obj, indent=1, sort_keys=True, allow_nan=True)
    except TypeError as e:
        raise CheckpointError(f"{path.name}: state is not JSON-serialisable ({e}); pass plain data "
                              "(numbers, strings, lists, dicts)") from e
    atomic_write_bytes(path, text + "\n")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """``trainer_state.json`` of checkpoint ``path``, every field type- and range-checked (``CheckpointError``
    naming the file and the field): a hand-edited or corrupt file must not resume at step -5."""
    where = Path(path) / TRAINER_STATE
    ts = _read_json(where)
    if not isinstance(ts, dict):
        raise CheckpointError(f"{where}: holds a JSON {type(ts).__name__}, expected an object")

    def bad(field: str, want: str) -> CheckpointError:
        return CheckpointError(f"{where}: field {field!r} = {ts.get(field)!r} is invalid: {want}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if ts.get("format_version") != FORMAT_VERSION or not is_int(ts.get("format_version")):
        raise bad("format_version", f"expected {FORMAT_VERSION} (written by another rynnscale version?)")
    for field, lo in (("step", 0), ("tokens_seen", 0), ("world_size", 1)):
        if field not in ts:
            raise CheckpointError(f"{where}: field {field!r} is missing")
        if not is_int(ts[field]) or ts[field] < lo:
            raise bad(field, f"must be an integer >= {lo}")
    for field, optional in (("layout", False), ("extra", False), ("scheduler", True), ("config", True),
                            ("model_config", True)):
        v = ts.get(field)
        if field not in ts and not optional:
            raise CheckpointError(f"{where}: field {field!r} is missing")
        if not isinstance(v, dict) and not (optional and v is None):
            raise bad(field, "must be a JSON object" + (" or null" if optional else ""))
    if "torch_version" in ts and not isinstance(ts["torch_version"], str):
        raise bad("torch_version", "must be a string")
    if "saved_at" in ts:
        v = ts["saved_at"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise bad("saved_at", "must be a finite number of seconds >= 0")
    return ts


def _read_rank_file(path: Path, rank: int, world: int, step: int) -> dict[str, Any]:
    """This rank's ``rank_<r>.json``, checked against ``trainer_state.json`` (rank, world size, step)."""
    where = path / rank_file(rank)
    rf = _read_json(where)
    if not isinstance(rf, dict):
        raise CheckpointError(f"{where}: holds a JSON {type(rf).__name__}, expected an object")
    for field, want in (("rank", rank), ("world_size", world), ("step", step)):
        if rf.get(field) != want or isinstance(rf.get(field), bool):
            raise CheckpointError(f"{where}: field {field!r} = {rf.get(field)!r} but {TRAINER_STATE} and this "
                                  f"process say {want}")
    for field in ("rng", "state"):
        if not isinstance(rf.get(field), dict):
            raise CheckpointError(f"{where}: field {field!r} = {str(rf.get(field))[:80]!r} must be a JSON object")
    return rf


# Keys of a model's config.json (at any depth) that describe no architecture: transformers' bookkeeping and
# training choices recorded beside the architecture. Resuming with other values of these is allowed; any other
# difference (sizes, layer counts, rope, routing, vocabulary and token ids, vision tower, tied embeddings, model
# type...) is refused. Attention backend, kernels, compile, checkpointing, dtype and the parallel layout are not
# in the model config at all.
NON_ARCHITECTURE_KEYS = frozenset({
    "transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache", "return_dict",
    "output_attentions", "output_hidden_states", "output_router_logits", "_attn_implementation_autoset",
    "chunk_size_feed_forward", "problem_type", "id2label", "label2id", "tokenizer_class",
    "pad_token_id", "bos_token_id", "eos_token_id",     # generation / tokenizer bookkeeping
    "initializer_range",                               # random init only: a resume loads every weight
    "router_aux_loss_coef",                            # a loss weight, not part of the model's function
    "attention_dropout",                               # a training regulariser
})
_ABSENT = object()


def config_changes(old: Any, new: Any, ignore: frozenset[str] = NON_ARCHITECTURE_KEYS,
                   prefix: str = "") -> list[str]:
    """``'key: old -> new'`` for every difference between two nested JSON configs (dotted keys, lists compared
    whole, keys in ``ignore`` skipped at any depth, ``1 == 1.0`` but ``True != 1``); generic over model families."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if k not in ignore:
                out += config_changes(old.get(k, _ABSENT), new.get(k, _ABSENT), ignore, f"{prefix}{k}.")
        return out
    if _same_json(old, new):
        return []

    def show(v: Any) -> str:
        return "(absent)" if v is _ABSENT else json.dumps(v, sort_keys=True)
    return [f"{prefix.rstrip('.') or '(root)'}: {show(old)} -> {show(new)}"]


def _same_json(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or a is _ABSENT or b is _ABSENT:
        return a is b or (type(a) is type(b) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return not config_changes(a, b, frozenset())
    return type(a) is type(b) and a == b


def check_same_architecture(path: Path, saved: dict[str, Any] | None, current: dict[str, Any],
                            normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Refuse to resume checkpoint ``path`` (recorded model config ``saved``) into a model of config ``current``
    when they differ in anything architectural, naming every differing field (old -> new). ``normalize`` (e.g. the
    family's ``from_hf_config(d).to_hf_config()``) fills defaults on both sides first, so that a field added to the
    family since the save does not count as a change; a config it cannot read is compared as written."""
    if saved is None:
        log.warning("%s records no model_config: the architecture cannot be compared with the model's", path)
        return

    def norm(d: dict[str, Any]) -> dict[str, Any]:
        d = json.loads(json.dumps(d))
        if normalize is not None:
            try:
                return json.loads(json.dumps(normalize(d)))
            except Exception as e:  # noqa: BLE001 - another family / a broken config: compare it as written
                log.debug("model config not normalised (%s: %s)", type(e).__name__, e)
        return d

    changes = config_changes(norm(saved), norm(current))
    if changes:
        shown = "; ".join(changes[:40]) + (f"; ... and {len(changes) - 40} more" if len(changes) > 40 else "")
        raise CheckpointError(
            f"{path}: the checkpoint was saved with another model architecture ({len(changes)} field(s), "
            f"checkpoint -> now): {shown}. Resuming would drop, misplace or misread weights. Resume with the "
            "recorded architecture (model.arch / model.preset / model.init_from as in the checkpoint's "
            f"{TRAINER_STATE}), or start a new run (another run.output_dir, or checkpoint.resume=none).")


# ------------------------------------------------------------------------------------------ discovery
@dataclass
class CheckpointEntry:
    """One directory under ``checkpoints/``: its step and whether it is a usable, complete checkpoint."""
    path: Path
    step: int
    complete: bool
    reason: str = ""    # why it is not complete


def check_complete(path: str | os.PathLike) -> str:
    """'' if ``path`` is a complete checkpoint, else the reason it is not."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    if _TMP_RE.match(path.name):
        return "temporary name (the save never finished)"
    if path.name == DCP_DIR and ((path.parent / TRAINER_STATE).is_file() or (path.parent / COMPLETE).is_file()):
        inner = check_complete(path.parent)   # a checkpoint's inner dcp/ folder, not the checkpoint itself
        return (f"this is the {DCP_DIR}/ folder inside the checkpoint {path.parent}"
                + (f", which is itself not complete: {inner}" if inner else f"; pass the step directory {path.parent}"))
    if not (path / COMPLETE).is_file():
        run = path if (path / CHECKPOINTS_DIR).is_dir() else path.parent if (path / LATEST).is_file() or any(
            _FINAL_RE.match(p.name) for p in path.iterdir()) else None
        if run is not None:   # a run directory or its checkpoints/ folder: say which checkpoint to pass
            newest = [e.path for e in list_checkpoints(run) if e.complete][-1:]
            return (f"this is {'a run directory' if run == path else 'the checkpoints/ folder of a run'}, not one "
                    "checkpoint; pass a step directory" + (f", e.g. the newest {newest[0]}" if newest else
                                                            " (it holds no complete checkpoint)"))
        if not (path / TRAINER_STATE).exists() and not (path / DCP_DIR).exists():
            return f"not a checkpoint directory: no {COMPLETE}, {TRAINER_STATE} or {DCP_DIR}/ in it"
        return f"no {COMPLETE} marker (the save never finished)"
    if not (path / TRAINER_STATE).is_file():
        return f"no {TRAINER_STATE}"
    if not (path / DCP_DIR / ".metadata").is_file():
        return f"no {DCP_DIR}/.metadata"
    return ""


def require_complete(path: str | os.PathLike) -> None:
    """``CheckpointError`` unless ``path`` is a complete checkpoint whose data files are all there, each long enough
    for what ``.metadata`` says it holds (a partial copy fails here in one line, not in DCP's reader)."""
    reason = check_complete(path)
    if not reason:
        gone = missing_storage_files(Path(path) / DCP_DIR)   # also refuses storage paths outside the checkpoint
        reason = f"data files: {'; '.join(gone[:5])}" if gone else ""
    if reason:
        raise CheckpointError(f"{path}: not a complete checkpoint ({reason})")


def list_checkpoints(output_dir: str | os.PathLike) -> list[CheckpointEntry]:
    """Every ``step_*`` directory (final or temporary name) under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    out = []
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _FINAL_RE.match(p.name) or _TMP_RE.match(p.name)
        if m and p.is_dir():
            reason = check_complete(p)
            out.append(CheckpointEntry(p, int(m.group(1)), not reason, reason))
    out.sort(key=lambda e: (e.step, e.complete, e.path.name))
    return out


def read_latest(output_dir: str | os.PathLike) -> tuple[str | None, str]:
    """(name in ``checkpoints/latest``, '') or (None, why it is unusable)."""
    path = Path(output_dir) / CHECKPOINTS_DIR / LATEST
    if not path.is_file():
        return None, "no latest pointer"
    try:
        name = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as e:
        return None, f"latest pointer unreadable ({e})"
    if not _FINAL_RE.match(name):
        return None, f"latest pointer does not name a step_N checkpoint ({name[:40]!r})"
    return name, ""


def _save_id(e: CheckpointEntry) -> list:
    """What tells one save of a checkpoint name from another: its save order (a re-save under the same name
    gets a new one)."""
    return [e.path.name, *_save_order(e)[:2]]


def _rollback_record(output_dir: str | os.PathLike) -> dict:
    path = Path(output_dir) / CHECKPOINTS_DIR / ROLLBACK
    if not path.is_file():
        return {}
    try:
        rec = _read_json(path)
    except CheckpointError as e:
        log.warning("ignoring %s: %s", path, e)
        return {}
    return rec if isinstance(rec, dict) else {}


def _abandoned(output_dir: str | os.PathLike) -> list[list]:
    return _rollback_record(output_dir).get("abandoned", [])


def job_identity() -> tuple[str | None, bool]:
    """This job as its scheduler names it (a SLURM job id, else torchrun's run id) and whether this process is a
    restart of it (a SLURM requeue, a torchrun ``--max-restarts`` round): a restart runs the same command line."""
    slurm, run = os.environ.get("SLURM_JOB_ID"), os.environ.get("TORCHELASTIC_RUN_ID")
    job = f"slurm:{slurm}" if slurm else f"torchrun:{run}" if run else None
    restarts = [os.environ.get(k, "0") for k in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")]
    return job, any(r.isdigit() and int(r) > 0 for r in restarts)


def _own_checkpoint(output_dir: str | os.PathLike, path: str | os.PathLike) -> CheckpointEntry | None:
    """``path`` as one of ``output_dir``'s complete checkpoints, or None (another run's, or not complete)."""
    return next((e for e in list_checkpoints(output_dir)
                 if e.complete and e.path.resolve() == Path(path).resolve()), None)


def rollback_applied(output_dir: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``checkpoint.resume=path`` was already carried out by this job before it was restarted: a requeued
    SLURM job or a torchrun restart runs the same command line, and rolling back again would throw away what
    the new branch trained since. Outside a scheduler's restart, an explicit path always rolls back."""
    job, restart = job_identity()
    if not restart or job is None:
        return False
    rec = _rollback_record(output_dir)
    if rec.get("job") != job or rec.get("resumed_from") != str(Path(path).resolve()):
        return False
    me = _own_checkpoint(output_dir, path)
    return me is None or rec.get("rolled_back_to") == _save_id(me)   # (one of this run's: not re-saved since)


def record_rollback(output_dir: str | os.PathLike, path: str | os.PathLike) -> list[str]:
    """A run resumed from ``path`` (``checkpoint.resume=PATH``), recorded with the job that did it in
    ``checkpoints/rollback.json`` (for ``rollback_applied``). When ``path`` is one of ``output_dir``'s own
    checkpoints, the saves after it are an abandoned branch: they are recorded there too and ``latest`` names
    ``path``, so that ``resume=auto`` after a crash before the new branch's first save continues the new branch,
    not the abandoned one. Returns the abandoned names; call on one rank."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    me = _own_checkpoint(output_dir, path)
    later = [] if me is None else [e for e in list_checkpoints(output_dir)
                                   if e.complete and _save_order(e) > _save_order(me)]
    known = _abandoned(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / ROLLBACK, {"abandoned": known + [i for i in map(_save_id, later) if i not in known],
                                  "rolled_back_to": None if me is None else _save_id(me),
                                  "resumed_from": str(Path(path).resolve()), "job": job_identity()[0]})
    if later:
        atomic_write_bytes(root / LATEST, me.path.name + "\n")
    return [e.path.name for e in later]


def find_resume_checkpoint(output_dir: str | os.PathLike, resume: str, process_group=None) -> Path | None:
    """The checkpoint to resume from, per ``checkpoint.resume``.

    ``"none"``: None. ``"auto"``: the complete checkpoint ``checkpoints/latest`` names (after a rollback
    with ``resume=PATH``, the new branch); if ``latest`` is missing or broken, the newest complete
    checkpoint, with a warning (None if there is none); incomplete ones are skipped with a warning naming them. Anything else is a path to a
    checkpoint directory, which must be complete (``CheckpointError`` otherwise). Rank 0 decides and
    broadcasts, so every rank resumes from the same directory."""
    if resume == "none":
        return None
    chosen: str | None
    error: str | None = None
    if _rank(process_group) == 0:
        chosen = None
        repair_interrupted_commits(output_dir)
        explicit = None
        if resume not in ("auto", "none") and rollback_applied(output_dir, resume):
            log.warning("checkpoint.resume=%s: this job resumed from it before it was restarted (%s); continuing "
                        "what it has trained since, as resume=auto would", resume, job_identity()[0])
            explicit, resume = resume, "auto"
        if resume == "auto":
            entries = list_checkpoints(output_dir)
            abandoned = _abandoned(output_dir)   # by a rollback (``record_rollback``): never the newest
            complete = [e for e in entries if e.complete and not (abandoned and _save_id(e) in abandoned)]
            # follow ``latest`` (after a rollback with resume=PATH it names the new branch, not the highest
            # step); the newest complete checkpoint only when ``latest`` is missing or broken
            pointed, why = read_latest(output_dir)
            newest = next((e for e in complete if e.path.name == pointed), None) if pointed else None
            later = max(complete, key=_save_order) if complete else None
            if newest is not None and later is not newest and _save_order(later)[0] > _save_order(newest)[0]:
                # committed, but the run died before rewriting ``latest`` (or that write failed)
                log.warning("resume=auto: %s names %s, but %s was saved after it (save_seq %d > %d): resuming from "
                            "the later one", Path(output_dir) / CHECKPOINTS_DIR / LATEST, pointed, later.path.name,
                            _save_order(later)[0], _save_order(newest)[0])
                newest = later
            if newest is None and complete:
                newest = complete[-1]
                log.warning("resume=auto: %s (%s); falling back to the newest complete checkpoint %s",
                            Path(output_dir) / CHECKPOINTS_DIR / LATEST,
                            why or f"names {pointed!r}, which is not a complete checkpoint", newest.path)
            skipped = [e for e in entries if not e.complete and (newest is None or e.step >= newest.step)]
            older_bad = [e for e in entries if not e.complete and e not in skipped]
            for e in skipped + older_bad:
                log.warning("ignoring incomplete checkpoint %s (%s)", e.path, e.reason)
            chosen = str(newest.path) if newest else None
            if newest is None and explicit is not None:   # restarted before its first save: from PATH again
                resume = explicit
            elif newest is None:
                log.info("resume=auto: no complete checkpoint under %s; starting fresh",
                         Path(output_dir) / CHECKPOINTS_DIR)
        if resume not in ("auto", "none"):
            reason = check_complete(resume)
            if reason:
                error = f"checkpoint.resume={resume!r}: not a complete checkpoint ({reason})"
            chosen = resume
        res = (chosen, error)
    else:
        res = None
    chosen, error = _broadcast(res, process_group)
    if error:
        raise ResumePathError(error)
    return Path(chosen) if chosen is not None else None


# ------------------------------------------------------------------------------------------ save / load
def _options(trainable_only: bool) -> StateDictOptions:
    """State-dict options of a checkpoint: everything, or only what trains (frozen parameters left out;
    with strict=False so that loading such a state leaves the frozen base as the build loaded it)."""
    return StateDictOptions(ignore_frozen_params=True, strict=False) if trainable_only else StateDictOptions()


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """State-dict name -> the name of the parameter it is tied to (e.g. a tied ``lm_head.weight`` -> the token
    embedding): one tensor under two names, which a checkpoint stores once, under the first name."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        fqn = clean_fqn(name)
        if first.setdefault(id(p), fqn) != fqn:
            out[fqn] = first[id(p)]
    return out


def _stored_model_state(model: torch.nn.Module, model_sd: dict[str, Any], trainable_only: bool) -> dict[str, Any]:
    """The model entries a checkpoint holds: all (only the trainable ones with ``trainable_only``), a tied tensor
    once. Checkpoints written before also hold the tied copy; loading reads the first name only."""
    sd = _only_trainable(model, model_sd) if trainable_only else model_sd
    aliases = tied_aliases(model)
    return {k: v for k, v in sd.items() if k not in aliases}


def _only_trainable(model: torch.nn.Module, model_sd: dict[str, Any]) -> dict[str, Any]:
    """``model_sd`` without frozen tensors (``ignore_frozen_params`` keeps a frozen one that is tied to
    another name, e.g. a tied ``lm_head``)."""
    frozen = {clean_fqn(n) for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model_sd.items() if k not in frozen}


@dataclass
class ResumeState:
    """What ``load_checkpoint`` restored besides model / optimiser / scheduler."""
    path: Path
    step: int
    tokens_seen: int
    exact: bool                         # same world size and layout: per-rank state and RNG restored
    per_rank: dict[str, Any] | None     # this rank's ``per_rank_state`` as saved (None when not exact)
    trainer_state: dict[str, Any]       # the whole trainer_state.json (config, extra, ...)

    @property
    def extra(self) -> dict[str, Any]:
        return self.trainer_state.get("extra", {})


def _scheduler_state(scheduler) -> dict[str, Any] | None:
    if scheduler is None:
        return None
    sd = scheduler.state_dict()
    bad = [k for k, v in sd.items() if isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"scheduler {type(scheduler).__name__} state has tensors {bad}; only JSON state is saved")
    return sd


def _await_write(future: Any) -> None:
    """Wait for the background write of a ``dcp.async_save`` (its upload too, in newer torch); raises its error."""
    upload = getattr(future.result(), "upload_completion", None)   # AsyncSaveResponse in newer torch
    if upload is not None:
        upload.result()


def _write_failed_with(future: Any, error: BaseException) -> bool:
    """Whether ``error`` is what the background write ``future`` failed with, not an exception raised into the
    waiting thread meanwhile (torch's SIGCHLD handler for a dead data worker, ^C) while the write goes on."""
    def failed(f: Any) -> bool:
        return f.done() and not f.cancelled() and f.exception() is error
    if failed(future):
        return True
    upload = getattr(future.result(), "upload_completion", None) if future.done() and not future.cancelled() and \
        future.exception() is None else None
    return upload is not None and failed(upload)


def _commit(tmp: Path, final: Path, complete: dict[str, Any]) -> None:
    """Rank 0: write COMPLETE into the finished ``tmp`` and rename it to ``final`` (an existing ``final``, e.g.
    the same step saved again, is moved aside first and deleted after)."""
    _write_json(tmp / COMPLETE, complete)
    fsync_dir(tmp)
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_OLD_RE = re.compile(r"^(step_\d+)\.old-[0-9A-Za-z]+$")


def repair_interrupted_commits(output_dir: str | os.PathLike) -> None:
    """Finish what a ``_commit`` cut between its two renames left (the same step saved again: ``step_N`` moved
    aside to ``step_N.old-*``, the new save not yet renamed from ``step_N.tmp-*``), so neither copy is lost:
    the new save becomes ``step_N`` if it is complete (its COMPLETE marker is written before the renames), else
    the old copy goes back; an ``.old-*`` beside its ``step_N`` is deleted. Call on one rank, at start."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return
    for old in sorted(root.iterdir()):
        m = _OLD_RE.match(old.name)
        if not m or not old.is_dir():
            continue
        final = root / m.group(1)
        if not final.exists():
            new = [t for t in sorted(root.glob(f"{final.name}.tmp-*"))
                   if all((t / f).is_file() for f in (COMPLETE, TRAINER_STATE, f"{DCP_DIR}/.metadata"))]
            (new[-1] if new else old).rename(final)
            log.warning("checkpoint %s: a save interrupted while replacing it was completed (%s)", final,
                        "the new copy" if new else "the previous copy restored")
            fsync_dir(root)
        if final.exists() and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def _save_order(e: CheckpointEntry) -> tuple[int, float, int]:
    """Sort key of checkpoint ``e`` by when it was saved: ``trainer_state.json``'s ``save_seq`` (a counter of the
    run directory's saves, immune to clock skew between hosts), then its ``saved_at`` (else the COMPLETE
    marker's mtime) for checkpoints written before the counter, then the step."""
    try:
        ts = json.loads((e.path / TRAINER_STATE).read_text())
    except Exception:
        ts = {}
    ts = ts if isinstance(ts, dict) else {}
    seq = ts.get("save_seq")
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else -1
    try:
        t = float(ts.get("saved_at"))
    except Exception:
        try:
            t = (e.path / COMPLETE).stat().st_mtime
        except OSError:
            t = 0.0
    return seq, t, e.step


def _next_save_seq(output_dir: str | os.PathLike) -> int:
    """1 + the highest ``save_seq`` of the run directory's complete checkpoints (0 if none has one)."""
    return 1 + max((_save_order(e)[0] for e in list_checkpoints(output_dir) if e.complete), default=-1)


@contextlib.contextmanager
def reading_checkpoint(path: str | os.PathLike):
    """Hold a shared ``flock`` on checkpoint ``path``'s ``COMPLETE`` marker while reading it (``ckpt export-hf``):
    the run that wrote it leaves it alone meanwhile (keep_last pruning skips it until a later save).
    Nothing is held where the marker is absent or the file system has no flock."""
    fd = None
    try:
        fd = os.open(Path(path) / COMPLETE, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        if fd is not None:
            os.close(fd)
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _remove(path: Path) -> bool:
    """Delete a checkpoint directory, unless a reader holds it (``reading_checkpoint``): False then. A complete one
    is first renamed to a temporary name (under an exclusive lock, so no reader starts in between), so a kill
    midway leaves a ``step_N.tmp-*`` that resume ignores and the next run or save removes, not a half-deleted checkpoint
    whose COMPLETE marker still stands."""
    if _FINAL_RE.match(path.name):
        trash = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:12]}")
        fd = None
        try:
            fd = os.open(path / COMPLETE, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:   # no marker, or no flock here: delete as before
            pass
        try:
            path.rename(trash)
            path = trash
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
    shutil.rmtree(path, ignore_errors=True)
    return True


# ``{"model": sd, "optim": osd} -> same`` applied before DCP sees a state dict (save and load); the result
# must share storage with its input (see ``rynnscale.checkpoint.ep_layout``).
StateAdapter = Callable[[dict[str, Any]], dict[str, Any]]


class CheckpointManager:
    """Saves checkpoints of a run under ``output_dir/checkpoints`` and loads them back.

    Call ``save`` on every rank at the same step; ``wait`` (also called by the next ``save``) finishes
    an asynchronous save. ``process_group`` is the group spanning all ranks (default: the world).
    ``state_adapter`` rewrites the state dict DCP sees, e.g. ``ExpertCheckpointLayout`` so that
    expert-parallel shards are saved as slices of the global expert tensors. ``trainable_only``: save
    and load only parameters that train (and their optimiser state) -- a LoRA run's checkpoint is its
    adapters; the frozen base comes from ``model.init_from`` again on resume."""

    def __init__(self, output_dir: str | os.PathLike, keep_last: int = 2, *, async_save: bool = False,
                 process_group=None, state_adapter: StateAdapter | None = None, trainable_only: bool = False):
        if keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={keep_last} must be >= 0 (0 keeps every checkpoint)")
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / CHECKPOINTS_DIR
        self.keep_last = keep_last
        self.async_save = async_save
        self.process_group = process_group
        self.state_adapter = state_adapter
        self.trainable_only = trainable_only
        self._async_group = None
        self._pending: tuple[Any, Path, Path, dict[str, Any]] | None = None

    # ------------------------------------------------------------------------------------------ save
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler=None, *,
             tokens_seen: int = 0, config: dict[str, Any] | None = None, layout: dict[str, Any] | None = None,
             model_config: dict[str, Any] | None = None, extra_state: dict[str, Any] | None = None,
             per_rank_state: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint of optimiser step ``step``; returns its final path.

        - ``config``: the resolved run config as a plain dict (``trainer_state.json``; export reads
          ``model.arch`` / ``model.init_from`` from it). ``model_config``: the HF ``config.json`` dict of
          the model (its args' ``to_hf_config()``), preferred by export.
        - ``layout``: the parallel layout (e.g. ``{"dp_replicate": 1, "dp_shard": 4, "ep": 2}``); resume
          is exact only with the same world size and layout.
        - ``extra_state``: more JSON data for ``trainer_state.json``. ``per_rank_state``: this rank's
          JSON data (loader state, ...); RNG states are added by the manager.
        With ``async_save`` the DCP write continues in the background; the rename / ``latest`` happen
        in ``wait()`` (called by the next ``save``)."""
        self.wait()
        pg = self.process_group
        rank = _rank(pg)
        final = self.root / checkpoint_name(step)
        tmp = self.root / _broadcast(f"{final.name}.tmp-{uuid.uuid4().hex[:12]}", pg)

        def make_tmp() -> None:
            if rank == 0:
                self.remove_stale_tmp()   # a crashed / disk-full save's leftovers would fill the disk again
                tmp.mkdir(parents=True)
        try:
            _agree(f"checkpoint {final.name} save", _error_of(make_tmp), pg)
            return self._save_into(tmp, final, step, model, optimizer, scheduler, tokens_seen, config, layout,
                                   model_config, extra_state, per_rank_state)
        except BaseException as e:
            self._abandon(tmp, final, e)
            raise

    def remove_stale_tmp(self) -> None:
        """Rank 0, no save pending, the run directory locked (``run_dir_lock``): delete every ``step_*.tmp-*``
        directory (left by a save that crashed or failed, or by a pruning killed midway). Called by each save and
        at the start of a run (after ``repair_interrupted_commits``, which may still need one)."""
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if _TMP_RE.match(p.name) and p.is_dir():
                log.warning("removing stale temporary checkpoint directory %s (a save that never finished)", p)
                shutil.rmtree(p, ignore_errors=True)

    def _abandon(self, tmp: Path, final: Path, e: BaseException) -> None:
        """A save failed: remove its temporary directory (the previous checkpoints and ``latest`` were not
        touched) and raise a ``CheckpointError`` naming the directory and, for a full disk, ENOSPC."""
        if _rank(self.process_group) == 0 or not _dist_on():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit, CheckpointCommittedError)) or (
                isinstance(e, CheckpointError) and "save failed" in str(e)):
            return
        chain, cur = [], e
        while cur is not None and len(chain) < 20:
            chain.append(cur)
            # DCP's CheckpointException (a BaseException) carries each rank's error in ``failures``
            chain += [x for x in (getattr(cur, "failures", None) or {}).values() if isinstance(x, BaseException)]
            cur = cur.__cause__ or cur.__context__
        text = " ".join(str(x) for x in chain)
        nospace = any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in chain) or \
            "No space left" in text or "unexpected pos" in text
        try:
            free = f"{shutil.disk_usage(self.root).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        what = (f"no space left on device (ENOSPC) in {self.root} ({free})" if nospace else
                f"writing into {self.root} failed ({type(e).__name__}: {str(e)[:300]})")
        raise CheckpointError(
            f"checkpoint {final.name} save failed: {what}; the partial directory {tmp.name} was removed, the "
            f"previous checkpoints and '{LATEST}' are unchanged") from e

    def _save_into(self, tmp: Path, final: Path, step: int, model, optimizer, scheduler, tokens_seen, config,
                   layout, model_config, extra_state, per_rank_state) -> Path:
        pg = self.process_group
        rank, world = _rank(pg), _world(pg)
        t0 = time.perf_counter()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(self.trainable_only))
        state = {"model": _stored_model_state(model, model_sd, self.trainable_only), "optim": optim_sd}
        if self.state_adapter is not None:
            state = self.state_adapter(state)

        def write_json_files() -> None:
            # small JSON files first, so that the DCP write is the last thing that can still be in flight
            _write_json(tmp / rank_file(rank), {
                "format_version": FORMAT_VERSION, "step": step, "rank": rank, "world_size": world,
                "rng": capture_rng_state(), "state": per_rank_state or {}})
            if rank == 0:
                _write_json(tmp / TRAINER_STATE, {
                    "format_version": FORMAT_VERSION, "step": step, "tokens_seen": int(tokens_seen),
                    "world_size": world, "layout": layout or {}, "scheduler": _scheduler_state(scheduler),
                    "config": config, "model_config": model_config, "extra": extra_state or {},
                    "torch_version": torch.__version__, "saved_at": time.time(),
                    "save_seq": _next_save_seq(self.output_dir)})
        _agree(f"checkpoint {final.name} save", _error_of(write_json_files), pg)
        complete = {"format_version": FORMAT_VERSION, "step": step, "world_size": world,
                    "rank_files": [rank_file(r) for r in range(world)]}
        if self.async_save:
            if self._async_group is None and _dist_on() and world > 1:
                # a separate group: the background thread's collectives must not interleave with training's
                self._async_group = dist.new_group(ranks=None if pg is None else dist.get_process_group_ranks(pg),
                                                   backend="gloo")
            future = dcp.async_save(state, checkpoint_id=tmp / DCP_DIR,
                                    process_group=self._async_group if self._async_group is not None else pg,
                                    no_dist=not _dist_on())
            self._pending = (future, tmp, final, complete)
            log.info("checkpoint %s: staged in %.2fs, writing in the background", final.name, time.perf_counter() - t0)
            return final
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=tmp / DCP_DIR, process_group=pg, no_dist=not _dist_on())
        self._finish(tmp, final, complete)
        log.info("checkpoint %s saved in %.2fs", final, time.perf_counter() - t0)
        return final

    def wait(self) -> Path | None:
        """Finish a pending asynchronous save (rename, ``latest``, prune); returns its path or None."""
        if self._pending is None:
            return None
        future, tmp, final, complete = self._pending
        try:
            _await_write(future)
        except BaseException as e:
            if not _write_failed_with(future, e):   # the write goes on: a later wait finishes it
                raise
            self._pending = None
            self._abandon(tmp, final, e)
            raise
        self._pending = None
        try:
            self._finish(tmp, final, complete)
        except BaseException as e:
            self._abandon(tmp, final, e)
            raise
        return final

    @property
    def pending(self) -> Path | None:
        """The final path of the asynchronous save still to be finished (``wait``), or None."""
        return None if self._pending is None else self._pending[2]

    def wait_after_failure(self) -> Path | None:
        """``wait`` for a rank whose run failed, without a collective (the other ranks are elsewhere: in a step's
        collectives, or failing too). Rank 0 commits the pending save once its background write has finished:
        DCP's coordinator writes ``.metadata`` only after every rank's shards are written, and the rank files were
        written before the write began. Elsewhere, or when the write failed, the save stays uncommitted (a
        ``step_N.tmp-*`` that resume ignores and the next save removes). Returns the committed path or None."""
        if self._pending is None:
            return None
        future, tmp, final, complete = self._pending
        self._pending = None
        try:
            _await_write(future)
        except BaseException as e:
            if _write_failed_with(future, e) and _rank(self.process_group) == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if _rank(self.process_group) != 0:
            return None
        self._commit_and_prune(tmp, final, complete)
        return final

    def _finish(self, tmp: Path, final: Path, complete: dict[str, Any]) -> None:
        pg = self.process_group
        _barrier(pg)   # every rank's DCP shard and rank file is on disk

        def commit() -> None:
            if _rank(pg) == 0:
                self._commit_and_prune(tmp, final, complete)
        _agree(f"checkpoint {final.name} save", _error_of(commit), pg)

    def _commit_and_prune(self, tmp: Path, final: Path, complete: dict[str, Any]) -> None:
        """Rank 0, every rank's part written: rename to ``final``, point ``latest`` at it, prune."""
        _commit(tmp, final, complete)
        try:
            self._write_latest(final.name)   # last: points only at a complete checkpoint
            self._prune()
        except Exception as e:
            raise CheckpointCommittedError(
                f"checkpoint {final} is saved and complete, but updating '{LATEST}' or pruning older "
                f"checkpoints then failed ({type(e).__name__}: {str(e)[:300]}); resume=auto still picks it (the "
                "latest save)") from e

    def _write_latest(self, name: str) -> None:
        atomic_write_bytes(self.root / LATEST, name + "\n")

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; delete older complete ones and temporary
        directories of steps at or below the newest complete one (left by crashed saves)."""
        entries = list_checkpoints(self.output_dir)
        complete = [e for e in entries if e.complete]
        if not complete:
            return
        newest = complete[-1].step
        # keep the most recently *saved* ones, and always the one ``latest`` names: after a rollback
        # (resume=PATH to an older step) the abandoned branch has higher steps but older saves
        pointed, _ = read_latest(self.output_dir)
        # and the one the last rollback went back to: the command line naming it (checkpoint.resume=PATH) must
        # still work when the job is requeued or restarted (``rollback_applied``)
        target = _rollback_record(self.output_dir).get("rolled_back_to")
        by_time = sorted(complete, key=_save_order)
        kept = by_time[-self.keep_last:] if self.keep_last > 0 else by_time
        doomed = [e for e in by_time if e not in kept and e.path.name != pointed and _save_id(e) != target]
        doomed += [e for e in entries if not e.complete and _TMP_RE.match(e.path.name) and e.step <= newest]
        for e in doomed:
            if _remove(e.path):
                log.info("pruned checkpoint %s", e.path)
            else:
                log.warning("keep_last: checkpoint %s is being read (e.g. by ckpt export-hf); kept until a later "
                            "save", e.path)

    # ------------------------------------------------------------------------------------------ load
    def load(self, path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
             scheduler=None, *, layout: dict[str, Any] | None = None, restore_rng: bool = True,
             model_config: dict[str, Any] | None = None,
             normalize_model_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> ResumeState:
        """``load_checkpoint`` with this manager's process group."""
        return load_checkpoint(path, model, optimizer, scheduler, layout=layout, restore_rng=restore_rng,
                               process_group=self.process_group, state_adapter=self.state_adapter,
                               trainable_only=self.trainable_only, model_config=model_config,
                               normalize_model_config=normalize_model_config)


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, *, layout: dict[str, Any] | None = None, restore_rng: bool = True,
                    process_group=None, state_adapter: StateAdapter | None = None,
                    trainable_only: bool = False, model_config: dict[str, Any] | None = None,
                    normalize_model_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> ResumeState:
    """Load checkpoint ``path`` into ``model`` / ``optimizer`` (however they are sharded now: DCP reshards)
    and ``scheduler``; call on every rank.

    If the world size and ``layout`` equal the saved ones, this rank's per-rank state is returned and
    (``restore_rng``) its RNG states restored: the run continues exactly. Otherwise ``per_rank`` is None
    and a warning says the data order restarts deterministically from the recorded step / tokens.
    ``state_adapter``: as in ``CheckpointManager`` (e.g. global expert tensors under EP); it must share
    storage with the state it adapts, since DCP loads in place. ``model_config``: the model's config.json
    dict; any architectural difference from the recorded one is refused (``check_same_architecture``, with
    ``normalize_model_config``). A tensor whose saved shape differs from the model's is refused by name."""
    path = Path(path)
    require_complete(path)
    ts = read_trainer_state(path)
    if model_config is not None:
        check_same_architecture(path, ts.get("model_config"), model_config, normalize_model_config)
    t0 = time.perf_counter()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
        state = {"model": _stored_model_state(model, model_sd, trainable_only), "optim": optim_sd}
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        model_sd = get_model_state_dict(model, options=_options(trainable_only))
        state = {"model": _stored_model_state(model, model_sd, trainable_only)}
    _check_keys(path, state)
    if trainable_only:
        _check_nothing_trained_is_dropped(path, model, state)
    absent = _drop_absent_optimizer_state(path, state)
    adapted = state_adapter(state) if state_adapter is not None else state
    _check_shapes(path, adapted)
    safe_dcp_load(adapted, path / DCP_DIR, process_group=process_group)
    for alias, name in tied_aliases(model).items():   # set_state_dict wants every name: a tied one is the same tensor
        if alias in model_sd and name in state["model"]:
            state["model"][alias] = state["model"][name]
    if optimizer is not None:
        # strict=False only lets parameters without saved optimiser state stay without (model keys were checked)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=not absent and not trainable_only,
                                                ignore_frozen_params=trainable_only))
    else:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"], options=_options(trainable_only))
    if scheduler is not None:
        if ts.get("scheduler") is None:
            raise CheckpointError(f"{path / TRAINER_STATE}: has no scheduler state but a scheduler was given")
        scheduler.load_state_dict(ts["scheduler"])

    world = _world(process_group)
    saved_layout = ts["layout"]
    same = ts["world_size"] == world and (layout is None or saved_layout == layout)
    per_rank = None
    if same:
        rf = _read_rank_file(path, _rank(process_group), world, ts["step"])
        per_rank = rf["state"]
        if restore_rng:
            restore_rng_state(rf["rng"])
    elif _rank(process_group) == 0:
        log.warning(
            "checkpoint %s was saved with world size %d, layout %s; now world size %d, layout %s: weights and "
            "optimiser were resharded, but per-rank data-loader and RNG state cannot be reused. The data order "
            "restarts deterministically from the recorded progress (step %d, %d tokens seen).",
            path, ts["world_size"], saved_layout, world, layout, ts["step"], ts["tokens_seen"])
    log.info("loaded checkpoint %s (step %d) in %.2fs", path, ts["step"], time.perf_counter() - t0)
    return ResumeState(path=path, step=int(ts["step"]), tokens_seen=int(ts["tokens_seen"]), exact=same,
                       per_rank=per_rank, trainer_state=ts)


def _check_keys(path: Path, state: dict[str, Any]) -> None:
    """Fail listing the model tensors the checkpoint lacks (DCP's own error names only the first)."""
    md = read_dcp_metadata(path / DCP_DIR)
    have = set(md.state_dict_metadata)
    missing = [f"model.{k}" for k in state["model"] if f"model.{k}" not in have]
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise CheckpointError(f"{path / DCP_DIR}: the model has {len(missing)} tensor(s) the checkpoint lacks: {shown}")


def _check_nothing_trained_is_dropped(path: Path, model: torch.nn.Module, state: dict[str, Any]) -> None:
    """A checkpoint of what trained (``trainable_only``) may hold tensors of this model that are frozen now (e.g. LoRA
    adapters a resume's ``model.freeze`` covers): loading would skip them and keep their initial values, losing
    what they learnt, silently. Fail naming them."""
    md = read_dcp_metadata(path / DCP_DIR)
    aliases = tied_aliases(model)
    names = {clean_fqn(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    dropped = sorted(k for k in names - set(state["model"]) - set(aliases) if f"model.{k}" in md.state_dict_metadata)
    if dropped:
        shown = ", ".join(dropped[:5]) + (f", ... and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        raise CheckpointError(f"{path}: the checkpoint holds {len(dropped)} trained tensor(s) that this run freezes "
                              f"({shown}): resuming would reset them to their initial values; resume with the "
                              "recorded model.freeze / model.lora settings")


def _tensor_leaves(obj: Any, prefix: str = ""):
    """(DCP key, tensor) of every tensor in a nested state dict, keyed as DCP flattens it (``optim.state.<fqn>.exp_avg``)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensor_leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensor_leaves(v, f"{prefix}.{i}")


def _check_shapes(path: Path, state: dict[str, Any]) -> None:
    """Fail naming every tensor whose saved (global) shape differs from the model's, with both shapes (DCP's own
    error is a bare ``ValueError`` about the first one)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_dcp_metadata(path / DCP_DIR).state_dict_metadata
    bad = [f"{key} is {list(md[key].size)} in the checkpoint but {list(t.shape)} in the model"
           for key, t in _tensor_leaves(state)
           if isinstance(md.get(key), TensorStorageMetadata) and tuple(md[key].size) != tuple(t.shape)]
    if bad:
        shown = "; ".join(bad[:20]) + (f"; ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise CheckpointError(f"{path / DCP_DIR}: {len(bad)} tensor(s) do not fit the model: {shown}")


def _drop_absent_optimizer_state(path: Path, state: dict[str, Any]) -> list[str]:
    """Remove optimiser state of parameters that had none when saved (never got a gradient, e.g. a vision
    tower in a text-only run): ``get_state_dict`` invents it for a fresh optimiser, and keeping it would
    both fail the DCP load and make those parameters' later Adam steps differ from an uninterrupted run."""
    if "optim" not in state:
        return []
    have = set(read_dcp_metadata(path / DCP_DIR).state_dict_metadata)
    per_param = state["optim"].get("state", {})
    absent = [fqn for fqn, st in per_param.items() if not any(f"optim.state.{fqn}.{k}" in have for k in st)]
    for fqn in absent:
        del per_param[fqn]
    if absent:
        log.info("%s: %d parameter(s) had no optimiser state when saved (e.g. %s); left without state",
                 path, len(absent), absent[0])
    return absent
