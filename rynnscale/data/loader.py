"""TrainLoader: one rank's endless, resumable stream of packed micro-batches.

Pipeline of each dataloader worker (``torch.utils.data.DataLoader`` processes, or the main
process when ``num_workers=0``)::

    shards of this reader split -> tar stream -> shuffle buffer -> encode -> WindowPacker -> PackedBatch

Splits. The shard order of each epoch is a seeded permutation; reader split ``i`` of ``n`` reads
``order[i::n]``, so splits are disjoint and cover every shard once per epoch. Without balancing
(``balance_group=1``, the default) a split is (rank, worker): ``n = world_size * workers``. A shard
set with fewer shards than readers is split at the sample level instead (every reader walks all
shards and keeps every ``n``-th sample; a warning says so, since each reader then walks every tar).

Mixtures. ``mixture=[MixtureSource(name, shards, weight)]`` replaces ``train_shards``: each reader
split interleaves one stream per source (``rynnscale.data.reader.MixtureStream``), drawing source
``k`` with probability ``weight_k / sum(weights)`` per sample from a counter-based hash, before
the shuffle buffer. Every source is split over the readers on its own and cycles through its
epochs independently; ``stats()['sources']`` has per-source samples seen and epochs completed.
With ``num_epochs`` each source is read that many times (a finished source drops out of the
draw). Sample positions index the concatenation of the sources' shard lists (a shard may belong
to one source only). A one-source mixture reads exactly like ``train_shards``.

Global order (``global_order=True``; what training uses, ``rynnscale.data.pipeline``). There is ONE
sample stream: the shard order of epoch e is the seeded permutation above read as a single split
(``split 0 of 1``), then one shuffle buffer (stream 0), so the sample order depends on the data, the
seed and the epoch only. Every (rank, worker) reads that whole stream and runs the same deterministic
plan: FFD packing over a window of ``pack_window x N`` samples into global steps of
``N = world_size x micro_batches_per_step`` packs (``WindowPacker`` with N slots: similar-cost packs
share a step, seeded step order). The step's packs are assigned to ranks only when the step is taken
(``balance``: ``cost`` = LPT with equal counts on ``cost_model``, ``tokens``, ``none`` = in order), so
the samples of step k depend on N, not on how N splits into ranks x accumulation; each rank decodes
only its own packs (other ranks' samples are only sized: manifest hints, ``cost_estimator``, the
encoder's ``estimate``, else encoding, as in balance groups). Worker w of W takes steps base+w,
base+w+W, ... (base = the step at the restore) and yields each as one item, so steps arrive in order and
the worker count does not matter. ``world_size`` / ``rank`` are the DATA-parallel ones (ranks of a
context-parallel group would pass the same data rank). The state is layout-free: stream position,
shuffle buffer, packer items and the planned steps (samples with their sizes), the same on every rank;
it loads at any world size, worker count and accumulation. With the same N the continuation is exact;
with another N the planned steps' samples are re-packed on their own into the first steps, so nothing is
lost or repeated (the last of them may be short). ``last_step_samples`` ("<shard>:<key>" of the whole
global batch, shard names relative to the shards' common directory), ``last_step_rank_costs`` (every
rank's ``cost_model`` estimate, whatever ``balance`` assigned by) and ``last_step_packs`` describe the last
step taken, for ``samples.jsonl`` and the rank-balance metrics. Effective shuffle window: about
``shuffle_buffer`` samples (geometric wait, mean ``shuffle_buffer`` draws) plus the packing window, within
an epoch.

Epochs (both modes). Each source's epochs stay whole, however small the data (the epoch barrier): when
a source's next epoch starts, its samples leave the shuffle buffer for the packing window and the next
plan emits all of them (``WindowPacker.push(must=)``; until then the source's new samples wait,
``held``); a one-source stream, or a source that comes round again first, packs the window out at once
(``WindowPacker.close``), so an epoch's last step may be short (fewer packs than N: filler micro-batches).
So every epoch trains each sample exactly once, counts are equal after every epoch, and an epoch's copies
never share a window (nor a step) with the next epoch's. A plan keeps the samples of the step before it
out of its first step where its packs allow (``WindowPacker.avoid``), so a sample is not trained in two
consecutive steps unless two steps hold about the whole data. The cost: one plan per source epoch made
before the window is full, and with one source one short step per epoch.
Reading: every rank walks the tar headers of every shard and reads the JSON members; media members are
only located (``defer_media``, ``ReaderLimits.defer_media``) and read by position by the rank whose pack
holds the sample. A sample without a usable manifest hint is measured by every rank, which reads its
media for that and drops them again, so the packing window holds no media whatever the world size (the
decoding rank reads them a second time). ``stats()['media_bytes_read']`` counts the reads per rank.
Every rank yields exactly ``micro_batches_per_step`` micro-batches per step (the last, short step of a
finite stream too), so the trainer's steps stay aligned with the loader's (one ``last_step_samples``, one
checkpointed state on every rank) whatever the data does: a pack over the budget after decoding (a low
estimate) passes its last samples to this rank's other micro-batch slots of the step with room, else
skips them (counted, ``estimate_overflow``); a pack that bad samples emptied keeps its slot as a ``filler``
micro-batch (trains nothing, ``stats()['filler_batches']``), so micro-batch composition stays the plan's
on every layout.

Balancing (``balance_group=G > 1``; 0 = all ranks; per-rank split mode only). The G ranks of a group read the SAME stream
(split = (group, worker)), so they see identical windows of samples. Each rank estimates every
sample's size cheaply -- from the per-sample cost hints in ``manifest.json`` (``num_tokens``,
``vision_patches``), else from ``cost_estimator(key, members)``, else by encoding it (exact but
G times the CPU) -- and all of them run the same deterministic plan: FFD packing of the window,
steps of ``G x micro_batches_per_step`` packs assigned to ranks by cost (LPT + swaps). Each rank
then encodes only the samples of its own packs, so every sample is still trained on exactly once,
every rank yields the same number of micro-batches per step, and the step's slowest rank is close
to the mean. Costs: the group reads each shard G times (use G = ranks per node: the page cache
serves the other G-1 reads) and estimating must be cheap. If an estimate was low and a pack
overflows the budget after encoding, it is re-packed (FFD) into as many micro-batches as needed
(counted in ``stats()['estimate_overflow']``); that rank then runs one pack ahead of its group
for the rest of the stream (correct, but per-step pairing of similar packs is lost), as it does
when all samples of a pack turn out bad. Exact hints (converters that measure with the encoder)
avoid both.

Memory and copies. With an encoder that has ``estimate`` / ``prepare`` / ``finish``
(``SampleEncoder``) samples are packed on their exact ``estimate`` (container probe + tokeniser, no
pixel decoding), so the window holds compressed samples only; a pack's samples are decoded when it
is materialised and patchified straight into ONE uint8 pixel buffer per pack (raw pixels; the
model normalises them on its device with the batch's ``pixel_norm``; in shared memory inside a
DataLoader worker, so handing the batch to the main process copies no pixels). Peak pixel memory
per worker is then about one pack (plus the ``prefetch_factor`` batches queued). Each loader process
calls ``tune_malloc_for_pixel_buffers()`` once (``tune_malloc``, default on). Encoders with only
``encode`` are encoded on arrival and concatenated, as before; both paths give identical batches.

Merging and resume. Workers' outputs are taken round-robin (the DataLoader's own order), and every
batch carries its worker's state right after producing it: reader position, shuffle buffer and
packer contents (as sample positions, re-read on restore), packs not yet emitted, counters. The
loader's ``state_dict()`` is the state of the batches *consumed*; ``load_state_dict`` into a fresh
loader (same config, shards, world size) continues with exactly the same batches.

Bad samples (corrupt tar, bad member, encoder ``SampleError``, too long) are skipped and counted by
reason, as occurrences (``bad_counts``) and as distinct samples (``bad_distinct``: a sample skipped in
every epoch counts once); the first few of a reason are logged with shard and key, then a count summary
each time the count doubles (the global order logs stream-level ones on rank 0 worker 0 only: every rank
reads the same stream). ``BadDataError`` stops the run when more than ``max_bad_fraction`` of the samples
were bad, once ``min_samples_for_bad_check`` were read or (global order) every source was read once. Before
training, ``budget_fit`` tells from the manifests' cost hints how many samples fit ``micro_batch_tokens``
(``rynnscale.data.pipeline.check_budget`` turns it into an error or a warning naming the recipe key).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rynnscale.batch import EncodedSample, PackedBatch, filler_batch
from rynnscale.config.schema import check_mixture_sources
from rynnscale.data.balance import CostModel, assign_equal_count
from rynnscale.data.encode import SampleError
from rynnscale.data.packing import PackItem, WindowPacker, build_packed_batch, ffd_bins
from rynnscale.data.reader import (
    DeferredMedia,
    MediaReadError,
    MixtureStream,
    RawSample,
    ReaderLimits,
    ReaderStateError,
    ShardPatternError,
    ShardStream,
    ShuffleBuffer,
    expand_shard_patterns,
    iter_tar_samples,
    mix64,
    read_deferred,
    read_positions,
)
from rynnscale.data.vision_preprocess import tune_malloc_for_pixel_buffers

log = logging.getLogger(__name__)

STATE_VERSION = 1
GLOBAL_STATE_VERSION = 2      # the layout-free state of global-order loaders
BALANCE_MODES = ("cost", "tokens", "none")
_NAMED_BAD = 5            # bad samples named per reason and process; later ones are summarised (DEBUG names them)
_MAX_DISTINCT_BAD = 10_000  # distinct bad samples remembered per reason (a count beyond it is a lower bound)
CostEstimator = Callable[[str, dict], tuple[int, int]]


class BadDataError(RuntimeError):
    """Too large a fraction of the samples was bad."""


class LoaderStateError(ReaderStateError):
    """A loader state that does not fit this loader (other config, world size, shards...)."""


@dataclass
class MixtureSource:
    """One weighted shard set of a mixture (the loader-side twin of ``config.schema.MixtureSourceConfig``)."""

    name: str
    shards: list[str]                     # paths, globs, brace patterns
    weight: float = 1.0                   # relative sampling probability per sample


@dataclass
class LoaderConfig:
    """Everything the loader needs; ``from_run_config`` maps the run config onto it.
    Give exactly one of ``train_shards`` and ``mixture``."""

    train_shards: list[str] = field(default_factory=list)  # paths, globs, brace patterns
    mixture: list[MixtureSource] = field(default_factory=list)  # weighted sources, instead of train_shards
    seed: int = 0
    micro_batch_tokens: int = 4096        # token budget of one packed micro-batch
    pack_window: int = 64                 # look-ahead samples per rank for FFD packing
    shuffle_buffer: int = 256             # samples; 0 = no sample-level shuffle
    shuffle_buffer_bytes: int = 1 << 30   # payload bytes in the shuffle buffer; over it samples leave early (0 = no bound)
    shuffle_shards: bool = True
    num_workers: int = 0                  # dataloader worker processes per rank
    prefetch_factor: int = 2              # batches queued per worker
    multiprocessing_context: str | None = None  # None = torch's default (fork on Linux)
    max_bad_fraction: float = 0.05
    min_samples_for_bad_check: int = 200
    balance_group: int = 1                # ranks planning together; 1 = none, 0 = all ranks
    micro_batches_per_step: int = 1       # micro-batches per rank per optimizer step (grad_accum)
    num_epochs: int | None = None         # None = endless
    global_order: bool = False            # one global sample stream, independent of the layout (see "Global order")
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
        mixture = [MixtureSource(str(m.name), [str(x) for x in m.shards], float(m.weight))
                   for m in getattr(d, "mixture", None) or []]
        kw = dict(train_shards=list(d.train_shards), mixture=mixture, seed=d.seed,
                  micro_batch_tokens=t.micro_batch_tokens,
                  pack_window=d.pack_window, shuffle_buffer=d.shuffle_buffer, num_workers=d.num_workers,
                  max_bad_fraction=d.max_bad_fraction, micro_batches_per_step=t.grad_accum,
                  balance=str(getattr(d, "balance", "cost")),
                  tune_malloc=bool(getattr(d, "tune_malloc", True)),
                  defer_media=bool(getattr(d, "defer_media", True)),
                  shuffle_buffer_bytes=int(getattr(d, "shuffle_buffer_bytes", 1 << 30)),
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
            if not isinstance(m, MixtureSource):
                raise ValueError(f"LoaderConfig.mixture[{i}]={m!r} is invalid: must be a MixtureSource(name, shards, weight)")
        check_mixture_sources(self.mixture, "LoaderConfig.mixture")
        for k in ("micro_batch_tokens", "pack_window", "prefetch_factor", "micro_batches_per_step"):
            need(isinstance(getattr(self, k), int) and getattr(self, k) >= 1, k, "must be an int >= 1")
        for k in ("shuffle_buffer", "shuffle_buffer_bytes", "num_workers", "balance_group", "min_samples_for_bad_check"):
            need(isinstance(getattr(self, k), int) and getattr(self, k) >= 0, k, "must be an int >= 0")
        need(0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction", "must be in [0, 1]")
        need(self.balance in BALANCE_MODES, "balance", f"must be one of {list(BALANCE_MODES)}")
        need(self.num_epochs is None or self.num_epochs >= 1, "num_epochs", "must be None (endless) or >= 1")


# ----------------------------------------------------------------------------- per-worker pipeline


@dataclass(frozen=True)
class _Source:
    """A mixture source with its shard patterns expanded (``train_shards`` is one source named 'train')."""

    name: str
    weight: float
    shards: list[str]


class _Entry:
    """A sample inside the packer or a pending pack: its position, raw members until decoded (media members
    possibly ``deferred``: not read yet), then the prepared (decoded, tokenised) sample or, from encoders
    without ``prepare``, the encoded one."""

    __slots__ = ("pos", "members", "encoded", "prepared", "deferred")

    def __init__(self, pos: tuple[str, int, str], members: dict | None, encoded: EncodedSample | None = None,
                 deferred: DeferredMedia | None = None):
        self.pos, self.members, self.encoded, self.deferred = pos, members, encoded, deferred
        self.prepared: Any = None

    def copy(self) -> _Entry:
        """The same sample, not decoded yet (what a rank takes for its pack)."""
        return _Entry(self.pos, self.members, deferred=self.deferred)

    def drop(self) -> None:
        self.members = self.deferred = None


_MALLOC_TUNED = False


def _tune_malloc_once() -> None:
    """Process-wide glibc tuning for big pixel buffers (a forked worker inherits it with the flag)."""
    global _MALLOC_TUNED
    if not _MALLOC_TUNED:
        _MALLOC_TUNED = True
        if not tune_malloc_for_pixel_buffers():
            log.info("data: glibc mallopt is unavailable; pixel buffers use the default allocator")


def _pixel_buffer(rows: int, cols: int, shared: bool, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """``dtype`` [rows, cols] (raw uint8 pixels by default), uninitialised; in shared memory when ``shared``
    (a DataLoader worker), so sending the batch to the main process passes a file descriptor instead of
    copying the pixels."""
    if not shared:
        return torch.empty(rows, cols, dtype=dtype)
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)  # allocates shm without a copy
    if new_shared is None:
        return torch.empty(rows, cols, dtype=dtype).share_memory_()
    storage = new_shared(rows * cols * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, (rows, cols))


def _relative_names(shards: list[str]) -> list[str]:
    """Shard paths relative to the deepest directory holding all of them (order kept)."""
    if not shards:
        return []
    absolute = [os.path.abspath(p) for p in shards]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return [os.path.relpath(p, root) for p in absolute]


class _ManifestHints:
    """Per-sample (num_tokens, vision_patches) hints from the manifest.json beside each shard."""

    def __init__(self):
        self._dirs: dict[str, dict | None] = {}

    def get(self, shard: str, index: int) -> tuple[int, int] | None:
        from rynnscale.data.manifest import ManifestError, read_manifest

        d = os.path.dirname(shard)
        if d not in self._dirs:
            try:
                self._dirs[d] = read_manifest(d).by_name()
            except (ManifestError, OSError):
                self._dirs[d] = None
        infos = self._dirs[d]
        info = infos.get(os.path.basename(shard)) if infos else None
        if info is None or "num_tokens" not in info.sample_costs or index >= info.num_samples:
            return None
        vp = info.sample_costs.get("vision_patches")
        return int(info.sample_costs["num_tokens"][index]), int(vp[index]) if vp is not None else 0

    def tokens(self, shard: str) -> list[int] | None:
        """Every sample's ``num_tokens`` hint of ``shard`` (None: no hints)."""
        if self.get(shard, 0) is None:
            return None
        return [int(t) for t in self._dirs[os.path.dirname(shard)][os.path.basename(shard)].sample_costs["num_tokens"]]


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


class _WorkerPipeline:
    """One reader split -> shuffled samples -> encode/estimate -> packer -> this rank's batches."""

    def __init__(self, cfg: LoaderConfig, encoder: Any, estimator: CostEstimator | None, sources: list[_Source],
                 rank: int, world_size: int, worker: int, num_workers: int, state: dict | None):
        G = cfg.balance_group or world_size
        W = max(1, num_workers)
        self.cfg, self.encoder, self.estimator = cfg, encoder, estimator
        self.glob = cfg.global_order
        self.worker, self.W, self.rank, self.world = worker, W, rank, world_size
        if self.glob:   # every (rank, worker) reads the one global stream and plans every step
            G = world_size
            self.N = world_size * cfg.micro_batches_per_step   # micro-batches of one global step
        self.G, self.grank = G, rank % G
        if self.glob:
            self.where = f"rank {rank} worker {worker} (global order)"
            self.split, self.num_splits = 0, 1
        else:
            self.where = f"rank {rank} worker {worker} (reader split {(rank // G) * W + worker})"
            self.split, self.num_splits = (rank // G) * W + worker, (world_size // G) * W
        self.mixed = bool(cfg.mixture)
        # global order: media are read by position, by the rank that decodes them (the others only size them)
        self.limits = replace(cfg.limits, defer_media=self.glob and cfg.defer_media)
        self.stream: ShardStream | MixtureStream
        if self.mixed:
            self.stream = MixtureStream([(s.name, s.weight, s.shards) for s in sources], seed=cfg.seed,
                                        split=self.split, num_splits=self.num_splits, shuffle=cfg.shuffle_shards,
                                        epochs=cfg.num_epochs, limits=self.limits)
        else:
            self.stream = ShardStream(sources[0].shards, seed=cfg.seed, split=self.split, num_splits=self.num_splits,
                                      shuffle=cfg.shuffle_shards, epochs=cfg.num_epochs, limits=self.limits,
                                      sample_split=True)
        shards = [p for s in sources for p in s.shards]   # positions index this concatenation
        self.source_of = {p: k for k, s in enumerate(sources) for p in s.shards}
        self.source_seen = [0] * len(sources)   # owned samples per source (mixture stats)
        self.buffer = ShuffleBuffer(cfg.shuffle_buffer, cfg.seed, stream=self.split,
                                    max_bytes=cfg.shuffle_buffer_bytes)
        if self.glob:   # steps of N packs; which rank trains which pack is decided per step (_assign)
            cm = CostModel(1.0, 0.0, 0.0) if cfg.balance == "tokens" else cfg.cost_model
            self.packer = WindowPacker(cfg.micro_batch_tokens, cfg.pack_window * self.N, num_ranks=self.N,
                                       micro_batches_per_step=1, cost_model=cm, seed=mix64(cfg.seed, 0))
        else:
            self.packer = WindowPacker(cfg.micro_batch_tokens, cfg.pack_window * G, num_ranks=G,
                                       micro_batches_per_step=cfg.micro_batches_per_step if G > 1 else 1,
                                       cost_model=cfg.cost_model, seed=mix64(cfg.seed, self.split))
        self.steps: deque[list[list[PackItem]]] = deque()   # global order: planned steps not yet taken
        self.step_no = self.base = 0   # global steps taken from ``steps`` (all workers); at the restore
        self.names = _relative_names(shards)   # "<shard>:<key>" names of the sample log
        self.bad_step: Counter[str] = Counter()  # bad samples found decoding this step's packs (global order)
        self.bad_step_keys: list[list] = []      # ... as [reason, shard #, ordinal]
        self.shards = shards
        self.shard_index = {p: i for i, p in enumerate(shards)}
        self.hints = _ManifestHints()
        self.pending: deque[list[PackItem]] = deque()   # this rank's packs, in emission order
        self.counter = 0          # samples pulled from the shuffled stream (owner of early-bad ones)
        self.seen = 0
        self.bad: Counter[str] = Counter()
        self.bad_keys: dict[str, set[tuple[int, int]]] = {}   # distinct bad samples by reason: (shard #, ordinal)
        # bad samples this process logged, by reason, and the distinct ones (logging only, not state)
        self.noted: Counter[str] = Counter()
        self.noted_keys: dict[str, set[tuple[int, int]]] = {}
        # global order: stream-level bad samples are the same on every rank and worker; one of them names them
        self.log_stream_bad = not self.glob or (rank == 0 and worker == 0)
        # global order, epoch barrier: the epoch of each source's samples entering the pipeline, and the
        # samples (shard, ordinal) of the last step taken (a re-pack keeps them out of its first step)
        self.epoch_in = [0] * len(sources)
        self.closing: set[int] = set()      # sources whose last epoch is still in the packing window
        self.held: list[RawSample] = []     # ... and their next epoch's samples, waiting for it to leave
        self.last_step: set[tuple[str, int]] = set()
        self.batches = 0
        self.samples_out = 0
        self.overflow = 0
        self.media_bytes_read = 0   # deferred media bytes this pipeline read (not state: a per-process cost)
        self._warned_encode_estimate = False
        # encoders with estimate/prepare/finish (SampleEncoder): pack on exact estimates without decoding,
        # decode a pack's samples when it is materialised and patchify them straight into its pixel buffer
        self.can_estimate = callable(getattr(encoder, "estimate", None))
        self.staged = callable(getattr(encoder, "prepare", None)) and callable(getattr(encoder, "finish", None))
        self.shared_pixels = get_worker_info() is not None
        if state is not None:
            self._restore(state)

    # -- samples in
    def _call(self, what: str, shard: str, key: str, *args: Any, **kw: Any) -> Any:
        """``encoder.<what>(*args)``; SampleError passes, anything else is re-raised naming shard and key."""
        try:
            return getattr(self.encoder, what)(*args, **kw)
        except SampleError:
            raise
        except Exception as e:
            raise RuntimeError(f"encoder.{what} failed on shard {shard!r} key {key!r}: {type(e).__name__}: {e}") from e

    def _encode(self, shard: str, key: str, members: dict) -> EncodedSample:
        """Encode eagerly; a staged encoder (SampleEncoder) gives raw uint8 pixels, as in the fast path."""
        if self.staged:
            prepared = self._call("prepare", shard, key, key, members)
            return self._call("finish", shard, key, prepared, normalize=False)
        return self._call("encode", shard, key, key, members)

    def _read_deferred(self, shard: str, key: str, members: dict, deferred: DeferredMedia) -> dict:
        """``members`` with the deferred media read in (MediaReadError: a ``corrupt_tar`` bad sample)."""
        media = read_deferred(shard, deferred)
        self.media_bytes_read += deferred.nbytes
        return members | media

    def _estimate(self, s: RawSample) -> tuple[int, int]:
        hint = self.hints.get(s.shard, s.index)
        if hint is not None and 1 <= hint[0] <= self.cfg.micro_batch_tokens:
            return hint  # the manifest is untrusted too: implausible hints are measured instead
        # measuring needs the media: every rank reads them for that, then lets them go (the window holds no
        # media whatever the world size; the rank that decodes the sample reads them again)
        members = s.members if s.deferred is None else self._read_deferred(s.shard, s.key, s.members, s.deferred)
        if self.estimator is not None:
            t, v = self.estimator(s.key, members)
            return int(t), int(v)
        if self.can_estimate:
            t, v = self._call("estimate", s.shard, s.key, s.key, members)
            return int(t), int(v)
        if not self._warned_encode_estimate:
            self._warned_encode_estimate = True
            log.warning("%s but shard %s has no per-sample cost hints and no cost_estimator was given: every rank "
                        "encodes every sample of its group to measure it",
                        "global order" if self.glob else f"balance_group={self.G}", s.shard)
        enc = self._encode(s.shard, s.key, members)
        return enc.num_tokens, enc.num_vision_patches

    def _item(self, s: RawSample, carried: int = 0) -> PackItem:
        """PackItem for a raw sample (may raise SampleError). Without balancing, an encoder with
        ``estimate`` sizes it (exact, no pixel decoding) and it is encoded when its pack is built,
        so the window holds compressed samples, not ~10 MB of decoded pixels per clip."""
        if self.G == 1 and not self.glob and self.can_estimate:
            t, v = self._call("estimate", s.shard, s.key, s.key, s.members)
            return PackItem(s.key, int(t), int(v), _Entry(s.position, s.members), carried)
        if self.G == 1 and not self.glob:
            enc = self._encode(s.shard, s.key, s.members)
            return PackItem(s.key, enc.num_tokens, enc.num_vision_patches, _Entry(s.position, None, enc), carried)
        t, v = self._estimate(s)
        return PackItem(s.key, t, v, _Entry(s.position, s.members, deferred=s.deferred), carried)

    def _count_bad(self, reason: str, pos: tuple[str, int, str], detail: str, decoding: bool = False) -> None:
        """Count a skipped sample (occurrences and distinct samples by reason) and log it: the first
        ``_NAMED_BAD`` of a reason by shard and key, then a summary whenever the count doubles."""
        shard = pos[0]
        if self.glob and decoding:  # found by this rank only: reported with the step (TrainLoader sums them)
            self.bad_step[reason] += 1
            self.bad_step_keys.append([reason, self.shard_index[shard], pos[1]])
            self._log_bad(reason, pos, detail)
            return
        self.bad[reason] += 1
        _remember(self.bad_keys, reason, (self.shard_index[shard], pos[1]))
        if self.log_stream_bad:
            self._log_bad(reason, pos, detail)
        self._check_fraction()

    def _log_bad(self, reason: str, pos: tuple[str, int, str], detail: str) -> None:
        """Name the first ``_NAMED_BAD`` bad samples of a reason (this process); after that, a count summary
        each time the reason's count doubles (the others are named at DEBUG level)."""
        self.noted[reason] += 1
        _remember(self.noted_keys, reason, (self.shard_index[pos[0]], pos[1]))
        n = self.noted[reason]
        log.log(logging.WARNING if n <= _NAMED_BAD else logging.DEBUG, "skipping bad sample (%s) shard=%s key=%s: %s",
                reason, pos[0], pos[2], detail)
        if n == _NAMED_BAD:
            log.warning("%s: further bad samples of reason %s are counted, not named (DEBUG level names them)",
                        self.where, reason)
        elif n > _NAMED_BAD and n & (n - 1) == 0:   # 8, 16, 32, ...
            log.warning("%s: %d bad samples so far (%s)", self.where, sum(self.noted.values()),
                        _reasons(self.noted, _distinct(self.noted_keys)))

    def _check_fraction(self) -> None:
        """BadDataError when too many samples were bad: once ``min_samples_for_bad_check`` samples were read,
        or (global order) once every source finished an epoch, whichever comes first."""
        total = sum(self.bad.values())
        whole = self.glob and min(self.epoch_in) >= 1
        if (self.seen >= self.cfg.min_samples_for_bad_check or whole) and total > self.cfg.max_bad_fraction * self.seen:
            raise BadDataError(_bad_message(total, self.seen, self.bad, self.cfg.max_bad_fraction, self.where,
                                            _distinct(self.bad_keys), self.cfg.micro_batch_tokens))

    def _ingest(self, s: RawSample) -> None:
        owner = self.glob or self.counter % self.G == self.grank   # global order: global counts on every rank
        self.counter += 1
        if owner:
            self.seen += 1
            self.source_seen[self.source_of[s.shard]] += 1
        if s.is_bad:
            if owner:
                self._count_bad(s.bad_reason, s.position, s.bad_detail)
            return
        try:
            plan = self.packer.push(self._item(s), must=self._closing_item if self.closing else None)
        except SampleError as e:
            if owner:
                self._count_bad(e.reason, s.position, e.detail)
            return
        except MediaReadError as e:   # deferred media read to measure the sample (every rank does)
            if owner:
                self._count_bad("corrupt_tar", s.position, str(e))
            return
        if plan is not None:
            self._add_plan(plan)
            if self.closing and not any(self._closing_item(it) for it in self.packer.items):
                self._release()

    def _add_plan(self, plan: list[list[list[PackItem]]]) -> None:
        if not self.glob:
            self.pending.extend(plan[self.grank])
            return
        # plan[slot][i] is pack ``slot`` of the plan's step i (a short step is the plan's last)
        steps = [[p[i] for p in plan if i < len(p)] for i in range(max(len(p) for p in plan))]
        self.steps.extend(steps)
        self._step_before({_sample_id(it) for b in steps[-1] for it in b})

    def _step_before(self, ids: set[tuple[str, int]]) -> None:
        """The samples of the last step planned: the next plan keeps them out of its first step (the packer's
        ``avoid``), so a sample's copies of two epochs are not trained in consecutive steps."""
        self.packer.avoid = (lambda it: _sample_id(it) in ids) if ids else None

    # -- the epoch barrier (both modes)
    def _source_epoch(self, k: int) -> int:
        """The epoch of the sample source ``k`` delivered last."""
        return self.stream.streams[k].epoch if isinstance(self.stream, MixtureStream) else self.stream.epoch

    def _admit(self, s: RawSample) -> None:
        """One sample of the global stream into the shuffle buffer and on to the packer, behind the epoch
        barrier: the first sample of a source's next epoch starts closing its current one (``_wrap``), and
        until that left the packing window the source's new samples wait (``held``)."""
        k = self.source_of[s.shard]
        e = self._source_epoch(k)
        if e != self.epoch_in[k]:
            self._wrap(k, e)
        if s.is_bad:   # bad samples skip the buffer (reported at once)
            self._ingest(s)
        elif k in self.closing:
            self.held.append(s)
        else:
            self._shuffle_in(s)

    def _shuffle_in(self, s: RawSample) -> None:
        out = self.buffer.push(s)
        if out is not None:
            self._ingest(out)
        while (out := self.buffer.pop_excess()) is not None:
            self._ingest(out)

    def _wrap(self, k: int, epoch: int) -> None:
        """Source ``k`` starts epoch ``epoch``: its samples leave the shuffle buffer (seeded order) for the
        packing window, and the next plan that packs the window must emit all of them (``closing``) before
        its new epoch's samples enter, so an epoch trains each sample once and two epochs' copies never share
        a window. With one source, or when the source comes round again before that plan, the window is
        packed out at once (``WindowPacker.close``: the epoch's last step may be short). Runs between steps."""
        if k in self.closing:
            self._close_now()
        mine = self.source_of
        for out in self.buffer.evict(lambda x: mine[x.shard] == k):
            self._ingest(out)
        self.epoch_in[k] = epoch
        if any(mine[it.ref.pos[0]] == k for it in self.packer.items):
            self.closing.add(k)
            if len(self.epoch_in) == 1:   # nothing else fills the window
                self._close_now()
        self._check_fraction()   # every source read once: the bad fraction is known whatever the data size

    def _closing_item(self, it: PackItem) -> bool:
        return self.source_of[it.ref.pos[0]] in self.closing

    def _close_now(self) -> None:
        plan = self.packer.close(self._closing_item)
        if plan is not None:
            self._add_plan(plan)
        self._release()

    def _release(self) -> None:
        """The closing sources' epochs left the window: their held samples go on into the shuffle buffer."""
        self.closing, held, self.held = set(), self.held, []
        for s in held:
            self._shuffle_in(s)

    # -- batches out
    def _decode_items(self, items: list[PackItem]) -> list[PackItem]:
        """Decode (read deferred media, prepare or encode) a pack's samples -> PackItems with their real
        sizes, ``ref`` the entry; bad ones (and ones over the budget after all) are counted and left out."""
        good: list[PackItem] = []
        for it in items:
            e: _Entry = it.ref
            if e.encoded is None and e.prepared is None:
                try:
                    if e.deferred is not None:
                        e.members, e.deferred = self._read_deferred(e.pos[0], e.pos[2], e.members, e.deferred), None
                    if self.staged:
                        e.prepared = self._call("prepare", e.pos[0], e.pos[2], e.pos[2], e.members)
                    else:
                        e.encoded = self._encode(e.pos[0], e.pos[2], e.members)
                except SampleError as err:
                    self._count_bad(err.reason, e.pos, err.detail, decoding=True)
                    continue
                except MediaReadError as err:
                    self._count_bad("corrupt_tar", e.pos, str(err), decoding=True)
                    continue
                finally:
                    e.drop()
            done = e.encoded if e.encoded is not None else e.prepared
            if done.num_tokens > self.cfg.micro_batch_tokens:
                self._count_bad("too_long", e.pos,
                                f"{done.num_tokens} tokens after encoding (estimate was {it.num_tokens}) exceed the "
                                f"budget {self.cfg.micro_batch_tokens}", decoding=True)
                continue
            good.append(PackItem(it.key, done.num_tokens, done.num_vision_patches, e))
        return good

    def _materialize(self) -> PackedBatch | None:
        """Decode (if needed) and build the first pending pack; None if all its samples went bad."""
        good = self._decode_items(self.pending.popleft())
        if not good:
            return None
        budget = self.cfg.micro_batch_tokens
        if sum(it.num_tokens for it in good) > budget:  # estimates were low: split this pack
            self.overflow += 1
            parts = [[good[i] for i in b] for b in ffd_bins([it.num_tokens for it in good], budget)]
            self.pending.extendleft(reversed(parts[1:]))
            good = parts[0]
        return self._build([it.ref for it in good])

    def _fit_rank_step(self, packs: list[list[PackItem]], estimates: dict[int, int], k: int) -> tuple[list[list[PackItem]], int]:
        """This rank's decoded packs of a step -> exactly ``k`` packs within the budget, in plan order (an empty
        one becomes a filler micro-batch), and how many packs overflowed. As planned when nothing went wrong:
        a pack keeps its slot even when bad samples emptied it, so micro-batch composition stays the plan's on
        any layout (a split would change the MoE aux loss's grouping and save no work). A pack over the budget
        (low estimate) gives up its last samples, which go first-fit (largest first) into this rank's slots
        with room; a sample that fits nowhere is skipped and counted (``estimate_overflow``)."""
        budget = self.cfg.micro_batch_tokens
        bins = [list(p) for p in packs] + [[] for _ in range(k - len(packs))]
        spill: list[PackItem] = []
        overflowed = 0
        for b in bins:
            if sum(it.num_tokens for it in b) > budget:
                overflowed += 1
                while sum(it.num_tokens for it in b) > budget:
                    spill.append(b.pop())
        for it in sorted(spill, key=lambda x: -x.num_tokens):
            j = next((j for j, b in enumerate(bins) if budget - sum(x.num_tokens for x in b) >= it.num_tokens), None)
            if j is not None:
                bins[j].append(it)
                continue
            e = it.ref
            self._count_bad("estimate_overflow", e.pos,
                            f"{it.num_tokens} tokens after encoding, estimated {estimates[id(e)]}: the step's {k} "
                            f"micro-batches of {budget} tokens have no room left for it (fix the cost hints: "
                            "rynnscale data stats)", decoding=True)
        return bins, overflowed

    def _build(self, entries: list[_Entry]) -> PackedBatch:
        """PackedBatch of decoded entries: prepared ones are finished straight into one pixel buffer per
        kind (shared memory in a worker), so every pixel is written once and never copied again."""
        bufs: dict[str, torch.Tensor | None] = {"image": None, "video": None}
        slices: list[dict[str, torch.Tensor]] = [{} for _ in entries]
        all_prepared = all(e.prepared is not None for e in entries)  # else some were encoded eagerly: concatenate
        for kind in bufs if all_prepared else ():
            rows = [e.prepared.patches(kind) for e in entries]
            if sum(rows):
                buf = bufs[kind] = _pixel_buffer(sum(rows), entries[0].prepared.pixel_dim, self.shared_pixels)
                r0 = 0
                for sl, n in zip(slices, rows):
                    if n:
                        sl[kind] = buf[r0:r0 + n]
                    r0 += n
        samples: list[EncodedSample] = []
        for e, sl in zip(entries, slices):
            if e.encoded is None:
                e.encoded = self._call("finish", e.pos[0], e.pos[2], e.prepared, pixel_values_out=sl.get("image"),
                                       pixel_values_videos_out=sl.get("video"), normalize=False)
                e.prepared = None
            samples.append(e.encoded)
        return build_packed_batch(samples, pixel_values=bufs["image"], pixel_values_videos=bufs["video"])

    def _assign(self, step: list[list[PackItem]]) -> tuple[list[list[int]], list[float]]:
        """Pack indices of each rank for one global step (each rank's in pack order) and the rank costs.

        The packs go to ranks by ``balance`` (cost model, token count, or in order); the rank costs are
        always the cost model's estimate, so the logged max/mean compares the balance modes on one scale."""
        costs = [self.cfg.cost_model.pack_cost([it.num_tokens for it in b], [it.vision_patches for it in b])
                 for b in step]
        if self.cfg.balance == "none" or self.world == 1:
            per = -(-len(step) // self.world)
            parts = [list(range(r * per, min(len(step), (r + 1) * per))) for r in range(self.world)]
        else:
            keys = [float(sum(it.num_tokens for it in b)) for b in step] if self.cfg.balance == "tokens" else costs
            parts = assign_equal_count(keys, self.world)
        return parts, [sum(costs[i] for i in p) for p in parts]

    def _take_step(self, step: list[list[PackItem]]) -> tuple[list[PackedBatch], dict]:
        """This rank's micro-batches of a global step (always as many as its share of the step's packs, so the
        trainer's steps stay aligned with the loader's: a filler stands in for a pack that went wholly bad),
        and what the trainer logs about the whole step."""
        parts, rank_costs = self._assign(step)
        # every rank's micro-batch count, the last (short) step of a finite stream included
        k = max(self.cfg.micro_batches_per_step, -(-len(step) // self.world))
        self.bad_step, self.bad_step_keys = Counter(), []
        mine = [[PackItem(it.key, it.num_tokens, it.vision_patches, it.ref.copy()) for it in step[i]]
                for i in parts[self.rank]]
        estimates = {id(it.ref): it.num_tokens for b in mine for it in b}
        packs, overflowed = self._fit_rank_step([self._decode_items(b) for b in mine], estimates, k)
        out = [self._build([it.ref for it in b]) if b else filler_batch() for b in packs]
        for b in step:   # members of other ranks' samples are not needed any more
            for it in b:
                it.ref.drop()
        info = {"step": self.step_no, "rank_costs": rank_costs, "packs": len(step), "bad": dict(self.bad_step),
                "bad_keys": self.bad_step_keys, "overflow": overflowed,
                "fillers": sum(1 for b in out if b.filler),
                "samples": sorted(f"{self.names[self.shard_index[it.ref.pos[0]]]}:{it.key}" for b in step for it in b)}
        short = k - len(parts[self.rank])   # slots the plan left empty: a short step (epoch end, re-pack)
        if info["fillers"] > short:
            log.warning("global step %d: %d of this rank's %d micro-batches are fillers (all their samples were bad)",
                        self.step_no, info["fillers"] - short, k)
        elif short:
            log.debug("global step %d is short: %d of this rank's %d micro-batches are fillers", self.step_no, short, k)
        return out, info

    def _iter_global(self) -> Iterator[tuple[tuple[list[PackedBatch], dict], dict]]:
        """Global order: every worker plans every step; worker w takes steps base + w, base + w + W, ...
        Samples move from the stream to the packer only between steps taken, so a state is never mid-sample."""
        src = iter(self.stream)
        while True:
            if self.steps:
                step = self.steps.popleft()
                self.last_step = {_sample_id(it) for b in step for it in b}
                mine = (self.step_no - self.base) % self.W == self.worker
                if mine:
                    batches, info = self._take_step(step)
                self.step_no += 1
                if mine:
                    self.batches += len(batches)
                    self.samples_out += sum(b.num_samples for b in batches if not b.filler)
                    info["media_bytes_read"], self.media_bytes_read = self.media_bytes_read, 0
                    yield (batches, info), self.state()
                continue
            if not self._feed(src):
                return

    def _feed(self, src: Iterator[RawSample]) -> bool:
        """One sample of the stream in (``_admit``); at the end of a finite stream, the held samples, the
        shuffle buffer and the packing window drain in turn. False when nothing is left."""
        s = next(src, None)
        if s is not None:
            self._admit(s)
            return True
        if self.closing:
            self._close_now()
            return True
        out = self.buffer.pop()
        if out is not None:
            self._ingest(out)
            return True
        plan = self.packer.flush()
        if plan is None:
            return False
        self._add_plan(plan)
        return True

    def __iter__(self) -> Iterator[tuple[Any, dict]]:
        if self.glob:
            yield from self._iter_global()
            return
        src = iter(self.stream)
        while True:
            if self.pending:
                batch = self._materialize()
                if batch is not None:
                    self.batches += 1
                    self.samples_out += batch.num_samples
                    yield batch, self.state()
                continue
            if not self._feed(src):
                return

    # -- state
    def _pos_out(self, pos: tuple[str, int, str]) -> list:
        return [self.shard_index[pos[0]], pos[1], pos[2]]

    def _pos_in(self, x: list) -> tuple[str, int, str]:
        i = int(x[0])
        if not 0 <= i < len(self.shards):
            raise LoaderStateError(f"loader state names shard #{i} but there are {len(self.shards)} shards")
        return (self.shards[i], int(x[1]), str(x[2]))

    def _keys_out(self, keys: dict[str, set[tuple[int, int]]]) -> dict[str, list]:
        return {k: sorted([a, b] for a, b in v) for k, v in keys.items()}

    def _keys_in(self, keys: dict) -> dict[str, set[tuple[int, int]]]:
        return {str(k): {(int(a), int(b)) for a, b in v} for k, v in keys.items()}

    def state(self) -> dict:
        """Plain-data snapshot; samples are [shard index, ordinal in the shard, key]."""
        def pos(it: PackItem) -> list:
            return self._pos_out(it.ref.pos)

        if self.glob:   # layout-free: nothing here depends on the rank, the world size or the worker
            shuffle = self.buffer.state
            shuffle["buffer"] = [self._pos_out(tuple(p)) for p in shuffle["buffer"]]
            return {
                "stream": self.stream.state, "shuffle": shuffle, "step_no": self.step_no, "N": self.N,
                "packer": {"plans": self.packer.plans, "emitted_bins": self.packer.emitted_bins,
                           "emitted_tokens": self.packer.emitted_tokens,
                           "items": [pos(it) + [it.carried] for it in self.packer.items]},
                "steps": [[[pos(it) + [it.num_tokens, it.vision_patches] for it in b] for b in st] for st in self.steps],
                "counter": self.counter, "seen": self.seen, "bad": dict(self.bad), "source_seen": list(self.source_seen),
                "bad_keys": self._keys_out(self.bad_keys), "epochs_in": list(self.epoch_in),
                "closing": sorted(self.closing), "held": [self._pos_out(x.position) for x in self.held],
                "last_step": sorted([self.shard_index[p], i] for p, i in self.last_step),
            }

        shuffle = self.buffer.state
        shuffle["buffer"] = [self._pos_out(tuple(p)) for p in shuffle["buffer"]]
        extra = {"source_seen": list(self.source_seen)} if self.mixed else {}
        return extra | {
            "split": self.split, "num_splits": self.num_splits, "group_rank": self.grank,
            "stream": self.stream.state,
            "shuffle": shuffle,
            "packer": {"plans": self.packer.plans, "emitted_bins": self.packer.emitted_bins,
                       "emitted_tokens": self.packer.emitted_tokens,
                       "items": [pos(it) + [it.carried] for it in self.packer.items]},
            "pending": [[pos(it) for it in b] for b in self.pending],
            "counter": self.counter, "seen": self.seen, "bad": dict(self.bad), "bad_keys": self._keys_out(self.bad_keys),
            "epochs_in": list(self.epoch_in), "closing": sorted(self.closing),
            "held": [self._pos_out(x.position) for x in self.held], "batches": self.batches,
            "samples_out": self.samples_out, "estimate_overflow": self.overflow,
            "shuffle_early_emits": self.buffer.early_emits,
        }

    def _restore_reading(self, st: dict) -> list[PackItem]:
        """Restore the reader position, shuffle buffer and packer counters; the packer's items, re-read."""
        self.stream.load_state(st["stream"])
        sh = st["shuffle"]
        self.buffer.load_state({"draws": sh["draws"], "buffer": [self._pos_in(x) for x in sh["buffer"]]},
                               self.limits)
        p = st["packer"]
        self.packer.plans, self.packer.emitted_bins = int(p["plans"]), int(p["emitted_bins"])
        self.packer.emitted_tokens = int(p["emitted_tokens"])
        raws = read_positions([self._pos_in(x) for x in p["items"]], self.limits)
        return [self._item(s, carried=int(x[3])) for s, x in zip(raws, p["items"])]

    def _restore_global(self, st: dict) -> None:
        items = self._restore_reading(st)
        steps = []
        for saved in st["steps"]:
            bins = []
            for b in saved:
                raws = read_positions([self._pos_in(x) for x in b], self.limits)
                bins.append([PackItem(s.key, int(x[3]), int(x[4]), _Entry(s.position, s.members, deferred=s.deferred))
                             for s, x in zip(raws, b)])
            steps.append(bins)
        self.packer.items = items
        self.step_no = self.base = int(st["step_no"])
        self.counter, self.seen = int(st["counter"]), int(st["seen"])
        self.bad = Counter({k: int(v) for k, v in st["bad"].items()})
        self.bad_keys = self._keys_in(st.get("bad_keys", {}))
        self.source_seen = [int(x) for x in st["source_seen"]]
        self._restore_barrier(st)
        self.last_step = {self._pos_in([*x, ""])[:2] for x in st.get("last_step", [])}
        same = int(st["N"]) == self.N
        self._step_before({_sample_id(it) for b in steps[-1] for it in b} if steps and same else self.last_step)
        if same:
            self.steps = deque(steps)
        else:
            self._repack(steps)

    def _repack(self, steps: list[list[list[PackItem]]]) -> None:
        """Another number of micro-batches per step: the planned steps' samples become the first steps again,
        re-packed on their own (in order, a new group wherever a sample's copy of the next epoch follows),
        so nothing is lost or repeated and the epoch barrier holds; the last re-packed step may be short."""
        groups: list[list[PackItem]] = [[]]
        ids: set[tuple[str, int]] = set()
        for it in (it for bins in steps for b in bins for it in b):
            if _sample_id(it) in ids:
                groups.append([])
                ids = set()
            groups[-1].append(PackItem(it.key, it.num_tokens, it.vision_patches, it.ref))
            ids.add(_sample_id(it))
        for items in groups:
            if items:
                p = self.packer
                tmp = WindowPacker(p.budget, p.window, num_ranks=p.num_ranks, cost_model=p.cost_model,
                                   seed=p.seed, max_carry=p.max_carry)
                tmp.items, tmp.plans, tmp.avoid = items, p.plans, p.avoid
                self._add_plan(tmp.flush())

    def _restore_barrier(self, st: dict) -> None:
        """The epoch barrier's state (states saved before it existed: the epochs the stream is in)."""
        self.epoch_in = [int(x) for x in st.get("epochs_in", [self._source_epoch(k) for k in range(len(self.epoch_in))])]
        self.closing = {int(k) for k in st.get("closing", [])}
        self.held = read_positions([self._pos_in(x) for x in st.get("held", [])], self.limits)

    def _restore(self, st: dict) -> None:
        if self.glob:
            self._restore_global(st)
            return
        if (st["split"], st["num_splits"], st["group_rank"]) != (self.split, self.num_splits, self.grank):
            raise LoaderStateError(
                f"worker state is for reader split {st['split']}/{st['num_splits']} (group rank {st['group_rank']}) "
                f"but this worker reads split {self.split}/{self.num_splits} (group rank {self.grank})")
        self.packer.items = self._restore_reading(st)
        for b in st["pending"]:
            raws = read_positions([self._pos_in(x) for x in b], self.limits)
            self.pending.append([PackItem(s.key, 0, 0, _Entry(s.position, s.members)) for s in raws])
        self.counter, self.seen, self.batches = int(st["counter"]), int(st["seen"]), int(st["batches"])
        self.bad = Counter({k: int(v) for k, v in st["bad"].items()})
        self.bad_keys = self._keys_in(st.get("bad_keys", {}))
        self._restore_barrier(st)
        self.samples_out, self.overflow = int(st["samples_out"]), int(st["estimate_overflow"])
        if self.mixed:
            self.source_seen = [int(x) for x in st["source_seen"]]


def _sample_id(it: PackItem) -> tuple[str, int]:
    """A packed sample's identity: (shard path, ordinal in the shard)."""
    return it.ref.pos[0], it.ref.pos[1]


def _remember(keys: dict[str, set], reason: str, sample: tuple[int, int]) -> None:
    """Add a bad sample (shard #, ordinal) to its reason's distinct set (up to ``_MAX_DISTINCT_BAD``)."""
    got = keys.setdefault(reason, set())
    if len(got) < _MAX_DISTINCT_BAD:
        got.add(sample)


def _distinct(keys: dict[str, set]) -> dict[str, int]:
    return {k: len(v) for k, v in keys.items()}


def _reasons(bad: dict, distinct: dict[str, int]) -> str:
    """``too_long=200 (7 distinct), corrupt_tar=1``: occurrences by reason, with the distinct samples behind
    them where a sample was read (and skipped) more than once."""
    def one(k: str) -> str:
        d = distinct.get(k)
        if d is None or d >= bad[k]:
            return f"{k}={bad[k]}"
        return f"{k}={bad[k]} ({d}{'+' if d >= _MAX_DISTINCT_BAD else ''} distinct)"
    return ", ".join(one(k) for k in sorted(bad))


def _bad_message(total: int, seen: int, bad: dict, limit: float, where: str, distinct: dict[str, int] | None = None,
                 budget: int | None = None) -> str:
    distinct = distinct or {}
    msg = (f"{total} of {seen} samples ({100 * total / max(seen, 1):.1f}%) were bad in {where}, more than "
           f"max_bad_fraction={limit:g} ({_reasons(bad, distinct)})")
    n = sum(distinct.get(k, v) for k, v in bad.items())
    if n < total:
        msg += f"; {n} distinct samples (the data was read more than once)"
    if bad.get("too_long") and budget is not None:
        msg += (f"; too_long: a sample has more tokens than one micro-batch holds (micro_batch_tokens={budget}: "
                "raise train.micro_batch_tokens)")
    return msg + "; see the warnings above for shards and keys"


# ----------------------------------------------------------------------------- the rank's loader


def _expand_sources(cfg: LoaderConfig) -> list[_Source]:
    """Expand every source's patterns; a shard file may belong to one source only."""
    if not cfg.mixture:
        return [_Source("train", 1.0, expand_shard_patterns(cfg.train_shards))]
    out, owner = [], {}
    for m in cfg.mixture:
        try:
            shards = expand_shard_patterns(m.shards)
        except ShardPatternError as e:
            raise ShardPatternError(f"mixture source {m.name!r}: {e}") from None
        for p in shards:
            if p in owner:
                raise ShardPatternError(f"shard {p!r} is in mixture sources {owner[p]!r} and {m.name!r}; a shard may "
                                        "belong to one source only (weights would be wrong otherwise)")
            owner[p] = m.name
        out.append(_Source(m.name, float(m.weight), shards))
    return out


def _identity(x):
    return x


class _RankDataset(IterableDataset):
    """What each DataLoader worker runs: the pipeline of its (rotated) logical worker id."""

    def __init__(self, loader: TrainLoader, states: list[dict | None], rotation: int):
        self.cfg, self.encoder, self.estimator = loader.cfg, loader.encoder, loader.cost_estimator
        self.sources, self.rank, self.world_size = loader.sources, loader.rank, loader.world_size
        self.states, self.rotation = states, rotation

    def __iter__(self):
        info = get_worker_info()
        W = max(1, self.cfg.num_workers)
        w = ((info.id if info is not None else 0) + self.rotation) % W
        if self.cfg.tune_malloc:
            _tune_malloc_once()
        pipe = _WorkerPipeline(self.cfg, self.encoder, self.estimator, self.sources, self.rank, self.world_size,
                               w, self.cfg.num_workers, self.states[0] if self.cfg.global_order else self.states[w])
        for batch, state in pipe:
            yield batch, w, state


class TrainLoader:
    """Iterable of ``PackedBatch`` for one data-parallel rank; endless unless ``num_epochs``.

    ``encoder`` is any object with ``encode(key, members) -> EncodedSample`` raising
    ``SampleError`` for bad samples (``rynnscale.data.encode.SampleEncoder``); it must be
    picklable when workers are spawned. ``cost_estimator(key, members) -> (tokens, patches)`` is
    an optional cheap size estimate for ``balance_group > 1`` when the manifest has no hints.
    Iterating again continues from the current ``state_dict()``."""

    def __init__(self, cfg: LoaderConfig, encoder: Any, rank: int = 0, world_size: int = 1, *,
                 cost_estimator: CostEstimator | None = None):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        G = cfg.balance_group or world_size
        if world_size % G:
            raise ValueError(f"LoaderConfig.balance_group={cfg.balance_group} must divide world_size={world_size}")
        self.cfg, self.encoder, self.cost_estimator = cfg, encoder, cost_estimator
        self.rank, self.world_size = rank, world_size
        self.sources = _expand_sources(cfg)
        self.shards = [p for s in self.sources for p in s.shards]
        readers = (world_size // G) * max(1, cfg.num_workers)
        for s in self.sources:
            if len(s.shards) < readers and rank == 0 and not cfg.global_order:
                log.warning("%s has %d shards for %d readers (%d rank groups x %d workers): splitting it at the sample "
                            "level, so every reader walks all of its tars; write more, smaller shards to avoid that",
                            f"mixture source {s.name!r}" if cfg.mixture else "train_shards", len(s.shards), readers,
                            world_size // G, max(1, cfg.num_workers))
        W = max(1, cfg.num_workers)
        self._worker_states: list[dict | None] = [None] * W
        self._next_worker = 0
        self._generation = 0
        # global order: the layout-free state after the last step consumed, and what the trainer logs of it
        self._global: dict | None = None
        self._bad_decoding: Counter[str] = Counter()   # bad samples this rank found decoding its packs
        self._bad_decoding_keys: dict[str, set[tuple[int, int]]] = {}   # ... the distinct ones
        self._batches = self._samples_packed = 0   # this rank's, since this loader was built
        self._media_bytes_read = 0   # deferred media this rank read (its own samples', plus any measured)
        self._overflow = self._fillers = 0   # this rank's packs over budget after decoding / filler micro-batches
        self.last_step_samples: list[str] = []      # "<shard>:<key>" of the whole global batch, sorted
        self.last_step_rank_costs: list[float] = []  # every rank's micro-batches' cost (cost_model estimate, any balance mode)
        self.last_step_packs = 0   # packs the plan gave the whole step: world x micro-batches, fewer in a short step

    def budget_fit(self) -> BudgetFit:
        """How many samples fit ``micro_batch_tokens`` by the shards' ``num_tokens`` hints (manifests only)."""
        hints, budget = _ManifestHints(), self.cfg.micro_batch_tokens
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

    @property
    def elastic(self) -> bool:
        """True when the state is layout-free (``global_order``): it resumes on any world size / accumulation."""
        return self.cfg.global_order

    # -- iteration
    def __iter__(self) -> Iterator[PackedBatch]:
        self._generation += 1
        gen = self._generation
        states = [self._global] if self.cfg.global_order else list(self._worker_states)
        ds = _RankDataset(self, states, self._next_worker)
        kw: dict[str, Any] = {}
        if self.cfg.num_workers > 0:
            kw = dict(prefetch_factor=self.cfg.prefetch_factor, multiprocessing_context=self.cfg.multiprocessing_context)
        # its own generator: by default each iterator draws its worker base seed from torch's global generator,
        # so a resumed run (a new iterator after the RNG restore) would draw once more than the straight run and
        # shift every later dropout mask; the data path seeds itself explicitly and needs none of the global state
        dl = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_identity,
                        generator=torch.Generator(), **kw)
        W = max(1, self.cfg.num_workers)
        if self.cfg.global_order:  # workers yield whole steps in step order (worker w: steps w, w + W, ...)
            for (batches, info), _w, state in dl:
                if gen != self._generation:
                    return
                self._global = state
                self._bad_decoding.update(info["bad"])
                for reason, shard, ordinal in info["bad_keys"]:
                    _remember(self._bad_decoding_keys, reason, (shard, ordinal))
                self._media_bytes_read += info["media_bytes_read"]
                self._overflow += info["overflow"]
                self._fillers += info["fillers"]
                self.last_step_samples, self.last_step_rank_costs = info["samples"], info["rank_costs"]
                self.last_step_packs = info["packs"]
                self._check_bad()
                for b in batches:
                    self._batches += 1
                    self._samples_packed += 0 if b.filler else b.num_samples
                    yield b
            return
        for batch, w, state in dl:
            if gen != self._generation:
                return  # a newer iterator (or a load_state_dict) took over
            self._worker_states[w] = state
            self._next_worker = (w + 1) % W
            self._check_bad()
            yield batch

    def _check_bad(self) -> None:
        seen, bad = self.samples_seen, self.bad_counts
        total = sum(bad.values())
        whole = self.cfg.global_order and self._global is not None and min(self._global.get("epochs_in", [0])) >= 1
        if (seen >= self.cfg.min_samples_for_bad_check or whole) and total > self.cfg.max_bad_fraction * seen:
            raise BadDataError(_bad_message(total, seen, bad, self.cfg.max_bad_fraction, f"rank {self.rank}",
                                            self.bad_distinct, self.cfg.micro_batch_tokens))

    # -- counters
    @property
    def bad_counts(self) -> dict[str, int]:
        """Skipped samples by reason (this rank, all workers), as of the last consumed batch."""
        c: Counter[str] = Counter()
        if self.cfg.global_order:
            c.update(self._bad_decoding)
            c.update(self._global["bad"] if self._global else {})
            return dict(c)
        for st in self._worker_states:
            if st is not None:
                c.update(st["bad"])
        return dict(c)

    @property
    def bad_distinct(self) -> dict[str, int]:
        """Distinct samples behind ``bad_counts`` by reason (a sample skipped in every epoch counts once; a
        count of ``_MAX_DISTINCT_BAD`` is a lower bound)."""
        keys: dict[str, set] = {}
        sts = [self._global] if self.cfg.global_order else self._worker_states
        for part in [st.get("bad_keys", {}) for st in sts if st is not None]:
            for k, v in part.items():
                keys.setdefault(k, set()).update(map(tuple, v))
        for k, v in self._bad_decoding_keys.items():
            keys.setdefault(k, set()).update(v)
        return {k: min(len(v), _MAX_DISTINCT_BAD) for k, v in keys.items()}

    def bad_summary(self) -> str:
        """``too_long=200 (7 distinct), ...``: skipped samples by reason, for logs."""
        return _reasons(self.bad_counts, self.bad_distinct)

    @property
    def samples_seen(self) -> int:
        if self.cfg.global_order:  # the whole global stream read so far (every rank reads all of it)
            return self._global["seen"] if self._global else 0
        return sum(st["seen"] for st in self._worker_states if st is not None)

    def stats(self) -> dict:
        """Counters for metrics: samples seen / packed, bad by reason, batches, packing efficiency."""
        sts = [st for st in self._worker_states if st is not None]
        if self.cfg.global_order:
            sts = [self._global] if self._global else []
        bins = sum(st["packer"]["emitted_bins"] for st in sts)
        toks = sum(st["packer"]["emitted_tokens"] for st in sts)
        packed = self._samples_packed if self.cfg.global_order else sum(st["samples_out"] for st in sts)
        out = {"samples_seen": self.samples_seen, "samples_packed": packed,
               "bad": self.bad_counts,
               "batches": self._batches if self.cfg.global_order else sum(st["batches"] for st in sts),
               "packing_efficiency": toks / (bins * self.cfg.micro_batch_tokens) if bins else 0.0,
               "shuffle_early_emits": sum(st.get("shuffle_early_emits", 0) for st in sts)}
        if self.cfg.global_order:   # found decoding this rank's packs (since this loader was built)
            out["estimate_overflow"], out["filler_batches"] = self._overflow, self._fillers
            out["media_bytes_read"] = self._media_bytes_read
        else:
            out["estimate_overflow"] = sum(st["estimate_overflow"] for st in sts)
        if self.cfg.mixture:
            out["sources"] = self._source_stats()
        return out

    def _source_stats(self) -> dict[str, dict]:
        """Per mixture source: samples seen by this rank (bad ones included), their share, and the
        epochs completed by every reader of this rank (a worker without a batch yet counts 0)."""
        seen = [0] * len(self.sources)
        epochs: list[int | None] = [None] * len(self.sources)
        for st in [self._global] if self.cfg.global_order else self._worker_states:
            for k in range(len(self.sources)):
                n = st["source_seen"][k] if st is not None else 0
                e = st["stream"]["sources"][k]["epoch"] if st is not None else 0
                seen[k] += n
                epochs[k] = e if epochs[k] is None else min(epochs[k], e)
        total = sum(seen)
        return {s.name: {"samples_seen": seen[k], "share": seen[k] / total if total else 0.0,
                         "weight": s.weight / sum(x.weight for x in self.sources), "epochs": int(epochs[k] or 0)}
                for k, s in enumerate(self.sources)}

    # -- state
    def _fingerprint(self, absolute: bool = False) -> dict:
        # shard paths relative to their common directory: a moved run / data directory still resumes
        # (``absolute``: the hash of absolute paths that states saved before had)
        names = hashlib.sha256("\n".join(self.shards if absolute else _relative_names(self.shards)).encode()
                               ).hexdigest()[:16]
        c = self.cfg
        fp = {"world_size": self.world_size, "rank": self.rank, "num_workers": max(1, c.num_workers),
              "balance_group": c.balance_group or self.world_size, "seed": c.seed,
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

    def _global_fingerprint(self) -> dict:
        c = self.cfg
        fp = {k: v for k, v in self._fingerprint().items()
              if k not in ("world_size", "rank", "num_workers", "balance_group", "micro_batches_per_step")}
        return fp | {"order": "global", "num_epochs": c.num_epochs}

    def state_dict(self) -> dict:
        """Position of this rank's data (as of the last batch consumed): plain JSON-able data. Global order:
        the position in the global stream and the samples drawn but not trained yet, the same on every
        rank and free of the layout (loadable at any world size, worker count, grad_accum)."""
        if self.cfg.global_order:
            return {"version": GLOBAL_STATE_VERSION, "config": self._global_fingerprint(),
                    "state": copy.deepcopy(self._global), "bad_decoding": dict(self._bad_decoding),
                    "bad_decoding_keys": {k: sorted([a, b] for a, b in v) for k, v in self._bad_decoding_keys.items()}}
        return {"version": STATE_VERSION, "config": self._fingerprint(), "next_worker": self._next_worker,
                "workers": copy.deepcopy(self._worker_states)}

    def load_state_dict(self, sd: dict) -> None:
        """Continue from ``sd``. Raises LoaderStateError naming the first field that differs
        (another world size, worker count, seed, budget or shard list cannot replay exactly)."""
        if self.cfg.global_order or sd.get("version") == GLOBAL_STATE_VERSION:
            self._load_global(sd)
            return
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

    def _load_global(self, sd: dict) -> None:
        if not self.cfg.global_order:
            raise LoaderStateError("loader state is a global-order (layout-free) state but this loader reads "
                                   "per-rank splits (global_order=False)")
        if sd.get("version") != GLOBAL_STATE_VERSION:
            raise LoaderStateError(
                f"loader state version {sd.get('version')!r} was saved by the per-rank split loader (before the "
                "global sample order); it cannot be continued in the global order (the trainer then restarts the "
                "data order deterministically, with a warning)")
        mine = self._global_fingerprint()
        for k in list(mine) + [k for k in sd["config"] if k not in mine]:
            if sd["config"].get(k) != mine.get(k):
                raise LoaderStateError(f"loader state was saved with {k}={sd['config'].get(k)!r} but this loader has "
                                       f"{k}={mine.get(k)!r}; the global sample order cannot be continued")
        self._global = copy.deepcopy(sd["state"])
        self._bad_decoding = Counter({k: int(v) for k, v in sd.get("bad_decoding", {}).items()})
        self._bad_decoding_keys = {str(k): {(int(a), int(b)) for a, b in v}
                                   for k, v in sd.get("bad_decoding_keys", {}).items()}
        self._generation += 1
