"""Samples found bad while decoding are counted over every data-parallel rank: each rank decodes only its own
packs, so without the exchange a rank counts a share of them, ``data.max_bad_fraction`` lets through about
world_size times as many, and a checkpoint keeps rank 0's share. The reference is one process reading the same
global order (the same samples per step: world x grad_accum packs a step either way)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dist_helpers import run_ranks

from rynnscale.data.loader import BadDataError, LoaderConfig, TrainLoader
from rynnscale.parallel.distributed import DistContext

pytestmark = pytest.mark.slow


def _cfg(d: str, ga: int, max_bad: float) -> LoaderConfig:
    return LoaderConfig(train_shards=[os.path.join(d, "*.tar")], seed=4, micro_batch_tokens=700, pack_window=3,
                        shuffle_buffer=5, num_epochs=1, micro_batches_per_step=ga, max_bad_fraction=max_bad,
                        min_samples_for_bad_check=1)


def _read(rank: int, world: int, data_dir: str, victim: str, ga: int, max_bad: float) -> dict:
    """Every step's counts of one rank, with the media of ``victim`` unreadable at decode time (the shard
    changed after its headers were walked: only the rank that decodes a sample finds out)."""
    import rynnscale.data.worker as worker
    from rynnscale.data.encode import SampleEncoder
    from rynnscale.data.reader import MediaReadError
    from rynnscale.data.tokenizer import load_tokenizer

    real = worker.read_deferred

    def flaky(shard, media):
        if os.path.basename(shard) == victim:
            raise MediaReadError(f"shard {victim} has 1 bytes, 2 when it was indexed: it changed")
        return real(shard, media)

    worker.read_deferred = flaky
    try:
        ranks = DistContext(rank=rank, world_size=world) if world > 1 else None
        loader = TrainLoader(_cfg(data_dir, ga, max_bad), SampleEncoder(load_tokenizer()), rank=rank,
                             world_size=world, ranks=ranks)
        steps, error = [], None
        try:
            for st in loader:
                steps.append((st.bad, st.bad_distinct, len([b for b in st.micro_batches if not b.filler])))
        except BadDataError as e:
            error = str(e)
        return {"steps": steps, "error": error, "saved": loader.state_dict()["bad_decoding"]}
    finally:
        worker.read_deferred = real


@pytest.fixture(scope="module")
def hinted(tmp_path_factory) -> Path:
    from rynnscale.data_pipelines.shard_stats import cost_hints
    from rynnscale.data_pipelines.synthetic import generate_synthetic

    d = tmp_path_factory.mktemp("ranks_data")
    generate_synthetic(d, 24, seed=11, samples_per_shard=6, frames=4, progress=False, cost_fn=cost_hints)
    return d


def test_decode_time_bad_samples_are_the_runs_count_on_every_rank(hinted: Path, tmp_path: Path) -> None:
    victim = sorted(p.name for p in hinted.glob("*.tar"))[1]   # 6 of the 24 clips
    one = _read(0, 1, str(hinted), victim, ga=2, max_bad=1.0)
    assert one["error"] is None and one["steps"][-1][0] == {"corrupt_tar": 6}
    two = run_ranks(_read, 2, tmp_path / "ranks", data_dir=str(hinted), victim=victim, ga=1, max_bad=1.0)
    for r, got in enumerate(two):
        # the same running counts at every step as the one-process run: the run's, not this rank's share
        assert [s[:2] for s in got["steps"]] == [s[:2] for s in one["steps"]], r
        assert got["saved"] == one["saved"] == {"corrupt_tar": 6}, r      # what a checkpoint keeps
    # each rank did decode only its own packs: the bad ones were found by both ranks together
    assert sum(s[2] for got in two for s in got["steps"]) == sum(s[2] for s in one["steps"])


def test_max_bad_fraction_is_checked_on_the_runs_count(hinted: Path, tmp_path: Path) -> None:
    """25% of the clips are bad: a 20% limit stops the two-rank run as it stops one process (before, each rank
    saw about half of them, 12.5%, and trained on), on both ranks at the same step."""
    victim = sorted(p.name for p in hinted.glob("*.tar"))[2]
    one = _read(0, 1, str(hinted), victim, ga=2, max_bad=0.2)
    assert one["error"] is not None and "max_bad_fraction=0.2" in one["error"]
    two = run_ranks(_read, 2, tmp_path / "ranks", data_dir=str(hinted), victim=victim, ga=1, max_bad=0.2)
    assert [len(got["steps"]) for got in two] == [len(one["steps"])] * 2
    for got in two:
        assert got["error"] is not None and "were bad in all 2 ranks" in got["error"], got["error"]
