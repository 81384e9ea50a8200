"""Two runs in the same run.output_dir at once: the second is refused naming the holder (issue 15).

The lock is an exclusive ``fcntl.flock`` on ``run.output_dir/.lock`` held by rank 0 for the whole run; the kernel
drops it when the holder exits, however it exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rynnscale.train.setup import RunDirLockedError, run_dir_lock

ROOT = Path(__file__).resolve().parents[2]

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from rynnscale.train.setup import run_dir_lock
    with run_dir_lock(Path(sys.argv[1])):
        Path(sys.argv[2]).write_text("locked")
        time.sleep(60)
""")


def _start_holder(run_dir: Path, tmp_path: Path) -> subprocess.Popen:
    flag = tmp_path / "flag"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(flag)], env=env)
    for _ in range(300):
        if flag.exists():
            return proc
        if proc.poll() is not None:
            pytest.fail(f"holder exited with {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("holder did not take the lock")


def test_second_run_in_the_same_output_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start_holder(run_dir, tmp_path)
    try:
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == proc.pid and holder["host"]
        with pytest.raises(RunDirLockedError, match=rf"in use by another run.*pid {proc.pid}.*\.lock"):
            with run_dir_lock(run_dir):
                pass
    finally:
        proc.kill()
        proc.wait()
    with run_dir_lock(run_dir):     # the kernel dropped the dead holder's lock: the next run goes ahead
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()


def test_lock_is_released_on_an_exception(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with run_dir_lock(tmp_path):
            raise RuntimeError("boom")
    with run_dir_lock(tmp_path):
        pass


def test_trainer_takes_the_lock_for_the_run(tmp_path: Path) -> None:
    """run_training refuses a run directory another process holds, before any work."""
    from rynnscale.config.load import load_config
    from rynnscale.train.trainer import run_training

    run_dir = tmp_path / "run"
    proc = _start_holder(run_dir, tmp_path)
    holders_status = '{"status": "running", "job": "slurm:1"}\n'   # the holder's, as its rank 0 wrote it
    (run_dir / "run_status.json").write_text(holders_status)
    try:
        cfg = load_config(ROOT / "recipes" / "demo_tiny.yaml", [f"run.output_dir={run_dir}", "train.max_steps=1",
                                                                "logging.wandb.mode=disabled"])
        with pytest.raises(RunDirLockedError, match=f"pid {proc.pid}"):
            run_training(cfg)
        assert not (run_dir / "config.yaml").exists()
        # the refused run wrote no status of its own over the holder's (a monitor would see the wrong job)
        assert (run_dir / "run_status.json").read_text() == holders_status
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_every_rank_of_a_refused_torchrun_job_says_why_in_one_line(tmp_path: Path) -> None:
    """Two ranks under torchrun and a directory another run holds: every rank fails at once with the lock's one-line
    message (no traceback), not rank 1 with a gloo "Connection closed by peer" that names nothing."""
    run_dir = tmp_path / "run"
    proc = _start_holder(run_dir, tmp_path)
    try:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        job = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "rynnscale",
             "train", str(ROOT / "recipes" / "demo_tiny.yaml"), f"run.output_dir={run_dir}", "train.max_steps=1",
             "logging.wandb.mode=disabled", f"data.synthetic.output_dir={tmp_path / 'data'}", "parallel.timeout_s=60"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        proc.kill()
        proc.wait()
    log = job.stdout + job.stderr
    assert job.returncode != 0
    lines = [line for line in log.splitlines() if "failed with" in line]
    assert len(lines) == 2, log[-4000:]
    assert all(any(f"rank {rank}/2 on" in line for line in lines) for rank in (0, 1)), log[-4000:]
    for line in lines:
        assert "failed with DirectoryLockedError" in line, log[-4000:]
        assert f"pid {proc.pid}" in line and "in use by another run" in line, log[-4000:]
    assert str(ROOT / "rynnscale") not in log, log[-4000:]   # no traceback through the package
    assert not (tmp_path / "data").exists()   # refused before any work
