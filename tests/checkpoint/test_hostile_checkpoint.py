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
    CheckpointManager,
    find_resume_checkpoint,
    list_checkpoints,
)
from rynnscale.cli import main as cli_main


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


# ------------------------------------------------------------------------------------------ 4. export target
def _tiny_ckpt(run: Path) -> Path:
    torch.manual_seed(0)
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 1)
    w.train_step(model, opt, sched)
    return CheckpointManager(run).save(1, model, opt, sched, model_config=w.tiny_hf_config())


def test_export_refuses_output_that_contains_or_is_inside_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    c = _tiny_ckpt(run)
    init = tmp_path / "init"
    init.mkdir()
    (init / "tokenizer_config.json").write_text("{}")
    before = sorted(str(p) for p in run.rglob("*"))
    for out, extra in [(run, []), (c, []), (c / "hf", []), (run / "checkpoints", []),
                       (tmp_path, ["--copy-from", str(init)]), (init, ["--copy-from", str(init)])]:
        rc = cli_main(["ckpt", "export-hf", str(c), str(out), "--overwrite", *extra])
        err = capsys.readouterr().err
        assert rc != 0, out
        assert "would delete" in err or "inside the checkpoint" in err, err
    assert sorted(str(p) for p in run.rglob("*")) == before
    assert (init / "tokenizer_config.json").is_file()
    # a separate directory still works
    assert cli_main(["ckpt", "export-hf", str(c), str(tmp_path / "hf"), "--copy-from", str(init)]) == 0
