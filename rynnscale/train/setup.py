"""Run setup: the device and process group, the model (``rynnscale.train.build``), optimiser and schedule,
this rank's data loader, and the bookkeeping a resume needs (layout, data seed after a layout change,
the metrics file's tail)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rynnscale.checkpoint.dcp import CheckpointError, config_changes
from rynnscale.checkpoint.export import base_fingerprint
from rynnscale.config import ConfigError, RootConfig
from rynnscale.data.pipeline import build_train_data
from rynnscale.fsutil import DirectoryLockedError, atomic_write_bytes, directory_lock
from rynnscale.parallel.distributed import DistContext, init_distributed
from rynnscale.parallel.layout import ParallelLayout
from rynnscale.train.build import ResolvedRun, build, resolve_run
from rynnscale.train.data_files import prepare_data_files
from rynnscale.train.optim import build_optimizer, build_scheduler

RunDirLockedError = DirectoryLockedError   # another run holds ``run.output_dir``'s lock
LOCK_NAME = ".lock"


def run_dir_lock(output_dir: Path, enabled: bool = True):
    """``directory_lock`` on ``run.output_dir`` for a run: two runs writing one directory would interleave
    metrics.jsonl lines, prune each other's checkpoints and move ``latest`` under each other. ``enabled=False``
    (ranks other than 0) does nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return directory_lock(output_dir, "run.output_dir", "run", "wait for it to end, stop it, or give this run "
                          "another run.output_dir=...", name=LOCK_NAME)


_held_run_dirs: set[Path] = set()   # the run directories this process holds (``hold_run_dir``)


@contextlib.contextmanager
def hold_run_dir(output_dir: Path, ctx: DistContext):
    """``run_dir_lock`` for a run of ``ctx``'s ranks, called on every rank: rank 0 takes the lock and tells the
    others, so when another run holds the directory every rank fails at once with the same one-line
    ``RunDirLockedError`` (not the other ranks with a lost connection to rank 0). A directory this process holds
    already (the run inside ``run_training``'s hold) is not taken again."""
    key = Path(output_dir).resolve()
    if key in _held_run_dirs:
        yield
        return
    with contextlib.ExitStack() as stack:
        refused = None
        if ctx.is_main:
            try:
                stack.enter_context(run_dir_lock(output_dir))
            except RunDirLockedError as e:
                refused = str(e)
        if ctx.distributed:
            import torch.distributed as dist

            box = [refused]
            dist.broadcast_object_list(box, src=0)
            refused = box[0]
        if refused is not None:
            raise RunDirLockedError(refused if ctx.is_main else f"rank 0 was refused: {refused}")
        _held_run_dirs.add(key)
        try:
            yield
        finally:
            _held_run_dirs.discard(key)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'run.device' = 'cuda' but no CUDA device is available; use run.device=auto "
                          "or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """What a checkpoint must restore besides model / optimiser / scheduler / data loader state."""

    step: int = 0
    tokens_seen: int = 0
    nonfinite_steps: int = 0     # skipped (inf/NaN) steps of the run so far: metrics.jsonl's count goes on after a resume

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(sd["step"]), int(sd["tokens_seen"])


@dataclass
class TrainComponents:
    args: Any                    # the model family's args (rynnscale.models.spec.ModelArgs)
    model: torch.nn.Module       # FSDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: Any                    # this rank's TrainLoader (yields DataSteps)
    ctx: DistContext
    state: TrainState = field(default_factory=TrainState)
    base: dict[str, Any] | None = None  # LoRA: content fingerprint of the frozen base (model.init_from)
    run: ResolvedRun | None = None       # the recipe resolved once (architecture, layout, compute dtype)
    rolled_back: bool = False            # resumed from the checkpoint checkpoint.resume=PATH names (a new branch)


def setup_distributed(cfg: RootConfig) -> DistContext:
    """Process group (torchrun env) + device; meshes are built later, once the model is known."""
    rank, local_rank, world_size, device = init_distributed(resolve_device(cfg.run.device), cfg.parallel.timeout_s)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def build_components(cfg: RootConfig, ctx: DistContext) -> TrainComponents:
    """Model (EP + activation checkpointing + FSDP2 when distributed), optimiser, schedule, this rank's data."""

    run = resolve_run(cfg, ctx)   # the architecture, layout and compute dtype, resolved once for the run
    model = build(run, ctx)
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    prepare_data_files(cfg, ctx)
    if cfg.train.objective == "grpo":   # the data are rollouts of the model being trained
        from rynnscale.train.grpo import build_rollout_source

        data = build_rollout_source(cfg, run, ctx, model)
    else:
        # every CP group is one data-parallel rank (EP ranks hold different data; the cp ranks of a CP group
        # the same micro-batches): data rank = global rank // cp
        data = build_train_data(cfg, run.args, rank=ctx.data_rank, world_size=ctx.data_world_size, ranks=ctx)
    return TrainComponents(run.args, model, optimizer, scheduler, data, ctx, run=run)


def shared_base_fingerprint(cfg: RootConfig, ctx: DistContext) -> dict[str, Any] | None:
    """``base_fingerprint`` of a LoRA run's ``model.init_from``, computed on rank 0 and given to all ranks;
    for LoRA on a random base the seed that draws it (``init_weights(run.seed)``); None for full fine-tunes."""
    if cfg.model.lora.rank <= 0:
        return None
    if cfg.model.init_from is None:
        return {"init_from": None, "random_init_seed": int(cfg.run.seed)}
    fp = [base_fingerprint(cfg.model.init_from, Path(cfg.run.output_dir) / "base_fingerprint.json")
          if ctx.is_main else None]
    if ctx.distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(fp, src=0)
    return fp[0]


def check_same_base(saved: dict[str, Any] | None, current: dict[str, Any] | None, path: Path) -> None:
    """A LoRA checkpoint holds adapters only: resuming it on another base would train nonsense."""
    if saved is None or current is None:
        return
    if "random_init_seed" in saved or "random_init_seed" in current:
        if saved.get("random_init_seed") != current.get("random_init_seed"):
            was = (f"a random base drawn with run.seed={saved['random_init_seed']}" if "random_init_seed" in saved
                   else f"the base {saved['init_from']}")
            now = (f"run.seed={current['random_init_seed']} draws another random base" if "random_init_seed" in
                   current else f"model.init_from={current['init_from']} is another base")
            raise CheckpointError(
                f"{path}: this LoRA checkpoint holds adapters only, trained on {was}, but {now}; the adapters only "
                "make sense on their own base. Restore that setting, or start a new run (checkpoint.resume=none).")
        return
    if saved["sha256"] != current["sha256"]:
        raise CheckpointError(
            f"{path}: this LoRA checkpoint was trained on the base {saved['init_from']} (content sha256 "
            f"{saved['sha256'][:16]}...), but model.init_from={current['init_from']} now hashes to "
            f"{current['sha256'][:16]}...; the adapters only make sense on their own base. Point model.init_from "
            "at the original base, or start a new run (checkpoint.resume=none).")


def check_same_adapters(saved: dict[str, Any] | None, current: Any, path: Path) -> None:
    """A run's LoRA structure (rank, alpha, targets, experts, vision, fully trained modules) is part of what its
    checkpoint holds: resuming under another one would drop adapters or rescale them. Only ``dropout`` may change.
    ``saved``: the checkpoint's recorded ``model.lora`` section; ``current``: this run's ``LoRAConfig``."""
    if saved is None:
        return
    now = dataclasses.asdict(current)
    if int(saved.get("rank") or 0) <= 0 and int(now.get("rank") or 0) <= 0:
        return   # no adapters either side: the unused settings do not matter
    # a key the checkpoint's version did not have yet: its default then is today's
    saved = {**dataclasses.asdict(type(current)()), **saved}

    def as_sets(lc: dict[str, Any]) -> dict[str, Any]:   # pattern lists: their order and repeats adapt nothing else
        return {k: sorted(set(v)) if k in ("targets", "trainable") and isinstance(v, list) else v for k, v in lc.items()}

    changes = config_changes(as_sets(saved), as_sets(now), ignore=frozenset({"dropout"}), prefix="model.lora.")
    if changes:
        raise CheckpointError(
            f"{path}: the checkpoint was trained with another LoRA structure (checkpoint -> now): {'; '.join(changes)}. "
            "Resume with the recorded model.lora.* values, or start a new run (another run.output_dir, or "
            "checkpoint.resume=none).")


def restart_data_seed(seed: int, step: int) -> int:
    """Data seed of a loader restarted (not resumed) at ``step`` after a layout change: a fixed function of
    (``data.seed``, step), so the restarted order is deterministic and differs from the order at step 0."""
    return (int(seed) * 1_000_003 + int(step) * 7_919) % (2**31 - 1)


def rebuild_data(cfg: RootConfig, c: TrainComponents, data_seed: int) -> None:
    """Replace ``c.data`` by this rank's loader built with ``data.seed = data_seed`` (GRPO: its prompt order
    reseeded, the rollout source and its reference kept)."""
    if cfg.train.objective == "grpo":
        c.data.stage.prompts.reseed(data_seed)
        return
    cfg_d = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=data_seed))
    c.data = build_train_data(cfg_d, c.args, rank=c.ctx.data_rank, world_size=c.ctx.data_world_size, ranks=c.ctx)


def layout_dict(cfg: RootConfig, ctx: DistContext) -> dict[str, int]:
    """The resolved parallel layout recorded in checkpoints (resume is exact only under the same one)."""
    return (ParallelLayout.single() if ctx.meshes is None else ctx.meshes.layout).as_dict()


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
