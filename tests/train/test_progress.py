"""Console progress of a run (issue 28, item 6): with stderr redirected to a file (not a terminal), tqdm's bar
filled the log with carriage-return redraws; the run now writes one plain progress line every
``logging.progress_every`` steps and at the last step, and keeps the bar for terminals."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from rynnscale.config.schema import RootConfig
from rynnscale.train.metrics import MetricsLogger, read_metrics


def _cfg(steps: int, every: int) -> RootConfig:
    cfg = RootConfig()
    cfg.train.max_steps, cfg.logging.progress_every, cfg.logging.wandb.mode = steps, every, "disabled"
    return cfg


def _log_steps(logger: MetricsLogger, steps) -> None:
    for s in steps:
        logger.log({"step": s, "loss": 1.0 / s, "lr": 1e-3, "tokens_per_s": 100.0})
    logger.close()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_redirected_output_gets_plain_progress_lines(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())   # a log file, as under `rynnscale train ... 2> log`
    with caplog.at_level(logging.INFO, logger="rynnscale.train.metrics"):
        _log_steps(MetricsLogger(_cfg(25, 10), tmp_path, is_main=True), range(1, 26))
    assert "\r" not in sys.stderr.getvalue() and "train:" not in sys.stderr.getvalue()   # no bar redraws
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["10/25", "20/25", "25/25"], lines
    assert "loss 0.1000" in lines[0] and "eta" in lines[0] and "(100%)" in lines[-1]
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 26))


def test_logged_steps_sparser_than_progress_every_still_print(tmp_path, caplog, monkeypatch):
    """train.log_every=3 never logs step 10: a line is due once progress_every steps have passed since the last."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="rynnscale.train.metrics"):
        _log_steps(MetricsLogger(_cfg(20, 10), tmp_path, is_main=True, start_step=2), [3, 6, 9, 12, 15, 18, 20])
    assert [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("step ")] == \
        ["12/20", "20/20"]


@pytest.mark.parametrize("progress", [True, False])
def test_a_terminal_keeps_the_bar(tmp_path, caplog, monkeypatch, progress):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    cfg = _cfg(5, 2)
    cfg.logging.progress = progress
    with caplog.at_level(logging.INFO, logger="rynnscale.train.metrics"):
        _log_steps(MetricsLogger(cfg, tmp_path, is_main=True), range(1, 6))
    assert ("train:" in term.getvalue() and "5/5" in term.getvalue()) == progress
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]


def test_synthetic_generation_draws_no_bar_into_a_log(tmp_path, monkeypatch):
    """The demo generates its synthetic set inside the run: its bar went to the redirected log too."""
    from rynnscale.train.data_files import generate_train_synthetic

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    cfg = _cfg(5, 2)
    cfg.data.synthetic.num_samples, cfg.data.synthetic.output_dir = 4, str(tmp_path / "synthetic")
    generate_train_synthetic(cfg)
    assert (tmp_path / "synthetic" / "manifest.json").is_file()
    assert "\r" not in sys.stderr.getvalue(), sys.stderr.getvalue()[:300]
