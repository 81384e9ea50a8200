"""Staged recipes: one command runs a chain of trainings (e.g. SFT, then GRPO), each a complete run of its own.

A recipe with ``stages`` runs stage after stage (``rynnscale.config.stage_config`` gives each its recipe): stage
``name`` trains in ``<run.output_dir>/<name>`` with its own checkpoints, ``metrics.jsonl`` and plot; every stage
but the last exports its final checkpoint (``<dir>/hf``) and the next stage starts from that export
(``model.init_from``). A finished stage leaves ``stage_done.json``; rerunning the command skips finished stages
and resumes the unfinished one from its newest checkpoint (``checkpoint.resume: auto`` inside its directory), so
a chain is resumable at any point of any stage. A stage that stopped before its last step (SIGTERM) ends the
chain for now: the next run continues it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rynnscale.checkpoint.dcp import find_resume_checkpoint, read_trainer_state
from rynnscale.config import RootConfig, save_resolved, stage_config
from rynnscale.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

DONE = "stage_done.json"


def stage_finished(cfg: RootConfig) -> bool:
    """Whether the stage run ``cfg`` reached ``train.max_steps`` (its newest checkpoint is the last step)."""
    path = find_resume_checkpoint(Path(cfg.run.output_dir), "auto")
    return path is not None and int(read_trainer_state(path)["step"]) >= cfg.train.max_steps


def run_stages(cfg: RootConfig, ctx: Any, hooks: Sequence[Any] = ()) -> Path:
    """Run (or continue) the chain of ``cfg.stages`` on this rank; returns ``run.output_dir``."""
    from rynnscale.train.trainer import train_run

    root = Path(cfg.run.output_dir)
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, root / "config.yaml")
    for i, st in enumerate(cfg.stages):
        done = root / st.name / DONE
        if done.exists():
            log.info("stage %d/%d %r: finished earlier (%s), skipped", i + 1, len(cfg.stages), st.name, done)
            continue
        scfg = stage_config(cfg, i)
        log.info("stage %d/%d %r: %s, %d steps, in %s%s", i + 1, len(cfg.stages), st.name, scfg.train.objective,
                 scfg.train.max_steps, scfg.run.output_dir,
                 f", from {scfg.model.init_from}" if i > 0 else "")
        train_run(scfg, ctx, hooks)
        if not stage_finished(scfg):
            log.warning("stage %r stopped before its last step; run the same command again to continue it", st.name)
            return root
        if ctx.is_main:
            atomic_write_bytes(done, json.dumps({"stage": st.name, "index": i, "steps": scfg.train.max_steps,
                                                 "objective": scfg.train.objective}))
        ctx.barrier()
    log.info("all %d stages done: %s", len(cfg.stages), ", ".join(st.name for st in cfg.stages))
    return root
