"""Configuration of the training and evaluation loaders, and their errors (``rynnscale.data.loader``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rynnscale.config.schema import MixtureSourceConfig, check_mixture_sources
from rynnscale.data.balance import CostModel
from rynnscale.data.reader import ReaderLimits, ReaderStateError

#: one weighted shard set of a mixture (the recipe's ``data.mixture[i]`` class: name, shards, weight)
MixtureSource = MixtureSourceConfig
BALANCE_MODES = ("cost", "tokens", "none")
#: ``(key, members) -> (tokens, vision patches)``: a cheap size estimate where manifests have no hints
CostEstimator = Callable[[str, dict], tuple[int, int]]


class BadDataError(RuntimeError):
    """Too large a fraction of the samples was bad."""


class DataStallError(RuntimeError):
    """No batch came from a data worker within ``worker_timeout_s`` (a hung decode, a stalled file system)."""


class DataWorkerError(RuntimeError):
    """A data worker process died (killed by a signal, most often the kernel's out-of-memory killer, or exited)."""


class LoaderStateError(ReaderStateError):
    """A loader state that does not fit this loader (other config, world size, shards...)."""


@dataclass
class LoaderConfig:
    """Everything a loader needs (``TrainLoader``: the global order; ``SplitLoader``: per-rank splits);
    ``from_run_config`` maps the run config onto it. Give exactly one of ``train_shards`` and ``mixture``."""

    train_shards: list[str] = field(default_factory=list)  # paths, globs, brace patterns
    mixture: list[MixtureSourceConfig] = field(default_factory=list)  # weighted sources, instead of train_shards
    seed: int = 0
    micro_batch_tokens: int = 4096        # token budget of one packed micro-batch
    pack_window: int = 64                 # look-ahead samples per rank for FFD packing
    shuffle_buffer: int = 256             # samples; 0 = no sample-level shuffle
    shuffle_buffer_bytes: int = 1 << 30   # payload bytes in the shuffle buffer; over it samples leave early (0 = no bound)
    shuffle_shards: bool = True
    num_workers: int = 0                  # dataloader worker processes per rank
    prefetch_factor: int = 2              # batches queued per worker
    multiprocessing_context: str | None = None  # None = torch's default (fork on Linux)
    worker_timeout_s: float = 1800.0      # with workers: longest wait for one batch before DataStallError (0 = forever)
    max_bad_fraction: float = 0.05
    min_samples_for_bad_check: int = 200
    micro_batches_per_step: int = 1       # micro-batches per rank per optimizer step (grad_accum)
    num_epochs: int | None = None         # None = endless
    balance: str = "cost"                 # global order: packs to ranks by cost | tokens | none (in order)
    tune_malloc: bool = True              # tune_malloc_for_pixel_buffers() once per loader process / worker
    defer_media: bool = True              # global order: read media by position, only for this rank's samples
    cost_model: CostModel = field(default_factory=CostModel)
    limits: ReaderLimits = field(default_factory=ReaderLimits)

    @classmethod
    def from_run_config(cls, cfg: Any, **overrides: Any) -> LoaderConfig:
        """From a RootConfig-like object (``cfg.data.*`` including ``data.mixture``,
        ``cfg.train.micro_batch_tokens``, ``cfg.train.grad_accum``)."""
        d, t = cfg.data, cfg.train
        mixture = [MixtureSourceConfig(str(m.name), [str(x) for x in m.shards], float(m.weight))
                   for m in getattr(d, "mixture", None) or []]
        kw = dict(train_shards=list(d.train_shards), mixture=mixture, seed=d.seed,
                  micro_batch_tokens=t.micro_batch_tokens,
                  pack_window=d.pack_window, shuffle_buffer=d.shuffle_buffer, num_workers=d.num_workers,
                  max_bad_fraction=d.max_bad_fraction, micro_batches_per_step=t.grad_accum,
                  balance=str(getattr(d, "balance", "cost")),
                  tune_malloc=bool(getattr(d, "tune_malloc", True)),
                  defer_media=bool(getattr(d, "defer_media", True)),
                  shuffle_buffer_bytes=int(getattr(d, "shuffle_buffer_bytes", 1 << 30)),
                  worker_timeout_s=float(getattr(d, "worker_timeout_s", 1800.0)),
                  limits=ReaderLimits(max_member_bytes=int(getattr(d, "max_member_bytes", 1 << 30)),
                                      max_sample_bytes=int(getattr(d, "max_sample_bytes", 2 << 30)),
                                      verify_sha256=bool(getattr(d, "verify_shards", False))))
        kw.update(overrides)
        return cls(**kw)

    def validate(self) -> None:
        def need(ok: bool, key: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"LoaderConfig.{key}={getattr(self, key)!r} is invalid: {rule}")
        if self.mixture and self.train_shards:
            raise ValueError(
                f"LoaderConfig: both train_shards={self.train_shards!r} and a mixture "
                f"({', '.join(repr(getattr(m, 'name', m)) for m in self.mixture)}) are set; give one of them "
                "(plain shards, e.g. data.train_shards or the data.synthetic set, go into a mixture source of their own)")
        if not self.mixture:
            need(bool(self.train_shards), "train_shards",
                 "give at least one shard path, glob or brace pattern (or a mixture)")
        for i, m in enumerate(self.mixture):
            if not isinstance(m, MixtureSourceConfig):
                raise ValueError(f"LoaderConfig.mixture[{i}]={m!r} is invalid: must be a MixtureSource(name, shards, weight)")
        check_mixture_sources(self.mixture, "LoaderConfig.mixture")
        for k in ("micro_batch_tokens", "pack_window", "prefetch_factor", "micro_batches_per_step"):
            need(isinstance(getattr(self, k), int) and getattr(self, k) >= 1, k, "must be an int >= 1")
        for k in ("shuffle_buffer", "shuffle_buffer_bytes", "num_workers", "min_samples_for_bad_check"):
            need(isinstance(getattr(self, k), int) and getattr(self, k) >= 0, k, "must be an int >= 0")
        need(0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction", "must be in [0, 1]")
        need(math.isfinite(self.worker_timeout_s) and self.worker_timeout_s >= 0, "worker_timeout_s",
             "must be a finite number of seconds >= 0 (0 = wait forever)")
        need(self.balance in BALANCE_MODES, "balance", f"must be one of {list(BALANCE_MODES)}")
        need(self.num_epochs is None or self.num_epochs >= 1, "num_epochs", "must be None (endless) or >= 1")
