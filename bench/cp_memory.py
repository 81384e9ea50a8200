"""Peak saved-activation bytes per rank of ONE decoder layer under context parallelism, measured, against
the planner's estimate (issue 12).

The layer is a NARROW slice of Qwen3-VL-30B-A3B's MoE decoder layer: the same structure (GQA with 32 q
heads and 4 kv heads, q/k RMSNorm, MRoPE, a top-8 softmax-routed MoE) but hidden 256, head_dim 8, 16
experts of width 96, so 64k-token rows run on a CPU; the activation bytes per token scale with those widths
and the planner is evaluated on the same slice. Each of ``cp`` gloo processes runs the layer's forward on its
zigzag shard of a packed row of 4k-token documents (attention: ``--mode`` ulysses / ring over the CP group,
the local kernel the CPU ``loop`` path) and counts the bytes of the distinct storages autograd saves for
backward (``torch.autograd.graph.saved_tensors_hooks``; fp32). The estimate is
``(decoder_layer_bytes_per_token + cp_attention_bytes_per_token) x tokens / cp`` with the planner's ``cpu``
profile.

    python bench/cp_memory.py                       # 16k / 32k / 64k x cp 1 / 2 / 4, ulysses
    python bench/cp_memory.py --tokens 16384 --cp 1 2 --mode ring
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rynnscale.models.qwen3_vl.args import TextArgs  # noqa: E402
from rynnscale.models.qwen3_vl.text import DecoderLayer, mrope_cos_sin  # noqa: E402
from rynnscale.parallel.context_parallel import CPShard, shard_plan  # noqa: E402
from rynnscale.plan.planner import Profile, cp_attention_bytes_per_token, decoder_layer_bytes_per_token  # noqa: E402

DOC = 4096


def slice_args() -> TextArgs:
    return TextArgs(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                    num_attention_heads=32, num_key_value_heads=4, head_dim=8, mrope_section=[1, 1, 2],
                    rope_theta=10000.0, num_experts=16, num_experts_per_tok=8, moe_intermediate_size=96)


def measure(rank: int, cp: int, tokens: int, mode: str, group) -> int:
    t = slice_args()
    torch.manual_seed(0)
    layer = DecoderLayer(t, 0, attn_backend="loop", gemm_backend="loop")
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    cu = torch.arange(0, tokens + 1, DOC, dtype=torch.int32)
    plan = shard_plan(cu, cp)
    shard = CPShard(plan, rank, group, mode) if cp > 1 else None
    L = plan.shard_length
    pos = torch.cat([torch.arange(DOC)] * (tokens // DOC)).expand(3, tokens)
    pos_l = plan.shard(pos, rank, dim=1)
    cos, sin = mrope_cos_sin(pos_l, t, torch.float32)
    h = torch.randn(L, t.hidden_size, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(x: torch.Tensor):
        if x.device.type != "meta":
            st = x.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out, _ = layer(h, cos, sin, plan.cu_seqlens, plan.max_seqlen, cp=shard) if shard else \
            layer(h, cos, sin, plan.cu_seqlens, plan.max_seqlen)
    seen.pop(h.untyped_storage().data_ptr(), None)  # the layer input belongs to the previous layer / embedding
    del out
    return sum(seen.values())


def _entry(rank: int, cp: int, port: int, tokens: int, mode: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cp))
    dist.init_process_group("gloo", rank=rank, world_size=cp, timeout=datetime.timedelta(seconds=1200))
    b = measure(rank, cp, tokens, mode, dist.group.WORLD)
    torch.save(b, Path(out_dir) / f"{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run(cp: int, tokens: int, mode: str) -> list[int]:
    if cp == 1:
        return [measure(0, 1, tokens, mode, None)]
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_entry, args=(cp, port, tokens, mode, d), nprocs=cp, join=True, start_method="spawn")
        return [torch.load(Path(d) / f"{r}.pt") for r in range(cp)]


def estimate(cp: int, tokens: int) -> float:
    t, p = slice_args(), Profile.named("cpu")
    per_tok = decoder_layer_bytes_per_token(t, True, p) - t.hidden_size * p.act_bytes  # minus the layer input
    return (per_tok + cp_attention_bytes_per_token(t, cp, p)) * (-(-tokens // cp))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--mode", choices=("ulysses", "ring"), default="ulysses")
    a = ap.parse_args(argv)
    heads = slice_args().num_attention_heads
    for T in a.tokens:
        if T < DOC or T % DOC:
            ap.error(f"--tokens {T}: must be a positive multiple of the {DOC}-token document")
    for cp in a.cp:
        if cp < 1:
            ap.error(f"--cp {cp}: must be >= 1")
        if a.mode == "ulysses" and heads % cp:
            ap.error(f"--cp {cp}: ulysses splits the {heads} q heads over the ranks; use a divisor or --mode ring")
    print(f"one decoder layer, narrow A3B slice (hidden 256, 32/4 heads x 8, 16 experts top-8), {a.mode}, "
          f"fp32, documents of {DOC} tokens")
    print(f"{'tokens':>7} {'cp':>3} {'measured MiB/rank (max)':>24} {'planner MiB':>12} {'est/meas':>9}")
    worst = 0.0
    for T in a.tokens:
        for cp in a.cp:
            meas = max(run(cp, T, a.mode))
            est = estimate(cp, T)
            worst = max(worst, abs(est / meas - 1))
            print(f"{T:>7} {cp:>3} {meas / 2**20:>24.1f} {est / 2**20:>12.1f} {est / meas:>9.3f}", flush=True)
    print(f"worst |estimate / measured - 1| = {worst:.1%} ({'within' if worst <= 0.15 else 'OUTSIDE'} 15%)")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
