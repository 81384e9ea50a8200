"""Parameter counts and step FLOPs of a model, the same types for every family.

``param_stats`` counts the real module tree (any device, meta included: the planner builds on meta),
through the ``TrainableModel`` accessors, grouped the way the planner and the FLOPs need them: per
decoder layer (routed experts apart), per vision block, and the pieces outside the blocks. ``active``
counts what one token uses: everything but the experts it is not routed to; the vision tower counts as
active. A family's ``step_flops`` turns these counts into ``StepFlops``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from rynnscale.batch import PackedBatch
from rynnscale.models.registry import family_of


@dataclass
class ParamStats:
    """Element counts (not bytes). ``*_trainable`` exclude frozen parameters."""

    total: int
    trainable: int
    expert_total: int                 # routed experts, all layers
    text_total: int                   # language model + lm_head (untied)
    vision_total: int
    embed: int                        # token embedding [V, H]
    lm_head: int                      # 0 when tied to the embedding
    layer_dense: list[int] = field(default_factory=list)     # per decoder layer: all but the routed experts
    layer_experts: list[int] = field(default_factory=list)   # per decoder layer: routed experts, their LoRA factors too (0 for dense layers)
    layer_trainable: list[int] = field(default_factory=list)
    vision_block: list[int] = field(default_factory=list)
    vision_block_trainable: list[int] = field(default_factory=list)
    vision_other: int = 0             # patch embed, position embedding, mergers
    largest_group: int = 0            # largest optimiser param group (foreach AdamW temporaries)
    top_k: int = 0
    num_experts: int = 0

    @property
    def active(self) -> int:
        if not self.num_experts:
            return self.total
        return self.total - round(self.expert_total * (1 - self.top_k / self.num_experts))

    @property
    def text_active(self) -> int:
        return self.active - self.vision_total

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one forward + backward, by part (floats: they exceed 2**53 only at absurd sizes)."""

    text_linear: float
    lm_head: float
    text_attention: float
    vision_linear: float = 0.0
    vision_attention: float = 0.0

    @property
    def decoder(self) -> float:
        """Decoder + lm_head only (what ANCHORS.md's MFU counts, also for the video case)."""
        return self.text_linear + self.lm_head + self.text_attention

    @property
    def vision(self) -> float:
        return self.vision_linear + self.vision_attention

    @property
    def total(self) -> float:
        return self.decoder + self.vision

    def as_dict(self) -> dict[str, float]:
        return asdict(self) | {"decoder": self.decoder, "vision": self.vision, "total": self.total}


def _count(params: Iterable[torch.nn.Parameter], trainable_only: bool = False) -> int:
    seen, n = set(), 0
    for p in params:
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def param_stats(model: torch.nn.Module, largest_group: int = 0) -> ParamStats:
    """Counts of ``model`` (a registered family's model). ``largest_group``: the largest optimiser group's
    element count (``rynnscale.train.optim.largest_param_group``), carried for the planner."""
    spec = family_of(model)
    args = model.args
    layer_dense, layer_experts, layer_train = [], [], []
    for layer in model.decoder_layers():
        # an experts module's LoRA factors ([E, r, in] / [E, out, r]) are per expert too: a token uses its top-k
        # experts' factors only (FLOPs), and expert parallelism splits them with their experts (memory)
        experts = sum(p.numel() for m in layer.modules() if spec.is_experts(m) for p in m.parameters(recurse=False))
        layer_dense.append(_count(layer.parameters()) - experts)
        layer_experts.append(experts)
        layer_train.append(_count(layer.parameters(), trainable_only=True))
    tower = model.vision_tower()
    blocks = list(model.vision_blocks())
    vision_total = _count(tower.parameters()) if tower is not None else 0
    block_counts = [_count(b.parameters()) for b in blocks]
    total = _count(model.parameters())
    t = args.text
    return ParamStats(
        total=total, trainable=_count(model.parameters(), trainable_only=True), expert_total=sum(layer_experts),
        text_total=total - vision_total, vision_total=vision_total,
        embed=model.input_embeddings().weight.numel(),
        lm_head=0 if args.tie_word_embeddings else model.lm_head.weight.numel(),
        layer_dense=layer_dense, layer_experts=layer_experts, layer_trainable=layer_train,
        vision_block=block_counts, vision_block_trainable=[_count(b.parameters(), True) for b in blocks],
        vision_other=vision_total - sum(block_counts), largest_group=largest_group,
        top_k=t.num_experts_per_tok if t.is_moe else 0, num_experts=t.num_experts)


def batch_flops(args: Any, st: ParamStats, batch: PackedBatch, loss_tokens: int | None = None) -> StepFlops:
    """The family's ``step_flops`` of one ``PackedBatch`` row (its samples from ``cu_seqlens``, all its
    images and videos). ``loss_tokens``: rows the lm_head runs on (default: every token)."""
    cu = batch.cu_seqlens.detach().to("cpu", torch.int64)
    grids = [g for g in (batch.image_grid_thw, batch.video_grid_thw) if g is not None]
    grid = torch.cat([g.detach().to("cpu", torch.int64) for g in grids]) if grids else None
    return family_of(args).step_flops(args, st, (cu[1:] - cu[:-1]).tolist(), grid, loss_tokens)
