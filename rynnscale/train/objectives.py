"""Objectives: what a training step minimises, separate from how the step runs (``rynnscale.train.step``:
micro-batches, accumulation, filler batches, clipping, the optimiser update).

An objective is called in two phases per optimiser step:

1. ``normalizer(micro_batches, ctx)`` BEFORE any backward: the global quantities the loss is divided by
   (e.g. the step's target-token count over all ranks), so that N ranks x M micro-batches give the gradient
   of one big batch. Every rank gets the same values. ``StepNormalizer.count == 0`` means the step has
   nothing to learn from anywhere: the step skips the optimiser update.
2. ``loss(model, batch, norm, ctx)`` per micro-batch, inside autocast: runs the model and returns a
   ``MicroBatchLoss`` whose ``loss`` is this micro-batch's share of the step loss (backpropagated) and whose
   ``sums`` are detached per-rank sums the step adds up over micro-batches and ranks for the metrics.

``TokenCrossEntropy`` is supervised fine-tuning: the mean next-token cross-entropy over every assistant token
of the step, plus the model's auxiliary loss (MoE load balancing) averaged over all (sample stream,
micro-batch) forwards. Another objective (a policy-gradient loss, distillation) implements the same two calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from rynnscale.batch import PackedBatch
from rynnscale.parallel.distributed import DistContext


@dataclass(frozen=True)
class StepNormalizer:
    """Global values one step's loss is normalised by (the same on every rank)."""

    count: int              # the unit the loss is averaged over (e.g. target tokens); 0: nothing to learn
    forwards: int           # (sample stream, micro-batch) forwards of the step over all ranks


@dataclass
class MicroBatchLoss:
    """One micro-batch: ``loss`` to backpropagate (already normalised), ``sums`` (detached, this rank's) to
    log after the step as global sums divided by ``StepNormalizer.count`` where the name is in
    ``Objective.per_count``, and the model's routing counts (MoE) for the balance metrics."""

    loss: torch.Tensor
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_counts: torch.Tensor | None = None


class Objective(Protocol):
    name: str
    per_count: tuple[str, ...]   # names in ``sums`` logged as a mean over ``StepNormalizer.count``

    def normalizer(self, micro_batches: list[PackedBatch], ctx: DistContext) -> StepNormalizer: ...

    def loss(self, model: torch.nn.Module, batch: PackedBatch, norm: StepNormalizer,
             ctx: DistContext) -> MicroBatchLoss: ...


@dataclass(frozen=True)
class TokenCrossEntropy:
    """Supervised next-token cross-entropy over labelled (assistant) tokens + the model's auxiliary loss.

    ``chunk_tokens``: rows of the fused lm_head + cross-entropy per chunk (``train.loss_chunk_tokens``)."""

    chunk_tokens: int = 4096
    name: str = "sft"
    per_count: tuple[str, ...] = ("loss",)

    def normalizer(self, micro_batches: list[PackedBatch], ctx: DistContext) -> StepNormalizer:
        local = sum(b.num_target_tokens for b in micro_batches if not b.filler)
        # a CP group's rows are counted once (every rank of the group holds the same micro-batches)
        return StepNormalizer(count=int(ctx.sum_data([local])[0]), forwards=len(micro_batches) * ctx.dp_size)

    def loss(self, model: torch.nn.Module, batch: PackedBatch, norm: StepNormalizer,
             ctx: DistContext) -> MicroBatchLoss:
        out = model(batch, counts_reducer=ctx.counts_reducer)
        loss_sum = model.loss_sum(batch, out, self.chunk_tokens)
        aux = out.aux_loss / norm.forwards
        return MicroBatchLoss(loss_sum / max(norm.count, 1) + aux,
                              {"loss": loss_sum.detach(), "aux_loss": aux.detach()}, out.expert_counts)
