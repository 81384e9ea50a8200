"""``rynnscale ckpt inspect``: what a checkpoint holds, from its JSON files and DCP metadata only
(no tensor data is read, nothing is unpickled beyond the allow-listed DCP metadata)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rynnscale.checkpoint.dcp import (
    COMPLETE,
    DCP_DIR,
    TRAINER_STATE,
    CheckpointError,
    check_complete,
    missing_storage_files,
    read_dcp_metadata,
    read_trainer_state,
)
from rynnscale.models import ArchConfigError, args_from_hf_config, family_of


def _nbytes(meta) -> int:
    import torch

    n = 1
    for s in meta.size:
        n *= s
    return n * torch.empty((), dtype=meta.properties.dtype).element_size()


def inspect_checkpoint(ckpt: str | os.PathLike) -> dict[str, Any]:
    """Summary of checkpoint ``ckpt`` as plain data: completeness, step, tokens, world size, layout,
    config summary, model tensors (name, shape, dtype, bytes, saved chunks) and optimiser totals."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a directory")
    reason = check_complete(ckpt)
    damaged = []   # JSON files that are unreadable or malformed: reported, not a traceback
    ts = _json_object(ckpt / TRAINER_STATE, damaged)
    if ts and not damaged:
        try:
            read_trainer_state(ckpt)
        except CheckpointError as e:
            damaged.append(str(e))
    if (ckpt / COMPLETE).is_file():
        marker = _json_object(ckpt / COMPLETE, damaged)
    reason = "; ".join(([reason] if reason else []) + damaged)
    out: dict[str, Any] = {"path": str(ckpt), "complete": not reason, "incomplete_reason": reason or None}
    out.update({k: ts.get(k) for k in ("step", "tokens_seen", "world_size", "layout", "torch_version")})
    if (ckpt / COMPLETE).is_file():
        out["complete_marker"] = marker
    cfg = _obj(ts.get("config"))
    mc = _obj(ts.get("model_config") or _obj(cfg.get("model")).get("arch"))
    text = _obj(mc.get("text_config", mc))   # a text-only family's config.json is flat
    out["config_summary"] = {
        "model_type": mc.get("model_type"), "init_from": _obj(cfg.get("model")).get("init_from"),
        "hidden_size": text.get("hidden_size"), "num_hidden_layers": text.get("num_hidden_layers"),
        "num_experts": text.get("num_experts", 0), "vocab_size": text.get("vocab_size"),
        "max_steps": _obj(cfg.get("train")).get("max_steps"), "lr": _obj(cfg.get("optim")).get("lr"),
        "parallel": cfg.get("parallel"),
    }
    out["rank_files"] = sorted(p.name for p in ckpt.glob("rank_*.json"))
    tensors, optim = [], {"tensors": 0, "bytes": 0, "by_kind": {}}
    if (ckpt / DCP_DIR / ".metadata").is_file():
        md = read_dcp_metadata(ckpt / DCP_DIR)   # refuses storage paths outside the checkpoint
        problems = missing_storage_files(ckpt / DCP_DIR, md)
        if problems:   # a truncated copy: every file the metadata references must be there, long enough
            shown = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else "")
            out["complete"] = False
            out["incomplete_reason"] = (reason + "; " if reason else "") + f"data files: {shown}"
        for key, meta in md.state_dict_metadata.items():
            if not isinstance(meta, TensorStorageMetadata):
                continue
            nb = _nbytes(meta)
            if key.startswith("model."):
                tensors.append({"name": key[len("model."):], "shape": list(meta.size),
                                "dtype": str(meta.properties.dtype).removeprefix("torch."), "bytes": nb,
                                "chunks": len(meta.chunks)})
            elif key.startswith("optim."):
                kind = key.rsplit(".", 1)[-1]
                optim["tensors"] += 1
                optim["bytes"] += nb
                optim["by_kind"][kind] = optim["by_kind"].get(kind, 0) + nb
    # a tied lm_head is the embedding: counted once (checkpoints written before store it twice)
    out["tied"] = _tied_names(mc) if mc.get("tie_word_embeddings", text.get("tie_word_embeddings")) else {}
    for t in tensors:
        if t["name"] in out["tied"]:
            t["tied_to"] = out["tied"][t["name"]]
    out["model_tensors"] = tensors
    out["model_bytes"] = sum(t["bytes"] for t in tensors)
    out["model_params"] = sum(_numel(t["shape"]) for t in tensors if "tied_to" not in t)
    out["optimizer"] = optim
    return out


def _obj(v: Any) -> dict[str, Any]:
    """``v`` if it is a JSON object, else an empty one (a hand-edited file may hold anything)."""
    return v if isinstance(v, dict) else {}


def _json_object(path: Path, damaged: list[str]) -> dict[str, Any]:
    """The JSON object in ``path`` ({} if absent); a file that cannot be read or holds no object is
    added to ``damaged``, naming it, and reads as {}."""
    if not path.is_file():
        return {}
    try:
        v = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        damaged.append(f"{path.name} unreadable ({type(e).__name__}: {e})")
        return {}
    if not isinstance(v, dict):
        damaged.append(f"{path.name} holds a JSON {type(v).__name__}, expected an object")
        return {}
    return v


def _tied_names(model_config: dict[str, Any]) -> dict[str, str]:
    """The family's tied head -> embedding tensor names for ``model_config``; none for an unknown family."""
    try:
        keys = family_of(args_from_hf_config(model_config)).state_dict
    except ArchConfigError:
        return {}
    return {keys.lm_head_key: keys.embed_key}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_inspection(info: dict[str, Any], max_tensors: int | None = None) -> str:
    """Human-readable report of ``inspect_checkpoint``'s result."""
    lines = [f"checkpoint: {info['path']}",
             f"complete:   {'yes' if info['complete'] else 'NO (' + str(info['incomplete_reason']) + ')'}",
             f"step:       {info.get('step')}", f"tokens:     {info.get('tokens_seen')}",
             f"world size: {info.get('world_size')}   layout: {info.get('layout')}",
             "config:     " + ", ".join(f"{k}={v}" for k, v in info["config_summary"].items() if v is not None),
             f"rank files: {len(info['rank_files'])}",
             f"model:      {len(info['model_tensors'])} tensors, {info['model_params']:,} parameters, "
             f"{_human(info['model_bytes'])}" + "".join(f"; {a} tied to {b}" for a, b in info["tied"].items()),
             f"optimizer:  {info['optimizer']['tensors']} tensors, {_human(info['optimizer']['bytes'])} "
             + str({k: _human(v) for k, v in info["optimizer"]["by_kind"].items()}),
             "tensors:"]
    shown = info["model_tensors"] if max_tensors is None else info["model_tensors"][:max_tensors]
    width = max((len(t["name"]) for t in shown), default=0)
    for t in shown:
        lines.append(f"  {t['name']:<{width}}  {str(t['shape']):<18} {t['dtype']:<9} {_human(t['bytes']):>10}"
                     f"  ({t['chunks']} chunk{'s' if t['chunks'] != 1 else ''})"
                     + (f"  stored copy of the tied {t['tied_to']}, not counted" if "tied_to" in t else ""))
    if len(shown) < len(info["model_tensors"]):
        lines.append(f"  ... and {len(info['model_tensors']) - len(shown)} more")
    return "\n".join(lines)
