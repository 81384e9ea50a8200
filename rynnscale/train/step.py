"""One optimiser step, the same on one process and on many (torchrun).

Every rank is a data-parallel rank with its own micro-batches (EP ranks too; expert parallelism is
carved out of data parallelism), and the step's quantities are global. The loss comes from an objective
(``rynnscale.train.objectives``; the default, supervised ``TokenCrossEntropy``, is described here):

- loss = sum of token cross-entropies over the assistant tokens of ALL ranks' micro-batches of the step,
  divided by their total count (all-reduced BEFORE backward), so N ranks x M micro-batches give the same
  loss and gradient as one process with N*M micro-batches of gradient accumulation; FSDP sums (does not
  average) the ranks' gradients (``rynnscale.parallel.fsdp.sum_gradient_reduction``);
- plus the MoE load-balancing loss averaged over all real (rank, micro-batch) forwards (not fillers), each
  computed with expert counts all-reduced over the data-parallel ranks (``DistContext.counts_reducer``:
  global-batch balance);
- the gradient norm for clipping covers every shard and every expert group;
- logged loss / tokens are sums over all ranks;
- context parallelism (``parallel.cp``): the ranks of a CP group get the SAME micro-batches and the model
  computes the loss and load-balancing terms of its shard of each row only, so per-row counts (target
  tokens, tokens, samples) are counted once per CP group (``DistContext.sum_data``) while loss sums are
  summed over every rank; the aux loss is a mean over (sample stream, micro-batch) forwards;
- a step whose global loss, aux loss or gradient norm is inf/NaN skips the optimiser step
  (``StepStats.finite``); the loop then saves nothing from it and stops after
  ``train.max_nonfinite_steps`` such steps in a row (``NonFiniteLossError``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.distributed.fsdp import FSDPModule

from rynnscale.batch import PackedBatch
from rynnscale.parallel.distributed import DistContext, clip_grad_norm_
from rynnscale.parallel.precision import autocast
from rynnscale.train.objectives import Objective, TokenCrossEntropy


class NonFiniteLossError(RuntimeError):
    """``train.max_nonfinite_steps`` steps in a row had an inf/NaN loss or gradient norm."""


@dataclass
class StepStats:
    """Global (all ranks) quantities of one optimiser step; ``expert_counts`` [n_moe, E] summed over ranks;
    ``metrics``: the objective's logged values (``loss`` and ``aux_loss`` also as fields)."""

    loss: float
    aux_loss: float
    grad_norm: float
    tokens: int
    target_tokens: int
    samples: int
    expert_counts: torch.Tensor | None
    finite: bool = True   # False: loss or grad norm was inf/NaN and the optimiser step was skipped
    metrics: dict[str, float] = field(default_factory=dict)


def train_step(model, optimizer, micro_batches: list[PackedBatch], *, device: torch.device, compute_dtype: torch.dtype,
               max_grad_norm: float, objective: Objective | None = None, ctx: DistContext | None = None,
               loss_chunk_tokens: int = 4096) -> StepStats:
    """One optimiser step over this rank's ``micro_batches`` (gradient accumulation) minimising ``objective``
    (default: ``TokenCrossEntropy(loss_chunk_tokens)``), normalised over the whole step across ``ctx``'s ranks
    (None = one process). A ``filler`` micro-batch runs forward and backward like any other (its rank stays
    in lockstep with its peers' collectives) with its loss weighted 0, and counts no tokens, samples, loss or
    expert loads; a step whose objective has nothing to learn from on any rank skips the optimiser update."""
    ctx = ctx or DistContext(device=device)
    objective = objective or TokenCrossEntropy(loss_chunk_tokens)
    real = [b for b in micro_batches if not b.filler]
    norm = objective.normalizer(micro_batches, ctx)   # before any backward: every rank divides by the same
    # metrics stay on the device until the step ends: no host sync between micro-batches, so the
    # next micro-batch's kernels are queued while the GPU still runs this one's backward
    sums: dict[str, torch.Tensor] = {}
    counts = None
    # HSDP: replicas all-reduce the (reduce-scattered) gradients once per step, after the last
    # micro-batch, instead of once per micro-batch (a no-op without a replicate dimension)
    hsdp_defer = ctx.distributed and isinstance(model, FSDPModule) and len(micro_batches) > 1
    for i, batch in enumerate(micro_batches):
        if hsdp_defer:
            model.set_requires_all_reduce(i == len(micro_batches) - 1)
        batch = batch.to(device)
        with autocast(compute_dtype, device):
            part = objective.loss(model, batch, norm, ctx)
        if batch.filler:   # the same graph, so the same collectives in backward; exactly zero gradients
            (part.loss * 0.0).backward()
        else:
            part.loss.backward()
            for name, value in part.sums.items():
                sums[name] = sums[name] + value.double() if name in sums else value.double()
        if part.expert_counts is not None:   # a filler's as zeros: every rank joins the counts' all-reduce
            c = part.expert_counts.detach().long()
            c = torch.zeros_like(c) if batch.filler else c
            counts = c if counts is None else counts + c
    grad_norm = clip_grad_norm_(model.parameters(), max_grad_norm, ctx.norm_group)
    # objective sums: every rank's own share (CP shards); tokens / samples / targets: once per CP group; one
    # all-reduce (every rank lists the same names: a rank whose micro-batches were all fillers reports zeros)
    names = sorted(set(sums) | {"loss", "aux_loss"})
    once = 1 if ctx.cp_rank == 0 else 0
    totals = ctx.sum([float(sums[n].item()) if n in sums else 0.0 for n in names] + [
        once * sum(b.num_tokens for b in real), once * sum(b.num_samples for b in real),
        once * sum(b.num_target_tokens for b in real)])
    metrics = {n: v / max(norm.count, 1) if n in objective.per_count else v for n, v in zip(names, totals)}
    tokens, samples, targets = (int(x) for x in totals[len(names):])
    # global values (all ranks agree): an inf/NaN loss or gradient must not reach the weights
    finite = all(math.isfinite(v) for v in metrics.values()) and math.isfinite(float(grad_norm))
    # a step with nothing to learn from anywhere (e.g. all fillers) leaves the weights alone: with zero
    # gradients Adam would still move them by its momentum, i.e. train on nothing
    if finite and norm.count > 0:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if counts is not None:
        counts = ctx.sum_tensor(counts).cpu()
    return StepStats(loss=metrics["loss"], aux_loss=metrics["aux_loss"], grad_norm=float(grad_norm), tokens=tokens,
                     target_tokens=targets, samples=samples, expert_counts=counts, finite=finite, metrics=metrics)
