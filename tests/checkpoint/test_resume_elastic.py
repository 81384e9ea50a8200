"""Elastic data order through the real trainer (CPU, gloo, the shortened demo recipe, ``logging.sample_log``):
a step's samples depend on the global micro-batch count only, so

- a run stopped by SIGTERM on one layout and resumed on another (2 processes with ep=2 -> 1 process accumulating
  2, and 1 -> 2) trains every step on exactly the samples of a straight run on 1 process (nothing lost or
  repeated): the steps before the stop show that 2 processes train like 1 process accumulating 2, the steps
  after it that the resume on the other layout lost and repeated nothing;
- a run of 4 processes with ep=2 killed with SIGKILL (the whole process tree) at a random moment after a
  periodic checkpoint and resumed on 2 processes with ep=1 (``checkpoint.resume=auto``): the steps the killed
  run logged after its checkpoint are run again on the new layout, and every step matches a straight run.

Samples are compared exactly, losses within ``LAYOUT_REL`` with the MoE balance loss off
(``router_aux_loss_coef=0``). With it on (the demo: 0.001) two layouts optimise slightly different
objectives: the balance loss sums expert counts over the ranks of one micro-batch index, so 2 x 1 and 1 x 2
group the tokens differently, a near-tie top-k choice flips, and the losses drift apart (2 processes vs 1 x
grad_accum 2 on the CPU dev machine: rel 7.0e-5 at step 10, 3.7e-4 by step 20, 5.6e-3 by step 40). A bound
on that measures those flips, not the resume; without them the layouts agree to rel 1.2e-7 over 40 steps
(summation order only, no growth), so a reshard or data position off by anything shows."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
from resume_run import _children, command, kill_at_random, latest_step, metrics, overrides, run, start, wait_for

STEPS = 10
LAYOUT_REL = 1e-6
NO_BALANCE_LOSS = "model.arch.text_config.router_aux_loss_coef=0.0"


def _args(out: Path, data: Path, ga: int, ep: int, steps: int = STEPS, every: int = 0) -> list[str]:
    return overrides(out, data, steps=steps, every=every, ep=ep,
                     extra=(f"train.grad_accum={ga}", "logging.sample_log=true", NO_BALANCE_LOSS))


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def _compare(got: Path, want: Path, steps: int = STEPS) -> None:
    assert _samples(got) == _samples(want)
    g, w = metrics(got), metrics(want)
    assert [r["step"] for r in g] == list(range(1, steps + 1))
    # a step of filler micro-batches only logs loss 0 on every layout
    rel = [(abs(a["loss"] - b["loss"]) / abs(b["loss"]) if b["loss"] else math.inf * (a["loss"] != 0), a["step"])
           for a, b in zip(g, w)]
    worst = max(rel)
    assert worst[0] <= LAYOUT_REL, f"losses differ by rel {worst[0]:.2e} at step {worst[1]} (bound {LAYOUT_REL})"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("elastic_data")


def _straight(tmp_path_factory, data_dir: Path, nproc: int, ga: int, ep: int, steps: int = STEPS) -> Path:
    out = tmp_path_factory.mktemp(f"straight_{nproc}x{ga}") / "run"
    rc, log = run(command(nproc, _args(out, data_dir, ga, ep, steps)))
    assert rc == 0, log[-4000:]
    return out


@pytest.fixture(scope="module")
def straight_1x2(tmp_path_factory, data_dir):
    return _straight(tmp_path_factory, data_dir, 1, 2, 1)


def _stop_and_resume(tmp_path: Path, data_dir: Path, first: tuple[int, int, int], then: tuple[int, int, int],
                     steps: int = STEPS, after: int = 3) -> Path:
    """Run layout ``first`` = (processes, grad_accum, ep), SIGTERM it (every rank) after step ``after``,
    resume on ``then``; returns the run directory."""
    out = tmp_path / "run"
    p = start(command(first[0], _args(out, data_dir, first[1], first[2], steps)))
    wait_for(p, lambda: (out / "metrics.jsonl").is_file() and len(metrics(out)) >= after)
    pids = [p.pid] if first[0] == 1 else _children().get(p.pid, [])
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    log, _ = p.communicate(timeout=180)
    assert p.returncode == 0, log[-4000:]
    stopped = latest_step(out)
    assert after <= stopped < steps, log[-3000:]
    rc, log = run(command(then[0], _args(out, data_dir, then[1], then[2], steps)))
    assert rc == 0, log[-4000:]
    assert f"resumed elastically from {out / 'checkpoints'}" in log, log[-3000:]
    return out


@pytest.mark.slow
def test_sigterm_on_2_processes_resume_on_1(tmp_path, data_dir, straight_1x2):
    out = _stop_and_resume(tmp_path, data_dir, (2, 1, 2), (1, 2, 1))
    _compare(out, straight_1x2)
    assert {r["world_size"] for r in metrics(out)} == {1, 2}
    assert all(r["rank_cost_max_over_mean"] >= 1.0 and r["rank_time_max_over_mean"] >= 1.0 for r in metrics(out))


@pytest.mark.slow
def test_sigterm_on_1_process_resume_on_2(tmp_path, data_dir, straight_1x2):
    _compare(_stop_and_resume(tmp_path, data_dir, (1, 2, 1), (2, 1, 2)), straight_1x2)


@pytest.mark.slow
def test_kill9_on_4_processes_ep2_resume_on_2_ep1(tmp_path, tmp_path_factory, data_dir):
    # 4 micro-batches per step on every layout: the reference is 1 process accumulating 4; fewer steps (4
    # processes on 2 cores are slow)
    steps, every = 6, 2
    straight = _straight(tmp_path_factory, data_dir, 1, 4, 1, steps=steps)
    out = tmp_path / "run"
    how = kill_at_random(start(command(4, _args(out, data_dir, 1, 2, steps, every))),
                         lambda: latest_step(out) >= every, 2.0)
    killed_after = max((r["step"] for r in metrics(out)), default=0)
    where = f"(step {every}'s checkpoint, then {how}; last logged step {killed_after})"
    assert killed_after < steps, f"the run finished before the kill {where}"
    resumed_at = latest_step(out)
    rc, log = run(command(2, _args(out, data_dir, 2, 1, steps, every)))
    assert rc == 0, f"{where}\n{log[-4000:]}"
    assert f"resumed elastically from {out / 'checkpoints'}" in log, log[-3000:]
    _compare(out, straight, steps=steps)
    assert [r["world_size"] for r in metrics(out)] == [4] * resumed_at + [2] * (steps - resumed_at), where


def _spoil_videos(data: Path, keep_every: int) -> int:
    """Overwrite the video bytes of all but every ``keep_every``-th sample with zeros, in place (tar and
    sizes intact, so only decoding fails); returns how many were spoiled."""
    import tarfile

    spoiled = 0
    for shard in sorted(data.glob("*.tar")):
        with tarfile.open(shard) as tf:
            spans = [(m.offset_data, m.size) for m in tf.getmembers() if m.name.endswith((".mp4", ".mkv", ".webm"))]
        with open(shard, "r+b") as f:
            for i, (off, size) in enumerate(spans):
                if i % keep_every:
                    f.seek(off)
                    f.write(b"\0" * size)
                    spoiled += 1
    return spoiled


@pytest.mark.slow
def test_packs_gone_bad_keep_ranks_aligned(tmp_path):
    """Most clips undecodable (so whole packs go bad): 2 processes (ep=2) and 1 process accumulating 2 still
    train on the same samples at every step, with losses within LAYOUT_REL; the rank left without a pack runs a
    filler micro-batch (no deadlock, no shift against the other rank's steps)."""
    from rynnscale.data_pipelines.shard_stats import cost_hints
    from rynnscale.data_pipelines.synthetic import generate_synthetic

    data, steps = tmp_path / "data", 6
    # the converters' exact hints: samples are packed unseen, so a bad clip is only found by the rank decoding it
    generate_synthetic(data, 64, seed=2, samples_per_shard=16, progress=False, cost_fn=cost_hints)
    assert _spoil_videos(data, keep_every=4) > 30
    bad_ok = ("data.max_bad_fraction=1.0", "data.synthetic.num_samples=0", f"data.train_shards=[{data}/*.tar]",
              NO_BALANCE_LOSS)
    one = tmp_path / "one"
    rc, log1 = run(command(1, overrides(one, data, steps=steps, every=0, extra=bad_ok + (
        "train.grad_accum=2", "logging.sample_log=true"))))
    assert rc == 0, log1[-4000:]
    two = tmp_path / "two"
    rc, log2 = run(command(2, overrides(two, data, steps=steps, every=0, ep=2, extra=bad_ok + (
        "train.grad_accum=1", "logging.sample_log=true"))))
    assert rc == 0, log2[-4000:]
    assert "micro-batches are fillers" in log2, log2[-3000:]
    assert "skipping bad sample" in log1
    _compare(two, one, steps=steps)
