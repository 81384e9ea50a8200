"""Helpers of the trainer resume tests: launch the shortened demo recipe (1 process, or torchrun
standalone), wait for a checkpoint, kill the whole job tree with SIGKILL, read metrics.jsonl."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "demo_tiny.yaml"
STEPS, EVERY = 12, 3          # 2N steps, a checkpoint every 3 (N = 6)


def overrides(out: Path, data: Path, *, steps: int = STEPS, every: int = EVERY, ep: int = 1,
              extra: tuple[str, ...] = ()) -> list[str]:
    return [f"run.output_dir={out}", f"train.max_steps={steps}", f"checkpoint.every_steps={every}",
            "data.synthetic.num_samples=64", "data.synthetic.samples_per_shard=16",
            f"data.synthetic.output_dir={data}", "train.micro_batch_tokens=384", "logging.progress=false",
            "logging.plot=false", "logging.wandb.mode=disabled", f"parallel.ep={ep}", "parallel.timeout_s=120",
            *extra]


def command(nproc: int, args: list[str], *, script: Path | None = None, max_restarts: int = 0) -> list[str]:
    """``python -m rynnscale train RECIPE args`` (or ``script RECIPE args``), under torchrun when nproc > 1
    or restarts are asked for."""
    target = [str(script)] if script is not None else ["-m", "rynnscale", "train"]
    target = target + [str(RECIPE), *args]
    if nproc == 1 and max_restarts == 0:
        return [sys.executable, *target]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", *target]


def start(cmd: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}   # env_extra may set PYTHONPATH
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def run(cmd: list[str], timeout: float = 300, env_extra: dict[str, str] | None = None) -> tuple[int, str]:
    p = start(cmd, env_extra)
    try:
        text, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p)
        text, _ = p.communicate()
        raise AssertionError(f"timed out after {timeout}s:\n{text[-4000:]}") from None
    return p.returncode, text


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL the launched process and every descendant (torchrun puts its workers in new sessions, so
    killing the process group alone would leave them running)."""
    kids = _children()
    pids, todo = [], [p.pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += kids.get(pid, [])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_at_random(p: subprocess.Popen, ready, max_delay_s: float) -> str:
    """Once ``ready()`` holds, wait a random 0..``max_delay_s`` seconds and SIGKILL the job's whole tree; returns
    the delay and its seed, for the failure messages (a failing kill point can be replayed from its seed)."""
    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, max_delay_s)
    wait_for(p, ready)
    time.sleep(delay)
    kill_tree(p)
    p.communicate()
    return f"kill {delay:.2f}s later, seed {seed}"


def latest_step(out: Path) -> int:
    f = out / "checkpoints" / "latest"
    try:
        return int(f.read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return 0


def wait_for(p: subprocess.Popen, cond, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not cond():
        if p.poll() is not None:
            text = p.stdout.read() if p.stdout else ""
            raise AssertionError(f"the run ended (rc {p.returncode}) before the condition held:\n{text[-4000:]}")
        if time.monotonic() - t0 > timeout:
            kill_tree(p)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[tuple[int, float, float]]:
    """(step, loss, aux loss) of every logged step, in file order."""
    return [(r["step"], r["loss"], r["aux_loss"]) for r in metrics(out)]
