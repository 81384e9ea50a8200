"""Multi-process (gloo, CPU) checkpoint test with FSDP2 ``fully_shard`` on a tiny Qwen3-VL-MoE: exact
continuation, 2 ranks, 6 steps straight == 3 steps + save + new processes load + 3 steps, every rank's losses
bit for bit. (Resharding, 4 ranks -> 2 -> 1 process with every tensor and moment equal: test_resume_reshard.py.)
"""

from __future__ import annotations

import json

import ckpt_worker as w
import pytest

pytestmark = pytest.mark.slow


def check(procs) -> None:
    failed = [(r, p) for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, "\n".join(f"rank {r} exit {p.returncode}:\n{p.stderr[-2500:]}" for r, p in failed)


def test_exact_continuation_two_ranks_fsdp(tmp_path):
    run = tmp_path / "run"
    check(w.launch(2, [str(run), "--total", "6", "--save-at", "3", "--fsdp", "--losses", str(tmp_path / "straight")]))
    check(w.launch(2, [str(run), "--total", "6", "--fsdp", "--resume", str(run / "checkpoints/step_000003"),
                       "--losses", str(tmp_path / "resumed")]))
    for r in range(2):
        straight = json.loads((tmp_path / f"straight.rank{r}.json").read_text())
        resumed = json.loads((tmp_path / f"resumed.rank{r}.json").read_text())
        assert sorted(resumed, key=int) == ["4", "5", "6"]
        assert {k: straight[k] for k in resumed} == resumed, f"rank {r}"
    # the ranks trained on different data: a per-rank state mix-up would be visible
    assert json.loads((tmp_path / "straight.rank0.json").read_text()) != \
        json.loads((tmp_path / "straight.rank1.json").read_text())
