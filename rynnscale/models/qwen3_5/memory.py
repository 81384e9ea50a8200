"""What a Qwen3.5 decoder layer saves for backward (the planner's activation term, ``ModelSpec.layer_activation_bytes``),
and what a DeltaNet layer adds and sends under context parallelism (``cp_layer_bytes`` / ``cp_layer_traffic``).

Counted from the code of ``text.py`` / ``gated_delta.py`` (``cpu`` profile: the plain PyTorch path, checked against
saved-tensor hooks and against measured CPU steps by tests/plan/test_qwen35_memory.py) and, for the ``gpu``
profile, from what flash-linear-attention's and causal-conv1d's autograd functions keep (stated assumptions
below). Per token of the row, ``a`` = activation bytes, fp32 = 4:

- each RMSNorm (zero-centred, fp32 math): its fp32 input and fp32 normalised value, + rstd: 8 H + 4;
- full-attention mixer: q_proj output [q | gate] (2 qd), normed and rotated q (2 qd), gate sigmoid and the gated
  product (2 qd), attention output (qd), k normed / rotated and v (3 kvd), the input (H); the per-document CPU
  loop also keeps its per-document q and output (qd + kvd); flash keeps the fp32 log-sum-exp per head;
- Gated DeltaNet mixer, ``cpu``: the projections (q|k|v before / after the convolution, its K-1 shifted copies and
  SiLU input: 5 conv_dim; z, the gated norm's input / normalised value / gate / product: 6 value_dim; the q and k
  heads expanded to the value heads: 2 Hv dk; b, a, beta, g: 6 Hv) + the chunked rule per chunk-padded token and
  value head: five C x C matrices per chunk (decays, beta K K^T, Q K^T and two products: 5 C), the solve's right-
  and left-hand sides and U / W (8 dk + 2 dv), the state entering each chunk (dk dv / C), in fp32;
  ``gpu`` (fla + causal-conv1d): q|k|v before and after the convolution (2 conv_dim), z and the gated norm's saved
  tensors (4 value_dim), b / a / beta (3 Hv) in the activation dtype, g in fp32, and fla's A (C per token and value
  head, fp32); fla recomputes the chunk states in backward (``layer_backward_bytes``);
- MLP: dense SwiGLU gate / up / product + input; MoE: Qwen3-VL-MoE's routed block (router fp32 probabilities, the
  k sorted token copies, gate_up, SwiGLU and weighted products, int64 indices) + the shared expert (its gate / up
  / product and the sigmoid gate and gated product).
"""

from __future__ import annotations

import math
from typing import Any

from rynnscale.models.qwen3_5.gated_delta import CHUNK


def _padded(tokens: int, doc_tokens: int) -> int:
    """Tokens after padding every document of ``doc_tokens`` to whole chunks."""
    full, rest = divmod(tokens, max(doc_tokens, 1))
    return full * CHUNK * math.ceil(doc_tokens / CHUNK) + CHUNK * math.ceil(rest / CHUNK)


def _rule_bytes_per_padded_token(t: Any, dv: int) -> float:
    """What the plain PyTorch chunked rule saves per chunk-padded token with values ``dv`` wide (module docstring)."""
    C, dk = CHUNK, t.linear_key_head_dim
    return 4 * t.linear_num_value_heads * (5 * C + 8 * dk + 2 * dv + dk * dv / C)


def _mlp_bytes(t: Any, a: int, ep: int) -> float:
    if not t.is_moe:
        return (3 * t.intermediate_size + t.hidden_size) * a
    k, MI, H, S = t.num_experts_per_tok, t.moe_intermediate_size, t.hidden_size, t.shared_expert_intermediate_size
    rows = (2 * k * H + 3 * k * MI) if ep > 1 else (k * H + 4 * k * MI)
    routed = rows * a + t.num_experts * 4 + 5 * k * 8 + 3 * k * a
    return routed + (3 * S + 2 * H) * a


def layer_activation_bytes(args: Any, layer_idx: int, profile: Any, ep: int, tokens: int, doc_tokens: int) -> float:
    """Bytes decoder layer ``layer_idx`` saves for backward over ``tokens`` tokens in documents of ``doc_tokens``
    (module docstring); ``profile``: the planner's (``act_bytes``, ``attention``: flash | loop | math)."""
    t = args.text
    a, H = profile.act_bytes, t.hidden_size
    norms = 2 * (8 * H + 4)
    if t.is_linear(layer_idx):
        C, Hv, dk, dv = CHUNK, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim
        if profile.attention == "flash":   # the GPU profile: fla + causal-conv1d
            mixer = (2 * t.linear_conv_dim + 4 * t.linear_value_dim + 3 * Hv + H) * a + Hv * (4 + 4 * C)
            rule = 0.0
        else:
            mixer = (5 * t.linear_conv_dim + 6 * t.linear_value_dim + 2 * Hv * dk + 6 * Hv + H) * 4
            rule = _rule_bytes_per_padded_token(t, dv) * _padded(tokens, doc_tokens)
        return (norms + mixer + _mlp_bytes(t, a, ep)) * tokens + rule
    qd, kvd, nh = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim, t.num_attention_heads
    mixer = (7 * qd + 3 * kvd + H) * a
    if profile.attention == "flash":
        mixer += nh * 4
    else:
        mixer += (qd + kvd) * a
    s2 = 0.0
    if profile.attention == "math" and tokens:
        full, rest = divmod(tokens, max(doc_tokens, 1))
        s2 = nh * a * (full * doc_tokens ** 2 + rest ** 2)
    return (norms + mixer + _mlp_bytes(t, a, ep)) * tokens + s2


def layer_backward_bytes(args: Any, layer_idx: int, profile: Any, tokens: int, doc_tokens: int) -> float:
    """Transient bytes of one DeltaNet layer's backward beyond what it saved: on the GPU path fla recomputes the
    state entering every chunk (fp32 [Hv, dk, dv] per chunk); 0 for other layers / the CPU path (counted saved)."""
    t = args.text
    if not t.is_linear(layer_idx) or profile.attention != "flash":
        return 0.0
    states = _padded(tokens, doc_tokens) / CHUNK
    return states * t.linear_num_value_heads * t.linear_key_head_dim * t.linear_value_head_dim * 4


def _doc_lens(row_tokens: int, doc_tokens: int) -> list[int]:
    full, rest = divmod(row_tokens, max(min(doc_tokens or row_tokens, row_tokens), 1))
    return [min(doc_tokens or row_tokens, row_tokens)] * full + ([rest] if rest else [])


def cp_layer_bytes(args: Any, layer_idx: int, profile: Any, cp: int, row_tokens: int,
                   doc_tokens: int) -> tuple[float, float] | None:
    """(bytes saved for backward, transient bytes of its backward) that DeltaNet layer ``layer_idx`` adds on rank 0 (the
    rank with the most runs) under context parallelism ``cp`` (``cp.py``), beyond ``layer_activation_bytes`` /
    ``layer_backward_bytes`` over the rank's ``row_tokens / cp`` tokens in documents of ``doc_tokens`` (0: the row);
    None for a full-attention layer (the planner's Ulysses / ring count). Rank 0 holds two runs of about
    ``n / (2 cp)`` tokens of each document of n tokens:

    - saved: the chunked rule pads every run, not every document, to whole chunks (``cpu``); the convolution runs
      on the runs with their K-1 context rows prepended (the extended input, its K-1 shifted copies and the SiLU
      input; on the GPU too: the plain PyTorch convolution, not causal-conv1d's); the scan keeps ``2 cp - 3`` maps' worth
      (``P`` [Hv, dk, dk] + the state it multiplies [Hv, dk, dv], fp32) per document;
    - backward: the two map passes recomputed while the layer's backward runs (``cpu``: both passes' chunk tensors,
      the identity states and zero values; ``gpu``: fla's A of both passes, the zero values, the identity states and
      the chunk states fla recomputes for the dk-wide pass), on the GPU the chunk states of the runs' padding, and
      the gradient of the gathered maps of all ``docs (2 cp - 1)`` runs with its all-reduced copy (two fp32 buffers;
      counted, not measured)."""
    t = args.text
    if cp <= 1 or not t.is_linear(layer_idx):
        return None
    C, K, Cd = CHUNK, t.linear_conv_kernel_dim, t.linear_conv_dim
    Hv, dk, dv = t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim
    docs = _doc_lens(row_tokens, doc_tokens)
    T = -(-row_tokens // cp)
    runs = 2 * len(docs)
    padded_runs = sum(2 * C * math.ceil(n / (2 * cp) / C) for n in docs)
    padded_docs = _padded(T, min(doc_tokens or T, T))
    ext_rows = T + runs * (K - 1)
    maps = len(docs) * max(2 * cp - 3, 0) * Hv * dk * (dk + dv) * 4
    eye = runs * Hv * dk * dk * 4
    maps_grad = 2 * len(docs) * (2 * cp - 1) * Hv * dk * (dk + dv) * 4
    if profile.attention == "flash":   # the GPU profile: fla + causal-conv1d outside CP
        a = profile.act_bytes
        saved = ((K + 1) * ext_rows - T) * Cd * a + maps   # its K + 1 copies replace causal-conv1d's saved input
        backward = (2 * T * Hv * C * 4 + T * Hv * dk * a + eye + padded_runs / C * Hv * dk * dk * 4
                    + max(padded_runs - padded_docs, 0) / C * Hv * dk * dv * 4 + maps_grad)
        return saved, backward
    saved = (_rule_bytes_per_padded_token(t, dv) * (padded_runs - padded_docs)
             + (K * runs * (K - 1) + ext_rows) * Cd * 4 + maps)
    backward = ((_rule_bytes_per_padded_token(t, dv) + _rule_bytes_per_padded_token(t, dk)) * padded_runs
                + eye + T * Hv * dk * 4 + maps_grad)
    return saved, backward


def cp_layer_traffic(args: Any, layer_idx: int, cp: int, row_tokens: int, doc_tokens: int, recompute: bool,
                     act_bytes: int = 2) -> float | None:
    """Bytes one rank sends for DeltaNet layer ``layer_idx`` under context parallelism (``cp.py``; one micro-batch,
    forward + backward, + the recomputed forward under full checkpointing), None for a full-attention layer (the
    planner's Ulysses / ring count): each zigzag run's state map (fp32 [Hv, dk, dk + dv]) and its last K-1
    convolution inputs are all-gathered ((cp-1)/cp of them leave a rank), their gradients all-reduced in backward
    (2 (cp-1)/cp). A document of ``doc_tokens`` (0: the row) has 2 cp - 1 runs (the two middle chunks are one run of
    rank cp - 1)."""
    t = args.text
    if not t.is_linear(layer_idx):
        return None
    if cp <= 1:
        return 0.0
    runs = len(_doc_lens(row_tokens, doc_tokens)) * (2 * cp - 1)
    Hv, dk, dv = t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim
    per_run = Hv * dk * (dk + dv) * 4 + (t.linear_conv_kernel_dim - 1) * t.linear_conv_dim * act_bytes
    return runs * per_run * (cp - 1) / cp * ((2 if recompute else 1) + 2)
