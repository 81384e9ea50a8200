"""Index helpers for routing rows (tokens) into groups and back."""

from __future__ import annotations

import torch


def inverse_permutation(perm_s: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i`` (a scatter of unique indices: deterministic, no host sync)."""
    return torch.empty_like(perm_s).scatter_(0, perm_s, torch.arange(perm_s.numel(), device=perm_s.device))
