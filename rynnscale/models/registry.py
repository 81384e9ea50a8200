"""The registry of model families, keyed by transformers' ``model_type``.

Built-in families (``BUILTIN_FAMILIES``) register themselves when their package is imported, which
happens on the first lookup; another family registers with ``register(spec)`` (a plugin, or a test) and
is then found like a built-in one. Lookups fail naming the supported ``model_type`` values.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
from pathlib import Path
from typing import Any

from rynnscale.models.spec import ArchConfigError, HFCheckpointError, ModelSpec

#: packages of the families shipped with rynnscale (each calls ``register`` when imported)
BUILTIN_FAMILIES = ("rynnscale.models.qwen3_vl", "rynnscale.models.qwen3_5")

_by_name: dict[str, ModelSpec] = {}
_by_type: dict[str, ModelSpec] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for package in BUILTIN_FAMILIES:
            importlib.import_module(package)


def register(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add ``spec`` under its name and its ``model_types``; a clash with another family is an error
    unless ``replace``. Returns ``spec`` (so a family module can write ``SPEC = register(ModelSpec(...))``)."""
    if not spec.model_types:
        raise ValueError(f"model family {spec.name!r} declares no model_type")
    if not replace:
        clash = [t for t in spec.model_types if t in _by_type and _by_type[t].name != spec.name]
        if clash or (spec.name in _by_name and _by_name[spec.name] is not spec):
            raise ValueError(f"model family {spec.name!r}: model_type(s) {clash or list(spec.model_types)} are "
                             f"already registered (by {sorted({_by_type[t].name for t in clash}) or spec.name}); "
                             "pass replace=True to override")
    unregister(spec.name)
    _by_name[spec.name] = spec
    for t in spec.model_types:
        _by_type[t] = spec
    return spec


def unregister(name: str) -> None:
    """Remove family ``name`` (no error if absent)."""
    spec = _by_name.pop(name, None)
    if spec is not None:
        for t in spec.model_types:
            if _by_type.get(t) is spec:
                del _by_type[t]


def families() -> list[ModelSpec]:
    """Every registered family, built-in ones first."""
    _load_builtins()
    return list(_by_name.values())


def supported_model_types() -> list[str]:
    _load_builtins()
    return sorted(_by_type)


def family(model_type: Any, where: str = "config") -> ModelSpec:
    """The family of ``model_type``; ``ArchConfigError`` naming the supported values otherwise."""
    _load_builtins()
    spec = _by_type.get(model_type) if isinstance(model_type, str) else None
    if model_type is None:
        raise ArchConfigError(f"{where}: no model_type (transformers' config.json key naming the model family); "
                              f"set one of {supported_model_types()}")
    if spec is None:
        raise ArchConfigError(f"{where}: model_type={model_type!r} is not supported; expected one of "
                              f"{supported_model_types()}")
    return spec


def family_of(obj: Any) -> ModelSpec:
    """The family of an args object or of a model (its ``args``)."""
    _load_builtins()
    args = getattr(obj, "args", obj)
    for spec in _by_name.values():
        if isinstance(args, spec.args_cls):
            return spec
    raise TypeError(f"{type(args).__name__} is not the args class of a registered model family "
                    f"({[s.name for s in _by_name.values()]})")


def args_from_hf_config(cfg: dict[str, Any], *, strict: bool = False, where: str = "config") -> Any:
    """A config.json dict -> its family's args (the family chosen by ``cfg['model_type']``)."""
    if not isinstance(cfg, dict):
        raise ArchConfigError(f"{where}: expected a mapping in config.json form, got {type(cfg).__name__}")
    return family(cfg.get("model_type"), where).args_from_hf_config(cfg, strict=strict, where=where)


def read_hf_config(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint's ``config.json`` (``path`` is the directory or the file itself) -> (args of its
    family, the raw dict for keys args do not carry, e.g. ``transformers_version``)."""
    path = Path(path)
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise HFCheckpointError(f"{cfg_path}: no such file (a Hugging Face checkpoint directory needs config.json)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise HFCheckpointError(f"{cfg_path}: not a JSON object")
    try:
        spec = family(raw.get("model_type"), str(cfg_path))
    except ArchConfigError as e:
        raise HFCheckpointError(str(e)) from None
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise HFCheckpointError(f"{cfg_path}: quantized checkpoints are not supported "
                                f"(quantization_config.quant_method={method!r}); use the bf16 release")
    missing = [k for k in spec.hf_keys_without_shared_default.get(raw.get("model_type"), ()) if not _has_key(raw, k)]
    if missing:
        raise HFCheckpointError(f"{cfg_path}: {raw.get('model_type')} config lacks {missing}: transformers and "
                                "rynnscale default these differently, so the model would be ambiguous; set them (the "
                                "published config.json files do)")
    return spec.args_from_hf_config(raw, where=str(cfg_path)), raw


def _has_key(cfg: dict[str, Any], dotted: str) -> bool:
    """Whether ``cfg`` sets ``dotted`` ("text_config.rope_theta") under a name the readers take: ``rope_theta`` also
    inside the section's ``rope_parameters`` / ``rope_scaling`` (transformers 5 / 4.x), ``num_experts`` also as
    ``num_local_experts`` (what transformers 5 writes for Qwen3-VL-MoE)."""
    section, _, key = dotted.rpartition(".")
    d = cfg.get(section) if section else cfg
    if not isinstance(d, dict):
        return False
    if key == "num_experts" and "num_local_experts" in d:
        return True
    return key in d or (key == "rope_theta" and any(isinstance(d.get(r), dict) and key in d[r]
                                                    for r in ("rope_parameters", "rope_scaling")))


def presets() -> dict[str, tuple[ModelSpec, dict[str, Any]]]:
    """Every family's published architectures: preset name -> (family, config.json dict)."""
    return {name: (spec, cfg) for spec in families() for name, cfg in spec.presets.items()}


def preset_config(name: str) -> dict[str, Any]:
    """A deep copy of preset ``name``'s config.json dict; KeyError lists the known names."""
    known = presets()
    if name not in known:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(known)}")
    return copy.deepcopy(known[name][1])


def published_params(name: str) -> dict[str, float]:
    """Published parameter counts (billions) of preset ``name`` ({} when none are recorded)."""
    return dict(presets()[name][0].published_params.get(name, {}))
