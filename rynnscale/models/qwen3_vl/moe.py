"""Qwen3-VL-MoE sparse MLP: softmax top-k router, dropless experts on a grouped GEMM.

Parameter names and layouts are transformers' (5.x) ``Qwen3VLMoeTextSparseMoeBlock`` ones, so a
decoder layer's ``mlp.*`` keys load 1:1:
- ``gate.weight``            [E, H]      router (``Qwen3VLMoeTextTopKRouter``)
- ``experts.gate_up_proj``   [E, 2I, H]  gate rows first, then up rows
- ``experts.down_proj``      [E, H, I]

Forward = route -> dispatch -> compute -> combine, as separate methods so expert parallelism puts an
all-to-all between dispatch and compute (and its inverse between compute and combine) without touching
the math (``ep_dispatcher``, set by the parallel plan: ``parallelize.apply_expert_parallel``):
- route:    probs = softmax(x @ Wg.T) in fp32, top-k, renormalised (as HF), weights in x's dtype.
- dispatch: the T*k (token, expert) pairs are stably sorted by expert (one argsort, no Python loop
            over experts); ``offsets_e`` (cumulative ends) come from ``searchsorted`` on the device,
            so nothing syncs with the host.
- compute:  grouped GEMM gate_up -> SiLU(gate) * up -> x routing weight -> grouped GEMM down. The
            weight is applied to the [S, I] input of the (linear) down projection rather than to its
            [S, H] output: the same function, but backward keeps an [S, I] tensor instead of an [S, H]
            one (I = 768 vs H = 2048 in Qwen3-VL-30B-A3B). Under EP the weights stay on the token's
            rank and multiply the [S, H] rows that come back.
- combine:  rows gathered back by the inverse permutation (an index_select, which keeps only the
            index for backward; a scatter would keep its [S, H] source), then summed over the k
            choices per token (deterministic; no atomics).

Load balancing. Each layer returns ``RouterStats``: the mean router probability per expert
``P_e`` (differentiable) and the local top-k assignment counts (detached). The model computes
``load_balancing_loss`` OUTSIDE any activation-checkpointed region, so the optional
``counts_reducer`` (e.g. an all_reduce over data-parallel ranks = global-batch balancing) runs once
per step for all layers together and is never re-run by checkpoint recomputation.

Definition (per MoE layer l, then averaged over layers):
    lb_l = E * sum_e f_e * P_e,   f_e = (global) share of the layer's top-k assignments sent to e
so a perfectly balanced router gives lb_l = 1. transformers' ``load_balancing_loss_func`` instead
(1) sums counts and probabilities over ALL layers before multiplying (a product of averages, not an
average of per-layer products) and (2) uses f_e = assignments / tokens, which sums to k, so its
balanced value is k. For a single layer HF's value is exactly k * ours; the model multiplies by
``router_aux_loss_coef * k`` so a coefficient taken from a transformers config keeps its strength.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rynnscale.models.qwen3_vl.args import TextArgs
from rynnscale.ops import fused
from rynnscale.ops.grouped_gemm import grouped_mm
from rynnscale.ops.permute import inverse_permutation

CountsReducer = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RouterStats:
    """Per-layer routing statistics of one forward.

    ``prob_mean_e`` fp32 [E]: mean router probability per expert over this rank's tokens (has grad).
    ``counts_e`` int64 [E]: top-k assignments per expert on this rank (no grad)."""

    prob_mean_e: torch.Tensor
    counts_e: torch.Tensor


@dataclass
class Dispatch:
    """What ``combine`` needs to undo ``dispatch``.

    ``perm_s`` [S=T*k]: sorted slot -> flat (token, choice) slot; ``inv_perm_s`` [S]: its inverse;
    ``weight_s`` [S]: routing weight in sorted order; ``offsets_e`` int32 [E]: cumulative end row of
    each expert in sorted order."""

    perm_s: torch.Tensor
    inv_perm_s: torch.Tensor
    weight_s: torch.Tensor
    offsets_e: torch.Tensor
    num_tokens: int
    top_k: int


class TopKRouter(nn.Module):
    """Softmax router: ``weight`` [E, H] (HF: ``mlp.gate.weight``)."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.num_experts = args.num_experts
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.hidden_size))

    def forward(self, x_th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> probs_te fp32 [T, E], topk_weight_tk [T, k] (x's dtype), topk_idx_tk int64 [T, k]."""
        logits_te = F.linear(x_th, self.weight)
        probs_te = torch.softmax(logits_te, dim=-1, dtype=torch.float32)
        topk_weight_tk, topk_idx_tk = torch.topk(probs_te, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weight_tk = topk_weight_tk / topk_weight_tk.sum(dim=-1, keepdim=True)
        return probs_te, topk_weight_tk.to(logits_te.dtype), topk_idx_tk


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored fused as 3-D tensors (HF: ``mlp.experts.*``)."""

    def __init__(self, args: TextArgs, gemm_backend: str = "auto"):
        super().__init__()
        if args.hidden_act != "silu":
            raise ValueError(f"text_config.hidden_act={args.hidden_act!r} is not supported by the MoE experts; "
                             "allowed: 'silu'")
        E, H, inter = args.num_experts, args.hidden_size, args.moe_intermediate_size
        self.num_experts = E
        self.intermediate_size = inter
        self.gemm_backend = gemm_backend
        self.kernels = "torch"  # rynnscale.ops.fused choice for the SwiGLU
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, inter))
        self.lora = None  # ``rynnscale.models.lora.ExpertLoRA`` when the experts carry adapters

    def _project(self, name: str, x_tk: torch.Tensor, offsets_e: torch.Tensor) -> torch.Tensor:
        if self.lora is not None:
            return self.lora.project(self, name, x_tk, offsets_e, self.gemm_backend)
        return grouped_mm(x_tk, getattr(self, name), offsets_e, backend=self.gemm_backend)

    def forward(self, x_sorted_sh: torch.Tensor, offsets_e: torch.Tensor,
                weight_s: torch.Tensor | None = None) -> torch.Tensor:
        """Rows sorted by expert [S, H] -> expert outputs [S, H], each row times ``weight_s`` [S] if given
        (applied before the down projection, see the module docstring)."""
        gate_up_s2i = self._project("gate_up_proj", x_sorted_sh, offsets_e)
        h_si = fused.silu_mul_packed(gate_up_s2i, fused.pick(self.kernels, gate_up_s2i))
        if weight_s is not None:
            h_si = h_si * weight_s[:, None].to(h_si.dtype)
        return self._project("down_proj", h_si, offsets_e)


class SparseMoeBlock(nn.Module):
    """Router + experts; ``forward(x_th) -> (y_th, RouterStats)``."""

    def __init__(self, args: TextArgs, gemm_backend: str = "auto"):
        super().__init__()
        self.num_experts = args.num_experts
        self.top_k = args.num_experts_per_tok
        self.gate = TopKRouter(args)
        self.experts = GroupedExperts(args, gemm_backend)
        # set by the parallel plan (parallelize.apply_expert_parallel): f(experts, x_sorted, offsets over all E) -> y_sorted,
        # all-to-all to the experts' ranks and back; None = all experts are local
        self.ep_dispatcher: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def dispatch(self, x_th: torch.Tensor, topk_weight_tk: torch.Tensor,
                 topk_idx_tk: torch.Tensor) -> tuple[torch.Tensor, Dispatch]:
        """Permute token copies into expert order: -> x_sorted [T*k, H] and the Dispatch record."""
        T, k = topk_idx_tk.shape
        expert_s = topk_idx_tk.reshape(-1)
        expert_sorted_s, perm_s = torch.sort(expert_s, stable=True)
        ids_e = torch.arange(self.num_experts, device=expert_s.device, dtype=expert_sorted_s.dtype)
        offsets_e = torch.searchsorted(expert_sorted_s, ids_e, right=True).to(torch.int32)
        x_sorted_sh = x_th.index_select(0, perm_s // k)
        weight_s = topk_weight_tk.reshape(-1).index_select(0, perm_s)
        return x_sorted_sh, Dispatch(perm_s, inverse_permutation(perm_s), weight_s, offsets_e, T, k)

    def compute(self, x_sorted_sh: torch.Tensor, d: Dispatch) -> torch.Tensor:
        """Routing-weighted expert outputs in sorted order [S, H] (``d.offsets_e``: ends over all E experts)."""
        if self.ep_dispatcher is not None:
            y_sorted_sh = self.ep_dispatcher(self.experts, x_sorted_sh, d.offsets_e)
            return y_sorted_sh * d.weight_s[:, None].to(y_sorted_sh.dtype)
        return self.experts(x_sorted_sh, d.offsets_e, d.weight_s)

    def combine(self, y_weighted_sh: torch.Tensor, d: Dispatch) -> torch.Tensor:
        """Un-permute and sum over the k choices: [T*k, H] sorted (already weighted) -> [T, H]."""
        y_flat_sh = y_weighted_sh.index_select(0, d.inv_perm_s)
        return y_flat_sh.view(d.num_tokens, d.top_k, y_flat_sh.shape[-1]).sum(dim=1)

    def forward(self, x_th: torch.Tensor, valid_t: torch.Tensor | None = None,
                row_tokens: int | None = None) -> tuple[torch.Tensor, RouterStats]:
        """``valid_t`` bool [T] / ``row_tokens`` (context parallelism): the statistics count only the valid
        tokens and the mean probability divides by ``row_tokens`` (the whole row's length), so the sums of
        the CP ranks' statistics are the unsharded row's. Every token is routed and computed either way."""
        probs_te, topk_weight_tk, topk_idx_tk = self.gate(x_th)
        x_sorted_sh, d = self.dispatch(x_th, topk_weight_tk, topk_idx_tk)
        y_sorted_sh = self.compute(x_sorted_sh, d)
        y_th = self.combine(y_sorted_sh, d)
        if valid_t is not None:
            with torch.no_grad():
                idx = topk_idx_tk[valid_t].reshape(-1)
                counts_e = torch.bincount(idx, minlength=self.num_experts).long()
            prob_mean_e = (probs_te * valid_t[:, None].to(probs_te.dtype)).sum(0) / max(int(row_tokens or 1), 1)
            return y_th, RouterStats(prob_mean_e, counts_e)
        with torch.no_grad():
            counts_e = torch.diff(d.offsets_e.long(), prepend=d.offsets_e.new_zeros(1).long())
        if x_th.shape[0] == 0:  # keep the graph connected; no tokens, no probability mass
            prob_mean_e = probs_te.sum(0)
        else:
            prob_mean_e = probs_te.mean(0)
        return y_th, RouterStats(prob_mean_e, counts_e)


def load_balancing_loss(
    prob_mean_le: torch.Tensor,
    counts_le: torch.Tensor,
    counts_reducer: CountsReducer | None = None,
) -> torch.Tensor:
    """Mean over MoE layers of ``E * sum_e f_e * P_e`` (see the module docstring).

    ``prob_mean_le`` [n_layers, E] (differentiable), ``counts_le`` [n_layers, E] local top-k counts.
    ``counts_reducer`` maps local counts to global ones (e.g. all_reduce SUM over data-parallel ranks;
    None = this process only). Not multiplied by ``router_aux_loss_coef``."""
    E = prob_mean_le.shape[-1]
    counts = counts_le.detach()
    if counts_reducer is not None:
        counts = counts_reducer(counts)
    counts = counts.to(prob_mean_le.dtype)
    f_le = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)
    return (E * (f_le * prob_mean_le).sum(dim=-1)).mean()
