"""Qwen3-VL's model FLOPs of one training step (forward + backward, recomputation NOT counted) over packed
documents: the family's ``step_flops`` (``rynnscale.models.stats.batch_flops`` applies it to a batch).

Used for model TFLOP/s and MFU (metrics, bench/train_step.py, the planner). Parameter counts come from
``rynnscale.models.stats.param_stats`` (the same module tree the trainer builds); only the
weights that take part in a matmul count. Per part (T tokens, P vision patches):

- ``text_linear``    = 6 * N_lin * T. N_lin per token = every decoder layer's parameters minus its
                       RMSNorm weights (2 * hidden + 2 * head_dim) and biases (``attention_bias``),
                       routed experts scaled by top_k / num_experts; i.e. q, k, v, o, router,
                       dense MLP or top_k experts (3 * hidden * moe_intermediate each).
- ``lm_head``        = 6 * vocab * hidden * T_loss (T_loss = T by default, ANCHORS' convention;
                       our fused linear+CE really runs on the labelled rows only). The embedding
                       lookup is free (also when tied).
- ``text_attention`` = 6 * layers * H_q * head_dim * sum_i s_i^2 over the packed samples s_i:
                       causal attention counted as HALF of the full 12 * H_q * d * s^2 (QK^T and
                       PV, 2 FLOPs per MAC, forward 1x + backward 2x). For B unpacked rows of
                       length S this is ANCHORS' ``6 x layers x S x heads x head_dim`` per token.
- ``vision_linear``  = 6 * N_block_lin * P (blocks: qkv, proj, fc1, fc2, without norms/biases)
                       + 4 * patch_dim * D * P (patch embedding: pixels need no gradient, so its
                       backward is weight-only) + 6 * N_merger_lin * P / merge^2 (the final and
                       DeepStack mergers run once per merged token).
- ``vision_attention`` = 12 * depth * D * sum_f (h_f * w_f)^2 (non-causal, one document per frame).

Frozen weights (LoRA, ``model.freeze``) take 4 FLOPs per weight and row instead of 6 (no weight gradient), 2 where
nothing below them trains (no input gradient either: a frozen vision tower feeding a trainable decoder runs forward
only); a token mixer (attention) with nothing trainable below it runs forward only (1/3 of its term). Which passes a
step skips comes from the module tree (``rynnscale.models.stats.backward_skips``); LoRA factors count as weights.

torch's ``FlopCounterMode`` counts exactly these matmuls, except that it counts causal attention
as full (2 x ``text_attention``); tests/train/test_flops.py checks both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rynnscale.models.qwen3_vl.args import Qwen3VLArgs
from rynnscale.models.stats import ParamStats, StepFlops


def text_linear_params_per_token(args: Qwen3VLArgs, st: ParamStats) -> int:
    """Decoder matmul weights one token uses (lm_head and embedding excluded)."""
    t = args.text
    per_layer_non_matmul = 2 * t.hidden_size + 2 * t.head_dim  # input/post-attention norms + q/k norms
    if t.attention_bias:
        per_layer_non_matmul += (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim + t.hidden_size
    n = sum(st.layer_dense) - per_layer_non_matmul * len(st.layer_dense)
    if st.num_experts:
        n += sum(st.layer_experts) * st.top_k // st.num_experts
    return n


def vision_linear_params(args: Qwen3VLArgs, st: ParamStats) -> tuple[int, int, int]:
    """-> (block matmul weights per patch over all blocks, patch-embedding weights, merger matmul
    weights per merged token over the final + DeepStack mergers)."""
    v = args.vision
    D, inner = v.hidden_size, v.intermediate_size
    block_non_matmul = 4 * D + (3 * D + D + inner + D)  # 2 LayerNorms (w, b) + qkv/proj/fc1/fc2 biases
    blocks = sum(st.vision_block) - block_non_matmul * len(st.vision_block)
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    merged = D * v.spatial_merge_size ** 2
    mergers = (1 + len(v.deepstack_visual_indexes)) * (merged * merged + merged * v.out_hidden_size)
    return blocks, patch_dim * D, mergers


def step_flops(
    args: Qwen3VLArgs,
    st: ParamStats,
    doc_lens: Sequence[int],
    vision_grid_thw: torch.Tensor | None = None,
    loss_tokens: int | None = None,
) -> StepFlops:
    """FLOPs of forward + backward over documents of ``doc_lens`` tokens (packed or not: attention
    never crosses documents) whose images/videos have ``vision_grid_thw`` [N, 3] (t, h, w patches).
    ``loss_tokens``: rows the lm_head runs on (default: every token)."""
    t, v = args.text, args.vision
    lens = [int(s) for s in doc_lens]
    T = sum(lens)
    n_tok = T if loss_tokens is None else int(loss_tokens)
    has_vision = vision_grid_thw is not None and vision_grid_thw.numel() > 0
    sk = st.backward_skips(has_vision)
    text_linear = (6.0 * text_linear_params_per_token(args, st) - 2.0 * sk.text) * T
    lm_head = (6.0 * t.vocab_size * t.hidden_size - 2.0 * sk.lm_head) * n_tok
    passes = sum(sk.mixer_passes(sk.text_mixer_forward_only, len(st.layer_dense)))
    text_attention = 2.0 * passes * t.num_attention_heads * t.head_dim * sum(s * s for s in lens)
    vision_linear = vision_attention = 0.0
    if has_vision:
        g = vision_grid_thw.detach().to("cpu", torch.int64).reshape(-1, 3)
        hw = g[:, 1] * g[:, 2]
        P = int((g[:, 0] * hw).sum())
        blocks, embed, mergers = vision_linear_params(args, st)
        vision_linear = ((6.0 * blocks - 2.0 * sk.vision_blocks) * P + (4.0 * embed - 2.0 * sk.vision_embed) * P
                         + (6.0 * mergers - 2.0 * sk.vision_mergers) * P / v.spatial_merge_size ** 2)
        v_passes = sum(sk.mixer_passes(sk.vision_mixer_forward_only, len(st.vision_block)))
        vision_attention = 4.0 * v_passes * v.hidden_size * float((g[:, 0] * hw * hw).sum())
    return StepFlops(text_linear, lm_head, text_attention, vision_linear, vision_attention)


def anchor_flops_per_step(args: Qwen3VLArgs, batch: int, seq: int) -> float:
    """ANCHORS.md's formula for B unpacked rows of S tokens, written out from the dimensions alone
    (``6 x active params + 6 x layers x S x heads x head_dim`` per token; active = attention +
    top-k experts + router per layer + lm_head). A cross-check of ``step_flops``, not used by it."""
    t = args.text
    h, L = t.hidden_size, t.num_hidden_layers
    attn = h * t.num_attention_heads * t.head_dim * 2 + h * t.num_key_value_heads * t.head_dim * 2
    if t.is_moe:
        mlp = t.num_experts_per_tok * 3 * h * t.moe_intermediate_size + h * t.num_experts
    else:
        mlp = 3 * h * t.intermediate_size
    active = L * (attn + mlp) + h * t.vocab_size
    per_token = 6 * active + 6 * L * seq * t.num_attention_heads * t.head_dim
    return float(per_token * batch * seq)


def cost_coefficients(args: Qwen3VLArgs) -> tuple[float, float, float]:
    """``(a, b, c)`` of the data path's balancing cost ``a * tokens + b * tokens^2 + c * vision_patches``
    (``rynnscale.data.balance``), in units of one token's decoder linear work: FLOP ratios of attention and
    of the vision tower to the decoder's matmul weights. Counts matmul weights only: decoder attention +
    MLP (MoE: top-k experts + router) + lm_head; vision blocks + patch embedding + mergers (per patch)."""
    t, v = args.text, args.vision
    h, hd = t.hidden_size, t.head_dim
    attn = h * t.num_attention_heads * hd * 2 + h * t.num_key_value_heads * hd * 2
    n_active = 0
    for i in range(t.num_hidden_layers):
        if t.num_experts > 0 and t.layer_is_moe(i):
            mlp = t.num_experts_per_tok * 3 * h * t.moe_intermediate_size + h * t.num_experts
        else:
            mlp = 3 * h * t.intermediate_size
        n_active += attn + mlp
    n_active += h * t.vocab_size
    b = t.num_hidden_layers * t.num_attention_heads * hd / n_active
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    merged = v.hidden_size * v.spatial_merge_size ** 2
    n_vision = v.depth * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    n_vision += patch_dim * v.hidden_size
    # the patch merger and the DeepStack mergers run once per merged token (= merge^2 patches)
    n_mergers = 1 + len(v.deepstack_visual_indexes)
    n_vision += n_mergers * (merged * merged + merged * v.out_hidden_size) / v.spatial_merge_size ** 2
    return 1.0, b, n_vision / n_active
