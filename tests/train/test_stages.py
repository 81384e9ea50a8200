"""Staged recipes (``stages``: SFT then GRPO) through the real CLI.

- each stage's recipe: its own directory, the previous stage's export as ``model.init_from``, every stage but the
  last exporting, the synthetic set shared; a bad override fails naming the stage before anything runs;
- a chain killed with SIGKILL inside its GRPO stage and run again: the finished SFT stage is skipped, the GRPO
  stage resumes exactly, and its metrics equal those of a chain that ran straight (bit for bit). The GRPO stage
  takes 2 optimiser steps per rollout (``rl.policy_steps=2``) and checkpoints after every step, and the kill
  lands at a random moment after step 3's checkpoint, the middle of the second rollout: the resumed stage
  continues with the saved rollout, then the same seeds, so losses, rewards and KL equal the straight chain's. A
  user reward function (``module:function``) gives the answers rewards a random-init model cannot earn from the
  tags."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from resume_run import REPO, kill_at_random, latest_step, metrics, run, start

from rynnscale.config import ConfigError, load_config, stage_config

TINY_GRPO = REPO / "recipes" / "tiny" / "finetune" / "grpo_grounding.yaml"
GRPO_STEPS, KILL_AFTER = 10, 3   # 7 GRPO steps after the checkpoint: a kill within 1.5 s lands before the end
REWARD = '''
def by_length(answer, reference, key):
    """A reward any answer earns: its length's position in a cycle of 7 (varies between samples)."""
    return (len(answer) % 7) / 6
'''


def chain_recipe(tmp_path: Path, out: Path, data: Path) -> Path:
    recipe = {
        "extends": str(REPO / "recipes" / "demo_tiny.yaml"),
        "run": {"output_dir": str(out)},
        "model": {"attn_backend": "loop", "arch": {"text_config": {"num_hidden_layers": 2}}},
        "data": {"synthetic": {"num_samples": 24, "samples_per_shard": 12, "output_dir": str(data)}},
        "train": {"micro_batch_tokens": 600},
        "optim": {"warmup_steps": 0},
        "checkpoint": {"every_steps": 1},
        "logging": {"progress": False, "plot": False, "wandb": {"mode": "disabled"}},
        "rl": {"prompts_per_step": 2, "group_size": 3, "max_new_tokens": 6},
        "stages": [{"name": "sft", "overrides": {"train": {"max_steps": 3}}},
                   {"name": "grpo", "overrides": {
                       "train": {"objective": "grpo", "max_steps": GRPO_STEPS}, "optim": {"lr": 1e-3},
                       "rl": {"policy_steps": 2, "reward": {"weights": {"format": 0.5},
                                                            "functions": {"grpo_test_reward:by_length": 1.0}}}}}],
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_stage_recipes(tmp_path: Path) -> None:
    cfg = load_config(TINY_GRPO, [f"run.output_dir={tmp_path / 'run'}"])
    sft, grpo = stage_config(cfg, 0), stage_config(cfg, 1, check_paths=False)
    assert sft.run.output_dir == str(tmp_path / "run" / "sft") and sft.train.objective == "sft"
    assert sft.checkpoint.export_hf and sft.model.arch is not None and sft.model.init_from is None
    assert grpo.run.output_dir == str(tmp_path / "run" / "grpo") and grpo.train.objective == "grpo"
    assert grpo.model.init_from == str(tmp_path / "run" / "sft" / "hf") and grpo.model.arch is None
    assert sft.data.synthetic.output_dir == grpo.data.synthetic.output_dir == str(tmp_path / "run" / "synthetic_data")
    assert grpo.rl.group_size == 8 and grpo.optim.schedule == "constant" and not grpo.rl.scale_rewards
    assert grpo.model.freeze == ["model.language_model.embed_tokens.weight"] and sft.model.freeze == []
    assert grpo.rl.top_k == 10 and sft.data.synthetic.questions == grpo.data.synthetic.questions == ["affordance"]
    with pytest.raises(ConfigError, match=r"stages\[1\] \(grpo\).*train.objective"):
        load_config(TINY_GRPO, ["stages=[{name: sft}, {name: grpo, overrides: {train: {objective: ppo}}}]"])
    with pytest.raises(ConfigError, match=r"stages\[1\] \(grpo\).*unknown config key 'rl.groups'"):
        load_config(TINY_GRPO, ["stages=[{name: sft}, {name: grpo, overrides: {rl: {groups: 3}}}]"])
    with pytest.raises(ConfigError, match=r"stages\[1\].name' = 'sft' is used by another stage"):
        load_config(TINY_GRPO, ["stages=[{name: sft}, {name: sft}]"])
    with pytest.raises(ConfigError, match="GRPO .* runs whole rows"):
        load_config(TINY_GRPO, ["train.objective=grpo", "parallel.cp=2"])


def grpo_lines(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["aux_loss"], r["kl"], r.get("reward_mean"), r.get("rollout_step"))
            for r in metrics(out / "grpo")]


@pytest.mark.slow
def test_chain_resumes_inside_its_grpo_stage_mid_rollout(tmp_path: Path) -> None:
    reward_dir = tmp_path / "reward"
    reward_dir.mkdir()
    (reward_dir / "grpo_test_reward.py").write_text(REWARD)
    env = {"PYTHONPATH": f"{REPO}:{reward_dir}"}
    data = tmp_path / "data"
    straight = tmp_path / "straight"
    rc, log = run([sys.executable, "-m", "rynnscale", "train", str(chain_recipe(tmp_path, straight, data))],
                  env_extra=env)
    assert rc == 0, log[-4000:]
    assert (straight / "sft" / "stage_done.json").is_file() and (straight / "grpo" / "stage_done.json").is_file()
    assert (straight / "sft" / "hf" / "config.json").is_file()
    want = grpo_lines(straight)
    assert [w[0] for w in want] == list(range(1, GRPO_STEPS + 1))
    assert [w[5] for w in want] == [1, None, 2, None, 3, None, 4, None, 5, None]   # a rollout every 2 steps
    assert any(w[4] and w[4] > 0 for w in want) and any(w[3] > 0 for w in want[1:])

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rynnscale", "train", str(chain_recipe(tmp_path, out, data))]
    how = kill_at_random(start(cmd, env), lambda: latest_step(out / "grpo") >= KILL_AFTER, 1.5)
    killed_after = max((r["step"] for r in metrics(out / "grpo")), default=0)
    where = f"(step {KILL_AFTER}'s checkpoint, then {how}; last logged step {killed_after})"
    assert killed_after < GRPO_STEPS, f"the run finished before the kill {where}"
    assert (out / "sft" / "stage_done.json").is_file() and not (out / "grpo" / "stage_done.json").exists()
    rc, log = run(cmd, env_extra=env)
    assert rc == 0, f"{where}\n{log[-4000:]}"
    assert re.search(r"stage 1/2 'sft': finished earlier", log), log[-3000:]
    m = re.search(r"resumed exactly from \S+ at step (\d+)", log)
    assert m and KILL_AFTER <= int(m.group(1)) <= killed_after, f"no exact resume {where}:\n{log[-3000:]}"
    got = grpo_lines(out)
    assert [g[0] for g in got] == list(range(1, GRPO_STEPS + 1)), f"every step once {where}"
    assert got == want, f"{where}\n{got}\n!=\n{want}"


# ---------------------------------------------------------------- the chain's lifecycle, in process
def test_chain_settings(tmp_path: Path) -> None:
    """The command line is laid over every stage (a key it sets wins over the stages' own) and
    ``stages.<name or index>.<key>=value`` sets one stage's; the keys the chain sets may not be stage overrides;
    ``checkpoint.resume=PATH`` continues the stage holding PATH (the others resume as usual) and must be one."""
    out = tmp_path / "run"
    cfg = load_config(TINY_GRPO, [f"run.output_dir={out}", "train.max_steps=4", "optim.lr=1e-4",
                                  "stages.grpo.rl.group_size=3", "stages.0.overrides.optim.warmup_steps=1"])
    sft, grpo = stage_config(cfg, 0), stage_config(cfg, 1, check_paths=False)
    assert (sft.train.max_steps, grpo.train.max_steps, sft.optim.lr, grpo.optim.lr) == (4, 4, 1e-4, 1e-4)
    assert (sft.optim.warmup_steps, grpo.optim.warmup_steps, grpo.rl.group_size) == (1, 3, 3)
    assert grpo.train.objective == "grpo"     # what the command line does not set stays the stage's
    cfg = load_config(TINY_GRPO, [f"run.output_dir={out}", "stages.grpo.data.synthetic.num_samples=50"])
    assert stage_config(cfg, 0).data.synthetic.output_dir == str(out / "synthetic_data")   # a stage that changes
    assert stage_config(cfg, 1, check_paths=False).data.synthetic.output_dir == str(out / "synthetic_data_grpo")
    with pytest.raises(ConfigError, match=r"override 'stages.ppo.train.max_steps=1': no stage 'ppo'"):
        load_config(TINY_GRPO, ["stages.ppo.train.max_steps=1"])
    for stage, key, value in ((1, "run", {"output_dir": "x"}), (0, "data", {"synthetic": {"output_dir": "x"}}),
                              (1, "model", {"init_from": "x"}), (0, "checkpoint", {"export_hf": False}),
                              (1, "checkpoint", {"resume": "none"})):
        stages = [{"name": "sft", "overrides": {}}, {"name": "grpo", "overrides": {"train": {"objective": "grpo"}}}]
        stages[stage]["overrides"][key] = value
        with pytest.raises(ConfigError, match=rf"stages\[{stage}\].overrides.{key}.*the chain sets it"):
            load_config(TINY_GRPO, [f"stages={stages}"])   # (a command-line key would replace the stage's)
    ckpt = out / "grpo" / "checkpoints" / "step_000002"
    cfg = load_config(TINY_GRPO, [f"run.output_dir={out}", f"checkpoint.resume={ckpt}"], check_paths=False)
    assert stage_config(cfg, 0, check_paths=False).checkpoint.resume == "auto"
    assert stage_config(cfg, 1, check_paths=False).checkpoint.resume == str(ckpt)
    with pytest.raises(ConfigError, match="in a staged recipe it must be a checkpoint of one of its stages"):
        load_config(TINY_GRPO, [f"run.output_dir={out}", f"checkpoint.resume={tmp_path / 'other' / 'step_000002'}"],
                    check_paths=False)


class SignalAt:
    """Hook: SIGTERM to this process at the ``n``-th step reached (counted over all stages), during the step
    (``on_step``: the trainer saves and stops after it) or after its checkpoint (``on_step_end``)."""

    def __init__(self, n: int, after_save: bool):
        self.n, self.after_save, self.seen = n, after_save, 0

    def _fire(self) -> None:
        import os
        import signal
        self.seen += 1
        if self.seen == self.n:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_step(self, step, record, model, ctx):
        if not self.after_save:
            self._fire()

    def on_step_end(self, step, ctx):
        if self.after_save:
            self._fire()


def _chain(tmp_path: Path, out: Path, *extra: str, hooks=()) -> Path:
    from rynnscale.train.trainer import run_training

    cfg = load_config(chain_recipe(tmp_path, out, tmp_path / "data"), ["stages.grpo.train.max_steps=2", *extra])
    return run_training(cfg, hooks=hooks)


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "grpo_test_reward.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("after_save", [False, True])
def test_a_preempted_last_step_stops_the_chain_and_the_next_run_goes_on(tmp_path: Path, reward_module, caplog,
                                                                      after_save: bool) -> None:
    """SIGTERM at the SFT stage's last step (3), during it or after its checkpoint: the chain stops there, without
    the SFT export and without marking the stage done (before: marked done unexported, and every later run failed
    on the missing export; or, after the save, the signal was dropped and GRPO trained on); the same command
    again exports SFT and runs GRPO."""
    out = tmp_path / "run"
    _chain(tmp_path, out, hooks=[SignalAt(3, after_save)])
    assert "stage 'sft' was preempted at step 3" in caplog.text
    assert not (out / "sft" / "stage_done.json").exists() and not (out / "sft" / "hf").exists()
    assert not (out / "grpo").exists()
    (out / "sft" / ".hf.tmp-0123abcd").mkdir()   # as an export killed midway leaves it
    _chain(tmp_path, out)
    assert (out / "sft" / "hf" / "config.json").is_file() and (out / "grpo" / "stage_done.json").is_file()
    assert not list((out / "sft").glob(".hf.tmp-*"))
    assert [r["step"] for r in metrics(out / "sft")] == [1, 2, 3]
    assert [r["step"] for r in metrics(out / "grpo")] == [1, 2]


@pytest.mark.slow
def test_a_finished_chain_grows_and_its_stages_lengthen(tmp_path: Path, reward_module) -> None:
    """After the chain finished: a stage added after the last one starts from the last one's result (exported
    then: the last stage had no export); the last stage's max_steps raised -> it trains on; an earlier stage's
    raised while later stages started from its result -> a ConfigError saying what to do."""
    out = tmp_path / "run"
    _chain(tmp_path, out)
    assert not (out / "grpo" / "hf").exists()
    third = ("stages=[{name: sft, overrides: {train: {max_steps: 3}}}, "
             "{name: grpo, overrides: {train: {objective: grpo, max_steps: 2}, optim: {lr: 0.001}, "
             "rl: {reward: {weights: {format: 0.5}}}}}, {name: sft2, overrides: {train: {max_steps: 1}}}]")
    _chain(tmp_path, out, third)
    assert (out / "grpo" / "hf" / "config.json").is_file() and (out / "sft2" / "stage_done.json").is_file()
    assert [r["step"] for r in metrics(out / "sft2")] == [1]
    _chain(tmp_path, out, third, "stages.sft2.train.max_steps=2")   # the last stage lengthened: trains on
    assert [r["step"] for r in metrics(out / "sft2")] == [1, 2]
    with pytest.raises(ConfigError, match=r"stage 'sft' finished with 3 steps and the recipe now asks 5, but the "
                                          r"stages after it \(grpo, sft2\) started from its 3-step result"):
        _chain(tmp_path, out, third, "stages.sft.train.max_steps=5")


def test_a_grpo_stage_prompt_pattern_matching_nothing_fails_before_the_first_stage(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """``stages.grpo.rl.prompts`` with a typo: the chain stops at once naming the pattern (a one-line
    ``ShardPatternError``), not after the SFT stage trained (for hours at full size)."""
    import rynnscale.train.trainer as trainer
    from rynnscale.data.reader import ShardPatternError
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.train.stages import run_stages

    def no_training(*a, **k):
        raise AssertionError("a stage trained before the GRPO stage's prompts were checked")

    monkeypatch.setattr(trainer, "train_run", no_training)
    cfg = load_config(TINY_GRPO, [f"run.output_dir={tmp_path / 'run'}", f"stages.grpo.rl.prompts=[{tmp_path}/x*.tar]"])
    with pytest.raises(ShardPatternError, match=rf"shard pattern '{re.escape(str(tmp_path))}/x\*.tar' matches no file"):
        run_stages(cfg, DistContext())
