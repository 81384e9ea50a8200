"""GRPO rollouts and steps (``rynnscale.train.grpo``) on a tiny Qwen3-VL-MoE and synthetic grounding questions.

- the prompt set: tagged questions only, a layout-free order (the union of the ranks' prompts of a step is the
  same for any world size), epochs reshuffled;
- rollouts packed for the objective: labels only on the answer, advantages on its tokens, positions continuing
  the prompt's;
- one GRPO step: reproducible rollouts (same seeds, same answers), the KL is exactly 0 and the ratio exactly 1
  before the first update (reference = policy), the weights change, the metrics are in range;
- a reward function that raises or returns NaN on one sample: counted (``reward_failures``), named in the log,
  the sample's advantage is 0, and the step goes on -- in a step as the trainer takes it, and in a real run
  through the CLI;
- a step favours the answers with the larger advantages (the policy moves the right way);
- a LoRA run's reference is the adapter-disabled base: no second model; one that also trains base parameters
  (``model.lora.trainable``) keeps their initial values and swaps them in: its log-probs stay the initial base's;
- the rollout policy's log-probs are scored in eval mode, as sampled (LoRA dropout does not draw them);
- a rollout's optimiser steps (``rl.policy_steps``) hold the same prompts on any layout (a resume inside a rollout on
  another world size trains each group once); more of them than prompts is warned of (some would train on nothing).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from rynnscale.batch import IGNORE_INDEX
from rynnscale.config import load_config
from rynnscale.data_pipelines.synthetic import generate_synthetic
from rynnscale.parallel.distributed import DistContext
from rynnscale.train.build import build_model
from rynnscale.train.grpo import (
    GRPOStage,
    PromptSet,
    Rollout,
    RolloutSource,
    pack_rollouts,
    rollout_seed,
    score_log_probs,
)
from rynnscale.train.objectives import RolloutBatch
from rynnscale.train.optim import build_optimizer, build_scheduler
from rynnscale.train.step import StepStats, train_step

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("syn")
    generate_synthetic(out, 12, seed=5, samples_per_shard=6, progress=False)
    return sorted(str(p) for p in out.glob("*.tar"))


def cfg_for(tmp_path: Path, shards: list[str], *extra: str):
    return load_config(RECIPES / "demo_tiny.yaml", [
        f"run.output_dir={tmp_path / 'run'}", "data.synthetic.num_samples=0", f"data.train_shards={shards}",
        "model.attn_backend=loop", "model.arch.text_config.num_hidden_layers=2", "train.micro_batch_tokens=600",
        "rl.prompts_per_step=2", "rl.group_size=3", "rl.max_new_tokens=6", "optim.lr=1e-3", "optim.warmup_steps=0",
        *extra])


def test_prompt_set_is_layout_free(shards) -> None:
    ps = PromptSet(shards, seed=3)
    assert len(ps) == 12 and ps.skipped == 0       # every synthetic answer has tags
    for step in range(3):
        one = ps.positions(step, 4)
        two = sorted(ps.positions(step, 4, 0, 2) + ps.positions(step, 4, 1, 2))
        assert one == two == list(range(4 * step, 4 * step + 4))
    epoch0 = [ps.at(p).key for p in range(12)]
    epoch1 = [ps.at(p).key for p in range(12, 24)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1 and len(set(epoch0)) == 12
    with pytest.raises(ValueError, match="multiple of the data-parallel ranks"):
        ps.positions(0, 3, 0, 2)
    assert rollout_seed(0, 5, 1) == rollout_seed(0, 5, 1) != rollout_seed(0, 5, 2)


def test_a_resume_with_another_data_seed_keeps_the_checkpoints_prompt_order(tmp_path: Path, shards) -> None:
    """The trainer rebuilds the data with the checkpoint's data seed when the config's differs: for GRPO the
    rollout source stays (its state loads next) and its prompt order takes that seed."""
    from types import SimpleNamespace

    from rynnscale.train.setup import rebuild_data

    cfg = cfg_for(tmp_path, shards, "train.objective=grpo")
    args, model = build_model(cfg.model, seed=0)
    source = RolloutSource(stage_for(cfg, model, args, shards), model, torch.float32)
    c = SimpleNamespace(data=source, args=args)
    first = [source.stage.prompts.at(p).key for p in range(12)]
    rebuild_data(cfg, c, cfg.data.seed + 7)
    assert c.data is source
    want = PromptSet(shards, seed=cfg.data.seed + 7)
    assert [source.stage.prompts.at(p).key for p in range(12)] == [want.at(p).key for p in range(12)] != first


def test_pack_rollouts_labels_only_the_answer(tmp_path: Path, shards) -> None:
    from rynnscale.train.grpo import load_prompts

    cfg = cfg_for(tmp_path, shards)
    args, _ = build_model(cfg.model, meta=True)
    from rynnscale.data.pipeline import build_encoder

    ps = PromptSet(shards, seed=0)
    prompts = load_prompts([ps.at(0), ps.at(1)], build_encoder(cfg, args))
    rolls = [Rollout(k, p, comp, "", 0.5, {}, advantage=a)
             for (p, _, k), comp, a in zip(prompts, [[11, 12, 13], [21, 22]], [1.5, -0.5])]
    n0, n1 = (int(p.input_ids_l.numel()) for p, _, _ in prompts)
    (one,) = pack_rollouts(rolls, budget_tokens=10_000)
    assert isinstance(one, RolloutBatch) and one.cu_seqlens.tolist() == [0, n0 + 3, n0 + 3 + n1 + 2]
    one.validate()
    assert one.labels_l[n0:n0 + 3].tolist() == [11, 12, 13] and (one.labels_l[:n0] == IGNORE_INDEX).all()
    assert one.advantages_l[n0:n0 + 3].tolist() == [1.5] * 3 and one.advantages_l[-2:].tolist() == [-0.5] * 2
    assert (one.advantages_l[:n0] == 0).all() and one.num_target_tokens == 5
    nxt = int(prompts[0][0].position_ids_3l.max()) + 1
    assert one.position_ids_3l[:, n0:n0 + 3].tolist() == [[nxt, nxt + 1, nxt + 2]] * 3
    assert len(pack_rollouts(rolls, budget_tokens=n0 + 3)) == 2     # the budget splits the row


def stage_for(cfg, model, args, shards, reference=None):
    ctx = DistContext(device=torch.device("cpu"))
    return GRPOStage(cfg, args, ctx, prompt_set=PromptSet(shards, seed=cfg.data.seed), reference=reference)


class _RankView(DistContext):
    """Rank ``rank`` of ``world_size`` as ``GRPOStage`` sees it, run alone: sums are this rank's own (only the
    filler counts and the generation's lockstep use them)."""

    def sum(self, values):
        return list(values)


def optimiser_step(source: RolloutSource, model, opt, sched) -> tuple[StepStats, dict]:
    """One optimiser step as the trainer takes it: the source's next DataStep (a rollout on its first step),
    ``train_step`` with the GRPO objective, and the step's logged GRPO values (rollout metrics + objective
    summary)."""
    data = next(source)
    stats = train_step(model, opt, data.micro_batches, device=torch.device("cpu"), compute_dtype=torch.float32,
                       max_grad_norm=1.0, objective=source.objective)
    sched.step()
    return stats, {**data.metrics, **source.objective.summary(stats.metrics)}


def test_one_grpo_step(tmp_path: Path, shards) -> None:
    cfg = cfg_for(tmp_path, shards, "rl.temperature=1.5")
    args, model = build_model(cfg.model, seed=0)
    _, reference = build_model(cfg.model, seed=0)
    reference.requires_grad_(False)
    stage = stage_for(cfg, model, args, shards, reference)
    rs = stage.rollout(0, model, torch.float32)
    again = stage.rollout(0, model, torch.float32)
    assert [r.completion for r in rs.rollouts] == [r.completion for r in again.rollouts]   # seeded
    assert len(rs.rollouts) == 6 and len({tuple(r.completion) for r in rs.rollouts}) > 1
    assert all(0 <= r.reward <= 1 for r in rs.rollouts)
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.max_steps)
    source = RolloutSource(stage, model, torch.float32)
    stats, rec = optimiser_step(source, model, opt, sched)
    assert [r.completion for r in source.current.rollouts] == [r.completion for r in rs.rollouts]
    assert stats.finite and rec["rollout_step"] == 1
    assert rec["kl"] == 0.0 and rec["ratio_mean"] == 1.0 and rec["clip_fraction"] == 0.0   # reference = policy
    assert 0 <= rec["reward_mean"] <= 1 and rec["reward_std"] >= 0 and rec["reward_failures"] == 0
    assert rec["response_length"] == pytest.approx(sum(len(r.completion) for r in rs.rollouts) / 6)
    assert set(rec) >= {"reward_point", "reward_box", "reward_traj", "reward_format", "reward_exact"}
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # after the update the policy moved away from the reference: KL > 0 on the next rollouts
    _, rec2 = optimiser_step(source, model, opt, sched)
    assert rec2["rollout_step"] == 2 and rec2["kl"] > 0


def test_a_grpo_step_favours_the_better_answers(tmp_path: Path, shards, monkeypatch) -> None:
    """The step moves the policy toward the answers its advantages favour: sum_i A_i * (log p_after(answer_i) -
    log p_before(answer_i)) > 0 over the step's rollouts (first order: the update descends the surrogate). A sign
    flip, or advantages landing on another answer's tokens, fails it. The reward is a user function that spreads
    the answers of one prompt (the built-in grounding rewards are 0 for a random model's answers)."""
    (tmp_path / "spread_reward.py").write_text(
        "def spread(answer, reference, key):\n    return (sum(map(ord, answer)) % 11) / 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("spread_reward", None)
    cfg = cfg_for(tmp_path, shards, "rl.kl_coef=0", "rl.group_size=4", "rl.temperature=1.5", "optim.lr=1e-4",
                  "rl.reward.weights={point: 0, box: 0, traj: 0, format: 0, exact: 0}",
                  "rl.reward.functions={spread_reward:spread: 1.0}")
    args, model = build_model(cfg.model, seed=0)
    stage = stage_for(cfg, model, args, shards)
    rs = stage.rollout(0, model, torch.float32)
    adv = [r.advantage for r in rs.rollouts]
    assert len(set(adv)) > 2, adv

    def answer_log_probs() -> list[float]:
        return [float(score_log_probs(model, pack_rollouts([r], 10_000), device=torch.device("cpu"),
                                      compute_dtype=torch.float32)[0].sum()) for r in rs.rollouts]

    before = answer_log_probs()
    opt = build_optimizer(model, cfg.optim)
    optimiser_step(RolloutSource(stage, model, torch.float32), model, opt, build_scheduler(opt, cfg.optim, 10))
    moved = [a - b for a, b in zip(answer_log_probs(), before)]
    assert sum(a * d for a, d in zip(adv, moved)) > 0, list(zip(adv, moved))
    best, worst = max(range(len(adv)), key=adv.__getitem__), min(range(len(adv)), key=adv.__getitem__)
    assert moved[best] > moved[worst], (adv, moved)


@pytest.mark.parametrize("weight", [1.0, 0.0])
def test_failing_reward_function_is_counted_and_named(tmp_path: Path, shards, monkeypatch, caplog, weight) -> None:
    """Counted and named either way; weight 1: the sample's reward is NaN (advantage 0); weight 0 (a metric
    only): the reward, from the other components, stands."""
    (tmp_path / "flaky_reward.py").write_text(
        "calls = []\n"
        "def flaky(answer, reference, key):\n"
        "    calls.append(key)\n"
        "    if len(calls) == 2:\n        raise RuntimeError('gripper offline')\n"
        "    if len(calls) == 4:\n        return float('nan')\n"
        "    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("flaky_reward", None)
    cfg = cfg_for(tmp_path, shards, "rl.kl_coef=0", f"rl.reward.functions={{flaky_reward:flaky: {weight}}}")
    args, model = build_model(cfg.model, seed=0)
    stage = stage_for(cfg, model, args, shards)
    opt = build_optimizer(model, cfg.optim)
    source = RolloutSource(stage, model, torch.float32)
    with caplog.at_level(logging.WARNING, logger="rynnscale.train.grpo"):
        stats, rec = optimiser_step(source, model, opt, build_scheduler(opt, cfg.optim, 10))
    failed = [r for r in source.current.rollouts if r.error]
    if weight:
        assert len(failed) == 2 and all(math.isnan(r.reward) and r.advantage == 0.0 for r in failed)
    else:
        assert len(failed) == 2 and all(math.isfinite(r.reward) for r in failed)
        assert "a weight-0 component: the reward does not use it" in caplog.text
    text = caplog.text
    assert f"raised on sample {failed[0].key!r}: RuntimeError: gripper offline" in text
    assert f"returned nan on sample {failed[1].key!r}" in text
    assert rec["reward_failures"] == 2 and stats.finite and math.isfinite(rec["reward_mean"])
    assert rec["reward_flaky"] == 0.5 and rec["kl"] == 0.0   # no reference: no KL term
    assert source.bad_counts == {"reward_failed": 2}


def test_lora_reference_is_the_adapter_disabled_base(tmp_path: Path, shards) -> None:
    from rynnscale.config.schema import LoRAConfig
    from rynnscale.models.lora import adapters_disabled, is_adapter_param

    cfg = cfg_for(tmp_path, shards, "model.lora.rank=4", "rl.policy_steps=2", "optim.lr=3e-2")
    args, model = build_model(cfg.model, seed=0)
    _, base = build_model(dataclasses.replace(cfg.model, lora=LoRAConfig()), seed=0)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not is_adapter_param(k)})
    stage = stage_for(cfg, model, args, shards)
    assert stage.reference is None
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 10)
    source = RolloutSource(stage, model, torch.float32)
    first, rec1 = optimiser_step(source, model, opt, sched)     # the rollout's first part: adapters still B = 0
    second, rec2 = optimiser_step(source, model, opt, sched)    # its second part, after one update
    assert first.finite and second.finite and rec1["rollout_step"] == 1 and "rollout_step" not in rec2
    assert rec1["kl"] == 0.0 and rec2["kl"] > 0
    batch = stage.rollout(1, model, torch.float32).parts[0][0]
    with torch.no_grad(), adapters_disabled(model) as n:
        assert n > 0
        off = model.token_log_probs(batch, model(batch))
    with torch.no_grad():
        on = model.token_log_probs(batch, model(batch))
        want = base.token_log_probs(batch, base(batch))
    assert torch.equal(off, want) and not torch.equal(on, want)
    torch.testing.assert_close(batch.ref_logp_l, want, rtol=0, atol=0)


def test_lora_training_base_parameters_keeps_their_initial_values(tmp_path: Path, shards) -> None:
    """``model.lora.trainable`` trains a base parameter in place, so the adapter-disabled model alone would drift
    with the policy: the run keeps that parameter's initial values (no model copy) and swaps them in while the
    reference scores; its log-probs stay the initial base's after updates, and the policy keeps its own."""
    from types import SimpleNamespace

    from rynnscale.config.schema import LoRAConfig
    from rynnscale.models.lora import is_adapter_param
    from rynnscale.train.grpo import build_rollout_source, trained_base_params

    cfg = cfg_for(tmp_path, shards, "model.lora.rank=4", "model.lora.trainable=[model.language_model.norm.weight]",
                  "rl.policy_steps=2", "optim.lr=3e-2")
    args, model = build_model(cfg.model, seed=0)
    assert trained_base_params(model) == ["model.language_model.norm.weight"]
    _, base = build_model(dataclasses.replace(cfg.model, lora=LoRAConfig()), seed=0)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not is_adapter_param(k)})
    run = SimpleNamespace(compute_dtype=torch.float32, arch=None, args=args)
    source = build_rollout_source(cfg, run, DistContext(device=torch.device("cpu")), model)
    assert source.stage.reference is None and list(source.stage.base_values) == ["model.language_model.norm.weight"]
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 10)
    for _ in range(2):
        optimiser_step(source, model, opt, sched)
    norm = model.model.language_model.norm.weight
    moved = norm.detach().clone()
    assert not torch.equal(moved, base.model.language_model.norm.weight)   # the base parameter has moved
    batch = source.stage.rollout(1, model, torch.float32).parts[0][0]
    with torch.no_grad():
        want = base.token_log_probs(batch, base(batch))
    torch.testing.assert_close(batch.ref_logp_l, want, rtol=0, atol=0)
    assert torch.equal(norm, moved) and norm.requires_grad      # the policy's own value is back


def test_rollout_log_probs_are_the_sampling_policys(tmp_path: Path, shards) -> None:
    """With LoRA dropout, the rollout policy's and the reference's log-probs are scored in eval mode, as the
    answers were sampled: the same on every scoring, not a dropout draw."""
    cfg = cfg_for(tmp_path, shards, "model.lora.rank=4", "model.lora.dropout=0.5", "rl.policy_steps=2")
    args, model = build_model(cfg.model, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.5)          # adapters that do something, so dropout on them matters
    stage = stage_for(cfg, model, args, shards)
    model.train()
    one, two = (stage.rollout(0, model, torch.float32).parts[0][0] for _ in range(2))
    assert model.training
    assert torch.equal(one.old_logp_l, two.old_logp_l) and torch.equal(one.ref_logp_l, two.ref_logp_l)
    model.eval()
    with torch.no_grad():
        want = model.token_log_probs(one, model(one))
    torch.testing.assert_close(one.old_logp_l, want, rtol=0, atol=0)


def test_more_policy_steps_than_prompts_per_rank_is_warned(tmp_path: Path, shards, caplog) -> None:
    """Warned, not refused: a run resumed on more ranks must go on."""
    cfg = cfg_for(tmp_path, shards, "rl.policy_steps=3")     # 2 prompts a step
    args, model = build_model(cfg.model, seed=0)
    with caplog.at_level(logging.WARNING, logger="rynnscale.train.grpo"):
        stage_for(cfg, model, args, shards)
    assert "rl.policy_steps=3 exceeds rl.prompts_per_step=2: " in caplog.text
    assert "so 1 of its optimiser steps train on nothing" in caplog.text
    caplog.clear()
    cfg = cfg_for(tmp_path, shards, "rl.policy_steps=2")     # 1 prompt a step on each of 2 ranks
    with caplog.at_level(logging.WARNING, logger="rynnscale.train.grpo"):
        GRPOStage(cfg, args, _RankView(rank=0, world_size=2), prompt_set=PromptSet(shards, seed=0))
    assert "rl.policy_steps=2 exceeds the prompts a rank gets per rollout (1: " in caplog.text


def test_a_rank_without_prompts_does_not_decode_its_filler(tmp_path: Path, shards, monkeypatch) -> None:
    """A rank whose prompts of a step were all skipped (bad samples) runs a filler to stay in lockstep. The filler
    counts as stopped from the start, so that rank does not hold every rank to ``rl.max_new_tokens`` decode steps
    (before: its filler rarely produced a stop token, so the step's rollouts ran all of them)."""
    import rynnscale.train.grpo as grpo
    from rynnscale.data.encode import SampleError

    def unreadable(refs, encoder):
        raise SampleError("undecodable_image", refs[0].key, "injected")

    cfg = cfg_for(tmp_path, shards, "rl.max_new_tokens=6", "rl.kl_coef=0")
    args, model = build_model(cfg.model, seed=0)
    stage = stage_for(cfg, model, args, shards)
    monkeypatch.setattr(grpo, "load_prompts", unreadable)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    rs = stage.rollout(0, model, torch.float32)
    assert rs.rollouts == [] and len(forwards) == 1, (len(forwards), rs.rollouts)   # the prefill only


FLAKY = '''
calls = []


def flaky(answer, reference, key):
    """0.5 for every answer, except the run's 2nd call (raises) and 4th (NaN)."""
    calls.append(key)
    if len(calls) == 2:
        raise RuntimeError("gripper offline")
    if len(calls) == 4:
        return float("nan")
    return 0.5
'''


@pytest.mark.slow
def test_failing_reward_function_in_a_real_run(tmp_path: Path) -> None:
    """The same through the CLI and the trainer, on 2 ranks and then resumed on 1: the run finishes, the log names
    the samples and the function, metrics.jsonl counts the failures of every rank (``reward_failures``) and the
    run's running count (``skipped_by_reason``) carries across the resume."""
    from resume_run import command, overrides, run

    (tmp_path / "grpo_flaky.py").write_text(FLAKY)
    out = tmp_path / "run"
    env = {"PYTHONPATH": f"{REPO}:{tmp_path}"}

    def args(steps: int) -> list[str]:
        return overrides(out, tmp_path / "data", steps=steps, every=2, extra=(
            "train.objective=grpo", "model.arch.text_config.num_hidden_layers=2", "train.micro_batch_tokens=600",
            "rl.prompts_per_step=2", "rl.group_size=3", "rl.max_new_tokens=6", "rl.kl_coef=0",
            "rl.reward.functions={grpo_flaky:flaky: 1.0}", "optim.warmup_steps=0",
            "train.log_every=5"))      # a step that rolled out is logged whatever log_every says

    # 2 ranks, one prompt x 3 answers each a step: each rank's 2nd call raises (step 1), its 4th is NaN (step 2)
    rc, log = run(command(2, args(2)), env_extra=env)
    assert rc == 0, log[-4000:]
    assert re.search(r"step 1: reward function 'grpo_flaky:flaky' raised on sample '[^']+': RuntimeError: gripper "
                     r"offline \(the sample gets advantage 0; the run goes on\)", log), log[-4000:]
    assert re.search(r"step 2: reward function 'grpo_flaky:flaky' returned nan on sample '[^']+'", log), log[-4000:]
    # 1 process from the step-2 checkpoint: its 6 calls of step 3 hold a raise and a NaN again
    rc, log = run(command(1, args(3)), env_extra=env)
    assert rc == 0, log[-4000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and [r["world_size"] for r in recs] == [2, 2, 1]
    assert [r["reward_failures"] for r in recs] == [2, 2, 2]
    assert [r["skipped_by_reason"] for r in recs] == [{"reward_failed": n} for n in (2, 4, 6)]   # the run's count
    assert all(math.isfinite(r["reward_mean"]) and r["reward_flaky"] == 0.5 for r in recs)


def test_optimiser_steps_of_a_rollout_hold_the_same_prompts_on_any_layout(tmp_path: Path, shards) -> None:
    """``rl.policy_steps`` splits a rollout by the prompts' global positions, so optimiser step k trains on the
    same groups whatever the world size: a resume inside a rollout on another layout (its record restores every
    rank's share) trains each group once. Split per rank, 6 prompts in 2 steps made steps of 3 + 3 groups on
    one rank but 4 + 2 on two (2 + 1 on each): a resume after step 1 from one rank to two dropped a group, from
    two to one trained one twice."""
    cfg = cfg_for(tmp_path, shards, "rl.prompts_per_step=6", "rl.group_size=2", "rl.policy_steps=2",
                  "rl.max_new_tokens=2", "rl.kl_coef=0")
    args, model = build_model(cfg.model, seed=0)
    ps = PromptSet(shards, seed=cfg.data.seed)

    def part_keys(rank: int, world: int) -> list[list[str]]:
        ctx = _RankView(rank=rank, world_size=world, device=torch.device("cpu"))
        stage = GRPOStage(cfg, args, ctx, prompt_set=ps)
        rs = stage.rollout(0, model, torch.float32)
        return [sorted(k for b in part if isinstance(b, RolloutBatch) for k in b.sample_keys) for part in rs.parts]

    one = part_keys(0, 1)
    assert [len(p) for p in one] == [6, 6]    # 3 groups of 2 answers per optimiser step
    ranks = [part_keys(r, 2) for r in range(2)]
    assert [sorted(k for r in ranks for k in r[i]) for i in range(2)] == one


def test_a_resume_with_other_rollout_settings_or_prompts_is_refused(tmp_path: Path, shards) -> None:
    """A step's prompt position is its rollout index x ``rl.prompts_per_step``, the rollout index the optimiser
    step over ``rl.policy_steps x rl.epochs``: a resume with other values silently skipped or repeated prompts
    (2 prompts a step for 2 steps, resumed with 4 a step: prompts 4-7 next, 2 and 3 never seen). Such a resume,
    or one on another prompt set, or inside a rollout with another ``rl.group_size``, is refused naming the key;
    the same settings (or a group size changed between rollouts) resume."""
    from rynnscale.config.schema import ConfigError

    cfg = cfg_for(tmp_path, shards, "rl.max_new_tokens=2", "rl.kl_coef=0", "rl.policy_steps=2")
    args, model = build_model(cfg.model, seed=0)
    source = RolloutSource(stage_for(cfg, model, args, shards), model, torch.float32)
    inside = next(source).state        # inside the first rollout (its record saved)
    boundary = next(source).state      # after it

    def resume(state, *extra: str, prompt_shards=shards) -> RolloutSource:
        c = cfg_for(tmp_path, shards, "rl.max_new_tokens=2", "rl.kl_coef=0", "rl.policy_steps=2", *extra)
        other = RolloutSource(stage_for(c, model, args, prompt_shards), model, torch.float32)
        other.load_state_dict(state)
        return other

    assert resume(boundary).steps_done == 2 and resume(inside).saved_record is not None
    assert resume(boundary, "rl.group_size=4").steps_done == 2
    for extra, match in (("rl.prompts_per_step=4", r"'rl.prompts_per_step' = 4, but the checkpoint was saved with 2"),
                         ("rl.policy_steps=1", r"'rl.policy_steps' = 1, but .* saved with 2"),
                         ("rl.epochs=2", r"'rl.epochs' = 2, but .* saved with 1")):
        with pytest.raises(ConfigError, match=match):
            resume(boundary, extra)
    with pytest.raises(ConfigError, match=r"'rl.group_size' = 4, but .* saved with 3: .*regroup a saved rollout"):
        resume(inside, "rl.group_size=4")
    with pytest.raises(ConfigError, match=r"the prompt set .* is 6 prompts, keys sha256 \w+, but the checkpoint's "
                                          r"was 12 prompts"):
        resume(boundary, prompt_shards=shards[:1])


def test_prompts_without_tagged_answers_fail_fast_naming_the_key(tmp_path: Path, shards, monkeypatch) -> None:
    """Shards without a grounding question: a one-line ``ConfigError`` naming ``rl.prompts`` and the shard (it was
    a ValueError with a traceback), raised before the full fine-tune's reference copy of the model is built."""
    import io
    import tarfile
    from types import SimpleNamespace

    import rynnscale.train.build as build
    from rynnscale.config.schema import ConfigError
    from rynnscale.train.grpo import build_rollout_source

    shard = tmp_path / "chat-000000.tar"
    with tarfile.open(shard, "w") as tar:
        conv = json.dumps({"conversation": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                            {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]})
        info = tarfile.TarInfo("s0000.conv.json")
        info.size = len(conv.encode())
        tar.addfile(info, io.BytesIO(conv.encode()))
    cfg = cfg_for(tmp_path, shards, f"rl.prompts=[{shard}]", "rl.kl_coef=0.02")
    args, model = build_model(cfg.model, seed=0)

    def no_copy(*a, **k):
        raise AssertionError("the reference copy was built before the prompts were checked")

    monkeypatch.setattr(build, "build_model", no_copy)
    run = SimpleNamespace(compute_dtype=torch.float32, arch=None, args=args)
    with pytest.raises(ConfigError, match=rf"rl.prompts.*no sample in 1 shard\(s\) \({re.escape(str(shard))}\) has "
                                          r"a reference answer with grounding tags \(1 samples skipped\)"):
        build_rollout_source(cfg, run, DistContext(device=torch.device("cpu")), model)


def test_a_resume_under_another_prompt_permutation_is_refused(tmp_path: Path, shards) -> None:
    """The prompt order is numpy's seeded permutation, which numpy does not promise across versions, and the state
    held only the step count: a resume mid-epoch under another permutation trained some prompts of the epoch twice
    and skipped others without a word. The state now carries a digest of the order (as the data loader's does):
    such a resume is refused; one under the same order, one at an epoch's start (a fresh order) and a state saved
    before the digest resume."""
    from rynnscale.config.schema import ConfigError

    cfg = cfg_for(tmp_path, shards, "rl.max_new_tokens=2", "rl.kl_coef=0")
    args, model = build_model(cfg.model, seed=0)
    source = RolloutSource(stage_for(cfg, model, args, shards), model, torch.float32)
    state = json.loads(json.dumps(next(source).state))   # 2 of the 12 prompts of epoch 0 done (as a checkpoint holds it)
    trained = {source.stage.prompts.at(p).key for p in range(2)}

    def permute(ps: PromptSet) -> PromptSet:   # what another numpy's seeded permutation does
        ps._permutation = lambda epoch, f=ps._permutation: f(epoch)[::-1].copy()
        return ps

    def resume(st: dict, permuted: bool) -> RolloutSource:
        other = RolloutSource(stage_for(cfg, model, args, shards), model, torch.float32)
        if permuted:
            permute(other.stage.prompts)
        other.load_state_dict(st)
        return other

    again = resume(state, permuted=False)
    rest = {again.stage.prompts.at(p).key for p in range(2, 12)}
    assert again.steps_done == 1 and len(rest) == 10 and not rest & trained   # the epoch goes on: each prompt once
    assert {permute(PromptSet(shards, seed=cfg.data.seed)).at(p).key for p in range(2, 12)} & trained  # (repeats)
    with pytest.raises(ConfigError, match=r"prompt order of epoch 0 is not the one the checkpoint was saved with"):
        resume(state, permuted=True)
    old = {"grpo": {k: v for k, v in state["grpo"].items() if k != "order"}}
    assert resume(old, permuted=True).steps_done == 1                         # saved before the digest: unchecked
    boundary = {"grpo": {**state["grpo"], "optimizer_steps": 6}}
    assert resume(boundary, permuted=True).steps_done == 6                    # epoch 1 starts: nothing to repeat

    # inside the first rollout (2 optimiser steps each): its saved answers would pair with other prompts
    cfg = cfg_for(tmp_path, shards, "rl.max_new_tokens=2", "rl.kl_coef=0", "rl.policy_steps=2")
    inside = json.loads(json.dumps(next(RolloutSource(stage_for(cfg, model, args, shards), model, torch.float32)).state))
    assert inside["grpo"]["rollout"] is not None and resume(inside, permuted=False).saved_record is not None
    with pytest.raises(ConfigError, match=r"prompt order of epoch 0 is not the one"):
        resume(inside, permuted=True)
