"""KV cache of B sequences for incremental decoding with softmax-attention layers (the generation seam).

A model forward given a ``KVCache`` (``model(batch, cache=cache)``) treats the packed row's documents as
continuations of the cache's sequences, document i continuing sequence i (so the row has exactly B
documents): every attention layer writes its new keys / values after the sequence's cached ones and
attends over cached + new keys, causally. Three shapes of step, chosen once per forward (``begin``):

- prefill: every sequence is empty. Keys / values are written, attention is the training forward's own
  ``varlen_attention`` over the packed row (prefill logits are the full forward's, bitwise);
- decode: one new token per sequence. One batched SDPA call over the padded cache ``[B, Hkv, C, D]`` with
  a per-sequence length mask (GQA without expanding k / v);
- any other continuation (several new tokens after a non-empty cache): one SDPA call per sequence.

Buffers are allocated on first write with the keys' dtype and device (under FSDP mixed precision or
autocast: the compute dtype), ``capacity`` positions per sequence. ``repeat_interleave(g)`` turns a cache
of P prefilled prompts into one of P * g sequences (G samples per prompt share one prefill and one pass of
the vision tower). A family whose layers keep another kind of state (linear attention) gives its own cache
class from ``CausalLM.new_cache`` with the same ``begin`` / ``end`` / ``continuing`` /
``repeat_interleave`` / ``layer(i)`` protocol.
"""

from __future__ import annotations

import torch

from rynnscale.ops.attention import cached_attention, varlen_attention


class KVCache:
    """Keys and values of ``batch_size`` sequences x ``num_layers`` attention layers (module docstring).

    ``lengths``: cached tokens per sequence (Python ints; the loop needs them on the host anyway)."""

    def __init__(self, num_layers: int, batch_size: int, capacity: int):
        if num_layers < 1 or batch_size < 1 or capacity < 1:
            raise ValueError(f"KVCache: num_layers={num_layers}, batch_size={batch_size} and capacity={capacity} "
                             "must be >= 1")
        self.num_layers, self.batch_size, self.capacity = num_layers, batch_size, capacity
        self.lengths = [0] * batch_size
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self._step: _Step | None = None

    # ------------------------------------------------------------------ one forward
    @property
    def continuing(self) -> bool:
        """Whether the current forward continues non-empty sequences (its tokens are text: no vision tower)."""
        return self._step is not None and self._step.mode != "prefill"

    @property
    def mode(self) -> str | None:
        """The current forward's shape: ``prefill``, ``decode`` or ``extend`` (module docstring); None outside
        ``begin`` / ``end``."""
        return None if self._step is None else self._step.mode

    def begin(self, cu_seqlens: torch.Tensor, device: torch.device) -> None:
        """Start a forward whose packed row has one document per sequence (``cu_seqlens`` [B+1])."""
        if self._step is not None:
            raise RuntimeError("KVCache.begin: the previous forward did not end (an exception inside it?)")
        self._step = _Step(cu_seqlens, self.lengths, self.capacity, device)

    def end(self) -> None:
        """The forward ran every layer: the new tokens are now part of the sequences."""
        step, self._step = self._step, None
        if step is None:
            raise RuntimeError("KVCache.end without begin")
        self.lengths = step.new_lengths

    def abort(self) -> None:
        """Forget a forward that failed part-way (the lengths stay; buffers past them are ignored)."""
        self._step = None

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self, i)

    # ------------------------------------------------------------------ G samples per prompt
    def repeat_interleave(self, g: int) -> None:
        """Sequence i becomes sequences i*g .. i*g+g-1 (same keys / values), in place."""
        if self._step is not None:
            raise RuntimeError("KVCache.repeat_interleave inside a forward")
        if g < 1:
            raise ValueError(f"KVCache.repeat_interleave: g={g} must be >= 1")
        if g == 1:
            return
        self.k = [None if t is None else t.repeat_interleave(g, dim=0) for t in self.k]
        self.v = [None if t is None else t.repeat_interleave(g, dim=0) for t in self.v]
        self.lengths = [n for n in self.lengths for _ in range(g)]
        self.batch_size *= g

    # ------------------------------------------------------------------ one layer
    def _attend(self, i: int, q_lhd: torch.Tensor, k_lhd: torch.Tensor, v_lhd: torch.Tensor, backend: str,
                scale: float | None) -> torch.Tensor:
        step = self._step
        if step is None:
            raise RuntimeError("KVCache: a layer attended outside begin() / end()")
        if self.k[i] is None:
            B, H, D = self.batch_size, k_lhd.shape[1], k_lhd.shape[2]
            self.k[i] = k_lhd.new_zeros(B, H, self.capacity, D)
            self.v[i] = v_lhd.new_zeros(B, H, self.capacity, v_lhd.shape[2])
        kc, vc = self.k[i], self.v[i]
        if kc.dtype != k_lhd.dtype:
            raise RuntimeError(f"KVCache layer {i}: cached keys are {kc.dtype}, new ones {k_lhd.dtype} (the compute "
                               "dtype changed between forwards)")
        # new token t goes to row seq_t at position pos_t: [L, H, D] into [B, H, C, D]
        kc[step.seq_l, :, step.pos_l] = k_lhd
        vc[step.seq_l, :, step.pos_l] = v_lhd
        if step.mode == "prefill":
            return varlen_attention(q_lhd, k_lhd, v_lhd, step.cu_seqlens, step.max_new, causal=True,
                                    backend=backend, scale=scale)
        if step.mode == "decode":
            n = step.max_len
            return cached_attention(q_lhd, kc[:, :, :n], vc[:, :, :n], step.new_lengths_b, scale=scale)
        outs = []
        for b, (s, e) in enumerate(zip(step.bounds[:-1], step.bounds[1:])):
            if e == s:
                continue
            tot = step.new_lengths[b]
            q = q_lhd[s:e].transpose(0, 1)[None]                       # [1, Hq, n, D]
            k, v = kc[b:b + 1, :, :tot], vc[b:b + 1, :, :tot]          # [1, Hkv, tot, D]
            # query j (absolute position tot - n + j) sees keys 0 .. tot - n + j
            mask = torch.ones(e - s, tot, dtype=torch.bool, device=q.device).tril(tot - (e - s))
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)


class LayerKV:
    """Layer ``i``'s view of a ``KVCache``: ``attend(q, k, v, backend)`` stores k / v and attends."""

    __slots__ = ("cache", "index")

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    @torch.compiler.disable  # host-side bookkeeping: eager inside compiled blocks
    def attend(self, q_lhd: torch.Tensor, k_lhd: torch.Tensor, v_lhd: torch.Tensor, backend: str = "auto",
               scale: float | None = None) -> torch.Tensor:
        """q [L, Hq, D], k / v [L, Hkv, D] of the row's new tokens -> attention output [L, Hq, D]."""
        return self.cache._attend(self.index, q_lhd, k_lhd, v_lhd, backend, scale)


class _Step:
    """What every layer of one forward shares: where each new token goes, the step's shape, masks."""

    def __init__(self, cu_seqlens: torch.Tensor, lengths: list[int], capacity: int, device: torch.device):
        bounds = [int(x) for x in cu_seqlens.tolist()]
        n_new = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        B = len(lengths)
        if len(n_new) != B:
            raise ValueError(f"KVCache: the row has {len(n_new)} documents but the cache holds {B} sequences "
                             "(document i continues sequence i)")
        self.bounds, self.cu_seqlens = bounds, cu_seqlens
        self.new_lengths = [c + n for c, n in zip(lengths, n_new)]
        over = [b for b, n in enumerate(self.new_lengths) if n > capacity]
        if over:
            raise ValueError(f"KVCache: sequence(s) {over[:5]} would hold {max(self.new_lengths)} tokens, over the "
                             f"capacity {capacity}")
        if all(c == 0 for c in lengths):
            self.mode = "prefill"
        elif all(n == 1 for n in n_new):
            self.mode = "decode"
        else:
            self.mode = "extend"
        self.max_new = max(n_new) if n_new else 0
        self.max_len = max(self.new_lengths) if self.new_lengths else 0
        seq = [b for b, n in enumerate(n_new) for _ in range(n)]
        pos = [lengths[b] + j for b, n in enumerate(n_new) for j in range(n)]
        self.seq_l = torch.tensor(seq, dtype=torch.long, device=device)   # [L] sequence of each new token
        self.pos_l = torch.tensor(pos, dtype=torch.long, device=device)   # [L] its position in the sequence
        self.new_lengths_b = torch.tensor(self.new_lengths, dtype=torch.long, device=device)
