"""Second half of the 4-rank equivalence suite (see test_equivalence.py): HSDP 2x2 with EP 2 (experts
replicated over dp_replicate, not FSDP-sharded) and EP 4 (one replica, every rank two experts), each with
and without activation checkpointing, against the same single-process accumulation reference."""

from __future__ import annotations

import pytest
from dist_helpers import run_ranks
from test_equivalence import (
    CONFIGS_EP,
    WORLD,
    check_equivalence,
    check_expert_shapes,
    equivalence_worker,
    reference_run,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = run_ranks(equivalence_worker, WORLD, tmp_path_factory.mktemp("equivalence_ep"), configs=CONFIGS_EP)
    return results, reference_run()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS_EP))
def test_matches_single_process_accumulation(runs, name):
    check_equivalence(*runs, name)


@pytest.mark.slow
def test_expert_shards_have_the_layout_shapes(runs):
    check_expert_shapes(runs[0], CONFIGS_EP)
