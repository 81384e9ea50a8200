"""Test models with LoRA adapters whose ``B`` is not zero, so both factors get gradients at once."""

from __future__ import annotations

import torch

from rynnscale.models.lora import LoRASpec, apply_lora, is_adapter_param
from rynnscale.models.qwen3_vl.moe import GroupedExperts


def randomize_adapters(model: torch.nn.Module, seed: int, std: float = 0.1) -> dict[str, torch.Tensor]:
    """Every adapter factor ~ N(0, std) from ``seed``; returns them by name."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_adapter_param(n):
                p.copy_(torch.randn(p.shape, generator=g) * std)
                out[n] = p.detach().clone()
    return out


def add_random_lora(model: torch.nn.Module, seed: int, std: float = 0.1, **spec) -> torch.nn.Module:
    """Rank-4 adapters on attention, MLP, every expert and the vision blocks (``spec`` overrides), random."""
    kw = dict(rank=4, alpha=8.0, experts=True, vision=True) | spec
    apply_lora(model, LoRASpec(**kw), experts_of=lambda m: isinstance(m, GroupedExperts))
    randomize_adapters(model, seed, std)
    return model
