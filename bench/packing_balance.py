"""Packing efficiency and rank balance: ours vs RynnScale-style greedy token balancing.

Both consume the same seeded stream of samples with a realistic egocentric/multimodal length
mix (lengths follow Qwen3-VL's tokenisation: 16-frame 448x448 clips = 1,568 visual tokens,
720x480 images = 330, G1 640x480 clips at 2 fps = 300 per temporal patch, ...), with
8 simulated data-parallel ranks, a 16,384-token micro-batch budget (RynnScale's 30B-A3B
sequence length) and ``--micro-batches`` micro-batches per rank per step.

- ours: ``WindowPacker`` (FFD over a window of ``--window`` samples per rank, carry-over, steps
  of ranks x micro-batches bins assigned by cost with LPT + swap refinement).
- baseline (RynnScale-style): each step takes samples until ranks x micro-batches x budget
  tokens and splits them over ranks greedily by token count; each rank concatenates its share
  with no per-micro-batch budget (a rank may exceed it: the "over budget" column), and its
  efficiency is real tokens / that step capacity (generous: nothing is counted for the excess).
- ablation: our packing, but the bins assigned to ranks by token count instead of cost.

Efficiency (ours) = real tokens / (micro-batches run x budget) over all ranks; balance = max/mean of
the ranks' step cost (a*s + b*s^2 + c*patches, coefficients of the Qwen3-VL-30B-A3B
architecture via CostModel.from_args), mean and worst over steps.

    python bench/packing_balance.py [--steps 300] [--ranks 8] [--micro-batches 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rynnscale.data.balance import CostModel, greedy_token_split, imbalance
from rynnscale.data.packing import PackItem, WindowPacker
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs

BUDGET = 16384


def a3b_cost_model() -> CostModel:
    """Cost coefficients of Qwen3-VL-30B-A3B (48 layers, 32 x 128 heads, 128 experts top-8)."""
    a = Qwen3VLArgs()
    t = dataclasses.replace(a.text, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                            num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                            moe_intermediate_size=768)
    return CostModel.from_args(dataclasses.replace(a, text=t))


def sample_mix(n: int, seed: int) -> list[tuple[int, int]]:
    """(tokens, vision patches) of ``n`` samples from a realistic mix (weights in comments)."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(6, size=n, p=[0.30, 0.20, 0.05, 0.25, 0.05, 0.15])
    out = []
    for k in kinds:
        chat = 20 + int(rng.integers(20, 120))                     # template + question
        if k == 0:    # egocentric 16-frame 448x448 clip: 8 temporal patches x 196 tokens + timestamps
            vis, tps = 8 * 196, 8
            text = chat + tps * 8 + int(rng.lognormal(np.log(120), 0.6))  # <t s> + start/end; answer tags
        elif k == 1:  # G1 robot clip 640x480 at 2 fps, 4..16 s: 300 tokens per temporal patch
            tps = int(rng.integers(4, 17))
            vis = 300 * tps
            text = chat + tps * 8 + int(rng.lognormal(np.log(200), 0.5))
        elif k == 2:  # long video 320x256, 2 fps, 30..240 s, capped at a 10,240-token visual budget
            tps = int(min(rng.integers(30, 241), 10240 // 80))
            vis = 80 * tps
            text = chat + tps * 8 + int(rng.lognormal(np.log(150), 0.5))
        elif k == 3:  # one 720x480 image (704x480 -> 330 tokens)
            vis = 330
            text = chat + int(rng.lognormal(np.log(150), 0.9))
        elif k == 4:  # 2..6 images
            m = int(rng.integers(2, 7))
            vis = 330 * m
            text = chat + 2 * m + int(rng.lognormal(np.log(200), 0.7))
        else:         # text only
            vis = 0
            text = chat + int(rng.lognormal(np.log(500), 1.0))
        tokens = min(vis + text + (2 if vis else 0), BUDGET)
        out.append((tokens, vis * 4))                               # 4 patches per merged token
    return out


def run_ours(samples, ranks, per_step, window, cm, by_tokens=False):
    """Stream samples through WindowPacker; returns (efficiency, per-step imbalances, plan ms)."""
    packer = WindowPacker(BUDGET, window * ranks, num_ranks=ranks, micro_batches_per_step=per_step,
                          cost_model=cm if not by_tokens else CostModel(1.0, 0.0, 0.0), seed=0)
    queues = [[] for _ in range(ranks)]
    t_plan = 0.0
    for i, (s, v) in enumerate(samples):
        t0 = time.perf_counter()
        out = packer.push(PackItem(key=str(i), num_tokens=s, vision_patches=v))
        t_plan += time.perf_counter() - t0
        if out:
            for r in range(ranks):
                queues[r].extend(out[r])
    n_steps = min(len(q) for q in queues) // per_step
    tokens = sum(it.num_tokens for q in queues for b in q[: n_steps * per_step] for it in b)
    eff = tokens / (n_steps * per_step * ranks * BUDGET)
    imb = []
    for k in range(n_steps):
        loads = [sum(cm.pack_cost([it.num_tokens for it in b], [it.vision_patches for it in b])
                     for b in q[k * per_step:(k + 1) * per_step]) for q in queues]
        imb.append(imbalance(loads))
    return eff, imb, 1000 * t_plan / max(packer.plans, 1), n_steps


def run_baseline(samples, ranks, per_step, cm):
    """RynnScale-style: each step takes samples up to ranks x per_step x budget tokens and splits
    them over ranks greedily by token count (each rank concatenates its share; no per-micro-batch
    budget). Returns (capacity used, per-step imbalances, share of steps where a rank holds more
    than per_step x budget tokens, steps)."""
    i, real, imb, over, steps = 0, 0, [], 0, 0
    cap = ranks * per_step * BUDGET
    while i < len(samples):
        step, tot = [], 0
        while i < len(samples) and tot + samples[i][0] <= cap:
            step.append(samples[i])
            tot += samples[i][0]
            i += 1
        if i >= len(samples):
            break
        parts = greedy_token_split([s for s, _ in step], ranks)
        real += tot
        over += max(sum(step[j][0] for j in p) for p in parts) > per_step * BUDGET
        imb.append(imbalance([sum(cm.sample_cost(*step[j]) for j in p) for p in parts]))
        steps += 1
    return real / (steps * cap), imb, over / steps, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=40000)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--micro-batches", default="1,4", help="micro-batches per rank per step (comma list)")
    ap.add_argument("--window", type=int, default=64, help="look-ahead samples per rank")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cm = a3b_cost_model()
    samples = sample_mix(args.samples, args.seed)
    toks = np.array([s for s, _ in samples])
    print(f"mix: {len(samples)} samples, tokens mean {toks.mean():.0f} / p50 {np.median(toks):.0f} / "
          f"p99 {np.percentile(toks, 99):.0f} / max {toks.max()}; budget {BUDGET} tokens per micro-batch; "
          f"{args.ranks} ranks; window {args.window} samples per rank")
    print(f"cost = {cm.a:g}*s + {cm.b:.3g}*s^2 + {cm.c:.3g}*patches (Qwen3-VL-30B-A3B widths)")
    all_ok = True
    for K in (int(k) for k in args.micro_batches.split(",")):
        eff, imb, ms, n = run_ours(samples, args.ranks, K, args.window, cm)
        eff_t, imb_t, _, _ = run_ours(samples, args.ranks, K, args.window, cm, by_tokens=True)
        beff, bimb, bover, bn = run_baseline(samples, args.ranks, K, cm)
        print(f"\n{K} micro-batch(es) per rank per step")
        print(f"  {'method':34s} {'efficiency':>10s} {'over budget':>11s} {'max/mean':>9s} {'p95':>7s} {'worst':>7s} {'steps':>6s}")
        rows = [("ours: FFD window + cost LPT", eff, 0.0, imb, n), ("ablation: ours, packs by tokens", eff_t, 0.0, imb_t, n),
                ("RynnScale-style greedy by tokens", beff, bover, bimb, bn)]
        for name, e, o, im, st in rows:
            print(f"  {name:34s} {100 * e:9.2f}% {100 * o:10.1f}% {np.mean(im):9.4f} {np.percentile(im, 95):7.4f} "
                  f"{np.max(im):7.4f} {st:6d}")
        ok = eff >= 0.97 and np.mean(imb) <= 1.05
        all_ok &= ok
        print(f"  ours vs baseline: mean max/mean {np.mean(imb):.4f} vs {np.mean(bimb):.4f} "
              f"({(np.mean(bimb) - 1) / max(np.mean(imb) - 1, 1e-9):.1f}x less excess); plan {ms:.1f} ms (pure Python); "
              f"targets (efficiency >= 97%, mean max/mean <= 1.05): {'MET' if ok else 'NOT MET'}")
    print("\nefficiency = real tokens / (micro-batches x budget) (baseline: / step token capacity); over budget = "
          "steps where a baseline rank holds more tokens than its micro-batches' budget")
    raise SystemExit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
