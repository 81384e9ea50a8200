"""Context parallelism through the real CLI (issue 12): ``torchrun --nproc-per-node 2 -m rynnscale train
recipes/demo_tiny.yaml parallel.cp=2`` logs the same losses and aux losses as one process (rel 1e-4; the two
ranks of the CP group read the same micro-batches) and, evaluating after its last step (whole rows on both ranks
of the CP group, greedy generation in lockstep), the same eval loss over the same held-out tokens and as many
grounding samples; its checkpoint resumes on ONE process (cp=2 -> cp=1: a layout change, DCP reshards) and
trains one more step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_helpers import hosted_store_port
from test_torchrun import REPO, _torchrun, _wait

STEPS = 3


def _overrides(out: Path, data: Path, steps: int = STEPS) -> list[str]:
    return [f"run.output_dir={out}", f"train.max_steps={steps}", "data.synthetic.num_samples=16",
            "data.synthetic.samples_per_shard=4", f"data.synthetic.output_dir={data}", "train.micro_batch_tokens=384",
            "logging.progress=false", "logging.plot=false", "logging.wandb.mode=disabled", "parallel.timeout_s=120",
            f"eval.every_steps={STEPS}", "eval.synthetic_samples=8", "eval.grounding_samples=4",
            "eval.max_new_tokens=6"]


def _metrics(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_cp2_trains_like_one_process_and_resumes_on_one(tmp_path):
    recipe = ["-m", "rynnscale", "train", str(REPO / "recipes" / "demo_tiny.yaml")]
    data, one, cp2 = tmp_path / "data", tmp_path / "one", tmp_path / "cp2"
    [(rc, log)] = _wait([_torchrun(1, 1, hosted_store_port(), recipe + _overrides(one, data))])
    assert rc == 0, log[-4000:]
    [(rc, log)] = _wait([_torchrun(1, 2, hosted_store_port(), recipe + _overrides(cp2, data) + ["parallel.cp=2"])])
    assert rc == 0, log[-4000:]
    assert "context parallel: cp=2" in log
    a, b = _metrics(one), _metrics(cp2)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    assert [r["aux_loss"] for r in b] == pytest.approx([r["aux_loss"] for r in a], rel=1e-4)
    assert b[-1]["eval_tokens"] == a[-1]["eval_tokens"] > 0
    assert b[-1]["eval_loss"] == pytest.approx(a[-1]["eval_loss"], rel=1e-4)
    assert b[-1]["grounding_samples"] == a[-1]["grounding_samples"] == 4
    # cp=2 -> cp=1: the same run directory, one process, one more step
    [(rc, log)] = _wait([_torchrun(1, 1, hosted_store_port(), recipe + _overrides(cp2, data, STEPS + 1))])
    assert rc == 0, log[-4000:]
    resumed = _metrics(cp2)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 2))
    assert resumed[-1]["loss"] == pytest.approx(resumed[-2]["loss"], rel=0.2)  # trained on from the reshard
