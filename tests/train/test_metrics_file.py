"""metrics.jsonl is strict JSON and survives what a run leaves behind: a skipped step's NaN loss and an idle MoE
layer's NaN load are written as null (JSON has no NaN / Infinity: jq and JavaScript refuse the file), a run
killed while writing a line leaves a torn last line that the plot and the model card read past, and the card's
mean loss is over the steps that have one."""

from __future__ import annotations

import json
import math
import re
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


def test_the_plot_shows_the_eval_loss(tmp_path: Path, monkeypatch) -> None:
    """training.png drew the training loss only: the held-out loss that ``eval.every_steps`` logged (every K steps,
    the line without it elsewhere) was in metrics.jsonl but on no plot. The loss panel now has it at the steps
    that evaluated (a null eval loss, an evaluation without target tokens, left out)."""
    import matplotlib.figure

    figures: list = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
    logger = _logger(tmp_path)
    for step, loss, ev in [(1, 4.0, None), (2, 3.0, 3.5), (3, 2.5, None), (4, 2.0, 2.75), (5, 1.5, math.nan)]:
        logger.log(_record(step, loss) | ({} if ev is None else {"eval_loss": ev, "eval_tokens": 10}))
    logger.close()
    assert plot_run(tmp_path).is_file()
    lines = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
    assert list(lines["eval_loss"].get_xdata()) == [2, 4] and list(lines["eval_loss"].get_ydata()) == [3.5, 2.75]
    assert list(lines["loss"].get_ydata()) == [4.0, 3.0, 2.5, 2.0, 1.5]


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


def test_the_plot_command(tmp_path: Path, capsys) -> None:
    """``rynnscale plot RUN_DIR`` draws the end-of-run plot again (a run killed before its end had none, and there was
    no command for it): a run with a skipped step and a torn last line, a GRPO run (the reward panel), a stage
    chain's directory (a plot per stage); one line and exit 2, never a traceback, when there is nothing to plot."""
    from rynnscale.cli import main

    sft, grpo = tmp_path / "chain" / "sft", tmp_path / "chain" / "grpo"
    for run, extra in ((sft, {}), (grpo, {"reward_mean": 0.4, "reward_std": 0.1, "reward_format": 0.5, "kl": 0.01})):
        logger = _logger(run)
        for step, loss in [(1, 4.0), (2, math.nan), (3, 2.0)]:
            logger.log(_record(step, loss) | extra)
        logger.close()
    with (sft / METRICS_FILE).open("a") as f:
        f.write('{"step": 4, "lo')   # killed mid-write
    assert main(["plot", str(sft)]) == 0
    assert capsys.readouterr().out == f"wrote {sft / 'training.png'}\n" and (sft / "training.png").is_file()
    (sft / "training.png").unlink()
    assert main(["plot", str(tmp_path / "chain"), "--out", "again.png"]) == 0
    assert (sft / "again.png").is_file() and (grpo / "again.png").is_file()
    capsys.readouterr()

    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / METRICS_FILE).write_text(json.dumps(_record(1, 4.0)) + '\n{"step": 2, "lo\n' + json.dumps(_record(3, 2.0)))
    for run, exit_code, message in [
            (tmp_path / "nowhere", 2, r"nowhere is not a directory"),
            (empty, 2, r"empty has no metrics\.jsonl \(not a run directory, or the run logged no step yet\)"),
            (bad, 2, r"bad/metrics\.jsonl line 2 is not JSON")]:
        assert main(["plot", str(run)]) == exit_code, run
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err and err.count("\n") == 1, err
    (empty / METRICS_FILE).write_text("")
    assert main(["plot", str(empty)]) == 2
    assert "holds no step yet: nothing to plot" in capsys.readouterr().err


def test_the_end_of_run_skipped_samples_line_is_the_runs_and_said_once(caplog) -> None:
    """The counts are the run's (the loader adds every rank's; the same on all ranks), but every rank logged them as
    its own: 2 ranks printed "rank 0 skipped ... too_long=59" and "rank 1 skipped ... too_long=59" for 59 skipped in
    all (seen in a torchrun run of the demo at train.micro_batch_tokens=80), read as 118. Rank 0 alone says them."""
    import logging

    from rynnscale.parallel.distributed import DistContext
    from rynnscale.train.trainer import log_skipped

    class Data:
        bad_counts = {"too_long": 59}

        def bad_summary(self) -> str:
            return "too_long=59"

    with caplog.at_level(logging.WARNING, logger="rynnscale.train.trainer"):
        for rank in (0, 1):
            log_skipped(Data(), DistContext(rank=rank, world_size=2))
        Data.bad_counts = {}
        log_skipped(Data(), DistContext())   # nothing skipped: no line
    assert [r.getMessage() for r in caplog.records] == [
        "skipped samples by reason: too_long=59 (the run's count, all 2 ranks together)"]
