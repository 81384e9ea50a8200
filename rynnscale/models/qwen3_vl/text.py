"""Qwen3-VL text decoder (dense and MoE) over ONE packed row.

Same function and parameter names as transformers' ``Qwen3VLTextModel`` / ``Qwen3VLMoeTextModel``
(``embed_tokens``, ``layers.N.{self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, mlp.*,
input_layernorm, post_attention_layernorm}``, ``norm``), but on a packed [L, H] row: attention is
``varlen_attention`` over ``cu_seqlens`` (never across samples), MRoPE positions come from the batch
(restarting at 0 per sample), and there is no padding or batch dimension.

Generation (``cache``, a ``rynnscale.models.kv_cache.KVCache``): the row's documents continue the cache's
sequences (prefill: the prompts; decode: one token per sequence); each attention layer stores its keys /
values in the cache and attends over them (``LayerKV.attend``), everything else is the same code.

Pieces: RMSNorm (fp32 math, as HF), interleaved MRoPE (frequency j uses the H positions if
j % 3 == 1 and j < 3*mrope_section[1], the W positions if j % 3 == 2 and j < 3*mrope_section[2],
else the T positions), GQA with per-head q/k RMSNorm, SwiGLU MLP or ``SparseMoeBlock``, and
DeepStack: the vision tower's intermediate features are added to the hidden states at the visual
token positions after decoder layers 0..n-1.

Context parallelism: with ``cp`` (a ``rynnscale.parallel.context_parallel.CPShard``) the row given is this
rank's shard (its tokens of the padded row, positions and visual rows already sharded by the caller);
attention goes through ``cp.attention`` (Ulysses or ring over the CP group) with the padded row's
documents, and the MoE load-balancing statistics count only the real (not padding) tokens, normalised
by the whole row's length, so their sums over the CP group are the unsharded row's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from rynnscale.models.kv_cache import KVCache, LayerKV
from rynnscale.models.qwen3_vl.args import TextArgs
from rynnscale.models.qwen3_vl.moe import RouterStats, SparseMoeBlock
from rynnscale.ops import fused
from rynnscale.ops.attention import varlen_attention
from rynnscale.parallel.context_parallel import CPShard


class RMSNorm(nn.Module):
    """y = weight * (x / rms(x)) with the normalisation in fp32, cast back before the weight (HF).

    ``kernels``: ``rynnscale.ops.fused`` choice (set by ``Qwen3VLForConditionalGeneration.set_kernels``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.kernels = "torch"
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        backend = backend or fused.pick(self.kernels, x, params=(self.weight,))
        return fused.rms_norm(x, self.weight, self.eps, backend)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def mrope_inv_freq(args: TextArgs, device: torch.device | None = None) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim/2] fp32 (HF's default rope)."""
    D = args.head_dim
    return 1.0 / (args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))


def mrope_axis_of_freq(mrope_section: list[int], half_dim: int, device=None) -> torch.Tensor:
    """Which position row (0 = T, 1 = H, 2 = W) drives each of the head_dim/2 frequencies [half_dim]."""
    j = torch.arange(half_dim, device=device)
    is_h = (j % 3 == 1) & (j < 3 * mrope_section[1])
    is_w = (j % 3 == 2) & (j < 3 * mrope_section[2])
    return torch.where(is_h, 1, torch.where(is_w, 2, 0))  # (where, not a masked store: no host sync)


def mrope_cos_sin(position_ids_3l: torch.Tensor, args: TextArgs,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved-MRoPE cos/sin [L, head_dim] (rotate_half layout), computed in fp32, cast to ``dtype``."""
    device = position_ids_3l.device
    inv_freq_f = mrope_inv_freq(args, device)
    axis_f = mrope_axis_of_freq(args.mrope_section, inv_freq_f.numel(), device)
    # angle[l, j] = position[axis_j, l] * inv_freq[j]
    pos_lf = position_ids_3l.float().index_select(0, axis_f).t()
    angles_lf = pos_lf * inv_freq_f
    angles_ld = torch.cat([angles_lf, angles_lf], dim=-1)
    return angles_ld.cos().to(dtype), angles_ld.sin().to(dtype)


class Attention(nn.Module):
    """GQA self-attention with per-head q/k RMSNorm and MRoPE, varlen over the packed row."""

    def __init__(self, args: TextArgs, attn_backend: str = "auto"):
        super().__init__()
        H, D = args.hidden_size, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, D
        self.attn_backend = attn_backend
        self.kernels = "torch"
        self.q_proj = nn.Linear(H, self.num_heads * D, bias=args.attention_bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=args.attention_bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=args.attention_bias)
        self.q_norm = RMSNorm(D, args.rms_norm_eps)
        self.k_norm = RMSNorm(D, args.rms_norm_eps)

    def forward(self, x_lh: torch.Tensor, cos_ld: torch.Tensor, sin_ld: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int, cp: CPShard | None = None,
                cache: LayerKV | None = None) -> torch.Tensor:
        L = x_lh.shape[0]
        q_lhd = self.q_proj(x_lh).view(L, self.num_heads, self.head_dim)
        k_lhd = self.k_proj(x_lh).view(L, self.num_kv_heads, self.head_dim)
        v_lhd = self.v_proj(x_lh).view(L, self.num_kv_heads, self.head_dim)
        # one backend for the q/k norms AND the rotary: liger's RoPE writes into q/k in place, which
        # is only safe on the outputs of liger's RMSNorm (it saves its input, not its output)
        backend = fused.pick(self.kernels, q_lhd, k_lhd,
                             params=(self.q_norm.weight, self.k_norm.weight, cos_ld, sin_ld))
        q_lhd, k_lhd = self.q_norm(q_lhd, backend), self.k_norm(k_lhd, backend)
        q_lhd, k_lhd = fused.rotary_qk(q_lhd, k_lhd, cos_ld, sin_ld, backend)
        if cache is not None:
            o_lhd = cache.attend(q_lhd, k_lhd, v_lhd, backend=self.attn_backend)
        elif cp is not None:
            o_lhd = cp.attention(q_lhd, k_lhd, v_lhd, backend=self.attn_backend)
        else:
            o_lhd = varlen_attention(q_lhd, k_lhd, v_lhd, cu_seqlens, max_seqlen, causal=True,
                                     backend=self.attn_backend)
        return self.o_proj(o_lhd.reshape(L, self.num_heads * self.head_dim))


class DenseMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: TextArgs):
        super().__init__()
        if args.hidden_act != "silu":
            raise ValueError(f"text_config.hidden_act={args.hidden_act!r} is not supported; allowed: 'silu'")
        self.kernels = "torch"
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(fused.silu_mul(gate, up, fused.pick(self.kernels, gate, up)))


class DecoderLayer(nn.Module):
    """Pre-norm block; the unit that activation checkpointing and FSDP wrap.

    ``forward(...) -> (h_lh, RouterStats | None)``."""

    def __init__(self, args: TextArgs, layer_idx: int, attn_backend: str = "auto", gemm_backend: str = "auto"):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = args.layer_is_moe(layer_idx)
        self.self_attn = Attention(args, attn_backend)
        self.mlp = SparseMoeBlock(args, gemm_backend) if self.is_moe else DenseMLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h_lh: torch.Tensor, cos_ld: torch.Tensor, sin_ld: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int, cp: CPShard | None = None,
                cache: LayerKV | None = None) -> tuple[torch.Tensor, RouterStats | None]:
        h_lh = h_lh + self.self_attn(self.input_layernorm(h_lh), cos_ld, sin_ld, cu_seqlens, max_seqlen, cp, cache)
        x_lh = self.post_attention_layernorm(h_lh)
        if self.is_moe:
            if cp is None:
                y_lh, stats = self.mlp(x_lh)
            else:
                y_lh, stats = self.mlp(x_lh, valid_t=cp.valid(x_lh.device), row_tokens=cp.plan.length)
            return h_lh + y_lh, stats
        return h_lh + self.mlp(x_lh), None


class TextModel(nn.Module):
    """Decoder stack (HF: ``model.language_model``).

    ``forward(inputs_embeds_lh, position_ids_3l, cu_seqlens, max_seqlen, visual_idx_v, deepstack)``
    -> ``(hidden_lh final-normed, [RouterStats per MoE layer])``. ``deepstack`` is a list of [V, H]
    features added at rows ``visual_idx_v`` [V] after layers 0..len-1. ``cp``: the row is this rank's
    context-parallel shard; ``cache``: the row continues the cache's sequences (the module docstring)."""

    def __init__(self, args: TextArgs, attn_backend: str = "auto", gemm_backend: str = "auto"):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(args, i, attn_backend, gemm_backend) for i in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        inputs_embeds_lh: torch.Tensor,
        position_ids_3l: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        visual_idx_v: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | None = None,
        cp: CPShard | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, list[RouterStats]]:
        if deepstack and len(deepstack) > len(self.layers):
            raise ValueError(f"{len(deepstack)} deepstack features but only {len(self.layers)} decoder layers")
        if cache is not None and cp is not None:
            raise ValueError("a KV-cache forward (generation) runs whole rows: context parallelism must be off")
        cos_ld, sin_ld = mrope_cos_sin(position_ids_3l, self.args, inputs_embeds_lh.dtype)
        h_lh = inputs_embeds_lh
        stats: list[RouterStats] = []
        for i, layer in enumerate(self.layers):
            if cache is not None:
                h_lh, layer_stats = layer(h_lh, cos_ld, sin_ld, cu_seqlens, max_seqlen, cache=cache.layer(i))
            elif cp is None:
                h_lh, layer_stats = layer(h_lh, cos_ld, sin_ld, cu_seqlens, max_seqlen)
            else:
                h_lh, layer_stats = layer(h_lh, cos_ld, sin_ld, cu_seqlens, max_seqlen, cp=cp)
            if layer_stats is not None:
                stats.append(layer_stats)
            if deepstack and i < len(deepstack):
                h_lh = h_lh.index_add(0, visual_idx_v, deepstack[i].to(h_lh.dtype))
        return self.norm(h_lh), stats
