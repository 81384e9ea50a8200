"""The trainer's hook protocol, and the hooks every run may get from its recipe (evaluation, HF export
with a model card). Tests inject faults through the same protocol.

A hook is any object with some of these methods (each optional), called on EVERY rank:

- ``on_step(step, record, model, ctx)``: after the optimiser step, before the step's metrics are
  logged; may add entries to ``record`` (the line ``metrics.jsonl`` gets; a step whose record a hook added to is
  logged whatever ``train.log_every`` says);
- ``on_step_end(step, ctx)``: after the step's log and checkpoint;
- ``on_train_end(step, output_dir, ctx, preempted)``: after the loop and the last checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from rynnscale.checkpoint.dcp import CHECKPOINTS_DIR, checkpoint_name
from rynnscale.checkpoint.export import export_checkpoint_adapter, export_checkpoint_hf, tokenizer_origin
from rynnscale.config import RootConfig
from rynnscale.fsutil import TMP_MARK
from rynnscale.train.model_card import summarize_run, write_model_card

log = logging.getLogger(__name__)


def call_hooks(hooks, method: str, *args: Any) -> None:
    for hook in hooks:
        fn = getattr(hook, method, None)
        if fn is not None:
            fn(*args)


class EvaluationHook:
    """``eval.every_steps``: held-out loss and grounding metrics into the step's record (and after the
    last step)."""

    def __init__(self, cfg: RootConfig, args: Any, ctx: Any):
        from rynnscale.train.evaluate import Evaluator  # tokenizer + data setup: only for runs that evaluate

        self.every, self.last = cfg.eval.every_steps, cfg.train.max_steps
        self.evaluator = Evaluator.from_run(cfg, args, ctx)

    def on_step(self, step: int, record: dict, model: Any, ctx: Any) -> None:
        if step % self.every == 0 or step == self.last:
            record.update(self.evaluator.evaluate(model, ctx))


class HFExportHook:
    """``checkpoint.export_hf``: the final checkpoint is exported by rank 0 (streaming, after a barrier) to
    ``run.output_dir/hf`` with the run's tokenizer and processor files (``export_side_files``, as
    ``rynnscale ckpt export-hf``), so the directory is self-contained, plus a model card. A LoRA run's
    ``hf`` is the merged model, and its adapters go to ``run.output_dir/adapter`` (PEFT format)."""

    def __init__(self, cfg: RootConfig):
        self.cfg = cfg

    def on_train_end(self, step: int, output_dir: Path, ctx: Any, preempted: bool) -> None:
        if preempted or step == 0:
            return
        ctx.barrier()
        ckpt = output_dir / CHECKPOINTS_DIR / checkpoint_name(step)
        if ctx.is_main and not ckpt.is_dir():
            log.warning("no checkpoint of the last step %d (it was non-finite): nothing exported", step)
        elif ctx.is_main:
            cfg = self.cfg
            # what an export killed midway left (the run dir is locked): its temporary directory, or the previous
            # export moved aside (``_replace_dir``), each as large as the model
            for pattern in (f".hf{TMP_MARK}*", ".hf.old-*", f".adapter{TMP_MARK}*"):
                for stale in output_dir.glob(pattern):
                    shutil.rmtree(stale, ignore_errors=True)
            report = export_checkpoint_hf(ckpt, output_dir / "hf", overwrite=True)
            log.info("exported %s to %s (%d tensors, %.1f MB, tokenizer from %s)", ckpt.name, report.out_dir,
                     report.num_tensors, report.total_bytes / 1e6, tokenizer_origin(report))
            write_model_card(Path(report.out_dir), cfg, summarize_run(output_dir))
            if cfg.model.lora.rank > 0 and not cfg.model.lora.trainable:
                adapter = export_checkpoint_adapter(ckpt, output_dir / "adapter", overwrite=True)
                log.info("exported the LoRA adapter (PEFT format) to %s", adapter)
            elif cfg.model.lora.rank > 0:
                log.warning("model.lora.trainable trains whole base tensors: only the merged export %s carries "
                            "them, no PEFT adapter directory is written", report.out_dir)
        ctx.barrier()


def recipe_hooks(cfg: RootConfig, args: Any, ctx: Any) -> list[Any]:
    """The hooks a recipe asks for, in the order they run."""
    hooks: list[Any] = []
    if cfg.eval.every_steps > 0:
        hooks.append(EvaluationHook(cfg, args, ctx))
    if cfg.checkpoint.export_hf:
        hooks.append(HFExportHook(cfg))
    return hooks
