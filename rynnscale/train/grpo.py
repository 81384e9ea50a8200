"""GRPO rollouts: prompts -> G sampled answers each (KV-cache generation on the training model) -> rewards ->
group-normalised advantages -> ``RolloutBatch`` micro-batches for the ``GRPO`` objective."""

from __future__ import annotations

import math
from collections.abc import Sequence


def group_advantages(rewards: Sequence[float], group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> list[float]:
    """Advantage of every sample (groups of ``group_size`` consecutive samples = one prompt's answers):
    ``(r - mean(group)) / (std(group) + eps)`` (``scale``; else without the division), the mean and the
    unbiased std over the group's finite rewards. A NaN reward (a failed reward function) is left out of its
    group's statistics and gets advantage 0, as does every sample of a group with fewer than 2 finite rewards
    (TRL's ``nanmean`` / ``nanstd`` / ``nan_to_num``)."""
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"group_advantages: {len(rewards)} rewards do not form groups of {group_size}")
    out: list[float] = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start:start + group_size]]
        ok = [r for r in group if math.isfinite(r)]
        mean = sum(ok) / len(ok) if ok else math.nan
        std = math.sqrt(sum((r - mean) ** 2 for r in ok) / (len(ok) - 1)) if len(ok) > 1 else math.nan
        for r in group:
            a = (r - mean) / (std + eps) if scale else r - mean
            out.append(a if math.isfinite(a) else 0.0)
    return out
