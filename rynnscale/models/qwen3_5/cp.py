"""Context parallelism of the Gated DeltaNet layers: the recurrent state is handed along the sequence (a scan over
the CP group), not all-to-all'd.

Under CP every document of the row is split into ``2 cp`` zigzag chunks (``rynnscale.parallel.context_parallel``:
rank r holds chunks r and 2cp-1-r). Along one document the chunks form RUNS of consecutive tokens held by one rank
(chunks cp-1 and cp are one run of rank cp-1), in the order of ranks 0, 1, ..., cp-1, ..., 1, 0 (empty chunks of
short documents are simply absent). The state entering a run is a function of the runs before it in the same
document; the gated delta rule is affine in its initial state, so each run is summarised by a map
``S_out = P S_in + Q`` (``P`` [Hv, dk, dk], ``Q`` [Hv, dk, dv]):

1. every rank computes the maps of its own runs with the chunked rule itself (``Q``: zero initial state; ``P``: the
   identity as initial state and zero values, i.e. the product of the transitions ``exp(g)(I - beta k k^T)``); these
   two passes are recomputed in backward (``run_maps``), so the step does not keep their chunk tensors;
2. the maps are all-gathered (``gather_rows``: differentiable, its backward sums the gradients over the group) and
   every rank composes, for each of its runs, the maps of the earlier runs of its document in order: the scan;
3. every rank runs its runs from those initial states.
The causal convolution needs the K-1 tokens before each run: every rank's last K-1 convolution inputs of each run
are gathered too, and a run's context is taken from the runs before it (``causal_conv1d(..., initial_ntc)``).
Each run thus computes exactly what the unsharded row computes; the cost is three passes of the rule over the
local tokens (the second one with dk-wide values), the first two again in backward, and two small all-gathers per
layer. Memory beyond the layer's unsharded count (``memory.cp_layer_bytes``): the runs' chunk padding, the
convolution's context rows, the composed maps kept for backward, and the recomputed passes while the layer's backward
runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rynnscale.parallel.context_parallel import CPShard, gather_rows


@dataclass(frozen=True)
class RunLayout:
    """The runs of a sharded row (identical on every rank: computed from the plan alone).

    ``run_rank`` / ``run_len`` / ``run_doc``: per run in (document, position) order; ``rank_runs[r]``: the run ids of
    rank r in its local (increasing global) order; ``prev``: per run, the id of the run before it in its document
    (-1 at a document's start)."""

    run_rank: list[int]
    run_len: list[int]
    run_doc: list[int]
    rank_runs: list[list[int]]
    prev: list[int]

    def local_cu_seqlens(self, rank: int) -> torch.Tensor:
        lens = [self.run_len[i] for i in self.rank_runs[rank]]
        return torch.tensor([0, *torch.tensor(lens, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)


def run_layout(cp: CPShard) -> RunLayout:
    plan = cp.plan
    owner = torch.empty(plan.padded_length, dtype=torch.long)
    for r, idx in enumerate(plan.indices):
        owner[idx] = r
    doc = plan.doc_ids
    change = torch.ones(plan.padded_length, dtype=torch.bool)
    change[1:] = (owner[1:] != owner[:-1]) | (doc[1:] != doc[:-1])
    starts = change.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([plan.padded_length])])
    run_rank, run_len, run_doc = owner[starts].tolist(), (ends - starts).tolist(), doc[starts].tolist()
    rank_runs: list[list[int]] = [[] for _ in range(plan.cp)]
    prev = []
    for i, (r, d) in enumerate(zip(run_rank, run_doc)):
        rank_runs[r].append(i)
        prev.append(i - 1 if i > 0 and run_doc[i - 1] == d else -1)
    return RunLayout(run_rank, run_len, run_doc, rank_runs, prev)


def _gather_runs(x_n: torch.Tensor, lay: RunLayout, cp: CPShard) -> torch.Tensor:
    """Every run's row of a per-run tensor (this rank's runs in local order) -> all runs, in run-id order."""
    sizes = [len(r) for r in lay.rank_runs]
    rows = gather_rows(x_n.contiguous(), sizes, cp.rank, cp.group)          # rank order
    order = [i for r in lay.rank_runs for i in r]                              # run id of each gathered row
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return rows.index_select(0, inv.to(rows.device))


def conv_context(qkv_lc: torch.Tensor, lay: RunLayout, cp: CPShard, width: int) -> torch.Tensor:
    """[local runs, width, C]: the ``width`` convolution inputs before each of this rank's runs in its document
    (zeros before the document's start)."""
    mine = lay.rank_runs[cp.rank]
    C = qkv_lc.shape[1]
    bounds = lay.local_cu_seqlens(cp.rank).tolist()
    tails = []
    for j in range(len(mine)):   # the last `width` rows of each run, left-padded with zeros
        a, b = bounds[j], bounds[j + 1]
        t = qkv_lc[max(a, b - width):b]
        tails.append(torch.cat([t.new_zeros(width - t.shape[0], C), t]))
    tails_nwc = torch.stack(tails) if tails else qkv_lc.new_zeros(0, width, C)
    all_tails = _gather_runs(tails_nwc, lay, cp)                               # [runs, width, C]
    flat = torch.cat([all_tails.reshape(-1, C), qkv_lc.new_zeros(1, C)])       # last row: zero
    zero = flat.shape[0] - 1
    rows = []
    for i in mine:   # walk back through the earlier runs of the document, `width` valid rows at most
        picked, p = [], lay.prev[i]
        while p >= 0 and len(picked) < width:
            n = min(lay.run_len[p], width)
            picked = [p * width + width - n + k for k in range(n)] + picked
            p = lay.prev[p]
        picked = [zero] * max(0, width - len(picked)) + picked[-width:]
        rows.append(picked)
    idx = torch.tensor(rows, dtype=torch.long, device=qkv_lc.device).reshape(-1)
    return flat.index_select(0, idx).reshape(len(mine), width, C)


@torch.compiler.disable  # a checkpointed region around data-dependent rule calls: eager inside compiled blocks
def run_maps(rule, q, k, v, g, beta, cu_local: torch.Tensor) -> torch.Tensor:
    """[local runs, Hv, dk, dk + dv]: ``[P | Q]`` of each of this rank's runs (module docstring, step 1).

    Recomputed in backward (``torch.utils.checkpoint``): what the two passes of the rule would save (their chunk
    tensors, twice the main pass's on the CPU path; fla's A and the identity states on the GPU) is not kept across
    the step, only while this layer's backward runs. Every rank recomputes the same passes: no collective inside."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta)):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(_run_maps, rule, q, k, v, g, beta, cu_local, use_reentrant=False)
    return _run_maps(rule, q, k, v, g, beta, cu_local)


def _run_maps(rule, q, k, v, g, beta, cu_local: torch.Tensor) -> torch.Tensor:
    n, Hv, dk = cu_local.numel() - 1, v.shape[1], q.shape[-1]
    _, Q = rule(q, k, v, g, beta, cu_local, output_final_state=True)
    eye = torch.eye(dk, dtype=Q.dtype, device=Q.device).expand(n, Hv, dk, dk).contiguous()
    zeros_v = v.new_zeros(v.shape[0], Hv, dk)
    _, P = rule(q, k, zeros_v, g, beta, cu_local, initial_state=eye, output_final_state=True)
    return torch.cat([P, Q.to(P.dtype)], dim=-1)


def scan_runs(lay: RunLayout, rank: int) -> list[int]:
    """The runs whose maps ``rank`` composes: the earlier runs of the documents of its runs, in document order."""
    needed: set[int] = set()
    for i in lay.rank_runs[rank]:
        p = lay.prev[i]
        while p >= 0 and p not in needed:
            needed.add(p)
            p = lay.prev[p]
    return sorted(needed)


def initial_states(rule, q, k, v, g, beta, cu_local: torch.Tensor, lay: RunLayout, cp: CPShard) -> torch.Tensor:
    """[local runs, Hv, dk, dv]: the state entering each of this rank's runs (module docstring, steps 1-2).
    ``rule``: the chunked delta rule in use (``chunk_gated_delta_rule`` or fla's).

    Saved for backward: the ``P`` of the composed runs (``scan_runs``) that do not start a document and the states
    they multiply (after a document's first run: its ``Q``) -- ``2 cp - 3`` maps' worth per document on rank 0 --,
    not the gathered maps of every run."""
    Hv, dk, dv = v.shape[1], q.shape[-1], v.shape[-1]
    maps = _gather_runs(run_maps(rule, q, k, v, g, beta, cu_local), lay, cp)   # [runs, Hv, dk, dk + dv]
    composed = scan_runs(lay, cp.rank)
    starts = [p for p in composed if lay.prev[p] < 0]   # S = Q
    rest = [p for p in composed if lay.prev[p] >= 0]    # S = P S_before + Q

    def select(runs: list[int], part: slice) -> torch.Tensor:   # a fresh tensor: the gathered maps are freed
        return maps[..., part].index_select(0, torch.tensor(runs, dtype=torch.long, device=maps.device)).contiguous()

    # what backward keeps: the P that multiply a state, and the states they multiply (the starts' Q, then products)
    P_rest, Q_rest, Q_start = select(rest, slice(None, dk)), select(rest, slice(dk, None)), select(starts, slice(dk, None))
    row = {p: j for j, p in enumerate(starts)} | {p: j for j, p in enumerate(rest)}
    after: dict[int, torch.Tensor] = {}   # run -> the state leaving it
    with torch.autocast(maps.device.type, enabled=False):   # in the rule's fp32, also in a bf16 step
        for p in composed:   # document order: a run's predecessor is composed before it
            before = lay.prev[p]
            after[p] = Q_start[row[p]] if before < 0 else P_rest[row[p]] @ after[before] + Q_rest[row[p]]
    zero = maps.new_zeros(Hv, dk, dv)
    out = [after[lay.prev[i]] if lay.prev[i] >= 0 else zero for i in lay.rank_runs[cp.rank]]
    # a rank whose runs all start documents uses none of the maps; its result must still depend on them, or the
    # gather's backward (a collective) would not run on it while it runs on the others (a mismatch / hang)
    in_graph = maps.reshape(-1)[:0].sum()
    return (torch.stack(out) if out else maps.new_zeros(0, Hv, dk, dv)) + in_graph
