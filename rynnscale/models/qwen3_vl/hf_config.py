"""``config.json`` of a Hugging Face Qwen3-VL(-MoE) checkpoint -> ``Qwen3VLArgs`` (the inverse of
``Qwen3VLArgs.to_hf_config``). Beside the model because recipes, the planner and the checkpoint
loader all resolve an architecture from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rynnscale.models.qwen3_vl.args import Qwen3VLArgs

SUPPORTED_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint directory is unusable; the message names the file / tensors."""


def read_hf_config(path: str | os.PathLike) -> tuple[Qwen3VLArgs, dict[str, Any]]:
    """Read ``config.json`` (``path`` is the checkpoint directory or the file itself).

    Returns our args and the raw dict (for keys args do not carry, e.g. ``transformers_version``)."""
    path = Path(path)
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise HFCheckpointError(f"{cfg_path}: no such file (a Hugging Face checkpoint directory needs config.json)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFCheckpointError(
            f"{cfg_path}: model_type={model_type!r} is not supported; expected one of {list(SUPPORTED_MODEL_TYPES)}")
    quant = raw.get("quantization_config")
    if quant:
        raise HFCheckpointError(
            f"{cfg_path}: quantized checkpoints are not supported "
            f"(quantization_config.quant_method={quant.get('quant_method')!r}); use the bf16 release")
    return Qwen3VLArgs.from_hf_config(raw, where=str(cfg_path)), raw
