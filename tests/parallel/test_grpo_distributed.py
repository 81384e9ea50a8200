"""GRPO on 2 gloo ranks == 1 process, under FSDP 2 and FSDP 2 + EP 2 (tiny Qwen3-VL-MoE):

- a GRPO step on fixed rollouts (``RolloutBatch`` rows with advantages, rollout-policy and reference log-probs;
  2 micro-batches per rank; token and sequence averaging): the loss (rel 1e-5) and every gradient (within 1e-4
  of its norm) equal one process accumulating the union of the ranks' micro-batches;
- then KV-cache generation on the sharded model in place, each rank its own prompts (text and image, different
  lengths, 2 samples each, greedy and seeded sampling): the same tokens as one process generating them, with stop
  tokens that end every answer of rank 0 after one token while rank 1 decodes on -- the ranks still run the same
  number of forwards (the ``all_done`` agreement), or the collectives would hang;
- ``swapped_values`` (a LoRA run's trained base parameters at their initial values while the reference scores)
  on FSDP2-sharded parameters, right after a forward that left the root's parameters unsharded: the block
  computes with the given values, and after it the model computes with its own again."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import (
    GradRecordingOptimizer,
    assemble_full,
    make_model,
    micro_batch,
    norm_relative_errors,
    prompts,
    reference_step,
    run_ranks,
    tiny_moe_args,
)

WORLD, MICRO = 2, 2
LAYOUTS = {"fsdp2": (2, 1), "fsdp2_ep2": (2, 2)}
AVERAGING = ("token", "sequence")    # step 0 averages by token, step 1 by sequence
NEW = 6


def rollout_batch(step: int, rank: int, micro: int):
    """``micro_batch``'s row as rollouts: its labelled tokens are the answers; a random advantage per sample;
    old / reference log-probs near the policy's scale (vocabulary 256: about -5.5), so ratios clip."""
    from rynnscale.train.objectives import RolloutBatch

    b = micro_batch(step, rank, micro)
    g = torch.Generator().manual_seed(7 + 100 * step + 10 * rank + micro)
    lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).long()
    adv = torch.repeat_interleave(torch.randn(lens.numel(), generator=g), lens)
    mask = b.labels_l != -100
    old = torch.where(mask, -5.5 + 0.4 * torch.randn(b.num_tokens, generator=g), 0.0)
    ref = torch.where(mask, -5.5 + 0.4 * torch.randn(b.num_tokens, generator=g), 0.0)
    return RolloutBatch(**vars(b), advantages_l=torch.where(mask, adv, 0.0), old_logp_l=old, ref_logp_l=ref)


def generations(model, rank: int, stops: tuple[int, ...], all_done=None) -> dict:
    from rynnscale.models.generate import SamplingParams, generate

    model.eval()
    greedy = generate(model, prompts(rank), SamplingParams(NEW, stop_ids=stops), num_samples=2, all_done=all_done)
    seeds = [1000 * rank + i for i in range(4)]
    sampled = generate(model, prompts(rank), SamplingParams(NEW, temperature=1.0, top_k=50, stop_ids=stops),
                       num_samples=2, seeds=seeds, all_done=all_done)
    model.train()
    return {"greedy": greedy, "sampled": sampled}


STEP_KW = dict(device=torch.device("cpu"), compute_dtype=torch.float32, max_grad_norm=0.0)


def objective(step: int):
    from rynnscale.train.objectives import GRPO

    return GRPO(beta=0.02, clip_low=0.2, clip_high=0.28, loss_averaging=AVERAGING[step], chunk_tokens=16)


def grpo_worker(rank: int, world: int, stops: tuple[int, ...]) -> dict:
    from rynnscale.models.qwen3_vl.parallelize import parallelize
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.parallel.mesh import ParallelLayout, build_meshes
    from rynnscale.train.step import train_step

    out = {}
    for name, (shard, ep) in LAYOUTS.items():
        torch.manual_seed(0)
        model = make_model(tiny_moe_args())
        ctx = DistContext(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"),
                          meshes=build_meshes(ParallelLayout.resolve(world, 1, shard, ep, 8), "cpu"))
        parallelize(model, ctx.meshes, compute_dtype=torch.float32)
        opt = GradRecordingOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model)
        stats = [train_step(model, opt, [rollout_batch(s, rank, m) for m in range(MICRO)], ctx=ctx,
                            objective=objective(s), **STEP_KW) for s in range(len(AVERAGING))]
        gens = generations(model, rank, stops if rank == 0 else (), all_done=lambda done, ctx=ctx: ctx.sum([0.0 if done else 1.0])[0] == 0)
        out[name] = {"loss": [s.loss for s in stats], "kl": [s.metrics["kl_sum"] for s in stats],
                     "grads": opt.grads, "gens": gens}
    return out


def reference(stops: tuple[int, ...]) -> dict:
    torch.manual_seed(0)
    model = make_model(tiny_moe_args())
    opt = GradRecordingOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model)
    stats = [reference_step(model, opt, s, WORLD, MICRO, batch_fn=rollout_batch, objective=objective(s), **STEP_KW)
             for s in range(len(AVERAGING))]
    gens = [generations(model, r, stops if r == 0 else ()) for r in range(WORLD)]
    return {"loss": [s.loss for s in stats], "kl": [s.metrics["kl_sum"] for s in stats], "grads": opt.grads,
            "gens": gens}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    free = reference(())["gens"]
    # rank 0 stops at the first token of each of its answers (rank 1 has no stop token): rank 0 is done after one
    # step while rank 1 decodes to the end
    stops = tuple(sorted({seq[0] for mode in free[0].values() for seq in mode}))
    return run_ranks(grpo_worker, WORLD, tmp_path_factory.mktemp("grpo_dist"), stops=stops), reference(stops), stops


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grpo_step_equals_one_process(runs, layout) -> None:
    results, ref, _ = runs
    for step in range(len(AVERAGING)):
        for r in range(WORLD):
            got = results[r][layout]["loss"][step]
            assert got == pytest.approx(ref["loss"][step], rel=1e-5), (step, r)
        assert results[0][layout]["kl"][step] == pytest.approx(ref["kl"][step], rel=1e-5)
        full = assemble_full([results[r][layout]["grads"][step] for r in range(WORLD)])
        errs = norm_relative_errors(full, assemble_full([ref["grads"][step]]), zero_floor=1e-6)
        worst = max(errs, key=errs.get)
        assert errs[worst] < 1e-4, f"step {step} ({AVERAGING[step]}): {worst} off by {errs[worst]:.2e} of its norm"


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generation_on_the_sharded_model_equals_one_process(runs, layout) -> None:
    results, ref, stops = runs
    for r in range(WORLD):
        assert results[r][layout]["gens"] == ref["gens"][r], f"rank {r}"
    assert all(len(seq) == 1 and seq[0] in stops for mode in ref["gens"][0].values() for seq in mode)  # rank 0 done
    assert all(len(seq) == NEW for mode in ref["gens"][1].values() for seq in mode)   # rank 1 decoded to the end


def swap_worker(rank: int, world: int) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rynnscale.train.grpo import swapped_values

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randn(3, 4)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        y_initial = model(x)
    model(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        y_moved = model(x)                  # the root keeps its gathered parameters after this forward
        with swapped_values(model, initial):
            y_swapped = model(x)
        y_after = model(x)
        model.reshard()                     # the root's sharded parameters, to read them
        moved = {n: p.full_tensor() for n, p in model.named_parameters()}
        try:                                # a failure inside the block: the policy's own values come back
            with swapped_values(model, initial):
                raise RuntimeError("out of memory, say")
        except RuntimeError as e:
            assert str(e) == "out of memory, say"
        model.reshard()
        restored = all(torch.equal(p.full_tensor(), moved[n]) for n, p in model.named_parameters())
        y_again = model(x)
    return [y_initial, y_moved, y_swapped, y_after, restored, y_again]


def test_swapped_values_on_fsdp2_parameters(tmp_path) -> None:
    for y_initial, y_moved, y_swapped, y_after, restored, y_again in run_ranks(swap_worker, WORLD, tmp_path):
        assert not torch.equal(y_moved, y_initial)
        assert torch.equal(y_swapped, y_initial) and torch.equal(y_after, y_moved)
        assert restored and torch.equal(y_again, y_moved)
