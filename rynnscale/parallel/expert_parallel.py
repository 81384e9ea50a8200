"""Expert parallelism: each of the ``ep`` ranks of an EP group holds ``E/ep`` consecutive experts; tokens
travel to the rank of their expert and back with ``all_to_all_single`` of variable splits.

Per MoE layer and micro-batch (after the local ``SparseMoeBlock.dispatch`` sorted the T*k token copies by
global expert):
1. counts exchange: ``all_to_all_single`` of the per-expert counts [E] -> ``recv_counts [ep, E/ep]``
   (how many rows each source rank sends to each of my local experts). One host sync for the splits.
2. dispatch all-to-all: rows for experts of rank j go to rank j (split sizes = per-rank sums).
3. the received rows are grouped ``[source rank][local expert]``; a stable sort by local expert makes them
   ``[local expert][source rank]`` for the grouped GEMM over the local experts.
4. un-sort (a gather by the inverse permutation), combine all-to-all back (splits reversed); the caller
   applies the routing weights and un-permutes (``SparseMoeBlock.compute`` / ``combine``).
Autograd runs through both all-to-alls (``_AllToAll``: the backward is the reverse all-to-all), so the
expert gradients of rank j accumulate the contributions of every token any rank of the group sent there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from rynnscale.ops.permute import inverse_permutation


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` along dim 0 with variable splits (backward = the reverse)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_in = grad_out.new_empty((sum(ctx.in_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


# eager inside compiled blocks (``model.compile``): torch 2.11's dynamo traces the Function's backward and loses the
# in-place collective there (the gradient through the all-to-all came out zero); see context_parallel's collectives
@torch.compiler.disable
def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows ``x[sum(in_splits[:j]) : sum(in_splits[:j+1])]`` go to rank j of ``group``; returns the rows
    received from every rank in rank order (``out_splits[j]`` from rank j). Autograd-capable."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


class ExpertParallelDispatcher:
    """The EP replacement of ``SparseMoeBlock.compute``: ``(experts, x_sorted [S, H], offsets [E]) -> y_sorted [S, H]``
    where ``offsets`` are cumulative ends over ALL E experts and ``experts`` holds only this rank's E/ep."""

    def __init__(self, group: dist.ProcessGroup, ep_size: int, num_experts: int):
        self.group = group
        self.ep_size = ep_size
        self.num_local = num_experts // ep_size

    def __call__(self, experts: nn.Module, x_sorted_sh: torch.Tensor, offsets_e: torch.Tensor) -> torch.Tensor:
        ep, n_local = self.ep_size, self.num_local
        counts_e = torch.diff(offsets_e.long(), prepend=offsets_e.new_zeros(1).long())
        recv_counts = torch.empty_like(counts_e)
        dist.all_to_all_single(recv_counts, counts_e, group=self.group)  # equal splits of E/ep counts
        recv_counts_rl = recv_counts.view(ep, n_local)  # [source rank, local expert]
        splits = torch.stack([counts_e.view(ep, n_local).sum(1), recv_counts_rl.sum(1)]).tolist()  # one sync
        send_splits, recv_splits = splits
        x_recv_sh = all_to_all(x_sorted_sh, recv_splits, send_splits, self.group)
        # [source][local expert] -> [local expert][source] (stable: keeps each source's row order)
        local_expert_s = torch.repeat_interleave(
            torch.arange(n_local, device=x_recv_sh.device).repeat(ep), recv_counts_rl.reshape(-1),
            output_size=x_recv_sh.shape[0])
        perm_s = torch.sort(local_expert_s, stable=True).indices
        offsets_local = recv_counts_rl.sum(0).cumsum(0).to(torch.int32)
        y_local_sh = experts(x_recv_sh.index_select(0, perm_s), offsets_local)
        y_recv_sh = y_local_sh.index_select(0, inverse_permutation(perm_s))
        return all_to_all(y_recv_sh, send_splits, recv_splits, self.group)


@torch.no_grad()
def shard_experts(experts: nn.Module, ep_rank: int, ep_size: int,
                  param_names: tuple[str, ...] = ("gate_up_proj", "down_proj")) -> None:
    """Keep experts ``[ep_rank * E/ep, (ep_rank+1) * E/ep)`` of the 3-D expert weights ``param_names``
    (dim 0 = expert) of an experts module that has ``num_experts`` (in place).

    Records ``num_experts_total``, ``expert_offset`` and ``ep_param_names`` on the module (read by
    ``expert_shards``). Works on meta parameters too (a sharded build applies EP before any storage)."""
    E = getattr(experts, "num_experts_total", experts.num_experts)
    if E % ep_size:
        raise ValueError(f"num_experts={E} is not divisible by parallel.ep={ep_size}")
    n = E // ep_size
    lo = ep_rank * n
    for name in param_names:
        full = getattr(experts, name)
        if full.shape[0] != E:
            raise ValueError(f"experts.{name} has {full.shape[0]} experts, expected all {E} before EP sharding")
        setattr(experts, name, nn.Parameter(full[lo:lo + n].clone(), requires_grad=full.requires_grad))
    experts.num_experts_total = E
    experts.num_experts = n
    experts.expert_offset = lo
    experts.ep_param_names = tuple(param_names)


def expert_shards(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Expert weights that EP split: parameter FQN (as ``named_parameters`` spells it) ->
    ``(expert_offset, num_experts_total)``, i.e. this rank holds experts ``[offset, offset + local E)``
    of the full ``[E_total, ...]`` tensor. Empty without EP."""
    out = {}
    for name, module in model.named_modules():
        names = getattr(module, "ep_param_names", None)
        if not names:
            continue
        for p in names:
            out[f"{name}.{p}"] = (int(module.expert_offset), int(module.num_experts_total))
    return out
