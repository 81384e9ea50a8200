"""A LoRA run on 4 gloo ranks (FSDP 4, FSDP 4 + EP 2 with the expert adapters split with their experts,
FSDP 4 + full activation checkpointing) == 1 process with gradient accumulation over the union of the
ranks' micro-batches: loss and aux loss rel 1e-5 per step; every adapter's gradient (gathered: FSDP
all-gather, then EP all-gather by expert) within 1e-4 of that gradient's norm; the base gets none.

Adapters on attention, the dense MLP, every expert and the vision blocks; ``B`` starts non-zero so both
factors get gradients in the first step. SGD, 2 steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import make_model, micro_batch, run_ranks, tiny_moe_args  # noqa: E402

WORLD, STEPS, MICRO = 4, 2, 2
LAYOUTS = {"fsdp4": (4, 1, "none"), "fsdp4_ep2": (4, 2, "none"), "fsdp4+ac_full": (4, 1, "full")}
STEP_KW = dict(device=torch.device("cpu"), dtype_name="float32", loss_chunk_tokens=16, max_grad_norm=0.0)


def lora_model():
    from rynnscale.models.lora import LoRASpec, apply_lora, is_adapter_param
    from rynnscale.models.qwen3_vl.moe import GroupedExperts

    torch.manual_seed(0)
    model = make_model(tiny_moe_args())
    apply_lora(model, LoRASpec(rank=4, alpha=8.0, experts=True, vision=True),
               experts_of=lambda m: isinstance(m, GroupedExperts))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_adapter_param(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


class RecordingSGD:
    """SGD that first records every parameter's gradient as ``gather(name, grad)`` returns it."""

    def __init__(self, model, gather):
        self.model, self.gather, self.grads = model, gather, []
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)

    def step(self):
        from rynnscale.parallel.fqn import clean_fqn

        self.grads.append({clean_fqn(n): self.gather(clean_fqn(n), p.grad) for n, p in self.model.named_parameters()
                           if p.requires_grad or p.grad is not None})
        self.opt.step()

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)


def lora_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from rynnscale.models.qwen3_vl.parallelize import parallelize
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.parallel.expert_parallel import expert_shards
    from rynnscale.parallel.fqn import clean_fqn
    from rynnscale.parallel.mesh import ParallelLayout, build_meshes
    from rynnscale.train.step import train_step

    out = {}
    for name, (shard, ep, ac) in LAYOUTS.items():
        model = lora_model()
        layout = ParallelLayout.resolve(world, 1, shard, ep, 8)
        ctx = DistContext(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"),
                          meshes=build_meshes(layout, "cpu"))
        parallelize(model, ctx.meshes, dtype_name="float32", ac_mode=ac)
        split = {clean_fqn(n) for n in expert_shards(model)}

        def gather(n, g, split=split, ctx=ctx):
            if g is None:
                return None
            g = g.full_tensor() if isinstance(g, DTensor) else g
            if n in split:
                parts = [torch.empty_like(g) for _ in range(ctx.meshes.layout.ep)]
                dist.all_gather(parts, g.contiguous(), group=ctx.meshes.ep_group)
                g = torch.cat(parts)
            return g.detach().clone()

        opt = RecordingSGD(model, gather)
        stats = [train_step(model, opt, [micro_batch(s, rank, m) for m in range(MICRO)], ctx=ctx, **STEP_KW)
                 for s in range(STEPS)]
        out[name] = {"loss": [s.loss for s in stats], "aux": [s.aux_loss for s in stats], "grads": opt.grads}
    return out if rank == 0 else {}


def reference() -> dict:
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.train.step import train_step

    model = lora_model()
    opt = RecordingSGD(model, lambda n, g: None if g is None else g.detach().clone())
    stats = []
    for s in range(STEPS):
        rows = [[micro_batch(s, r, m) for m in range(MICRO)] for r in range(WORLD)]
        with torch.no_grad():
            glob = [sum(model(rows[r][m]).expert_counts for r in range(WORLD)) for m in range(MICRO)]
        calls = iter(range(WORLD * MICRO))
        ctx = DistContext()  # one process whose load-balancing "all-reduce" yields the global counts
        ctx.counts_reducer = lambda c, glob=glob, calls=calls: glob[next(calls) % MICRO]
        stats.append(train_step(model, opt, [b for rr in rows for b in rr], ctx=ctx, **STEP_KW))
    return {"loss": [s.loss for s in stats], "aux": [s.aux_loss for s in stats], "grads": opt.grads}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(lora_worker, WORLD, tmp_path_factory.mktemp("lora_eq"))[0], reference()


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_run_equals_one_process(runs, layout):
    from rynnscale.models.lora import is_adapter_param

    got, ref = runs[0][layout], runs[1]
    for step in range(STEPS):
        assert got["loss"][step] == pytest.approx(ref["loss"][step], rel=1e-5), f"step {step} loss"
        assert got["aux"][step] == pytest.approx(ref["aux"][step], rel=1e-5), f"step {step} aux loss"
        g, r = got["grads"][step], ref["grads"][step]
        assert set(g) == set(r) and all(is_adapter_param(n) for n in r), sorted(set(g) ^ set(r))
        worst = max(float((g[n] - r[n]).abs().max() / r[n].norm()) for n in r)
        assert worst < 1e-4, f"step {step}: worst adapter gradient error {worst:.1e} of its norm"
