"""The demo recipe on the converted LeRobot G1 subset (3 episodes -> 7 clips of 4 s, ~1554 tokens each), as a
user runs it: ``rynnscale data convert lerobot ... OUT`` then ``rynnscale train recipes/demo_tiny.yaml
data.train_shards=OUT ...`` (subprocesses, so the output is what a user sees).

- A budget no clip fits is one clear error before training that names ``train.micro_batch_tokens`` and the
  value that fits, once, without a traceback or a flood of per-sample warnings (issue 28.1).
- Without cost hints the run stops after reading the data once, counting 7 samples, not 200 re-reads.
- Some clips too long (within ``data.max_bad_fraction``): a warning with the count, and the run trains.
- With a budget that fits, 7 clips smaller than the packing window train in whole epochs, never one clip in
  two consecutive steps (issue 27.4).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from shared_data import SHARED_DATA

from rynnscale.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
G1 = SHARED_DATA / "lerobot_g1_subset"


@pytest.fixture(scope="module")
def g1(tmp_path_factory) -> dict[str, Path]:
    """The subset converted with the defaults, without cost hints, and as 1 s clips (~456 tokens each)."""
    pytest.importorskip("pyarrow", reason="LeRobot parquet needs pyarrow: pip install pyarrow")
    pytest.importorskip("av")
    if not (G1 / "meta" / "info.json").is_file():
        pytest.skip(f"shared G1 LeRobot subset not found at {G1} (set RYNNSCALE_SHARED_DATA)")
    root = tmp_path_factory.mktemp("g1")
    out = {}
    for name, extra in (("default", []), ("no_hints", ["--no-cost-hints"]), ("short", ["--clip-seconds", "1"])):
        out[name] = root / name
        assert cli_main(["data", "convert", "lerobot", str(G1), str(out[name]), "--no-progress", *extra]) == 0
    return out


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rynnscale", "train", str(REPO / "recipes" / "demo_tiny.yaml"),
           f"run.output_dir={tmp_path / 'run'}", "logging.progress=false", "logging.plot=false", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)


def test_budget_no_clip_fits_is_one_clear_error(g1, tmp_path: Path) -> None:
    proc = _train(tmp_path, f"data.train_shards={g1['default']}", "train.max_steps=5")
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert err.count(" ERROR ") == 1 and "Traceback" not in err, err[-3000:]
    assert "0 of 7 samples (0.0%) fit train.micro_batch_tokens=512" in err, err[-3000:]
    assert "Set train.micro_batch_tokens=2048 (>= 1556 fits every sample)" in err
    assert "skipping bad sample" not in err and len(err.splitlines()) < 10, err[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_without_hints_the_run_stops_after_one_read_counting_distinct_samples(g1, tmp_path: Path) -> None:
    proc = _train(tmp_path, f"data.train_shards={g1['no_hints']}", "train.max_steps=5")
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert err.count(" ERROR ") == 1 and "Traceback" not in err, err[-3000:]
    assert "BadDataError: 7 of 7 samples (100.0%) were bad" in err and "(too_long=7)" in err, err[-3000:]
    assert "raise train.micro_batch_tokens" in err
    assert err.count("skipping bad sample (too_long)") == 5, err[-3000:]   # the first few, by name
    assert "further bad samples of reason too_long are counted" in err


def test_some_clips_too_long_is_a_warning_and_the_run_trains(g1, tmp_path: Path) -> None:
    proc = _train(tmp_path, f"data.train_shards=[{g1['default']},{g1['short']}]", "train.micro_batch_tokens=1024",
                  "data.max_bad_fraction=0.2", "train.max_steps=2")
    err = proc.stderr
    assert proc.returncode == 0, err[-3000:]
    assert ("35 of 42 samples (83.3%) fit train.micro_batch_tokens=1024 by the shards' cost hints (the longest has "
            "1556 tokens); the other 7 will be skipped as too_long (train.micro_batch_tokens=2048 fits them all)") in err
    assert err.count("skipping bad sample (too_long)") == 5 and " ERROR " not in err, err[-3000:]
    assert "skipped samples by reason: too_long=7" in err
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["skipped_samples"] == 7
    assert records[-1]["skipped_by_reason"] == {"too_long": 7}


@pytest.mark.parametrize(("world", "ga"), [(1, 1), (2, 1), (1, 3)])
def test_seven_clips_train_in_whole_epochs(g1, tmp_path: Path, world: int, ga: int) -> None:
    """The demo's data path at train.micro_batch_tokens=2048 (one clip per micro-batch, a window of 32 x N
    samples): over 40 steps the clips' counts differ by at most one, they run in whole epochs (an epoch's last
    step is short when N does not divide 7) and no clip is in two consecutive steps (it was: one clip in 4
    steps in a row, one 12 times in 40 steps, another 4)."""
    from rynnscale.config.load import load_config
    from rynnscale.config.model_args import resolve_model_args
    from rynnscale.data.pipeline import build_train_data
    from tests.data.test_global_order import _epoch_walk

    cfg = load_config(REPO / "recipes" / "demo_tiny.yaml",
                      [f"data.train_shards={g1['default']}", "data.synthetic.num_samples=0",
                       "train.micro_batch_tokens=2048", f"train.grad_accum={ga}", f"run.output_dir={tmp_path}"])
    loader = build_train_data(cfg, resolve_model_args(cfg.model).args, rank=0, world_size=world)
    it, steps = iter(loader), []
    for _ in range(40):
        steps.append([k.split(":")[-1] for k in next(it).samples])
    counts = Counter(k for st in steps for k in st)
    assert len(counts) == 7 and max(counts.values()) - min(counts.values()) <= 1, counts
    assert _epoch_walk(steps, set(counts)) >= sum(counts.values()) // 7
    if world * ga < 4:   # (two steps of 4 clips hold more than the 7)
        assert not [i for i in range(1, 40) if set(steps[i]) & set(steps[i - 1])], steps
