"""Checkpoints reshard: a checkpoint saved by 4 ranks with ``ep=2`` (the dense weights FSDP-sharded over 4, the
experts split by EP and FSDP-sharded over edp_shard=2) loads at 2 ranks with ``ep=1`` and in 1 process with every
parameter, every AdamW moment (exp_avg, exp_avg_sq, step) and the param groups equal (bitwise) to the saved
ones, and the loader warns that the data order restarts; the DCP metadata holds the global expert shapes
[E, ...], so ``export-hf`` can read it. Without the EP layout adapter the ranks' different expert slices
would be saved under one name with the same offsets (one EP rank's experts lost)."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import make_model, micro_batch, run_ranks, tiny_moe_args

STEP_KW = dict(device=torch.device("cpu"), compute_dtype=torch.float32, loss_chunk_tokens=16, max_grad_norm=1.0)
E = 8


def _optim_cfg():
    from rynnscale.config.schema import OptimConfig
    return OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1)


EXPERT_TENSORS = ".mlp.experts."  # the fused expert weights and their LoRA factors: split over EP by expert (dim 0)


def _full(t: torch.Tensor, name: str, meshes) -> torch.Tensor:
    """Full tensor of a parameter-shaped value (FSDP all-gather, then EP all-gather for expert tensors)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    t = t.full_tensor() if isinstance(t, DTensor) else t
    if meshes is not None and meshes.ep is not None and EXPERT_TENSORS in name:
        parts = [torch.empty_like(t) for _ in range(meshes.layout.ep)]
        dist.all_gather(parts, t.contiguous(), group=meshes.ep_group)
        t = torch.cat(parts)
    return t.detach().cpu().clone()


def full_state(model, opt, meshes) -> dict[str, torch.Tensor]:
    """Every parameter and every optimiser moment of the whole model, keyed ``param:NAME`` / ``KIND:NAME``."""
    from rynnscale.parallel.fqn import clean_fqn

    out = {}
    for name, p in model.named_parameters():
        name = clean_fqn(name)
        out[f"param:{name}"] = _full(p, name, meshes)
        for kind, v in opt.state.get(p, {}).items():
            out[f"{kind}:{name}"] = _full(v, name, meshes) if v.dim() else v.detach().clone()
    return out


def _build(rank: int, world: int, ep: int, lora: bool = False):
    from rynnscale.checkpoint.ep_layout import ExpertCheckpointLayout
    from rynnscale.models.qwen3_vl.parallelize import parallelize
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.parallel.mesh import ParallelLayout, build_meshes
    from rynnscale.train.optim import build_optimizer, build_scheduler

    args = tiny_moe_args()
    model = make_model(args, seed=world)  # a different init per world size: the load must overwrite it
    if lora:   # adapters on attention, MLP, every expert and the vision blocks; the base frozen
        from lora_helpers import add_random_lora
        add_random_lora(model, seed=world)
    ctx = DistContext(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    if world > 1:
        layout = ParallelLayout.resolve(world, 1, -1, ep, args.text.num_experts)
        ctx.meshes = build_meshes(layout, "cpu")
        parallelize(model, ctx.meshes, compute_dtype=torch.float32)
    opt = build_optimizer(model, _optim_cfg())
    sched = build_scheduler(opt, _optim_cfg(), 10)
    return model, opt, sched, ctx, ExpertCheckpointLayout.for_model(model, ctx.meshes)


def save_worker(rank: int, world: int, out: str, ep: int) -> dict:
    from rynnscale.checkpoint.dcp import CheckpointManager
    from rynnscale.train.step import train_step

    torch.manual_seed(0)
    model, opt, sched, ctx, adapter = _build(rank, world, ep)
    assert adapter is not None
    for step in range(2):
        train_step(model, opt, [micro_batch(step, rank, 0)], ctx=ctx, **STEP_KW)
        sched.step()
    mgr = CheckpointManager(out, keep_last=1, state_adapter=adapter)
    mgr.save(2, model, opt, sched, layout={"dp_replicate": 1, "dp_shard": world, "ep": ep})
    return {"state": full_state(model, opt, ctx.meshes), "groups": _groups(opt)}


def load_worker(rank: int, world: int, ckpt: str, ep: int) -> dict:
    from rynnscale.checkpoint.dcp import load_checkpoint

    model, opt, sched, ctx, adapter = _build(rank, world, ep)
    rs = load_checkpoint(ckpt, model, opt, sched, layout={"dp_replicate": 1, "dp_shard": world, "ep": ep},
                         state_adapter=adapter)
    return {"state": full_state(model, opt, ctx.meshes), "groups": _groups(opt), "exact": rs.exact,
            "lr": sched.get_last_lr()}


def _groups(opt) -> list[dict]:
    """The optimiser's param groups without their parameters (lr, betas, weight decay, ...)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def _assert_same(got: dict, want: dict, where: str) -> None:
    assert set(got) == set(want), f"{where}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for k, v in want.items():
        assert torch.equal(got[k], v), f"{where}: {k} differs"


@pytest.mark.slow
def test_ep2_checkpoint_reshards_to_ep1_and_one_process(tmp_path, caplog):
    from rynnscale.checkpoint.dcp import load_checkpoint, read_dcp_metadata

    saved = run_ranks(save_worker, 4, tmp_path / "save", out=str(tmp_path / "run"), ep=2)
    want, want_groups = saved[0]["state"], saved[0]["groups"]
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert sorted(p.name for p in (ckpt / "dcp").iterdir() if p.suffix == ".distcp") == \
        [f"__{r}_0.distcp" for r in range(4)]
    assert any(k.startswith("exp_avg_sq:") for k in want) and any(k.startswith("step:") for k in want)
    # the four ranks hold different expert slices: the gathered full tensors prove the save input is global
    key = "param:model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert want[key].shape[0] == E and not torch.equal(want[key][:4], want[key][4:])
    md = read_dcp_metadata(ckpt / "dcp").state_dict_metadata
    assert tuple(md["model.model.language_model.layers.0.mlp.experts.gate_up_proj"].size)[0] == E
    assert tuple(md["optim.state.model.language_model.layers.2.mlp.experts.down_proj.exp_avg"].size)[0] == E

    two = run_ranks(load_worker, 2, tmp_path / "load2", ckpt=str(ckpt), ep=1)
    for r in range(2):
        _assert_same(two[r]["state"], want, f"2 ranks ep=1, rank {r}")
        assert two[r]["groups"] == want_groups
        assert not two[r]["exact"]  # other world size: per-rank data state is not reused

    model, opt, sched, _, _ = _build(0, 1, 1)
    with caplog.at_level("WARNING"):
        rs = load_checkpoint(ckpt, model, opt, sched, layout={"dp_replicate": 1, "dp_shard": 1, "ep": 1})
    assert "restarts deterministically" in caplog.text
    _assert_same(full_state(model, opt, None), want, "1 process")
    assert _groups(opt) == want_groups
    assert not rs.exact and rs.step == 2
    assert sched.get_last_lr() == two[0]["lr"]


def lora_save_worker(rank: int, world: int, out: str) -> dict:
    from rynnscale.checkpoint.dcp import CheckpointManager
    from rynnscale.train.step import train_step

    torch.manual_seed(0)
    model, opt, sched, ctx, adapter = _build(rank, world, 2, lora=True)
    for step in range(2):
        train_step(model, opt, [micro_batch(step, rank, 0)], ctx=ctx, **STEP_KW)
        sched.step()
    CheckpointManager(out, keep_last=1, state_adapter=adapter, trainable_only=True).save(
        2, model, opt, sched, layout={"dp_replicate": 1, "dp_shard": world, "ep": 2})
    return {"state": full_state(model, opt, ctx.meshes)}


@pytest.mark.slow
def test_lora_ep2_checkpoint_reshards_its_adapters_to_one_process(tmp_path):
    """A LoRA run's checkpoint (adapters and their AdamW moments only) saved by 2 ranks with ``ep=2`` -- each rank
    holding half of every expert adapter -- loads in 1 process with every adapter and moment equal (bitwise) to the
    saved ones: the expert adapters of both EP ranks are kept, as for the expert weights."""
    from rynnscale.checkpoint.dcp import load_checkpoint
    from rynnscale.models.lora import is_adapter_param

    saved = run_ranks(lora_save_worker, 2, tmp_path / "save", out=str(tmp_path / "run"))
    want = {k: v for k, v in saved[0]["state"].items() if is_adapter_param(k)}
    key = "param:model.language_model.layers.0.mlp.experts.down_proj_lora_B"
    assert want[key].shape[0] == E and not torch.equal(want[key][:4], want[key][4:])
    assert any(k.startswith("exp_avg_sq:") and "experts" in k for k in want)
    model, opt, sched, _, _ = _build(0, 1, 1, lora=True)
    load_checkpoint(tmp_path / "run" / "checkpoints" / "step_000002", model, opt, sched, trainable_only=True,
                    layout={"dp_replicate": 1, "dp_shard": 1, "ep": 1})
    got = {k: v for k, v in full_state(model, opt, None).items() if is_adapter_param(k)}
    _assert_same(got, want, "1 process")
