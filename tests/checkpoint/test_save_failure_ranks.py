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
            dcp.CheckpointManager._remove_stale_tmp = broken
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
