"""Run observability: metrics.jsonl, console progress with ETA, wandb (offline by default), end-of-run plot."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rynnscale.config.schema import ConfigError, RootConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
#: under the run directory: the id of the wandb run this directory logs to, so that a restart resumes it
WANDB_RUN_ID_FILE = "wandb/rynnscale_run_id"


def expert_load_max_over_mean(counts_le) -> tuple[float, list[float]]:
    """Worst (over MoE layers) ratio of the busiest expert's tokens to the mean; plus the per-layer ratios."""
    per_layer = []
    for row in counts_le.double():
        mean = row.mean().item()
        per_layer.append(row.max().item() / mean if mean > 0 else float("nan"))
    worst = max((r for r in per_layer if not math.isnan(r)), default=float("nan"))
    return worst, per_layer


def max_over_mean(values) -> float | None:
    """max / mean of per-rank values (rank cost, rank step time); None without values or a zero mean."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else None


#: dense bf16 tensor-core rate (TFLOP/s, the vendor's spec) by device-name fragment, for MFU when
#: ``logging.peak_tflops`` is 0; first match wins (H100 / H800 PCIe and NVL before the generic SXM names)
KNOWN_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H800 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
                     ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("H20", 148.0), ("GH200", 989.0), ("B200", 2250.0),
                     ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10G", 70.0))


def peak_tflops(device: Any, configured: float = 0.0) -> float | None:
    """Per-device peak used for MFU: ``configured`` (> 0), else the known rate of this CUDA device's name,
    else None (CPU, or an unknown card, logged once by name: MFU is then null)."""
    if configured > 0:
        return float(configured)
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    rate = next((rate for frag, rate in KNOWN_PEAK_TFLOPS if frag in name), None)
    if rate is None and name not in _UNKNOWN_CARDS_LOGGED:
        _UNKNOWN_CARDS_LOGGED.add(name)
        log.warning("mfu is null in metrics.jsonl: no known peak rate for the GPU %r; set logging.peak_tflops to its "
                    "dense bf16 TFLOP/s per device (e.g. logging.peak_tflops=989 for an H100 SXM)", name)
    return rate


_UNKNOWN_CARDS_LOGGED: set[str] = set()   # device names peak_tflops has warned about (once each per process)


class StepFlopsMeter:
    """Model FLOPs of a step (forward + backward of the family's ``step_flops``: decoder, lm_head on every
    token, causal attention over the packed documents, the vision tower; frozen weights without their gradients,
    ``rynnscale.models.stats.backward_skips``; recomputation not counted) from the
    micro-batches a rank trained, for ``model_tflops_per_s`` and ``mfu`` in metrics.jsonl."""

    def __init__(self, args: Any, stats: Any, peak: float | None):
        self.args, self.stats, self.peak = args, stats, peak

    def local(self, micro_batches: list, cp_rank: int = 0) -> float:
        """This rank's share of the step's model FLOPs (a context-parallel group's rows count once)."""
        from rynnscale.models.stats import batch_flops

        if cp_rank:
            return 0.0
        return sum(batch_flops(self.args, self.stats, b).total for b in micro_batches if not b.filler)

    def record(self, step_flops: float, seconds: float, world_size: int) -> dict[str, float | None]:
        tflops = step_flops / seconds / 1e12 if seconds > 0 else 0.0
        return {"model_tflops_per_s": tflops,
                "mfu": tflops / (self.peak * world_size) if self.peak else None}


class SampleLog:
    """``logging.sample_log``: ``samples.jsonl``, one line ``{"step": k, "samples": ["<shard>:<key>", ...]}``
    per step for the whole global batch (sorted). Only rank 0 writes; the trainer truncates the lines of
    steps after the resumed step first (``truncate_metrics``), so every step appears once."""

    def __init__(self, output_dir: Path, *, enabled: bool):
        self.path = output_dir / SAMPLES_FILE if enabled else None

    def log(self, step: int, samples: list[str]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "samples": sorted(samples)}) + "\n")


def progress_bars(cfg: RootConfig) -> bool:
    """Whether a run draws tqdm bars (training, synthetic data generation): ``logging.progress`` and stderr is a
    terminal. Redirected to a file, bars would fill it with carriage-return redraws."""
    return cfg.logging.progress and sys.stderr is not None and sys.stderr.isatty()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class MetricsLogger:
    """Writes one JSON line per step, drives the progress display and wandb. Only rank 0 writes.

    Progress (``logging.progress``): a tqdm bar when stderr is a terminal; otherwise (a log file, a batch
    job's output) one plain line every ``logging.progress_every`` steps and at the last, so redirected logs
    hold readable lines instead of carriage-return bar redraws.

    wandb: a run resumed from a checkpoint (``start_step`` > 0) continues the wandb run the directory logged to
    before (its id is kept in ``WANDB_RUN_ID_FILE``); a fresh start, or ``resume_wandb=False`` (a rollback to an
    earlier checkpoint: wandb drops steps at or below ones it already has), starts a new one."""

    def __init__(self, cfg: RootConfig, output_dir: Path, *, is_main: bool, start_step: int = 0,
                 resume_wandb: bool | None = None):
        self.is_main = is_main
        self.path = output_dir / METRICS_FILE
        self._bar = None
        self._wandb = None
        self._lines = False
        self._every, self._total = cfg.logging.progress_every, cfg.train.max_steps
        self._start = self._last_line = start_step
        self._t0 = time.perf_counter()
        if not is_main:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if progress_bars(cfg):
            from tqdm.auto import tqdm
            self._bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, smoothing=0.1)
        else:
            self._lines = cfg.logging.progress
        if cfg.logging.wandb.mode != "disabled":
            self._wandb = _init_wandb(cfg, output_dir, start_step > 0 if resume_wandb is None else resume_wandb)

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")
        step = record["step"]
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                  tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        elif self._lines and (step - self._last_line >= self._every or step >= self._total):
            self._last_line = step
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / max(step - self._start, 1) * max(self._total - step, 0)
            log.info("step %d/%d (%d%%) loss %.4f lr %.2e tok/s %.0f elapsed %s eta %s", step, self._total,
                     100 * step // max(self._total, 1), record["loss"], record["lr"], record["tokens_per_s"],
                     _clock(elapsed), _clock(eta))
        if self._wandb is not None:
            self._call_wandb("log", lambda run: run.log(wandb_values(record), step=record["step"]))

    def close(self, failed: bool = False) -> None:
        """``failed``: the run ends with an error, and wandb marks its run failed (not finished)."""
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._call_wandb("finish", lambda run: run.finish(exit_code=1 if failed else 0))
            self._wandb = None

    def _call_wandb(self, what: str, call: Callable[[Any], Any]) -> None:
        """A wandb call; wandb failing stops wandb for the rest of the run, never the run (its service process dies
        of the SIGTERM SLURM sends every process of the job step, before the trainer's preemption save)."""
        try:
            call(self._wandb)
        except Exception as e:  # noqa: BLE001 - any wandb failure: metrics.jsonl keeps every step
            self._wandb = None
            with contextlib.suppress(Exception):   # now, quietly: its exit hook would print the error again
                import wandb
                wandb.teardown()
            log.warning("wandb failed in %s (%s: %s): wandb is off for the rest of this run; %s keeps every step",
                        what, type(e).__name__, e, self.path)


def wandb_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record for wandb: top-level numbers, and the numbers of a mapping as ``key/name``
    (``skipped_by_reason/bad_json``: the bad-sample counts by reason, which were left out); lists (the per-layer
    expert load) and nulls are left out."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, dict):
            out.update({f"{k}/{name}": x for name, x in v.items() if isinstance(x, (int, float))})
    return out


def _init_wandb(cfg: RootConfig, output_dir: Path, resume: bool = False):
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; logging to %s only", output_dir / METRICS_FILE)
        return None
    wcfg = cfg.logging.wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    import yaml

    from rynnscale.config import to_yaml
    id_file = output_dir / WANDB_RUN_ID_FILE
    run_id = None
    if resume and "WANDB_RUN_ID" not in os.environ:   # (an id the user set wins)
        try:
            run_id = id_file.read_text().strip() or None
        except OSError:   # none yet (the first run logged without wandb) or unreadable: a new run
            pass
    try:
        run = wandb.init(
            project=wcfg.project or "rynnscale", entity=wcfg.entity, mode=wcfg.mode,
            name=cfg.run.name or output_dir.name, dir=str(output_dir), config=yaml.safe_load(to_yaml(cfg)),
            settings=wandb.Settings(console="off"), **({"id": run_id, "resume": "allow"} if run_id else {}))
    except wandb.errors.UsageError as e:   # no API key for online mode, a bad entity: a setting, not a crash
        raise ConfigError(f"logging.wandb.mode={wcfg.mode}: wandb refused to start: {e} (log in with `wandb login` "
                          "or WANDB_API_KEY, or set logging.wandb.mode=offline and upload later with `wandb sync`)"
                          ) from None
    try:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run.id + "\n")
    except OSError as e:
        log.warning("could not record the wandb run id in %s (%s): a restart will start a new wandb run", id_file, e)
    log.info("wandb (%s): %s run %s in %s", wcfg.mode, "resumed" if run_id else "new", run.id, output_dir / "wandb")
    return run


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float (a skipped step's NaN loss, an idle layer's expert load) as None:
    metrics.jsonl is strict JSON (null), which has no NaN / Infinity for other readers (jq, JavaScript) to parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The records of ``output_dir/metrics.jsonl``; a torn last line (a run killed while writing it) is left out,
    any other line that is not JSON is an error naming the file and the line."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                log.warning("%s: the last line is incomplete (a run killed while writing it); left out", path)
                continue
            raise ValueError(f"{path} line {i} is not JSON: {e}") from None
    return records


def plot_run(output_dir: Path, out_name: str = "training.png") -> Path | None:
    """PNG with loss (aux loss, held-out ``eval_loss``), learning rate and tokens/s against the step; a GRPO run (lines with
    ``reward_mean``) gets a fourth panel: the mean reward with its components, and the KL to the reference."""
    records = read_metrics(output_dir)
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> list[float]:   # null (a non-finite value) -> a gap in the line
        return [math.nan if r.get(key) is None else r[key] for r in records]

    steps = [r["step"] for r in records]
    rl = [r for r in records if r.get("reward_mean") is not None]
    fig, axes = plt.subplots(1, 4 if rl else 3, figsize=(20 if rl else 15, 4))
    loss = series("loss")
    axes[0].plot(steps, loss, label="loss")
    if any(r.get("aux_loss") for r in records):
        axes[0].plot(steps, series("aux_loss"), label="aux (load balance)")
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if evals:   # the held-out loss at the steps that evaluated
        axes[0].plot(*zip(*evals), marker="o", label="eval_loss")
    if all(x > 0 for x in loss if not math.isnan(x)):   # a policy-gradient loss can be negative
        axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("loss (mean over assistant tokens)" if not rl else "loss")
    axes[1].plot(steps, series("lr"))
    axes[1].set_title("learning rate")
    axes[2].plot(steps, series("tokens_per_s"))
    axes[2].set_title("tokens / s")
    if rl:
        ax = axes[3]
        rs = [r["step"] for r in rl]
        mean = [r["reward_mean"] for r in rl]
        std = [r.get("reward_std") or 0.0 for r in rl]
        ax.plot(rs, mean, label="reward_mean", linewidth=2)
        ax.fill_between(rs, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)], alpha=0.15)
        for key in sorted({k for r in rl for k in r if k.startswith("reward_") and k not in
                           ("reward_mean", "reward_std", "reward_failures")}):
            vals = [(r["step"], r[key]) for r in rl if r.get(key) is not None]
            if vals:
                ax.plot(*zip(*vals), label=key[len("reward_"):], alpha=0.6, linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_title("reward (mean over answers) and KL")
        kl = [(r["step"], r["kl"]) for r in records if r.get("kl") is not None]
        if kl:
            ax2 = ax.twinx()
            ax2.plot(*zip(*kl), color="black", linestyle=":", label="kl")
            ax2.set_ylabel("kl")
            ax2.legend(loc="lower right", fontsize=7)
        ax.legend(loc="upper left", fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(output_dir) / out_name
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
