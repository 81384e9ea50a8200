"""The training loop, readable top to bottom: set up the process group -> build model, optimiser, data
(``setup``) -> for each ``DataStep`` the loader yields (this rank's micro-batches and the step's facts: sample
ids, rank costs, bad-sample counts, the loader state after it): one optimiser step (``step``, the loss from an
objective), log, save, hooks -> plot. The step's global quantities (loss over all ranks' assistant tokens,
load balancing, clipping) are documented in ``rynnscale.train.step``.

Checkpoints (``checkpoint.*``, see ``rynnscale.checkpoint.dcp``):

- resume (``auto`` = newest complete checkpoint of ``run.output_dir``, default; ``none``; or a path) loads
  model, optimiser, scheduler, step and tokens seen, and the loader state of the step saved (layout-free, in
  ``trainer_state.json`` ``extra.data_order``). Same layout: RNG states are restored too and the run continues
  exactly (bitwise-equal losses on CPU). Other world size / layout / grad_accum: weights and optimiser reshard
  through DCP and the data continues exactly (nothing lost or repeated, the same samples per step as a straight
  run when ranks x grad_accum is unchanged). A checkpoint without that state (saved before the global order)
  restarts the data order deterministically instead, with the data seed ``restart_data_seed(data.seed, step)``
  (a warning says so); the seed in use is saved, so later resumes keep it.
- ``samples.jsonl`` (``logging.sample_log``): the samples of every step's global batch, cut back to the
  start step on (re)start like ``metrics.jsonl``.
- ``metrics.jsonl`` on (re)start keeps only the lines of steps <= the start step (a resumed run rewrites
  the tail the killed run had logged after its last checkpoint: every step appears once).
- saves every ``checkpoint.every_steps`` steps and after the last step (never before the first optimiser
  step); with expert parallelism the state dict DCP sees holds global expert tensors
  (``ExpertCheckpointLayout``), so checkpoints reshard to any ``ep`` and export without gathering.
- SIGTERM (preemption): the current step finishes, a checkpoint is saved, the process exits 0; a SIGTERM during
  the setup (or between two stages) ends the run before its first step, at the checkpoint it resumed from.

Evaluation (``eval.*``) and the HF export with its model card (``checkpoint.export_hf``) are hooks
(``rynnscale.train.hooks``), as are the objects passed in ``hooks`` (tests inject faults through them).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from rynnscale.batch import DataStep
from rynnscale.checkpoint.dcp import (
    CheckpointError,
    CheckpointManager,
    find_resume_checkpoint,
    job_identity,
    read_trainer_state,
    record_rollback,
)
from rynnscale.checkpoint.ep_layout import ExpertCheckpointLayout
from rynnscale.checkpoint.preemption import PreemptionFlag, preemption_requested, preemption_watch
from rynnscale.config import ConfigError, RootConfig, save_resolved, to_yaml
from rynnscale.data.loader import (
    BadDataError,
    DataStallError,
    DataWorkerError,
    LoaderStateError,
    data_worker_error,
)
from rynnscale.data.reader import ReaderStateError, ShardIntegrityError
from rynnscale.fsutil import atomic_write_bytes
from rynnscale.models import args_from_hf_config
from rynnscale.models.stats import param_stats
from rynnscale.parallel.distributed import DistContext, report_failures
from rynnscale.train.build import build_model
from rynnscale.train.hooks import call_hooks, recipe_hooks
from rynnscale.train.metrics import (
    SAMPLES_FILE,
    MetricsLogger,
    SampleLog,
    StepFlopsMeter,
    expert_load_max_over_mean,
    max_over_mean,
    peak_tflops,
    plot_run,
)
from rynnscale.train.objectives import TokenCrossEntropy
from rynnscale.train.optim import warmup_warning
from rynnscale.train.setup import (
    RunDirLockedError,
    TrainComponents,
    build_components,
    check_same_adapters,
    check_same_base,
    hold_run_dir,
    layout_dict,
    rebuild_data,
    restart_data_seed,
    seed_everything,
    setup_distributed,
    shared_base_fingerprint,
    truncate_metrics,
)
from rynnscale.train.step import NonFiniteLossError, StepStats, train_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    """How one run ended: the step reached, and whether a preemption signal stopped it (then the recipe's
    end-of-run work, the HF export, was skipped: the next run of the same command does it)."""

    output_dir: Path
    step: int
    preempted: bool


def run_training(cfg: RootConfig, hooks: Sequence[Any] = ()) -> Path:
    """Run a whole training job (this rank's part of it under torchrun), or the chain of its ``stages``; returns
    the output directory.

    ``hooks``: extra objects following the hook protocol (``rynnscale.train.hooks``), called on every rank
    after the recipe's own hooks."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # from the start: a SIGTERM during the setup (rendezvous, model build, resume) or between stages is acted on at
    # the training loop's next check (the run says "preempted" and is requeued) instead of killing the process
    with preemption_watch():
        return _run_training(cfg, hooks)


def _run_training(cfg: RootConfig, hooks: Sequence[Any]) -> Path:
    ctx = setup_distributed(cfg)
    root = Path(cfg.run.output_dir)
    # a bad setting or bad data (a shard changed, a state that no longer fits it), a checkpoint refused or unusable
    # (another architecture / LoRA structure / LoRA base, incomplete, disk full): the message says it all (no traceback)
    with report_failures(ctx.rank, ctx.world_size, brief=(ConfigError, BadDataError, DataStallError, DataWorkerError,
                                                        ShardIntegrityError, ReaderStateError, NonFiniteLossError,
                                                        CheckpointError, RunDirLockedError)):
        if ctx.is_main:
            _make_output_dir(root)
        # before anything is written: the status (and config, checkpoints) of a directory another run holds are
        # that run's
        with hold_run_dir(root, ctx):
            write_run_status(root, "running", enabled=ctx.is_main)
            try:
                if cfg.stages:   # a chain of runs (e.g. SFT then GRPO): rynnscale.train.stages
                    from rynnscale.train.stages import run_stages

                    stage, outcome = run_stages(cfg, ctx, hooks)
                else:
                    stage, outcome = None, _train(cfg, ctx, hooks)
            except BaseException as e:
                write_run_status(root, "failed", enabled=ctx.is_main, error=f"{type(e).__name__}: {str(e)[:500]}")
                raise
            preempted = outcome is not None and outcome.preempted
            write_run_status(root, "preempted" if preempted else "finished", enabled=ctx.is_main,
                             step=outcome.step if outcome is not None else None, stage=stage)
            return root if cfg.stages else outcome.output_dir


RUN_STATUS = "run_status.json"


def _make_output_dir(root: Path) -> None:
    """``run.output_dir`` created, or a ConfigError (a typo, a read-only or foreign path is a setting to fix: one
    line, exit 2, instead of a traceback from deep in the run)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run.output_dir {str(root)!r} cannot be created: {e.strerror or e}"
                          f"{f' ({e.filename})' if e.filename and str(e.filename) != str(root) else ''}; "
                          "pass a writable run.output_dir=...") from None


def write_run_status(output_dir: Path, status: str, *, enabled: bool = True, **fields: Any) -> None:
    """``OUTPUT_DIR/run_status.json``: how the job's last process stands (running, finished, preempted -- a
    checkpoint was saved and the same command continues --, or failed), for schedulers and scripts
    (launchers/slurm.sbatch requeues a preempted job). Written by rank 0 only (``enabled``); a rank killed from
    outside leaves "running"."""
    if not enabled:
        return
    rec = {"status": status, "job": job_identity()[0], "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
           "time": time.time(),
           **{k: v for k, v in fields.items() if v is not None}}
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(output_dir) / RUN_STATUS, json.dumps(rec) + "\n")
    except OSError as e:   # a status line must never be what stops (or hides the error of) a run
        log.warning("could not write %s: %s", Path(output_dir) / RUN_STATUS, e)


def train_run(cfg: RootConfig, ctx: DistContext, hooks: Sequence[Any] = ()) -> RunOutcome:
    """One run (one stage of a chain) on an already set-up process group."""
    return _train(cfg, ctx, hooks)


def _resume(cfg: RootConfig, c: TrainComponents, manager: CheckpointManager, output_dir: Path) -> int:
    """Load the checkpoint ``checkpoint.resume`` selects (if any) into ``c``; returns the data seed in use."""
    data_seed = cfg.data.seed
    path = find_resume_checkpoint(output_dir, cfg.checkpoint.resume)
    if path is None:
        return data_seed
    rolling_back = cfg.checkpoint.resume != "auto" and path.resolve() == Path(cfg.checkpoint.resume).resolve()
    c.rolled_back = rolling_back
    if rolling_back and c.ctx.is_main:   # (not when a restarted job continues the branch it rolled back to)
        abandoned = record_rollback(output_dir, path)
        if abandoned:
            log.warning("checkpoint.resume=%s rolls the run back: %s, saved after it, will not be resumed by "
                        "resume=auto (checkpoints/rollback.json)", path, ", ".join(abandoned))
    saved_lora = ((read_trainer_state(path).get("config") or {}).get("model") or {}).get("lora")
    check_same_adapters(saved_lora, cfg.model.lora, path)
    rs = manager.load(path, c.model, c.optimizer, c.scheduler, layout=layout_dict(cfg, c.ctx),
                      model_config=c.args.to_hf_config(),
                      normalize_model_config=lambda d: args_from_hf_config(d).to_hf_config())
    check_same_base(rs.extra.get("lora_base"), c.base, path)
    c.state.step, c.state.tokens_seen = rs.step, rs.tokens_seen
    c.state.nonfinite_steps = int(rs.extra.get("nonfinite_steps", 0))   # (0 from a checkpoint saved before it was kept)
    order = rs.extra.get("data_order")   # the layout-free loader state (global sample order), if saved
    if order is not None:
        data_seed = int(order.get("data_seed", cfg.data.seed))
        if data_seed != cfg.data.seed:
            rebuild_data(cfg, c, data_seed)
        try:
            c.data.load_state_dict(order["loader"])
        except LoaderStateError as e:   # a data setting changed: one line naming it and the ways on
            set_back = "Set it back to continue this run; or s" if getattr(e, "recipe_key", None) else "S"
            raise ConfigError(
                f"checkpoint {path}: {e}. {set_back}tart a new run from these weights (rynnscale ckpt export-hf "
                f"{path} OUT, then model.init_from=OUT: the optimiser state and the data order start afresh)") from None
        if not rs.exact:
            seed_everything(data_seed)
            if c.ctx.is_main:
                log.info("resumed from %s at step %d on another layout: the weights resharded and the global "
                         "sample order continues exactly (nothing lost or repeated)", path, rs.step)
        log.info("resumed %s from %s at step %d", "exactly" if rs.exact else "elastically", path, rs.step)
        return data_seed
    # a checkpoint saved before the global sample order: its per-rank loader state cannot be continued
    data_seed = restart_data_seed(cfg.data.seed, rs.step)
    rebuild_data(cfg, c, data_seed)
    if c.ctx.is_main:
        log.warning("checkpoint %s has no global-order loader state (saved before the global sample order): the data "
                    "order restarts deterministically (data seed %d = restart_data_seed(data.seed=%d, step=%d), "
                    "nothing skipped); it is not the order the original run would have seen", path, data_seed,
                    cfg.data.seed, rs.step)
    seed_everything(data_seed)
    return data_seed


def _start(cfg: RootConfig, ctx: DistContext, output_dir: Path) -> tuple[TrainComponents, CheckpointManager, int]:
    """Resolved config written, components built, checkpoint resumed, metrics tail truncated."""
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, output_dir / "config.yaml")
        if cfg.optim.lr == 0:
            log.warning("optim.lr=0: every step runs forward, backward and the optimiser, but no weight changes "
                        "(a dry run); checkpoints and exports hold the initial model")
        warmup_note = warmup_warning(cfg.optim, cfg.train.max_steps)
        if warmup_note:
            log.warning("%s", warmup_note)
    seed_everything(cfg.run.seed)
    c = build_components(cfg, ctx)
    ck = cfg.checkpoint
    # a LoRA run checkpoints only what trains (adapters + their optimiser state) and a hash of its base
    c.base = shared_base_fingerprint(cfg, ctx)
    manager = CheckpointManager(output_dir, keep_last=ck.keep_last, async_save=ck.async_save,
                                state_adapter=ExpertCheckpointLayout.for_model(c.model, ctx.meshes),
                                trainable_only=cfg.model.lora.rank > 0)
    data_seed = _resume(cfg, c, manager, output_dir)
    if ctx.is_main:
        manager.remove_stale_tmp()   # killed saves' / prunings' leftovers: a run that saves nothing keeps none
        for name in ("metrics.jsonl", SAMPLES_FILE):
            dropped = truncate_metrics(output_dir / name, c.state.step)
            if dropped:
                log.info("%s: dropped %d line(s) of steps after the start step %d", name, dropped, c.state.step)
    ctx.barrier()
    n_params = sum(p.numel() for p in c.model.parameters())  # this rank's shards when distributed
    log.info("model: %s, %.2fM parameters on rank 0, device %s, world size %d",
             "MoE" if c.args.text.is_moe else "dense", n_params / 1e6, ctx.device, ctx.world_size)
    return c, manager, data_seed


def _step_record(step: int, c: TrainComponents, data: DataStep, stats: StepStats, lr: float, dt: float,
                 t_data: float, nonfinite_total: int, flops: StepFlopsMeter, local_flops: float) -> dict:
    """The ``metrics.jsonl`` line of one step (global quantities; data wait is the mean over ranks)."""
    ctx = c.ctx
    # one all-reduce: data wait, model FLOPs, each rank's step time
    times = ctx.sum([t_data, local_flops] + [dt if r == ctx.rank else 0.0 for r in range(ctx.world_size)])
    t_data_mean = times[0] / ctx.world_size
    record = {
        "step": step, "loss": stats.loss, "aux_loss": stats.aux_loss, "lr": lr,
        "grad_norm": stats.grad_norm, "tokens": stats.tokens, "target_tokens": stats.target_tokens,
        "samples": stats.samples, "tokens_seen": c.state.tokens_seen, "tokens_per_s": stats.tokens / dt,
        "step_time_s": dt, "data_wait_share": t_data_mean / dt, "world_size": ctx.world_size,
        "expert_load_max_over_mean": None, "nonfinite_steps": nonfinite_total,
        # data-parallel balance: estimated cost of each rank's micro-batches (the loader's plan) and the
        # measured step time of each rank, as max / mean over ranks
        "rank_cost_max_over_mean": max_over_mean(data.rank_costs),
        "rank_time_max_over_mean": max_over_mean(times[2:]),
        **flops.record(times[1], dt, ctx.world_size),
    }
    if stats.expert_counts is not None:
        worst, per_layer = expert_load_max_over_mean(stats.expert_counts)
        record["expert_load_max_over_mean"] = worst
        record["expert_load_per_layer"] = per_layer
    bad = dict(data.bad)   # the run's count so far, by reason (every step, 0 included)
    record["skipped_samples"], record["skipped_by_reason"] = sum(bad.values()), bad
    return record


def log_skipped(data: Any, ctx: DistContext) -> None:
    """The end-of-run line of skipped samples by reason: the run's counts (every rank's, the same on all ranks: the
    loader and the GRPO source add them over ranks), so rank 0 alone says them."""
    if ctx.is_main and data.bad_counts:
        log.warning("skipped samples by reason: %s (the run's count, all %d ranks together)", data.bad_summary(),
                    ctx.world_size)


def _check_nonfinite(step: int, stats: StepStats, run: int, limit: int) -> None:
    """A non-finite step saves nothing; ``limit`` of them in a row stop the run (the last good checkpoint
    and ``latest`` stay as they are)."""
    log.warning("step %d: non-finite loss %s / grad norm %s: optimiser step skipped (%d in a row, limit "
                "train.max_nonfinite_steps=%d); no checkpoint is saved from this step", step, stats.loss,
                stats.grad_norm, run, limit)
    if run >= limit:
        raise NonFiniteLossError(
            f"step {step}: loss or gradient norm non-finite for {run} steps in a row (train.max_nonfinite_steps="
            f"{limit}; last loss {stats.loss}, grad norm {stats.grad_norm}); stopping without saving. Lower "
            "optim.lr or check the data; resume from the last checkpoint")


def _train(cfg: RootConfig, ctx: DistContext, extra_hooks: Sequence[Any] = ()) -> RunOutcome:
    if not ctx.is_main:  # one rank reports progress; the others only warnings and errors
        logging.getLogger("rynnscale").setLevel(logging.WARNING)
    output_dir = Path(cfg.run.output_dir)
    # a stage's directory (the run's own is held by run_training); the signal handler is run_training's when it runs
    with hold_run_dir(output_dir, ctx), preemption_watch() as preempt:
        return _train_locked(cfg, ctx, output_dir, extra_hooks, preempt)


def _train_locked(cfg: RootConfig, ctx: DistContext, output_dir: Path, extra_hooks: Sequence[Any],
                  preempt: PreemptionFlag) -> RunOutcome:
    c, manager, data_seed = _start(cfg, ctx, output_dir)
    model, state, tc, ck = c.model, c.state, cfg.train, cfg.checkpoint
    if state.step > tc.max_steps:
        log.warning("resumed at step %d, past train.max_steps=%d: nothing to train; the run's result is step %d's",
                    state.step, tc.max_steps, state.step)
    run_config, layout = yaml.safe_load(to_yaml(cfg)), layout_dict(cfg, ctx)

    def save(data: DataStep) -> Path:
        """Checkpoint after the step just trained; ``data.state`` (the loader state after it, the same on every
        rank) continues the data on any layout."""
        extra: dict = {"data_order": {"loader": data.state, "data_seed": data_seed},
                       "nonfinite_steps": state.nonfinite_steps}
        if c.base is not None:
            extra["lora_base"] = c.base
        return manager.save(state.step, model, c.optimizer, c.scheduler, tokens_seen=state.tokens_seen,
                            config=run_config, layout=layout, model_config=c.args.to_hf_config(), extra_state=extra)

    hooks = [*recipe_hooks(cfg, c.args, ctx), *extra_hooks]
    # the objective of the data: SFT cross-entropy, or GRPO on the rollout source's micro-batches
    objective = getattr(c.data, "objective", None) or TokenCrossEntropy(tc.loss_chunk_tokens)
    flops = StepFlopsMeter(c.args, param_stats(build_model(cfg.model, meta=True, arch=c.run.arch)[1]),
                           peak_tflops(ctx.device, cfg.logging.peak_tflops))
    steps = iter(c.data)
    # a restart continues the wandb run it logged to; a rollback (steps again that wandb has) starts a new one
    metrics = MetricsLogger(cfg, output_dir, is_main=ctx.is_main, start_step=state.step,
                            resume_wandb=state.step > 0 and not c.rolled_back)
    sample_log = SampleLog(output_dir, enabled=cfg.logging.sample_log and ctx.is_main)
    nonfinite_run = 0   # (a checkpoint is never saved from a non-finite step: a resumed run starts a new row)
    failed = True   # until the loop ends normally (or by preemption): wandb marks the run failed, not finished
    try:
        # a signal before the first step (during the setup, or a previous stage's export): nothing trained, nothing
        # to save -- the checkpoint this run resumed from stands
        preempted = preemption_requested(preempt)
        if preempted:
            log.warning("preempted (signal %s) before the first step: exiting at step %d without training",
                        preempt.signum, state.step)
        while not preempted and state.step < tc.max_steps:
            t0 = time.perf_counter()
            data = next(steps)
            t_data = time.perf_counter() - t0
            lr = c.scheduler.get_last_lr()[0]
            stats = train_step(model, c.optimizer, data.micro_batches, device=ctx.device, compute_dtype=c.run.compute_dtype,
                               objective=objective, max_grad_norm=tc.max_grad_norm, ctx=ctx)
            c.scheduler.step()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            state.step += 1
            state.tokens_seen += stats.tokens
            sample_log.log(state.step, data.samples)
            nonfinite_run = 0 if stats.finite else nonfinite_run + 1
            state.nonfinite_steps += 0 if stats.finite else 1
            record = _step_record(state.step, c, data, stats, lr, dt, t_data, state.nonfinite_steps, flops,
                                  flops.local(data.micro_batches, ctx.cp_rank))
            record.update(objective.summary(stats.metrics))
            if tc.objective == "grpo":   # the data step was the rollout (generation, rewards, reference)
                record.update(data.metrics, rollout_s=t_data, train_s=dt - t_data)
            n_entries = len(record)
            call_hooks(hooks, "on_step", state.step, record, model, ctx)
            # a GRPO step that rolled out carries that rollout's rewards, and a step a hook added to (an
            # evaluation) its results, which no other step repeats: logged whatever train.log_every says
            if (state.step % tc.log_every == 0 or state.step == tc.max_steps or data.metrics
                    or len(record) > n_entries):
                metrics.log(record)
            preempted = preemption_requested(preempt)
            if not stats.finite:
                _check_nonfinite(state.step, stats, nonfinite_run, tc.max_nonfinite_steps)
                if preempted:   # never a checkpoint of a skipped step: the next step saves (the flag stays set)
                    log.warning("preempted (signal %s) at step %d, which was non-finite and is not saved: training "
                                "one more step to save", preempt.signum, state.step)
                    preempted = False
            elif preempted or state.step == tc.max_steps or (ck.every_steps and state.step % ck.every_steps == 0):
                save(data)
            call_hooks(hooks, "on_step_end", state.step, ctx)
            if preempted:
                log.warning("preempted (signal %s): saved step %d, exiting", preempt.signum, state.step)
                break
        manager.wait()
        if not preempted and preemption_requested(preempt):   # a signal after the last step's save
            preempted = True
            log.warning("preempted (signal %s) after the last step %d was saved: exiting without the end-of-run "
                        "work (the same command again does it)", preempt.signum, state.step)
        failed = False
    except Exception as error:
        # torch reports a dead data worker from its SIGCHLD handler, wherever the step was: say what to do. The
        # other workers stop first: they hold memory (the OOM killer's usual victim), and while a dead one is
        # registered, each child's exit raises again in this thread, as in the wait below
        died = data_worker_error(error, ctx.rank, cfg.data.num_workers)
        if died is not None and died is not error:
            getattr(c.data, "stop_workers", lambda: None)()
        if manager.pending is not None:   # said now: the write may take minutes at scale
            log.error("rank %d: the run failed (%s); finishing the background save of %s before stopping", ctx.rank,
                      str(died or error)[:300], manager.pending.name)
        try:   # a background save that finished is committed, not lost with the failing run (no collective:
            manager.wait_after_failure()   # the other ranks are not here)
        except Exception as e:  # noqa: BLE001 - the run's own error is the one to raise
            log.error("the background checkpoint save did not complete: %s", e)
        if died is not None and died is not error:
            raise died from None
        raise
    finally:
        metrics.close(failed=failed)
        log_skipped(c.data, ctx)
    call_hooks(hooks, "on_train_end", state.step, output_dir, ctx, preempted)
    if cfg.logging.plot and ctx.is_main:
        log.info("plot: %s", plot_run(output_dir))
    log.info("done: %d steps, %d tokens; metrics in %s", state.step, state.tokens_seen, output_dir / "metrics.jsonl")
    return RunOutcome(output_dir, state.step, preempted)
