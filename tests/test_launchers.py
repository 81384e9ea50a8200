"""launchers/slurm.sbatch's decision after the job step ends: requeue the job when this attempt's run was
preempted (it saved a checkpoint and stopped before the time limit), else exit with the step's code.

SLURM is not installed here: ``srun``, ``scontrol`` and ``torchrun`` are small stand-ins on PATH that record their
calls; the stand-in torchrun writes ``run_status.json`` as the trainer's rank 0 does (the trainer's own writing of
it is tested in tests/checkpoint/test_resume_fault.py). The script itself, its ``--print-config`` call and its
status check run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launchers" / "slurm.sbatch"

SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$CALLS"
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$CALLS"
[[ "$1" == show ]] && echo node1
exit 0
"""
TORCHRUN = """#!/usr/bin/env bash
echo "torchrun $*" >> "$CALLS"
out=""
for a in "$@"; do [[ "$a" == run.output_dir=* ]] && out="${a#run.output_dir=}"; done
if [[ -n "${STUB_STATUS:-}" ]]; then
  mkdir -p "$out"
  printf '{"status": "%s", "job": "slurm:%s", "slurm_restart": "%s", "step": 7}\\n' \\
    "$STUB_STATUS" "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}" > "$out/run_status.json"
fi
exit "${STUB_RC:-0}"
"""


def _sbatch(tmp_path: Path, out: Path, **env: str) -> tuple[int, str, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("torchrun", TORCHRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    full = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", CALLS=str(calls), PYTHON=sys.executable,
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), SLURM_JOB_ID="4242",
                SLURM_JOB_NODELIST="node1", SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="1")
    full.pop("MASTER_PORT", None)
    full.update(env)
    p = subprocess.run(["bash", str(SBATCH), str(ROOT / "recipes" / "demo_tiny.yaml"), f"run.output_dir={out}"],
                       env=full, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    return p.returncode, p.stdout + p.stderr, calls.read_text().splitlines()


@pytest.mark.parametrize("case", ["preempted", "finished", "failed", "requeue_off"])
def test_the_sbatch_requeues_a_preempted_run_only(tmp_path: Path, case: str) -> None:
    out = tmp_path / "run dir"   # a space in the path, as users have
    env = {"preempted": dict(STUB_STATUS="preempted", STUB_RC="1"),   # torchrun exits non-zero after the signal
           "finished": dict(STUB_STATUS="finished", STUB_RC="0"),
           "failed": dict(STUB_STATUS="failed", STUB_RC="1"),
           "requeue_off": dict(STUB_STATUS="preempted", STUB_RC="1", RYNNSCALE_REQUEUE="0")}[case]
    rc, log, calls = _sbatch(tmp_path, out, **env)
    torchrun = [c for c in calls if c.startswith("torchrun")]
    assert len(torchrun) == 1 and "-m rynnscale train" in torchrun[0] and "--rdzv-id=4242" in torchrun[0], calls
    requeued = "scontrol requeue 4242" in calls
    assert requeued == (case == "preempted"), (calls, log)
    assert rc == {"preempted": 0, "finished": 0, "failed": 1, "requeue_off": 1}[case], log
    assert f"-> {out}" in log and f"run status {env['STUB_STATUS']}" in log


def test_a_status_left_by_an_earlier_attempt_does_not_requeue(tmp_path: Path) -> None:
    """The requeued attempt dies before its run starts (no status of its own): the first attempt's "preempted"
    must not requeue it again, or a job failing at start-up would requeue forever."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_status.json").write_text(json.dumps({"status": "preempted", "job": "slurm:4242", "slurm_restart": "0"}))
    rc, log, calls = _sbatch(tmp_path, out, STUB_RC="1", SLURM_RESTART_COUNT="1")
    assert rc == 1 and "run status stale" in log and not any("requeue" in c for c in calls), (log, calls)


def _rdzv_endpoint(calls: list[str]) -> str:
    [torchrun] = [c for c in calls if c.startswith("torchrun")]
    return next(a for a in torchrun.split() if a.startswith("--rdzv-endpoint="))


def test_jobs_sharing_a_node_rendezvous_on_different_ports(tmp_path: Path) -> None:
    """Two jobs whose first node is the same host (a node shared by jobs that each take some of its GPUs): with one
    fixed port the later job's torchrun finds the port taken, joins the earlier job's store as a client and dies
    when that job ends (RendezvousConnectionError). Each job gets its own port; MASTER_PORT still overrides it."""
    ends = []
    for job in ("4242", "4243"):
        _, log, calls = _sbatch(tmp_path / job, tmp_path / job / "run", STUB_STATUS="finished", SLURM_JOB_ID=job)
        ends.append(_rdzv_endpoint(calls))
    assert ends[0] != ends[1], ends
    assert all(20000 <= int(e.rsplit(":", 1)[1]) < 32768 for e in ends), ends   # below Linux's ephemeral ports
    _, log, calls = _sbatch(tmp_path / "set", tmp_path / "set" / "run", STUB_STATUS="finished", MASTER_PORT="29555")
    assert _rdzv_endpoint(calls) == "--rdzv-endpoint=node1:29555", calls


def test_the_job_step_gets_the_cpus_of_the_allocation(tmp_path: Path) -> None:
    """srun of SLURM 22.05-23.02 does not inherit the batch job's --cpus-per-task: without passing it again, torchrun,
    every rank and its data workers share one CPU per node."""
    _, log, calls = _sbatch(tmp_path, tmp_path / "run", STUB_STATUS="finished", SLURM_CPUS_PER_TASK="64")
    [srun] = [c for c in calls if c.startswith("srun")]
    assert "--cpus-per-task=64" in srun.split(" torchrun ")[0], calls
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CPUS_PER_TASK"}   # a job that does not set it
    with mock.patch.dict(os.environ, env, clear=True):
        _, log, calls = _sbatch(tmp_path / "unset", tmp_path / "unset" / "run", STUB_STATUS="finished")
    [srun] = [c for c in calls if c.startswith("srun")]
    assert "--cpus-per-task" not in srun, calls   # srun's own default, not one CPU
