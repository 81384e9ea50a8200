"""The training loop, readable top to bottom: set up the process group -> build model, optimiser, data ->
for each step: fetch micro-batches, forward/backward, clip, step, log -> plot.

One process or many (``torchrun``): every rank is a data-parallel rank with its own micro-batches (EP
ranks too; expert parallelism is carved out of data parallelism), and the step's quantities are global:

- loss = sum of token cross-entropies over the assistant tokens of ALL ranks' micro-batches of the step,
  divided by their total count (all-reduced BEFORE backward), so N ranks x M micro-batches give the same
  loss and gradient as one process with N*M micro-batches of gradient accumulation; FSDP sums (does not
  average) the ranks' gradients (see ``rynnscale.parallel.fsdp``);
- plus the MoE load-balancing loss averaged over all (rank, micro-batch) forwards, each computed with
  expert counts all-reduced over the data-parallel ranks (global-batch balance);
- the gradient norm for clipping covers every shard and every expert group;
- logged loss / tokens / tokens-per-second are sums or means over all ranks.

Checkpoints (``checkpoint.*``, see ``rynnscale.checkpoint.dcp``):

- resume (``auto`` = the checkpoint ``checkpoints/latest`` names, default; ``none``; or a path) loads
  model, optimiser, scheduler, step and tokens seen. Same world size and layout: this rank's loader state
  and RNG states are restored too, and the run continues exactly (bitwise-equal losses on CPU). Other world
  size / layout: weights and optimiser reshard through DCP, and the data order restarts deterministically
  from the recorded step: every rank's loader is rebuilt with the data seed ``restart_data_seed(data.seed,
  step)`` and skips nothing (a warning says so); the seed in use is saved, so later exact resumes keep it.
- ``metrics.jsonl`` on (re)start keeps only the lines of steps <= the start step (a resumed run rewrites
  the tail the killed run had logged after its last checkpoint: every step appears once).
- saves every ``checkpoint.every_steps`` steps and after the last step (never before the first optimiser
  step); with expert parallelism the state dict DCP sees holds global expert tensors
  (``ExpertCheckpointLayout``), so checkpoints reshard to any ``ep`` and export without gathering.
- SIGTERM (preemption): the current step finishes, a checkpoint is saved, the process exits 0.
- ``checkpoint.export_hf``: the final checkpoint is exported by rank 0 (streaming, after a barrier) to
  ``run.output_dir/hf`` with the tokenizer files of ``model.init_from`` (else ``data.tokenizer``, else the
  bundled Qwen3 tokenizer), so the directory is self-contained.
- ``hooks``: objects with an ``on_step_end(step, ctx)`` method called after each step's log and save
  (tests inject faults through them; nothing reads environment variables here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule

from rynnscale.config import RootConfig, save_resolved
from rynnscale.data.batch import PackedBatch
from rynnscale.fsutil import atomic_write_bytes
from rynnscale.parallel.distributed import DistContext, clip_grad_norm_, init_distributed, report_failures
from rynnscale.train.metrics import MetricsLogger, expert_load_max_over_mean, plot_run
from rynnscale.train.optim import build_optimizer, build_scheduler

log = logging.getLogger("rynnscale")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_context(dtype_name: str, device: torch.device):
    """bf16 autocast on GPU by default; fp32 on CPU (exact, reproducible)."""
    use_bf16 = dtype_name == "bfloat16" or (dtype_name == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------- one step
class NonFiniteLossError(RuntimeError):
    """``train.max_nonfinite_steps`` steps in a row had an inf/NaN loss or gradient norm."""


@dataclass
class StepStats:
    """Global (all ranks) quantities of one optimiser step; ``expert_counts`` [n_moe, E] summed over ranks."""

    loss: float
    aux_loss: float
    grad_norm: float
    tokens: int
    target_tokens: int
    samples: int
    expert_counts: torch.Tensor | None
    finite: bool = True   # False: loss or grad norm was inf/NaN and the optimiser step was skipped


def train_step(model, optimizer, micro_batches: list[PackedBatch], *, device: torch.device, dtype_name: str,
               loss_chunk_tokens: int, max_grad_norm: float, ctx: DistContext | None = None) -> StepStats:
    """One optimiser step over this rank's ``micro_batches`` (gradient accumulation), with the loss
    normalised by the target-token count of the whole step across ``ctx``'s ranks (None = one process)."""
    ctx = ctx or DistContext(device=device)
    local_targets = sum(b.num_target_tokens for b in micro_batches)
    n_targets = int(ctx.sum([local_targets])[0])  # before any backward: every rank divides by the same count
    denom = max(n_targets, 1)
    n_forwards = len(micro_batches) * ctx.dp_size  # the aux loss is a mean over all (rank, micro-batch)
    # metrics stay on the device until the step ends: no host sync between micro-batches, so the
    # next micro-batch's kernels are queued while the GPU still runs this one's backward
    loss_dev = torch.zeros((), dtype=torch.float64, device=device)
    aux_dev = torch.zeros((), dtype=torch.float64, device=device)
    counts = None
    # HSDP: replicas all-reduce the (reduce-scattered) gradients once per step, after the last
    # micro-batch, instead of once per micro-batch (a no-op without a replicate dimension)
    hsdp_defer = ctx.distributed and isinstance(model, FSDPModule) and len(micro_batches) > 1
    for i, batch in enumerate(micro_batches):
        if hsdp_defer:
            model.set_requires_all_reduce(i == len(micro_batches) - 1)
        batch = batch.to(device)
        with autocast_context(dtype_name, device):
            out = model(batch)
            loss_sum = model.loss_sum(batch, out, loss_chunk_tokens)
        aux = out.aux_loss / n_forwards
        (loss_sum / denom + aux).backward()
        loss_dev += loss_sum.detach()
        aux_dev += aux.detach()
        if out.expert_counts is not None:
            c = out.expert_counts.detach().long()
            counts = c if counts is None else counts + c
    grad_norm = clip_grad_norm_(model.parameters(), max_grad_norm, ctx.norm_group)
    loss_total, aux_total, tokens, samples = ctx.sum([
        loss_dev.item(), aux_dev.item(), sum(b.num_tokens for b in micro_batches),
        sum(b.num_samples for b in micro_batches)])
    # global values (all ranks agree): an inf/NaN loss or gradient must not reach the weights
    finite = math.isfinite(loss_total) and math.isfinite(aux_total) and math.isfinite(float(grad_norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if counts is not None:
        counts = ctx.sum_tensor(counts).cpu()
    return StepStats(loss=loss_total / denom, aux_loss=aux_total, grad_norm=float(grad_norm), tokens=int(tokens),
                     target_tokens=n_targets, samples=int(samples), expert_counts=counts, finite=finite)


# ----------------------------------------------------------------------------------------- setup
@dataclass
class TrainState:
    """What a checkpoint must restore besides model / optimiser / scheduler / data loader state."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(sd["step"]), int(sd["tokens_seen"])


@dataclass
class TrainComponents:
    args: Any                    # Qwen3VLArgs
    model: torch.nn.Module       # FSDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: Any                    # TrainLoader of this rank
    ctx: DistContext
    state: TrainState = field(default_factory=TrainState)


def setup_distributed(cfg: RootConfig) -> DistContext:
    """Process group (torchrun env) + device; meshes are built later, once the model is known."""
    rank, local_rank, world_size, device = init_distributed(resolve_device(cfg.run.device), cfg.parallel.timeout_s)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def prepare_data_files(cfg: RootConfig, ctx: DistContext) -> None:
    """Generate the synthetic dataset once: global rank 0 first (shared file system), then local rank 0
    of every other node if its file system does not see it yet; the others wait at barriers."""
    from rynnscale.data.pipeline import ensure_synthetic_data

    if cfg.data.synthetic.num_samples <= 0:
        return
    if ctx.rank == 0:
        ensure_synthetic_data(cfg)
    ctx.barrier()
    if ctx.rank != 0 and ctx.local_rank == 0:
        from rynnscale.data.pipeline import synthetic_data_dir
        from rynnscale.data_pipelines.shards import MANIFEST_NAME
        if not (synthetic_data_dir(cfg) / MANIFEST_NAME).exists():
            ensure_synthetic_data(cfg)
    ctx.barrier()


def build_components(cfg: RootConfig, ctx: DistContext) -> TrainComponents:
    """Model (EP + activation checkpointing + FSDP2 when distributed), optimiser, schedule, this rank's data."""

    from rynnscale.data.pipeline import build_train_data  # data + model imports are heavy: keep CLI fast
    from rynnscale.models.build import build_model, build_sharded_model, model_args
    from rynnscale.parallel.checkpointing import apply_activation_checkpointing
    from rynnscale.train.optim import freeze_parameters

    args = model_args(cfg.model)
    freeze = list(getattr(cfg.model, "freeze", None) or [])  # applied before wrapping (names are HF names)
    if ctx.distributed:
        from rynnscale.parallel.mesh import ParallelLayout, build_meshes, device_type_of

        p = cfg.parallel
        layout = ParallelLayout.resolve(ctx.world_size, p.dp_replicate, p.dp_shard, p.ep, args.text.num_experts)
        ctx.meshes = build_meshes(layout, device_type_of(ctx.device))
        # built on the meta device and parallelised there (EP keeps this rank's experts, FSDP2 shards the
        # rest); only this rank's shards are allocated on the device and filled from init_from or the seed
        args, model = build_sharded_model(
            cfg.model, ctx.meshes, ctx.device, seed=cfg.run.seed, freeze=freeze, dtype_name=cfg.train.dtype,
            ac_mode=cfg.model.activation_checkpointing, ac_every=cfg.model.activation_checkpointing_every,
            compile=cfg.model.compile)
        model.counts_reducer = ctx.counts_reducer
        log.info("parallel layout: %s", layout)
    else:
        args, model = build_model(cfg.model, ctx.device, seed=cfg.run.seed)
        if freeze:
            freeze_parameters(model, freeze)
        apply_activation_checkpointing(model, cfg.model.activation_checkpointing,
                                       every=cfg.model.activation_checkpointing_every)
        if cfg.model.compile:
            from rynnscale.parallel.compile import compile_blocks

            compile_blocks(model)
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    prepare_data_files(cfg, ctx)
    # every rank is a data-parallel rank (EP ranks hold different data): data rank = global rank
    data = build_train_data(cfg, args, rank=ctx.rank, world_size=ctx.world_size, generate=False)
    return TrainComponents(args, model, optimizer, scheduler, data, ctx)


def restart_data_seed(seed: int, step: int) -> int:
    """Data seed of a loader restarted (not resumed) at ``step`` after a layout change: a fixed function of
    (``data.seed``, step), so the restarted order is deterministic and differs from the order at step 0."""
    return (int(seed) * 1_000_003 + int(step) * 7_919) % (2**31 - 1)


def rebuild_data(cfg: RootConfig, c: TrainComponents, data_seed: int) -> None:
    """Replace ``c.data`` by this rank's loader built with ``data.seed = data_seed``."""
    from rynnscale.data.pipeline import build_train_data

    cfg_d = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=data_seed))
    c.data = build_train_data(cfg_d, c.args, rank=c.ctx.rank, world_size=c.ctx.world_size, generate=False)


def layout_dict(cfg: RootConfig, ctx: DistContext) -> dict[str, int]:
    """The resolved parallel layout recorded in checkpoints (resume is exact only under the same one)."""
    if ctx.meshes is None:
        return {"dp_replicate": 1, "dp_shard": 1, "ep": 1}
    lay = ctx.meshes.layout
    return {"dp_replicate": lay.dp_replicate, "dp_shard": lay.dp_shard, "ep": lay.ep}


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the lines of ``metrics.jsonl`` with ``step <= step`` (and drop a torn last line); atomic
    rewrite. Returns how many lines were dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_bytes(path, "".join(x + "\n" for x in keep))
    return dropped


# ----------------------------------------------------------------------------------------- the loop
def run_training(cfg: RootConfig, hooks: Sequence[Any] = ()) -> Path:
    """Run a whole training job (this rank's part of it under torchrun); returns the output directory.

    ``hooks``: objects with ``on_step_end(step: int, ctx: DistContext)``, called on every rank after each
    step's metrics and checkpoint (for tests: fault injection)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = setup_distributed(cfg)
    with report_failures(ctx.rank, ctx.world_size):
        return _train(cfg, ctx, hooks)


def _resume(cfg: RootConfig, c: TrainComponents, manager, output_dir: Path) -> int:
    """Load the checkpoint ``checkpoint.resume`` selects (if any) into ``c``; returns the data seed in use."""
    from rynnscale.checkpoint.dcp import find_resume_checkpoint

    data_seed = cfg.data.seed
    path = find_resume_checkpoint(output_dir, cfg.checkpoint.resume)
    if path is None:
        return data_seed
    rs = manager.load(path, c.model, c.optimizer, c.scheduler, layout=layout_dict(cfg, c.ctx))
    c.state.step, c.state.tokens_seen = rs.step, rs.tokens_seen
    if rs.exact:
        saved_seed = int(rs.per_rank.get("data_seed", cfg.data.seed))
        if saved_seed != cfg.data.seed:  # this layout had restarted its data order with another seed
            rebuild_data(cfg, c, saved_seed)
        data_seed = saved_seed
        c.data.load_state_dict(rs.per_rank["loader"])
        log.info("resumed exactly from %s at step %d", path, rs.step)
    else:
        data_seed = restart_data_seed(cfg.data.seed, rs.step)
        rebuild_data(cfg, c, data_seed)
        if c.ctx.is_main:
            log.warning("resumed from %s at step %d under another world size / layout: the data order restarts "
                        "deterministically (data seed %d = restart_data_seed(data.seed=%d, step=%d), nothing "
                        "skipped); it is not the order the original run would have seen", path, rs.step,
                        data_seed, cfg.data.seed, rs.step)
        seed_everything(data_seed)
    return data_seed


def _export_hf(cfg: RootConfig, ckpt: Path, output_dir: Path) -> Path:
    """Export checkpoint ``ckpt`` to ``output_dir/hf`` with the run's tokenizer files (rank 0 only)."""
    from rynnscale.checkpoint.export import export_checkpoint_hf
    from rynnscale.data.tokenizer import default_tokenizer_dir

    copy_from = cfg.model.init_from or cfg.data.tokenizer or default_tokenizer_dir()
    report = export_checkpoint_hf(ckpt, output_dir / "hf", copy_from=copy_from, overwrite=True)
    log.info("exported %s to %s (%d tensors, %.1f MB, tokenizer from %s)", ckpt.name, report.out_dir,
             report.num_tensors, report.total_bytes / 1e6, copy_from)
    return Path(report.out_dir)


def _train(cfg: RootConfig, ctx: DistContext, hooks: Sequence[Any] = ()) -> Path:
    if not ctx.is_main:
        log.setLevel(logging.WARNING)
    output_dir = Path(cfg.run.output_dir)
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, output_dir / "config.yaml")
    seed_everything(cfg.run.seed)
    c = build_components(cfg, ctx)
    from rynnscale.checkpoint.dcp import CheckpointManager, install_preemption_handler, preemption_requested
    from rynnscale.checkpoint.ep_layout import ExpertCheckpointLayout
    from rynnscale.config import to_yaml

    ck = cfg.checkpoint
    manager = CheckpointManager(output_dir, keep_last=ck.keep_last, async_save=ck.async_save,
                                state_adapter=ExpertCheckpointLayout.for_model(c.model, ctx.meshes))
    data_seed = _resume(cfg, c, manager, output_dir)
    model, data, state = c.model, c.data, c.state
    if ctx.is_main:
        dropped = truncate_metrics(output_dir / "metrics.jsonl", state.step)
        if dropped:
            log.info("metrics.jsonl: dropped %d line(s) of steps after the start step %d", dropped, state.step)
    ctx.barrier()
    import yaml
    run_config = yaml.safe_load(to_yaml(cfg))
    layout = layout_dict(cfg, ctx)

    def save() -> Path:
        return manager.save(state.step, model, c.optimizer, c.scheduler, tokens_seen=state.tokens_seen,
                            config=run_config, layout=layout, model_config=c.args.to_hf_config(),
                            per_rank_state={"loader": data.state_dict(), "data_seed": data_seed})

    n_params = sum(p.numel() for p in model.parameters())  # this rank's shards when distributed
    log.info("model: %s, %.2fM parameters on rank 0, device %s, world size %d",
             "MoE" if c.args.text.is_moe else "dense", n_params / 1e6, ctx.device, ctx.world_size)
    evaluator = None
    if cfg.eval.every_steps > 0:
        from rynnscale.train.evaluate import Evaluator
        evaluator = Evaluator.from_run(cfg, c.args, ctx)
    batches = iter(data)
    metrics = MetricsLogger(cfg, output_dir, is_main=ctx.is_main, start_step=state.step)
    preempt = install_preemption_handler()
    preempted = False
    nonfinite_run = nonfinite_total = 0   # non-finite steps in a row / in this process
    try:
        while state.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]
            t_data = time.perf_counter() - t0
            lr = c.scheduler.get_last_lr()[0]
            stats = train_step(model, c.optimizer, micro, device=ctx.device, dtype_name=cfg.train.dtype,
                               loss_chunk_tokens=cfg.train.loss_chunk_tokens, max_grad_norm=cfg.train.max_grad_norm,
                               ctx=ctx)
            c.scheduler.step()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            t_data_mean = ctx.sum([t_data])[0] / ctx.world_size  # mean over ranks
            state.step += 1
            state.tokens_seen += stats.tokens
            nonfinite_run = 0 if stats.finite else nonfinite_run + 1
            nonfinite_total += 0 if stats.finite else 1
            record = {
                "step": state.step, "loss": stats.loss, "aux_loss": stats.aux_loss, "lr": lr,
                "grad_norm": stats.grad_norm, "tokens": stats.tokens, "target_tokens": stats.target_tokens,
                "samples": stats.samples, "tokens_seen": state.tokens_seen, "tokens_per_s": stats.tokens / dt,
                "step_time_s": dt, "data_wait_share": t_data_mean / dt, "world_size": ctx.world_size,
                "nonfinite_steps": nonfinite_total,
            }
            if stats.expert_counts is not None:
                worst, per_layer = expert_load_max_over_mean(stats.expert_counts)
                record["expert_load_max_over_mean"] = worst
                record["expert_load_per_layer"] = per_layer
            else:
                record["expert_load_max_over_mean"] = None
            bad = getattr(data, "bad_counts", None)
            if bad:
                record["skipped_samples"] = dict(bad)
            if evaluator is not None and (state.step % cfg.eval.every_steps == 0
                                          or state.step == cfg.train.max_steps):
                record.update(evaluator.evaluate(model, ctx))
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
                metrics.log(record)
            preempted = preemption_requested(preempt)
            if not stats.finite:
                log.warning("step %d: non-finite loss %s / grad norm %s: optimiser step skipped (%d in a row, limit "
                            "train.max_nonfinite_steps=%d); no checkpoint is saved from this step", state.step,
                            stats.loss, stats.grad_norm, nonfinite_run, cfg.train.max_nonfinite_steps)
                if nonfinite_run >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"step {state.step}: loss or gradient norm non-finite for {nonfinite_run} steps in a row "
                        f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}; last loss {stats.loss}, grad norm "
                        f"{stats.grad_norm}); stopping without saving. Lower optim.lr or check the data; resume from "
                        "the last checkpoint")
            elif preempted or state.step == cfg.train.max_steps or (ck.every_steps and state.step % ck.every_steps == 0):
                save()
            for hook in hooks:
                hook.on_step_end(state.step, ctx)
            if preempted:
                log.warning("preempted (signal %s): saved step %d, exiting", preempt.signum, state.step)
                break
        manager.wait()
    finally:
        preempt.uninstall()
        metrics.close()
        bad = getattr(data, "bad_counts", None)
        if bad:
            log.warning("rank %d skipped samples by reason: %s", ctx.rank, dict(bad))
    if ck.export_hf and not preempted and state.step > 0:
        from rynnscale.checkpoint.dcp import CHECKPOINTS_DIR, checkpoint_name
        ctx.barrier()
        if ctx.is_main and not (output_dir / CHECKPOINTS_DIR / checkpoint_name(state.step)).is_dir():
            log.warning("no checkpoint of the last step %d (it was non-finite): nothing exported", state.step)
        elif ctx.is_main:
            from rynnscale.checkpoint.model_card import summarize_run, write_model_card
            hf_dir = _export_hf(cfg, output_dir / CHECKPOINTS_DIR / checkpoint_name(state.step), output_dir)
            write_model_card(hf_dir, cfg, summarize_run(output_dir))
        ctx.barrier()
    if cfg.logging.plot and ctx.is_main:
        path = plot_run(output_dir)
        log.info("plot: %s", path)
    log.info("done: %d steps, %d tokens; metrics in %s", state.step, state.tokens_seen, output_dir / "metrics.jsonl")
    return output_dir
