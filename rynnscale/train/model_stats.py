"""Parameter counts of a Qwen3-VL model built on the meta device (no memory, no weights).

Counts come from the real module tree (the same class the trainer builds), grouped the way the
planner needs them: per decoder layer (dense part and routed experts separately), per vision block,
and the pieces outside the blocks. ``active`` counts what one token uses: everything except the
experts it is not routed to (active = total - expert params * (1 - top_k / num_experts)); the
vision tower counts as active (it runs on every visual token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rynnscale.models.qwen3_vl.args import Qwen3VLArgs
from rynnscale.train.optim import param_groups


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
    layer_dense: list[int] = field(default_factory=list)     # per decoder layer: attention, norms, dense MLP, router
    layer_experts: list[int] = field(default_factory=list)   # per decoder layer: routed experts (0 for dense layers)
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


def _count(module: torch.nn.Module, trainable_only: bool = False) -> int:
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def param_stats(model: torch.nn.Module, groups: list | None = None, weight_decay: float = 0.0) -> ParamStats:
    """Counts of ``model`` (a ``Qwen3VLForConditionalGeneration``, any device incl. meta: the planner
    passes ``rynnscale.train.build.build_model(..., meta=True)``)."""
    args: Qwen3VLArgs = model.args
    lm = model.model.language_model
    vis = model.model.visual
    layer_dense, layer_experts, layer_train = [], [], []
    for layer in lm.layers:
        total = _count(layer)
        experts = sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in layer.modules()
                      if type(m).__name__ == "GroupedExperts")
        layer_dense.append(total - experts)
        layer_experts.append(experts)
        layer_train.append(_count(layer, trainable_only=True))
    blocks = [_count(b) for b in vis.blocks]
    vision_total = _count(vis)
    tied = args.tie_word_embeddings
    groups_built = param_groups(model, weight_decay, groups or ())
    return ParamStats(
        total=_count(model), trainable=_count(model, trainable_only=True), expert_total=sum(layer_experts),
        text_total=_count(model) - vision_total, vision_total=vision_total,
        embed=lm.embed_tokens.weight.numel(), lm_head=0 if tied else model.lm_head.weight.numel(),
        layer_dense=layer_dense, layer_experts=layer_experts, layer_trainable=layer_train,
        vision_block=blocks, vision_block_trainable=[_count(b, trainable_only=True) for b in vis.blocks],
        vision_other=vision_total - sum(blocks),
        largest_group=max((sum(p.numel() for p in g["params"]) for g in groups_built), default=0),
        top_k=args.text.num_experts_per_tok if args.text.is_moe else 0, num_experts=args.text.num_experts)
