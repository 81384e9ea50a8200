"""Parameter counts and step FLOPs of a model, the same types for every family.

``param_stats`` counts the real module tree (any device, meta included: the planner builds on meta),
through the ``TrainableModel`` accessors, grouped the way the planner and the FLOPs need them: per
decoder layer (routed experts apart), per vision block, and the pieces outside the blocks. ``active``
counts what one token uses: everything but the experts it is not routed to; the vision tower counts as
active. A family's ``step_flops`` turns these counts into ``StepFlops``.

Frozen weights (LoRA, ``model.freeze``): a matmul costs 2 FLOPs per weight element and row forward, 2 more for the
input gradient when something below it (anything it depends on) trains, and 2 for the weight gradient when the weight
trains: 6 per weight and row in full training, 4 for a frozen weight above a trainable one, 2 (forward only) when
nothing below it trains (a frozen vision tower, the first layers of a LoRA run before the first adapter).
``param_stats`` walks the module tree in the order the parameters act (``DECODER_STAGES``, ``VISION_BLOCK_STAGES``)
and records the 2-FLOP passes that a step skips (``BackwardSkips``); the families' ``step_flops`` subtract them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from rynnscale.batch import PackedBatch
from rynnscale.models.lora import is_adapter_param
from rynnscale.models.registry import family_of


@dataclass(frozen=True)
class BackwardSkips:
    """The 2-FLOP matmul passes that one step's backward leaves out because of frozen weights (module docstring):
    weight elements x skipped passes (a frozen weight's gradient; the input gradient where nothing below trains).
    All zero (the default) when every parameter trains."""

    text: float = 0.0                 # per token: decoder layers (routed experts scaled by top_k / num_experts)
    lm_head: float = 0.0              # per lm_head row
    vision_blocks: float = 0.0        # per patch, over all blocks
    vision_embed: float = 0.0         # per patch: the patch embedding (its pixel input never needs a gradient)
    vision_mergers: float = 0.0       # per merged token, over the final and DeepStack mergers
    text_mixer_forward_only: tuple[bool, ...] = ()     # per decoder layer: attention / delta rule has no backward
    vision_mixer_forward_only: tuple[bool, ...] = ()   # per vision block: attention has no backward

    @staticmethod
    def mixer_passes(forward_only: Sequence[bool], n: int) -> list[int]:
        """Per layer: 3 (forward + backward of a token mixer, backward = 2 x forward) or 1 (forward only)."""
        return [1 if i < len(forward_only) and forward_only[i] else 3 for i in range(n)]


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
    # frozen weights' skipped backward passes for a batch without / with images or videos (a trainable vision
    # tower makes the decoder's input need a gradient only when it runs on something)
    skips_text_only: BackwardSkips = field(default_factory=BackwardSkips)
    skips_with_vision: BackwardSkips = field(default_factory=BackwardSkips)

    def backward_skips(self, has_vision: bool) -> BackwardSkips:
        return self.skips_with_vision if has_vision else self.skips_text_only

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


#: the order in which a decoder layer's parameters act (fnmatch patterns of names within the layer, both families'
#: HF names): the parameters of one stage act side by side on the same input; ``MIXER`` is the attention / delta rule
MIXER = "<mixer>"
DECODER_STAGES: tuple = (
    ("input_layernorm.*",),
    ("self_attn.[qkv]_proj.*", "linear_attn.in_proj_*"),
    ("self_attn.[qk]_norm.*", "linear_attn.conv1d.*", "linear_attn.dt_bias", "linear_attn.A_log"),
    MIXER,
    ("linear_attn.norm.*",),
    ("self_attn.o_proj.*", "linear_attn.out_proj.*"),
    ("post_attention_layernorm.*",),
    # router, gate / up projections (routed, dense, shared expert) and the shared expert's gate: the routing weight
    # scales the routed experts' down-projection input
    ("mlp.gate.*", "mlp.gate_proj.*", "mlp.up_proj.*", "mlp.experts.gate_up_proj*", "mlp.shared_expert.gate_proj.*",
     "mlp.shared_expert.up_proj.*", "mlp.shared_expert_gate.*"),
    ("mlp.down_proj.*", "mlp.experts.down_proj*", "mlp.shared_expert.down_proj.*"),
)
VISION_BLOCK_STAGES: tuple = (("norm1.*",), ("attn.qkv.*",), MIXER, ("attn.proj.*",), ("norm2.*",),
                              ("mlp.linear_fc1.*",), ("mlp.linear_fc2.*",))
MERGER_STAGES: tuple = (("norm.*",), ("linear_fc1.*",), ("linear_fc2.*",))


def _stage_skips(module: torch.nn.Module, stages: Sequence, trains_below: bool, expert_scale: float = 1.0,
                 is_experts=None, adapters: bool = True) -> tuple[float, bool, bool]:
    """-> (skipped passes per row over ``module``'s matmul weights, whether its token mixer runs forward only,
    whether its output needs a gradient). ``trains_below``: the module's input needs a gradient. Routed experts'
    weights count ``expert_scale`` (top_k / num_experts) per row. A parameter in no stage counts as full work and
    as trainable below everything after it (never under-counted). Matmul weights: matrices, expert tensors,
    convolutions and (``adapters``: where the family's count has them) LoRA factors; not norms, biases, scalars."""
    experts = set()
    if is_experts is not None:
        experts = {id(p) for m in module.modules() if is_experts(m) for p in m.parameters(recurse=False)}
    named = list(module.named_parameters())
    params = dict(named)
    staged: list[list[tuple[str, torch.nn.Parameter]]] = [[] for _ in stages]
    unstaged = []
    for name, p in named:
        i = next((i for i, st in enumerate(stages) if st != MIXER and any(fnmatch.fnmatchcase(name, pat) for pat in st)),
                 None)
        (unstaged if i is None else staged[i]).append((name, p))
    grad_in = trains_below or any(p.requires_grad for _, p in unstaged)
    skipped, mixer_fwd_only = 0.0, False
    for stage, members in zip(stages, staged):
        if stage == MIXER:
            mixer_fwd_only = not grad_in
            continue
        for name, p in members:
            if p.ndim < 2 or (not adapters and is_adapter_param(name)):
                continue
            needs_in = grad_in
            if name.endswith("lora_B"):   # B's input is A's output
                a = params.get(name[:-1] + "A")
                needs_in = needs_in or (a is not None and a.requires_grad)
            passes = (not p.requires_grad) + (not needs_in)
            skipped += passes * p.numel() * (expert_scale if id(p) in experts else 1.0)
        grad_in = grad_in or any(p.requires_grad for _, p in members)
    return skipped, mixer_fwd_only, grad_in


def backward_skips(model: torch.nn.Module, has_vision: bool) -> BackwardSkips:
    """The passes a step of ``model`` skips for its frozen weights (``BackwardSkips``), on a batch with or without
    images / videos. The vision tower feeds the decoder's first layer (its DeepStack features later ones: counted
    as the first's, an over-count only when nothing but a DeepStack merger trains)."""
    spec = family_of(model)
    args = model.args
    t = args.text
    tower = model.vision_tower()
    tower_ids = {id(p) for p in tower.parameters()} if tower is not None else set()
    vision_trains = tower is not None and any(p.requires_grad for p in tower.parameters())
    v_blocks = v_embed = v_mergers = 0.0
    v_mixer: list[bool] = []
    # the Qwen3-VL tower layout (both families); another family's tower counts as full work
    if tower is not None and has_vision and all(hasattr(tower, a) for a in ("patch_embed", "pos_embed", "merger")):
        embed_w = tower.patch_embed.proj.weight
        v_embed = float((not embed_w.requires_grad) * embed_w.numel())
        grad = any(p.requires_grad for p in tower.patch_embed.parameters()) or tower.pos_embed.weight.requires_grad
        out_of = []
        for block in model.vision_blocks():
            skipped, fwd_only, grad = _stage_skips(block, VISION_BLOCK_STAGES, grad)
            v_blocks += skipped
            v_mixer.append(fwd_only)
            out_of.append(grad)
        mergers = [(tower.merger, out_of[-1] if out_of else grad)]
        ds = list(getattr(tower, "deepstack_merger_list", None) or [])
        mergers += [(m, out_of[min(i, len(out_of) - 1)] if out_of else grad)
                    for m, i in zip(ds, getattr(args.vision, "deepstack_visual_indexes", ()))]
        for merger, below in mergers:
            v_mergers += _stage_skips(merger, MERGER_STAGES, below, adapters=False)[0]   # counted from args
    embed = model.input_embeddings().weight
    grad = embed.requires_grad or (has_vision and vision_trains)
    scale = t.num_experts_per_tok / t.num_experts if t.is_moe else 1.0
    text = 0.0
    t_mixer: list[bool] = []
    for layer in model.decoder_layers():
        skipped, fwd_only, grad = _stage_skips(layer, DECODER_STAGES, grad, scale, spec.is_experts)
        text += skipped
        t_mixer.append(fwd_only)
    head = model.lm_head.weight
    # the lm_head's input needs a gradient when anything of the language model trains (the final norm, a tied
    # embedding), or the vision tower on a batch that uses it
    head_in = grad or any(p.requires_grad for p in model.parameters()
                          if id(p) not in tower_ids and (p is not head or head is embed))
    lm_head = float(((not head.requires_grad) + (not head_in)) * head.numel())
    return BackwardSkips(text, lm_head, v_blocks, v_embed, v_mergers, tuple(t_mixer), tuple(v_mixer))


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
        top_k=t.num_experts_per_tok if t.is_moe else 0, num_experts=t.num_experts,
        skips_text_only=backward_skips(model, has_vision=False), skips_with_vision=backward_skips(model, has_vision=True))


def batch_flops(args: Any, st: ParamStats, batch: PackedBatch, loss_tokens: int | None = None) -> StepFlops:
    """The family's ``step_flops`` of one ``PackedBatch`` row (its samples from ``cu_seqlens``, all its
    images and videos). ``loss_tokens``: rows the lm_head runs on (default: every token)."""
    cu = batch.cu_seqlens.detach().to("cpu", torch.int64)
    grids = [g for g in (batch.image_grid_thw, batch.video_grid_thw) if g is not None]
    grid = torch.cat([g.detach().to("cpu", torch.int64) for g in grids]) if grids else None
    return family_of(args).step_flops(args, st, (cu[1:] - cu[:-1]).tolist(), grid, loss_tokens)
