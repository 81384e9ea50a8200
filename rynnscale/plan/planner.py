"""``rynnscale plan``: per-GPU memory, communication and step time of a recipe on a cluster, on paper.

Everything is derived from the recipe: the model is built on the meta device by the training build path
(``rynnscale.train.build``, counted by ``rynnscale.models.stats.param_stats``), the
layout comes from ``parallel.*`` and the cluster from ``plan.*`` / command-line flags. Numbers are
estimates with stated assumptions; ``tests/plan`` checks the memory model against the measured peak
of real CPU training steps of tiny models (within 15%).

Memory model (bytes per GPU; "shard" = ``dp_shard``: FSDP2 shards every parameter over the
``dp_shard`` ranks -- dense ones directly, experts ``ep``-ways by expert x ``edp_shard``-ways by
FSDP, which is the same per-GPU fraction -- and replicates over ``dp_replicate``):

- static: parameters (fp32 master, 4 B) of all parameters + AdamW ``exp_avg`` / ``exp_avg_sq``
  (fp32, 8 B) of trainable ones, divided by shard.
- gradients: fp32 (4 B) per trainable parameter / shard, produced layer by layer in backward.
- FSDP working set (profile ``gpu``): bf16 unsharded parameters of two blocks (current + prefetched)
  and the current block's bf16 unsharded gradient plus its fp32 reduce-scatter copy; a MoE block
  holds its ``E/ep`` local experts unsharded.
- activations (``micro_batch_tokens`` per micro-batch): the tensors our modules save for backward,
  counted per token from the code of the Qwen3-VL family's layers (see ``decoder_layer_bytes_per_token``;
  the architecture is read through the generic ``rynnscale.models.spec.ModelArgs`` fields); checkpointed blocks save
  only their input and recompute one block at a time in backward. Attention ``flash`` (GPU varlen
  kernel) and ``loop`` (CPU: one fused SDPA per document, plus the concatenated output) save O(s);
  ``math`` (an SDPA over 3-D inputs or with a mask) saves the heads x s^2 probabilities per document.
- vision tower: the same for ``plan.visual_tokens_per_micro_batch`` merged tokens (x merge^2 patches).
- loss: the chunked fused linear + cross-entropy keeps an fp32 [V, H] weight-gradient accumulator and
  the [N, H] input gradient from forward to backward, plus one chunk of fp32 logits while it runs.
- context parallelism (``parallel.cp``): parameters, gradients and optimiser states are sharded over
  ``dp_shard x cp``; every per-token term (decoder and vision activations, loss buffers) counts the
  rank's ``micro_batch_tokens / cp`` tokens (and ``1/cp`` of the frames); Ulysses (``cp_attention_mode``:
  the recipe's ``model.cp_attention``, ``auto`` = Ulysses when the q heads are divisible by cp) also keeps its head-sharded q, k (kv heads replicated up to cp), v and
  output per layer (``cp_attention_bytes_per_token``). Traffic per layer: Ulysses moves q, k, v and the
  output through all-to-alls, (cp-1)/cp of them, forward and backward; ring passes k/v cp-1 times in
  forward and k/v plus their fp32 gradients in backward (``estimate_comm``); a layer that does neither (Qwen3.5's
  DeltaNet state scan) counts its own: ``ModelSpec.cp_layer_bytes`` / ``cp_layer_traffic``.
- peak = max(forward/loss peak, every point of backward (saved activations of the layers not yet
  back-propagated + gradients already produced + the current layer's recompute / workspace),
  optimiser step (gradients + foreach temporaries)). The GPU profile adds a reserve for the CUDA
  context, NCCL buffers and allocator fragmentation before the verdict (stated in the report).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rynnscale.config.schema import PlanConfig
from rynnscale.models.registry import family_of
from rynnscale.models.stats import ParamStats
from rynnscale.ops.attention import varlen_takes_gqa
from rynnscale.parallel.layout import LayoutError, ParallelLayout, resolve_cp_attention

GIB = 1024 ** 3


class PlanError(ValueError):
    """An impossible layout or cluster for this recipe."""


@dataclass
class Profile:
    """Numeric formats and kernels of a run. ``gpu``: FSDP2 bf16 mixed precision, fused AdamW, flash
    attention; ``cpu``: fp32 everywhere, foreach AdamW, per-document fused attention (what a CPU run
    does)."""

    name: str = "gpu"
    act_bytes: int = 2            # compute dtype of activations
    param_bytes: int = 4          # stored (sharded) parameters
    grad_bytes: int = 4           # sharded gradients (FSDP2 reduce dtype)
    optim_bytes: int = 8          # AdamW exp_avg + exp_avg_sq
    attention: str = "flash"      # flash | loop | math
    fsdp_working_set: bool = True
    foreach_optimizer: bool = False
    reserve_gib: float = 2.5      # CUDA context + NCCL buffers
    fragmentation: float = 0.08   # allocator fragmentation, fraction of the estimate

    @classmethod
    def named(cls, name: str) -> Profile:
        if name == "gpu":
            return cls()
        if name == "cpu":
            return cls(name="cpu", act_bytes=4, attention="loop", fsdp_working_set=False, foreach_optimizer=True,
                       reserve_gib=0.0, fragmentation=0.0)
        raise PlanError(f"unknown plan profile {name!r}; choose 'gpu' or 'cpu'")


@dataclass
class Workload:
    micro_batch_tokens: int
    grad_accum: int = 1
    visual_tokens: int = 0          # merged visual tokens per micro-batch
    doc_tokens: int = 0             # longest document in a micro-batch (0 = micro_batch_tokens)
    frame_patches: int = 784        # patches per frame / image for vision attention (448x448 -> 28x28)
    loss_chunk_tokens: int = 2048
    label_fraction: float = 1.0     # share of tokens that carry a loss (1.0 = worst case)
    checkpointing: str = "none"     # none | full | every_k
    every: int = 2
    cp_attention: str = "auto"      # model.cp_attention: auto | ulysses | ring
    objective: str = "sft"          # train.objective: grpo runs whole rows (no CP) and never accumulates
    reference_copy: bool = False    # GRPO with rl.kl_coef > 0 on a full fine-tune: a frozen copy of the weights
    rollout_sequences: int = 0      # GRPO: answers one rank generates per step (its prompts x rl.group_size)
    rollout_new_tokens: int = 0     # GRPO: rl.max_new_tokens


def resolve_layout(world: int, dp_replicate: int, dp_shard: int, ep: int, num_experts: int,
                   cp: int = 1) -> ParallelLayout:
    """``parallel.*`` on ``world`` GPUs, by the launch's own rules (``rynnscale.parallel.layout``)."""
    try:
        return ParallelLayout.resolve(world, dp_replicate, dp_shard, ep, num_experts, cp)
    except LayoutError as e:
        raise PlanError(str(e)) from None


# ----------------------------------------------------------------------------- activations per token


def decoder_layer_bytes_per_token(t: Any, moe: bool, p: Profile, ep: int = 1) -> float:
    """Bytes our decoder layer saves for backward per token (without the attention s^2 term).

    Counted from the code (rynnscale/models/qwen3_vl/text.py, moe.py, ops/): RMSNorm saves its input
    (in the compute dtype: the kernel upcasts internally) and fp32 rstd, the weight multiply the
    normalised value, its output feeds the projections; q/k get a per-head RMSNorm; rotary saves q/k
    after rotation; attention saves q, k, v (GQA-expanded only where the GPU kernel lacks the GQA
    switch), its output and the per-head log-sum-exp (+ the row concat of per-document outputs on the
    CPU loop / math paths); SwiGLU saves gate, up and their product (``ops/fused.py`` recomputes
    silu in backward); a MoE block saves the router probabilities (fp32), the k token copies sorted
    by expert, gate_up, the SwiGLU product and the routing-weighted product (the down projection's
    input), plus int64 routing indices;
    under EP the weight multiplies the returned [S, H] rows instead, which are then kept."""
    a, f = p.act_bytes, 4
    H, inter, D = t.hidden_size, t.intermediate_size, t.head_dim
    qd, kvd = t.num_attention_heads * D, t.num_key_value_heads * D
    expanded = t.num_attention_heads != t.num_key_value_heads and p.attention == "flash" and not varlen_takes_gqa()
    norm_inputs = (2 * H + qd + kvd) * a + (2 + t.num_attention_heads + t.num_key_value_heads) * f
    norms_out = (4 * H + qd + kvd) * a                          # y and weight*y of both layer norms, y of q/k norms
    rotary_attn = qd * a + 2 * (qd if expanded else kvd) * a   # q_rot, k, v
    attn_out = (qd if p.attention == "flash" else 2 * qd) * a + (t.num_attention_heads * 4 if p.attention != "math" else 0)
    if moe:
        k, MI = t.num_experts_per_tok, t.moe_intermediate_size
        rows = (2 * k * H + 3 * k * MI) if ep > 1 else (k * H + 4 * k * MI)
        mlp = rows * a + t.num_experts * 4 + 5 * k * 8 + 3 * k * a
    else:
        mlp = 3 * inter * a
    return norm_inputs + norms_out + rotary_attn + attn_out + mlp


def cp_attention_mode(t: Any, cp: int, mode: str = "auto") -> str:
    """The attention ``model.cp_attention=mode`` runs under ``cp`` (the build's rule,
    ``rynnscale.parallel.layout.resolve_cp_attention``): ``auto`` is Ulysses when cp divides the q heads, else
    ring. ``PlanError`` when ``ulysses`` is asked of a head count cp does not divide."""
    try:
        return resolve_cp_attention(mode, t.num_attention_heads, cp)
    except LayoutError as e:
        raise PlanError(str(e)) from None


def cp_attention_bytes_per_token(t: Any, cp: int, p: Profile, mode: str = "auto") -> float:
    """Extra bytes per LOCAL token a decoder layer saves under context parallelism: Ulysses keeps the
    head-sharded q, k, v (kv heads repeated ``cp / gcd(Hkv, cp)`` times) and output, which together hold as
    many elements as the local tokens' full-head ones; ring saves only what plain attention saves (+ fp32
    output and log-sum-exp of its CPU block kernel, counted as 4-byte output)."""
    import math
    if cp <= 1:
        return 0.0
    D = t.head_dim
    if cp_attention_mode(t, cp, mode) == "ulysses":
        rep = cp // math.gcd(t.num_key_value_heads, cp)
        return (2 * t.num_attention_heads + 2 * t.num_key_value_heads * rep) * D * p.act_bytes
    return t.num_attention_heads * (D + 1) * 4


def attention_s2_bytes(heads: int, doc_tokens: int, tokens: int, p: Profile) -> float:
    """Math attention keeps heads x s^2 probabilities per document: for ``tokens`` split in documents of
    ``doc_tokens``, the total over the row. Flash attention keeps none."""
    if p.attention != "math" or tokens == 0:
        return 0.0
    full, rest = divmod(tokens, doc_tokens)
    return heads * p.act_bytes * (full * doc_tokens ** 2 + rest ** 2)


def vision_block_bytes_per_patch(v: Any, p: Profile) -> float:
    """A ViT block: LayerNorm outputs, the fused qkv output (kept whole: v is a view of it), rotated
    q/k (fp32 math, cast back), attention output (+ concat), residual, fc1 and GELU outputs."""
    D, inter = v.hidden_size, v.intermediate_size
    return (12 * D + 2 * inter) * p.act_bytes + 4 * 4


def vision_other_bytes_per_patch(v: Any, p: Profile) -> float:
    """Patch embedding + position embedding sum + fp32 rotary tables + every merger's norm/fc1/GELU
    (per patch) and fc2 (per merged token)."""
    D, out_h, m2 = v.hidden_size, v.out_hidden_size, v.spatial_merge_size ** 2
    mergers = 1 + len(getattr(v, "deepstack_visual_indexes", ()))   # a tower without DeepStack: the final merger
    return 2 * D * p.act_bytes + 2 * (D // v.num_heads) * 4 + mergers * (3 * D + out_h / m2) * p.act_bytes


# ----------------------------------------------------------------------------- the plan


@dataclass
class MemoryBreakdown:
    """Bytes per GPU; ``peak`` is the estimate of the largest live-tensor total of a step."""

    params: float
    optimizer: float
    grads: float
    reference: float                # GRPO's frozen reference copy (parameters, sharded like the policy's)
    fsdp_working_set: float
    activations_saved: float        # all blocks' saved tensors at the end of forward
    activations_text_per_layer: float
    vision_activations: float
    loss: float                     # fp32 weight-grad accumulator + input grad + one chunk of logits
    backward_workspace: float
    optimizer_temporaries: float
    peak_forward: float
    peak_backward: float
    peak_optimizer: float
    peak: float
    reserve: float                  # context / NCCL / fragmentation (gpu profile)
    total_with_reserve: float
    peak_phase: str


@dataclass
class Comm:
    """Bytes per GPU per optimiser step, and seconds at the stated bandwidths."""

    fsdp_allgather_bytes: float
    fsdp_reduce_scatter_bytes: float
    hsdp_allreduce_bytes: float
    ep_all_to_all_bytes: float
    fsdp_link: str
    ep_link: str
    fsdp_s: float
    ep_s: float
    cp_bytes: float = 0.0           # context-parallel attention traffic (all layers, all passes)
    cp_bytes_per_layer: float = 0.0  # one decoder layer, forward + backward, one micro-batch
    cp_mode: str = ""
    cp_s: float = 0.0


@dataclass
class Plan:
    recipe: str
    model: str
    params: dict[str, Any]
    cluster: dict[str, Any]
    layout: dict[str, Any]
    workload: dict[str, Any]
    profile: str
    memory: MemoryBreakdown
    comm: Comm
    flops_per_step: float
    compute_s: float
    step_s: float
    tokens_per_s_per_gpu: float
    fits: bool
    suggestions: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    recommended_cp: int | None = None  # smallest parallel.cp that fits (recommend_cp)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_memory(args: Any, st: ParamStats, lay: ParallelLayout, w: Workload, p: Profile,
                    cluster: PlanConfig | None = None) -> MemoryBreakdown:
    """Per-GPU memory of one training step (see the module docstring for the model)."""
    t, v = args.text, args.vision
    shard = lay.fsdp  # dp_shard x cp
    cp = lay.cp
    T = -(-w.micro_batch_tokens // cp)  # this rank's tokens of the row
    doc = min(w.doc_tokens or T, T)
    a = p.act_bytes
    n_layers = len(st.layer_dense)

    params = st.total * p.param_bytes / shard
    reference = params if w.reference_copy else 0.0
    optim = st.trainable * p.optim_bytes / shard
    layer_grads = [n * p.grad_bytes / shard for n in st.layer_trainable]
    grads_total = st.trainable * p.grad_bytes / shard
    head_grads = grads_total - sum(layer_grads) - sum(st.vision_block_trainable) * p.grad_bytes / shard

    # FSDP working set: bf16 unsharded params of 2 blocks + bf16 grad and fp32 reduce copy of 1 block
    ws = 0.0
    if p.fsdp_working_set:
        blocks = [d + e / lay.ep for d, e in zip(st.layer_dense, st.layer_experts)] + st.vision_block
        big = max(blocks) if blocks else 0
        ws = 2 * big * 2 + big * (2 + 4)

    # activations (a family whose layers are not Qwen3-VL-shaped gives its own per-layer terms: ModelSpec)
    spec = family_of(args)
    moe_layers = [t.layer_is_moe(i) for i in range(n_layers)]
    # under CP a layer either shards its attention (the planner's Ulysses / ring terms) or counts itself (ModelSpec)
    cp_own = [spec.cp_layer_bytes(args, i, p, cp, w.micro_batch_tokens, w.doc_tokens)
              if cp > 1 and spec.cp_layer_bytes is not None else None for i in range(n_layers)]
    cp_attn = cp_attention_bytes_per_token(t, cp, p, w.cp_attention) * T
    cp_saved = [own[0] if own is not None else cp_attn for own in cp_own]
    if spec.layer_activation_bytes is not None:
        full_layer = [spec.layer_activation_bytes(args, i, p, lay.ep, T, doc) + cp_saved[i] for i in range(n_layers)]
    else:
        full_layer = [decoder_layer_bytes_per_token(t, m, p, lay.ep) * T + cp_saved[i]
                      + attention_s2_bytes(t.num_attention_heads, doc, T, p) for i, m in enumerate(moe_layers)]
    ckpt = _checkpointed(n_layers, w)
    saved_layer = [T * t.hidden_size * a if c else full for c, full in zip(ckpt, full_layer)]
    patches = _visual_patches(args, w, cp)  # CP: each rank encodes 1/cp of the frames
    n_blocks = len(st.vision_block)
    vckpt = _checkpointed(n_blocks, w)
    vblock_full = vother = 0.0
    if patches:
        vblock_full = (vision_block_bytes_per_patch(v, p) * patches
                       + attention_s2_bytes(v.num_heads, min(w.frame_patches, patches) or 1, patches, p))
        vother = vision_other_bytes_per_patch(v, p) * patches
    vsaved = [patches * v.hidden_size * a if c else vblock_full for c in vckpt]
    vision_acts = sum(vsaved) + vother
    # outside the blocks: cos/sin tables, final norm (fp32 input, y, output); in backward only the
    # tables and the final hidden states (held by the step's output) remain
    other = 2 * T * t.head_dim * a + T * t.hidden_size * (4 + 2 * a)
    other_bwd = 2 * T * t.head_dim * a + T * t.hidden_size * a
    grad_flow = 2 * T * t.hidden_size * a

    # fused linear + cross-entropy
    V, H = t.vocab_size, t.hidden_size
    n_lab = max(1, int(T * w.label_fraction))
    chunk = min(w.loss_chunk_tokens, n_lab)
    loss_saved = V * H * 4 + n_lab * H * a
    loss_transient = chunk * V * 4 + (chunk * V * 2 * a if a < 4 else 0) + V * H * (a + (4 if a < 4 else 0))
    lm_gather = V * H * 2 if p.fsdp_working_set else 0.0

    static = params + reference + optim
    acts_all = sum(saved_layer) + vision_acts + other
    peak_fwd = static + ws + acts_all + loss_saved + loss_transient + lm_gather
    # backward: loss node, then decoder layers n-1..0, then vision blocks
    events = [static + ws + acts_all + loss_saved + head_grads + lm_gather + V * H * a]
    done_grads = head_grads
    for i in reversed(range(n_layers)):
        done_grads += layer_grads[i]
        live_saved = sum(saved_layer[:i]) + vision_acts + other_bwd
        current = full_layer[i] if ckpt[i] else 0.0   # recomputed activations of this layer
        work = _layer_backward_workspace(t, moe_layers[i], T, doc, p)
        if spec.layer_backward_bytes is not None:
            work += spec.layer_backward_bytes(args, i, p, T, doc)
        if cp_own[i] is not None:
            work += cp_own[i][1]
        events.append(static + ws + live_saved + current + work + grad_flow + done_grads)
    vgrads = [n * p.grad_bytes / shard for n in st.vision_block_trainable]
    for j in reversed(range(n_blocks)):
        done_grads += vgrads[j]
        live = sum(vsaved[:j]) + vother
        current = vblock_full if vckpt[j] else 0.0
        events.append(static + ws + live + current + 2 * patches * v.hidden_size * a + done_grads)
    peak_bwd = max(events)
    opt_tmp = st.largest_group * 4 / shard if p.foreach_optimizer else 0.0
    peak_opt = static + grads_total + opt_tmp
    peak = max(peak_fwd, peak_bwd, peak_opt)
    phase = {peak_fwd: "forward (loss)", peak_bwd: "backward", peak_opt: "optimizer step"}[peak]
    reserve = p.reserve_gib * GIB + p.fragmentation * peak
    return MemoryBreakdown(
        params=params, optimizer=optim, grads=grads_total, reference=reference, fsdp_working_set=ws, activations_saved=acts_all,
        activations_text_per_layer=max(saved_layer) if saved_layer else 0.0, vision_activations=vision_acts,
        loss=loss_saved + loss_transient, backward_workspace=max(events) - static - ws, optimizer_temporaries=opt_tmp,
        peak_forward=peak_fwd, peak_backward=peak_bwd, peak_optimizer=peak_opt, peak=peak, reserve=reserve,
        total_with_reserve=peak + reserve, peak_phase=phase)


def _visual_patches(args: Any, w: Workload, cp: int = 1) -> int:
    """Vision patches one rank encodes per micro-batch (``w.visual_tokens`` merged tokens x merge^2, 1/cp of
    them under CP); a model without a vision tower takes none (``PlanError`` if the workload assumes some)."""
    if args.vision is None:
        if w.visual_tokens:
            raise PlanError(f"plan.visual_tokens_per_micro_batch={w.visual_tokens} but this model has no vision "
                            "tower (a text-only model): set plan.visual_tokens_per_micro_batch=0")
        return 0
    return -(-w.visual_tokens // cp) * args.vision.spatial_merge_size ** 2


def _checkpointed(n: int, w: Workload) -> list[bool]:
    if w.checkpointing == "full":
        return [True] * n
    if w.checkpointing == "every_k":
        return [i % w.every == 0 for i in range(n)]
    return [False] * n


def _layer_backward_workspace(t: Any, moe: bool, T: int, doc: int, p: Profile) -> float:
    """Transient gradients inside one layer's backward, on top of its saved tensors: the MLP's
    intermediate gradients (2 x its inner width per token) or, later in the same backward, one
    document's attention-probability gradient on the math path (the MLP's tensors are freed by then),
    whichever is larger."""
    k = t.num_experts_per_tok
    mlp = (2 * k * t.moe_intermediate_size + k * t.hidden_size if moe else 2 * t.intermediate_size) * T * p.act_bytes
    attn = t.num_attention_heads * doc ** 2 * p.act_bytes if p.attention == "math" else 0.0
    return max(mlp, attn)


def estimate_comm(args: Any, st: ParamStats, lay: ParallelLayout, w: Workload, c: PlanConfig) -> Comm:
    """Per-GPU bytes per optimiser step. FSDP2 all-gathers bf16 parameters in forward and again in
    backward (reshard after forward) and reduce-scatters fp32 gradients, once per micro-batch; a ring
    collective moves (n-1)/n of the buffer per GPU. HSDP all-reduces the shard's gradients over
    ``dp_replicate`` (2x (r-1)/r). EP all-to-all: every token's top-k copies (bf16 hidden) go out
    and come back (dispatch + combine), in forward and backward (+ forward again in each recomputed layer)."""
    n, r, ep = lay.fsdp, lay.dp_replicate, lay.ep
    dense = st.total - st.expert_total
    ring = (n - 1) / n if n > 1 else 0.0
    eng = (lay.edp_shard - 1) / lay.edp_shard if lay.edp_shard > 1 else 0.0
    # dense params over dp_shard; experts (E/ep of them per rank) over edp_shard
    ag = w.grad_accum * 2 * (dense * 2 * ring + (st.expert_total / ep) * 2 * eng)
    rs = w.grad_accum * (dense * 4 * ring + (st.expert_total / ep) * 4 * eng)
    hs = 2 * (r - 1) / r * st.trainable * 4 / n if r > 1 else 0.0
    n_layers = len(st.layer_dense)
    moe = [args.text.layer_is_moe(i) for i in range(n_layers)]
    moe_layers = sum(moe)
    # a recomputed layer routes its tokens once more: every checkpointed one (selective too: its policy saves the
    # matmuls, not the all-to-alls -- measured 16 calls per step like full, 10 without, on 4 ranks with ep=2)
    recomputed = [True] * n_layers if w.checkpointing == "selective" else _checkpointed(n_layers, w)
    passes = sum(3 if r_ else 2 for m, r_ in zip(moe, recomputed) if m)
    a2a = 0.0
    if ep > 1 and moe_layers:
        a2a = (w.grad_accum * passes * 2 * w.micro_batch_tokens * args.text.num_experts_per_tok
               * args.text.hidden_size * 2 * (ep - 1) / ep)
    fsdp_inter = n > c.gpus_per_node or r > 1 and c.nodes > 1
    fsdp_bw = (c.ib_gbps if fsdp_inter else c.nvlink_gbps) * 1e9
    ep_bw = (c.ib_gbps if ep > c.gpus_per_node else c.nvlink_gbps) * 1e9
    if ep > 1 and moe_layers and lay.cp > 1:
        a2a /= lay.cp  # each rank routes its own shard's tokens
    cp_layer, mode = cp_traffic_per_layer(args.text, lay.cp, w.micro_batch_tokens, w.checkpointing == "full",
                                          mode=w.cp_attention)
    spec = family_of(args)
    own = [spec.cp_layer_traffic(args, i, lay.cp, w.micro_batch_tokens, w.doc_tokens, w.checkpointing == "full")
           if spec.cp_layer_traffic is not None else None for i in range(n_layers)]
    cp_total = sum(cp_layer if sent is None else sent for sent in own) * w.grad_accum
    cp_bw = (c.ib_gbps if lay.cp > c.gpus_per_node else c.nvlink_gbps) * 1e9
    return Comm(ag, rs, hs, a2a, "InfiniBand" if fsdp_inter else "NVLink",
                "InfiniBand" if ep > c.gpus_per_node else "NVLink", (ag + rs + hs) / fsdp_bw, a2a / ep_bw,
                cp_total, cp_layer, mode, cp_total / cp_bw)


def cp_traffic_per_layer(t: Any, cp: int, row_tokens: int, recompute: bool,
                         act_bytes: int = 2, mode: str = "auto") -> tuple[float, str]:
    """Bytes one rank sends for one decoder layer's attention under context parallelism (one micro-batch,
    forward + backward, + the recomputed forward under full checkpointing) and the mode ``mode`` runs as.
    Ulysses: q, k (repeated), v and the output through all-to-alls, (cp-1)/cp of the local bytes each way
    and pass. Ring: k/v shards passed cp-1 times forward; backward passes k/v again and their fp32 grads."""
    import math
    if cp <= 1:
        return 0.0, ""
    L_r = -(-row_tokens // cp)
    D, mode = t.head_dim, cp_attention_mode(t, cp, mode)
    fwd_passes = 2 if recompute else 1
    if mode == "ulysses":
        rep = cp // math.gcd(t.num_key_value_heads, cp)
        per_pass = (2 * t.num_attention_heads + 2 * t.num_key_value_heads * rep) * D * L_r * act_bytes * (cp - 1) / cp
        return per_pass * (fwd_passes + 1), mode
    kv = 2 * t.num_key_value_heads * D * L_r
    fwd = (cp - 1) * kv * act_bytes
    bwd = (cp - 1) * kv * act_bytes + cp * kv * 4
    return fwd * fwd_passes + bwd, mode


def recommend_cp(args: Any, st: ParamStats, lay: ParallelLayout, w: Workload, c: PlanConfig,
                 p: Profile) -> int | None:
    """The smallest CP degree (1, 2, 4, ... up to the GPUs of a node, so the attention traffic stays on
    NVLink) with which this workload fits with the planner's stated accuracy as headroom (estimate x 1.15
    <= GPU memory), other keys unchanged (a recipe's ``model.cp_attention=ulysses`` only at degrees dividing the q
    heads); None if none does, or under GRPO, which config validation refuses CP for."""
    if w.objective == "grpo":
        return None
    budget = c.gpu_mem_gib * GIB / 1.15
    cp = 1
    while cp <= c.gpus_per_node:
        try:
            lay2 = resolve_layout(lay.world_size, lay.dp_replicate, -1, lay.ep, st.num_experts, cp)
        except PlanError:
            lay2 = None
        if w.cp_attention == "ulysses" and args.text.num_attention_heads % cp:
            lay2 = None   # the recipe's ulysses cannot run at this cp
        if lay2 is not None and estimate_memory(args, st, lay2, w, p, c).total_with_reserve <= budget:
            return cp
        cp *= 2
    return None


def model_flops_per_step(args: Any, st: ParamStats, w: Workload) -> float:
    """Model FLOPs of one optimiser step on one data-parallel rank: the family's ``step_flops`` (what
    metrics.jsonl's ``model_tflops_per_s`` counts: decoder matmuls, lm_head on every token, causal softmax
    attention per document -- only in the layers that have it --, linear attention, the vision tower) of one
    micro-batch of documents of ``w.doc_tokens`` tokens (the last one shorter) holding
    ``w.visual_tokens`` merged visual tokens in frames of ``w.frame_patches`` patches, x ``grad_accum``."""
    import torch

    T = w.micro_batch_tokens
    doc = min(w.doc_tokens or T, T)
    full, rest = divmod(T, doc)
    doc_lens = [doc] * full + ([rest] if rest else [])
    patches = _visual_patches(args, w)
    grid_thw = None
    if patches:   # only h * w per frame enters the count: frames as [t, 1, patches per frame]
        frame = min(w.frame_patches, patches)
        n_frames, left = divmod(patches, frame)
        grid_thw = torch.tensor([[n_frames, 1, frame]] + ([[1, 1, left]] if left else []))
    return family_of(args).step_flops(args, st, doc_lens, grid_thw).total * w.grad_accum


def make_plan(recipe: str, model_name: str, args: Any, st: ParamStats, lay: ParallelLayout, w: Workload,
              c: PlanConfig, p: Profile) -> Plan:
    mem = estimate_memory(args, st, lay, w, p, c)
    comm = estimate_comm(args, st, lay, w, c)
    flops = model_flops_per_step(args, st, w)
    recompute = 4 / 3 if w.checkpointing == "full" else 1.0   # full checkpointing re-runs the forward
    compute_s = flops * recompute / (c.peak_tflops * 1e12 * c.mfu)
    compute_s /= lay.cp  # the CP ranks share one sample stream's work
    step_s = max(compute_s, comm.fsdp_s) + comm.ep_s + comm.cp_s
    budget = c.gpu_mem_gib * GIB
    fits = mem.total_with_reserve <= budget
    plan = Plan(
        recipe=recipe, model=model_name,
        params={"total": st.total, "active": st.active, "text_total": st.text_total, "text_active": st.text_active,
                "vision": st.vision_total, "experts": st.expert_total, "trainable": st.trainable, "frozen": st.frozen},
        cluster=asdict(c), layout={"world": lay.world_size, **lay.as_dict(), "edp_shard": lay.edp_shard}, workload=asdict(w), profile=p.name,
        memory=mem, comm=comm, flops_per_step=flops, compute_s=compute_s, step_s=step_s,
        tokens_per_s_per_gpu=w.micro_batch_tokens * w.grad_accum / lay.cp / step_s, fits=fits,
        assumptions=[
            f"profile {p.name}: activations {p.act_bytes} B, fp32 master params + fp32 grads + AdamW fp32 states "
            f"({p.param_bytes}+{p.grad_bytes}+{p.optim_bytes} B per parameter, sharded over dp_shard x cp="
            f"{lay.fsdp}); "
            f"attention {p.attention}",
            f"reserve: {p.reserve_gib} GiB (CUDA context, NCCL buffers) + {p.fragmentation:.0%} of the estimate "
            "(allocator fragmentation)",
            f"step time: {c.peak_tflops:g} TFLOP/s peak bf16 x MFU {c.mfu:g}; NVLink {c.nvlink_gbps:g} GB/s, "
            f"InfiniBand {c.ib_gbps:g} GB/s per GPU; FSDP traffic overlaps compute, EP all-to-all does not",
            "every token labelled (upper bound for the loss buffers)" if w.label_fraction >= 1 else
            f"{w.label_fraction:.0%} of tokens labelled",
            *_grpo_assumptions(args, w, p),
        ])
    plan.recommended_cp = recommend_cp(args, st, lay, w, c, p)
    if not fits:
        plan.suggestions = _suggest(recipe, model_name, args, st, lay, w, c, p)
    return plan


def kv_cache_bytes_per_token(t: Any, p: Profile) -> float:
    """KV-cache bytes of one generated or prompt token: k and v of every softmax-attention layer (a hybrid's linear
    attention layers keep a fixed-size state instead)."""
    layer_types = getattr(t, "layer_types", None) or []
    n_attn = sum(1 for x in layer_types if x == "full_attention") if layer_types else t.num_hidden_layers
    return n_attn * 2 * t.num_key_value_heads * t.head_dim * p.act_bytes


def _bytes(n: float) -> str:
    return f"{n:.0f} B" if n < 1024 else f"{n / 1024:.0f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.1f} MiB"


def _grpo_assumptions(args: Any, w: Workload, p: Profile) -> list[str]:
    if w.objective != "grpo":
        return []
    out = [("GRPO: the reference policy is a frozen copy of the weights (a full fine-tune with rl.kl_coef > 0), "
            "counted above" if w.reference_copy else
            "GRPO: no reference copy (a LoRA run's reference is its base with the adapters off, or rl.kl_coef = 0)")]
    if w.rollout_sequences:
        per_token = kv_cache_bytes_per_token(args.text, p)
        answers = w.rollout_sequences * w.rollout_new_tokens * per_token
        out.append(f"GRPO rollouts (between steps, gradients freed; not in the peak above): {w.rollout_sequences} "
                   f"answers per rank, KV cache {_bytes(per_token)} per token of prompt + answer, "
                   f"{answers / GIB:.2f} GiB for their {w.rollout_new_tokens} new tokens each plus each prompt's tokens")
    return out


def _suggest(recipe, model_name, args, st, lay, w, c, p) -> list[str]:
    """Concrete changes that make the plan fit, each checked with the same model."""
    from dataclasses import replace

    out = []
    budget = c.gpu_mem_gib * GIB

    def fits(lay2=lay, w2=w) -> bool:
        return estimate_memory(args, st, lay2, w2, p, c).total_with_reserve <= budget

    if w.checkpointing != "full" and fits(w2=replace(w, checkpointing="full")):
        out.append("model.activation_checkpointing=full")
    cp = recommend_cp(args, st, lay, w, c, p)
    if cp is not None and cp != lay.cp:
        out.append(f"parallel.cp={cp} (context parallelism: the row split over {cp} GPUs, "
                   f"{cp_attention_mode(args.text, cp, w.cp_attention)} attention)")
    T = w.micro_batch_tokens
    while T > 512:
        T //= 2
        # smaller packs of the same data: the same share of visual tokens (the recipe's visual budget must
        # stay within the micro-batch, or plan_recipe refuses the suggestion)
        visual = w.visual_tokens * T // w.micro_batch_tokens
        w2 = replace(w, micro_batch_tokens=T, visual_tokens=visual, doc_tokens=min(w.doc_tokens or T, T))
        if fits(w2=w2):
            text = f"train.micro_batch_tokens={T}"
            if w.visual_tokens:
                text += f" plan.visual_tokens_per_micro_batch={visual}"
            if w.objective != "grpo":   # GRPO never accumulates (train.grad_accum must stay 1)
                text += (f" (and train.grad_accum={w.grad_accum * w.micro_batch_tokens // T} to keep the tokens "
                         "per step)")
            out.append(text)
            break
    for nodes in (2, 4, 8, 16, 32):
        if nodes <= c.nodes:
            continue
        world = nodes * c.gpus_per_node
        try:
            lay2 = resolve_layout(world, lay.dp_replicate, -1, lay.ep, st.num_experts, lay.cp)
        except PlanError:
            continue
        if fits(lay2=lay2):
            out.append(f"--nodes {nodes} (more FSDP sharding: parallel.dp_shard={lay2.dp_shard})")
            break
    if not out:
        out.append("no single change found: combine activation checkpointing, a smaller micro-batch and more GPUs, "
                   "or freeze the vision tower (model.freeze=['model.visual.*'])")
    return out


# ----------------------------------------------------------------------------- report


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def format_plan(pl: Plan) -> str:
    m, cm, c, lay = pl.memory, pl.comm, pl.cluster, pl.layout
    pr = pl.params
    lines = [
        f"rynnscale plan: {pl.recipe}",
        f"model      {pl.model}: {pr['total'] / 1e9:.3f}B parameters ({pr['active'] / 1e9:.3f}B active per token; "
        f"text {pr['text_total'] / 1e9:.3f}B / {pr['text_active'] / 1e9:.3f}B active; vision {pr['vision'] / 1e9:.3f}B; "
        f"frozen {pr['frozen'] / 1e9:.3f}B)",
        f"cluster    {c['nodes']} node(s) x {c['gpus_per_node']} GPUs x {c['gpu_mem_gib']:g} GiB "
        f"(profile {pl.profile})",
        f"layout     dp_replicate={lay['dp_replicate']} dp_shard={lay['dp_shard']} ep={lay['ep']} cp={lay.get('cp', 1)} "
        f"(experts FSDP over edp_shard={lay['edp_shard']})",
        f"workload   {pl.workload['micro_batch_tokens']} tokens/micro-batch x grad_accum {pl.workload['grad_accum']}, "
        f"{pl.workload['visual_tokens']} visual tokens, checkpointing {pl.workload['checkpointing']}",
        "",
        "memory per GPU",
        f"  parameters (fp32 shard)        {_gib(m.params)}",
        f"  AdamW states (fp32 shard)      {_gib(m.optimizer)}",
        *([f"  GRPO reference (frozen copy)   {_gib(m.reference)}"] if m.reference else []),
        f"  gradients (fp32 shard)         {_gib(m.grads)}",
        f"  FSDP working set (bf16 blocks) {_gib(m.fsdp_working_set)}",
        f"  activations saved (all layers) {_gib(m.activations_saved)}",
        f"    largest decoder layer        {_gib(m.activations_text_per_layer)}",
        f"    vision tower                 {_gib(m.vision_activations)}",
        f"  loss (fp32 dW acc + logits)    {_gib(m.loss)}",
        f"  peak forward / backward / opt  {m.peak_forward / GIB:.2f} / {m.peak_backward / GIB:.2f} / "
        f"{m.peak_optimizer / GIB:.2f} GiB",
        f"  estimated peak ({m.peak_phase:>14}) {_gib(m.peak)}",
        f"  + reserve (context, NCCL, frag.) {_gib(m.reserve)}",
        f"  = needed                       {_gib(m.total_with_reserve)}  of {c['gpu_mem_gib']:g} GiB",
        "",
        "communication per GPU per step",
        f"  FSDP all-gather (bf16)         {cm.fsdp_allgather_bytes / 1e9:8.2f} GB   over {cm.fsdp_link}",
        f"  FSDP reduce-scatter (fp32)     {cm.fsdp_reduce_scatter_bytes / 1e9:8.2f} GB",
        f"  HSDP all-reduce                {cm.hsdp_allreduce_bytes / 1e9:8.2f} GB",
        f"  EP all-to-all (bf16)           {cm.ep_all_to_all_bytes / 1e9:8.2f} GB   over {cm.ep_link}",
        f"  CP attention ({cm.cp_mode or 'off'})" + " " * max(1, 17 - len(cm.cp_mode or 'off'))
        + f"{cm.cp_bytes / 1e9:8.2f} GB   ({cm.cp_bytes_per_layer / 1e6:.1f} MB per layer per micro-batch)",
        f"  recommended parallel.cp        {pl.recommended_cp or ('n/a (GRPO)' if pl.workload['objective'] == 'grpo' else 'none fits')}",
        "",
        f"step time  compute {pl.compute_s:.2f} s, FSDP comm {cm.fsdp_s:.2f} s (overlapped), EP all-to-all "
        f"{cm.ep_s:.2f} s, CP attention {cm.cp_s:.2f} s -> ~{pl.step_s:.2f} s/step, ~{pl.tokens_per_s_per_gpu:,.0f} tokens/s/GPU "
        f"({pl.flops_per_step / 1e12:.1f} model TFLOP per step per GPU)",
        "",
        f"verdict    {'FITS' if pl.fits else 'DOES NOT FIT'}"
        + ("" if pl.fits else f"; try: {'; '.join(pl.suggestions)}"),
        "assumptions",
    ]
    lines += [f"  - {a}" for a in pl.assumptions]
    return "\n".join(lines)






__all__ = ["Plan", "PlanError", "Profile", "Workload", "estimate_comm", "estimate_memory",
           "format_plan", "make_plan", "model_flops_per_step", "resolve_layout"]
