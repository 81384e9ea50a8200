"""A LoRA run on 4 gloo ranks (FSDP 4, FSDP 4 + EP 2 with the expert adapters split with their experts,
FSDP 4 + full activation checkpointing) == 1 process with gradient accumulation over the union of the
ranks' micro-batches: loss and aux loss rel 1e-5 per step; every adapter's gradient (gathered: FSDP
all-gather, then EP all-gather by expert) within 1e-4 of that gradient's norm; the base gets none.

Adapters on attention, the dense MLP, every expert and the vision blocks; ``B`` starts non-zero so both
factors get gradients in the first step. SGD, 2 steps. Qwen3.5-MoE on 2 ranks with EP 2 (one step): adapters on the
shared expert and its gate, the DeltaNet and every routed expert, same tolerances; and with context parallelism 2
(Ulysses; the DeltaNet state handed along the sequence), adapters on every DeltaNet and attention projection, the
shared expert and every routed expert, rows of text / image / video documents crossing the shard boundary: same
tolerances (measured worst 7.6e-6, a DeltaNet ``in_proj_a`` factor)."""

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


# Qwen3.5-MoE: adapters on the shared expert (its projections and its gate), the DeltaNet and attention projections
# and every routed expert; EP 2 on 2 ranks splits the routed experts' adapters, the shared expert's stay dense
QWEN35_TARGETS = ("*.self_attn.q_proj", "*.self_attn.o_proj", "*.linear_attn.in_proj_qkv", "*.linear_attn.out_proj",
                  "*.mlp.shared_expert.gate_proj", "*.mlp.shared_expert.down_proj", "*.mlp.shared_expert_gate")


def _with_random_adapters(model, targets: tuple[str, ...]):
    """``model`` with rank-4 adapters (experts included) on ``targets``, their weights drawn from seed 5."""
    from lora_helpers import randomize_adapters

    from rynnscale.models import family_of
    from rynnscale.models.lora import LoRASpec, apply_lora

    apply_lora(model, LoRASpec(rank=4, alpha=8.0, experts=True, targets=targets),
               experts_of=family_of(model).is_experts)
    randomize_adapters(model, seed=5)
    return model


def qwen35_lora_model():
    from test_qwen35_parallel import _model

    return _with_random_adapters(_model(), QWEN35_TARGETS)


def qwen35_lora_worker(rank: int, world: int) -> dict:
    from rynnscale.models import family_of
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.parallel.mesh import ParallelLayout, build_meshes
    from rynnscale.train.step import train_step

    model = qwen35_lora_model()
    ctx = DistContext(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"),
                      meshes=build_meshes(ParallelLayout.resolve(world, 1, world, 2, 8), "cpu"))
    family_of(model).parallelize(model, ctx.meshes, compute_dtype=torch.float32)
    opt = GradRecordingOptimizer(_sgd(model), model)
    stats = train_step(model, opt, [micro_batch(0, rank, m) for m in range(MICRO)], ctx=ctx, **STEP_KW)
    return {"loss": stats.loss, "grads": opt.grads[0]}



def _adapters_alone_match(ranks: list[dict], ref_loss: float, opt, adapted: tuple[str, ...]) -> None:
    """The 2-rank step equals the one-process reference (``ref_loss``, ``opt``'s recorded gradients): loss rel 1e-5,
    only adapters get gradients (among them one named by each of ``adapted``), each within 1e-4 of its norm."""
    from rynnscale.models.lora import is_adapter_param

    assert ranks[0]["loss"] == pytest.approx(ref_loss, rel=1e-5)
    g = {k: v for k, v in assemble_full([r["grads"] for r in ranks]).items() if v is not None}
    r = {k: v for k, v in assemble_full([opt.grads[0]]).items() if v is not None}
    assert set(g) == set(r) and all(is_adapter_param(n) for n in r), "only adapters get gradients"
    assert all(any(a in n for n in r) for a in adapted), adapted
    errs = norm_relative_errors(g, r, zero_floor=1e-6)
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-4, f"{worst} gradient error {errs[worst]:.1e} of its norm"

@pytest.mark.slow
def test_qwen35_lora_with_shared_and_routed_experts_under_ep2_equals_one_process(tmp_path):
    ranks = run_ranks(qwen35_lora_worker, 2, tmp_path)
    model = qwen35_lora_model()
    opt = GradRecordingOptimizer(_sgd(model), model)
    ref = reference_step(model, opt, 0, 2, MICRO, **STEP_KW)
    _adapters_alone_match(ranks, ref.loss, opt, ("shared_expert_gate.lora_B", "experts.down_proj_lora_A"))


# Qwen3.5-MoE under context parallelism: every DeltaNet projection (the CP scan's inputs and output), the gated
# attention's, the shared expert's and every routed expert's adapters
QWEN35_CP_TARGETS = ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.o_proj",
                     "*.linear_attn.in_proj_qkv", "*.linear_attn.in_proj_z", "*.linear_attn.in_proj_b",
                     "*.linear_attn.in_proj_a", "*.linear_attn.out_proj", "*.mlp.shared_expert.gate_proj",
                     "*.mlp.shared_expert.down_proj")


def qwen35_lora_cp_model():
    from test_qwen35_cp import _model

    return _with_random_adapters(_model(True, 2), QWEN35_CP_TARGETS)


def qwen35_lora_cp_worker(rank: int, world: int) -> dict:
    from test_cp_equivalence import cp_batch

    from rynnscale.models import family_of
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.parallel.mesh import ParallelLayout, build_meshes
    from rynnscale.train.step import train_step

    model = qwen35_lora_cp_model()
    layout = ParallelLayout.resolve(world, 1, -1, 1, model.args.text.num_experts, cp=world)
    ctx = DistContext(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"),
                      meshes=build_meshes(layout, "cpu"))
    family_of(model).parallelize(model, ctx.meshes, compute_dtype=torch.float32, cp_attention="ulysses")
    opt = GradRecordingOptimizer(_sgd(model), model)
    stats = train_step(model, opt, [cp_batch(0, ctx.data_rank, m) for m in range(MICRO)], ctx=ctx, **STEP_KW)
    return {"loss": stats.loss, "grads": opt.grads[0]}


@pytest.mark.slow
def test_qwen35_lora_under_cp2_equals_one_process(tmp_path):
    from test_cp_equivalence import cp_batch

    ranks = run_ranks(qwen35_lora_cp_worker, 2, tmp_path)
    model = qwen35_lora_cp_model()
    opt = GradRecordingOptimizer(_sgd(model), model)
    ref = reference_step(model, opt, 0, 1, MICRO, batch_fn=cp_batch, **STEP_KW)   # both CP ranks: one stream
    _adapters_alone_match(ranks, ref.loss, opt, ("linear_attn.in_proj_a.lora_B", "experts.gate_up_proj_lora_A"))
