"""LoRA adapters in the PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained(<transformers Qwen3-VL(-MoE)>, dir)`` applies, plus the merged view.

Key mapping (our names are transformers' module names, ``rynnscale.models.lora``):
- ``X.lora_A`` [r, in] / ``X.lora_B`` [out, r] of a Linear ``X`` -> ``base_model.model.X.lora_A.weight`` /
  ``.lora_B.weight`` (``X`` listed in ``target_modules``).
- fused experts ``E.{p}_lora_A`` [E, r, in] / ``E.{p}_lora_B`` [E, out, r] -> peft's parameter LoRA
  (``target_parameters``): ``lora_A.weight`` [E*r, in] (row ``e*r + k``), ``lora_B.weight`` [out, r*E]
  (column ``k*E + e``). peft nests one wrapper per targeted parameter in the order of
  ``target_parameters``: the first (``gate_up_proj``) sits innermost, so its keys carry ``base_layer.``.
Tensors are written in fp32; ``lora_dropout`` is written as 0 (peft refuses dropout on expert
parameters, and dropout plays no part at inference). Given the base's transformers class, ``auto_mapping`` names it
as peft's own ``save_pretrained`` does, so ``peft.AutoPeftModel.from_pretrained(dir)`` builds the base by itself.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rynnscale.models.lora import LoRASpec, is_adapter_param

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPERT_PARAMS = ("gate_up_proj", "down_proj")   # peft nesting order (innermost first)
PEFT_PREFIX = "base_model.model."


def _split(name: str) -> tuple[str, str | None, str]:
    """Our adapter name -> (module name, expert parameter or None, 'A' | 'B')."""
    factor = name[-1]
    if name.endswith((".lora_A", ".lora_B")):
        return name[: -len(".lora_A")], None, factor
    module, _, param = name[: -len("_lora_A")].rpartition(".")
    return module, param, factor


def peft_key(name: str) -> str:
    """Our adapter name -> its key in ``adapter_model.safetensors``."""
    module, param, factor = _split(name)
    if param is None:
        return f"{PEFT_PREFIX}{module}.lora_{factor}.weight"
    depth = len(EXPERT_PARAMS) - 1 - EXPERT_PARAMS.index(param)   # wrappers outside this parameter's
    return f"{PEFT_PREFIX}{module}.{'base_layer.' * depth}lora_{factor}.weight"


def to_peft_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """Our factor (full tensor) -> peft's layout (module docstring), fp32 contiguous."""
    t = t.detach().float().cpu()
    _, param, factor = _split(name)
    if param is not None:
        E = t.shape[0]
        t = t.reshape(-1, t.shape[-1]) if factor == "A" else t.permute(1, 2, 0).reshape(t.shape[1], -1)
        assert t.shape[0 if factor == "A" else 1] % E == 0
    return t.contiguous()


def adapter_config(spec: LoRASpec, names: Iterable[str], base_model_name_or_path: str | None = None,
                   base_model_class: str | None = None) -> dict[str, Any]:
    """peft's ``LoraConfig`` fields for the adapters ``names`` (our names); ``base_model_class``: the base's
    transformers class (config.json ``architectures[0]``, e.g. ``Qwen3_5MoeForConditionalGeneration``)."""
    linear = sorted({_split(n)[0] for n in names if _split(n)[1] is None})
    # peft matches target_parameters by suffix: the experts module's last two name parts (e.g. "mlp.experts")
    experts = sorted({(".".join(_split(n)[0].split(".")[-2:]), _split(n)[1]) for n in names
                      if _split(n)[1] is not None}, key=lambda mp: (mp[0], EXPERT_PARAMS.index(mp[1])))
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": linear or None,
        "target_parameters": [f"{module}.{param}" for module, param in experts] or None,
        "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "auto_mapping": {"base_model_class": base_model_class, "parent_library": "transformers"}
        if base_model_class else None,
    }


def check_exportable(spec: LoRASpec) -> None:
    """Raise ``ValueError`` when a PEFT adapter directory cannot carry what a run with ``spec`` trained."""
    if spec.trainable:
        raise ValueError(f"model.lora.trainable={list(spec.trainable)} trains whole base tensors, which a PEFT "
                         "adapter directory does not carry; use the merged export")


def export_adapter(adapters: dict[str, torch.Tensor], spec: LoRASpec, out_dir: str | os.PathLike, *,
                   base_model_name_or_path: str | None = None, base_model_class: str | None = None,
                   overwrite: bool = False) -> Path:
    """Write the PEFT adapter directory from full (unsharded) adapter tensors keyed by our names.
    Written beside ``out_dir`` under a temporary name, then renamed."""
    out_dir = Path(out_dir)
    names = sorted(n for n in adapters if is_adapter_param(n))
    if not names:
        raise ValueError("export_adapter: no LoRA adapter tensors given")
    check_exportable(spec)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({peft_key(n): to_peft_tensor(n, adapters[n]) for n in names}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        cfg = adapter_config(spec, names, base_model_name_or_path, base_model_class)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
