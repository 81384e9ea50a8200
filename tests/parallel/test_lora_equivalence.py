"""A LoRA run on 4 gloo ranks (FSDP 4, FSDP 4 + EP 2 with the expert adapters split with their experts,
FSDP 4 + full activation checkpointing) == 1 process with gradient accumulation over the union of the
ranks' micro-batches: loss and aux loss rel 1e-5 per step; every adapter's gradient (gathered: FSDP
all-gather, then EP all-gather by expert) within 1e-4 of that gradient's norm; the base gets none.

Adapters on attention, the dense MLP, every expert and the vision blocks; ``B`` starts non-zero so both
factors get gradients in the first step. SGD, 2 steps."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import (
    GradRecordingOptimizer,
    assemble_full,
    make_model,
    micro_batch,
    norm_relative_errors,
    reference_step,
    run_ranks,
    tiny_moe_args,
)

WORLD, STEPS, MICRO = 4, 2, 2
LAYOUTS = {"fsdp4": (4, 1, "none"), "fsdp4_ep2": (4, 2, "none"), "fsdp4+ac_full": (4, 1, "full")}
STEP_KW = dict(device=torch.device("cpu"), compute_dtype=torch.float32, loss_chunk_tokens=16, max_grad_norm=0.0)


def lora_model():
    from lora_helpers import add_random_lora

    torch.manual_seed(0)
    return add_random_lora(make_model(tiny_moe_args()), seed=5)


def _sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)


def lora_worker(rank: int, world: int) -> dict:
    from rynnscale.models.qwen3_vl.parallelize import parallelize
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.parallel.mesh import ParallelLayout, build_meshes
    from rynnscale.train.step import train_step

    out = {}
    for name, (shard, ep, ac) in LAYOUTS.items():
        model = lora_model()
        layout = ParallelLayout.resolve(world, 1, shard, ep, 8)
        ctx = DistContext(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"),
                          meshes=build_meshes(layout, "cpu"))
        parallelize(model, ctx.meshes, compute_dtype=torch.float32, ac_mode=ac)
        opt = GradRecordingOptimizer(_sgd(model), model)
        stats = [train_step(model, opt, [micro_batch(s, rank, m) for m in range(MICRO)], ctx=ctx, **STEP_KW)
                 for s in range(STEPS)]
        out[name] = {"loss": [s.loss for s in stats], "aux": [s.aux_loss for s in stats], "grads": opt.grads}
    return out


def reference() -> dict:
    model = lora_model()
    opt = GradRecordingOptimizer(_sgd(model), model)
    stats = [reference_step(model, opt, s, WORLD, MICRO, **STEP_KW) for s in range(STEPS)]
    return {"loss": [s.loss for s in stats], "aux": [s.aux_loss for s in stats], "grads": opt.grads}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(lora_worker, WORLD, tmp_path_factory.mktemp("lora_eq")), reference()


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_run_equals_one_process(runs, layout):
    from rynnscale.models.lora import is_adapter_param

    ranks, ref = runs
    got = ranks[0][layout]
    for step in range(STEPS):
        assert got["loss"][step] == pytest.approx(ref["loss"][step], rel=1e-5), f"step {step} loss"
        assert got["aux"][step] == pytest.approx(ref["aux"][step], rel=1e-5), f"step {step} aux loss"
        g = {k: v for k, v in assemble_full([r[layout]["grads"][step] for r in ranks]).items() if v is not None}
        r = {k: v for k, v in assemble_full([ref["grads"][step]]).items() if v is not None}
        assert r and all(is_adapter_param(n) for n in set(g) | set(r)), "the base must get no gradient"
        errs = norm_relative_errors(g, r, zero_floor=1e-6)
        worst = max(errs, key=errs.get)
        assert errs[worst] < 1e-4, f"step {step}: {worst} gradient error {errs[worst]:.1e} of its norm"
