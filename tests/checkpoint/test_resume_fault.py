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


def _tiny_run(out: Path, *overrides: str):
    """``recipes/demo_tiny.yaml`` shrunk for these tests (2 layers, 40 samples, no data workers, no progress, plot or
    wandb) into ``out``, then ``overrides``."""
    from rynnscale.config import load_config

    return load_config(Path(__file__).resolve().parents[2] / "recipes" / "demo_tiny.yaml", [
        f"run.output_dir={out}", "data.synthetic.num_samples=40", "data.synthetic.samples_per_shard=20",
        "data.num_workers=0", "model.arch.text_config.num_hidden_layers=2", "logging.progress=false",
        "logging.plot=false", "logging.wandb.mode=disabled", *overrides])


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


class _Failure(RuntimeError):
    pass


class _FailAfter:
    """A hook that fails the run at the end of step ``n`` (as a data error or a hook would)."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, step, ctx):
        if step == self.n:
            raise _Failure(f"failure after step {step}")


def test_a_failing_run_commits_its_finished_background_save(tmp_path):
    """``checkpoint.async_save``: a save of step 3 still in the background when step 4 fails is waited for and
    committed (it used to stay a ``step_000003.tmp-*`` directory that resume skips and the next save deletes)."""
    from rynnscale.checkpoint.dcp import find_resume_checkpoint, list_checkpoints
    from rynnscale.train.trainer import run_training

    out = tmp_path / "run"
    cfg = _tiny_run(out, "train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.async_save=true")
    with pytest.raises(_Failure, match="failure after step 4"):
        run_training(cfg, hooks=[_FailAfter(4)])
    assert [(e.path.name, e.complete) for e in list_checkpoints(out)] == [("step_000003", True)]
    assert find_resume_checkpoint(out, "auto") == out / "checkpoints" / "step_000003"


class _Steps:
    """Records the steps a run trains (and optionally fails after step ``fail_at``)."""

    def __init__(self, fail_at: int | None = None):
        self.steps, self.fail_at = [], fail_at

    def on_step_end(self, step, ctx):
        self.steps.append(step)
        if step == self.fail_at:
            raise _Failure(f"failure after step {step}")


def test_a_requeued_job_does_not_roll_back_again(tmp_path, monkeypatch):
    """``checkpoint.resume=PATH`` kept in the command of a job that SLURM requeues (or torchrun restarts) rolled the
    run back to PATH at every restart, throwing away what the new branch trained in between. A restart of the job
    that rolled back continues its branch; a new job with the same command rolls back again (the documented
    meaning of an explicit path)."""
    from rynnscale.train.trainer import run_training

    out = tmp_path / "run"

    def cfg(steps, *extra):
        return _tiny_run(out, f"train.max_steps={steps}", "checkpoint.every_steps=2", *extra)

    run_training(cfg(4))                                    # step_2, step_4
    back = f"checkpoint.resume={out / 'checkpoints' / 'step_000002'}"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    first = _Steps(fail_at=5)
    with pytest.raises(_Failure):
        run_training(cfg(8, back), hooks=[first])           # the new branch saves step_4 again, dies after 5
    assert first.steps == [3, 4, 5]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")          # the requeue: the same command line
    requeued = _Steps(fail_at=7)
    with pytest.raises(_Failure):
        run_training(cfg(8, back), hooks=[requeued])
    assert requeued.steps == [5, 6, 7]                      # from the new branch's step_4, not step_2 again
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")          # a later restart still continues the branch
    again = _Steps()
    run_training(cfg(8, back), hooks=[again])
    assert again.steps == [7, 8]
    monkeypatch.setenv("SLURM_JOB_ID", "78")                # a new job with the same command rolls back
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    new_job = _Steps()
    run_training(cfg(8, back), hooks=[new_job])
    assert new_job.steps == [3, 4, 5, 6, 7, 8]


class _Term:
    """Sends this process SIGTERM at the end of step ``n`` (a scheduler's preemption notice)."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, step, ctx):
        if step == self.n:
            import os
            import signal
            os.kill(os.getpid(), signal.SIGTERM)


def test_run_status_says_how_the_job_ended(tmp_path, monkeypatch):
    """``run_status.json`` in the output directory: preempted (with the step saved), failed (with the error) or
    finished, written by rank 0 for schedulers and launchers (launchers/slurm.sbatch requeues a preempted job). A
    process killed from outside leaves "running", which no launcher takes for a preemption."""
    import json

    from rynnscale.train.trainer import run_training, write_run_status

    out = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "91")

    def cfg(steps):
        return _tiny_run(out, f"train.max_steps={steps}", "checkpoint.every_steps=0")

    def status():
        return json.loads((out / "run_status.json").read_text())

    run_training(cfg(4), hooks=[_Term(2)])
    # the signal came after step 2's check: step 3 ran, was saved, and the process stopped
    assert status()["status"] == "preempted" and status()["step"] == 3 and status()["job"] == "slurm:91"
    assert (out / "checkpoints" / "step_000003" / "COMPLETE").is_file()
    with pytest.raises(_Failure):
        run_training(cfg(5), hooks=[_FailAfter(4)])
    assert status()["status"] == "failed" and "failure after step 4" in status()["error"]
    run_training(cfg(5))
    assert status()["status"] == "finished" and status()["step"] == 5
    write_run_status(out, "running", enabled=False)      # other ranks write nothing
    assert status()["status"] == "finished"


def test_a_requeued_job_started_from_another_runs_checkpoint_continues_its_own(tmp_path, monkeypatch):
    """``run.output_dir=B checkpoint.resume=A/step_N`` (a new run branched from another's checkpoint) requeued: it
    started from A/step_N again, throwing away B's checkpoints. A restart of that job continues B's own latest
    checkpoint, or, restarted before B's first save, starts from A/step_N as the command says."""
    from rynnscale.train.trainer import run_training

    def cfg(out, steps, *extra):
        return _tiny_run(out, f"train.max_steps={steps}", "checkpoint.every_steps=2", *extra)

    run_training(cfg(tmp_path / "a", 2))
    start = f"checkpoint.resume={tmp_path / 'a' / 'checkpoints' / 'step_000002'}"
    monkeypatch.setenv("SLURM_JOB_ID", "79")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    first = _Steps(fail_at=3)                               # dies before B's first save (step 4)
    with pytest.raises(_Failure):
        run_training(cfg(tmp_path / "b", 6, start), hooks=[first])
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = _Steps(fail_at=5)                               # nothing of B's to continue: from A's step 2 again
    with pytest.raises(_Failure):
        run_training(cfg(tmp_path / "b", 6, start), hooks=[again])
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    last = _Steps()                                         # B saved step 4: from there
    run_training(cfg(tmp_path / "b", 6, start), hooks=[last])
    assert (first.steps, again.steps, last.steps) == ([3], [3, 4, 5], [5, 6])


def test_a_restart_removes_what_killed_saves_and_prunes_left_even_when_it_saves_nothing(tmp_path):
    """A ``kill -9`` inside a save leaves its ``step_N.tmp-*``, and inside the pruning the renamed, half-deleted old
    checkpoint (``_remove``): each as large as a checkpoint (hundreds of GB at 30B). They were removed only by the
    next save, so a restart with nothing left to train (killed while pruning after its last save; a stage of a
    chain) kept them for good. The restart removes them (the run directory is locked), the checkpoints stay."""
    from rynnscale.checkpoint.dcp import list_checkpoints
    from rynnscale.train.trainer import run_training

    out = tmp_path / "run"

    def cfg():
        return _tiny_run(out, "train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.keep_last=1")

    run_training(cfg())
    root = out / "checkpoints"
    pruned = root / "step_000001.tmp-0123456789ab"      # as a kill inside the pruning of step 1 leaves it
    torn = root / "step_000003.tmp-ba9876543210"        # as a kill inside a save of step 3 leaves it
    for d in (pruned, torn):
        (d / "dcp").mkdir(parents=True)
        (d / "dcp" / "__0_0.distcp").write_bytes(b"\0" * 4096)
    run_training(cfg())                                  # resumes at step 2 = max_steps: no step, no save
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002"]
    assert [(e.path.name, e.complete) for e in list_checkpoints(out)] == [("step_000002", True)]


def test_the_end_of_run_export_removes_what_a_killed_export_left(tmp_path):
    """``checkpoint.export_hf``: an export killed after moving the previous ``hf`` aside (``.hf.old-*``), or inside a
    LoRA adapter export (``.adapter.tmp-*``), left a model-sized directory that no later run removed (only
    ``.hf.tmp-*`` was); the same command again exports and removes them."""
    from rynnscale.train.trainer import run_training

    out = tmp_path / "run"
    cfg = _tiny_run(out, "train.max_steps=1", "checkpoint.export_hf=true")
    run_training(cfg)
    for left in (".hf.old-0123abcd", ".hf.tmp-0123abcd", ".adapter.tmp-0123abcd"):
        (out / left).mkdir()
        (out / left / "model.safetensors").write_bytes(b"\0" * 4096)
    run_training(cfg)                     # resumes at its last step: exports again
    assert (out / "hf" / "config.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.is_dir()) == []


def test_a_sigterm_during_the_setup_ends_the_run_preempted_at_its_checkpoint(tmp_path, monkeypatch):
    """SLURM's time-limit SIGTERM (or a scheduler's) while the run is still setting up (rendezvous, model build,
    resume, data): the run exits 0 as "preempted" at the step it resumed from, training nothing and saving nothing,
    so the sbatch requeues it. It used to kill the process, leaving "running" (never requeued)."""
    import json
    import os
    import signal

    import rynnscale.train.setup as setup
    from rynnscale.train.trainer import run_training

    out = tmp_path / "run"

    def cfg(steps):
        return _tiny_run(out, f"train.max_steps={steps}", "checkpoint.every_steps=0")

    run_training(cfg(2))
    prepare = setup.prepare_data_files

    def prepare_then_signal(*args, **kwargs):   # the signal comes in the middle of the setup
        os.kill(os.getpid(), signal.SIGTERM)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(setup, "prepare_data_files", prepare_then_signal)
    got = []   # (without rynnscale's handler the signal lands here, not on pytest's process)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        run_training(cfg(4))
    finally:
        signal.signal(signal.SIGTERM, previous)
    status = json.loads((out / "run_status.json").read_text())
    assert (status["status"], status["step"]) == ("preempted", 2), (status, got)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000002"]
    assert got == []   # rynnscale's handler took it
    monkeypatch.undo()
    run_training(cfg(4))   # the requeued run goes on from step 2
    assert json.loads((out / "run_status.json").read_text())["status"] == "finished"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


class _TermJobStep:
    """After step ``n``: SIGTERM to this process and all its child processes (data workers, wandb's service) from
    another process (``kill``), as SLURM's ``--signal`` (and scancel) delivers it to every process of the job step."""

    def __init__(self, n: int):
        self.n, self.children = n, []
        self.before = set(self._child_pids())   # (other tests' processes are left alone)

    @staticmethod
    def _child_pids() -> list[str]:
        import os
        me, pids = str(os.getpid()), []
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                if Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                    pids.append(d)
            except OSError:
                pass
        return pids

    def on_step_end(self, step, ctx):
        if step == self.n:
            import os
            import subprocess
            for pid in set(self._child_pids()) - self.before:
                try:
                    self.children.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
                except OSError:
                    continue
                subprocess.run(["kill", "-s", "TERM", pid], check=False)
            subprocess.run(["kill", "-s", "TERM", str(os.getpid())], check=True)


@pytest.mark.parametrize("child", ["data workers", "wandb"])
def test_a_sigterm_to_every_process_of_the_job_step_still_saves_and_ends_preempted(tmp_path, child):
    """The signal reaches the trainer's child processes as well (SLURM signals the whole job step): the run still
    finishes its step, saves and says "preempted". A data worker dying of it used to fail the run (DataWorkerError
    blaming the OOM killer), and wandb's service (offline mode, the default) dying of it made the step's wandb.log
    raise ConnectionResetError: no checkpoint, status "failed", never requeued."""
    import json

    from rynnscale.config import load_config
    from rynnscale.train.trainer import run_training

    out = tmp_path / "run"
    extra = ["data.num_workers=2", "logging.wandb.mode=disabled"] if child == "data workers" else \
        ["data.num_workers=0", "logging.wandb.mode=offline"]
    if child == "wandb":   # a service of this run's own (wandb keeps one per process, started by the first run)
        import wandb
        wandb.teardown()
    cfg = load_config(Path(__file__).resolve().parents[2] / "recipes" / "demo_tiny.yaml", [
        f"run.output_dir={out}", "train.max_steps=6", "checkpoint.every_steps=0", *extra,
        "data.synthetic.num_samples=40", "data.synthetic.samples_per_shard=20",
        "model.arch.text_config.num_hidden_layers=2", "logging.progress=false", "logging.plot=false"])
    term = _TermJobStep(2)
    run_training(cfg, hooks=[term])
    assert len(term.children) >= (2 if child == "data workers" else 1), term.children
    if child == "wandb":
        assert any("wandb" in c for c in term.children), term.children
    status = json.loads((out / "run_status.json").read_text())
    assert (status["status"], status["step"]) == ("preempted", 3), status
    assert (out / "checkpoints" / "step_000003" / "COMPLETE").is_file()
