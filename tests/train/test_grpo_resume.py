"""GRPO through the real trainer and CLI, killed with SIGKILL and resumed (CPU, fp32): a shortened demo recipe with
``train.objective=grpo`` runs 6 optimiser steps straight, 2 per rollout (``rl.policy_steps=2``), a checkpoint after
every step -- so checkpoints fall inside rollouts too. A second run is killed at a random moment after step 3's
checkpoint (the middle of the second rollout) and restarted: every step is logged once and the resumed steps
have the straight run's losses, rewards and KL bit for bit (same rollouts: the saved rollout for the rest of an
interrupted one, the same seeds for the next). A user reward function (``module:function``) gives the answers
rewards a random-init model cannot earn from the tags."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest
from resume_run import command, kill_tree, latest_step, metrics, overrides, run, start, wait_for

STEPS, KILL_AFTER = 10, 3   # 7 steps after the checkpoint: a kill within 1.5 s lands before the end
RESUMED = re.compile(r"resumed exactly from \S+ at step (\d+)")
REWARD = '''
def by_length(answer, reference, key):
    """A reward any answer earns: its length's position in a cycle of 7 (varies between samples)."""
    return (len(answer) % 7) / 6
'''


def grpo_overrides(out: Path, data: Path, reward_dir: Path) -> list[str]:
    return overrides(out, data, steps=STEPS, every=1, extra=(
        "train.objective=grpo", "model.arch.text_config.num_hidden_layers=2", "train.micro_batch_tokens=600",
        "rl.prompts_per_step=2", "rl.group_size=3", "rl.max_new_tokens=6", "rl.policy_steps=2",
        "rl.reward.weights={format: 0.5}", "rl.reward.functions={grpo_test_reward:by_length: 1.0}",
        "optim.lr=1e-3", "optim.warmup_steps=0"))


def fields(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["aux_loss"], r["kl"], r.get("reward_mean"), r.get("rollout_step"))
            for r in metrics(out)]


@pytest.mark.slow
def test_kill_mid_grpo_and_resume_exactly(tmp_path: Path) -> None:
    reward_dir = tmp_path / "reward"
    reward_dir.mkdir()
    (reward_dir / "grpo_test_reward.py").write_text(REWARD)
    env = {"PYTHONPATH": f"{Path(__file__).resolve().parents[2]}:{reward_dir}"}
    data = tmp_path / "data"
    straight = tmp_path / "straight"
    rc, log = run(command(1, grpo_overrides(straight, data, reward_dir)), env_extra=env)
    assert rc == 0, log[-4000:]
    want = fields(straight)
    assert [f[0] for f in want] == list(range(1, STEPS + 1))
    assert [f[5] for f in want] == [1, None, 2, None, 3, None, 4, None, 5, None]   # a rollout every 2 steps
    assert any(f[4] and f[4] > 0 for f in want) and any(f[3] > 0 for f in want[1:])

    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 1.5)
    out = tmp_path / "killed"
    cmd = command(1, grpo_overrides(out, data, reward_dir))
    p = start(cmd, env)
    wait_for(p, lambda: latest_step(out) >= KILL_AFTER)
    time.sleep(delay)
    kill_tree(p)
    p.communicate()
    killed_after = max((r["step"] for r in metrics(out)), default=0)
    where = f"(kill {delay:.2f}s after step {KILL_AFTER}'s checkpoint, seed {seed}, last logged step {killed_after})"
    assert killed_after < STEPS, f"the run finished before the kill {where}"
    rc, log = run(cmd, env_extra=env)
    assert rc == 0, f"{where}\n{log[-4000:]}"
    m = RESUMED.search(log)
    assert m and KILL_AFTER <= int(m.group(1)) <= killed_after, f"no exact resume {where}:\n{log[-3000:]}"
    got = fields(out)
    assert [f[0] for f in got] == list(range(1, STEPS + 1)), f"every step once {where}"
    assert got == want, f"{where}\n{got}\n!=\n{want}"
