"""The Qwen3.5 parallel plan: Qwen3-VL's (``qwen3_vl/parallelize.py``: EP over the routed experts of every
``SparseMoeBlock`` -- our ``SharedExpertMoeBlock`` is one, its shared expert stays a dense part of the decoder
layer -- then activation checkpointing, compile and FSDP2 units over decoder layers and vision blocks), with one
refusal: context parallelism of the Gated DeltaNet layers is not implemented yet."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from rynnscale.models.qwen3_vl.parallelize import parallelize as qwen3_vl_parallelize


def parallelize(model: nn.Module, meshes: Any, **options: Any) -> nn.Module:
    """``qwen3_vl.parallelize.parallelize`` (same options), refusing ``parallel.cp > 1`` while the model has
    linear-attention layers."""
    if meshes is not None and meshes.layout.cp > 1 and model.args.text.num_linear_layers:
        raise ValueError(f"parallel.cp={meshes.layout.cp}: context parallelism of Qwen3.5's Gated DeltaNet layers "
                         "is not implemented yet; use parallel.cp=1")
    return qwen3_vl_parallelize(model, meshes, **options)
