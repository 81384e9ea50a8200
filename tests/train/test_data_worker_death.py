"""A data worker killed in the middle of training (the kernel's OOM killer sends SIGKILL): torch's SIGCHLD handler
raises ``RuntimeError: DataLoader worker (pid N) is killed by signal: Killed.`` wherever the main thread is, in the
middle of a training step too. The run used to end with that traceback, naming neither the rank nor what to
change; it ends with a one-line ``DataWorkerError`` saying what to do, and the run status says failed."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from rynnscale.data.loader import DataWorkerError
from rynnscale.train.trainer import run_training
from tests.train.test_resume_guards import _cfg


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
