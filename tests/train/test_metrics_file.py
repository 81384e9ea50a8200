"""metrics.jsonl is strict JSON and survives what a run leaves behind: a skipped step's NaN loss and an idle MoE
layer's NaN load are written as null (JSON has no NaN / Infinity: jq and JavaScript refuse the file), a run
killed while writing a line leaves a torn last line that the plot and the model card read past, and the card's
mean loss is over the steps that have one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rynnscale.config.schema import RootConfig
from rynnscale.train.metrics import METRICS_FILE, MetricsLogger, plot_run, read_metrics
from rynnscale.train.model_card import summarize_run


def _strict(line: str) -> dict:
    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")
    return json.loads(line, parse_constant=refuse)


def _logger(run: Path) -> MetricsLogger:
    cfg = RootConfig()
    cfg.logging.wandb.mode, cfg.logging.progress = "disabled", False
    return MetricsLogger(cfg, run, is_main=True)


def _record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "aux_loss": 0.0, "lr": 1e-3, "tokens_per_s": 100.0, "tokens_seen": 10 * step}


def test_nonfinite_values_are_written_as_null(tmp_path: Path) -> None:
    logger = _logger(tmp_path)
    rec = _record(1, math.nan) | {"grad_norm": math.inf, "expert_load_max_over_mean": math.nan,
                                  "expert_load_per_layer": [1.5, math.nan], "skipped_by_reason": {"decode": 0}}
    logger.log(rec)
    logger.close()
    got = _strict((tmp_path / METRICS_FILE).read_text().splitlines()[0])
    assert got["loss"] is None and got["grad_norm"] is None and got["expert_load_max_over_mean"] is None
    assert got["expert_load_per_layer"] == [1.5, None] and got["skipped_by_reason"] == {"decode": 0}
    assert math.isnan(rec["loss"])   # the caller's record (progress line, wandb) is not changed


def test_plot_and_card_of_a_run_with_a_skipped_step(tmp_path: Path) -> None:
    logger = _logger(tmp_path)
    for step, loss in [(1, 4.0), (2, 3.0), (3, math.nan), (4, 2.0)]:
        logger.log(_record(step, loss))
    logger.close()
    assert plot_run(tmp_path).is_file()
    summary = summarize_run(tmp_path)
    assert summary["final_loss"] == 2.0 and summary["steps"] == 4
    assert summary["final_loss_mean_last_steps"] == pytest.approx((4.0 + 3.0 + 2.0) / 3, rel=1e-12)
    assert summary["mean_over_last_steps"] == 3


def test_a_torn_last_line_is_read_past_and_a_torn_middle_line_named(tmp_path: Path) -> None:
    lines = [json.dumps(_record(1, 4.0)), json.dumps(_record(2, 3.0))]
    path = tmp_path / METRICS_FILE
    path.write_text("\n".join(lines) + "\n" + json.dumps(_record(3, 2.0))[:17])   # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert plot_run(tmp_path).is_file()
    assert summarize_run(tmp_path)["steps"] == 2
    path.write_text(lines[0] + "\n{\"step\": 2, \"lo\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2 is not JSON"):
        read_metrics(tmp_path)
