"""Generation cache of the Qwen3.5 hybrid decoder: keys / values of its full-attention layers, the recurrent state
and the convolution window of its Gated DeltaNet layers, for B sequences.

``HybridCache`` speaks ``KVCache``'s protocol (``begin`` / ``end`` / ``abort``, ``continuing``, ``mode``,
``repeat_interleave(g)``, ``layer(i)``; ``rynnscale.models.kv_cache``), so ``models/generate.py`` drives it
unchanged: the packed row's document i continues sequence i. ``layer(i)`` is
- a full-attention layer: ``LayerKV`` of the inner ``KVCache`` (one slot per full-attention layer), used exactly as
  Qwen3-VL's attention uses it;
- a DeltaNet layer: ``LinearState``, holding per sequence the state S [Hv, dk, dv] (fp32, or float64 for a float64
  model: the rule's compute dtype) and the last K-1 inputs of the causal convolution [K-1, C] (zeros before the
  sequence's start). The layer hands it its convolution and its delta rule:
  - prefill (every sequence empty): the training forward's own convolution and chunked rule over the packed row
    (logits bitwise the full forward's), asked for each document's final state; the last K-1 inputs of each
    document are kept;
  - decode (one token per sequence): the convolution over the cached K-1 inputs + the new one (the same sum, in
    the same order, as ``gated_delta.causal_conv1d``) and one recurrent step of the rule from the cached state
    (``gated_delta.recurrent_gated_delta_step``: the definition's update, as transformers decodes);
  - extend (several tokens after a non-empty cache): the convolution continued from the cached inputs
    (``causal_conv1d(initial_ntc=...)``) and the chunked rule from the cached states.
The new states of a forward are staged and become the sequences' at ``end`` (``abort`` forgets them), so a forward
that fails part-way leaves the cache as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from rynnscale.models.kv_cache import KVCache, LayerKV
from rynnscale.models.qwen3_5 import gated_delta


class HybridCache:
    """The cache of ``batch_size`` sequences of up to ``capacity`` tokens through the layers ``layer_types``
    (``full_attention`` / ``linear_attention``; module docstring)."""

    def __init__(self, layer_types: Sequence[str], batch_size: int, capacity: int):
        bad = sorted({t for t in layer_types} - {"full_attention", "linear_attention"})
        if bad:
            raise ValueError(f"HybridCache: unknown layer type(s) {bad}")
        self.layer_types = list(layer_types)
        full = [i for i, t in enumerate(self.layer_types) if t == "full_attention"]
        self._slot = {i: j for j, i in enumerate(full)}
        # the inner KVCache also keeps the lengths and the step's shape; one (unused) slot when no layer attends
        self.kv = KVCache(max(1, len(full)), batch_size, capacity)
        n = len(self.layer_types)
        self.state: list[torch.Tensor | None] = [None] * n    # DeltaNet layers: [B, Hv, dk, dv]
        self.conv: list[torch.Tensor | None] = [None] * n     # DeltaNet layers: [B, K-1, C]
        self._staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bounds: list[int] = []

    # ------------------------------------------------------------------ KVCache's view
    @property
    def batch_size(self) -> int:
        return self.kv.batch_size

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    @property
    def lengths(self) -> list[int]:
        return self.kv.lengths

    @property
    def continuing(self) -> bool:
        return self.kv.continuing

    @property
    def mode(self) -> str | None:
        return self.kv.mode

    # ------------------------------------------------------------------ one forward
    def begin(self, cu_seqlens: torch.Tensor, device: torch.device) -> None:
        self.kv.begin(cu_seqlens, device)
        self._bounds = [int(x) for x in cu_seqlens.tolist()]
        self._staged = {}

    def end(self) -> None:
        missing = [i for i, t in enumerate(self.layer_types) if t == "linear_attention" and i not in self._staged]
        if missing:
            self.abort()
            raise RuntimeError(f"HybridCache.end: DeltaNet layer(s) {missing[:5]} did not run in this forward")
        self.kv.end()
        for i, (state, conv) in self._staged.items():
            self.state[i], self.conv[i] = state, conv
        self._staged = {}

    def abort(self) -> None:
        self.kv.abort()
        self._staged = {}

    def layer(self, i: int) -> LayerKV | LinearState:
        if self.layer_types[i] == "full_attention":
            return self.kv.layer(self._slot[i])
        return LinearState(self, i)

    # ------------------------------------------------------------------ G samples per prompt
    def repeat_interleave(self, g: int) -> None:
        """Sequence i becomes sequences i*g .. i*g+g-1 (same keys / values, states and windows), in place."""
        self.kv.repeat_interleave(g)   # checks g and that no forward is running
        if g > 1:
            self.state = [None if t is None else t.repeat_interleave(g, dim=0) for t in self.state]
            self.conv = [None if t is None else t.repeat_interleave(g, dim=0) for t in self.conv]

    # ------------------------------------------------------------------ one DeltaNet layer
    def _mode(self) -> str:
        mode = self.kv.mode
        if mode is None:
            raise RuntimeError("HybridCache: a DeltaNet layer ran outside begin() / end()")
        return mode

    def _conv(self, i: int, x_tc: torch.Tensor, weight_ck: torch.Tensor, cu_seqlens: torch.Tensor,
              prefill_conv: Callable[..., torch.Tensor]) -> torch.Tensor:
        mode, W = self._mode(), weight_ck.shape[1] - 1
        B, C = self.batch_size, x_tc.shape[1]
        old = self.conv[i] if mode != "prefill" else None
        if old is None:
            old = x_tc.new_zeros(B, W, C)
        if mode == "prefill":
            y_tc = prefill_conv(x_tc, weight_ck, cu_seqlens)
        elif mode == "decode":
            y_tc = decode_conv(x_tc, old, weight_ck)
        else:
            y_tc = gated_delta.causal_conv1d(x_tc, weight_ck, cu_seqlens, initial_ntc=old)
        if mode == "decode":
            tail = torch.cat([old[:, 1:], x_tc[:, None].to(old.dtype)], dim=1) if W else old
        else:
            tail = last_inputs(x_tc, self._bounds, old.to(x_tc.dtype))
        self._staged[i] = (self.state[i], tail)   # the state follows in _rule
        return y_tc

    def _rule(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              cu_seqlens: torch.Tensor, rule: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        mode = self._mode()
        if i not in self._staged:
            raise RuntimeError(f"HybridCache: DeltaNet layer {i} ran its delta rule before its convolution")
        if mode == "prefill":
            o, state = rule(q, k, v, g, beta, cu_seqlens, output_final_state=True)
        elif mode == "decode":
            o, state = gated_delta.recurrent_gated_delta_step(q, k, v, g, beta, self.state[i])
        else:
            o, state = rule(q, k, v, g, beta, cu_seqlens, initial_state=self.state[i], output_final_state=True)
        self._staged[i] = (state, self._staged[i][1])
        return o


class LinearState:
    """DeltaNet layer ``i``'s view of a ``HybridCache``: its convolution and its delta rule over the row's new
    tokens, continuing (and then updating) each sequence's window and state."""

    __slots__ = ("cache", "index")

    def __init__(self, cache: HybridCache, index: int):
        self.cache, self.index = cache, index

    @torch.compiler.disable  # host-side bookkeeping: eager inside compiled blocks
    def conv(self, x_tc: torch.Tensor, weight_ck: torch.Tensor, cu_seqlens: torch.Tensor,
             prefill_conv: Callable[..., torch.Tensor]) -> torch.Tensor:
        """SiLU(causal depthwise conv) of the new inputs ``x_tc`` [T, C] continuing each sequence's window;
        ``prefill_conv``: the layer's own varlen convolution (used on a prefill row)."""
        return self.cache._conv(self.index, x_tc, weight_ck, cu_seqlens, prefill_conv)

    @torch.compiler.disable
    def delta_rule(self, q_thd: torch.Tensor, k_thd: torch.Tensor, v_thd: torch.Tensor, g_th: torch.Tensor,
                   beta_th: torch.Tensor, cu_seqlens: torch.Tensor,
                   rule: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """The gated delta rule's output [T, Hv, dv] of the new tokens, from each sequence's state; ``rule``: the
        layer's chunked rule (prefill, extend)."""
        return self.cache._rule(self.index, q_thd, k_thd, v_thd, g_th, beta_th, cu_seqlens, rule)


def decode_conv(x_bc: torch.Tensor, tail_bwc: torch.Tensor, weight_ck: torch.Tensor) -> torch.Tensor:
    """One new input per sequence: ``silu(sum_j w[:, K-1-j] x_{t-j})`` with x_{t-1}.. from ``tail_bwc`` [B, K-1, C]
    (the last one latest), in the weight's dtype and in ``causal_conv1d``'s order of the sum; x's dtype back."""
    K = weight_ck.shape[1]
    x, tail = x_bc.to(weight_ck.dtype), tail_bwc.to(weight_ck.dtype)
    y = x * weight_ck[:, K - 1]
    for j in range(1, K):
        y = y + tail[:, K - 1 - j] * weight_ck[:, K - 1 - j]
    return F.silu(y).to(x_bc.dtype)


def last_inputs(x_tc: torch.Tensor, bounds: list[int], old_bwc: torch.Tensor) -> torch.Tensor:
    """[B, W, C]: the last W inputs of each sequence after the row's new tokens (document b = rows
    ``bounds[b]:bounds[b+1]`` of ``x_tc``) follow its previous last W inputs ``old_bwc``."""
    B, W, C = old_bwc.shape
    flat = torch.cat([old_bwc.reshape(B * W, C), x_tc])
    rows: list[int] = []
    for b in range(B):
        seq = [*range(b * W, (b + 1) * W), *range(B * W + bounds[b], B * W + bounds[b + 1])]
        rows += seq[len(seq) - W:]
    idx = torch.tensor(rows, dtype=torch.long, device=x_tc.device)
    return flat.index_select(0, idx).reshape(B, W, C)


__all__ = ["HybridCache", "LinearState", "decode_conv", "last_inputs"]
