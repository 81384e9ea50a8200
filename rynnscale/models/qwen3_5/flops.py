"""Qwen3.5's model FLOPs of one training step (forward + backward = 3x forward, recomputation NOT counted) over
packed documents, and the data path's balancing cost coefficients. Parameter counts come from
``rynnscale.models.stats.param_stats`` (the module tree the trainer builds). Per part (T tokens, P patches):

- ``text_linear``    = 6 * N_lin * T. N_lin per token = every decoder layer's parameters minus those that take
                       part in no matmul (the RMSNorm weights, the DeltaNet ``norm`` / ``dt_bias`` / ``A_log``,
                       biases), routed experts scaled by top_k / num_experts: q (with its gate half), k, v, o of
                       the full-attention layers; ``in_proj_*``, ``out_proj`` and the depthwise ``conv1d`` (K MACs
                       per channel and token, as many as its weights) of the DeltaNet layers; the dense MLP or
                       router + top_k experts + shared expert and its gate.
- ``lm_head``        = 6 * vocab * hidden * T_loss (T_loss = T by default; the embedding lookup is free).
- ``text_attention`` = the token mixing that no weight counts:
  full-attention layers: 6 * n_full * H_q * head_dim * sum_i s_i^2 (causal: half of QK^T + PV, x3 for
  backward), as Qwen3-VL; DeltaNet layers: 6 * n_linear * Hv * T_c * m, the chunked gated delta rule's
  multiply-adds per token and value head with chunk C (``gated_delta.CHUNK``) over the chunk-padded
  documents (T_c = sum_i C * ceil(s_i / C)):
      m = 3 * dk * dv          (read of the state by q and by k_beta, the state update)
        + C * (2 * dk + dv)    (beta K K^T and Q K^T within the chunk, the intra-chunk output)
        + C * (dk + dv) / 2    (the unit-lower-triangular solve for U and W)
  i.e. what ``gated_delta.chunk_gated_delta_rule`` multiplies (the l2norm, gates, decays and the conv are
  element-wise / counted above); linear in tokens, unlike softmax attention.
- ``vision_linear`` / ``vision_attention``: Qwen3-VL's tower without DeepStack mergers (``qwen3_vl/flops.py``).

Frozen weights and token mixers with nothing trainable below them cost less, as in ``qwen3_vl/flops.py``
(``rynnscale.models.stats.backward_skips``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from rynnscale.models.qwen3_5.gated_delta import CHUNK
from rynnscale.models.stats import ParamStats, StepFlops


def gdn_macs_per_token_head(args: Any, chunk: int = CHUNK) -> float:
    """Multiply-adds of the chunked gated delta rule per (padded) token and value head (module docstring)."""
    t = args.text
    dk, dv = t.linear_key_head_dim, t.linear_value_head_dim
    return 3 * dk * dv + chunk * (2 * dk + dv) + chunk * (dk + dv) / 2


def _non_matmul_per_layer(args: Any) -> list[int]:
    t = args.text
    out = []
    for i in range(t.num_hidden_layers):
        n = 2 * t.hidden_size                                   # input / post-attention norms
        if t.is_linear(i):
            n += 2 * t.linear_num_value_heads + t.linear_value_head_dim   # dt_bias, A_log, gated norm
        else:
            n += 2 * t.head_dim                                  # q / k norms
            if t.attention_bias:
                n += (2 * t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim + t.hidden_size
        out.append(n)
    return out


def text_linear_params_per_token(args: Any, st: ParamStats) -> int:
    """Decoder weights one token multiplies (lm_head and embedding excluded; the conv counts as its weights)."""
    n = sum(st.layer_dense) - sum(_non_matmul_per_layer(args))
    if st.num_experts:
        n += sum(st.layer_experts) * st.top_k // st.num_experts
    return n


def vision_linear_params(args: Any, st: ParamStats) -> tuple[int, int, int]:
    """-> (block matmul weights per patch over all blocks, patch-embedding weights, merger matmul weights per
    merged token: the final merger only)."""
    v = args.vision
    D, inner = v.hidden_size, v.intermediate_size
    block_non_matmul = 4 * D + (3 * D + D + inner + D)  # 2 LayerNorms (w, b) + qkv / proj / fc1 / fc2 biases
    blocks = sum(st.vision_block) - block_non_matmul * len(st.vision_block)
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    merged = D * v.spatial_merge_size ** 2
    return blocks, patch_dim * D, merged * merged + merged * v.out_hidden_size


def step_flops(args: Any, st: ParamStats, doc_lens: Sequence[int], vision_grid_thw: torch.Tensor | None = None,
               loss_tokens: int | None = None) -> StepFlops:
    """FLOPs of forward + backward over documents of ``doc_lens`` tokens (packed or not: no token mixer crosses
    documents) whose images / videos have ``vision_grid_thw`` [N, 3]. ``loss_tokens``: lm_head rows (default T)."""
    t, v = args.text, args.vision
    lens = [int(s) for s in doc_lens]
    T = sum(lens)
    n_tok = T if loss_tokens is None else int(loss_tokens)
    has_vision = v is not None and vision_grid_thw is not None and vision_grid_thw.numel() > 0
    sk = st.backward_skips(has_vision)
    text_linear = (6.0 * text_linear_params_per_token(args, st) - 2.0 * sk.text) * T
    lm_head = (6.0 * t.vocab_size * t.hidden_size - 2.0 * sk.lm_head) * n_tok
    padded = sum(CHUNK * math.ceil(s / CHUNK) for s in lens)
    passes = sk.mixer_passes(sk.text_mixer_forward_only, t.num_hidden_layers)
    full_passes = sum(n for i, n in enumerate(passes) if not t.is_linear(i))
    linear_passes = sum(n for i, n in enumerate(passes) if t.is_linear(i))
    text_attention = (2.0 * full_passes * t.num_attention_heads * t.head_dim * sum(s * s for s in lens)
                      + 2.0 * linear_passes * t.linear_num_value_heads * padded * gdn_macs_per_token_head(args))
    vision_linear = vision_attention = 0.0
    if has_vision:
        g = vision_grid_thw.detach().to("cpu", torch.int64).reshape(-1, 3)
        hw = g[:, 1] * g[:, 2]
        P = int((g[:, 0] * hw).sum())
        blocks, embed, merger = vision_linear_params(args, st)
        vision_linear = ((6.0 * blocks - 2.0 * sk.vision_blocks) * P + (4.0 * embed - 2.0 * sk.vision_embed) * P
                         + (6.0 * merger - 2.0 * sk.vision_mergers) * P / v.spatial_merge_size ** 2)
        v_passes = sum(sk.mixer_passes(sk.vision_mixer_forward_only, len(st.vision_block)))
        vision_attention = 4.0 * v_passes * v.hidden_size * float((g[:, 0] * hw * hw).sum())
    return StepFlops(text_linear, lm_head, text_attention, vision_linear, vision_attention)


def active_params_per_token(args: Any) -> float:
    """Decoder + lm_head matmul weights one token uses, from the dimensions alone (no module tree)."""
    t = args.text
    h, hd = t.hidden_size, t.head_dim
    full = h * hd * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) + t.num_attention_heads * hd * h
    linear = (h * (t.linear_conv_dim + t.linear_value_dim + 2 * t.linear_num_value_heads)
              + t.linear_conv_dim * t.linear_conv_kernel_dim + t.linear_value_dim * h)
    if t.is_moe:
        mlp = (t.num_experts_per_tok * 3 * h * t.moe_intermediate_size + h * t.num_experts
               + 3 * h * t.shared_expert_intermediate_size + h)
    else:
        mlp = 3 * h * t.intermediate_size
    n_lin = t.num_linear_layers
    return n_lin * linear + (t.num_hidden_layers - n_lin) * full + t.num_hidden_layers * mlp + h * t.vocab_size


def cost_coefficients(args: Any) -> tuple[float, float, float]:
    """``(a, b, c)`` of the balancing cost ``a * tokens + b * tokens^2 + c * vision_patches``
    (``rynnscale.data.balance``) in units of one token's decoder + lm_head matmul work: ``a`` adds the DeltaNet
    layers' delta-rule work per token (linear in length), ``b`` the full-attention layers' s^2 term, ``c`` the
    vision tower per patch."""
    t, v = args.text, args.vision
    n_active = active_params_per_token(args)
    gdn = t.num_linear_layers * t.linear_num_value_heads * gdn_macs_per_token_head(args)
    n_full = t.num_hidden_layers - t.num_linear_layers
    a = 1.0 + gdn / n_active
    b = n_full * t.num_attention_heads * t.head_dim / n_active
    if v is None:
        return a, b, 0.0
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    merged = v.hidden_size * v.spatial_merge_size ** 2
    n_vision = v.depth * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    n_vision += patch_dim * v.hidden_size + (merged * merged + merged * v.out_hidden_size) / v.spatial_merge_size ** 2
    return a, b, n_vision / n_active
