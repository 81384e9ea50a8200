"""Data errors through the real trainer, reported in one line.

A data worker killed in the middle of training (the kernel's OOM killer sends SIGKILL): torch's SIGCHLD handler
raises ``RuntimeError: DataLoader worker (pid N) is killed by signal: Killed.`` wherever the main thread is, in the
middle of a training step too. The run used to end with that traceback, naming neither the rank nor what to
change; it ends with a one-line ``DataWorkerError`` saying what to do, and the run status says failed. A shard that
changed since its manifest was written (truncated) stops the run in one line naming it, with data workers too (the
report held the worker's whole traceback, then the main process' one)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from rynnscale.config import load_config
from rynnscale.data.loader import DataWorkerError
from rynnscale.train.trainer import run_training
from tests.train.test_resume_guards import REPO, _cfg


class KillDataWorkers:
    """After step 1, SIGKILL this process's data workers and keep the main thread busy, as a step would."""

    def on_step_end(self, step, ctx):
        if step != 1:
            return
        workers = multiprocessing.active_children()
        assert workers, "the test wants data worker processes"
        for p in workers:
            os.kill(p.pid, signal.SIGKILL)
        time.sleep(30)   # torch's SIGCHLD handler raises in here


def test_a_data_worker_killed_mid_step_is_a_one_line_error(tmp_path: Path) -> None:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _cfg(tmp_path / "run", tmp_path / "data", 4, "data.num_workers=1")
        t0 = time.monotonic()
        with pytest.raises(DataWorkerError, match=r"rank 0: one of its 1 data workers died \(DataLoader worker "
                                                  r"\(pid \d+\) is killed by signal: Killed\. ?\).*data.num_workers"):
            run_training(cfg, hooks=[KillDataWorkers()])
        assert time.monotonic() - t0 < 60
    finally:
        torch.set_num_threads(n)
    status = json.loads((tmp_path / "run" / "run_status.json").read_text())
    assert status["status"] == "failed" and status["error"].startswith("DataWorkerError: rank 0")


def test_a_truncated_shard_is_reported_in_one_line_with_data_workers(tmp_path: Path, caplog) -> None:
    from rynnscale.data.reader import ShardIntegrityError

    data = tmp_path / "data"
    run_training(_cfg(tmp_path / "first", data, 1))   # writes the synthetic shards and their manifest.json
    shard = sorted(data.glob("*.tar"))[-1]
    shard.write_bytes(shard.read_bytes()[:-4096])
    with caplog.at_level(logging.ERROR), pytest.raises(ShardIntegrityError):
        run_training(load_config(REPO / "recipes" / "demo_tiny.yaml", [
            f"run.output_dir={tmp_path / 'run'}", "train.max_steps=2", f"data.train_shards={data}",
            "train.micro_batch_tokens=384", "data.num_workers=1", "logging.progress=false", "logging.plot=false",
            "logging.wandb.mode=disabled"]))
    failed = [r.getMessage() for r in caplog.records if "failed with" in r.getMessage()]
    assert len(failed) == 1 and "Traceback" not in failed[0], failed
    assert failed[0].endswith(f"failed with ShardIntegrityError: shard {shard}: {shard.stat().st_size} bytes but its "
                              f"manifest.json records {shard.stat().st_size + 4096}; the shard is truncated or was "
                              "replaced (rewrite it or its manifest)")


def test_a_synthetic_set_of_other_settings_is_a_config_error(tmp_path: Path) -> None:
    """A recipe's data.synthetic changed on an existing run directory: the generator refuses the directory, and the
    run ended with that ValueError's traceback (exit 1); now a ConfigError (one line, exit 2) naming the keys."""
    from rynnscale.config import ConfigError
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.train.data_files import prepare_data_files

    def cfg(n: int):
        return load_config(REPO / "recipes" / "demo_tiny.yaml", [
            f"run.output_dir={tmp_path / 'run'}", f"data.synthetic.num_samples={n}",
            "data.synthetic.samples_per_shard=2", "logging.progress=false"])

    prepare_data_files(cfg(2), DistContext())
    with pytest.raises(ConfigError, match=r"data\.synthetic: .*synthetic_data holds a dataset generated with other "
                                          r"settings \(num_samples: 2 -> 4\).*set data\.synthetic\.output_dir"):
        prepare_data_files(cfg(4), DistContext())
