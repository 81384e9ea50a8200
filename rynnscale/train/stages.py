"""Staged recipes: one command runs a chain of trainings (e.g. SFT, then GRPO), each a complete run of its own.

A recipe with ``stages`` runs stage after stage (``rynnscale.config.stage_config`` gives each its recipe): stage
``name`` trains in ``<run.output_dir>/<name>`` with its own checkpoints, ``metrics.jsonl`` and plot; every stage
but the last exports its final checkpoint (``<dir>/hf``) and the next stage starts from that export
(``model.init_from``). A finished stage leaves ``stage_done.json``; rerunning the command skips finished stages
and resumes the unfinished one from its newest checkpoint (``checkpoint.resume: auto`` inside its directory), so
a chain is resumable at any point of any stage. A preempted stage (SIGTERM, even after its last step's save) ends
the chain for now: the next run continues it, and exports it if that was left. A finished stage a later stage needs
is exported when its ``hf`` is missing (a stage added after the last one). A finished stage whose
``train.max_steps`` was raised trains on, unless later stages started from its result (a ConfigError says what to
do); ``checkpoint.resume=PATH`` continues the stage holding PATH. The command line is laid over every stage
(``rynnscale.config.load``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rynnscale.checkpoint.dcp import find_resume_checkpoint, read_trainer_state, rollback_applied
from rynnscale.config import ConfigError, RootConfig, save_resolved, stage_config
from rynnscale.fsutil import atomic_write_bytes
from rynnscale.train.hooks import HFExportHook
from rynnscale.train.step import NonFiniteLossError

log = logging.getLogger(__name__)

DONE = "stage_done.json"


def stage_finished(cfg: RootConfig) -> bool:
    """Whether the stage run ``cfg`` reached ``train.max_steps`` (its newest checkpoint is the last step)."""
    path = find_resume_checkpoint(Path(cfg.run.output_dir), "auto")
    return path is not None and int(read_trainer_state(path)["step"]) >= cfg.train.max_steps


def _ensure_export(scfg: RootConfig, ctx: Any) -> None:
    """A finished stage that a later stage starts from has its ``hf`` export: one that was preempted before
    exporting, or was the last stage when a stage was added after it, is exported now from its final checkpoint."""
    out = Path(scfg.run.output_dir)
    if (out / "hf" / "config.json").is_file():
        return
    path = find_resume_checkpoint(out, "auto")
    if path is None:
        raise ConfigError(f"stage directory {out} is marked finished ({DONE}) but holds no complete checkpoint to "
                          f"export; remove {out / DONE} to train the stage again")
    log.info("stage %s: exporting its final checkpoint %s for the next stage", out.name, path.name)
    HFExportHook(scfg).on_train_end(int(read_trainer_state(path)["step"]), out, ctx, False)


def _started(cfg: RootConfig, i: int) -> list[str]:
    """The names of the stages after ``i`` that have begun (a checkpoint or a finished mark)."""
    root = Path(cfg.run.output_dir)
    return [st.name for st in cfg.stages[i + 1:]
            if (root / st.name / DONE).exists() or find_resume_checkpoint(root / st.name, "auto") is not None]


def _still_done(cfg: RootConfig, i: int, scfg: RootConfig, ctx: Any) -> bool:
    """Whether finished stage ``i`` stays finished under the recipe as it is now: its ``train.max_steps`` raised
    since -> it trains on (when no later stage has started from its old result; else a ConfigError says what to
    do); lowered -> it keeps its longer result, with a warning."""
    root, st = Path(cfg.run.output_dir), cfg.stages[i]
    done = root / st.name / DONE
    steps = int(json.loads(done.read_text()).get("steps", scfg.train.max_steps))
    if scfg.train.max_steps < steps:
        log.warning("stage %r finished with %d steps; the recipe now asks %d: its %d-step result stands", st.name,
                    steps, scfg.train.max_steps, steps)
    if scfg.train.max_steps <= steps:
        return True
    later = _started(cfg, i)
    if later:
        raise ConfigError(
            f"stage {st.name!r} finished with {steps} steps and the recipe now asks {scfg.train.max_steps}, but "
            f"the stages after it ({', '.join(later)}) started from its {steps}-step result: set its "
            f"train.max_steps back to {steps}, or move {', '.join(str(root / n) for n in later)} away so that they "
            "are trained again from the longer one")
    log.info("stage %r finished with %d steps; the recipe now asks %d: training on", st.name, steps,
             scfg.train.max_steps)
    ctx.barrier()   # every rank has read the mark before rank 0 removes it
    if ctx.is_main:
        done.unlink()
    ctx.barrier()
    return False


def _check_prompt_shards(cfg: RootConfig) -> None:
    """Every GRPO stage's ``rl.prompts`` patterns match files now (``ShardPatternError`` naming the pattern), so a
    typo fails the chain before its earlier stages train, not hours later (the prompts' tags are read when the
    stage starts)."""
    from rynnscale.data.reader import expand_shard_patterns

    for i in range(len(cfg.stages)):
        scfg = stage_config(cfg, i, check_paths=False)
        if scfg.train.objective == "grpo" and scfg.rl.prompts:
            expand_shard_patterns(list(scfg.rl.prompts))


def run_stages(cfg: RootConfig, ctx: Any, hooks: Sequence[Any] = ()) -> tuple[str, Any]:
    """Run (or continue) the chain of ``cfg.stages`` on this rank; returns the name of the stage it ended in and
    that stage's ``RunOutcome`` (None when every stage had finished before)."""
    from rynnscale.train.trainer import train_run

    root = Path(cfg.run.output_dir)
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, root / "config.yaml")
    last = len(cfg.stages) - 1
    outcome = None
    _check_prompt_shards(cfg)
    for i, st in enumerate(cfg.stages):
        done = root / st.name / DONE
        scfg = stage_config(cfg, i)
        # checkpoint.resume=PATH names this stage's (not when a restarted job already rolled it back)
        rollback = (scfg.checkpoint.resume not in ("auto", "none")
                    and not rollback_applied(scfg.run.output_dir, scfg.checkpoint.resume))
        if rollback and _started(cfg, i):
            raise ConfigError(f"checkpoint.resume={scfg.checkpoint.resume} rolls stage {st.name!r} back, but the "
                              f"stages after it ({', '.join(_started(cfg, i))}) started from its result: move them "
                              "away first, so that they are trained again from the new one")
        if done.exists() and not rollback and _still_done(cfg, i, scfg, ctx):
            log.info("stage %d/%d %r: finished earlier (%s), skipped", i + 1, len(cfg.stages), st.name, done)
            if i < last:
                _ensure_export(scfg, ctx)
            continue
        if done.exists() and rollback:
            ctx.barrier()
            if ctx.is_main:
                done.unlink()
            ctx.barrier()
        log.info("stage %d/%d %r: %s, %d steps, in %s%s", i + 1, len(cfg.stages), st.name, scfg.train.objective,
                 scfg.train.max_steps, scfg.run.output_dir,
                 f", from {scfg.model.init_from}" if i > 0 else "")
        outcome = train_run(scfg, ctx, hooks)
        if outcome.preempted:
            log.warning("stage %r was preempted at step %d; run the same command again to continue the chain",
                        st.name, outcome.step)
            return st.name, outcome
        if not stage_finished(scfg):
            raise NonFiniteLossError(
                f"stage {st.name!r} ended at step {outcome.step} without a checkpoint of it (the loss or gradient of "
                "its last step was non-finite), so the chain has no result of it to go on from; lower optim.lr or "
                "check the data, then run the same command again (the stage resumes from its last good checkpoint)")
        if ctx.is_main:
            atomic_write_bytes(done, json.dumps({"stage": st.name, "index": i, "steps": scfg.train.max_steps,
                                                 "objective": scfg.train.objective}))
        ctx.barrier()
    log.info("all %d stages done: %s", len(cfg.stages), ", ".join(st.name for st in cfg.stages))
    return cfg.stages[-1].name, outcome
