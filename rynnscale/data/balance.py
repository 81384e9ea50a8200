"""Rank balancing: assign a step's samples or packs to data-parallel ranks by estimated cost.

Cost of one sample of ``s`` tokens with ``v`` vision patches (in "decoder token" units):

    cost = a * s  +  b * s**2  +  c * v

- ``a`` (1.0): linear layers, ~2 x active decoder parameters FLOPs per token (the unit).
- ``b``: causal attention. Per layer a (query, key) pair costs 4 * H_q * d_h FLOPs forward and
  a causal sample has ~s^2 / 2 pairs, so b = layers * H_q * d_h / N_active (same 6x factor
  for forward + backward on both sides). Default 4e-5: between Qwen3-VL-2B (~3.4e-5) and
  Qwen3-VL-30B-A3B (~6e-5); attention then adds ~65% to a 16k-token sample.
- ``c``: vision tower per patch, ~ N_vision / N_active. Default 0.15 (Qwen3-VL-30B-A3B: 0.44B
  vision parameters vs ~3.3B active decoder ones; per-frame vision attention is ignored).
``CostModel.from_args(args)`` derives a, b, c from a model's dimensions (its family's ``cost_coefficients``).

A pack's cost is the sum of its samples' costs (attention never crosses sample boundaries).
Algorithms: LPT (longest processing time first) with a swap/move refinement pass, an
equal-count variant (every rank gets the same number of packs +-1, needed so all ranks run the
same number of micro-batches per step), and the RynnScale-style baseline (greedy split by
token count) the bench compares against.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rynnscale.models import family_of

#: Defaults of CostModel (see module docstring for where they come from).
DEFAULT_A, DEFAULT_B, DEFAULT_C = 1.0, 4e-5, 0.15


@dataclass(frozen=True)
class CostModel:
    """Estimated compute cost of samples: ``a * tokens + b * tokens^2 + c * vision_patches``."""

    a: float = DEFAULT_A
    b: float = DEFAULT_B
    c: float = DEFAULT_C

    def sample_cost(self, num_tokens: int, vision_patches: int = 0) -> float:
        s = float(num_tokens)
        return self.a * s + self.b * s * s + self.c * float(vision_patches)

    def pack_cost(self, lengths: Sequence[int], vision_patches: Sequence[int] | None = None) -> float:
        """Cost of a pack of whole samples: sum of per-sample costs (no cross-sample attention)."""
        vp = vision_patches if vision_patches is not None else [0] * len(lengths)
        return sum(self.sample_cost(s, v) for s, v in zip(lengths, vp))

    @classmethod
    def from_args(cls, args: Any) -> CostModel:
        """Coefficients from a model's architecture: its family's FLOP ratios of attention and of the vision
        tower to the decoder's linear layers (``ModelSpec.cost_coefficients``)."""
        a, b, c = family_of(args).cost_coefficients(args)
        return cls(a=a, b=b, c=c)


def imbalance(loads: Sequence[float]) -> float:
    """max / mean of per-rank loads (1.0 = perfect); 1.0 for all-zero loads."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def _loads(parts: list[list[int]], costs: Sequence[float]) -> list[float]:
    return [sum(costs[i] for i in p) for p in parts]


def _refine(parts: list[list[int]], costs: Sequence[float], *, allow_moves: bool, max_rounds: int) -> None:
    """Local search: repeatedly lower the most loaded part by the best single swap of one of its
    items with an item of another part (or, if counts are free, a move to the least loaded part)."""
    loads = _loads(parts, costs)
    for _ in range(max_rounds):
        hi = max(range(len(parts)), key=lambda r: (loads[r], -r))
        best = None  # (new pair max, hi_pos, other part, other_pos or -1)
        for o in range(len(parts)):
            if o == hi:
                continue
            for pi, i in enumerate(parts[hi]):
                ci = costs[i]
                if allow_moves:
                    m = max(loads[hi] - ci, loads[o] + ci)
                    if m < loads[hi] - 1e-9 and (best is None or m < best[0]):
                        best = (m, pi, o, -1)
                for pj, j in enumerate(parts[o]):
                    d = ci - costs[j]
                    if d <= 0:
                        continue
                    m = max(loads[hi] - d, loads[o] + d)
                    if m < loads[hi] - 1e-9 and (best is None or m < best[0]):
                        best = (m, pi, o, pj)
        if best is None:
            return
        _, pi, o, pj = best
        i = parts[hi][pi]
        if pj < 0:
            parts[hi].pop(pi)
            parts[o].append(i)
            loads[hi] -= costs[i]
            loads[o] += costs[i]
        else:
            j = parts[o][pj]
            parts[hi][pi], parts[o][pj] = j, i
            d = costs[i] - costs[j]
            loads[hi] -= d
            loads[o] += d


def assign_lpt(costs: Sequence[float], num_ranks: int, *, refine: bool = True, max_rounds: int = 200
               ) -> list[list[int]]:
    """Partition item indices over ``num_ranks`` minimising the max load (counts may differ):
    LPT greedy (largest item to the least loaded rank), then swap/move refinement.
    Deterministic (ties -> lower index). Each rank's list is sorted."""
    parts: list[list[int]] = [[] for _ in range(num_ranks)]
    heap = [(0.0, r) for r in range(num_ranks)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        parts[r].append(i)
        heapq.heappush(heap, (load + costs[i], r))
    if refine:
        _refine(parts, costs, allow_moves=True, max_rounds=max_rounds)
    return [sorted(p) for p in parts]


def assign_equal_count(costs: Sequence[float], num_ranks: int, *, refine: bool = True, max_rounds: int = 200
                       ) -> list[list[int]]:
    """Like ``assign_lpt`` but every rank gets the same number of items (the first
    ``len % num_ranks`` ranks one more): LPT restricted to ranks with room, then swaps only."""
    n = len(costs)
    cap = [n // num_ranks + (1 if r < n % num_ranks else 0) for r in range(num_ranks)]
    parts: list[list[int]] = [[] for _ in range(num_ranks)]
    loads = [0.0] * num_ranks
    for i in sorted(range(n), key=lambda i: (-costs[i], i)):
        r = min((r for r in range(num_ranks) if len(parts[r]) < cap[r]), key=lambda r: (loads[r], r))
        parts[r].append(i)
        loads[r] += costs[i]
    if refine:
        _refine(parts, costs, allow_moves=False, max_rounds=max_rounds)
    return [sorted(p) for p in parts]


def greedy_token_split(num_tokens: Sequence[int], num_ranks: int) -> list[list[int]]:
    """RynnScale-style baseline: samples sorted by token count, each to the rank holding the
    fewest tokens so far. Balances tokens only (blind to attention's s^2 and vision cost)."""
    return assign_lpt([float(t) for t in num_tokens], num_ranks, refine=False)
