"""Packing whole samples into token-budget micro-batches (first-fit decreasing over a window).

``WindowPacker`` collects items (a sample's token count, vision patches and a caller handle)
until its look-ahead window is full, packs the window with first-fit decreasing (FFD) into bins
of ``budget`` tokens, and emits whole *steps*: a step is ``num_ranks x micro_batches_per_step``
bins, assigned to ranks by cost (``rynnscale.data.balance``) so that every rank gets the same
number of micro-batches and close to the same work. The least-filled bins are carried over into
the next window (between 1 and one step's worth), which is what keeps packing efficiency high;
items carried over are placed first next time, and a bin holding an item already carried
``max_carry`` times is emitted before fuller ones, so no sample waits forever.
With ``num_ranks=1`` this is plain per-rank packing (a step is ``micro_batches_per_step`` bins).
Everything is deterministic: the order of items in, the seed and the plan counter decide the
output; the items not yet emitted (``items``) and ``plans`` are the whole state. ``close(pred)`` plans early so that no item matching
``pred`` stays behind (the loader's epoch barrier: a source's samples leave the window before its
next epoch's copies enter it); a step with fewer bins than ``num_ranks x micro_batches_per_step``
(only from ``flush`` or ``close``) is always the plan's last. Items ``avoid`` marks (the samples of the
step before, whose copies of another epoch must not follow them at once) are carried rather than emitted
where possible and kept out of the plan's first step.

``build_packed_batch`` concatenates EncodedSamples into a ``PackedBatch`` (rynnscale/batch.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rynnscale.batch import IGNORE_INDEX, EncodedSample, PackedBatch
from rynnscale.data.balance import CostModel, assign_equal_count
from rynnscale.data.encode import SampleError
from rynnscale.data.reader import mix64


@dataclass
class PackItem:
    """What packing needs to know about one sample; ``ref`` is the caller's handle."""

    key: str
    num_tokens: int
    vision_patches: int = 0
    ref: Any = None
    carried: int = 0        # windows this item has already been carried over


Bin = list[PackItem]


def ffd_bins(lengths: Sequence[int], budget: int, first: Sequence[bool] | None = None) -> list[list[int]]:
    """First-fit decreasing: item indices into bins of at most ``budget`` tokens.

    Items flagged in ``first`` are placed before all others (each group by decreasing length,
    ties by index). Bins are returned in creation order. Every length must be <= budget.
    Each item goes to the lowest-index bin with room, found in a max-tree of the bins' room (O(log bins) per
    item: a window of 65k samples packs in about a second, where scanning every open bin took a minute)."""
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (0 if first is not None and first[i] else 1, -lengths[i], i))
    leaves = 1
    while leaves < n:
        leaves *= 2
    room_max = [-math.inf] * (2 * leaves)   # node k: the most room of a bin below it (-inf: no bin there yet)
    bins: list[list[int]] = []
    for i in order:
        L = lengths[i]
        if L > budget:
            raise ValueError(f"item {i} has {L} tokens, more than the budget {budget}")
        if room_max[1] >= L:   # descend to the leftmost bin with room
            node = 1
            while node < leaves:
                node = 2 * node if room_max[2 * node] >= L else 2 * node + 1
            bins[node - leaves].append(i)
            room = room_max[node] - L
        else:
            node = leaves + len(bins)
            bins.append([i])
            room = budget - L
        room_max[node] = room
        node //= 2
        while node:   # up while the most room below a node changes
            a, b = room_max[2 * node], room_max[2 * node + 1]
            m = a if a >= b else b
            if room_max[node] == m:
                break
            room_max[node] = m
            node //= 2
    return bins


class WindowPacker:
    """FFD packing over a look-ahead window with carry-over, emitting balanced steps.

    ``push(item)`` returns None or, when a plan was made, ``out[rank] = [bin, ...]`` where every
    rank gets the same number of bins (a multiple of ``micro_batches_per_step``). ``flush()``
    packs everything left (ranks may then get unequal counts)."""

    def __init__(self, budget: int, window: int, *, num_ranks: int = 1, micro_batches_per_step: int = 1,
                 cost_model: CostModel | None = None, seed: int = 0, max_carry: int = 2):
        if budget < 1 or window < 1 or num_ranks < 1 or micro_batches_per_step < 1:
            raise ValueError(f"WindowPacker: budget={budget}, window={window}, num_ranks={num_ranks}, "
                             f"micro_batches_per_step={micro_batches_per_step} must all be >= 1")
        self.budget, self.window = budget, window
        self.num_ranks, self.per_step = num_ranks, micro_batches_per_step
        self.cost_model = cost_model or CostModel()
        self.seed, self.max_carry = seed, max_carry
        self.items: list[PackItem] = []   # not yet emitted: carried-over first, then new arrivals
        # items the step before the next plan holds (the caller's: its samples' copies of another epoch):
        # kept out of the plan's first step where possible (``_first_step_apart``)
        self.avoid: Callable[[PackItem], bool] | None = None
        self.plans = 0
        # statistics of emitted bins
        self.emitted_bins = 0
        self.emitted_tokens = 0

    def cost(self, b: Bin) -> float:
        return sum(self.cost_model.sample_cost(it.num_tokens, it.vision_patches) for it in b)

    def push(self, item: PackItem, must: Callable[[PackItem], bool] | None = None) -> list[list[Bin]] | None:
        """Add one sample; SampleError("too_long") if it cannot fit a micro-batch at all. With ``must``, a plan
        made now also emits every bin holding an item with ``must(item)`` (more whole steps if needed; until
        the window packs into enough bins for that, it keeps collecting)."""
        if item.num_tokens < 1:
            raise ValueError(f"sample {item.key!r} has {item.num_tokens} tokens")
        if item.num_tokens > self.budget:
            raise SampleError("too_long", item.key,
                              f"{item.num_tokens} tokens do not fit the micro-batch budget of {self.budget} tokens")
        self.items.append(item)
        if len(self.items) < self.window:
            return None
        return self._plan(force=False, must=must)

    def flush(self) -> list[list[Bin]] | None:
        """Emit every remaining item (end of a finite stream)."""
        return self._plan(force=True) if self.items else None

    def close(self, pred: Callable[[PackItem], bool]) -> list[list[Bin]] | None:
        """Plan now so that no item with ``pred(item)`` stays in the window: the bins holding one are emitted,
        topped up to whole steps with the fullest other bins (every bin when there are not enough: the last
        step is then short); the rest is carried as usual. None when no item matches."""
        if not any(pred(it) for it in self.items):
            return None
        return self._plan(force=False, must=pred, early=True)

    def _plan(self, force: bool, must: Callable[[PackItem], bool] | None = None, early: bool = False
              ) -> list[list[Bin]] | None:
        items = self.items
        bins_idx = ffd_bins([it.num_tokens for it in items], self.budget, [it.carried > 0 for it in items])
        bins = [[items[i] for i in b] for b in bins_idx]
        nb, step = len(bins), self.num_ranks * self.per_step
        needed = [must is not None and any(must(it) for it in b) for b in bins]
        n_need = step * -(-sum(needed) // step)   # whole steps holding every needed bin
        if force:
            n_emit = nb
        elif early:
            n_emit = min(nb, n_need)
        else:
            if nb <= step or n_need > nb:
                return None  # not even one step plus a carried bin (or the needed bins' steps) yet: keep collecting
            n_emit = max(step * ((nb - 1) // step), n_need)
        fill = [sum(it.num_tokens for it in b) for b in bins]
        aged = [any(it.carried >= self.max_carry for it in b) for b in bins]
        marked = [self.avoid is not None and any(self.avoid(it) for it in b) for b in bins]
        ranked = sorted(range(nb), key=lambda b: (not needed[b], not aged[b], marked[b], -fill[b], b))
        emit = sorted(ranked[:n_emit])
        keep = sorted(ranked[n_emit:])
        self.items = [it for b in keep for it in bins[b]]
        for it in self.items:
            it.carried += 1
        out: list[list[Bin]] = [[] for _ in range(self.num_ranks)]
        cost = {b: self.cost(bins[b]) for b in emit}
        by_cost = sorted(emit, key=lambda b: (-cost[b], b))      # similar-cost bins share a step
        steps = [by_cost[k:k + step] for k in range(0, len(by_cost), step)]
        # seeded shuffle of the step order (also with one rank: FFD's order would train each window's
        # largest samples first, and a small data set in the same order every epoch); a short step stays last
        full = len(steps) - (len(steps[-1]) < step if steps else 0)
        for k in range(full - 1, 0, -1):
            j = mix64(self.seed, self.plans, 0x57E9, k) % (k + 1)
            steps[k], steps[j] = steps[j], steps[k]
        if any(marked[b] for b in steps[0]):
            self._first_step_apart(steps, bins)
            cost = {b: self.cost(bins[b]) for b in emit}
        for st in steps:
            parts = assign_equal_count([cost[b] for b in st], self.num_ranks)
            for r, p in enumerate(parts):
                out[r].extend(bins[b] for b in sorted(st[j] for j in p))
        self.plans += 1
        self.emitted_bins += len(emit)
        self.emitted_tokens += sum(fill[b] for b in emit)
        return out

    def _first_step_apart(self, steps: list[list[int]], bins: list[Bin]) -> None:
        """Rearrange a plan (bin indices per step; bins in place) so its first step holds no item ``avoid``
        marks: a full step without one moves to the front; else the first step's marked bins trade places
        with unmarked bins of later steps, then its marked items with unmarked items of later steps where both
        bins stay within the budget (closest size first). Best effort: with fewer samples than about two
        steps hold, an overlap can remain."""
        avoid = self.avoid
        assert avoid is not None

        def marked(b: int) -> bool:
            return any(avoid(it) for it in bins[b])

        size = max(len(st) for st in steps)
        j = next((j for j, st in enumerate(steps) if len(st) == size and not any(marked(b) for b in st)), None)
        if j is not None:
            steps[0], steps[j] = steps[j], steps[0]
            return
        spare = [(j, i) for j in range(1, len(steps)) for i, b in enumerate(steps[j]) if not marked(b)]
        for i, b in enumerate(steps[0]):
            if marked(b) and spare:
                j, t = spare.pop(0)
                steps[0][i], steps[j][t] = steps[j][t], b
        later = [(bins[b], t) for st in steps[1:] for b in st for t, it in enumerate(bins[b]) if not avoid(it)]
        for b in (bins[b] for b in steps[0]):
            for i, x in enumerate(b):
                if not avoid(x):
                    continue
                room = self.budget - sum(it.num_tokens for it in b) + x.num_tokens
                fits = [n for n, (c, t) in enumerate(later) if c[t].num_tokens <= room
                        and sum(it.num_tokens for it in c) - c[t].num_tokens + x.num_tokens <= self.budget]
                if fits:
                    n = min(fits, key=lambda n: (abs(later[n][0][later[n][1]].num_tokens - x.num_tokens), n))
                    c, t = later.pop(n)
                    b[i], c[t] = c[t], x

    @property
    def efficiency(self) -> float:
        """Real tokens / (bins x budget) over everything emitted so far."""
        return self.emitted_tokens / (self.emitted_bins * self.budget) if self.emitted_bins else 0.0


def build_packed_batch(samples: Sequence[EncodedSample], *, pixel_values: torch.Tensor | None = None,
                       pixel_values_videos: torch.Tensor | None = None) -> PackedBatch:
    """Concatenate whole samples into one packed row (order kept).

    input_ids/labels [L], position_ids [3, L] (each sample's positions start at 0), cu_seqlens
    int32 [S+1], pixel values and grids of images/videos concatenated in sample order (that is the
    order of their placeholder tokens in the row). Raises ValueError naming the broken sample.

    ``pixel_values`` / ``pixel_values_videos``: a pack buffer the samples' pixels were already
    encoded into, back to back in sample order (``SampleEncoder.finish(..., *_out=buf[r0:r1])``);
    it becomes the batch's tensor as is, saving a copy of every pixel (checked by address).

    Pixels are uint8 (raw, the samples' common ``pixel_norm`` goes into the batch) or float
    (normalised) in all samples of a pack, never mixed (``torch.cat`` would silently promote)."""
    if not samples:
        raise ValueError("build_packed_batch needs at least one sample")
    norms = {s.pixel_norm for s in samples if s.pixel_norm is not None}
    if len(norms) > 1:
        raise ValueError(f"samples {[s.key for s in samples]} carry different pixel_norm values {sorted(map(str, norms))}: "
                         "one pack must come from one processor setting")
    pixel_norm = next(iter(norms)) if norms else None
    raw = {(s.key, name, getattr(s, name).dtype == torch.uint8) for s in samples
           for name in ("pixel_values", "pixel_values_videos") if getattr(s, name) is not None}
    if len({r for _, _, r in raw}) > 1:
        raise ValueError("a pack mixes raw uint8 and normalised float pixels: "
                         f"{sorted((k, n, 'uint8' if r else 'float') for k, n, r in raw)}; encode all its samples "
                         "the same way (SampleEncoder normalize=...)")
    if any(r for _, _, r in raw) and pixel_norm is None:
        raise ValueError(f"samples {[k for k, _, r in raw if r]} have uint8 pixels but no pixel_norm")
    lens = []
    for s in samples:
        L = s.num_tokens
        if s.input_ids_l.dim() != 1 or L < 1:
            raise ValueError(f"sample {s.key!r}: input_ids_l must be 1-D and non-empty, got {tuple(s.input_ids_l.shape)}")
        if tuple(s.labels_l.shape) != (L,):
            raise ValueError(f"sample {s.key!r}: labels_l has shape {tuple(s.labels_l.shape)}, expected ({L},)")
        if tuple(s.position_ids_3l.shape) != (3, L):
            raise ValueError(f"sample {s.key!r}: position_ids_3l has shape {tuple(s.position_ids_3l.shape)}, "
                             f"expected (3, {L})")
        if int(s.labels_l[0]) != IGNORE_INDEX:
            raise ValueError(f"sample {s.key!r}: the first label must be -100 (a packed row is shifted as one)")
        lens.append(L)
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0).to(torch.int32)

    def cat(name: str, buf: torch.Tensor | None = None) -> torch.Tensor | None:
        parts = [(s.key, getattr(s, name)) for s in samples if getattr(s, name) is not None]
        if buf is None:
            if len(parts) == 1:
                return parts[0][1]  # one sample: its tensor as is, no copy
            return torch.cat([t for _, t in parts]) if parts else None
        r0 = 0
        for key, t in parts:
            if t.dim() != 2 or t.shape[1] != buf.shape[1] or r0 + t.shape[0] > buf.shape[0] \
                    or t.data_ptr() != buf[r0].data_ptr():
                raise ValueError(f"sample {key!r}: its {name} {tuple(t.shape)} is not rows {r0}.. of the pack buffer "
                                 f"{tuple(buf.shape)} (encode the samples into the buffer in order)")
            r0 += t.shape[0]
        if r0 != buf.shape[0]:
            raise ValueError(f"the {name} pack buffer has {buf.shape[0]} rows but the samples fill {r0}")
        return buf

    batch = PackedBatch(
        input_ids_l=torch.cat([s.input_ids_l.to(torch.int64) for s in samples]),
        labels_l=torch.cat([s.labels_l.to(torch.int64) for s in samples]),
        position_ids_3l=torch.cat([s.position_ids_3l.to(torch.int64) for s in samples], dim=1),
        cu_seqlens=cu,
        max_seqlen=max(lens),
        pixel_values=cat("pixel_values", pixel_values),
        image_grid_thw=cat("image_grid_thw"),
        pixel_values_videos=cat("pixel_values_videos", pixel_values_videos),
        video_grid_thw=cat("video_grid_thw"),
        sample_keys=[s.key for s in samples],
        pixel_norm=pixel_norm,
    )
    batch.validate()
    return batch
