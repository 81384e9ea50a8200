"""Exact resume through the real trainer and CLI (CPU, fp32): the shortened demo recipe runs 2N = 12 steps
straight (a checkpoint every 3); a second run is killed with SIGKILL (the whole process tree) at a random
moment after step N's checkpoint and restarted with ``checkpoint.resume=auto``: its metrics.jsonl must list
every step once, with the losses of the straight run bit for bit (JSON floats round-trip exactly), for
1 process and for a Qwen3.5-MoE on 2 processes with ``ep=2`` (torchrun, gloo; 4 processes with ``ep=2`` killed
and resumed on another layout: test_resume_elastic.py). The resumed run rewrites the metrics tail the killed
run logged after its checkpoint. Also: SIGTERM saves at the step boundary and exits 0 (with
``checkpoint.async_save=true``: the pending save is finished before exiting; the resume from it is exact), and the automatic HF export of the last checkpoint loads in transformers."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch
from resume_run import (
    EVERY,
    STEPS,
    command,
    kill_at_random,
    latest_step,
    losses,
    metrics,
    overrides,
    run,
    start,
    wait_for,
)

RESUMED = re.compile(r"resumed exactly from \S+ at step (\d+)")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume_data")


def _straight(tmp_path_factory, data_dir, nproc: int, ep: int, extra=(), steps: int = STEPS,
              every: int = EVERY) -> Path:
    out = tmp_path_factory.mktemp(f"straight_{nproc}") / "run"
    rc, log = run(command(nproc, overrides(out, data_dir, steps=steps, every=every, ep=ep, extra=extra)))
    assert rc == 0, log[-4000:]
    assert [s for s, _, _ in losses(out)] == list(range(1, steps + 1))
    return out


@pytest.fixture(scope="module")
def straight_1(tmp_path_factory, data_dir):
    return _straight(tmp_path_factory, data_dir, 1, 1, extra=("checkpoint.export_hf=true",))


def _kill_and_resume(nproc: int, ep: int, out: Path, data_dir: Path, straight: Path, extra=(), steps: int = STEPS,
                     every: int = EVERY) -> None:
    """Kill at a random moment after the checkpoint of step ``N = steps // 2`` (``every`` divides it)."""
    N = steps // 2
    cmd = command(nproc, overrides(out, data_dir, steps=steps, every=every, ep=ep, extra=extra))
    how = kill_at_random(start(cmd), lambda: latest_step(out) >= N, 2.0)
    killed_after = max((r["step"] for r in metrics(out)), default=0)
    where = f"(step {N}'s checkpoint, then {how}; last logged step {killed_after})"
    assert killed_after < steps, f"the run finished before the kill {where}"

    rc, log = run(cmd)
    assert rc == 0, f"{where}\n{log[-4000:]}"
    m = RESUMED.search(log)
    assert m, f"no exact resume in the log {where}:\n{log[-3000:]}"
    assert N <= int(m.group(1)) <= killed_after, where
    got, want = losses(out), losses(straight)
    assert [s for s, _, _ in got] == list(range(1, steps + 1)), f"every step once {where}"
    for (step, loss, aux), (_, want_loss, want_aux) in zip(got, want):
        assert (loss, aux) == (want_loss, want_aux), f"step {step}: {loss!r} != {want_loss!r} {where}"


@pytest.mark.slow
def test_kill9_then_auto_resume_is_exact_1_process(tmp_path, data_dir, straight_1):
    _kill_and_resume(1, 1, tmp_path / "run", data_dir, straight_1)


@pytest.mark.slow
def test_kill9_then_auto_resume_is_exact_qwen35_moe_2_processes_ep2(tmp_path, tmp_path_factory, data_dir,
                                                                   qwen35_moe_init):
    """The RynnBrain 1.1 family resumes exactly too: a transformers Qwen3.5-MoE directory (Gated DeltaNet and
    gated attention layers, routed + shared experts) trained on 2 processes with ep=2, killed, resumed; 8 steps,
    a checkpoint every 2 (its steps are the suite's slowest)."""
    extra = (f"model.init_from={qwen35_moe_init}",)
    straight = _straight(tmp_path_factory, data_dir, 2, 2, extra=extra, steps=8, every=2)
    assert all(r["world_size"] == 2 for r in metrics(straight))
    _kill_and_resume(2, 2, tmp_path / "run", data_dir, straight, extra=extra, steps=8, every=2)


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_exits_0(tmp_path, data_dir, straight_1):
    out = tmp_path / "run"
    # no periodic checkpoints (only the SIGTERM one), asynchronous saves (the straight run's are synchronous)
    cmd = command(1, overrides(out, data_dir, every=0, extra=("checkpoint.async_save=true",)))
    p = start(cmd)
    wait_for(p, lambda: (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3)
    p.send_signal(signal.SIGTERM)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 0, log[-4000:]
    stopped = metrics(out)[-1]["step"]
    assert 3 <= stopped < STEPS and latest_step(out) == stopped, log[-3000:]
    rc, log = run(cmd)
    assert rc == 0, log[-4000:]
    assert int(RESUMED.search(log).group(1)) == stopped
    assert losses(out) == losses(straight_1)


@pytest.mark.slow
def test_auto_export_loads_in_transformers(straight_1):
    import transformers

    from rynnscale.checkpoint.export import load_checkpoint_tensor

    hf_dir = straight_1 / "hf"
    model = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok("<traj>")["input_ids"]
    ckpt = straight_1 / "checkpoints" / f"step_{STEPS:06d}"
    sd = model.state_dict()
    for name in ("model.language_model.embed_tokens.weight", "model.language_model.layers.0.mlp.experts.down_proj"):
        want = load_checkpoint_tensor(ckpt, name)
        got = sd[name]
        if got.shape != want.shape:   # transformers may keep the hub (transposed) expert layout
            got = got.transpose(-1, -2)
        assert torch.equal(got, want), name
