"""CheckpointManager: atomic layout, latest/prune, kill during a save, exact continuation in a fresh process,
async save, safe loading (no pickle executed), preemption flag. Single process (in-process or one subprocess).

Exactness is bit-for-bit: losses compared as float.hex, tensors with torch.equal."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import signal
from pathlib import Path

import ckpt_worker as w
import pytest
import torch
from safetensors.torch import load_file

from rynnscale.checkpoint import dcp as ckpt
from rynnscale.checkpoint.dcp import (
    CheckpointError,
    CheckpointManager,
    SafeLoadPlanner,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from rynnscale.checkpoint.preemption import install_preemption_handler, preemption_requested
from rynnscale.checkpoint.rng import capture_rng_state, restore_rng_state


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_state_equal(model, opt, ref_file: Path) -> None:
    ref = load_file(str(ref_file))
    got, groups = w.full_state(model, opt)
    assert sorted(got) == sorted(ref)
    bad = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not bad, f"differ: {bad[:5]}"
    assert json.loads(json.dumps(groups)) == json.loads(Path(str(ref_file).replace(".safetensors", ".groups.json")).read_text())


def test_rng_state_roundtrips_through_json():
    import random

    import numpy as np

    torch.manual_seed(0)
    random.seed(1)
    np.random.seed(2)
    st = json.loads(json.dumps(capture_rng_state()))
    a = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), random.gauss(0, 1))
    restore_rng_state(st)
    b = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), random.gauss(0, 1))
    assert a == b


def test_layout_latest_and_prune(tmp_path):
    torch.manual_seed(0)
    w.run(tmp_path, 4, save_at=(1, 2, 3, 4), keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003", "step_000004"]
    assert (root / "latest").read_text().strip() == "step_000004"
    c = root / "step_000004"
    assert {p.name for p in c.iterdir()} == {"COMPLETE", "dcp", "trainer_state.json", "rank_00000.json"}
    ts = json.loads((c / "trainer_state.json").read_text())
    assert (ts["step"], ts["tokens_seen"], ts["world_size"]) == (4, 400, 1)
    assert ts["scheduler"]["last_epoch"] == 4 and ts["model_config"]["model_type"] == "qwen3_vl_moe"
    rank = json.loads((c / "rank_00000.json").read_text())
    assert rank["state"] == {"batches_drawn": 4} and set(rank["rng"]) == {"python", "numpy", "torch_cpu", "cuda"}
    assert find_resume_checkpoint(tmp_path, "auto") == c
    assert find_resume_checkpoint(tmp_path, "none") is None
    assert find_resume_checkpoint(tmp_path, str(root / "step_000003")) == root / "step_000003"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_resume_checkpoint(tmp_path, str(root / "step_000099"))
    assert find_resume_checkpoint(tmp_path / "nothing_here", "auto") is None


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, caplog):
    """A real process exit (os._exit) between the DCP write of step 4 and its rename: step 2 still loads
    bit-exactly, ``auto`` skips the half-written step 4 with a warning naming it, ``latest`` is unchanged."""
    r = w.launch(1, [str(tmp_path), "--total", "5", "--save-at", "2", "4", "--crash-at", "4", "--dump-at", "2"])
    assert r[0].returncode == 17, r[0].stderr[-3000:]
    root = tmp_path / "checkpoints"
    entries = list_checkpoints(tmp_path)
    assert [(e.step, e.complete) for e in entries] == [(2, True), (4, False)]
    torn = entries[1].path
    assert torn.name.startswith("step_000004.tmp-") and (torn / "dcp" / ".metadata").is_file()
    assert (root / "latest").read_text().strip() == "step_000002"
    with caplog.at_level(logging.WARNING, logger="rynnscale.checkpoint"):
        chosen = find_resume_checkpoint(tmp_path, "auto")
    assert chosen == root / "step_000002"
    assert any(torn.name in rec.getMessage() and "incomplete" in rec.getMessage() for rec in caplog.records)
    with pytest.raises(CheckpointError, match="temporary name"):
        find_resume_checkpoint(tmp_path, str(torn))

    torch.manual_seed(0)
    model = w.build_model(w.tiny_hf_config(), seed=5)   # different init: everything must come from the file
    opt, sched = w.build_optim(model, 5)
    rs = load_checkpoint(chosen, model, opt, sched, layout={"dp_shard": 1, "ep": 1, "fsdp": False})
    assert (rs.step, rs.tokens_seen, rs.exact, rs.per_rank) == (2, 200, True, {"batches_drawn": 2})
    assert sched.last_epoch == 2
    assert_state_equal(model, opt, tmp_path / "full_2.safetensors")
    # the next successful save clears the torn directory
    CheckpointManager(tmp_path, keep_last=2).save(5, model, opt, sched)
    assert [(e.step, e.complete) for e in list_checkpoints(tmp_path)] == [(2, True), (5, True)]


def test_exact_continuation_in_fresh_process(tmp_path):
    """2N steps straight == N steps, save, new process loads, N steps (losses bit for bit)."""
    a = w.launch(1, [str(tmp_path / "run"), "--total", "6", "--save-at", "3", "--losses", str(tmp_path / "straight")])
    assert a[0].returncode == 0, a[0].stderr[-3000:]
    b = w.launch(1, [str(tmp_path / "run"), "--total", "6", "--resume", str(tmp_path / "run/checkpoints/step_000003"),
                     "--losses", str(tmp_path / "resumed")])
    assert b[0].returncode == 0, b[0].stderr[-3000:]
    straight = json.loads((tmp_path / "straight.rank0.json").read_text())
    resumed = json.loads((tmp_path / "resumed.rank0.json").read_text())
    assert sorted(resumed, key=int) == ["4", "5", "6"]
    assert {k: straight[k] for k in resumed} == resumed


def test_lost_rng_or_loader_state_would_be_caught(tmp_path):
    """Guard for the test above: resuming without the RNG restore gives different losses."""
    straight = w.run(tmp_path, 4, save_at=(2,))
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 4)
    w.seed_rank(0)
    load_checkpoint(tmp_path / "checkpoints/step_000002", model, opt, sched, restore_rng=False)
    assert w.train_step(model, opt, sched).hex() != straight[3]


def test_async_save_snapshots_state_at_save_time(tmp_path):
    torch.manual_seed(0)
    w.seed_rank(0)
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 6)
    mgr = CheckpointManager(tmp_path, keep_last=3, async_save=True)
    w.train_step(model, opt, sched)
    ref, groups = w.full_state(model, opt)
    path = mgr.save(1, model, opt, sched, tokens_seen=7)
    w.train_step(model, opt, sched)   # mutates parameters and optimiser state while the write may be in flight
    w.train_step(model, opt, sched)
    assert mgr.wait() == path and ckpt.check_complete(path) == ""
    assert (tmp_path / "checkpoints/latest").read_text().strip() == path.name
    fresh = w.build_model(w.tiny_hf_config(), seed=9)
    fopt, fsched = w.build_optim(fresh, 6)
    rs = load_checkpoint(path, fresh, fopt, fsched)
    got, got_groups = w.full_state(fresh, fopt)
    assert rs.tokens_seen == 7 and sorted(got) == sorted(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref) and got_groups == groups


def test_world_size_change_returns_no_per_rank_state(tmp_path, caplog):
    w.run(tmp_path, 2, save_at=(2,))
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 2)
    with caplog.at_level(logging.WARNING, logger="rynnscale.checkpoint"):
        rs = load_checkpoint(tmp_path / "checkpoints/step_000002", model, opt, sched, layout={"dp_shard": 1, "ep": 2})
    assert rs.per_rank is None and not rs.exact and rs.step == 2
    assert any("restarts deterministically" in r.getMessage() for r in caplog.records)


def test_missing_model_tensors_are_listed(tmp_path):
    w.run(tmp_path, 1, save_at=(1,))
    bigger = w.build_model(w.tiny_hf_config(layers=3))
    with pytest.raises(CheckpointError, match="lacks: model.model.language_model.layers.2"):
        load_checkpoint(tmp_path / "checkpoints/step_000001", bigger)


class _Evil:
    """Pickles to a call that would create ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickles_are_never_executed(tmp_path):
    w.run(tmp_path, 1, save_at=(1,))
    c = tmp_path / "checkpoints/step_000001"
    sentinel = tmp_path / "pwned"
    # 1. a pickle beside the checkpoint files is ignored entirely
    (c / "model.pt").write_bytes(pickle.dumps(_Evil(sentinel)))
    (c / "optimizer.bin").write_bytes(pickle.dumps(_Evil(sentinel)))
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 1)
    load_checkpoint(c, model, opt, sched)
    assert not sentinel.exists()
    # 2. non-tensor DCP items (optimiser hyper-parameters) go through weights_only
    planner = SafeLoadPlanner()
    planner.set_up_planner({"x": 1}, None, False)
    buf = io.BytesIO()
    torch.save(_Evil(sentinel), buf)
    buf.seek(0)
    item = type("Item", (), {"dest_index": type("I", (), {"fqn": "x"})()})()
    with pytest.raises(CheckpointError, match="weights_only"):
        planner.load_bytes(item, buf)
    assert not sentinel.exists()
    # 3. a DCP .metadata that is a malicious pickle is refused before anything is called
    (c / "dcp" / ".metadata").write_bytes(pickle.dumps(_Evil(sentinel)))
    with pytest.raises(CheckpointError, match="refuses to unpickle global posix.system"):
        load_checkpoint(c, model, opt, sched)
    assert not sentinel.exists()


def test_preemption_flag_set_by_sigterm():
    flag = install_preemption_handler()
    try:
        assert not preemption_requested(flag)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption_requested(flag) and flag.signum == signal.SIGTERM
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_inner_dcp_folder_is_recognised_and_points_at_the_step_directory(tmp_path, capsys):
    """Issue 28, item 4: passing ``step_N/dcp`` (the folder that holds the tensors) said "no COMPLETE marker (the
    save never finished)" although the save finished; every command that takes a checkpoint now names the step
    directory to pass instead (export, inspect, ``checkpoint.resume``)."""
    from rynnscale.checkpoint.export import export_checkpoint_hf
    from rynnscale.cli import main as cli_main

    model = w.build_model(w.tiny_hf_config(num_experts=0))
    opt, sched = w.build_optim(model, 2)
    step = CheckpointManager(tmp_path / "run").save(1, model, opt, sched, model_config=w.tiny_hf_config(num_experts=0))
    inner = step / "dcp"
    hint = f"this is the dcp/ folder inside the checkpoint {step}; pass the step directory {step}"
    assert ckpt.check_complete(inner) == hint
    with pytest.raises(CheckpointError, match="pass the step directory"):
        export_checkpoint_hf(inner, tmp_path / "hf")
    with pytest.raises(CheckpointError, match="pass the step directory"):
        find_resume_checkpoint(tmp_path / "run", str(inner))
    with pytest.raises(CheckpointError, match="pass the step directory"):
        load_checkpoint(inner, model)
    assert cli_main(["ckpt", "export-hf", str(inner), str(tmp_path / "hf")]) == 2
    assert hint in capsys.readouterr().err
    assert cli_main(["ckpt", "inspect", str(inner)]) == 1
    assert hint in capsys.readouterr().out
    # the dcp/ folder of an unfinished save says why the checkpoint itself is not usable
    (step / "COMPLETE").unlink()
    assert ckpt.check_complete(inner) == (f"this is the dcp/ folder inside the checkpoint {step}, which is itself not "
                                          "complete: no COMPLETE marker (the save never finished)")


def test_a_resume_path_naming_no_checkpoint_is_a_setting_to_fix(tmp_path):
    """``checkpoint.resume=`` naming the run directory or a step's dcp/ folder stopped ``rynnscale train`` with exit
    1, the code of a failed run, while every other bad setting (a PATH that does not exist included) exits 2
    (README: "A bad setting is a one-line message naming the key and exit code 2")."""
    from rynnscale.config import ConfigError

    model = w.build_model(w.tiny_hf_config(num_experts=0))
    opt, sched = w.build_optim(model, 2)
    step = CheckpointManager(tmp_path / "run").save(1, model, opt, sched, model_config=w.tiny_hf_config(num_experts=0))
    for path in (step / "dcp", tmp_path / "run", tmp_path / "run" / "checkpoints"):
        with pytest.raises(ConfigError, match=r"checkpoint\.resume=.*not a complete checkpoint") as e:
            find_resume_checkpoint(tmp_path / "run", str(path))
        assert isinstance(e.value, CheckpointError)   # what callers of the checkpoint layer catch
    assert find_resume_checkpoint(tmp_path / "run", str(step)) == step


@pytest.mark.parametrize("written_by", ["now", "before"])
def test_tied_embedding_is_stored_once_and_loads_exactly(tmp_path, monkeypatch, written_by):
    """Issue 28, item 6: a tied ``lm_head.weight`` was stored beside the token embedding it is (``ckpt inspect``
    counted 20.3M parameters for the 10.59M demo). It is stored once now; checkpoints written before (both
    names stored) still load, and ``inspect`` counts the parameters once for either. Loading is exact: every
    tensor equal, the head still tied, the next step's loss bit-for-bit that of the uninterrupted run."""
    from rynnscale.checkpoint.inspection import inspect_checkpoint

    cfg = w.tiny_hf_config(num_experts=0, tie=True)
    w.seed_rank(0)
    model = w.build_model(cfg)
    opt, sched = w.build_optim(model, 4)
    for _ in range(2):
        w.train_step(model, opt, sched)
    if written_by == "before":   # the old writer stored every state-dict name
        monkeypatch.setattr(ckpt, "tied_aliases", lambda m: {})
    path = CheckpointManager(tmp_path / "run").save(2, model, opt, sched, model_config=cfg)
    monkeypatch.undo()
    stored = set(ckpt.read_dcp_metadata(path / "dcp").state_dict_metadata)
    assert ("model.lm_head.weight" in stored) == (written_by == "before")
    assert "model.model.language_model.embed_tokens.weight" in stored
    info = inspect_checkpoint(path)
    assert info["model_params"] == sum(p.numel() for p in model.parameters())   # parameters() counts a tie once
    assert info["tied"] == {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    rng = capture_rng_state()
    want_state, _ = w.full_state(model, opt)
    want_loss = w.train_step(model, opt, sched)
    restore_rng_state(rng)
    fresh = w.build_model(cfg, seed=1)
    fopt, fsched = w.build_optim(fresh, 4)
    load_checkpoint(path, fresh, fopt, fsched)
    assert fresh.lm_head.weight is fresh.model.language_model.embed_tokens.weight
    got_state, _ = w.full_state(fresh, fopt)
    assert sorted(got_state) == sorted(want_state)
    assert not [k for k in want_state if not torch.equal(got_state[k], want_state[k])]
    assert w.train_step(fresh, fopt, fsched).hex() == want_loss.hex()


def test_keep_last_and_auto_follow_the_save_order_not_the_clock(tmp_path, monkeypatch, caplog):
    """Saves are ordered by the run directory's save counter (``save_seq``): a host whose clock is behind (a
    resume on another machine) no longer gets its newest checkpoints pruned; a checkpoint committed after the one
    ``latest`` names (the run died between the two writes) is what resume=auto picks, with a warning; a failure
    after the commit says the checkpoint is saved instead of 'the partial directory was removed'."""
    import time as time_module

    real, skew = time_module.time, {"s": 0.0}
    monkeypatch.setattr(ckpt.time, "time", lambda: real() + skew["s"])
    torch.manual_seed(0)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 10)
    for step, s in zip(range(1, 6), (0.0, 600.0, 1200.0, -1800.0, -1200.0)):   # steps 4, 5: a host 30 min behind
        skew["s"] = s
        mgr.save(step, model, opt, sched)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000005"]
    assert [json.loads((root / n / "trainer_state.json").read_text())["save_seq"] for n in ("step_000004",
                                                                                             "step_000005")] == [3, 4]
    (root / "latest").write_text("step_000004\n")     # as if killed before latest moved on to step 5
    with caplog.at_level(logging.WARNING, logger="rynnscale.checkpoint.dcp"):
        assert find_resume_checkpoint(tmp_path, "auto") == root / "step_000005"
    assert "step_000005 was saved after it" in caplog.text
    # a failure after the commit (here: writing 'latest')
    def fail(name):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(mgr, "_write_latest", fail)
    with pytest.raises(ckpt.CheckpointCommittedError, match="step_000006 is saved and complete"):
        mgr.save(6, model, opt, sched)
    assert find_resume_checkpoint(tmp_path, "auto") == root / "step_000006"


def test_pruning_renames_before_deleting(tmp_path, monkeypatch):
    """keep_last pruning renames a checkpoint to a temporary name before deleting it: a kill midway (here the delete
    never happens) leaves a ``step_N.tmp-*`` that resume ignores, not a half-deleted checkpoint still marked
    complete; the next save removes it."""
    torch.manual_seed(0)
    mgr = CheckpointManager(tmp_path, keep_last=1)
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 10)
    mgr.save(1, model, opt, sched)
    real_rmtree = ckpt.shutil.rmtree
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)    # killed before the delete
    mgr.save(2, model, opt, sched)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step_000001" not in names and any(n.startswith("step_000001.tmp-") for n in names), names
    assert find_resume_checkpoint(tmp_path, "auto") == tmp_path / "checkpoints" / "step_000002"
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    mgr.save(3, model, opt, sched)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000003"]


@pytest.mark.parametrize("adapter", ["same", "inside", "holding"])
def test_export_refuses_an_adapter_dir_overlapping_out(tmp_path, capsys, adapter):
    """``ckpt export-hf CKPT OUT --adapter DIR``: DIR equal to, inside or holding OUT is refused before anything is
    written (one output would replace the other under --overwrite)."""
    from rynnscale.cli import main as cli_main

    out = tmp_path / "exports" / "hf"
    where = {"same": out, "inside": out / "adapter", "holding": tmp_path / "exports"}[adapter]
    rc = cli_main(["ckpt", "export-hf", str(tmp_path / "ckpt"), str(out), "--adapter", str(where), "--overwrite"])
    assert rc == 2 and "overlap" in capsys.readouterr().err and not (tmp_path / "exports").exists()


def test_export_adapter_of_a_full_fine_tune_is_refused_before_writing(tmp_path, capsys):
    """``--adapter`` on a checkpoint of a run without LoRA: refused up front (before: the merged model was written,
    then the adapter export failed with exit 2)."""
    from rynnscale.cli import main as cli_main

    w.run(tmp_path / "run", 1, save_at=(1,))
    out = tmp_path / "hf"
    rc = cli_main(["ckpt", "export-hf", str(tmp_path / "run" / "checkpoints" / "step_000001"), str(out),
                   "--adapter", str(tmp_path / "adapter")])
    assert rc == 2 and "not a LoRA run's checkpoint" in capsys.readouterr().err and not out.exists()


def test_export_refuses_a_non_empty_adapter_dir_before_writing(tmp_path, capsys):
    """``--adapter DIR`` with DIR non-empty (no --overwrite): refused before the merged model is written (before: OUT
    was written in full, then the adapter export failed, leaving half of what was asked for)."""
    from rynnscale.cli import main as cli_main

    w.run(tmp_path / "run", 1, save_at=(1,))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "keep.txt").write_text("mine")
    out = tmp_path / "hf"
    rc = cli_main(["ckpt", "export-hf", str(tmp_path / "run" / "checkpoints" / "step_000001"), str(out),
                   "--adapter", str(adapter)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{adapter} exists and is not empty" in err and "--overwrite" in err, err
    assert not out.exists() and (adapter / "keep.txt").read_text() == "mine"


def test_ckpt_inspect_refuses_a_negative_max_tensors(tmp_path, capsys):
    """--max-tensors -1 listed all but the last tensor (a slice from the end); now a usage error (exit 2)."""
    from rynnscale.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["ckpt", "inspect", str(tmp_path), "--max-tensors", "-1"])
    assert e.value.code == 2 and "--max-tensors: must be >= 0, got -1" in capsys.readouterr().err


def test_an_error_raised_while_waiting_for_a_background_save_leaves_the_save_to_finish(tmp_path, monkeypatch):
    """An exception raised into the main thread while it waits for a background save (torch's SIGCHLD handler
    raises ``DataLoader worker ... is killed`` wherever the main thread is) is not the save's failure: the save is
    kept pending, not deleted while its background thread still writes into it, and finishes complete afterwards.
    It used to be removed (``rmtree`` of the directory being written) and reported as a failed save."""
    import threading
    import time

    torch.manual_seed(0)
    model = w.build_model(w.tiny_hf_config())
    opt, sched = w.build_optim(model, 4)
    w.train_step(model, opt, sched)
    gate = threading.Event()
    w.gated_async_save(monkeypatch, gate)
    mgr = CheckpointManager(tmp_path, keep_last=2, async_save=True)
    path = mgr.save(1, model, opt, sched)

    def worker_died(signum, frame):
        raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Killed.")

    def interrupt_then_release():
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.3)
        gate.set()

    old = signal.signal(signal.SIGUSR1, worker_died)
    try:
        threading.Thread(target=interrupt_then_release, daemon=True).start()
        with pytest.raises(RuntimeError) as info:
            mgr.wait()
    finally:
        signal.signal(signal.SIGUSR1, old)
        gate.set()
    assert type(info.value) is RuntimeError, f"reported as the save's failure: {info.value!r}"
    assert mgr.wait() == path and ckpt.check_complete(path) == ""
    assert [(e.path.name, e.complete) for e in list_checkpoints(tmp_path)] == [(path.name, True)]
