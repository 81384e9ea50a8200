"""The training loop, readable top to bottom: build -> for each step: fetch micro-batches, forward/backward,
clip, step, log -> plot.

Loss of a step = sum of token cross-entropies over all assistant tokens of the step's micro-batches divided
by their count (so gradient accumulation and, later, data parallelism give the same loss as one big batch),
plus the MoE load-balancing loss averaged over micro-batches.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rynnscale.config import RootConfig, save_resolved
from rynnscale.data.batch import PackedBatch
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


@dataclass
class StepStats:
    loss: float
    aux_loss: float
    grad_norm: float
    tokens: int
    target_tokens: int
    samples: int
    expert_counts: torch.Tensor | None


def train_step(model, optimizer, micro_batches: list[PackedBatch], *, device: torch.device, dtype_name: str,
               loss_chunk_tokens: int, max_grad_norm: float) -> StepStats:
    """One optimiser step over ``micro_batches`` (gradient accumulation)."""
    n_targets = sum(b.num_target_tokens for b in micro_batches)
    denom = max(n_targets, 1)
    loss_total = 0.0
    aux_total = 0.0
    counts = None
    for batch in micro_batches:
        batch = batch.to(device)
        with autocast_context(dtype_name, device):
            out = model(batch)
            loss_sum = model.loss_sum(batch, out, loss_chunk_tokens)
        aux = out.aux_loss / len(micro_batches)
        (loss_sum / denom + aux).backward()
        loss_total += loss_sum.detach().item()
        aux_total += float(aux.detach())
        if out.expert_counts is not None:
            c = out.expert_counts.detach().to("cpu", torch.long)
            counts = c if counts is None else counts + c
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(
        loss=loss_total / denom, aux_loss=aux_total, grad_norm=float(grad_norm),
        tokens=sum(b.num_tokens for b in micro_batches), target_tokens=n_targets,
        samples=sum(b.num_samples for b in micro_batches), expert_counts=counts)


def run_training(cfg: RootConfig) -> Path:
    """Run a whole training job in this process; returns the output directory."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rynnscale.data.pipeline import build_train_data  # data + model imports are heavy: keep CLI fast
    from rynnscale.models.build import build_model
    from rynnscale.parallel.checkpointing import apply_activation_checkpointing

    output_dir = Path(cfg.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, output_dir / "config.yaml")
    device = resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed)

    args, model = build_model(cfg.model, device, seed=cfg.run.seed)
    apply_activation_checkpointing(model, cfg.model.activation_checkpointing,
                                   every=cfg.model.activation_checkpointing_every)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2fM parameters, device %s", "MoE" if args.text.is_moe else "dense", n_params / 1e6, device)

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    data = build_train_data(cfg, args, rank=0, world_size=1)
    batches = iter(data)

    metrics = MetricsLogger(cfg, output_dir, is_main=True)
    tokens_seen = 0
    try:
        for step in range(cfg.train.max_steps):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]
            t_data = time.perf_counter() - t0
            lr = scheduler.get_last_lr()[0]
            stats = train_step(model, optimizer, micro, device=device, dtype_name=cfg.train.dtype,
                               loss_chunk_tokens=cfg.train.loss_chunk_tokens, max_grad_norm=cfg.train.max_grad_norm)
            scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            tokens_seen += stats.tokens
            record = {
                "step": step + 1, "loss": stats.loss, "aux_loss": stats.aux_loss, "lr": lr,
                "grad_norm": stats.grad_norm, "tokens": stats.tokens, "target_tokens": stats.target_tokens,
                "samples": stats.samples, "tokens_seen": tokens_seen, "tokens_per_s": stats.tokens / dt,
                "step_time_s": dt, "data_wait_share": t_data / dt,
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
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.max_steps:
                metrics.log(record)
    finally:
        metrics.close()
        bad = getattr(data, "bad_counts", None)
        if bad:
            log.warning("skipped samples by reason: %s", dict(bad))
    if cfg.logging.plot:
        path = plot_run(output_dir)
        log.info("plot: %s", path)
    log.info("done: %d steps, %d tokens; metrics in %s", cfg.train.max_steps, tokens_seen, output_dir / "metrics.jsonl")
    return output_dir
