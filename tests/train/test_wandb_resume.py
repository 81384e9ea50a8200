"""wandb (offline) across restarts: a run resumed from a checkpoint logs to the same wandb run as before (it used
to start a new one at every restart, splitting one training run's curves over several wandb runs); a fresh
start or a rollback to an earlier checkpoint starts a new one. Real wandb in offline mode, no network."""

from __future__ import annotations

import pytest

from rynnscale.config.schema import RootConfig
from rynnscale.train.metrics import WANDB_RUN_ID_FILE, MetricsLogger

wandb = pytest.importorskip("wandb")


def _run(out, steps, **kw) -> str:
    cfg = RootConfig()
    cfg.train.max_steps, cfg.logging.progress, cfg.logging.wandb.mode = 10, False, "offline"
    cfg.run.name = "resume-test"
    logger = MetricsLogger(cfg, out, is_main=True, **kw)
    run_id = logger._wandb.id
    for s in steps:
        logger.log({"step": s, "loss": 1.0 / s, "lr": 1e-3, "tokens_per_s": 10.0})
    logger.close()
    return run_id


@pytest.fixture(autouse=True)
def _no_user_run_id(monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


def test_a_restart_continues_the_same_wandb_run(tmp_path):
    first = _run(tmp_path, [1, 2, 3])
    assert (tmp_path / WANDB_RUN_ID_FILE).read_text().strip() == first
    again = _run(tmp_path, [4, 5], start_step=3)
    assert again == first
    # both offline directories carry the one id, so `wandb sync --id ID` uploads them as one run
    # (offline-run-TIME-ID, with a -N suffix when two runs start within one second)
    assert sorted(p.name.split("-")[3] for p in (tmp_path / "wandb").glob("offline-run-*")) == [first, first]


def test_a_fresh_start_or_a_rollback_starts_a_new_wandb_run(tmp_path):
    first = _run(tmp_path, [1, 2, 3])
    fresh = _run(tmp_path, [1], start_step=0)
    assert fresh != first
    rollback = _run(tmp_path, [2], start_step=1, resume_wandb=False)
    assert rollback not in (first, fresh)
    assert (tmp_path / WANDB_RUN_ID_FILE).read_text().strip() == rollback   # the next restart continues this one


def test_online_mode_without_an_api_key_is_a_config_error(tmp_path, monkeypatch):
    """logging.wandb.mode=online with no API key: wandb's UsageError ended the run with a traceback (exit 1)
    after the data and the model were built; now a ConfigError (one line, exit 2) saying what to do."""
    from rynnscale.config import ConfigError

    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = RootConfig()
    cfg.logging.progress, cfg.logging.wandb.mode = False, "online"
    with pytest.raises(ConfigError, match=r"logging\.wandb\.mode=online: wandb refused to start: .*API key.*"
                                          r"logging\.wandb\.mode=offline"):
        MetricsLogger(cfg, tmp_path / "run", is_main=True)


def test_wandb_gets_the_bad_sample_counts_by_reason(tmp_path):
    """Each record's skipped_by_reason (a mapping) was dropped from wandb: only top-level numbers were logged."""
    cfg = RootConfig()
    cfg.logging.progress, cfg.logging.wandb.mode = False, "disabled"
    logger = MetricsLogger(cfg, tmp_path, is_main=True)
    logged = []

    class FakeRun:
        def log(self, values, step):
            logged.append((step, values))

    logger._wandb = FakeRun()
    logger.log({"step": 4, "loss": 1.5, "lr": 1e-3, "tokens_per_s": 9.0, "mfu": None, "skipped_samples": 3,
                "skipped_by_reason": {"bad_json": 2, "too_long": 1}, "expert_load_per_layer": [1.0, 2.0]})
    assert logged == [(4, {"step": 4, "loss": 1.5, "lr": 1e-3, "tokens_per_s": 9.0, "skipped_samples": 3,
                           "skipped_by_reason/bad_json": 2, "skipped_by_reason/too_long": 1})]


def test_a_run_that_fails_marks_its_wandb_run_failed(tmp_path, monkeypatch):
    """The trainer closed wandb with finish() (exit code 0) whatever happened: a crashed run showed as finished."""
    from pathlib import Path

    import rynnscale.train.metrics as metrics
    from rynnscale.config import load_config
    from rynnscale.train.trainer import run_training

    finished = []

    class FakeRun:
        id = "fake"

        def log(self, values, step):
            pass

        def finish(self, exit_code=0):
            finished.append(exit_code)

    class Boom:
        def on_step(self, step, record, model, ctx):
            raise RuntimeError("boom at step 1")

    monkeypatch.setattr(metrics, "_init_wandb", lambda cfg, out, resume=False: FakeRun())
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "demo_tiny.yaml"
    cfg = load_config(recipe, [f"run.output_dir={tmp_path / 'run'}", "train.max_steps=2",
                               "data.synthetic.num_samples=16", "logging.plot=false", "logging.progress=false"])
    with pytest.raises(RuntimeError, match="boom"):
        run_training(cfg, hooks=[Boom()])
    assert finished == [1]
    run_training(cfg)   # resumes nothing (no checkpoint), trains 2 steps and ends normally
    assert finished == [1, 0]
