"""Checkpoints under hostile conditions (issue 17): rollback then ``resume=auto``, an export target that
would delete the run, a full disk during a save, DCP metadata pointing outside the checkpoint, a truncated
copy called complete by ``inspect``. Single process, tiny model (``ckpt_worker``)."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import subprocess
import uuid
from pathlib import Path

import ckpt_worker as w
import pytest
import torch

from rynnscale.checkpoint import dcp as ckpt
from rynnscale.checkpoint.dcp import (
    CheckpointError,
    CheckpointManager,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_dcp_metadata,
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


def test_a_rollback_interrupted_before_its_first_save_is_not_undone_by_auto(tmp_path):
    """Saves at 2, 4, 6; resume=step_4 (a rollback: the trainer calls ``record_rollback``) and a crash before
    the new branch saves: ``auto`` resumes step 4, not the abandoned step 6 (before: step 6, saved after 4 and
    named by ``latest``). The new branch's own save under the abandoned name is resumed as usual."""
    torch.manual_seed(0)
    w.run(tmp_path, 6, save_at=(2, 4, 6), keep_last=3)
    root = tmp_path / "checkpoints"
    assert find_resume_checkpoint(tmp_path, "auto") == root / "step_000006"
    assert ckpt.record_rollback(tmp_path, root / "step_000004") == ["step_000006"]
    assert find_resume_checkpoint(tmp_path, "auto") == root / "step_000004"
    assert ckpt.record_rollback(tmp_path, root / "step_000004") == ["step_000006"]   # again (a restart): the same
    assert ckpt.record_rollback(tmp_path / "elsewhere", root / "step_000004") == []
    w.run(tmp_path, 6, save_at=(6,), resume=str(root / "step_000004"), keep_last=3)   # the new branch's step 6
    assert find_resume_checkpoint(tmp_path, "auto") == root / "step_000006"
    (root / "rollback.json").write_text("{broken")
    assert find_resume_checkpoint(tmp_path, "auto") == root / "step_000006"   # a broken record is ignored


@pytest.mark.parametrize("new_complete", [True, False])
def test_a_save_cut_between_the_renames_of_its_commit_loses_neither_copy(tmp_path, new_complete):
    """The same step saved again, the process killed after ``step_N`` was moved aside (``.old-*``) and before the
    new save was renamed in: the next resume finds ``step_N`` again, the new copy when it was complete (its
    COMPLETE marker is written first), else the old one (before: neither was found)."""
    torch.manual_seed(0)
    w.run(tmp_path, 4, save_at=(2, 4), keep_last=3)
    root = tmp_path / "checkpoints"
    final = root / "step_000004"
    new = root / "step_000004.tmp-0a1b2c3d"
    shutil.copytree(final, new)
    (new / "marker").write_text("new")
    if not new_complete:
        (new / "COMPLETE").unlink()
    final.rename(root / "step_000004.old-deadbeef")   # the commit's first rename; the kill comes before the second
    assert find_resume_checkpoint(tmp_path, "auto") == final
    assert (final / "marker").is_file() == new_complete
    assert not list(root.glob("*.old-*"))


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


# ------------------------------------------------------------------------------------------ 5. disk full
def test_enospc_during_save_removes_partial_dir_and_keeps_previous(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 3)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    w.train_step(model, opt, sched)
    mgr.save(1, model, opt, sched, model_config=w.tiny_hf_config())
    from torch.distributed.checkpoint import filesystem

    real = filesystem._write_item
    calls = {"n": 0}

    def full_disk(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)
    monkeypatch.setattr(filesystem, "_write_item", full_disk)
    w.train_step(model, opt, sched)
    with pytest.raises(CheckpointError, match=r"ENOSPC.*partial directory .* removed") as ei:
        mgr.save(2, model, opt, sched, model_config=w.tiny_hf_config())
    assert str(tmp_path / "checkpoints") in str(ei.value)
    assert calls["n"] > 3
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
    assert (root / "latest").read_text().strip() == "step_000001"
    monkeypatch.setattr(filesystem, "_write_item", real)
    assert find_resume_checkpoint(tmp_path, "auto") == root / "step_000001"
    m2 = w.build_model(w.tiny_hf_config(), seed=3)
    assert load_checkpoint(root / "step_000001", m2, w.build_optim(m2, 3)[0]).step == 1
    mgr.save(2, model, opt, sched, model_config=w.tiny_hf_config())
    assert _steps(tmp_path) == [1, 2]


def test_stale_tmp_dir_is_removed_by_the_next_save(tmp_path, caplog):
    torch.manual_seed(0)
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 3)
    root = tmp_path / "checkpoints"
    stale = root / f"step_000009.tmp-{uuid.uuid4().hex[:12]}"   # a crash at a later step than anything saved
    (stale / "dcp").mkdir(parents=True)
    (stale / "dcp" / "__0_0.distcp").write_bytes(b"\0" * 4096)
    assert find_resume_checkpoint(tmp_path, "auto") is None
    with caplog.at_level(logging.WARNING, logger="rynnscale.checkpoint"):
        CheckpointManager(tmp_path).save(1, model, opt, sched)
    assert not stale.exists()
    assert any("stale temporary" in r.getMessage() for r in caplog.records)


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if r.returncode == 0:
        subprocess.run(["umount", str(where)], capture_output=True)
        return True
    return False


def test_real_full_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("mounting a tmpfs is not permitted here")
    torch.manual_seed(0)
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 3)
    w.train_step(model, opt, sched)
    probe = tmp_path / "probe"
    CheckpointManager(probe).save(1, model, opt, sched)
    one = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file())
    size_kib = int(one * 1.6 / 1024) + 64   # room for one checkpoint, not two
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)], check=True)
    try:
        mgr = CheckpointManager(mnt, keep_last=2)
        mgr.save(1, model, opt, sched)
        with pytest.raises(CheckpointError, match="ENOSPC"):
            mgr.save(2, model, opt, sched)
        assert sorted(p.name for p in (mnt / "checkpoints").iterdir()) == ["latest", "step_000001"]
        assert find_resume_checkpoint(mnt, "auto") == mnt / "checkpoints" / "step_000001"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ------------------------------------------------------------------------------------------ 7. storage paths
def _rewrite_storage(c: Path, fn) -> None:
    """Rewrite the checkpoint's DCP ``.metadata`` with ``fn(relative_path) -> new path`` (as an attacker would)."""
    md = read_dcp_metadata(c / "dcp")
    for info in md.storage_data.values():
        info.relative_path = fn(info.relative_path)
    (c / "dcp" / ".metadata").write_bytes(pickle.dumps(md))


@pytest.mark.parametrize("bad", ["../{}", "/etc/{}", "sub/../../{}"])
def test_metadata_paths_outside_checkpoint_are_refused(tmp_path, bad, capsys):
    c = _tiny_ckpt(tmp_path / "run")
    outside = tmp_path / "run" / "checkpoints"
    for f in (c / "dcp").glob("*.distcp"):
        shutil.copy(f, outside / f.name)   # the data is really there, outside: must still be refused
    _rewrite_storage(c, lambda rel: bad.format(rel))
    with pytest.raises(CheckpointError, match="points outside the checkpoint directory"):
        read_dcp_metadata(c / "dcp")
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 1)
    with pytest.raises(CheckpointError, match="points outside"):
        load_checkpoint(c, model, opt, sched)
    assert cli_main(["ckpt", "inspect", str(c)]) != 0
    assert "points outside the checkpoint directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 8. truncated copy
def test_inspect_reports_truncated_or_missing_data_files(tmp_path):
    from rynnscale.checkpoint.inspection import inspect_checkpoint

    c = _tiny_ckpt(tmp_path / "run")
    assert inspect_checkpoint(c)["complete"]
    data = next((c / "dcp").glob("*.distcp"))
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    info = inspect_checkpoint(c)
    assert not info["complete"] and "truncated" in info["incomplete_reason"] and data.name in info["incomplete_reason"]
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 1)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(c, model, opt, sched)
    data.unlink()
    info = inspect_checkpoint(c)
    assert not info["complete"] and "missing" in info["incomplete_reason"]
    assert json.loads((c / "COMPLETE").read_text())["step"] == 1   # the marker alone is not trusted
    assert ckpt.check_complete(c) == ""   # (the cheap marker check, unchanged)


# ------------------------------------------------------------------------------------------ 9. damaged copies, export
def test_export_of_a_truncated_copy_or_a_file_gone_midway_fails_in_one_line(tmp_path, capsys):
    """``inspect`` called a truncated ``.distcp`` incomplete, but ``export-hf`` read it and died with DCP's
    multi-line ``CheckpointException`` (``EOFError``), a traceback; the export now checks the data files first,
    and a file that disappears while it reads (pruned by the run) is named with the tensor."""
    from rynnscale.checkpoint.export import export_checkpoint_adapter, load_checkpoint_tensor

    c = _tiny_ckpt(tmp_path / "run")
    data = next((c / "dcp").glob("*.distcp"))
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    assert cli_main(["ckpt", "export-hf", str(c), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "not a complete checkpoint" in err and "truncated" in err and data.name in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))
    with pytest.raises(CheckpointError, match="truncated"):
        export_checkpoint_adapter(c, tmp_path / "adapter")
    data.unlink()   # gone after the up-front check (e.g. keep_last pruned it during a long export)
    with pytest.raises(CheckpointError, match=r"model tensor 'lm_head.weight' could not be read .*FileNotFoundError"):
        load_checkpoint_tensor(c, "lm_head.weight")


def _edit_trainer_state(c: Path, **fields) -> None:
    ts = json.loads((c / "trainer_state.json").read_text())
    (c / "trainer_state.json").write_text(json.dumps({**ts, **fields}))


@pytest.mark.parametrize("damage", ["list", "not_json", "config_is_text", "model_config_is_list",
                                    "older_format", "complete_not_json"])
def test_inspect_and_export_of_malformed_json_files_answer_in_one_line(tmp_path, capsys, damage):
    """A hand-edited or damaged ``trainer_state.json`` / ``COMPLETE`` made ``inspect`` and ``export-hf`` die with an
    ``AttributeError`` traceback (``'list' object has no attribute 'get'``), or print a bare JSON error that named no
    file; ``inspect`` now reports the checkpoint incomplete naming the file, ``export-hf`` refuses in one line."""
    c = _tiny_ckpt(tmp_path / "run")
    if damage == "list":
        (c / "trainer_state.json").write_text("[1]")
    elif damage == "not_json":
        (c / "trainer_state.json").write_text("{bad")
    elif damage == "config_is_text":
        _edit_trainer_state(c, config="x", model_config=None)
    elif damage == "model_config_is_list":
        _edit_trainer_state(c, model_config=[1])
    elif damage == "older_format":
        _edit_trainer_state(c, format_version=0)
    else:
        (c / "COMPLETE").write_text("{bad")
    damaged_file = "COMPLETE" if damage == "complete_not_json" else "trainer_state.json"
    assert cli_main(["ckpt", "inspect", str(c), "--max-tensors", "0"]) == 1
    out = capsys.readouterr().out
    assert "complete:   NO (" in out and damaged_file in out, out
    assert cli_main(["ckpt", "inspect", str(c), "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert not info["complete"] and damaged_file in info["incomplete_reason"]
    if damage != "complete_not_json":   # the marker's content is not needed to export
        assert cli_main(["ckpt", "export-hf", str(c), str(tmp_path / "hf")]) == 2
        err = capsys.readouterr().err
        assert str(c / "trainer_state.json") in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "hf").exists()


def test_a_run_directory_or_a_foreign_one_is_named_as_such(tmp_path, capsys):
    """Passing the run directory (or its ``checkpoints/``) to ``inspect`` / ``export-hf`` / ``checkpoint.resume`` said
    "no COMPLETE marker (the save never finished)", as if a save had failed; it now says what the directory is and
    which checkpoint to pass. A directory that is no checkpoint at all says so too."""
    run = tmp_path / "run"
    c = _tiny_ckpt(run)
    for d, what in ((run, "a run directory"), (run / "checkpoints", "the checkpoints/ folder of a run")):
        hint = f"this is {what}, not one checkpoint; pass a step directory, e.g. the newest {c}"
        assert ckpt.check_complete(d) == hint
        assert cli_main(["ckpt", "export-hf", str(d), str(tmp_path / "hf")]) == 2
        assert hint in capsys.readouterr().err
        with pytest.raises(CheckpointError, match="pass a step directory"):
            find_resume_checkpoint(run, str(d))
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"x")
    assert ckpt.check_complete(foreign) == "not a checkpoint directory: no COMPLETE, trainer_state.json or dcp/ in it"
    assert cli_main(["ckpt", "inspect", str(foreign)]) == 1
    assert "not a checkpoint directory" in capsys.readouterr().out


def test_export_on_a_full_disk_keeps_the_previous_export_and_answers_in_one_line(tmp_path, monkeypatch, capsys):
    """``export-hf --overwrite`` onto a full disk ended in an ``OSError`` traceback; it now prints one line, and the
    previous export is untouched (the new one is written beside it and renamed only when complete)."""
    from rynnscale.checkpoint import export

    c = _tiny_ckpt(tmp_path / "run")
    out = tmp_path / "hf out ü"
    assert cli_main(["ckpt", "export-hf", str(c), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(export.os, "fsync", full_disk)
    capsys.readouterr()
    assert cli_main(["ckpt", "export-hf", str(c), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf out ü", "run"]   # no temporary directory left


def test_keep_last_does_not_prune_a_checkpoint_an_export_is_reading(tmp_path, monkeypatch, caplog):
    """``ckpt export-hf RUN/checkpoints/step_N`` while the run trains on: keep_last pruned step_N under the export,
    which died midway (its data file gone). Pruning now skips a checkpoint an export holds and removes it at the
    first save after the export ends; the export is complete and equals the checkpoint tensor for tensor."""
    from safetensors.torch import load_file

    from rynnscale.checkpoint import export

    torch.manual_seed(0)
    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep_last=1)
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 10)
    w.train_step(model, opt, sched)
    c = mgr.save(1, model, opt, sched, model_config=w.tiny_hf_config())
    want = {k: v.clone() for k, v in model.state_dict().items()}
    real_read, saved = export.load_checkpoint_tensor, []

    def read_while_the_run_saves(*a, **k):
        if not saved:   # the run saves twice while the export reads its first tensor
            for step in (2, 3):
                w.train_step(model, opt, sched)
                saved.append(mgr.save(step, model, opt, sched, model_config=w.tiny_hf_config()))
        return real_read(*a, **k)
    monkeypatch.setattr(export, "load_checkpoint_tensor", read_while_the_run_saves)
    with caplog.at_level(logging.WARNING, logger="rynnscale.checkpoint"):
        report = export.export_checkpoint_hf(c, tmp_path / "hf")
    assert any("is being read" in r.getMessage() and c.name in r.getMessage() for r in caplog.records)
    assert _steps(run) == [1, 3] and (run / "checkpoints" / "latest").read_text().strip() == "step_000003"
    got = load_file(str(Path(report.out_dir) / "model.safetensors"))
    assert got.keys() <= want.keys() and len(got) == report.num_tensors
    for k, v in got.items():
        assert torch.equal(v, want[k]), k
    w.train_step(model, opt, sched)
    mgr.save(4, model, opt, sched, model_config=w.tiny_hf_config())   # the export ended: pruned now
    assert _steps(run) == [4]


def test_inspect_summarises_a_text_only_family_from_its_flat_config(tmp_path):
    """A text-only family's config.json is flat (``qwen3_5_moe_text``: no ``text_config``): ``ckpt inspect`` read the
    sizes from ``text_config`` only and printed a Qwen3.5-MoE checkpoint as ``num_experts=0`` with no sizes."""
    from qwen35_helpers import tiny_config

    from rynnscale.checkpoint.inspection import inspect_checkpoint
    from rynnscale.models import args_from_hf_config
    from rynnscale.models.qwen3_5.model import new_model

    cfg = tiny_config(moe=True, text_only=True)
    args = args_from_hf_config(cfg)
    model = new_model(args, attn_backend="sdpa")
    c = CheckpointManager(tmp_path).save(1, model, torch.optim.AdamW(model.parameters()),
                                         model_config=args.to_hf_config())
    got = inspect_checkpoint(c)["config_summary"]
    assert (got["model_type"], got["hidden_size"], got["num_hidden_layers"], got["num_experts"], got["vocab_size"]) == (
        "qwen3_5_moe_text", cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_experts"], cfg["vocab_size"])
