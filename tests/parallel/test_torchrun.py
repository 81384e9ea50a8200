"""Launch through the real CLI under torchrun: a simulated two-node job (two ``torchrun --nnodes 2`` on
127.0.0.1 with c10d rendezvous) trains the demo model (EP 2 over the two "nodes") and logs exactly the
same losses as the single-node run with the same world size, and compiled blocks the same losses within
rel 1e-5; a rank failure ends the job with the rank and exception in the log, not a hang; a restarted round
does not read the previous round's addresses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from dist_helpers import hosted_store_port

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def _overrides(out: Path, data: Path) -> list[str]:
    return [f"run.output_dir={out}", f"train.max_steps={STEPS}", "data.synthetic.num_samples=16",
            "data.synthetic.samples_per_shard=4", f"data.synthetic.output_dir={data}", "train.micro_batch_tokens=384",
            "logging.progress=false", "logging.plot=false", "logging.wandb.mode=disabled", "parallel.ep=2",
            "parallel.timeout_s=120"]


def _torchrun(nnodes: int, nproc: int, port: int, args: list[str], node_rank: int | None = None) -> subprocess.Popen:
    """``torchrun`` with c10d rendezvous on the store this test process hosts at ``port`` (``hosted_store_port``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-conf=is_host=0",
           "--rdzv-id=rynnscale-test", *args]
    if node_rank is not None:
        cmd.insert(5, f"--node-rank={node_rank}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, text))
    return out


def _losses(out: Path) -> list[tuple[int, float, int]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["tokens"]) for r in map(json.loads, lines)]


@pytest.mark.slow
def test_two_nodes_and_compiled_blocks_match_the_single_node_eager_run(tmp_path):
    """One eager single-node run (2 processes, EP 2) is the reference of two launches:

    - two "nodes" (``--nnodes 2``, one process each, c10d rendezvous): bitwise-equal losses (same data split per
      rank, same math on CPU), world size 2 in every record;
    - ``model.compile=true`` on the single node (compiled blocks inside FSDP2's hooks, the all-to-all outside
      them): the same per-step token counts and losses within rel 1e-5 (Inductor reorders fp32 sums); rows change
      length every step, so this also covers dynamic-shape recompiles through the CLI. (A single process builds
      the same way without meshes; tests/models/test_compile.py compares its blocks with eager ones under each
      activation-checkpointing mode and LoRA.)"""
    recipe = ["-m", "rynnscale", "train", str(REPO / "recipes" / "demo_tiny.yaml")]
    data = tmp_path / "data"
    single, multi, compiled = tmp_path / "single", tmp_path / "multi", tmp_path / "compiled"
    [(rc, log)] = _wait([_torchrun(1, 2, hosted_store_port(), recipe + _overrides(single, data))])
    assert rc == 0, log[-4000:]
    eager = _losses(single)
    assert [s for s, _, _ in eager] == list(range(1, STEPS + 1))

    port = hosted_store_port()
    nodes = [_torchrun(2, 1, port, recipe + _overrides(multi, data), node_rank=n) for n in (0, 1)]
    for n, (rc, log) in enumerate(_wait(nodes)):
        assert rc == 0, f"node {n}:\n{log[-4000:]}"
    assert _losses(multi) == eager
    assert all(r["world_size"] == 2 for r in map(json.loads, (multi / "metrics.jsonl").read_text().splitlines()))

    [(rc, log)] = _wait([_torchrun(1, 2, hosted_store_port(), recipe + _overrides(compiled, data) + ["model.compile=true"])],
                        timeout=400)
    assert rc == 0, log[-4000:]
    got = _losses(compiled)
    assert [(s, t) for s, _, t in got] == [(s, t) for s, _, t in eager]
    assert [v for _, v, _ in got] == pytest.approx([v for _, v, _ in eager], rel=1e-5)


@pytest.mark.slow
def test_rank_failure_is_reported_not_hung(tmp_path):
    """Rank 1 raises while rank 0 waits in an all-reduce: torchrun stops the job well before the
    collective timeout, non-zero, with the rank and the exception in the output."""
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from rynnscale.parallel.distributed import init_distributed, report_failures
        rank, _, world, _ = init_distributed(torch.device("cpu"), timeout_s=300)
        with report_failures(rank, world):
            if rank == 1:
                raise ValueError("synthetic failure on purpose")
            dist.all_reduce(torch.ones(1))
    """))
    t0 = time.perf_counter()
    [(rc, log)] = _wait([_torchrun(1, 2, hosted_store_port(), [str(script)])], timeout=120)
    assert rc != 0
    assert "rank 1/2" in log and "ValueError: synthetic failure on purpose" in log, log[-4000:]
    assert time.perf_counter() - t0 < 100  # far below the 300 s collective timeout


@pytest.mark.slow
def test_restarted_round_does_not_read_the_previous_rounds_addresses(tmp_path):
    """torchrun keeps one agent store across restarts: a restarted rank that forms its gloo group before its peer
    (ranks of a round start seconds apart on a loaded machine; here rank 0 is held back 3 s) must not read the dead
    peer's address of the previous round ("connectFullMesh ... Connection refused" on every restart)."""
    script = tmp_path / "restart.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        import torch, torch.distributed as dist
        from rynnscale.parallel.distributed import init_distributed
        rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
        if attempt == 1 and rank == 0:
            time.sleep(3)
        init_distributed(torch.device("cpu"), timeout_s=30)
        t = torch.ones(1)
        dist.all_reduce(t)
        print(f"round {attempt} rank {rank} sum {t.item():.0f}", flush=True)
        if attempt == 0 and rank == 1:
            sys.exit(3)   # a crashed rank: torchrun restarts the job
        dist.barrier()
        dist.destroy_process_group()
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           str(script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "round 1 rank 0 sum 2" in proc.stdout and "round 1 rank 1 sum 2" in proc.stdout, proc.stdout[-4000:]
