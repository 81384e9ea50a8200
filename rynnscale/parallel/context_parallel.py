"""Context parallelism (CP) for packed varlen rows: load-balanced sequence sharding of one row over the
``cp`` ranks of a CP group, and two distributed attention cores over the sharded row.

Sharding (``shard_plan``). The row is padded to a multiple of ``2*cp`` (the pad is one extra document at
the end, so no real token attends to it; the caller gives its labels ``IGNORE_INDEX``). EACH document is
split into ``2*cp`` contiguous chunks and rank ``r`` holds chunks ``r`` and ``2*cp-1-r`` of every document
(the zigzag / load-balanced scheme: an early chunk pairs with a late one, so the causal work per rank is
even). Chunk sizes differ by at most one token; the leftover tokens of each document go to the ranks
holding the fewest so far, which makes every rank hold exactly ``padded_length / cp`` tokens. A document
shorter than ``2*cp`` tokens simply has empty chunks. Every per-token tensor (hidden states, the caller's
MRoPE position ids, labels, loss weights) is sharded with the same index map, so a per-token loss summed
over the ranks equals the unsharded sum. Each rank's tokens are in increasing global order.

Attention (``cp_attention``), q/k/v sequence-sharded ``[L_r, H, D]`` in, output ``[L_r, Hq, D]`` out:

- ``ulysses``: an all-to-all turns the sequence shards into head shards ``[L, Hq/cp, D]`` in the ORIGINAL
  global token order, so the ordinary ``varlen_attention`` (any backend, flash on GPU) sees whole
  documents with the row's ``cu_seqlens``; a second all-to-all brings the output back. Needs ``Hq % cp == 0``.
  Per rank it moves q, k, v and out forward and their gradients backward (~4 all-to-alls of the
  activations each way), a volume per rank that does not grow with ``cp``; no overlap with compute.
  Best when heads are plentiful (cp <= Hq) and the row fits one rank's attention memory.
- ``ring``: each rank keeps its q shard while the k/v shards travel around the ring (cp-1 transfers,
  overlapped with the block computation); partial results merge by the log-sum-exp rule in fp32. Any
  head count works and no rank ever holds more than two k/v shards, so it suits very long rows and head
  counts below cp; its cost is cp sequential steps and a hand-written block kernel (here the CPU
  reference: plain PyTorch scores + mask + logsumexp, O(L_r^2) memory per block, correct but not fast).

GQA in Ulysses: q head ``h`` uses kv head ``h // (Hq/Hkv)``. Rank ``j`` gets q heads
``[j*Hq/cp, (j+1)*Hq/cp)``; the kv heads are first repeated ``rep = cp / gcd(Hkv, cp)`` times
(``repeat_interleave``: the replicas of a head sit next to it) and the ``Hkv*rep`` heads are split evenly,
so rank ``j`` gets exactly the kv heads its q heads need (e.g. Hq=8, Hkv=2, cp=4: rep=2, rank j gets
kv head ``j // 2``). ``rep`` is 1 when ``cp`` divides ``Hkv``; the replicas' gradients sum back through
autograd. In ring attention kv heads are never split (each block expands them per q group locally).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rynnscale.ops.attention import varlen_attention
from rynnscale.ops.permute import inverse_permutation
from rynnscale.parallel.expert_parallel import all_to_all
from rynnscale.parallel.layout import CP_ATTENTION_MODES, resolve_cp_attention

MODES = CP_ATTENTION_MODES


# ----------------------------------------------------------------------------------------------- sharding


@dataclass(frozen=True)
class CPShardPlan:
    """Where every token of one packed row lives on a CP group of ``cp`` ranks.

    ``indices[r]`` are the global (padded-row) token indices rank ``r`` holds, increasing; all ranks hold
    ``shard_length`` tokens. ``cu_seqlens`` / ``max_seqlen`` describe the PADDED row (the pad, if any, is
    the last document); ``doc_ids`` is the document of every padded-row token."""

    cp: int
    length: int  # tokens of the row before padding
    pad: int  # pad tokens appended (one extra document)
    cu_seqlens: torch.Tensor  # int32 [docs + 1] of the padded row
    max_seqlen: int
    doc_ids: torch.Tensor  # int64 [padded_length]
    indices: tuple[torch.Tensor, ...]  # per rank: int64 [shard_length] global indices, increasing

    @property
    def padded_length(self) -> int:
        return self.length + self.pad

    @property
    def shard_length(self) -> int:
        return self.padded_length // self.cp

    def pad_tokens(self, x: torch.Tensor, dim: int = 0, pad_value: float | int = 0) -> torch.Tensor:
        """``x`` of ``length`` (or already ``padded_length``) along ``dim`` -> ``padded_length``."""
        n = x.shape[dim]
        if n == self.padded_length:
            return x
        if n != self.length:
            raise ValueError(f"tensor has {n} tokens along dim {dim}; the plan's row has {self.length} "
                             f"({self.padded_length} padded)")
        if self.pad == 0:
            return x
        shape = list(x.shape)
        shape[dim] = self.pad
        return torch.cat([x, x.new_full(shape, pad_value)], dim=dim)

    def shard(self, x: torch.Tensor, rank: int, dim: int = 0, pad_value: float | int = 0) -> torch.Tensor:
        """This rank's tokens of a per-token tensor: ``[..., L, ...]`` (dim ``dim``, unpadded or padded)
        -> ``[..., shard_length, ...]``. Pad tokens take ``pad_value`` (e.g. ``IGNORE_INDEX`` for labels).
        Differentiable (an index_select)."""
        x = self.pad_tokens(x, dim, pad_value)
        return x.index_select(dim, self.indices[rank].to(x.device))

    def unshard(self, pieces: list[torch.Tensor] | tuple[torch.Tensor, ...], dim: int = 0,
                strip_pad: bool = True) -> torch.Tensor:
        """The inverse of ``shard`` without communication: every rank's shard (rank order) -> the row in
        global order (``length`` tokens, or ``padded_length`` with ``strip_pad=False``)."""
        if len(pieces) != self.cp:
            raise ValueError(f"expected {self.cp} shards, got {len(pieces)}")
        cat = torch.cat(list(pieces), dim=dim)
        order = inverse_permutation(torch.cat(self.indices)).to(cat.device)
        full = cat.index_select(dim, order)
        return full.narrow(dim, 0, self.length) if strip_pad else full


def shard_plan(cu_seqlens: torch.Tensor | list[int], cp: int, multiple: int | None = None) -> CPShardPlan:
    """The load-balanced (zigzag) sharding of a packed row with document boundaries ``cu_seqlens`` over
    ``cp`` ranks. The row is padded to a multiple of ``lcm(2*cp, multiple)`` (``multiple`` defaults to
    ``2*cp``; give e.g. ``16*cp`` for shard lengths that are multiples of 16)."""
    if cp < 1:
        raise ValueError(f"cp={cp} must be >= 1")
    bounds = [int(b) for b in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    if not bounds or bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must start at 0 and not decrease, got {bounds[:8]}...")
    length = bounds[-1]
    m = math.lcm(2 * cp, multiple or 2 * cp)
    pad = (-length) % m
    if pad:
        bounds.append(length + pad)
    n_chunks = 2 * cp
    extra_per_rank = [0] * cp  # leftover tokens given to each rank so far
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(cp)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if n == 0:
            continue
        base, rem = divmod(n, n_chunks)
        sizes = [base] * n_chunks
        used = [0] * cp
        for _ in range(rem):  # the rank with the fewest leftovers so far (at most one per chunk it holds)
            r = min((r for r in range(cp) if used[r] < 2), key=lambda r: (extra_per_rank[r], r))
            sizes[r if used[r] == 0 else n_chunks - 1 - r] += 1
            used[r] += 1
            extra_per_rank[r] += 1
        offs = [start]
        for s in sizes:
            offs.append(offs[-1] + s)
        for r in range(cp):
            for c in (r, n_chunks - 1 - r):
                if sizes[c]:
                    per_rank[r].append(torch.arange(offs[c], offs[c + 1]))
    indices = tuple(torch.cat(p) if p else torch.zeros(0, dtype=torch.long) for p in per_rank)
    total = length + pad
    assert all(i.numel() == total // cp for i in indices), [i.numel() for i in indices]
    cu = torch.tensor(bounds, dtype=torch.int32)
    lens = cu[1:] - cu[:-1]
    doc_ids = torch.repeat_interleave(torch.arange(lens.numel()), lens.long(), output_size=total)
    return CPShardPlan(cp=cp, length=length, pad=pad, cu_seqlens=cu, max_seqlen=int(lens.max()) if lens.numel() else 0,
                       doc_ids=doc_ids, indices=indices)


@torch.no_grad()
def gather_shards(x_local: torch.Tensor, plan: CPShardPlan, group, dim: int = 0,
                  strip_pad: bool = True) -> torch.Tensor:
    """All-gather every rank's shard and put the tokens back in global order (not differentiable)."""
    x = x_local.movedim(dim, 0).contiguous()
    pieces = [torch.empty_like(x) for _ in range(plan.cp)]
    dist.all_gather(pieces, x, group=group)
    return plan.unshard(pieces, dim=0, strip_pad=strip_pad).movedim(0, dim)


def causal_work(plan: CPShardPlan, causal: bool = True) -> list[int]:
    """Per rank: the number of (q, k) pairs its q tokens attend to (the attention FLOPs up to a factor)."""
    cu = plan.cu_seqlens.long()
    pos = torch.arange(plan.padded_length) - cu[plan.doc_ids]  # position inside the document
    doc_len = (cu[1:] - cu[:-1])[plan.doc_ids]
    per_token = pos + 1 if causal else doc_len
    return [int(per_token[i].sum()) for i in plan.indices]


# ----------------------------------------------------------------------------------------------- Ulysses


def ulysses_kv_repeat(num_kv_heads: int, cp: int) -> int:
    """How many times Ulysses repeats each kv head so that ``cp`` divides the kv head count and every
    rank gets the kv heads of its q heads: ``cp / gcd(Hkv, cp)`` (1 when cp divides Hkv)."""
    return cp // math.gcd(num_kv_heads, cp)


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0]:
        raise ValueError(f"expected q [L, Hq, D] and k, v [L, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")


def _seq_to_head(x: torch.Tensor, plan: CPShardPlan, group, order: torch.Tensor) -> torch.Tensor:
    """[L_r, H, D] sequence shard -> [L, H/cp, D] head shard in global token order."""
    cp, L_r = plan.cp, x.shape[0]
    H = x.shape[1]
    send = x.reshape(L_r, cp, H // cp, -1).transpose(0, 1).reshape(cp * L_r, H // cp, -1)
    recv = all_to_all(send, [plan.shard_length] * cp, [L_r] * cp, group)  # [source rank][its tokens]
    return recv.index_select(0, order)


def _head_to_seq(y: torch.Tensor, plan: CPShardPlan, group, perm: torch.Tensor) -> torch.Tensor:
    """[L, H/cp, D] head shard in global order -> [L_r, H, D] sequence shard."""
    cp, L_r = plan.cp, plan.shard_length
    send = y.index_select(0, perm)  # back to [destination rank][its tokens]
    recv = all_to_all(send, [L_r] * cp, [plan.shard_length] * cp, group)  # [head group][my tokens]
    Hl = recv.shape[1]
    return recv.reshape(cp, L_r, Hl, -1).transpose(0, 1).reshape(L_r, cp * Hl, -1)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CPShardPlan, group,
                      causal: bool = True, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Ulysses (head all-to-all) attention of a sharded packed row: q [L_r, Hq, D], k/v [L_r, Hkv, D]
    (this rank's tokens of ``plan``) -> [L_r, Hq, D]. Autograd runs through both all-to-alls."""
    _check_heads(q, k, v)
    cp = plan.cp
    if q.shape[1] % cp:
        raise ValueError(f"Ulysses context parallelism needs the q heads ({q.shape[1]}) divisible by cp={cp}; "
                         f"use mode='ring' or a cp that divides the head count")
    if cp == 1:
        return varlen_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, causal=causal, backend=backend,
                                scale=scale)
    rep = ulysses_kv_repeat(k.shape[1], cp)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    perm = torch.cat(plan.indices).to(q.device)
    order = inverse_permutation(perm)
    q_h, k_h, v_h = (_seq_to_head(t, plan, group, order) for t in (q, k, v))
    out_h = varlen_attention(q_h, k_h, v_h, plan.cu_seqlens, plan.max_seqlen, causal=causal, backend=backend,
                             scale=scale)
    return _head_to_seq(out_h, plan, group, perm)


# -------------------------------------------------------------------------------------------------- ring


def _ring_shift(x: torch.Tensor, group, recv_shape) -> tuple[torch.Tensor, list]:
    """Start sending ``x`` to the next rank of the ring and receiving the previous rank's; returns the
    receive buffer and the requests to wait on."""
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % cp) if group is not None else (rank + 1) % cp
    prv = dist.get_global_rank(group, (rank - 1) % cp) if group is not None else (rank - 1) % cp
    buf = x.new_empty(recv_shape)
    ops = [dist.P2POp(dist.isend, x.contiguous(), nxt, group), dist.P2POp(dist.irecv, buf, prv, group)]
    return buf, dist.batch_isend_irecv(ops)


def _block_mask(plan: CPShardPlan, q_idx: torch.Tensor, k_idx: torch.Tensor, causal: bool) -> torch.Tensor:
    """[Lq, Lk] bool: q token attends to k token iff same document (and k before or at q when causal)."""
    doc = plan.doc_ids.to(q_idx.device)
    mask = doc[q_idx][:, None] == doc[k_idx][None, :]
    if causal:
        mask &= k_idx[None, :] <= q_idx[:, None]
    return mask


def _block_forward(q32, k32, v32, mask, scale, groups):
    """fp32 attention of q [Lq, Hq, D] over one k/v block [Lk, Hkv, D]: (out [Lq, Hq, D], lse [Hq, Lq])."""
    k32, v32 = k32.repeat_interleave(groups, dim=1), v32.repeat_interleave(groups, dim=1)
    s = torch.einsum("qhd,khd->hqk", q32, k32) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where a q token sees nothing in this block
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("hqk,khd->qhd", p, v32), lse


def _merge(out, lse, blk_out, blk_lse):
    """Online-softmax merge of two partial results (fp32); safe where both saw nothing (-inf)."""
    new = torch.logaddexp(lse, blk_lse)
    safe = torch.where(torch.isinf(new), 0.0, new)
    w_old = torch.exp(lse - safe).transpose(0, 1)[..., None]  # [Lq, H, 1]
    w_blk = torch.exp(blk_lse - safe).transpose(0, 1)[..., None]
    return out * w_old + blk_out * w_blk, new


class _RingAttention(torch.autograd.Function):
    """Ring attention with its own ring backward: dq stays local, dk/dv travel with their k/v block and
    arrive home after one more hop."""

    @staticmethod
    def forward(ctx, q, k, v, plan: CPShardPlan, group, causal: bool, scale: float):
        cp = plan.cp
        rank = dist.get_rank(group) if cp > 1 else 0
        groups = q.shape[1] // k.shape[1]
        q32 = q.float()
        q_idx = plan.indices[rank].to(q.device)
        with torch.autocast(q.device.type, enabled=False):   # fp32 as the backward (bf16 autocast: lse mismatch)
            kv = torch.stack([k, v])  # one message per step
            out = lse = None
            for step in range(cp):
                src = (rank - step) % cp
                reqs = None
                if step < cp - 1:
                    nxt_kv, reqs = _ring_shift(kv, group, kv.shape)
                mask = _block_mask(plan, q_idx, plan.indices[src].to(q.device), causal)
                blk_out, blk_lse = _block_forward(q32, kv[0].float(), kv[1].float(), mask, scale, groups)
                out, lse = (blk_out, blk_lse) if out is None else _merge(out, lse, blk_out, blk_lse)
                if reqs is not None:
                    for r in reqs:
                        r.wait()
                    kv = nxt_kv
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.group, ctx.causal, ctx.scale, ctx.rank = plan, group, causal, scale, rank
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, group, causal, scale, rank = ctx.plan, ctx.group, ctx.causal, ctx.scale, ctx.rank
        cp, Hkv = plan.cp, k.shape[1]
        groups = q.shape[1] // Hkv
        q32, do32 = q.float(), grad_out.float()
        delta = (do32 * out).sum(-1).transpose(0, 1)  # [Hq, Lq]: rowsum(dO * O)
        q_idx = plan.indices[rank].to(q.device)
        dq = torch.zeros_like(q32)
        kv = torch.stack([k, v])
        dkv = None  # fp32 [2, Lk, Hkv, D] accumulated gradient of the visiting block
        for step in range(cp):
            src = (rank - step) % cp
            reqs = None
            if step < cp - 1:
                nxt_kv, reqs = _ring_shift(kv, group, kv.shape)
            k32 = kv[0].float().repeat_interleave(groups, dim=1)
            v32 = kv[1].float().repeat_interleave(groups, dim=1)
            mask = _block_mask(plan, q_idx, plan.indices[src].to(q.device), causal)
            s = torch.einsum("qhd,khd->hqk", q32, k32) * scale
            p = torch.exp(s - lse[..., None]).masked_fill(~mask, 0.0)  # [Hq, Lq, Lk]
            dv_blk = torch.einsum("hqk,qhd->khd", p, do32)
            dp = torch.einsum("qhd,khd->hqk", do32, v32)
            ds = p * (dp - delta[..., None]) * scale
            dq += torch.einsum("hqk,khd->qhd", ds, k32)
            dk_blk = torch.einsum("hqk,qhd->khd", ds, q32)
            Lk = dk_blk.shape[0]
            contrib = torch.stack([dk_blk.view(Lk, Hkv, groups, -1).sum(2), dv_blk.view(Lk, Hkv, groups, -1).sum(2)])
            dkv = contrib if dkv is None else dkv + contrib
            if reqs is not None:  # (k/v first: one message in flight per peer pair at a time)
                for r in reqs:
                    r.wait()
                kv = nxt_kv
            if cp > 1:  # the accumulated block gradient moves on with its block (the last hop brings it home)
                dkv, dreqs = _ring_shift(dkv, group, dkv.shape)
                for r in dreqs:
                    r.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CPShardPlan, group,
                   causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Ring attention of a sharded packed row: q [L_r, Hq, D], k/v [L_r, Hkv, D] -> [L_r, Hq, D]. A q token
    attends to a k token iff both are in the same document and (causal) the k token's global position is
    not after the q token's. fp32 accumulation; the CPU reference block kernel."""
    _check_heads(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, plan, group, causal, scale)


# -------------------------------------------------------------------------------------------------- entry


@torch.compiler.disable  # collectives inside autograd Functions: eager inside compiled blocks (``model.compile``)
def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CPShardPlan, group,
                 mode: str = "ulysses", causal: bool = True, scale: float | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """Attention of this rank's shard (``plan``) of a packed row over the CP ``group`` (size ``plan.cp``).
    ``mode``: ``ulysses`` (heads divisible by cp; ``backend`` picks the local varlen kernel) or ``ring``
    (any head count). See the module docstring for which fits which shape. Runs eagerly inside a compiled
    block: dynamo failed on Ulysses' differentiable all-to-alls ("Argument ... does not belong to this Graph")."""
    if mode not in MODES:
        raise ValueError(f"context-parallel mode {mode!r} is not one of {MODES}")
    if mode == "ulysses" and q.dim() == 3 and q.shape[1] % plan.cp:
        raise ValueError(f"Ulysses context parallelism needs the q heads ({q.shape[1]}) divisible by cp={plan.cp}; "
                         f"use mode='ring' or a cp that divides the head count")
    if q.shape[0] != plan.shard_length:
        raise ValueError(f"q has {q.shape[0]} tokens; this plan gives each rank {plan.shard_length}")
    if plan.cp > 1 and dist.get_world_size(group) != plan.cp:
        raise ValueError(f"the CP group has {dist.get_world_size(group)} ranks; the plan is for cp={plan.cp}")
    if mode == "ulysses":
        return ulysses_attention(q, k, v, plan, group, causal=causal, scale=scale, backend=backend)
    return ring_attention(q, k, v, plan, group, causal=causal, scale=scale)


# -------------------------------------------------------------------------------------- model-side pieces


# ``model.cp_attention`` -> ``ulysses`` | ``ring`` (the rule lives in the torch-free layout module: recipe
# validation and the planner apply it too)
resolve_mode = resolve_cp_attention


@dataclass(frozen=True)
class CPGroup:
    """This rank's context-parallel group, set on a model by its parallel plan: ``size`` ranks (> 1),
    this rank's position ``rank`` in it, the process ``group`` and the ``model.cp_attention`` choice."""

    group: object
    size: int
    rank: int
    mode: str = "auto"
    multiple: int | None = None  # shard_plan's padding multiple (None: 2 * size)

    def plan(self, cu_seqlens: torch.Tensor) -> CPShardPlan:
        return shard_plan(cu_seqlens, self.size, self.multiple)


@dataclass(frozen=True)
class CPShard:
    """One forward's view of a sharded row on this rank: the plan, the rank, the group and the mode."""

    plan: CPShardPlan
    rank: int
    group: object
    mode: str

    @property
    def indices(self) -> torch.Tensor:
        return self.plan.indices[self.rank]

    def shard(self, x: torch.Tensor, dim: int = 0, pad_value: float | int = 0) -> torch.Tensor:
        return self.plan.shard(x, self.rank, dim=dim, pad_value=pad_value)

    def valid(self, device=None) -> torch.Tensor:
        """bool [shard_length]: the local tokens that are real (not row padding)."""
        return self.indices.to(device) < self.plan.length

    def attention(self, q, k, v, backend: str = "auto") -> torch.Tensor:
        mode = resolve_mode(self.mode, q.shape[1], self.plan.cp)
        return cp_attention(q, k, v, self.plan, self.group, mode=mode, causal=True, backend=backend)


def balanced_ranges(weights: list[int], parts: int) -> list[tuple[int, int]]:
    """Split items with ``weights`` (e.g. vision patches per frame) into ``parts`` contiguous ranges of
    nearly equal weight: item ``i`` goes to part ``floor((W_before_i + w_i / 2) * parts / W)``. Ranges
    may be empty (fewer items than parts)."""
    total = sum(weights)
    owner, before = [], 0
    for w in weights:
        owner.append(min(parts - 1, int((before + w / 2) * parts / total)) if total else 0)
        before += w
    out, i = [], 0
    for p in range(parts):
        lo = i
        while i < len(owner) and owner[i] == p:
            i += 1
        out.append((lo, i))
    return out


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks of different sizes along dim 0 (padded to the largest for the collective);
    backward: the gradient of the whole result summed over the group, this rank's rows kept."""

    @staticmethod
    def forward(ctx, x, sizes: tuple[int, ...], rank: int, group):
        n_max = max(sizes)
        buf = x.new_zeros((n_max, *x.shape[1:]))
        buf[: x.shape[0]] = x
        pieces = [torch.empty_like(buf) for _ in sizes]
        dist.all_gather(pieces, buf.contiguous(), group=group)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat([p[:n] for p, n in zip(pieces, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        lo = sum(ctx.sizes[: ctx.rank])
        return grad[lo: lo + ctx.sizes[ctx.rank]], None, None, None


@torch.compiler.disable  # a collective inside an autograd Function: eager inside compiled blocks (as ``all_to_all``)
def gather_rows(x: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
    """Differentiable all-gather of ``x`` [sizes[rank], ...] from every rank of ``group`` -> [sum(sizes), ...]
    in rank order (gloo-safe: equal-size collective on padded blocks)."""
    if x.shape[0] != sizes[rank]:
        raise ValueError(f"gather_rows: this rank has {x.shape[0]} rows, sizes says {sizes[rank]}")
    return _GatherRows.apply(x, tuple(int(s) for s in sizes), rank, group)
