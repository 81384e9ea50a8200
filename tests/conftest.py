"""Test-suite root: one intra-op thread per process, and tests marked ``gpu`` skipped where no CUDA device is
present (``pytest -m gpu`` selects them on a GPU machine: bench/gpu_check.sh runs exactly that set).

Helper modules are importable by bare name through ``pythonpath`` in pyproject.toml.

Threads: CI runs two pytest-xdist workers on two cores and many tests start more Python processes (trainer
runs, torchrun ranks, bench scripts). With torch's default of one OpenMP thread per core, every process spins
two threads at each op's barrier, and on an oversubscribed machine a descheduled thread stalls the other:
tiny-model steps measured 20-100x slower (bench/train_step.py --tiny, 2 cases: 83 s with the default, 29 s
with ``OMP_NUM_THREADS=1``, load average 4). The tests' models are tiny, so one thread per
process loses nothing when the machine is idle. Set here, before the test modules import torch, so that
every subprocess inherits it; an ``OMP_NUM_THREADS`` already set is kept."""

from __future__ import annotations

import os
import sys

import pytest

if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:   # imported before this file (by a plugin): its pool is sized already
        sys.modules["torch"].set_num_threads(1)


# Run first: the README's commands are one chain of training runs in one test (the quick start alone trains 200
# steps), the longest test of the suite (7 min on the loaded 2-core CI machine). Collected last (tests/ files come
# after its folders), it started when the other xdist worker had little left to take and that worker sat idle
# for minutes at the end; first, the other worker spreads the rest beside it (--dist worksteal).
FIRST = ("tests/test_readme.py",)


def pytest_collection_modifyitems(config, items) -> None:
    first = [item for item in items if item.nodeid.startswith(FIRST)]
    if first:   # a stable move: the order within the moved files and of all the others is kept
        items[:] = first + [item for item in items if not item.nodeid.startswith(FIRST)]
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen35_moe_init(tmp_path_factory):
    """``qwen35_helpers.tiny_moe_dir``: a tiny transformers Qwen3.5-MoE directory (seeded weights, the bundled
    tokenizer), built once per session (per xdist worker) for the tests that train from it
    (``model.init_from``) or compare against it. Read-only: a test that changes the directory must build its
    own."""
    pytest.importorskip("transformers.models.qwen3_5_moe")
    from qwen35_helpers import tiny_moe_dir

    return tiny_moe_dir(tmp_path_factory.mktemp("qwen35_moe_init") / "init")
