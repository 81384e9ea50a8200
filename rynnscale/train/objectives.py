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
of the step, plus the model's auxiliary loss (MoE load balancing) averaged over all real (sample stream,
micro-batch) forwards (a filler's is weighted 0 and not counted). ``GRPO`` is the policy-gradient loss of group
relative policy optimisation on ``RolloutBatch`` micro-batches (``rynnscale.train.grpo`` makes them). Another objective (distillation)
implements the same two calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from rynnscale.batch import IGNORE_INDEX, PackedBatch
from rynnscale.parallel.distributed import DistContext


@dataclass(frozen=True)
class StepNormalizer:
    """Global values one step's loss is normalised by (the same on every rank)."""

    count: int              # the unit the loss is averaged over (e.g. target tokens); 0: nothing to learn
    forwards: int           # real (not filler) (sample stream, micro-batch) forwards of the step over all ranks

    @property
    def aux_divisor(self) -> int:
        """What a forward's auxiliary loss is divided by: the mean over the real forwards (a filler's aux loss is
        weighted 0, so counting it would shrink every other forward's balancing term)."""
        return max(self.forwards, 1)


def step_normalizer(micro_batches: list[PackedBatch], local_count: int, ctx: DistContext) -> StepNormalizer:
    """``StepNormalizer`` of ``local_count`` (this rank's units) and this rank's real micro-batches, both summed over
    the sample streams (a CP group counts once) in one all-reduce."""
    count, forwards = ctx.sum_data([local_count, sum(1 for b in micro_batches if not b.filler)])
    return StepNormalizer(count=int(count), forwards=int(forwards))


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

    def summary(self, metrics: dict[str, float]) -> dict[str, float | None]:
        """Quantities to log derived from the step's global ``StepStats.metrics`` (ratios of its sums)."""
        ...


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
        return step_normalizer(micro_batches, local, ctx)

    def loss(self, model: torch.nn.Module, batch: PackedBatch, norm: StepNormalizer,
             ctx: DistContext) -> MicroBatchLoss:
        out = model(batch, counts_reducer=ctx.counts_reducer)
        loss_sum = model.loss_sum(batch, out, self.chunk_tokens)
        aux = out.aux_loss / norm.aux_divisor
        return MicroBatchLoss(loss_sum / max(norm.count, 1) + aux,
                              {"loss": loss_sum.detach(), "aux_loss": aux.detach()}, out.expert_counts)

    def summary(self, metrics: dict[str, float]) -> dict[str, float | None]:
        return {}


# ----------------------------------------------------------------------------------------- GRPO
LOSS_AVERAGING = ("token", "sequence")


@dataclass
class RolloutBatch(PackedBatch):
    """A packed row of (prompt + completion) samples for ``GRPO``: ``labels_l`` holds the completion's token ids
    (-100 on prompt tokens: the completion mask), and per token [L] (values at completion tokens; 0 elsewhere):
    ``advantages_l`` (the sample's advantage), ``old_logp_l`` (log-probs under the rollout policy; None: the
    current policy's, detached -- one optimiser step per rollout batch), ``ref_logp_l`` (under the reference
    policy; None when the KL coefficient is 0)."""

    advantages_l: torch.Tensor | None = None
    old_logp_l: torch.Tensor | None = None
    ref_logp_l: torch.Tensor | None = None


def grpo_token_terms(logp_l: torch.Tensor, old_logp_l: torch.Tensor, ref_logp_l: torch.Tensor | None,
                     advantages_l: torch.Tensor, clip_low: float, clip_high: float,
                     beta: float) -> dict[str, torch.Tensor]:
    """Per-token GRPO terms (any shape, all alike): ``ratio = exp(logp - old)``, the clipped surrogate
    ``pg = -min(ratio * A, clamp(ratio, 1 - clip_low, 1 + clip_high) * A)``, the k3 KL estimator to the
    reference ``kl = exp(ref - logp) - (ref - logp) - 1`` (0 without a reference) and ``loss = pg + beta * kl``;
    ``clipped``: tokens whose ratio the clip took out of the gradient (TRL's region clip)."""
    ratio = torch.exp(logp_l - old_logp_l)
    adv = advantages_l.to(ratio.dtype)
    pg = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    if ref_logp_l is not None:
        d = ref_logp_l.to(logp_l.dtype) - logp_l
        kl = torch.exp(d) - d - 1
    else:
        kl = torch.zeros_like(logp_l)
    clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    return {"ratio": ratio, "pg": pg, "kl": kl, "loss": pg + beta * kl if beta else pg, "clipped": clipped}


def sequence_token_weights(cu_seqlens: torch.Tensor, mask_l: torch.Tensor) -> torch.Tensor:
    """[L]: 1 / (completion tokens of the token's sample) at completion tokens, 0 elsewhere -- the weights that
    turn a sum over tokens into a sum over samples of their per-token means."""
    mask = mask_l.to(torch.float64)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=mask.device, dtype=torch.long)
    doc_l = torch.repeat_interleave(torch.arange(lens.numel(), device=mask.device), lens, output_size=mask.numel())
    per_doc = torch.zeros(lens.numel(), dtype=mask.dtype, device=mask.device).index_add_(0, doc_l, mask)
    return mask / per_doc.clamp(min=1.0).index_select(0, doc_l)


@dataclass(frozen=True)
class GRPO:
    """Group relative policy optimisation's loss (the clipped surrogate + ``beta`` x KL to the reference,
    ``grpo_token_terms``) over the completion tokens of the step's ``RolloutBatch`` micro-batches, plus the
    model's auxiliary loss as in ``TokenCrossEntropy``. ``loss_averaging``:

    - ``token``: the sum over ALL completion tokens of the step (all ranks, all micro-batches) divided by their
      count (TRL's ``dapo`` / ``bnpo``, verl's ``token-mean``): long answers weigh more;
    - ``sequence``: each sample's mean over its completion tokens, averaged over the step's samples (TRL's
      ``grpo``, verl's ``seq-mean-token-mean``).

    Log-probabilities divide the logits by ``temperature`` (the rollouts' sampling temperature), as TRL and
    verl do; the counts come from the whole step before any backward, so N ranks x M micro-batches give the
    gradient of one big batch."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.02
    loss_averaging: str = "token"
    temperature: float = 1.0
    chunk_tokens: int = 4096
    name: str = "grpo"
    per_count: tuple[str, ...] = ("loss",)

    def __post_init__(self) -> None:
        if self.loss_averaging not in LOSS_AVERAGING:
            raise ValueError(f"GRPO loss_averaging={self.loss_averaging!r}; allowed: {list(LOSS_AVERAGING)}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0 and self.beta >= 0 and self.temperature > 0):
            raise ValueError(f"GRPO: clip_low={self.clip_low} must be in [0, 1), clip_high={self.clip_high} and "
                             f"beta={self.beta} >= 0, temperature={self.temperature} > 0")

    def normalizer(self, micro_batches: list[PackedBatch], ctx: DistContext) -> StepNormalizer:
        real = [b for b in micro_batches if not b.filler]
        local = sum(b.num_target_tokens if self.loss_averaging == "token" else b.num_samples for b in real)
        return step_normalizer(micro_batches, local, ctx)

    def loss(self, model: torch.nn.Module, batch: PackedBatch, norm: StepNormalizer,
             ctx: DistContext) -> MicroBatchLoss:
        out = model(batch, counts_reducer=ctx.counts_reducer)
        logp_l = model.token_log_probs(batch, out, self.chunk_tokens, self.temperature)
        mask_l = (batch.labels_l != IGNORE_INDEX).to(logp_l.dtype)
        adv_l = getattr(batch, "advantages_l", None)
        if adv_l is None:
            if not batch.filler:
                raise ValueError("GRPO needs RolloutBatch micro-batches (advantages per token); got a PackedBatch")
            adv_l = torch.zeros_like(logp_l)   # a filler: same graph, weighted 0 by the step
        old_l = getattr(batch, "old_logp_l", None)
        ref_l = getattr(batch, "ref_logp_l", None)
        if self.beta > 0 and ref_l is None and not batch.filler:
            raise ValueError(f"GRPO with beta={self.beta} needs the reference policy's log-probs (ref_logp_l)")
        terms = grpo_token_terms(logp_l, logp_l.detach() if old_l is None else old_l.to(logp_l.dtype),
                                 None if ref_l is None else ref_l, adv_l, self.clip_low, self.clip_high,
                                 self.beta if ref_l is not None else 0.0)
        weight_l = mask_l if self.loss_averaging == "token" else sequence_token_weights(
            batch.cu_seqlens, mask_l).to(logp_l.dtype)
        loss_sum = (terms["loss"] * weight_l).sum()
        aux = out.aux_loss / norm.aux_divisor
        with torch.no_grad():
            sums = {"loss": loss_sum.detach(), "aux_loss": aux.detach(),
                    "kl_sum": (terms["kl"] * mask_l).sum(), "clipped_tokens": (terms["clipped"] * mask_l).sum(),
                    "ratio_sum": (terms["ratio"] * mask_l).sum(), "completion_tokens": mask_l.sum()}
        return MicroBatchLoss(loss_sum / max(norm.count, 1) + aux, sums, out.expert_counts)

    def summary(self, metrics: dict[str, float]) -> dict[str, float | None]:
        """``kl`` (mean k3 estimate per completion token), ``clip_fraction`` (tokens the clip took out of the
        gradient), ``ratio_mean`` (mean importance ratio) over the step's completion tokens."""
        n = metrics.get("completion_tokens", 0.0)
        return {k: (metrics.get(s, 0.0) / n if n else None)
                for k, s in (("kl", "kl_sum"), ("clip_fraction", "clipped_tokens"), ("ratio_mean", "ratio_sum"))}
