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



def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class KillOneDataWorkerDuringASlowSave:
    """After step 1 (its checkpoint is being written in the background, held back by ``gate``), SIGKILL one of two
    data workers; note whether the other one runs on while the save is held back, then let the save finish."""

    def __init__(self, gate, caplog):
        self.gate, self.caplog, self.before = gate, caplog, set(multiprocessing.active_children())
        self.survivor_alive_during_save = self.said_before_save_finished = None

    def on_step_end(self, step, ctx):
        import threading

        if step != 1:
            return
        workers = sorted(set(multiprocessing.active_children()) - self.before, key=lambda p: p.pid)
        assert len(workers) == 2, "the test wants two data worker processes"

        def release():   # once the other worker is gone, or after 15 s of it running on
            deadline = time.monotonic() + 15
            while _alive(workers[1].pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            self.survivor_alive_during_save = _alive(workers[1].pid)
            time.sleep(0.5)
            self.said_before_save_finished = any("finishing the background save of step_000001" in r.getMessage()
                                                 and "data workers died" in r.getMessage() for r in self.caplog.records)
            self.gate.set()
        threading.Thread(target=release, daemon=True).start()
        os.kill(workers[0].pid, signal.SIGKILL)
        time.sleep(30)   # torch's SIGCHLD handler raises in here


def test_a_dead_data_worker_stops_the_others_and_the_pending_save_still_commits(tmp_path: Path, monkeypatch,
                                                                              caplog) -> None:
    """``checkpoint.async_save`` with step 1's save still writing when a data worker dies: the run waited for the save
    first, with a collective the other ranks (in their step, under torchrun) could not join, and only then
    stopped the other workers, which kept running (holding memory) meanwhile, with nothing said. Now the others stop at
    once, the error is logged, the pending save is committed without a collective, and the run ends with the
    DataWorkerError."""
    import threading

    from ckpt_worker import gated_async_save

    from rynnscale.checkpoint.dcp import find_resume_checkpoint, list_checkpoints

    gate = threading.Event()
    gated_async_save(monkeypatch, gate)
    out = tmp_path / "run"
    cfg = _cfg(out, tmp_path / "data", 2, "data.num_workers=2", "checkpoint.every_steps=1",
               "checkpoint.async_save=true")
    hook = KillOneDataWorkerDuringASlowSave(gate, caplog)
    with caplog.at_level(logging.ERROR), pytest.raises(DataWorkerError, match=r"rank 0: one of its 2 data workers died"):
        run_training(cfg, hooks=[hook])
    assert hook.survivor_alive_during_save is False, "the other data worker ran on while the save was waited for"
    assert hook.said_before_save_finished, "nothing said while the save was waited for"
    assert [(e.path.name, e.complete) for e in list_checkpoints(out)] == [("step_000001", True)]
    assert find_resume_checkpoint(out, "auto") == out / "checkpoints" / "step_000001"

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
