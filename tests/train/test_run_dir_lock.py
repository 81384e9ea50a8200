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
    try:
        cfg = load_config(ROOT / "recipes" / "demo_tiny.yaml", [f"run.output_dir={run_dir}", "train.max_steps=1",
                                                                "logging.wandb.mode=disabled"])
        with pytest.raises(RunDirLockedError, match=f"pid {proc.pid}"):
            run_training(cfg)
        assert not (run_dir / "config.yaml").exists()
    finally:
        proc.kill()
        proc.wait()
