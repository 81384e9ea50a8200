"""Hugging Face checkpoint import / export for every model family.

Our models' state-dict keys and layouts are transformers' own, so import / export is a key mapping plus
validation, not a conversion; the family's ``StateDictAdapter`` (``rynnscale.models.spec``) gives the
tensor names and shapes, the key variants it accepts and which tensors are fused experts (e.g. Qwen3-VL-MoE:
``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``). Only safetensors and JSON are read or written (no pickle).

Fused-expert layouts ("expert_layout")
- ``"v5"``: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]`` (``F.linear`` weights). The layout
  of our model and of transformers 5 modules; transformers 5 ``save_pretrained`` writes it
  (checked with 5.24, also after loading a hub-layout checkpoint).
- ``"hub"``: ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``. What Qwen's released
  Qwen3-VL-MoE checkpoints store (written by transformers 4.57) and what transformers 5 transposes
  on load (``conversion_mapping.py``: ``qwen3_vl_moe`` -> ``Transpose(1, 2, check_dims=True)``).
  Released Qwen3-VL-MoE checkpoints hold no per-expert tensors.
- ``"per_expert"``: ``experts.{e}.gate_proj.weight [I, H]``, ``up_proj [I, H]``, ``down_proj [H, I]``
  per expert, what transformers 5's ``save_pretrained`` writes for families whose conversion mapping fuses them
  on load (``qwen2_moe`` rules: Qwen3.5-MoE; also the released Qwen3.5-MoE checkpoints, and so what other readers
  of them expect: Qwen3.5-MoE exports it by default, ``StateDictAdapter.export_layouts``). Such a group is read
  as the fused tensor of the family's ``StateDictAdapter`` (``expert_kind``: ``{prefix}.gate_up_proj`` rows
  ``[gate_e; up_e]``, ``{prefix}.down_proj``), expert by expert (an EP / FSDP rank reads only its experts);
  every expert must be present, with consistent shapes.

A family's ``canonical_key`` may map a checkpoint key to None: a tensor the model does not have on purpose (e.g.
Qwen3.5's multi-token-prediction head ``mtp.*``, which transformers skips too); it is listed in the report's notes.

A non-square expert tensor's shape names its layout. When ``H == 2I`` (``gate_up_proj``) or
``H == I`` (``down_proj``) both layouts have the same shape; transformers then assumes "v5" and
silently loads a hub checkpoint transposed (huggingface/transformers#47031). We never guess: a
square tensor takes the checkpoint's *declared* layout, in this order: the ``expert_layout``
argument, the ``rynnscale.expert_layout`` metadata our export writes into every shard, the
``transformers_version`` in config.json (< 5: "hub"; >= 5: "v5"). No declaration -> error. A
declaration that a non-square tensor of the same checkpoint contradicts is not trusted for the
square ones (error); an explicit ``expert_layout`` argument that a shape contradicts is an error too.
Otherwise non-square tensors follow their shape, as in transformers. All checks read safetensors
headers only, before any parameter is written, so a refused checkpoint leaves the model untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rynnscale.models import HFCheckpointError, StateDictAdapter, family, family_of, read_hf_config
from rynnscale.models.lora import is_adapter_param, lora_spec_of, merge_lora_state
from rynnscale.parallel.fqn import clean_fqn

if TYPE_CHECKING:
    from rynnscale.parallel.fsdp import LocalPiece

EXPERT_LAYOUTS = ("v5", "hub")                  # the fused layouts
EXPORT_LAYOUTS = (*EXPERT_LAYOUTS, "per_expert")  # what an export may write
LAYOUT_METADATA_KEY = "rynnscale.expert_layout"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files an export copies verbatim besides the weights and config.json (``side_files``): the tokenizer's, and the
# processor / generation files (plus ``chat_template*``) of the init model.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
)
PROCESSOR_FILES = TOKENIZER_FILES + (
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json", "generation_config.json",
)
_MAX_LISTED = 20
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def hf_param_shapes(args: Any, *, include_tied: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF state dict implied by ``args`` -> its shape (experts in "v5" layout), from its
    family's ``StateDictAdapter``. ``lm_head.weight`` is left out when embeddings are tied (not stored in a
    checkpoint) unless ``include_tied``. This is the contract export validates against."""
    return family_of(args).state_dict.param_shapes(args, include_tied=include_tied)


# ------------------------------------------------------------------------------------ key helpers
def _to_layout(x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Convert a fused expert tensor between "hub" and "v5" (the two differ by a transpose of dims 1, 2)."""
    return x if src == dst else x.transpose(1, 2).contiguous()


def export_entries(name: str, shape: tuple[int, ...], kind: str | None, layout: str
                   ) -> list[tuple[str, tuple[int, ...], tuple[int, slice] | None]]:
    """How tensor ``name`` (our "v5" shape ``shape``; ``kind``: the adapter's ``expert_kind``) is stored by an
    export in ``layout``: [(stored name, stored shape, (expert, row slice) of the v5 tensor or None: all of it)].
    "per_expert" splits ``{prefix}.gate_up_proj [E, 2I, H]`` into ``{prefix}.{e}.gate_proj.weight`` (rows ``:I``)
    and ``up_proj`` (rows ``I:``), ``{prefix}.down_proj [E, H, I]`` into ``{prefix}.{e}.down_proj.weight``."""
    if kind is None or layout != "per_expert":
        stored = (shape[0], shape[2], shape[1]) if kind is not None and layout == "hub" else shape
        return [(name, tuple(stored), None)]
    prefix, (n_experts, rows, cols) = name.rsplit(".", 1)[0], shape
    if kind == "gate_up":
        half = rows // 2
        return [(f"{prefix}.{e}.{proj}.weight", (half, cols), (e, slice(k * half, (k + 1) * half)))
                for e in range(n_experts) for k, proj in enumerate(("gate_proj", "up_proj"))]
    return [(f"{prefix}.{e}.down_proj.weight", (rows, cols), (e, slice(None))) for e in range(n_experts)]


def export_pieces(name: str, x: torch.Tensor, kind: str | None, layout: str) -> list[tuple[str, torch.Tensor]]:
    """The tensors ``export_entries`` names, cut from ``x`` (our "v5" value of ``name``): contiguous views of a
    contiguous ``x`` when split per expert."""
    if kind is None or layout != "per_expert":
        return [(name, _to_layout(x, "v5", layout) if kind is not None else x)]
    return [(n, x[where]) for n, _, where in export_entries(name, tuple(x.shape), kind, layout)]


def _listing(title: str, items: Iterable[str]) -> str:
    items = sorted(items)
    shown = items[:_MAX_LISTED]
    more = f", ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"- {title} ({len(items)}): " + ", ".join(shown) + more


def _raise_if(problems: list[str], where: str) -> None:
    if problems:
        raise HFCheckpointError(f"{where}:\n" + "\n".join(problems))


def _version_layout(raw_cfg: dict[str, Any]) -> str | None:
    """Expert layout implied by the transformers version that wrote the checkpoint (None if unknown)."""
    m = re.match(r"\s*(\d+)\.", str(raw_cfg.get("transformers_version", "")))
    if not m:
        return None
    return "hub" if int(m.group(1)) < 5 else "v5"


# ---------------------------------------------------------------------------------------- reading
@dataclass
class _Source:
    file: Path
    key: str                     # name inside the file
    shape: tuple[int, ...]
    dtype: str                   # safetensors dtype string, e.g. "BF16"
    # a fused expert tensor stored per expert: for each expert, the sources concatenated along dim 0 into its row
    # (gate_up: (gate, up); down: (down,)); ``shape`` is then the fused ("v5") shape
    parts: list[tuple[_Source, ...]] | None = None


_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def _fuse_per_expert(by_name: dict[str, _Source], sd: StateDictAdapter, report: LoadReport) -> list[str]:
    """Replace the per-expert tensors (``{prefix}.{e}.{gate,up,down}_proj.weight``) of every fused expert tensor
    pair the adapter declares by one composite source per fused tensor, in place; returns the problems found."""
    groups: dict[str, dict[str, dict[int, str]]] = {}
    for name in by_name:
        m = _PER_EXPERT.match(name)
        if m and sd.expert_kind(m["prefix"] + ".gate_up_proj") == "gate_up" \
                and sd.expert_kind(m["prefix"] + ".down_proj") == "down":
            groups.setdefault(m["prefix"], {}).setdefault(m["proj"], {})[int(m["e"])] = name
    problems = []
    for prefix, projs in groups.items():
        ids = sorted(set().union(*(p.keys() for p in projs.values())))
        n = len(ids)
        lacking = [f"{prefix}.{e}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")
                   for e in range(max(ids) + 1) if e not in projs.get(proj, {})]
        if lacking:
            problems.append(_listing(f"per-expert tensors of {prefix} missing", lacking))
            continue
        gate, up, down = ([by_name[projs[p][e]] for e in range(n)] for p in ("gate_proj", "up_proj", "down_proj"))
        shapes = {(g.shape, u.shape, d.shape) for g, u, d in zip(gate, up, down)}
        dtypes = {x.dtype for x in (*gate, *up, *down)}
        g_shape, u_shape, d_shape = next(iter(shapes))
        if len(shapes) != 1 or len(dtypes) != 1 or len(g_shape) != 2 or g_shape != u_shape \
                or d_shape != g_shape[::-1]:
            problems.append(f"- per-expert tensors of {prefix}: inconsistent shapes / dtypes "
                            f"(gate, up, down: {sorted(map(str, shapes))[:3]}; {sorted(dtypes)})")
            continue
        for proj in projs.values():
            for name in proj.values():
                del by_name[name]
        inter, hidden = g_shape
        dtype = dtypes.pop()
        by_name[prefix + ".gate_up_proj"] = _Source(gate[0].file, f"{prefix}.*.{{gate,up}}_proj.weight",
                                                    (n, 2 * inter, hidden), dtype, list(zip(gate, up)))
        by_name[prefix + ".down_proj"] = _Source(down[0].file, f"{prefix}.*.down_proj.weight", (n, hidden, inter),
                                                 dtype, [(d,) for d in down])
        report.expert_layout["per_expert"] = report.expert_layout.get("per_expert", 0) + 2
    return problems


def check_safetensors_file(f: Path, max_header: int = 100 << 20) -> None:
    """Refuse a safetensors file whose header cannot be read or claims more bytes than the file has (a truncated
    download or copy), naming both sizes, before any tensor is read."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(max_header, size - 8):
                raise HFCheckpointError(f"{f}: not a complete safetensors file ({size} bytes; its header length "
                                        f"field says {n}): truncated or not safetensors; copy it again")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        raise HFCheckpointError(f"{f}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise HFCheckpointError(f"{f}: safetensors header is not an object")
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max((int(e) for e in ends if isinstance(e, int)), default=0)
    if need > size:
        raise HFCheckpointError(f"{f}: truncated: {size} bytes but its safetensors header needs {need} "
                                f"({need - size} missing); copy or download it again")


def _checkpoint_sources(path: Path) -> tuple[list[Path], dict[str, _Source], list[str]]:
    """Shard files, checkpoint key -> source (from headers only), and problems found."""
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    problems: list[str] = []
    if index.is_file() and single.is_file():
        raise HFCheckpointError(f"{path}: both {SINGLE_FILE} and {INDEX_FILE} exist; remove the stale one")
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFCheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from e
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise HFCheckpointError(f"{index}: shard file(s) listed but missing: {absent}")
    elif single.is_file():
        weight_map, files = None, [single]
    else:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickled}: pickle checkpoints are not loaded; convert to safetensors)" if pickled else ""
        raise HFCheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    sources: dict[str, _Source] = {}
    duplicates, unindexed = [], []
    for f in files:
        check_safetensors_file(f)
        with safe_open(f, framework="pt", device="cpu") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                if k in sources:
                    duplicates.append(f"{k} ({sources[k].file.name} and {f.name})")
                sources[k] = _Source(f, k, tuple(sl.get_shape()), sl.get_dtype())
                if weight_map is not None and weight_map.get(k) != f.name:
                    unindexed.append(f"{k} (in {f.name}, index says {weight_map.get(k)})")
    if duplicates:
        problems.append(_listing("tensors stored in more than one shard", duplicates))
    if unindexed:
        problems.append(_listing(f"tensors whose shard disagrees with {INDEX_FILE}", unindexed))
    if weight_map is not None:
        lost = [f"{k} (index says {v})" for k, v in weight_map.items() if k not in sources]
        if lost:
            problems.append(_listing(f"tensors listed in {INDEX_FILE} but absent from their shard", lost))
    return files, sources, problems


def _declared_layout(arg: str | None, files: list[Path], raw_cfg: dict[str, Any]) -> tuple[str | None, str]:
    """The checkpoint's declared expert layout and where the declaration comes from."""
    if arg is not None:
        if arg not in EXPERT_LAYOUTS:
            raise ValueError(f"expert_layout={arg!r} is not one of {EXPERT_LAYOUTS}")
        return arg, "the expert_layout argument"
    tagged = set()
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as st:
            tagged.add((st.metadata() or {}).get(LAYOUT_METADATA_KEY))
    tagged.discard(None)
    if len(tagged) > 1:
        raise HFCheckpointError(f"shards disagree on metadata {LAYOUT_METADATA_KEY}: {sorted(tagged)}")
    if tagged:
        layout = tagged.pop()
        if layout not in EXPORT_LAYOUTS:
            raise HFCheckpointError(f"shard metadata {LAYOUT_METADATA_KEY}={layout!r} is not one of {EXPORT_LAYOUTS}")
        if layout == "per_expert":   # our per-expert export: it stores no fused expert tensor to declare
            return None, f"shard metadata {LAYOUT_METADATA_KEY}='per_expert' (no fused expert tensors)"
        return layout, f"shard metadata {LAYOUT_METADATA_KEY}"
    version_layout = _version_layout(raw_cfg)
    if version_layout is not None:
        return version_layout, f"config.json transformers_version={raw_cfg['transformers_version']}"
    return None, "nothing (no expert_layout argument, shard metadata or config.json transformers_version)"


@dataclass
class LoadReport:
    """What ``load_hf_weights`` did."""
    path: str
    files: list[str]
    num_tensors: int = 0                      # checkpoint tensors copied into the model
    num_bytes: int = 0                        # bytes read from the checkpoint
    expert_layout: dict[str, int] = field(default_factory=dict)   # "v5"/"hub"/"per_expert" -> fused tensors read
    transposed: list[str] = field(default_factory=list)          # expert tensors converted hub -> v5
    renamed: int = 0                          # keys mapped from a prefix variant (bare Qwen3VLModel save)
    tied: list[str] = field(default_factory=list)                # model names filled through a tied alias
    dtype_casts: dict[str, int] = field(default_factory=dict)    # "BF16->torch.float32" -> count
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _model_targets(model: nn.Module) -> tuple[dict[str, LocalPiece], list[list[str]]]:
    """HF name -> what this process holds of that state-dict tensor, and the alias groups (names sharing
    one tensor, e.g. a tied ``lm_head``)."""
    from rynnscale.parallel.fsdp import local_pieces

    piece_of = {id(p.tensor): p for p in local_pieces(model).values()}
    targets: dict[str, LocalPiece] = {}
    alias_of: dict[int, list[str]] = {}
    for raw, tensor in model.state_dict(keep_vars=True).items():
        name = clean_fqn(raw)
        if is_adapter_param(name):  # LoRA factors are not in a base checkpoint: initialised by the build
            continue
        targets[name] = piece_of[id(tensor)]
        alias_of.setdefault(id(tensor), []).append(name)
    return targets, list(alias_of.values())


@dataclass
class _LoadPlan:
    """What passed validation: the model names to read (one per alias group), their sources, and the
    stored layout of every fused expert tensor."""
    files: list[Path]
    sources: dict[str, _Source]   # model name -> where its tensor is stored
    names: list[str]
    layout_of: dict[str, str]


def _plan_load(path: Path, targets: dict[str, LocalPiece], groups: list[list[str]], expert_layout: str | None,
               report: LoadReport, sd: StateDictAdapter) -> _LoadPlan:
    """Check the checkpoint against the model from headers only: key canonicalisation, missing /
    unexpected / tied / mis-shaped tensors (against the FULL shapes), expert layouts, dtypes; only the stored
    copies of a tied tensor are read, to compare them (transformers unties differing copies; we refuse). Raises
    one ``HFCheckpointError`` listing every problem, before anything is read into the model."""
    raw_cfg: dict[str, Any] = {}
    tied_in_config = False   # as the family reads it (VL configs: the top-level key only, as in transformers)
    if (path / "config.json").is_file():
        cfg_args, raw_cfg = read_hf_config(path)
        tied_in_config = bool(getattr(cfg_args, "tie_word_embeddings", False))
    files, sources, problems = _checkpoint_sources(path)
    report.files = [f.name for f in files]

    # --- checkpoint side: canonical names, collisions
    by_name: dict[str, _Source] = {}
    collisions, skipped = [], []
    for key, src in sources.items():
        name = sd.canonical_key(key)
        if name is None:
            skipped.append(key)
            continue
        if name != key:
            report.renamed += 1
        if name in by_name:
            collisions.append(f"{name} (from {by_name[name].key} and {key})")
        by_name[name] = src
    if collisions:
        problems.append(_listing("keys that map to the same model name", collisions))
    if skipped:
        report.notes.append(_listing("checkpoint tensors the model family skips on purpose", skipped)[2:])
    problems += _fuse_per_expert(by_name, sd, report)

    # --- pair them up; aliases (tied weights) are filled once
    plan: list[str] = []               # names read from the checkpoint and copied into the model
    missing, extra_alias, untied = [], [], []
    for group in groups:
        present = [n for n in group if n in by_name]
        if not present:
            hint = ""
            if sd.lm_head_key in group and tied_in_config:
                hint = (f" [config.json ties embeddings, but the model's {sd.lm_head_key} is not the same tensor "
                        f"as {sd.embed_key}: re-tie it after to_empty]")
            missing.append(group[0] + hint)
            continue
        if len(present) > 1 and not tied_in_config:
            extra_alias.append(" / ".join(present))
        elif len(present) > 1:
            differ = _stored_copies_differ([by_name[n] for n in present])
            if differ:
                untied.append(f"{' / '.join(present)}: {differ}")
        plan.append(present[0])
        report.tied += [n for n in group if n != present[0]]
        for dup in present[1:]:
            report.notes.append(f"{dup}: tied to {present[0]} in the model; its checkpoint copy was not read")
    if missing:
        problems.append(_listing("tensors the model needs but the checkpoint lacks", missing))
    if extra_alias:
        said = (f"config.json's top-level tie_word_embeddings is {raw_cfg['tie_word_embeddings']!r}"
                if "tie_word_embeddings" in raw_cfg else
                "config.json sets no top-level tie_word_embeddings (the default, as in transformers: false)")
        problems.append(_listing(f"tensors tied in the model but stored separately while {said}", extra_alias))
    if untied:
        problems.append(_listing("tensors config.json ties (tie_word_embeddings=true) but the checkpoint stores with "
                                 "different values; loading would drop one (transformers then does not tie them): "
                                 "set tie_word_embeddings=false in config.json to keep both", untied))
    unexpected = [n for n in by_name if n not in targets]
    if unexpected:
        hint = ""
        if any(re.search(r"\.mlp\.experts\.\d+\.", n) for n in unexpected):
            hint = " [per-expert tensors (experts.{e}.*_proj.weight): fuse them into experts.gate_up_proj / " \
                   "experts.down_proj; released Qwen3-VL-MoE checkpoints are fused]"
        problems.append(_listing("tensors in the checkpoint the model does not have", unexpected) + hint)

    # --- shapes (of the full tensors: all experts, unsharded) and expert layouts
    declared, declared_by = _declared_layout(expert_layout, files, raw_cfg)
    layout_of: dict[str, str] = {}
    mismatched, square, contradicting = [], [], []
    for name in plan:
        src, want = by_name[name], targets[name].full_shape
        kind = sd.expert_kind(name)
        if src.parts is not None:   # fused here from per-expert tensors: our layout by construction
            if src.shape != want:
                mismatched.append(f"{name}: per-expert checkpoint tensors give {list(src.shape)} vs model "
                                  f"{list(want)}")
            continue
        if kind is None or len(want) != 3:
            if src.shape != want:
                mismatched.append(f"{name}: checkpoint {list(src.shape)} vs model {list(want)}")
            continue
        hub_shape = (want[0], want[2], want[1])
        fits = [lay for lay, shp in (("v5", want), ("hub", hub_shape)) if src.shape == shp]
        if not fits:
            mismatched.append(f"{name}: checkpoint {list(src.shape)} vs model {list(want)} "
                              f"(or {list(hub_shape)} in the hub layout)")
        elif len(fits) == 2:
            square.append(name)
        else:
            layout_of[name] = fits[0]
            if declared is not None and fits[0] != declared:
                contradicting.append(f"{name}: stored {fits[0]}")
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if contradicting and (expert_layout is not None or square):
        problems.append(_listing(
            f"expert tensors whose shape contradicts the layout {declared!r} declared by {declared_by}"
            + (f", so it cannot decide the {len(square)} square ones (e.g. {square[0]})" if square else ""),
            contradicting))
    elif contradicting:
        report.notes.append(f"{len(contradicting)} expert tensor(s) stored in a layout other than {declared!r} "
                            f"declared by {declared_by}; their (non-square) shapes decided")
    if square and declared is None:
        problems.append(_listing(
            "square expert tensors (H == 2I or H == I: 'v5' and 'hub' layouts have the same shape) and the "
            f"checkpoint declares {declared_by}; pass expert_layout='v5' or 'hub'", square))
    elif square:
        layout_of.update({n: declared for n in square})
    bad_dtype = [f"{n} ({by_name[n].dtype})" for n in plan if by_name[n].dtype not in _SAFETENSORS_DTYPES]
    if bad_dtype:
        problems.append(_listing("tensors with an unsupported dtype", bad_dtype))
    _raise_if(problems, f"cannot load Hugging Face checkpoint {path}")
    return _LoadPlan(files, {n: by_name[n] for n in plan}, plan, layout_of)


def _stored_copies_differ(srcs: list[_Source], rows: int = 4096) -> str:
    """'' if every stored copy of a tied tensor equals the first, else how they differ (shape, or max|diff| and
    max|first|). Reads ``rows`` rows at a time, so memory stays at a few chunks of the embedding."""
    first = srcs[0]
    with _Files() as files:
        for other in srcs[1:]:
            if first.parts is not None or other.parts is not None or other.shape != first.shape:
                return f"shapes {list(first.shape)} vs {list(other.shape)}"
            diff = ref = 0.0
            n = first.shape[0] if first.shape else 1
            for lo in range(0, n, rows):
                a = _read_source(files, first, lo, min(n, lo + rows)).float()
                b = _read_source(files, other, lo, min(n, lo + rows)).float()
                diff, ref = max(diff, float((a - b).abs().max())), max(ref, float(a.abs().max()))
            if diff > 0:
                return f"max|{other.key} - {first.key}| = {diff:.3g} (max|{first.key}| = {ref:.3g})"
    return ""


def _read_rows(st: Any, src: _Source, lo: int, hi: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` of dim 0 of a stored tensor, reading only those bytes (``get_slice``). Dim 0 is
    the expert dim in both fused-expert layouts, so an EP rank reads only its experts."""
    if not src.shape or (lo, hi) == (0, src.shape[0]):
        return st.get_tensor(src.key)
    return st.get_slice(src.key)[lo:hi]


class _Files:
    """Open safetensors files by path, each once (per-expert sources may span shards)."""

    def __init__(self) -> None:
        self._open: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()

    def __call__(self, f: Path) -> Any:
        if f not in self._open:
            self._open[f] = self._stack.enter_context(safe_open(f, framework="pt", device="cpu"))
        return self._open[f]

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def _read_source(files: _Files, src: _Source, lo: int, hi: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` of ``src``: a stored tensor, or a fused expert tensor assembled from its experts."""
    if src.parts is None:
        return _read_rows(files(src.file), src, lo, hi)
    rows = [torch.cat([files(p.file).get_tensor(p.key) for p in parts]) for parts in src.parts[lo:hi]]
    return torch.stack(rows) if rows else torch.empty((0, *src.shape[1:]))


class HFTensorReader:
    """Read single tensors of a Hugging Face checkpoint by model name, in our ("v5") expert layout, with
    the same validation as ``load_hf_weights`` (against the full shapes ``args`` implies) -- for
    streaming work that never builds the model (e.g. merging LoRA adapters into a base on export)."""

    def __init__(self, path: str | os.PathLike, args: Any, expert_layout: str | None = None):
        from rynnscale.parallel.fsdp import LocalPiece

        self.path = Path(path)
        targets = {}
        for name, shape in hf_param_shapes(args).items():
            t = torch.empty(shape, device="meta")
            targets[name] = LocalPiece(t, t, tuple(shape), 0, shape[0] if shape else 1)
        self.plan = _plan_load(self.path, targets, [[n] for n in targets], expert_layout,
                               LoadReport(path=str(self.path), files=[]), family_of(args).state_dict)

    def dtype(self, name: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self.plan.sources[name].dtype]

    def __call__(self, name: str) -> torch.Tensor:
        src = self.plan.sources[name]
        with _Files() as files:
            x = _read_source(files, src, 0, src.shape[0] if src.shape else 1)
        layout = self.plan.layout_of.get(name)
        return _to_layout(x, layout, "v5") if layout is not None else x


def _key_layout(model: nn.Module, path: Path) -> StateDictAdapter:
    """The tensor layout to load ``path`` by: the model's family, or (a transformers model, e.g. in parity tests)
    the family that the checkpoint's config.json names."""
    try:
        return family_of(model).state_dict
    except TypeError:
        return family(read_hf_config(path)[1].get("model_type")).state_dict


def load_hf_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    expert_layout: str | None = None,
) -> LoadReport:
    """Load a Hugging Face Qwen3-VL(-MoE) safetensors checkpoint into ``model``'s tensors in place.

    Reads ``model.safetensors`` or the shards of ``model.safetensors.index.json``, one tensor at a
    time. The model must hold real storage (build on meta, then ``to_empty`` and re-tie embeddings).
    It may be sharded (FSDP2 DTensors, expert parallelism): each process then reads only the rows of
    each tensor it holds (``safe_open(...).get_slice``; the full tensor is never materialised), so the
    extra memory is about one local shard. Every missing / unexpected / mis-shaped tensor (shapes of the
    FULL tensors: all experts, unsharded) and every undecidable expert layout is collected from the
    headers first and reported in one ``HFCheckpointError`` before anything is written. ``lm_head.weight``
    may be absent when the model ties it to ``embed_tokens``. ``dtype``: floating model tensors are
    re-allocated in this dtype as they are loaded (plain tensors only; Parameter objects and ties are
    kept). ``expert_layout`` ("v5" / "hub") overrides the checkpoint's declared layout (module docstring).
    """
    from torch.distributed.tensor import DTensor

    t0 = time.perf_counter()
    path = Path(path)
    if not path.is_dir():
        raise HFCheckpointError(f"{path}: not a directory")
    targets, groups = _model_targets(model)
    on_meta = [n for n, t in targets.items() if t.tensor.is_meta]
    if on_meta:
        raise HFCheckpointError(
            f"model has {len(on_meta)} tensor(s) on the meta device (e.g. {on_meta[:3]}); "
            "call model.to_empty(device=...) (and re-tie embeddings) before loading")
    if dtype is not None and any(isinstance(t.tensor, DTensor) for t in targets.values()):
        raise HFCheckpointError("dtype= cannot re-allocate DTensor (sharded) parameters; build the model in "
                                f"{dtype} before sharding and call without dtype=")
    report = LoadReport(path=str(path), files=[])
    plan = _plan_load(path, targets, groups, expert_layout, report, _key_layout(model, path))

    # --- copy, file by file, one tensor (this process's rows of it) at a time
    by_file: dict[Path, list[str]] = {}
    for name in plan.names:
        by_file.setdefault(plan.sources[name].file, []).append(name)
    for f in plan.files:
        with _Files() as files, torch.no_grad():
            for name in by_file.get(f, []):
                src, target = plan.sources[name], targets[name]
                x = _read_source(files, src, target.lo, target.hi)
                report.num_bytes += x.numel() * x.element_size()
                layout = plan.layout_of.get(name)
                if layout is not None:
                    report.expert_layout[layout] = report.expert_layout.get(layout, 0) + 1
                    if layout != "v5":
                        report.transposed.append(name)
                    x = _to_layout(x, layout, "v5")
                local = target.local
                if dtype is not None and local.is_floating_point() and local.dtype != dtype:
                    local.data = torch.empty_like(local, dtype=dtype)
                if x.dtype != local.dtype:
                    cast = f"{src.dtype}->{local.dtype}"
                    report.dtype_casts[cast] = report.dtype_casts.get(cast, 0) + 1
                local.copy_(x)
                report.num_tensors += 1
                del x
    report.seconds = time.perf_counter() - t0
    return report


# ---------------------------------------------------------------------------------------- writing
@dataclass
class ExportReport:
    """What ``export_hf`` wrote."""
    out_dir: str
    files: list[str]
    num_tensors: int
    total_bytes: int
    dtype: str
    expert_layout: str
    seconds: float


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def side_files(model_dir: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None) -> dict[str, Path]:
    """Export file name -> source of the files an export copies besides weights and config.json: the tokenizer,
    processor and generation files (and ``chat_template*``) found in ``model_dir``; ``tokenizer`` (a directory
    or a ``tokenizer.json``), when given, supplies the tokenizer files instead of ``model_dir``'s."""
    out: dict[str, Path] = {}
    if model_dir is not None:
        d = Path(model_dir)
        names = [*PROCESSOR_FILES, *sorted(p.name for p in d.glob("chat_template*") if p.is_file())]
        out = {n: d / n for n in names if (d / n).is_file()}
    if tokenizer is not None:
        t = Path(tokenizer)
        out = {n: f for n, f in out.items() if n not in TOKENIZER_FILES}
        out.update({"tokenizer.json": t} if t.is_file() else
                   {n: t / n for n in TOKENIZER_FILES if (t / n).is_file()})
    return out


def main_float_dtype(float_bytes: Counter[torch.dtype], dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype config.json records for an export: ``dtype`` when the export casts, else the floating dtype holding
    the most bytes (not the most tensors: many small fp32 norms beside bf16 matrices are a bf16 model); ties go to
    the dtype seen first, so the choice does not depend on set order."""
    return dtype or (float_bytes.most_common(1)[0][0] if float_bytes else torch.float32)


def write_config_and_side_files(tmp: Path, args: Any, main_dtype: torch.dtype,
                                files_from: Mapping[str, Path]) -> list[str]:
    """config.json (``args`` + dtype) and the files ``files_from`` maps (``side_files``) into an export
    directory being written; returns the file names written."""
    config = args.to_hf_config()
    config["dtype"] = config["torch_dtype"] = _dtype_name(main_dtype)  # transformers 5 / 4.x spelling
    # no transformers_version: we are not transformers; the shards' metadata declares the expert layout
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for fname, src in files_from.items():
        shutil.copy2(src, tmp / fname)
    return ["config.json", *files_from]


def check_export_target(out_dir: str | os.PathLike, copy_from: str | os.PathLike | None, max_shard_bytes: int,
                        overwrite: bool) -> tuple[Path, Path | None]:
    """Checks shared by every HF export before anything is written: shard size, a non-empty ``out_dir``
    (refused unless ``overwrite``), ``copy_from`` a directory. Returns them as Paths."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    copy_from = Path(copy_from) if copy_from is not None else None
    if copy_from is not None and not copy_from.is_dir():
        raise HFCheckpointError(f"copy_from={copy_from}: not a directory")
    return out_dir, copy_from


def export_hf(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    args: Any,
    out_dir: str | os.PathLike,
    *,
    copy_from: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    expert_layout: str | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Write a Hugging Face directory that ``transformers`` loads with ``from_pretrained``.

    ``named_tensors`` yields HF-named full tensors (our model's names; experts in "v5" layout). They
    are consumed one at a time; a shard is flushed before it would exceed ``max_shard_bytes`` (a
    single larger tensor gets its own shard), so peak memory is about one shard. Output:
    ``model.safetensors`` (one shard) or ``model-XXXXX-of-YYYYY.safetensors`` + index, ``config.json``
    (``args.to_hf_config()`` + dtype), and from ``copy_from`` (the init model) ``generation_config.json``
    and tokenizer / processor files. Names and shapes are checked against ``hf_param_shapes(args)``
    (one ``HFCheckpointError`` listing every problem). ``dtype`` casts floating tensors.
    ``expert_layout`` (module docstring; default: the family's ``export_layouts[0]``, the layout transformers'
    ``save_pretrained`` writes for it: "v5" for Qwen3-VL-MoE, "per_expert" for Qwen3.5-MoE): "v5" transformers 5
    loads for any shape; "hub" is Qwen3-VL-MoE's released checkpoints' layout for older readers (refused when
    square: transformers 5 would load it transposed); a layout not in the family's ``export_layouts`` is refused.
    Everything is written into a temporary directory beside ``out_dir`` and
    renamed when complete; a non-empty ``out_dir`` is refused unless ``overwrite``.
    DTensor values are gathered with ``full_tensor()`` (a collective: single-process use for now).
    """
    t0 = time.perf_counter()
    sd = family_of(args).state_dict
    expert_layout = sd.export_layouts[0] if expert_layout is None else expert_layout
    if expert_layout not in EXPORT_LAYOUTS:
        raise ValueError(f"expert_layout={expert_layout!r} is not one of {EXPORT_LAYOUTS}")
    out_dir, copy_from = check_export_target(out_dir, copy_from, max_shard_bytes, overwrite)
    expected = hf_param_shapes(args)
    if expert_layout not in sd.export_layouts:
        raise HFCheckpointError(f"expert_layout={expert_layout!r} is not a layout transformers reads for "
                                f"{family_of(args).name} (allowed: {sd.export_layouts})")
    if expert_layout == "hub":
        square = [n for n, s in expected.items() if sd.expert_kind(n) and s[1] == s[2]]
        if square:
            raise HFCheckpointError(
                f"expert_layout='hub' with square expert tensors ({square[0]} {list(expected[square[0]])}, ...): "
                "transformers 5 would load them transposed (transformers#47031); use expert_layout='v5'")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        report = _write_dir(named_tensors, args, tmp, expected, copy_from, max_shard_bytes, dtype, expert_layout)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.out_dir = str(out_dir)
    report.seconds = time.perf_counter() - t0
    return report


def _write_dir(named_tensors, args, tmp: Path, expected: dict[str, tuple[int, ...]], copy_from: Path | None,
               max_shard_bytes: int, dtype: torch.dtype | None, expert_layout: str) -> ExportReport:
    from torch.distributed.tensor import DTensor

    meta = {"format": "pt", LAYOUT_METADATA_KEY: expert_layout}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, parts, weight_map = 0, [], {}
    seen: set[str] = set()
    unexpected, mismatched, duplicated = [], [], []
    float_bytes: Counter[torch.dtype] = Counter()
    total = total_params = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            part = tmp / f"part-{len(parts):05d}.safetensors"
            save_file(shard, str(part), metadata=meta)
            parts.append((part, list(shard)))
            shard, shard_bytes = {}, 0

    for name, x in named_tensors:
        if name in seen:
            duplicated.append(name)
            continue
        seen.add(name)
        if name not in expected:
            unexpected.append(name)
        elif tuple(x.shape) != expected[name]:
            mismatched.append(f"{name}: {list(x.shape)} vs {list(expected[name])} from args")
        if unexpected or mismatched or duplicated:
            continue  # keep consuming to list every problem, write nothing more
        if isinstance(x, DTensor):
            x = x.full_tensor()
        x = x.detach().to("cpu")
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        pieces = export_pieces(name, x, family_of(args).state_dict.expert_kind(name), expert_layout)
        nbytes = x.numel() * x.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        for stored_name, piece in pieces:
            piece = piece.clone() if len(pieces) > 1 else piece.contiguous()   # safetensors: no shared storage
            if any(piece.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() for y in shard.values()):
                piece = piece.clone()  # safetensors refuses tensors sharing storage (e.g. tied weights)
            shard[stored_name] = piece
        shard_bytes += nbytes
        total += nbytes
        total_params += x.numel()
        if x.is_floating_point():
            float_bytes[x.dtype] += nbytes
    missing = [n for n in expected if n not in seen]
    problems = []
    if missing:
        problems.append(_listing("tensors args require but the stream lacks", missing))
    if unexpected:
        problems.append(_listing("tensors not in the Hugging Face layout of these args", unexpected))
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if duplicated:
        problems.append(_listing("tensors yielded more than once", duplicated))
    _raise_if(problems, "cannot export to Hugging Face format")
    flush()

    files = []
    if len(parts) == 1:
        parts[0][0].rename(tmp / SINGLE_FILE)
        files.append(SINGLE_FILE)
    else:
        for i, (part, names) in enumerate(parts):
            fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
            part.rename(tmp / fname)
            files.append(fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_parameters": total_params, "total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        files.append(INDEX_FILE)

    main_dtype = main_float_dtype(float_bytes, dtype)
    files += write_config_and_side_files(tmp, args, main_dtype, side_files(copy_from))
    return ExportReport(out_dir="", files=files, num_tensors=len(seen), total_bytes=total,
                        dtype=_dtype_name(main_dtype), expert_layout=expert_layout, seconds=0.0)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir`` (renames only; an existing out_dir is removed after)."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        tmp.rename(out_dir)


def model_hf_tensors(model: nn.Module, args: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict()`` as HF names, lazily; ``lm_head.weight`` left out when ``args`` ties it.

    Refuses to drop a tied ``lm_head`` whose values differ from the embedding (e.g. a tie lost
    by ``to_empty`` before training): exporting it tied would silently change the model. A LoRA model
    exports merged (``W + (alpha/r) B A``; its adapters alone: ``rynnscale.checkpoint.adapter``)."""
    sd = {clean_fqn(k): v for k, v in model.state_dict().items()}
    spec = lora_spec_of(model)
    if spec is not None:
        sd = merge_lora_state(sd, spec)
    keys = family_of(args).state_dict
    head, embed = keys.lm_head_key, keys.embed_key
    if args.tie_word_embeddings and head in sd and embed in sd and sd[head] is not sd[embed]:
        from torch.distributed.tensor import DTensor

        def full(x: torch.Tensor) -> torch.Tensor:
            return x.full_tensor() if isinstance(x, DTensor) else x
        if not torch.equal(full(sd[head]), full(sd[embed])):
            raise HFCheckpointError(
                f"args tie word embeddings but the model's {head} differs from {embed}; "
                "re-tie them or export with tie_word_embeddings=False")
    for name, x in sd.items():
        if args.tie_word_embeddings and name == head:
            continue
        yield name, x


def export_model(model: nn.Module, args: Any, out_dir: str | os.PathLike, **kwargs: Any) -> ExportReport:
    """``export_hf`` of ``model.state_dict()`` (tied ``lm_head`` skipped); kwargs as ``export_hf``."""
    return export_hf(model_hf_tensors(model, args), args, out_dir, **kwargs)
