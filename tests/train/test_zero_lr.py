"""``optim.lr=0`` (a dry run, checking a pipeline, exporting an unchanged model through the trainer) is accepted
with one warning: every step runs, nothing divides by the learning rate (warmup, schedule, metrics), and no weight
changes, weight decay included; a negative learning rate is still refused."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from rynnscale.config import ConfigError, load_config
from rynnscale.train.build import build_model
from rynnscale.train.trainer import run_training

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, *extra: str):
    return load_config(REPO / "recipes" / "demo_tiny.yaml", [
        f"run.output_dir={tmp_path / 'run'}", "train.max_steps=3", "data.synthetic.num_samples=32",
        "data.synthetic.samples_per_shard=16", f"data.synthetic.output_dir={tmp_path / 'data'}",
        "train.micro_batch_tokens=384", "data.num_workers=0", "logging.progress=false", "logging.plot=false",
        "logging.wandb.mode=disabled", *extra])


def test_zero_learning_rate_runs_with_one_warning_and_changes_nothing(tmp_path, caplog):
    class Snapshot:
        def on_step(self, step, record, model, ctx):
            self.params = {k: v.detach().clone() for k, v in model.state_dict().items()}

    snap = Snapshot()
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "optim.lr=0", "optim.weight_decay=0.1", "optim.warmup_steps=2")
    with caplog.at_level(logging.WARNING, logger="rynnscale"):
        run_training(cfg, hooks=[snap])
    assert sum("optim.lr=0" in r.getMessage() for r in caplog.records) == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == [0.0, 0.0, 0.0]
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    assert all(r["grad_norm"] > 0 for r in records)   # the steps ran: gradients, clipping, optimiser
    _, init = build_model(cfg.model, "cpu", cfg.run.seed)
    moved = [k for k, v in init.state_dict().items() if not torch.equal(v, snap.params[k])]
    assert not moved, moved[:5]


def test_negative_learning_rate_is_still_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.lr' = -0.001 must be >= 0"):
        _cfg(tmp_path, "optim.lr=-1e-3")
