"""A save that fails on one rank fails on every rank at once, naming the rank and its error. Before, the ranks
that had not failed waited at the save's next barrier (or inside DCP's collectives) until the process group's
timeout (``parallel.timeout_s``, 30 minutes by default) and then died of a timeout that named nothing."""

from __future__ import annotations

import time

import pytest
import torch
from dist_helpers import run_ranks

TIMEOUT_S = 120   # dist_helpers' process-group timeout: a rank left waiting would take this long


def _save_with_one_rank_failing(rank: int, world: int, *, out: str, where: str, failing_rank: int):
    import rynnscale.checkpoint.dcp as dcp

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    if rank == failing_rank:
        def broken(*_a, **_k):
            raise OSError(5, "Input/output error (injected)")
        if where == "commit":
            dcp._commit = broken
        elif where == "rank_file":
            real = dcp._write_json
            dcp._write_json = lambda path, obj: broken() if path.name.startswith("rank") else real(path, obj)
        elif where == "mkdir":
            dcp.CheckpointManager.remove_stale_tmp = broken
    mgr = dcp.CheckpointManager(out, keep_last=2)
    t0 = time.monotonic()
    try:
        mgr.save(1, model, opt)
    except Exception as e:   # noqa: BLE001 - what each rank raised is the result
        return {"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


@pytest.mark.slow
@pytest.mark.parametrize("where, failing_rank", [("commit", 0), ("rank_file", 1), ("mkdir", 0)])
def test_a_save_failing_on_one_rank_fails_on_all_at_once(tmp_path, where, failing_rank):
    out = tmp_path / "run"
    results = run_ranks(_save_with_one_rank_failing, 2, tmp_path / "ranks", out=str(out), where=where,
                        failing_rank=failing_rank)
    for rank, r in enumerate(results):
        assert r["error"] == "CheckpointError", (rank, r)
        assert r["seconds"] < TIMEOUT_S / 4, (rank, r)   # no rank waited for a timeout
    other = results[1 - failing_rank]
    assert f"rank {failing_rank}" in other["message"] and "Input/output error (injected)" in other["message"], other
    left = list((out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []
    assert not any(p.name.startswith("step_000001") for p in left), left


def _fail_on_rank0_with_a_save_pending(rank: int, world: int, *, out: str):
    import torch.distributed as dist

    import rynnscale.checkpoint.dcp as dcp

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    mgr = dcp.CheckpointManager(out, keep_last=2, async_save=True)
    mgr.save(1, model, opt)
    step = torch.ones(3)
    if rank == 0:   # this rank's run failed (a dead data worker); the other one is in its next step's collective
        t0 = time.monotonic()
        try:
            committed = mgr.wait_after_failure()
        finally:
            seconds = time.monotonic() - t0
            dist.all_reduce(step)   # (lets the other rank out of the step it is in)
        return {"committed": str(committed), "seconds": seconds}
    dist.all_reduce(step)
    return {"committed": str(mgr.wait_after_failure())}


@pytest.mark.slow
def test_a_failing_rank_commits_its_pending_save_without_the_other_ranks(tmp_path):
    """``checkpoint.async_save``: the trainer's failure path waited for the pending save with ``wait``, whose barrier
    and agreement are collectives the other ranks (in their next step) never join: the failing rank hung until the
    process-group timeout. Rank 0 now commits the finished write alone (DCP wrote ``.metadata`` after every rank's
    shards), and the checkpoint is complete."""
    out = tmp_path / "run"
    results = run_ranks(_fail_on_rank0_with_a_save_pending, 2, tmp_path / "ranks", out=str(out))
    final = out / "checkpoints" / "step_000001"
    assert results[0]["committed"] == str(final) and results[0]["seconds"] < TIMEOUT_S / 4, results
    assert results[1]["committed"] == "None", results   # (rank 0 commits)
    from rynnscale.checkpoint.dcp import check_complete, find_resume_checkpoint

    assert check_complete(final) == "" and find_resume_checkpoint(out, "auto") == final
