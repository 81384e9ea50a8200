"""Fault tolerance: under ``torchrun --max-restarts K`` a rank that crashes (injected by a test-only hook,
see train_with_hooks.py) makes torchrun restart the job, which resumes from its last checkpoint by itself
(``checkpoint.resume=auto``, the default) and finishes with exit code 0, every step logged once (the crashed attempt's step-3 line is rewritten by the
resumed run) and the losses of the same job run without a crash, bit for bit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from resume_run import command, losses, overrides, run

HOOKED = Path(__file__).resolve().parent / "train_with_hooks.py"


@pytest.mark.slow
def test_crashed_rank_restarts_and_resumes_from_last_checkpoint(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    steps, every, crash_at = 6, 2, 3
    # exactly one restart allowed for the one injected crash: a restarted round once read the crashed round's gloo
    # addresses from torchrun's agent store ("connectFullMesh ... Connection refused" on every restart of a loaded
    # machine); init_distributed now keys each round apart, and any spurious failure fails this test
    cmd = command(2, overrides(out, data, steps=steps, every=every, ep=2), script=HOOKED, max_restarts=1)
    rc, log = run(cmd, timeout=480, env_extra={"RYNNSCALE_TEST_CRASH_AT_STEP": str(crash_at), "RYNNSCALE_TEST_CRASH_RANK": "1"})
    assert rc == 0, log[-5000:]
    assert f"injected crash after step {crash_at} on rank 1" in log, log[-5000:]
    m = re.search(r"resumed exactly from (\S+) at step (\d+)", log)
    assert m and int(m.group(2)) == 2 and m.group(1).endswith("step_000002"), log[-5000:]
    got = losses(out)
    assert [s for s, _, _ in got] == list(range(1, steps + 1))
    # the same job without a crash logs bitwise-equal losses
    rc, log2 = run(command(2, overrides(tmp_path / "straight", data, steps=steps, every=every, ep=2)))
    assert rc == 0, log2[-4000:]
    assert got == losses(tmp_path / "straight")
