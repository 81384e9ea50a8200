"""Non-finite steps (issue 17): an inf/NaN loss or gradient norm skips the optimiser step, is counted in
``metrics.jsonl`` as ``nonfinite_steps``, never produces a checkpoint, and ``train.max_nonfinite_steps`` in a
row stop the run without saving (so NaN checkpoints can never push good ones out under keep_last)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rynnscale.config import load_config
from rynnscale.train import step, trainer

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, **over):
    items = {"run.output_dir": tmp_path / "run", "train.max_steps": 5, "data.synthetic.num_samples": 24,
             "data.synthetic.samples_per_shard": 24, "data.synthetic.output_dir": tmp_path / "data",
             "checkpoint.every_steps": 1, "checkpoint.keep_last": 9, "logging.progress": "false",
             "logging.plot": "false", "logging.wandb.mode": "disabled", "data.shuffle_buffer": 8,
             "data.pack_window": 8, **over}
    return load_config(REPO / "recipes" / "demo_tiny.yaml", [f"{k}={v}" for k, v in items.items()])


def _nan_grad_norm_at(monkeypatch, bad_steps: set[int]):
    real = step.clip_grad_norm_
    calls = {"n": 0}

    def fake(params, max_norm, group):
        calls["n"] += 1
        total = real(params, max_norm, group)
        return torch.full_like(total, float("nan")) if calls["n"] in bad_steps else total
    monkeypatch.setattr(step, "clip_grad_norm_", fake)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_one_nonfinite_step_is_skipped_and_not_saved(tmp_path, monkeypatch):
    _nan_grad_norm_at(monkeypatch, {3})
    run = trainer.run_training(_cfg(tmp_path, **{"train.max_steps": 4}))
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_000001", "step_000002", "step_000004"]
    m = _metrics(run)
    assert [r["nonfinite_steps"] for r in m] == [0, 0, 1, 1]
    # the NaN gradient norm is JSON null (metrics.jsonl has no NaN token for strict readers)
    assert m[2]["grad_norm"] is None and all(r["grad_norm"] is not None for r in m[:2] + m[3:])


def test_nonfinite_steps_in_a_row_abort_without_saving(tmp_path, monkeypatch):
    _nan_grad_norm_at(monkeypatch, {3, 4, 5})
    with pytest.raises(trainer.NonFiniteLossError, match=r"non-finite for 2 steps in a row.*max_nonfinite_steps=2"):
        trainer.run_training(_cfg(tmp_path, **{"train.max_nonfinite_steps": 2}))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001", "step_000002"]
    assert (root / "latest").read_text().strip() == "step_000002"


def test_a_preemption_at_a_nonfinite_step_saves_the_next_step(tmp_path, monkeypatch):
    """SIGTERM whose step turns out non-finite: that step is not saved (never a NaN checkpoint), and the run used to
    exit there anyway, logging "saved step N" and losing everything since the last periodic checkpoint. It now
    trains one more step, saves it and exits."""
    import os
    import signal

    class Term:
        def on_step_end(self, step_no, ctx):
            if step_no == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    _nan_grad_norm_at(monkeypatch, {3})
    run = trainer.run_training(_cfg(tmp_path, **{"train.max_steps": 8, "checkpoint.every_steps": 0}), hooks=[Term()])
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_000004"]
    assert [r["step"] for r in _metrics(run)][-1] == 4
    assert json.loads((run / "run_status.json").read_text())["status"] == "preempted"


def test_the_nonfinite_count_goes_on_after_a_resume(tmp_path, monkeypatch):
    """``nonfinite_steps`` is the run's count so far, but a resumed run started it at 0 again: a run with a skipped
    step read 1, 1 and then 0, 0 after a restart, as if the skip had never happened. The checkpoint now keeps it."""
    _nan_grad_norm_at(monkeypatch, {3})
    trainer.run_training(_cfg(tmp_path, **{"train.max_steps": 4, "checkpoint.every_steps": 0}))   # saves step 4
    monkeypatch.undo()
    run = trainer.run_training(_cfg(tmp_path, **{"train.max_steps": 6, "checkpoint.every_steps": 0}))   # resumes there
    assert [(r["step"], r["nonfinite_steps"]) for r in _metrics(run)] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1),
                                                                          (6, 1)]
