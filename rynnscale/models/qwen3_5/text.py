"""Qwen3.5 hybrid text decoder (dense and MoE) over ONE packed row.

Same function and parameter names as transformers' ``Qwen3_5TextModel`` / ``Qwen3_5MoeTextModel``
(``embed_tokens``, ``layers.N.{linear_attn.* | self_attn.*, mlp.*, input_layernorm, post_attention_layernorm}``,
``norm``), on a packed [L, H] row: no padding or batch dimension; every token mixer restarts at each document of
``cu_seqlens``.

Generation (``cache``, a ``rynnscale.models.qwen3_5.cache.HybridCache``): the row's documents continue the cache's
sequences; a full-attention layer stores its keys / values and attends over them (``LayerKV.attend``, as
Qwen3-VL's), a DeltaNet layer continues each sequence's convolution window and recurrent state
(``LinearState.conv`` / ``delta_rule``); everything else is the same code.

Per layer (``layer_types``) the token mixer is one of
- ``GatedDeltaNet`` (``linear_attention``): projections ``in_proj_qkv`` / ``in_proj_z`` / ``in_proj_b`` /
  ``in_proj_a``, the causal depthwise ``conv1d`` (+ SiLU) over q|k|v, the gated delta rule with
  ``beta = sigmoid(b)`` and log-decay ``g = -exp(A_log) * softplus(a + dt_bias)``, then ``norm`` (RMSNorm of
  each value head times SiLU(z)) and ``out_proj`` (``gated_delta.py`` has the sequence operations);
- ``GatedAttention`` (``full_attention``): GQA with per-head q/k RMSNorm, partial interleaved MRoPE (the first
  ``rotary_dim`` dims of each head), and an output gate: ``q_proj`` yields [q | gate] per head and the attention
  output is multiplied by ``sigmoid(gate)`` before ``o_proj``.
The MLP is SwiGLU (dense) or ``SharedExpertMoeBlock``: Qwen3-VL-MoE's routed experts (``qwen3_vl/moe.py``, top-k
renormalised) plus a shared SwiGLU expert scaled by ``sigmoid(shared_expert_gate(x))``.

Every RMSNorm except the DeltaNet output norm is zero-centred: ``y = x / rms(x) * (1 + weight)`` in fp32, cast
back once (weights initialised to 0); the DeltaNet's ``norm`` is ``weight * (x / rms(x))`` (weights 1).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rynnscale.models.kv_cache import LayerKV
from rynnscale.models.qwen3_5 import cp as cp_scan
from rynnscale.models.qwen3_5 import gated_delta
from rynnscale.models.qwen3_5.args import TextArgs
from rynnscale.models.qwen3_5.cache import HybridCache, LinearState
from rynnscale.models.qwen3_vl.moe import RouterStats, SparseMoeBlock
from rynnscale.models.qwen3_vl.text import mrope_axis_of_freq
from rynnscale.ops import fused
from rynnscale.ops.attention import varlen_attention
from rynnscale.parallel.context_parallel import CPShard


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: ``(x / rms(x)) * (1 + weight)`` in fp32, cast to x's dtype (transformers'
    ``Qwen3_5RMSNorm``; ``weight`` starts at 0)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class RMSNormGated(nn.Module):
    """``weight * (x / rms(x)) * silu(gate)`` over each value head (transformers' ``Qwen3_5RMSNormGated``): the
    normalisation in fp32 cast back before the weight, the gate in fp32, the result in x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return (self.weight * y * F.silu(gate.float())).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` (the dense MLP and the shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.kernels = "torch"
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(fused.silu_mul(gate, up, fused.pick(self.kernels, gate, up)))


class SharedExpertMoeBlock(SparseMoeBlock):
    """Routed experts (Qwen3-VL-MoE's block: router, grouped experts, dispatch / combine, expert parallelism on
    ``experts`` only) + a shared SwiGLU expert gated per token: ``y = moe(x) + sigmoid(x @ w_g) * shared(x)``.
    The shared expert is a dense part of the decoder layer (replicated / FSDP-sharded with it, never split
    over EP ranks). ``forward(x_th, valid_t=None, row_tokens=None) -> (y_th, RouterStats)``."""

    def __init__(self, args: TextArgs, gemm_backend: str = "auto"):
        super().__init__(args, gemm_backend)
        self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def forward(self, x_th: torch.Tensor, valid_t: torch.Tensor | None = None,
                row_tokens: int | None = None) -> tuple[torch.Tensor, RouterStats]:
        y_th, stats = super().forward(x_th, valid_t, row_tokens)
        shared_th = torch.sigmoid(self.shared_expert_gate(x_th)) * self.shared_expert(x_th)
        return y_th + shared_th, stats


def mrope_cos_sin(position_ids_3l: torch.Tensor, args: TextArgs,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved-MRoPE cos/sin [L, rotary_dim] (rotate_half layout) of the rotated part of each head, computed
    in fp32 and cast to ``dtype`` (transformers' ``Qwen3_5TextRotaryEmbedding``)."""
    R = args.rotary_dim
    device = position_ids_3l.device
    inv_freq_f = 1.0 / (args.rope_theta ** (torch.arange(0, R, 2, dtype=torch.float32, device=device) / R))
    axis_f = mrope_axis_of_freq(args.mrope_section, inv_freq_f.numel(), device)
    angles_lf = position_ids_3l.float().index_select(0, axis_f).t() * inv_freq_f
    angles_lr = torch.cat([angles_lf, angles_lf], dim=-1)
    return angles_lr.cos().to(dtype), angles_lr.sin().to(dtype)


def partial_rotary(x_lhd: torch.Tensor, cos_lr: torch.Tensor, sin_lr: torch.Tensor) -> torch.Tensor:
    """RoPE of the first ``rotary_dim`` dims of each head; the rest passes through."""
    R = cos_lr.shape[-1]
    return torch.cat([fused.rotary(x_lhd[..., :R], cos_lr, sin_lr), x_lhd[..., R:]], dim=-1)


class GatedAttention(nn.Module):
    """Full (softmax) attention with an output gate, varlen over the packed row (module docstring)."""

    def __init__(self, args: TextArgs, attn_backend: str = "auto"):
        super().__init__()
        H, D = args.hidden_size, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, D
        self.attn_backend = attn_backend
        self.q_proj = nn.Linear(H, self.num_heads * D * 2, bias=args.attention_bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=args.attention_bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=args.attention_bias)
        self.q_norm = RMSNorm(D, args.rms_norm_eps)
        self.k_norm = RMSNorm(D, args.rms_norm_eps)

    def forward(self, x_lh: torch.Tensor, cos_lr: torch.Tensor, sin_lr: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int, cp: CPShard | None = None,
                cache: LayerKV | None = None) -> torch.Tensor:
        L, D = x_lh.shape[0], self.head_dim
        qg_lh2d = self.q_proj(x_lh).view(L, self.num_heads, 2 * D)
        q_lhd, gate_lhd = qg_lh2d[..., :D], qg_lh2d[..., D:]
        q_lhd = partial_rotary(self.q_norm(q_lhd), cos_lr, sin_lr)
        k_lhd = partial_rotary(self.k_norm(self.k_proj(x_lh).view(L, self.num_kv_heads, D)), cos_lr, sin_lr)
        v_lhd = self.v_proj(x_lh).view(L, self.num_kv_heads, D)
        if cache is not None:
            o_lhd = cache.attend(q_lhd, k_lhd, v_lhd, backend=self.attn_backend)
        elif cp is not None:
            o_lhd = cp.attention(q_lhd, k_lhd, v_lhd, backend=self.attn_backend)
        else:
            o_lhd = varlen_attention(q_lhd, k_lhd, v_lhd, cu_seqlens, max_seqlen, causal=True,
                                     backend=self.attn_backend)
        o_lh = o_lhd.reshape(L, self.num_heads * D) * torch.sigmoid(gate_lhd.reshape(L, self.num_heads * D))
        return self.o_proj(o_lh)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet linear attention (module docstring) over the documents of a packed row.

    ``kernels`` (``model.kernels``, set by ``CausalLM.set_kernels``): ``auto`` runs flash-linear-attention and
    causal-conv1d where they apply (CUDA, installed), else the plain PyTorch path; ``torch`` always the latter."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.num_k_heads, self.num_v_heads = args.linear_num_key_heads, args.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = args.linear_key_head_dim, args.linear_value_head_dim
        self.key_dim, self.value_dim = args.linear_key_dim, args.linear_value_dim
        self.conv_dim = args.linear_conv_dim
        self.kernels = "torch"
        H = args.hidden_size
        # depthwise; only its weight [C, 1, K] is used (the varlen convolution is ours)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, args.linear_conv_kernel_dim, groups=self.conv_dim,
                                bias=False, padding=args.linear_conv_kernel_dim - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = RMSNormGated(self.head_v_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, H, bias=False)
        self.in_proj_qkv = nn.Linear(H, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(H, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(H, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(H, self.num_v_heads, bias=False)

    def forward(self, x_lh: torch.Tensor, cu_seqlens: torch.Tensor, cp: CPShard | None = None,
                cache: LinearState | None = None) -> torch.Tensor:
        """``x_lh`` [L, H] of the row (``cu_seqlens``: its documents), or under context parallelism this rank's
        shard (``cp``; ``cu_seqlens`` is then ignored: the runs of the shard come from the plan, ``cp.py``).
        ``cache`` (generation): the documents continue the cache's sequences (window and state)."""
        L = x_lh.shape[0]
        fla = gated_delta.pick_backend(self.kernels, x_lh) == "fla"
        conv = gated_delta.fla_causal_conv1d if fla else gated_delta.causal_conv1d
        rule = gated_delta.fla_gated_delta_rule if fla else gated_delta.chunk_gated_delta_rule
        qkv_lc = self.in_proj_qkv(x_lh)
        weight_ck = self.conv1d.weight[:, 0]
        if cache is not None:
            qkv_lc = cache.conv(qkv_lc, weight_ck, cu_seqlens, conv)
        elif cp is None:
            qkv_lc = conv(qkv_lc, weight_ck, cu_seqlens)
        else:   # each run starts from the convolution inputs / state the runs before it leave (on other ranks)
            lay = cp_scan.run_layout(cp)
            cu_seqlens = lay.local_cu_seqlens(cp.rank)
            context = cp_scan.conv_context(qkv_lc, lay, cp, weight_ck.shape[1] - 1)
            qkv_lc = gated_delta.causal_conv1d(qkv_lc, weight_ck, cu_seqlens, initial_ntc=context)
        q_lc, k_lc, v_lc = qkv_lc.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        beta_lh = torch.sigmoid(self.in_proj_b(x_lh))
        g_lh = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x_lh).float() + self.dt_bias)
        q_lhk = q_lc.reshape(L, self.num_k_heads, self.head_k_dim)
        k_lhk = k_lc.reshape(L, self.num_k_heads, self.head_k_dim)
        v_lhv = v_lc.reshape(L, self.num_v_heads, self.head_v_dim)
        initial = None
        if cp is not None:
            initial = cp_scan.initial_states(rule, q_lhk, k_lhk, v_lhv, g_lh, beta_lh, cu_seqlens, lay, cp)
        if cache is not None:
            o_lhv = cache.delta_rule(q_lhk, k_lhk, v_lhv, g_lh, beta_lh, cu_seqlens, rule)
        else:
            o_lhv, _ = rule(q_lhk, k_lhk, v_lhv, g_lh, beta_lh, cu_seqlens, initial_state=initial)
        z_lhv = self.in_proj_z(x_lh).view(L, self.num_v_heads, self.head_v_dim)
        return self.out_proj(self.norm(o_lhv, z_lhv).reshape(L, self.value_dim))


class DecoderLayer(nn.Module):
    """Pre-norm hybrid block; the unit that activation checkpointing and FSDP wrap.
    ``forward(...) -> (h_lh, RouterStats | None)``."""

    def __init__(self, args: TextArgs, layer_idx: int, attn_backend: str = "auto", gemm_backend: str = "auto"):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = args.layer_types[layer_idx]
        self.is_moe = args.is_moe
        if args.is_linear(layer_idx):
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = GatedAttention(args, attn_backend)
        self.mlp = SharedExpertMoeBlock(args, gemm_backend) if self.is_moe else MLP(args.hidden_size,
                                                                                   args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h_lh: torch.Tensor, cos_lr: torch.Tensor, sin_lr: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int, cp: CPShard | None = None,
                cache: LayerKV | LinearState | None = None) -> tuple[torch.Tensor, RouterStats | None]:
        x_lh = self.input_layernorm(h_lh)
        if self.layer_type == "linear_attention":
            h_lh = h_lh + self.linear_attn(x_lh, cu_seqlens, cp, cache)
        else:
            h_lh = h_lh + self.self_attn(x_lh, cos_lr, sin_lr, cu_seqlens, max_seqlen, cp, cache)
        x_lh = self.post_attention_layernorm(h_lh)
        if self.is_moe:
            if cp is None:
                y_lh, stats = self.mlp(x_lh)
            else:
                y_lh, stats = self.mlp(x_lh, valid_t=cp.valid(x_lh.device), row_tokens=cp.plan.length)
            return h_lh + y_lh, stats
        return h_lh + self.mlp(x_lh), None


class TextModel(nn.Module):
    """Decoder stack (HF: ``model.language_model`` of the vision-language model, ``model`` of the text-only one).

    ``forward(inputs_embeds_lh, position_ids_3l, cu_seqlens, max_seqlen, visual_idx_v=None, deepstack=None,
    cp=None, cache=None) -> (hidden_lh final-normed, [RouterStats per MoE layer])``; the Qwen3-VL signature, whose
    DeepStack features Qwen3.5 does not have (must be empty). ``cache``: a ``HybridCache`` (module docstring)."""

    def __init__(self, args: TextArgs, attn_backend: str = "auto", gemm_backend: str = "auto"):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(args, i, attn_backend, gemm_backend) for i in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, inputs_embeds_lh: torch.Tensor, position_ids_3l: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int, visual_idx_v: torch.Tensor | None = None,
                deepstack: list[torch.Tensor] | None = None,
                cp: CPShard | None = None, cache: HybridCache | None = None) -> tuple[torch.Tensor, list[RouterStats]]:
        if deepstack:
            raise ValueError(f"Qwen3.5 has no DeepStack injection; got {len(deepstack)} DeepStack features")
        if cache is not None and cp is not None:
            raise ValueError("a cached forward (generation) runs whole rows: context parallelism must be off")
        cos_lr, sin_lr = mrope_cos_sin(position_ids_3l, self.args, inputs_embeds_lh.dtype)
        h_lh = inputs_embeds_lh
        stats: list[RouterStats] = []
        for i, layer in enumerate(self.layers):
            if cache is not None:
                h_lh, layer_stats = layer(h_lh, cos_lr, sin_lr, cu_seqlens, max_seqlen, cache=cache.layer(i))
            elif cp is None:
                h_lh, layer_stats = layer(h_lh, cos_lr, sin_lr, cu_seqlens, max_seqlen)
            else:
                h_lh, layer_stats = layer(h_lh, cos_lr, sin_lr, cu_seqlens, max_seqlen, cp=cp)
            if layer_stats is not None:
                stats.append(layer_stats)
        return self.norm(h_lh), stats
