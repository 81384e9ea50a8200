"""Context parallelism: the zigzag sharding of a packed row (identity, equal shards, balanced causal work,
short documents, padding, loss sums) and Ulysses / ring attention on 2 and 4 gloo ranks against
``varlen_attention`` over the whole row in one process (forward and q/k/v gradients, causal and not, GQA
with kv heads < cp)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from dist_helpers import run_ranks

from rynnscale.batch import IGNORE_INDEX
from rynnscale.ops.attention import varlen_attention
from rynnscale.parallel.context_parallel import (
    causal_work,
    cp_attention,
    gather_shards,
    shard_plan,
    ulysses_kv_repeat,
)

LENS = [37, 5, 64, 1, 23]  # uneven, two shorter than 2*cp, 130 tokens: padded by 2 (cp=2) / 6 (cp=4)
D = 8
CASES = [  # (q heads, kv heads, causal)
    (8, 2, True),   # GQA, kv heads < cp at cp=4
    (4, 4, True),
    (4, 1, True),   # MQA
    (8, 2, False),  # vision-style bidirectional attention inside each document
]


def _cu(lens: list[int]) -> list[int]:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


# ------------------------------------------------------------------------------------------------ sharding


def test_shard_then_unshard_is_the_identity_and_shards_are_equal() -> None:
    rng = random.Random(0)
    for _ in range(200):
        cp = rng.choice([1, 2, 3, 4, 8])
        lens = [rng.choice([rng.randint(0, 2 * cp), rng.randint(0, 300)]) for _ in range(rng.randint(1, 8))]
        plan = shard_plan(torch.tensor(_cu(lens)), cp)
        assert plan.padded_length % (2 * cp) == 0 and 0 <= plan.pad < 2 * cp
        assert all(i.numel() == plan.shard_length for i in plan.indices)
        assert all(bool((i[1:] > i[:-1]).all()) for i in plan.indices)  # increasing global order
        x = torch.randn(plan.length, 3, 2)
        pieces = [plan.shard(x, r) for r in range(cp)]
        assert torch.equal(plan.unshard(pieces), x)
        assert plan.unshard(pieces, strip_pad=False).shape[0] == plan.padded_length
        pos = torch.arange(plan.length).expand(3, plan.length)  # MRoPE-style [3, L]: dim 1 is the token
        assert torch.equal(plan.unshard([plan.shard(pos, r, dim=1) for r in range(cp)], dim=1), pos)


def test_zigzag_chunks_and_padding() -> None:
    plan = shard_plan([0, 16, 24], 2, multiple=12)  # 24 tokens, padded to lcm(4, 12) = 12k -> 24: no pad
    assert plan.pad == 0
    plan = shard_plan([0, 16, 26], 2, multiple=12)
    assert (plan.pad, plan.padded_length) == (10, 36)
    assert plan.cu_seqlens.tolist() == [0, 16, 26, 36] and plan.max_seqlen == 16  # the pad is its own document
    # a 16-token document in 4 chunks of 4: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert plan.indices[0][:8].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert plan.indices[1][:8].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    labels = torch.arange(26)
    shards = [plan.shard(labels, r, pad_value=IGNORE_INDEX) for r in range(2)]
    assert sum(int((s == IGNORE_INDEX).sum()) for s in shards) == 10


def test_documents_shorter_than_2cp() -> None:
    plan = shard_plan([0, 1, 2, 5, 6, 13], 4)  # lengths 1, 1, 3, 1, 7: every chunk of most documents is empty
    assert plan.pad == 3 and plan.shard_length == 4
    seen = torch.cat(plan.indices).sort().values
    assert torch.equal(seen, torch.arange(16))
    # leftovers go to the emptiest ranks: the two 1-token documents land on different ranks, and so do
    # the three tokens of the 3-token one
    owner = {int(t): r for r, idx in enumerate(plan.indices) for t in idx}
    assert owner[0] != owner[1] and len({owner[2], owner[3], owner[4]}) == 3


def test_causal_work_is_balanced() -> None:
    """Zigzag keeps the spread of per-rank (q, k) pair counts within 2 pairs per token of the row (the
    leftover tokens of uneven documents; the total is ~sum n^2/2), where contiguous shards are far off."""
    rng = random.Random(1)
    for _ in range(300):
        cp = rng.choice([2, 3, 4, 8])
        lens = [rng.choice([rng.randint(0, 4 * cp), rng.randint(0, 2000)]) for _ in range(rng.randint(1, 12))]
        plan = shard_plan(_cu(lens), cp)
        work = causal_work(plan)
        assert max(work) - min(work) <= 2 * plan.padded_length, (cp, lens, work)
    plan = shard_plan(_cu([1000, 37, 5, 640, 1, 230]), 4)
    work = causal_work(plan)
    assert max(work) / min(work) < 1.02, work
    # contiguous shards of the same row for contrast: the first and last ranks differ several-fold
    cu = plan.cu_seqlens.long()
    per_token = torch.arange(plan.padded_length) - cu[plan.doc_ids] + 1
    contiguous = [int(c.sum()) for c in per_token.chunk(4)]
    assert max(contiguous) / min(contiguous) > 2
    assert sum(work) == sum(contiguous)


def test_per_token_loss_sums_over_ranks() -> None:
    plan = shard_plan(_cu(LENS), 4)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(plan.length, 11, generator=gen)
    labels = torch.randint(0, 11, (plan.length,), generator=gen)
    labels[::3] = IGNORE_INDEX
    full = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    parts = sum(torch.nn.functional.cross_entropy(plan.shard(logits, r), plan.shard(labels, r, pad_value=IGNORE_INDEX),
                                                  reduction="sum") for r in range(4))
    torch.testing.assert_close(parts, full)


def test_ulysses_kv_repeat_rule() -> None:
    assert ulysses_kv_repeat(8, 4) == 1
    assert ulysses_kv_repeat(2, 4) == 2
    assert ulysses_kv_repeat(1, 4) == 4
    assert ulysses_kv_repeat(3, 2) == 2


def test_ulysses_needs_heads_divisible_by_cp() -> None:
    plan = shard_plan(_cu(LENS), 4)
    q = torch.randn(plan.shard_length, 6, D)
    k = v = torch.randn(plan.shard_length, 2, D)
    with pytest.raises(ValueError, match=r"q heads \(6\) divisible by cp=4"):
        cp_attention(q, k, v, plan, group=None, mode="ulysses")
    with pytest.raises(ValueError, match="not one of"):
        cp_attention(q, k, v, plan, group=None, mode="zigzag")


# ------------------------------------------------------------------------------------------ multi-process


def _inputs(hq: int, hkv: int, length: int):
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    q, k, v = (torch.randn(length, h, D, generator=gen) for h in (hq, hkv, hkv))
    w = torch.randn(length, hq, D, generator=gen)  # loss weights: sum(out * w) has a dense gradient
    return q, k, v, w


def _cp_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    plan = shard_plan(torch.tensor(_cu(LENS)), world)
    out = {}
    for mode in ("ulysses", "ring"):
        for hq, hkv, causal in CASES:
            q, k, v, w = _inputs(hq, hkv, plan.length)
            q_l, k_l, v_l = (plan.shard(t, rank).requires_grad_() for t in (q, k, v))
            y_l = cp_attention(q_l, k_l, v_l, plan, dist.group.WORLD, mode=mode, causal=causal)
            (y_l * plan.shard(w, rank)).sum().backward()  # pad tokens weigh 0
            rec = {"out": y_l.detach(), "dq": q_l.grad, "dk": k_l.grad, "dv": v_l.grad}
            if (hq, hkv, causal) == CASES[0]:
                rec["gathered"] = gather_shards(y_l.detach(), plan, dist.group.WORLD)
            out[(mode, hq, hkv, causal)] = rec
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_cp_attention_matches_full_varlen_attention(world: int, tmp_path: Path) -> None:
    results = run_ranks(_cp_worker, world, tmp_path)
    plan = shard_plan(torch.tensor(_cu(LENS)), world)
    cu = torch.tensor(_cu(LENS), dtype=torch.int32)
    worst = {}
    for mode in ("ulysses", "ring"):
        for hq, hkv, causal in CASES:
            q, k, v, w = _inputs(hq, hkv, plan.length)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            ref = varlen_attention(q, k, v, cu, max(LENS), causal=causal, backend="loop")
            (ref * w).sum().backward()
            recs = [r[(mode, hq, hkv, causal)] for r in results]
            got = {name: plan.unshard([r[name] for r in recs]) for name in ("out", "dq", "dk", "dv")}
            want = {"out": ref.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
            for name in got:
                err = _rel(got[name], want[name])
                worst[mode] = max(worst.get(mode, 0.0), err)
                assert err < 1e-5, (mode, hq, hkv, causal, name, err)
            if "gathered" in recs[0]:
                for r in recs:
                    torch.testing.assert_close(r["gathered"], ref.detach(), rtol=0, atol=1e-5)
    print(f"cp={world} worst relative errors: {worst}")


def test_cp1_is_plain_varlen_attention() -> None:
    """cp=1 needs no process group: both modes reduce to attention over the (unpadded) row."""
    plan = shard_plan(_cu(LENS), 1)
    assert plan.pad == 0
    q, k, v, _ = _inputs(4, 2, plan.length)
    ref = varlen_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, causal=True, backend="loop")
    for mode in ("ulysses", "ring"):
        torch.testing.assert_close(cp_attention(q, k, v, plan, group=None, mode=mode), ref, rtol=1e-5, atol=1e-6)


def test_ring_attention_under_bf16_autocast_is_the_fp32_function() -> None:
    """The ring's forward runs in fp32 as its backward does, whatever autocast is active (a bf16 training step): under
    CPU bf16 autocast output and gradients equal the fp32 ones exactly (one rank: no process group needed). Before,
    autocast ran the forward's einsums in bf16 (output 5e-2 off) and the gradients were 1.5-4.5e-2 off (lse of bf16
    scores against fp32 recomputed ones)."""
    from rynnscale.parallel.context_parallel import _RingAttention

    torch.manual_seed(0)
    plan = shard_plan([0, 10, 24], 1)
    L = plan.padded_length
    q, k, v = (torch.randn(L, 4, 8) * 2), (torch.randn(L, 2, 8) * 2), torch.randn(L, 2, 8)
    go = torch.randn(L, 4, 8)

    def run(autocast: bool):
        ts = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = _RingAttention.apply(*ts, plan, None, True, 8 ** -0.5)
        out.backward(go)
        return [out.detach(), *(t.grad for t in ts)]

    for got, want, name in zip(run(True), run(False), ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)
