"""One optimiser step, the same on one process and on many (torchrun).

Every rank is a data-parallel rank with its own micro-batches (EP ranks too; expert parallelism is
carved out of data parallelism), and the step's quantities are global:

- loss = sum of token cross-entropies over the assistant tokens of ALL ranks' micro-batches of the step,
  divided by their total count (all-reduced BEFORE backward), so N ranks x M micro-batches give the same
  loss and gradient as one process with N*M micro-batches of gradient accumulation; FSDP sums (does not
  average) the ranks' gradients (``rynnscale.parallel.fsdp.sum_gradient_reduction``);
- plus the MoE load-balancing loss averaged over all (rank, micro-batch) forwards, each computed with
  expert counts all-reduced over the data-parallel ranks (``DistContext.counts_reducer``: global-batch
  balance);
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

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule

from rynnscale.batch import PackedBatch
from rynnscale.parallel.distributed import DistContext, clip_grad_norm_


def autocast_context(dtype_name: str, device: torch.device):
    """bf16 autocast on GPU by default; fp32 on CPU (exact, reproducible)."""
    use_bf16 = dtype_name == "bfloat16" or (dtype_name == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class NonFiniteLossError(RuntimeError):
    """``train.max_nonfinite_steps`` steps in a row had an inf/NaN loss or gradient norm."""


@dataclass
class StepStats:
    """Global (all ranks) quantities of one optimiser step; ``expert_counts`` [n_moe, E] summed over ranks."""

    loss: float
    aux_loss: float
    grad_norm: float
    tokens: int
    target_tokens: int
    samples: int
    expert_counts: torch.Tensor | None
    finite: bool = True   # False: loss or grad norm was inf/NaN and the optimiser step was skipped


def train_step(model, optimizer, micro_batches: list[PackedBatch], *, device: torch.device, dtype_name: str,
               loss_chunk_tokens: int, max_grad_norm: float, ctx: DistContext | None = None) -> StepStats:
    """One optimiser step over this rank's ``micro_batches`` (gradient accumulation), with the loss
    normalised by the target-token count of the whole step across ``ctx``'s ranks (None = one process).
    A ``filler`` micro-batch runs forward and backward like any other (its rank stays in lockstep with
    its peers' collectives) with its loss weighted 0, and counts no tokens, samples or expert loads; a step
    with no target token on any rank skips the optimiser update (every rank knows the global count)."""
    ctx = ctx or DistContext(device=device)
    real = [b for b in micro_batches if not b.filler]
    local_targets = sum(b.num_target_tokens for b in real)
    # before any backward: every rank divides by the same count (a CP group's rows counted once)
    n_targets = int(ctx.sum_data([local_targets])[0])
    denom = max(n_targets, 1)
    n_forwards = len(micro_batches) * ctx.dp_size  # the aux loss is a mean over all (sample stream, micro-batch)
    # metrics stay on the device until the step ends: no host sync between micro-batches, so the
    # next micro-batch's kernels are queued while the GPU still runs this one's backward
    loss_dev = torch.zeros((), dtype=torch.float64, device=device)
    aux_dev = torch.zeros((), dtype=torch.float64, device=device)
    counts = None
    # HSDP: replicas all-reduce the (reduce-scattered) gradients once per step, after the last
    # micro-batch, instead of once per micro-batch (a no-op without a replicate dimension)
    hsdp_defer = ctx.distributed and isinstance(model, FSDPModule) and len(micro_batches) > 1
    for i, batch in enumerate(micro_batches):
        if hsdp_defer:
            model.set_requires_all_reduce(i == len(micro_batches) - 1)
        batch = batch.to(device)
        with autocast_context(dtype_name, device):
            out = model(batch, counts_reducer=ctx.counts_reducer)
            loss_sum = model.loss_sum(batch, out, loss_chunk_tokens)
        aux = out.aux_loss / n_forwards
        if batch.filler:   # the same graph, so the same collectives in backward; exactly zero gradients
            ((loss_sum / denom + aux) * 0.0).backward()
        else:
            (loss_sum / denom + aux).backward()
            loss_dev += loss_sum.detach()
            aux_dev += aux.detach()
        if out.expert_counts is not None:   # a filler's as zeros: every rank joins the counts' all-reduce
            c = out.expert_counts.detach().long()
            c = torch.zeros_like(c) if batch.filler else c
            counts = c if counts is None else counts + c
    grad_norm = clip_grad_norm_(model.parameters(), max_grad_norm, ctx.norm_group)
    # loss / aux: every rank's own share (CP shards); tokens / samples: once per CP group; one all-reduce
    once = 1 if ctx.cp_rank == 0 else 0
    loss_total, aux_total, tokens, samples = ctx.sum([
        loss_dev.item(), aux_dev.item(), once * sum(b.num_tokens for b in real),
        once * sum(b.num_samples for b in real)])
    # global values (all ranks agree): an inf/NaN loss or gradient must not reach the weights
    finite = math.isfinite(loss_total) and math.isfinite(aux_total) and math.isfinite(float(grad_norm))
    # a step whose micro-batches hold no target token anywhere (all fillers) leaves the weights alone: with zero
    # gradients Adam would still move them by its momentum, i.e. train on nothing
    if finite and n_targets > 0:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if counts is not None:
        counts = ctx.sum_tensor(counts).cpu()
    return StepStats(loss=loss_total / denom, aux_loss=aux_total, grad_norm=float(grad_norm), tokens=int(tokens),
                     target_tokens=n_targets, samples=int(samples), expert_counts=counts, finite=finite)
