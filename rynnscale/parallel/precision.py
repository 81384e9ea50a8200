"""The one place that turns ``train.dtype`` into the run's compute dtype.

``auto``: bf16 on a GPU (autocast compute, FSDP2 bf16 parameters for compute with fp32 reduction and fp32
sharded master weights), fp32 on the CPU (exact and reproducible); ``bfloat16`` / ``float32`` force it.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``train.dtype`` (auto | float32 | bfloat16) on ``device`` -> the dtype matmuls run in."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"train.dtype={name!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[name]


def autocast(dtype: torch.dtype, device: torch.device):
    """Autocast to ``dtype`` when it is below fp32 (parameters stay fp32), else nothing."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
