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
