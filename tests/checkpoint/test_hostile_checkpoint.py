"""Checkpoints under hostile conditions (issue 17): rollback then ``resume=auto``, an export target that
would delete the run, a full disk during a save, DCP metadata pointing outside the checkpoint, a truncated
copy called complete by ``inspect``. Single process, tiny model (``ckpt_worker``)."""

from __future__ import annotations

import logging
from pathlib import Path

import ckpt_worker as w
import pytest
import torch

from rynnscale.checkpoint.dcp import (
    find_resume_checkpoint,
    list_checkpoints,
)


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _steps(run: Path) -> list[int]:
    return [e.step for e in list_checkpoints(run) if e.complete]


# ------------------------------------------------------------------------------------------ 3. rollback
def test_auto_resume_follows_latest_after_rollback_and_prune_keeps_it(tmp_path):
    """Saves at 2, 4, 6; roll back with resume=step_4 and save step 5 (keep_last=1): ``latest`` names step 5,
    pruning keeps it (not the abandoned step 6), and ``auto`` resumes from it."""
    torch.manual_seed(0)
    w.run(tmp_path, 6, save_at=(2, 4, 6), keep_last=3)
    root = tmp_path / "checkpoints"
    assert _steps(tmp_path) == [2, 4, 6]
    w.run(tmp_path, 5, save_at=(5,), resume=str(root / "step_000004"), keep_last=1)
    assert (root / "latest").read_text().strip() == "step_000005"
    assert (root / "step_000005").is_dir(), "pruning deleted the checkpoint 'latest' points to"
    assert find_resume_checkpoint(tmp_path, "auto") == root / "step_000005"


def test_auto_resume_falls_back_with_warning_when_latest_is_broken(tmp_path, caplog):
    torch.manual_seed(0)
    w.run(tmp_path, 4, save_at=(2, 4), keep_last=3)
    root = tmp_path / "checkpoints"
    for text in ("step_000009\n", "garbage\x00\n"):
        (root / "latest").write_text(text)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rynnscale.checkpoint"):
            assert find_resume_checkpoint(tmp_path, "auto") == root / "step_000004"
        assert any("falling back" in r.getMessage() for r in caplog.records)
    (root / "latest").unlink()
    with caplog.at_level(logging.WARNING, logger="rynnscale.checkpoint"):
        assert find_resume_checkpoint(tmp_path, "auto") == root / "step_000004"
