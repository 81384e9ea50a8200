"""Export a training checkpoint (DCP) to a Hugging Face directory, streaming one tensor at a time.

The safetensors format puts a JSON header with every tensor's dtype, shape and byte offsets before the
data. DCP metadata tells us all of them up front, so each shard's header is written first and tensors
are then loaded one by one (``dcp.load`` of a one-tensor state dict, all chunks of all saving ranks
assembled by DCP) and their bytes appended. Peak memory: the tensor being written plus the largest
chunk DCP reads for it (at most 2x the largest tensor, about 1x + 1/N for a checkpoint saved by N
ranks), independent of the shard size and of the model size. Runs in one process, no process group.

Output is what ``rynnscale.checkpoint.hf.export_hf`` writes (same file names, index, config.json,
experts in the family's default layout ``export_layouts[0]`` named in the ``rynnscale.expert_layout`` shard
metadata), plus the tokenizer / processor files ``export_side_files``
picks (the run's own, or ``copy_from``'s), so transformers loads it with ``from_pretrained`` (model, tokenizer
and processor) and ``load_hf_weights`` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from rynnscale.checkpoint.adapter import export_adapter
from rynnscale.checkpoint.dcp import (
    DCP_DIR,
    TRAINER_STATE,
    CheckpointError,
    read_dcp_metadata,
    read_trainer_state,
    reading_checkpoint,
    require_complete,
    safe_dcp_load,
)
from rynnscale.checkpoint.hf import (
    INDEX_FILE,
    LAYOUT_METADATA_KEY,
    SINGLE_FILE,
    HFCheckpointError,
    HFTensorReader,
    _listing,
    _replace_dir,
    check_export_target,
    export_entries,
    export_pieces,
    hf_param_shapes,
    main_float_dtype,
    side_files,
    write_config_and_side_files,
)
from rynnscale.data.tokenizer import default_tokenizer_dir, run_tokenizer
from rynnscale.fsutil import atomic_write_bytes, sha256_file
from rynnscale.models import args_from_hf_config, family_of, read_hf_config
from rynnscale.models.lora import LoRASpec, is_adapter_param, lora_delta

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."   # DCP key prefix of model tensors in our checkpoints ({"model": ..., "optim": ...})
_ST_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


@dataclass
class CheckpointExportReport:
    out_dir: str
    files: list[str]
    num_tensors: int
    total_bytes: int
    largest_tensor_bytes: int
    dtype: str
    seconds: float
    side_files: dict[str, str]     # tokenizer / processor file -> the file it was copied from


def run_init_from(ckpt: str | os.PathLike) -> str | None:
    """The ``model.init_from`` of the run that wrote ``ckpt``, as this process reaches it. A relative path is the
    training command's, relative to its working directory, not to this one: a LoRA run's base is then the absolute
    directory the run recorded with the base's content hash (``extra.lora_base.init_from``) while it exists."""
    ts = read_trainer_state(ckpt)
    init_from = ((ts.get("config") or {}).get("model") or {}).get("init_from")
    if init_from is None or Path(init_from).is_absolute():
        return init_from
    recorded = ((ts.get("extra") or {}).get("lora_base") or {}).get("init_from")
    return recorded if recorded and Path(recorded).is_dir() else init_from


def checkpoint_model_args(ckpt: str | os.PathLike, copy_from: str | os.PathLike | None = None) -> Any:
    """The model architecture of checkpoint ``ckpt``, from its ``trainer_state.json``: ``model_config``
    (HF config.json dict written by the trainer), else the run config's ``model.arch``, else the
    ``config.json`` of ``model.init_from``, else of ``copy_from``."""
    ckpt = Path(ckpt)
    ts_path = ckpt / TRAINER_STATE
    if not ts_path.is_file():
        raise CheckpointError(f"{ts_path}: no such file (not a rynnscale checkpoint)")
    ts = read_trainer_state(ckpt)
    if ts.get("model_config"):
        return args_from_hf_config(ts["model_config"], where=f"{ts_path}:model_config")
    model_cfg = (ts.get("config") or {}).get("model") or {}
    if model_cfg.get("arch"):
        return args_from_hf_config(dict(model_cfg["arch"]), strict=True, where=f"{ts_path}:config.model.arch")
    tried = []
    for src in (run_init_from(ckpt), copy_from):
        if src is not None:
            tried.append(str(src))
            if (Path(src) / "config.json").is_file():
                return read_hf_config(src)[0]
    raise CheckpointError(f"{ts_path}: no model_config or config.model.arch, and no config.json in "
                          f"{tried or 'model.init_from / --copy-from (neither given)'}; pass --copy-from INIT_DIR")


def export_side_files(ckpt: str | os.PathLike, copy_from: str | os.PathLike | None = None) -> dict[str, Path]:
    """The tokenizer / processor / generation files an export of ``ckpt`` gets (name -> source), for the
    ``checkpoint.export_hf`` hook and ``rynnscale ckpt export-hf`` alike: all of ``copy_from``'s when given;
    else the processor / generation files of the run's ``model.init_from`` and the tokenizer files of the
    tokenizer the run read its data with (``data.tokenizer``, else init_from's, else the bundled Qwen3 one),
    both from the run config saved in the checkpoint. A source the run named but this machine lacks is an
    error naming it: exporting another tokenizer in its place would go unnoticed."""
    if copy_from is not None:
        return side_files(copy_from)
    ts_path = Path(ckpt) / TRAINER_STATE
    cfg = read_trainer_state(ckpt).get("config") or {}
    init_from = run_init_from(ckpt)
    tokenizer = (cfg.get("data") or {}).get("tokenizer")
    for key, path in (("model.init_from", init_from), ("data.tokenizer", tokenizer)):
        if path and not Path(path).exists():
            where = "" if Path(path).is_absolute() else \
                f" (a path relative to the directory the run was started in, not to {Path.cwd()})"
            raise CheckpointError(f"{ts_path}: the run's {key}={path} does not exist on this machine{where}, so its "
                                  "tokenizer / processor files cannot be exported; pass --copy-from DIR (a directory "
                                  "holding them, e.g. the init model)")
    tok = run_tokenizer(tokenizer, init_from) or default_tokenizer_dir()
    return side_files(init_from, None if tok == init_from else tok)


def tokenizer_origin(report: CheckpointExportReport) -> str:
    """Where an export's tokenizer came from, for its log line ("none" when nothing was copied)."""
    src = report.side_files.get("tokenizer.json")
    return str(Path(src).parent) if src else "none"


def checkpoint_lora_spec(ckpt: str | os.PathLike) -> LoRASpec | None:
    """The ``model.lora`` of the run that wrote ``ckpt`` (from its saved config), None for a full fine-tune."""
    ts = read_trainer_state(ckpt)
    lc = ((ts.get("config") or {}).get("model") or {}).get("lora") or {}
    if int(lc.get("rank") or 0) <= 0:
        return None
    return LoRASpec(rank=int(lc["rank"]), alpha=float(lc["alpha"]), trainable=tuple(lc.get("trainable") or ()))


def base_fingerprint(init_from: str | os.PathLike, cache: Path | None = None) -> dict[str, Any]:
    """Content hash of a LoRA run's base model directory (``config.json`` + weight files + index): a
    sha256 over the per-file sha256s. Per-file hashes are cached in ``cache`` by (size, mtime), so a
    restart re-reads only files that changed (None: no cache). Rank 0 only (it reads the whole base once per
    change)."""
    root = Path(init_from)
    files = sorted(p for p in root.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix == ".safetensors"
                                                                 or p.name.endswith(".safetensors.index.json")))
    try:
        old = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    except (OSError, json.JSONDecodeError):
        old = {}
    per_file = {}
    for p in files:
        st = p.stat()
        key = [st.st_size, st.st_mtime_ns]
        hit = old.get(p.name)
        per_file[p.name] = {"stat": key, "sha256": hit["sha256"] if hit and hit.get("stat") == key else sha256_file(p)}
    if cache is not None:
        atomic_write_bytes(cache, json.dumps(per_file, indent=1).encode())
    total = hashlib.sha256("".join(f"{n}:{v['sha256']}\n" for n, v in per_file.items()).encode()).hexdigest()
    return {"init_from": str(root.resolve()), "sha256": total, "files": len(per_file)}


def check_export_base(ckpt: str | os.PathLike, base_dir: Path) -> None:
    """An adapters-only checkpoint records its base's content hash (``extra.lora_base``): merging its adapters
    into another base writes a wrong model, so that is refused, naming both hashes."""
    ts = read_trainer_state(ckpt)
    saved = (ts.get("extra") or {}).get("lora_base")
    if not isinstance(saved, dict) or "sha256" not in saved:
        return
    now = base_fingerprint(base_dir)
    if now["sha256"] != saved["sha256"]:
        raise CheckpointError(
            f"{ckpt}: its LoRA adapters were trained on the base {saved.get('init_from')} (content sha256 "
            f"{saved['sha256'][:16]}...), but {base_dir} hashes to {now['sha256'][:16]}...; merged into another "
            "base they give a wrong model. Pass --copy-from the original base.")


def checkpoint_base_dir(ckpt: str | os.PathLike, copy_from: str | os.PathLike | None = None) -> Path:
    """The base model directory of a LoRA run's checkpoint: its ``model.init_from`` (else ``copy_from``)."""
    init_from = run_init_from(ckpt)
    for src in (init_from, copy_from):
        if src is not None and (Path(src) / "config.json").is_file():
            return Path(src)
    if init_from is None and copy_from is None:
        raise CheckpointError(
            f"{ckpt}: holds only LoRA adapters, trained on a randomly initialised base (the run had no "
            "model.init_from), so there is no base model to merge them into; give LoRA a base model to train on "
            "(model.init_from)")
    raise CheckpointError(f"{ckpt}: holds only the LoRA adapters and its base model (model.init_from) is not on "
                          "this machine; pass --copy-from BASE_DIR")


def _adapters_of(name: str, stored: dict[str, Any]) -> tuple[str, str] | None:
    """The (A, B) adapter names of base tensor ``name`` in the checkpoint, if it was LoRA-trained."""
    for a in (name.removesuffix(".weight") + ".lora_A", name + "_lora_A"):
        if a in stored and a[:-1] + "B" in stored:
            return a, a[:-1] + "B"
    return None


def _merged(ckpt: Path, name: str, stored: dict[str, Any], spec: LoRASpec | None,
            base: HFTensorReader | None) -> torch.Tensor:
    """Base tensor ``name`` with its LoRA update folded in (``W + (alpha/r) B A``), or as stored. A LoRA
    run's checkpoint holds only what trained: frozen tensors come from its base (``base``)."""
    x = load_checkpoint_tensor(ckpt, name, stored[name]) if name in stored else base(name)
    pair = _adapters_of(name, stored) if spec is not None else None
    if pair is None:
        return x
    a, b = (load_checkpoint_tensor(ckpt, n, stored[n]) for n in pair)
    return (x.float() + spec.scaling * lora_delta(a, b)).to(x.dtype)


def export_checkpoint_adapter(ckpt: str | os.PathLike, out_dir: str | os.PathLike, *,
                              base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """The PEFT adapter directory of a LoRA run's checkpoint (``rynnscale.checkpoint.adapter``); its base model
    is recorded as ``base_model_name_or_path``, by default the run's ``model.init_from`` (``run_init_from``; absolute
    when it is a directory here). The checkpoint is held
    (``reading_checkpoint``) meanwhile, so the run that wrote it does not prune it."""
    with reading_checkpoint(ckpt):
        return _export_checkpoint_adapter(Path(ckpt), out_dir, base_model_name_or_path, overwrite)


def _export_checkpoint_adapter(ckpt: Path, out_dir: str | os.PathLike, base_model_name_or_path: str | None,
                               overwrite: bool) -> Path:
    require_complete(ckpt)
    if base_model_name_or_path is None:   # a directory found from here is named absolutely (peft resolves it later)
        base_model_name_or_path = run_init_from(ckpt)
        if base_model_name_or_path is not None and Path(base_model_name_or_path).is_dir():
            base_model_name_or_path = str(Path(base_model_name_or_path).resolve())
    spec = checkpoint_lora_spec(ckpt)
    if spec is None:
        raise CheckpointError(f"{ckpt}: not a LoRA run (its config has model.lora.rank = 0); nothing to export "
                              "as an adapter")
    base_dir = base_model_name_or_path if base_model_name_or_path and Path(base_model_name_or_path).is_dir() else None
    _refuse_overlapping_output(ckpt, out_dir, base_dir, {})
    stored = _model_tensors_md(ckpt)
    adapters = {n: load_checkpoint_tensor(ckpt, n, stored[n]) for n in stored if is_adapter_param(n)}
    try:   # the base's transformers class, for peft's AutoPeftModel (optional: the adapter loads without it)
        base_class = (checkpoint_model_args(ckpt, base_dir).to_hf_config().get("architectures") or [None])[0]
    except (CheckpointError, ValueError) as e:   # no architecture recorded, or one that no longer parses
        log.warning("%s: the adapter's config names no base model class (%s); peft.PeftModel.from_pretrained(base, "
                    "adapter) applies it all the same", ckpt, e)
        base_class = None
    return export_adapter(adapters, spec, out_dir, base_model_name_or_path=base_model_name_or_path,
                          base_model_class=base_class, overwrite=overwrite)


def _model_tensors_md(ckpt: Path) -> dict[str, Any]:
    """HF name -> DCP TensorStorageMetadata of every model tensor in the checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_dcp_metadata(Path(ckpt) / DCP_DIR)
    return {k[len(MODEL_PREFIX):]: v for k, v in md.state_dict_metadata.items()
            if k.startswith(MODEL_PREFIX) and isinstance(v, TensorStorageMetadata)}


def load_checkpoint_tensor(ckpt: str | os.PathLike, name: str, meta: Any | None = None) -> torch.Tensor:
    """One model tensor of checkpoint ``ckpt`` as a full CPU tensor (all saved shards assembled)."""
    ckpt = Path(ckpt)
    if meta is None:
        meta = _model_tensors_md(ckpt).get(name)
        if meta is None:
            raise CheckpointError(f"{ckpt / DCP_DIR}: no model tensor {name!r}")
    target = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    try:
        safe_dcp_load({"model": {name: target}}, ckpt / DCP_DIR, local_only=True)  # one process, even inside a job
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:   # DCP's CheckpointException is a BaseException
        errors = [f[0] for f in getattr(e, "failures", {}).values() if isinstance(f, tuple) and f] or [e]
        why = "; ".join(f"{type(x).__name__}: {str(x)[:200]}" for x in errors)
        raise CheckpointError(f"{ckpt / DCP_DIR}: model tensor {name!r} could not be read ({why}); its data files "
                              "are damaged, or were removed while reading (e.g. pruned by the run that wrote "
                              "them)") from e
    return target


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """safetensors header (8-byte length + JSON padded to 8 bytes) for tensors written in this order."""
    head: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dt, shape in entries:
        n = _nbytes(dt, shape)
        head[name] = {"dtype": _ST_DTYPE[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _nbytes(dt: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dt).element_size()


def _refuse_overlapping_output(ckpt: Path, out_dir: str | os.PathLike, copy_from: str | os.PathLike | None,
                               sources: dict[str, Path]) -> None:
    """Replacing ``out_dir`` (``overwrite``) deletes it: refuse one that is, holds or lies inside the checkpoint,
    or is / holds ``copy_from`` or a directory the side files come from (e.g. ``export-hf RUN/checkpoints/step_N
    RUN --overwrite`` would delete the run, ``export-hf CKPT INIT_DIR --overwrite`` the init model)."""
    out = Path(out_dir).resolve()
    named = [("the checkpoint", ckpt.resolve())]
    if copy_from is not None:
        named.append(("the --copy-from directory", Path(copy_from).resolve()))
    named += [("the directory the tokenizer / processor files come from", d)
              for d in sorted({src.parent.resolve() for src in sources.values()})]
    for what, src in named:
        if out == src or out in src.parents:
            raise CheckpointError(f"output directory {out_dir} {'is' if out == src else 'contains'} {what} {src}: "
                                  "exporting there would delete it; choose a separate output directory")
    if ckpt.resolve() in out.parents:
        raise CheckpointError(f"output directory {out_dir} lies inside the checkpoint {ckpt}; choose a directory "
                              "outside it")


def export_checkpoint_hf(ckpt: str | os.PathLike, out_dir: str | os.PathLike, *,
                         copy_from: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                         max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> CheckpointExportReport:
    """Write a transformers directory from the model tensors of checkpoint ``ckpt``.

    ``copy_from``: the init model directory (tokenizer / processor / generation config are copied from it,
    replacing the run's own, ``export_side_files``; also the architecture when the checkpoint records none). ``dtype`` casts floating tensors (e.g.
    ``torch.bfloat16``); default keeps the stored dtype. Names and shapes are checked against the
    architecture before anything is written (one ``HFCheckpointError`` listing every problem). The
    directory is written under a temporary name beside ``out_dir`` and renamed when complete. The checkpoint is
    held (``reading_checkpoint``) meanwhile, so the run that wrote it does not prune it."""
    with reading_checkpoint(ckpt):
        return _export_checkpoint_hf(Path(ckpt), out_dir, copy_from, dtype, max_shard_bytes, overwrite)


def _export_checkpoint_hf(ckpt: Path, out_dir: str | os.PathLike, copy_from: str | os.PathLike | None,
                          dtype: torch.dtype | None, max_shard_bytes: int, overwrite: bool) -> CheckpointExportReport:
    t0 = time.perf_counter()
    require_complete(ckpt)
    sources = export_side_files(ckpt, copy_from)
    _refuse_overlapping_output(ckpt, out_dir, copy_from, sources)
    out_dir, copy_from = check_export_target(out_dir, copy_from, max_shard_bytes, overwrite)
    args = checkpoint_model_args(ckpt, copy_from)
    expected = hf_param_shapes(args)
    keys = family_of(args).state_dict
    head_key, embed_key = keys.lm_head_key, keys.embed_key
    stored = _model_tensors_md(ckpt)
    spec = checkpoint_lora_spec(ckpt)   # a LoRA run exports merged
    base = None
    if spec is not None and any(n not in stored for n in expected):  # adapter-only checkpoint
        base_dir = checkpoint_base_dir(ckpt, copy_from)
        check_export_base(ckpt, base_dir)
        base = HFTensorReader(base_dir, args)

    problems = []
    missing = [n for n in expected if n not in stored and base is None]
    unexpected = [n for n in stored if n not in expected and not (n == head_key and args.tie_word_embeddings)
                  and not (spec is not None and is_adapter_param(n))]
    mismatched = [f"{n}: checkpoint {list(stored[n].size)} vs {list(expected[n])} from the model config"
                  for n in expected if n in stored and tuple(stored[n].size) != expected[n]]
    if missing:
        problems.append(_listing("tensors the model config requires but the checkpoint lacks", missing))
    if unexpected:
        problems.append(_listing("checkpoint model tensors not in the Hugging Face layout", unexpected))
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if problems:
        raise HFCheckpointError(f"cannot export checkpoint {ckpt}:\n" + "\n".join(problems))

    def out_dtype(name: str) -> torch.dtype:
        dt = stored[name].properties.dtype if name in stored else base.dtype(name)
        return dtype if dtype is not None and dt.is_floating_point else dt

    # plan shards in the architecture's order: a shard closes before it would exceed max_shard_bytes
    shards: list[list[str]] = [[]]
    size = 0
    for name in expected:
        n = _nbytes(out_dtype(name), expected[name])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    fnames = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    total = largest = 0
    tied_checked = False
    try:
        layout = keys.export_layouts[0]
        meta = {"format": "pt", LAYOUT_METADATA_KEY: layout}
        for fname, names in zip(fnames, shards):
            entries = [(n, out_dtype(n), expected[n]) for n in names]
            stored_as = {n: export_entries(n, expected[n], keys.expert_kind(n), layout) for n in names}
            with open(tmp / fname, "wb") as f:
                f.write(_header([(sn, dt, shape) for n, dt, _ in entries for sn, shape, _ in stored_as[n]], meta))
                for name, dt, _ in entries:
                    x = _merged(ckpt, name, stored, spec, base)
                    if args.tie_word_embeddings and name == embed_key and head_key in stored \
                            and embed_key in stored and not tied_checked:
                        tied_checked = True
                        head = load_checkpoint_tensor(ckpt, head_key, stored[head_key])
                        if not torch.equal(head, x):
                            raise HFCheckpointError(f"{ckpt}: the config ties word embeddings but the checkpoint's "
                                                    f"{head_key} differs from {embed_key}")
                        del head
                    if x.dtype != dt:
                        x = x.to(dt)
                    nbytes = x.numel() * x.element_size()
                    for _, piece in export_pieces(name, x.contiguous(), keys.expert_kind(name), layout):
                        if piece.numel():
                            f.write(memoryview(piece.contiguous().view(torch.uint8).numpy()))
                    total += nbytes
                    largest = max(largest, nbytes)
                    del x
                f.flush()
                os.fsync(f.fileno())
        files = list(fnames)
        if len(fnames) > 1:
            weight_map = {sn: fname for fname, names in zip(fnames, shards) for n in names
                          for sn, _, _ in export_entries(n, expected[n], keys.expert_kind(n), layout)}
            index = {"metadata": {"total_parameters": sum(_nbytes(torch.uint8, s) for s in expected.values()),
                                  "total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            files.append(INDEX_FILE)
        float_bytes: Counter[torch.dtype] = Counter()
        for n, shape in expected.items():
            if out_dtype(n).is_floating_point:
                float_bytes[out_dtype(n)] += _nbytes(out_dtype(n), shape)
        main_dtype = main_float_dtype(float_bytes, dtype)
        files += write_config_and_side_files(tmp, args, main_dtype, sources)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CheckpointExportReport(out_dir=str(out_dir), files=files, num_tensors=len(expected), total_bytes=total,
                                  largest_tensor_bytes=largest, dtype=str(main_dtype).removeprefix("torch."),
                                  seconds=time.perf_counter() - t0, side_files={k: str(v) for k, v in sources.items()})
