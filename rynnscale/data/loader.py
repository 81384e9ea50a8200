"""A rank's data loaders (the whole design: docs/data_loader.md).

- ``TrainLoader`` (training): ONE global, layout-free sample order (``rynnscale.data.global_order``); iterating
  yields one ``DataStep`` per optimiser step: this rank's micro-batches plus the step's facts (every rank's
  sample ids and costs, bad-sample counts, the resumable state). The state loads on any world size, worker
  count and accumulation and continues the data exactly.
- ``SplitLoader`` (evaluation, reading converted shards once): this rank's split of the shards, one
  ``PackedBatch`` at a time; its state resumes on the same layout only.

Both run their pipelines (``rynnscale.data.worker``) in ``num_workers`` DataLoader processes (or in process),
read mixtures, keep epochs whole, skip and count bad samples (``bad_counts``, ``bad_distinct``) and stop with
``BadDataError`` when too large a fraction was bad. Configuration: ``rynnscale.data.loader_config``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import re
import signal
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rynnscale.batch import DataStep, PackedBatch
from rynnscale.config.schema import ConfigError
from rynnscale.data.encode import SampleError
from rynnscale.data.global_order import GLOBAL_STATE_VERSION, GlobalPipeline
from rynnscale.data.loader_config import (
    BALANCE_MODES,
    BadDataError,
    CostEstimator,
    DataStallError,
    DataWorkerError,
    LoaderConfig,
    LoaderStateError,
    MixtureSource,
)
from rynnscale.data.manifest import ManifestHints, size_settings
from rynnscale.data.reader import (
    ReaderStateError,
    ShardIntegrityError,
    ShardPatternError,
    expand_shard_patterns,
    iter_tar_samples,
)
from rynnscale.data.vision_preprocess import tune_malloc_for_pixel_buffers
from rynnscale.data.worker import (
    MAX_DISTINCT_BAD,
    Source,
    SplitPipeline,
    WorkerPipeline,
    bad_message,
    bad_reasons,
    relative_names,
    remember_bad,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1             # the per-rank state of SplitLoader

__all__ = ["BALANCE_MODES", "BadDataError", "BudgetFit", "DataStallError", "DataWorkerError", "LoaderConfig",
           "LoaderStateError", "MixtureSource", "SplitLoader", "TrainLoader", "data_worker_error"]

_MALLOC_TUNED = False


def _tune_malloc_once() -> None:
    """Process-wide glibc tuning for big pixel buffers (a forked worker inherits it with the flag)."""
    global _MALLOC_TUNED
    if not _MALLOC_TUNED:
        _MALLOC_TUNED = True
        if not tune_malloc_for_pixel_buffers():
            log.info("data: glibc mallopt is unavailable; pixel buffers use the default allocator")


@dataclass(frozen=True)
class BudgetFit:
    """What the manifests' per-sample cost hints say about the micro-batch budget, before reading any data."""

    budget: int
    hinted: int                 # samples with a ``num_tokens`` hint
    fitting: int                # ... of them within the budget
    largest: int                # tokens of the longest hinted sample
    too_long_share: float       # expected share of the samples read that are too long (mixture weights applied)
    unhinted_shards: int        # shards without hints (not counted)
    probe: tuple[str, int] | None = None   # (shard, ordinal) of the shortest sample too long by its hint


class DataRanks(Protocol):
    """What the training loader needs from the data-parallel world (``DistContext`` has it): sums and
    gathers over the sample streams, every stream counted once."""

    def sum_data(self, values: Iterable[float]) -> list[float]: ...

    def gather_data(self, obj: Any) -> list[Any]: ...


def counts_over_ranks(ranks: DataRanks, bad: dict[str, int], keys: Sequence = ()) -> tuple[dict[str, int], list]:
    """Counts by reason (and the names behind them) that each data-parallel rank found on its own (bad samples
    decoding its packs, failed rewards of its rollouts), summed over the ranks: one scalar all-reduce; the
    reasons and names travel only when some rank found one."""
    if ranks.sum_data([float(sum(bad.values()))])[0] == 0:
        return {}, []
    merged: Counter[str] = Counter()
    names: list = []
    for b, k in ranks.gather_data((bad, list(keys))):
        merged.update(b)
        names += k
    return dict(merged), names


_BLOCKS_SIGNALS = hasattr(signal, "pthread_sigmask") and hasattr(signal, "SIGCHLD")
# torch's messages for a dead worker: from the SIGCHLD handler (raised in the main thread wherever it runs) or
# from the DataLoader's own check while it waits for a batch
_WORKER_DIED = re.compile(r"DataLoader worker \(pid.*?\) (is killed by signal|exited unexpectedly)")


@contextlib.contextmanager
def _sigchld_held() -> Iterator[None]:
    """SIGCHLD held back (where the platform can) while a dead data worker is dealt with."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD}) if _BLOCKS_SIGNALS else None
    try:
        yield
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def data_worker_error(e: BaseException, rank: int, num_workers: int, dead: str | None = None
                      ) -> DataWorkerError | None:
    """A ``DataWorkerError`` saying what to do for an error due to a data worker that died (None for any other
    error): torch's own (raised from its SIGCHLD handler wherever the main thread is, in the middle of a training
    step too), or any error while ``dead`` (``_Loader._dead_worker``) says one died (e.g. the connection that
    passes a batch's shared tensors reset by the dead worker)."""
    if isinstance(e, DataWorkerError):
        return e
    if isinstance(e, RuntimeError) and _WORKER_DIED.search(str(e)):
        dead = str(e).strip()
    if dead is None:
        return None
    return DataWorkerError(
        f"rank {rank}: one of its {num_workers} data workers died ({dead}); 'Killed' is most often the kernel's "
        "out-of-memory killer: lower data.num_workers, data.shuffle_buffer_bytes or train.micro_batch_tokens, or "
        "give the job more memory (the kernel log, dmesg, names OOM kills); the run stops so that a restart resumes "
        "from the last checkpoint")


def _expand_sources(cfg: LoaderConfig) -> list[Source]:
    """Expand every source's patterns; a shard file may belong to one source only."""
    if not cfg.mixture:
        return [Source("train", 1.0, expand_shard_patterns(cfg.train_shards))]
    out, owner = [], {}
    for m in cfg.mixture:
        try:
            shards = expand_shard_patterns(m.shards)
        except ShardPatternError as e:
            raise ShardPatternError(f"mixture source {m.name!r}: {e}") from None
        for p in shards:
            real = os.path.realpath(p)   # the same file through a symlink is the same shard
            if real in owner:
                raise ShardPatternError(f"shard {p!r} is in mixture sources {owner[real]!r} and {m.name!r}; a shard "
                                        "may belong to one source only (weights would be wrong otherwise)")
            owner[real] = m.name
        out.append(Source(m.name, float(m.weight), shards))
    return out


def _identity(x):
    return x


@contextlib.contextmanager
def _sigterm_held() -> Iterator[None]:
    """SIGTERM blocked in this thread while data workers are forked: they, and every thread started in them before
    their ``worker_init_fn`` (a library's fork hook), inherit the mask, so the signal reaches only the thread that
    ``_sigterm_from_trainer_only`` starts. A SIGTERM for the trainer meanwhile waits, and is handled, after."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}) if hasattr(signal, "sigwaitinfo") else None
    try:
        yield
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sigterm_from_trainer_only(worker_id: int) -> None:
    """A data worker's ``worker_init_fn``: a SIGTERM from anyone but the trainer process is left to the trainer.
    SLURM's time-limit / preemption signal goes to every process of the job step, the workers too; one dying of it
    made torch's SIGCHLD handler fail the step the trainer was finishing to save its checkpoint. SIGTERM is blocked
    (from the fork, ``_sigterm_held``; here again for other start methods) and a thread takes it: from the trainer
    (its DataLoader stopping a hung worker) or once the trainer is gone, the worker exits at once as torch's own
    handler does; from anyone else it is dropped (the worker ends with the loader, or SLURM's SIGKILL). Where the
    platform lacks ``sigwaitinfo``, torch's handler stays."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    trainer = getattr(get_worker_info().dataset, "trainer_pid", os.getppid())   # (the parent, unless forkserver)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def take_sigterm() -> None:
        while True:
            sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
            if sender == trainer or not _process_exists(trainer):
                os._exit(0)

    threading.Thread(target=take_sigterm, name="rynnscale-sigterm", daemon=True).start()


class _RankDataset(IterableDataset):
    """What each DataLoader worker runs: the pipeline of its (rotated) logical worker id."""

    def __init__(self, loader: _Loader, states: list[dict | None], rotation: int):
        self.pipeline: type[WorkerPipeline] = loader.pipeline
        self.cfg, self.encoder, self.estimator = loader.cfg, loader.encoder, loader.cost_estimator
        self.sources, self.rank, self.world_size = loader.sources, loader.rank, loader.world_size
        self.states, self.rotation = states, rotation
        self.trainer_pid = os.getpid()   # whose SIGTERM a worker obeys (``_sigterm_from_trainer_only``)

    def __iter__(self):
        info = get_worker_info()
        W = max(1, self.cfg.num_workers)
        w = ((info.id if info is not None else 0) + self.rotation) % W
        if self.cfg.tune_malloc:
            _tune_malloc_once()
        state = self.states[0] if len(self.states) == 1 else self.states[w]
        try:
            pipe = self.pipeline(self.cfg, self.encoder, self.estimator, self.sources, self.rank, self.world_size,
                                 w, self.cfg.num_workers, state)
            for item, state in pipe:
                yield item, w, state
        except _PASSED_ON as e:
            if info is None:
                raise
            yield _WorkerFailure(e), w, None   # the main process raises it (``_Loader._read``)


# errors whose message says it all (too much bad data, a shard that changed, a state or setting that does not fit):
# a worker passes them to the main process as they are; torch would re-raise them with the worker's whole traceback
# in the message, which the trainer then printed as its "one-line" error
_PASSED_ON = (BadDataError, ShardIntegrityError, ReaderStateError, ConfigError)


@dataclass(frozen=True)
class _WorkerFailure:
    """A ``_PASSED_ON`` error of a data worker, sent to the main process as an item."""

    error: Exception


class _Loader:
    """What both loaders share: configuration, sources, the DataLoader over the workers, counters."""

    pipeline: type[WorkerPipeline]

    def __init__(self, cfg: LoaderConfig, encoder: Any, rank: int = 0, world_size: int = 1, *,
                 cost_estimator: CostEstimator | None = None):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.cfg, self.encoder, self.cost_estimator = cfg, encoder, cost_estimator
        self.rank, self.world_size = rank, world_size
        self.sources = _expand_sources(cfg)
        self.shards = [p for s in self.sources for p in s.shards]
        self._generation = 0
        # the DataLoader iterator read last (weakly: a closed iteration's workers must not outlive it)
        self._workers_ref: Callable[[], Any] = lambda: None

    def _dataloader(self, states: list[dict | None], rotation: int = 0) -> DataLoader:
        kw: dict[str, Any] = {}
        if self.cfg.num_workers > 0:
            kw = dict(prefetch_factor=self.cfg.prefetch_factor, multiprocessing_context=self.cfg.multiprocessing_context,
                      timeout=self.cfg.worker_timeout_s, worker_init_fn=_sigterm_from_trainer_only)
        # its own generator: by default each iterator draws its worker base seed from torch's global generator,
        # so a resumed run (a new iterator after the RNG restore) would draw once more than the straight run and
        # shift every later dropout mask; the data path seeds itself explicitly and needs none of the global state
        return DataLoader(_RankDataset(self, states, rotation), batch_size=None, num_workers=self.cfg.num_workers,
                          collate_fn=_identity, generator=torch.Generator(), **kw)

    def __iter__(self) -> Iterator[Any]:
        """The loader's items (``_iterate``). An error due to a data worker that died is a DataWorkerError: torch's
        own, raised from its SIGCHLD handler wherever this process was (waiting for a batch, or between two), or any
        other while a worker is found dead (e.g. a reset connection that was passing a batch's shared tensors)."""
        try:
            yield from self._iterate()
        except Exception as e:
            if self._workers_ref() is None or isinstance(e, _PASSED_ON):
                raise
            with _sigchld_held():
                died = data_worker_error(e, self.rank, self.cfg.num_workers, self._dead_worker())
                if died is not None:
                    self.stop_workers()
            if died is None:
                raise
            raise died from None

    def stop_workers(self) -> None:
        """Shut the data workers down now (after a worker died: torch's SIGCHLD handler raises again at every exit of
        a child process while a dead worker is registered with it; shutting down unregisters them)."""
        it, self._workers_ref = self._workers_ref(), lambda: None
        with _sigchld_held():
            try:
                getattr(it, "_shutdown_workers", lambda: None)()
            except RuntimeError as e:   # the handler, for a SIGCHLD that came before it was held back
                if not _WORKER_DIED.search(str(e)):
                    raise

    def _iterate(self) -> Iterator[Any]:
        raise NotImplementedError

    def _dead_worker(self) -> str | None:
        """How a data worker of the DataLoader read last ended, if one died (killed by a signal, or a non-zero exit).
        Asked after an error (a dying worker resets its connections before it can be reaped): waits up to 1 s."""
        workers = getattr(self._workers_ref(), "_workers", None) or ()
        deadline = time.monotonic() + 1.0
        for w in workers:
            try:
                w.join(timeout=max(0.0, deadline - time.monotonic()))
            except RuntimeError as e:   # torch's SIGCHLD handler: it says which
                if _WORKER_DIED.search(str(e)):
                    return str(e).strip()
                raise
        for w in workers:
            code = w.exitcode
            if code:
                try:
                    how = f"is killed by signal: {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                except ValueError:
                    how = f"is killed by signal {-code}"
                return f"DataLoader worker (pid {w.pid}) {how}"
        return None

    def _read(self, states: list[dict | None], rotation: int = 0) -> Iterator[Any]:
        """The DataLoader's items; a worker silent for ``worker_timeout_s`` is a DataStallError saying so (torch's
        own message names neither the worker's data nor the setting), a worker that died a DataWorkerError."""
        with _sigterm_held():   # the workers start with it blocked in every thread (``_sigterm_from_trainer_only``)
            it = iter(self._dataloader(states, rotation))
        self._workers_ref = weakref.ref(it)
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if "DataLoader timed out" not in str(e):
                    raise
                raise DataStallError(
                    f"rank {self.rank}: no batch from its {self.cfg.num_workers} data workers in "
                    f"{self.cfg.worker_timeout_s:g} s (data.worker_timeout_s): a decode hung or the file system "
                    f"holding the shards ({', '.join(sorted({str(Path(p).parent) for p in self.shards})[:3])}) "
                    "stalled; the run stops so that a restart resumes from the last checkpoint (raise "
                    "data.worker_timeout_s if one batch really takes longer; 0 waits forever)") from None
            if isinstance(item[0], _WorkerFailure):
                raise item[0].error
            yield item

    def _states(self) -> list[dict]:
        """The worker states the counters read (the global order: the one shared state)."""
        raise NotImplementedError

    def _check_bad(self, whole: bool = False) -> None:
        seen, bad = self.samples_seen, self.bad_counts
        total = sum(bad.values())
        if (seen >= self.cfg.min_samples_for_bad_check or whole) and total > self.cfg.max_bad_fraction * seen:
            raise BadDataError(bad_message(total, seen, bad, self.cfg.max_bad_fraction, self._counted_by,
                                           self.bad_distinct, self.cfg.micro_batch_tokens))

    @property
    def _counted_by(self) -> str:
        return f"rank {self.rank}"

    @property
    def samples_seen(self) -> int:
        return sum(st["seen"] for st in self._states())

    @property
    def bad_counts(self) -> dict[str, int]:
        """Skipped samples by reason (this rank, all workers), as of the last batch or step consumed."""
        c: Counter[str] = Counter()
        for st in self._states():
            c.update(st["bad"])
        return dict(c)

    @property
    def bad_distinct(self) -> dict[str, int]:
        """Distinct samples behind ``bad_counts`` by reason (a sample skipped in every epoch counts once; a
        count of ``MAX_DISTINCT_BAD`` is a lower bound)."""
        return {k: min(len(v), MAX_DISTINCT_BAD) for k, v in self._bad_keys().items()}

    def _bad_keys(self) -> dict[str, set]:
        keys: dict[str, set] = {}
        for st in self._states():
            for k, v in st.get("bad_keys", {}).items():
                keys.setdefault(k, set()).update(map(tuple, v))
        return keys

    def bad_summary(self) -> str:
        """``too_long=200 (7 distinct), ...``: skipped samples by reason, for logs."""
        return bad_reasons(self.bad_counts, self.bad_distinct)

    def _source_stats(self) -> dict[str, dict]:
        """Per mixture source: samples seen by this rank (bad ones included), their share, and the
        epochs completed by every reader of this rank (a worker without a batch yet counts 0)."""
        seen = [0] * len(self.sources)
        epochs: list[int | None] = [None] * len(self.sources)
        for st in self._states():
            for k in range(len(self.sources)):
                n = st["source_seen"][k] if st is not None else 0
                e = st["stream"]["sources"][k]["epoch"] if st is not None else 0
                seen[k] += n
                epochs[k] = e if epochs[k] is None else min(epochs[k], e)
        total = sum(seen)
        return {s.name: {"samples_seen": seen[k], "share": seen[k] / total if total else 0.0,
                         "weight": s.weight / sum(x.weight for x in self.sources), "epochs": int(epochs[k] or 0)}
                for k, s in enumerate(self.sources)}

    def _fingerprint(self, absolute: bool = False) -> dict:
        # shard paths relative to their common directory: a moved run / data directory still resumes
        # (``absolute``: the hash of absolute paths that states saved before had)
        names = hashlib.sha256("\n".join(self.shards if absolute else relative_names(self.shards)).encode()
                               ).hexdigest()[:16]
        c = self.cfg
        fp = {"world_size": self.world_size, "rank": self.rank, "num_workers": max(1, c.num_workers),
              "balance_group": 1, "seed": c.seed,
              "micro_batch_tokens": c.micro_batch_tokens, "pack_window": c.pack_window,
              "micro_batches_per_step": c.micro_batches_per_step, "shuffle_buffer": c.shuffle_buffer,
              "shuffle_shards": c.shuffle_shards, "num_shards": len(self.shards), "shards_sha": names}
        if c.shuffle_buffer_bytes != 1 << 30:  # the default is absent, so states saved before the bound still load
            fp["shuffle_buffer_bytes"] = c.shuffle_buffer_bytes
        if c.mixture:  # absent for train_shards, so states saved before mixtures existed still load
            fp["mixture"] = [[s.name, s.weight, len(s.shards)] for s in self.sources]
        if not absolute:
            fp["shard_paths"] = "relative"
        return fp


# what a global-order state may be continued with another value of: the layout, and the packing
_MAY_CHANGE = ("world_size", "rank", "num_workers", "balance_group", "micro_batches_per_step", "micro_batch_tokens",
               "pack_window")

# the recipe keys behind the settings a global-order state must have been saved with
_SHARDS = "data.train_shards / data.mixture / data.synthetic"
_RECIPE_KEY = {"seed": "data.seed", "shuffle_buffer": "data.shuffle_buffer", "shuffle_buffer_bytes":
               "data.shuffle_buffer_bytes", "num_shards": _SHARDS, "shards_sha": _SHARDS,
               "mixture": "data.mixture: names, weights, number of shards"}


class TrainLoader(_Loader):
    """The training loader of one data-parallel rank: iterating yields ``DataStep``s of the global order
    (endless unless ``num_epochs``; iterating again continues from the last step consumed). ``encoder``:
    ``encode(key, members) -> EncodedSample`` raising ``SampleError`` for bad samples
    (``rynnscale.data.encode.SampleEncoder``; picklable when workers are spawned); ``cost_estimator(key, members)
    -> (tokens, patches)``: an optional cheap size for samples without manifest hints. ``rank`` /
    ``world_size`` are the DATA-parallel ones (the ranks of a context-parallel group pass the same).

    ``ranks``: the data-parallel world (``DataRanks``, e.g. the trainer's ``DistContext``). With it, the samples
    found bad while decoding (each rank decodes only its own packs) are counted over all ranks, so the counts,
    the ``max_bad_fraction`` check and the saved state are the run's, the same on every rank and at any world
    size; every rank must then iterate in step (as training does). Without it they are this rank's."""

    pipeline = GlobalPipeline

    def __init__(self, cfg: LoaderConfig, encoder: Any, rank: int = 0, world_size: int = 1, *,
                 cost_estimator: CostEstimator | None = None, ranks: DataRanks | None = None):
        super().__init__(cfg, encoder, rank, world_size, cost_estimator=cost_estimator)
        self.ranks = ranks
        self._global: dict | None = None   # the layout-free state after the last step consumed
        self._bad_decoding: Counter[str] = Counter()   # bad samples found decoding packs (every rank's: ``ranks``)
        self._bad_decoding_keys: dict[str, set[tuple[int, int]]] = {}   # ... the distinct ones
        self._batches = self._samples_packed = 0   # this rank's, since this loader was built
        self._media_bytes_read = 0   # deferred media this rank read (its own samples', plus any measured)
        self._overflow = self._fillers = 0   # this rank's packs over budget after decoding / filler micro-batches

    def budget_fit(self) -> BudgetFit:
        """How many samples fit ``micro_batch_tokens`` by the shards' ``num_tokens`` hints (manifests only; hints
        made with other encoder settings count as none: ``ManifestHints``)."""
        hints, budget = ManifestHints(size_settings(self.encoder)), self.cfg.micro_batch_tokens
        hinted = fitting = largest = unhinted = 0
        share = weight = 0.0
        probe: tuple[int, str, int] | None = None
        for src in self.sources:
            n = fit = 0
            for shard in src.shards:
                toks = hints.tokens(shard)
                if toks is None:
                    unhinted += 1
                    continue
                n, fit = n + len(toks), fit + sum(t <= budget for t in toks)
                largest = max([largest, *toks])
                for i, t in enumerate(toks):
                    if t > budget and (probe is None or t < probe[0]):
                        probe = (t, shard, i)
            hinted, fitting = hinted + n, fitting + fit
            if n:
                share, weight = share + src.weight * (n - fit) / n, weight + src.weight
        return BudgetFit(budget, hinted, fitting, largest, share / weight if weight else 0.0, unhinted,
                         probe[1:] if probe else None)

    def sample_fits(self, shard: str, index: int) -> bool | None:
        """Whether sample ``index`` of ``shard`` fits ``micro_batch_tokens`` as this loader sizes it (cost
        estimator, the encoder's ``estimate``, else encoding): None when it cannot be read or is bad for
        another reason. Checks a manifest hint against the encoder the run uses (hints may come from other
        settings)."""
        s = next(iter_tar_samples(shard, replace(self.cfg.limits, defer_media=False), wanted={index}), None)
        if s is None or s.is_bad:
            return None
        try:
            if self.cost_estimator is not None:
                tokens = self.cost_estimator(s.key, s.members)[0]
            elif callable(getattr(self.encoder, "estimate", None)):
                tokens = self.encoder.estimate(s.key, s.members)[0]
            else:
                tokens = self.encoder.encode(s.key, s.members).num_tokens
        except SampleError as e:
            return False if e.reason == "too_long" else None
        return int(tokens) <= self.cfg.micro_batch_tokens

    def _iterate(self) -> Iterator[DataStep]:
        """Workers yield whole steps in step order (worker w: steps base + w, base + w + W, ...)."""
        self._generation += 1
        gen = self._generation
        for (batches, info), _w, state in self._read([self._global]):
            if gen != self._generation:
                return   # a newer iterator (or a load_state_dict) took over
            self._global = state
            bad, bad_keys = info["bad"], info["bad_keys"]
            if self.ranks is not None:
                bad, bad_keys = counts_over_ranks(self.ranks, bad, bad_keys)
            self._bad_decoding.update(bad)
            for reason, shard, ordinal in bad_keys:
                remember_bad(self._bad_decoding_keys, reason, (shard, ordinal))
            self._media_bytes_read += info["media_bytes_read"]
            self._overflow += info["overflow"]
            self._fillers += info["fillers"]
            self._check_bad(whole=min(state.get("epochs_in", [0])) >= 1 or state.get("stream_ended", False))
            self._batches += len(batches)
            self._samples_packed += sum(b.num_samples for b in batches if not b.filler)
            # the worker built ``state`` for this step alone: the step carries it without a copy
            yield DataStep(index=info["step"], micro_batches=batches, packs=info["packs"], samples=info["samples"],
                           rank_costs=info["rank_costs"], bad=self.bad_counts, bad_distinct=self.bad_distinct,
                           state=self._state_dict(copy_state=False))

    def _states(self) -> list[dict]:
        return [self._global] if self._global else []

    @property
    def _counted_by(self) -> str:
        return f"all {self.world_size} ranks" if self.ranks is not None else f"rank {self.rank}"

    @property
    def bad_counts(self) -> dict[str, int]:
        """Skipped samples by reason: the stream's (the same on every rank) and those found decoding packs (the
        run's with ``ranks``, else this rank's), as of the last step consumed."""
        c = Counter(super().bad_counts)
        c.update(self._bad_decoding)
        return dict(c)

    def _bad_keys(self) -> dict[str, set]:
        keys = super()._bad_keys()
        for k, v in self._bad_decoding_keys.items():
            keys.setdefault(k, set()).update(v)
        return keys

    @property
    def samples_seen(self) -> int:
        """The whole global stream read so far (every rank reads all of it)."""
        return super().samples_seen

    def stats(self) -> dict:
        """Counters: samples seen / packed, bad by reason, batches, packing efficiency, this rank's media reads,
        overflowing packs and filler micro-batches (since this loader was built)."""
        sts = self._states()
        bins = sum(st["packer"]["emitted_bins"] for st in sts)
        toks = sum(st["packer"]["emitted_tokens"] for st in sts)
        out = {"samples_seen": self.samples_seen, "samples_packed": self._samples_packed, "bad": self.bad_counts,
               "batches": self._batches,
               "packing_efficiency": toks / (bins * self.cfg.micro_batch_tokens) if bins else 0.0,
               "shuffle_early_emits": sum(st.get("shuffle_early_emits", 0) for st in sts),
               "estimate_overflow": self._overflow, "filler_batches": self._fillers,
               "media_bytes_read": self._media_bytes_read}
        if self.cfg.mixture:
            out["sources"] = self._source_stats()
        return out

    def _global_fingerprint(self) -> dict:
        """What a state must have been saved with to continue; the layout and the packing settings may change
        (another micro-batch count or ``micro_batch_tokens`` re-packs the samples drawn but not trained)."""
        c = self.cfg
        fp = {k: v for k, v in self._fingerprint().items() if k not in _MAY_CHANGE}
        return fp | {"order": "global", "num_epochs": c.num_epochs}

    def state_dict(self) -> dict:
        """The position in the global stream and the samples drawn but not trained yet, as of the last step
        consumed: plain JSON-able data, the same on every rank and free of the layout (loadable at any world
        size, worker count, grad_accum)."""
        return self._state_dict(copy_state=True)

    def _state_dict(self, copy_state: bool) -> dict:
        return {"version": GLOBAL_STATE_VERSION, "config": self._global_fingerprint(),
                "state": copy.deepcopy(self._global) if copy_state else self._global,
                "bad_decoding": dict(self._bad_decoding),
                "bad_decoding_keys": {k: sorted([a, b] for a, b in v) for k, v in self._bad_decoding_keys.items()}}

    def load_state_dict(self, sd: dict) -> None:
        """Continue after the step ``sd`` was saved at (LoaderStateError naming the first setting that differs)."""
        if sd.get("version") != GLOBAL_STATE_VERSION:
            raise LoaderStateError(
                f"loader state version {sd.get('version')!r} was saved by the per-rank split loader (before the "
                "global sample order); it cannot be continued in the global order")
        mine = self._global_fingerprint()
        for k in list(mine) + [k for k in sd["config"] if k not in mine and k not in _MAY_CHANGE]:
            if sd["config"].get(k) != mine.get(k):
                if k == "shards_sha":
                    what = "another shard list (the same number of shards, other names or another order)"
                else:
                    what = f"{k}={sd['config'].get(k)!r}, this loader has {mine.get(k)!r}"
                err = LoaderStateError(f"loader state was saved with {what} (recipe: {_RECIPE_KEY.get(k, k)}); the "
                                       "global sample order cannot be continued")
                err.recipe_key = _RECIPE_KEY.get(k, k)   # a setting the user can set back
                raise err
        self._global = copy.deepcopy(sd["state"])
        if self._global is not None and "budget" not in self._global:   # saved before the state recorded it
            self._global["budget"] = sd["config"].get("micro_batch_tokens", self.cfg.micro_batch_tokens)
        self._bad_decoding = Counter({k: int(v) for k, v in sd.get("bad_decoding", {}).items()})
        self._bad_decoding_keys = {str(k): {(int(a), int(b)) for a, b in v}
                                   for k, v in sd.get("bad_decoding_keys", {}).items()}
        self._generation += 1


class SplitLoader(_Loader):
    """Per-rank splits: reader split (rank, worker) of ``world_size x num_workers`` reads its share of the shards
    (disjoint, every shard once per epoch; a shard set with fewer shards than readers is split by sample, with a
    warning); iterating yields ``PackedBatch``es, the workers' taken round-robin. What evaluation reads (one
    epoch, no shuffling); its ``state_dict`` resumes on the same world size, workers and settings only.
    ``shards_name``: what the messages call ``cfg.train_shards`` (evaluation: its held-out set)."""

    pipeline = SplitPipeline

    def __init__(self, cfg: LoaderConfig, encoder: Any, rank: int = 0, world_size: int = 1, *,
                 cost_estimator: CostEstimator | None = None, shards_name: str = "train_shards"):
        super().__init__(cfg, encoder, rank, world_size, cost_estimator=cost_estimator)
        readers = world_size * max(1, cfg.num_workers)
        for s in self.sources:
            if len(s.shards) < readers and rank == 0:
                log.warning("%s has %d shards for %d readers (%d ranks x %d workers): splitting it at the sample "
                            "level, so every reader walks all of its tars; write more, smaller shards to avoid that",
                            f"mixture source {s.name!r}" if cfg.mixture else shards_name, len(s.shards), readers,
                            world_size, max(1, cfg.num_workers))
        self._worker_states: list[dict | None] = [None] * max(1, cfg.num_workers)
        self._next_worker = 0

    def _iterate(self) -> Iterator[PackedBatch]:
        self._generation += 1
        gen = self._generation
        W = max(1, self.cfg.num_workers)
        for batch, w, state in self._read(list(self._worker_states), self._next_worker):
            if gen != self._generation:
                return  # a newer iterator (or a load_state_dict) took over
            self._worker_states[w] = state
            self._next_worker = (w + 1) % W
            self._check_bad()
            if batch is not None:   # None: a reader's end, carrying its final counts
                yield batch

    def _states(self) -> list[dict]:
        return [st for st in self._worker_states if st is not None]

    def stats(self) -> dict:
        """Counters for metrics: samples seen / packed, bad by reason, batches, packing efficiency."""
        sts = self._states()
        bins = sum(st["packer"]["emitted_bins"] for st in sts)
        toks = sum(st["packer"]["emitted_tokens"] for st in sts)
        out = {"samples_seen": self.samples_seen, "samples_packed": sum(st["samples_out"] for st in sts),
               "bad": self.bad_counts, "batches": sum(st["batches"] for st in sts),
               "packing_efficiency": toks / (bins * self.cfg.micro_batch_tokens) if bins else 0.0,
               "shuffle_early_emits": sum(st.get("shuffle_early_emits", 0) for st in sts),
               "estimate_overflow": sum(st["estimate_overflow"] for st in sts)}
        if self.cfg.mixture:
            out["sources"] = self._source_stats()
        return out

    def state_dict(self) -> dict:
        """Position of this rank's data (as of the last batch consumed): plain JSON-able data."""
        return {"version": STATE_VERSION, "config": self._fingerprint(), "next_worker": self._next_worker,
                "workers": copy.deepcopy(self._worker_states)}

    def load_state_dict(self, sd: dict) -> None:
        """Continue from ``sd``. Raises LoaderStateError naming the first field that differs
        (another world size, worker count, seed, budget or shard list cannot replay exactly)."""
        if sd.get("version") == GLOBAL_STATE_VERSION:
            raise LoaderStateError("loader state is a global-order (layout-free) state of the training loader; this "
                                   "loader reads per-rank splits")
        if sd.get("version") != STATE_VERSION:
            raise LoaderStateError(f"loader state version {sd.get('version')!r} is not supported (expected {STATE_VERSION})")
        mine = self._fingerprint(absolute=sd["config"].get("shard_paths") != "relative")   # old states: absolute
        for k in list(mine) + [k for k in sd["config"] if k not in mine]:
            v = mine.get(k)
            if sd["config"].get(k) != v:
                raise LoaderStateError(f"loader state was saved with {k}={sd['config'].get(k)!r} but this loader has "
                                       f"{k}={v!r}; the data order cannot be replayed exactly")
        self._worker_states = copy.deepcopy(sd["workers"])
        self._next_worker = int(sd["next_worker"])
        self._generation += 1
