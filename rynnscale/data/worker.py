"""One reader of a data loader, in its worker process: the shared pipeline and the per-rank split mode.

    shards of this reader's split -> tar stream -> shuffle buffer -> size -> WindowPacker -> decode -> PackedBatch

``WorkerPipeline`` holds what every mode shares: reading (media located and read by position where a mode
defers them), the shuffle buffer, sizing, the epoch barrier, bad-sample counting and logging, decoding a
pack straight into one pixel buffer per kind, and the plain-data state of all that. ``SplitPipeline`` is
the per-rank split mode (evaluation); the global order lives in ``rynnscale.data.global_order``. The whole
design (global order, epochs, memory, bad samples) is in docs/data_loader.md.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import get_worker_info

from rynnscale.batch import EncodedSample, PackedBatch
from rynnscale.data.encode import SampleError
from rynnscale.data.loader_config import BadDataError, CostEstimator, LoaderConfig, LoaderStateError
from rynnscale.data.packing import PackItem, WindowPacker, build_packed_batch, ffd_bins
from rynnscale.data.reader import (
    DeferredMedia,
    MediaReadError,
    MixtureStream,
    RawSample,
    ShardStream,
    ShuffleBuffer,
    mix64,
    read_deferred,
    read_positions,
)

log = logging.getLogger(__name__)

NAMED_BAD = 5             # bad samples named per reason and process; later ones are summarised (DEBUG names them)
MAX_DISTINCT_BAD = 10_000  # distinct bad samples remembered per reason (a count beyond it is a lower bound)


@dataclass(frozen=True)
class Source:
    """A mixture source with its shard patterns expanded (``train_shards`` is one source named 'train')."""

    name: str
    weight: float
    shards: list[str]


class Entry:
    """A sample inside the packer or a pending pack: its position, raw members until decoded (media members
    possibly ``deferred``: not read yet), then the prepared (decoded, tokenised) sample or, from encoders
    without ``prepare``, the encoded one."""

    __slots__ = ("pos", "members", "encoded", "prepared", "deferred")

    def __init__(self, pos: tuple[str, int, str], members: dict | None, encoded: EncodedSample | None = None,
                 deferred: DeferredMedia | None = None):
        self.pos, self.members, self.encoded, self.deferred = pos, members, encoded, deferred
        self.prepared: Any = None

    def copy(self) -> Entry:
        """The same sample, not decoded yet (what a rank takes for its pack)."""
        return Entry(self.pos, self.members, deferred=self.deferred)

    def drop(self) -> None:
        self.members = self.deferred = None


def pixel_buffer(rows: int, cols: int, shared: bool, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
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


def relative_names(shards: list[str]) -> list[str]:
    """Shard paths relative to the deepest directory holding all of them (order kept)."""
    if not shards:
        return []
    absolute = [os.path.abspath(p) for p in shards]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return [os.path.relpath(p, root) for p in absolute]


def remember_bad(keys: dict[str, set], reason: str, sample: tuple[int, int]) -> None:
    """Add a bad sample (shard #, ordinal) to its reason's distinct set (up to ``MAX_DISTINCT_BAD``)."""
    got = keys.setdefault(reason, set())
    if len(got) < MAX_DISTINCT_BAD:
        got.add(sample)


def distinct_counts(keys: dict[str, set]) -> dict[str, int]:
    return {k: len(v) for k, v in keys.items()}


def bad_reasons(bad: dict, distinct: dict[str, int]) -> str:
    """``too_long=200 (7 distinct), corrupt_tar=1``: occurrences by reason, with the distinct samples behind
    them where a sample was read (and skipped) more than once."""
    def one(k: str) -> str:
        d = distinct.get(k)
        if d is None or d >= bad[k]:
            return f"{k}={bad[k]}"
        return f"{k}={bad[k]} ({d}{'+' if d >= MAX_DISTINCT_BAD else ''} distinct)"
    return ", ".join(one(k) for k in sorted(bad))


def bad_message(total: int, seen: int, bad: dict, limit: float, where: str, distinct: dict[str, int] | None = None,
                 budget: int | None = None) -> str:
    distinct = distinct or {}
    msg = (f"{total} of {seen} samples ({100 * total / max(seen, 1):.1f}%) were bad in {where}, more than "
           f"max_bad_fraction={limit:g} ({bad_reasons(bad, distinct)})")
    n = sum(distinct.get(k, v) for k, v in bad.items())
    if n < total:
        msg += f"; {n} distinct samples (the data was read more than once)"
    if bad.get("too_long") and budget is not None:
        msg += (f"; too_long: a sample has more tokens than one micro-batch holds (micro_batch_tokens={budget}: "
                "raise train.micro_batch_tokens)")
    return msg + "; see the warnings above for shards and keys"


class WorkerPipeline:
    """One reader of a loader: shards of its split -> shuffle buffer (behind the epoch barrier) -> sized
    samples -> the packer's plans -> decoded batches. A mode subclasses it: ``SplitPipeline`` (this module:
    per-rank splits) and ``rynnscale.data.global_order.GlobalPipeline`` (one global order, planned steps)."""

    def __init__(self, cfg: LoaderConfig, encoder: Any, estimator: CostEstimator | None, sources: list[Source],
                 rank: int, world_size: int, worker: int, num_workers: int, state: dict | None):
        self.cfg, self.encoder, self.estimator = cfg, encoder, estimator
        self.worker, self.W, self.rank, self.world = worker, max(1, num_workers), rank, world_size
        self.split, self.num_splits = self._split()
        self.mixed = bool(cfg.mixture)
        self.limits = replace(cfg.limits, defer_media=self.defer_media)
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
        self.source_seen = [0] * len(sources)   # samples per source (mixture stats)
        self.buffer = ShuffleBuffer(cfg.shuffle_buffer, cfg.seed, stream=self.split,
                                    max_bytes=cfg.shuffle_buffer_bytes)
        self.packer = self._new_packer()
        self.shards = shards
        self.shard_index = {p: i for i, p in enumerate(shards)}
        self.counter = 0          # samples pulled from the shuffled stream
        self.seen = 0
        self.bad: Counter[str] = Counter()
        self.bad_keys: dict[str, set[tuple[int, int]]] = {}   # distinct bad samples by reason: (shard #, ordinal)
        # bad samples this process logged, by reason, and the distinct ones (logging only, not state)
        self.noted: Counter[str] = Counter()
        self.noted_keys: dict[str, set[tuple[int, int]]] = {}
        self.log_stream_bad = True   # whether this process names the stream's bad samples
        # the epoch barrier: the epoch of each source's samples entering the pipeline
        self.epoch_in = [0] * len(sources)
        # usable samples each source gave in its current epoch (a restore assumes some: it cannot know), and the
        # sources whose last whole epoch gave none; all of them: no step can ever come (BadDataError, not a hang)
        self.epoch_good = [0] * len(sources)
        self.empty_epoch = [False] * len(sources)
        self.stream_ended = False   # a finite stream read to its end: every sample was seen
        self.closing: set[int] = set()      # sources whose last epoch is still in the packing window
        self.held: list[RawSample] = []     # ... and their next epoch's samples, waiting for it to leave
        self.batches = 0
        self.samples_out = 0
        self.overflow = 0
        self.media_bytes_read = 0   # deferred media bytes this pipeline read (not state: a per-process cost)
        # encoders with estimate/prepare/finish (SampleEncoder): pack on exact estimates without decoding,
        # decode a pack's samples when it is materialised and patchify them straight into its pixel buffer
        self.can_estimate = callable(getattr(encoder, "estimate", None))
        self.staged = callable(getattr(encoder, "prepare", None)) and callable(getattr(encoder, "finish", None))
        self.shared_pixels = get_worker_info() is not None
        if state is not None:
            self._restore(state)

    # -- what a mode decides
    defer_media = False   # read media by position only when the sample is decoded

    def _split(self) -> tuple[int, int]:
        """(reader split, number of splits) this pipeline reads."""
        raise NotImplementedError

    def _new_packer(self) -> WindowPacker:
        raise NotImplementedError

    def _item(self, s: RawSample, carried: int = 0) -> PackItem:
        """PackItem for a raw sample (may raise SampleError)."""
        raise NotImplementedError

    def _add_plan(self, plan: list[list[list[PackItem]]]) -> None:
        raise NotImplementedError

    def _check_whole(self) -> bool:
        """Whether the bad fraction may be judged before ``min_samples_for_bad_check`` samples were read."""
        return False

    def state(self) -> dict:
        raise NotImplementedError

    def _restore(self, st: dict) -> None:
        raise NotImplementedError

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

    def _count_bad(self, reason: str, pos: tuple[str, int, str], detail: str, decoding: bool = False) -> None:
        """Count a skipped sample (occurrences and distinct samples by reason) and log it: the first
        ``NAMED_BAD`` of a reason by shard and key, then a summary whenever the count doubles. ``decoding``: found
        decoding this rank's pack (the global order reports those with the step)."""
        self.bad[reason] += 1
        remember_bad(self.bad_keys, reason, (self.shard_index[pos[0]], pos[1]))
        if self.log_stream_bad:
            self._log_bad(reason, pos, detail)
        self._check_fraction()

    def _log_bad(self, reason: str, pos: tuple[str, int, str], detail: str) -> None:
        """Name the first ``NAMED_BAD`` bad samples of a reason (this process); after that, a count summary
        each time the reason's count doubles (the others are named at DEBUG level)."""
        self.noted[reason] += 1
        remember_bad(self.noted_keys, reason, (self.shard_index[pos[0]], pos[1]))
        n = self.noted[reason]
        log.log(logging.WARNING if n <= NAMED_BAD else logging.DEBUG, "skipping bad sample (%s) shard=%s key=%s: %s",
                reason, pos[0], pos[2], detail)
        if n == NAMED_BAD:
            log.warning("%s: further bad samples of reason %s are counted, not named (DEBUG level names them)",
                        self.where, reason)
        elif n > NAMED_BAD and n & (n - 1) == 0:   # 8, 16, 32, ...
            log.warning("%s: %d bad samples so far (%s)", self.where, sum(self.noted.values()),
                        bad_reasons(self.noted, distinct_counts(self.noted_keys)))

    def _check_fraction(self) -> None:
        """BadDataError when too many samples were bad: once ``min_samples_for_bad_check`` samples were read,
        or (``_check_whole``, the global order) once every source finished an epoch, whichever comes first."""
        total = sum(self.bad.values())
        whole = self._check_whole()
        if (self.seen >= self.cfg.min_samples_for_bad_check or whole) and total > self.cfg.max_bad_fraction * self.seen:
            raise BadDataError(bad_message(total, self.seen, self.bad, self.cfg.max_bad_fraction, self.where,
                                           distinct_counts(self.bad_keys), self.cfg.micro_batch_tokens))

    def _ingest(self, s: RawSample) -> None:
        self.counter += 1
        self.seen += 1
        self.source_seen[self.source_of[s.shard]] += 1
        if s.is_bad:
            self._count_bad(s.bad_reason, s.position, s.bad_detail)
            return
        try:
            plan = self.packer.push(self._item(s), must=self._closing_item if self.closing else None)
        except SampleError as e:
            self._count_bad(e.reason, s.position, e.detail)
            return
        except MediaReadError as e:   # deferred media read to measure the sample (every rank does)
            self._count_bad("corrupt_tar", s.position, str(e))
            return
        self.epoch_good[self.source_of[s.shard]] += 1
        if plan is not None:
            self._add_plan(plan)
            if self.closing and not any(self._closing_item(it) for it in self.packer.items):
                self._release()

    # -- the epoch barrier
    def _source_epoch(self, k: int) -> int:
        """The epoch of the sample source ``k`` delivered last."""
        return self.stream.streams[k].epoch if isinstance(self.stream, MixtureStream) else self.stream.epoch

    def _admit(self, s: RawSample) -> None:
        """One sample of the global stream into the shuffle buffer and on to the packer, behind the epoch
        barrier: the first sample of a source's next epoch starts closing its current one (``_wrap``), and
        until that left the packing window the source's new samples wait (``held``). At most a window of them
        wait: then the window is packed out at once (a short step), since the other sources are not filling it
        (a light or finished one); waiting on would hold a whole epoch in memory and make no step meanwhile."""
        k = self.source_of[s.shard]
        e = self._source_epoch(k)
        if e != self.epoch_in[k]:
            self._wrap(k, e)
        if s.is_bad:   # bad samples skip the buffer (reported at once)
            self._ingest(s)
        elif k in self.closing:
            self.held.append(s)
            if len(self.held) >= self.packer.window:
                self._close_now()
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
        self.empty_epoch[k], self.epoch_good[k] = self.epoch_good[k] == 0, 0   # the epoch's last samples are in
        self.epoch_in[k] = epoch
        if any(mine[it.ref.pos[0]] == k for it in self.packer.items):
            self.closing.add(k)
            if len(self.epoch_in) == 1:   # nothing else fills the window
                self._close_now()
        self._check_fraction()   # every source read once: the bad fraction is known whatever the data size
        if all(self.empty_epoch):   # within max_bad_fraction (1.0), yet no step can ever come
            raise BadDataError(f"{self.where}: a whole epoch of every data source held no usable sample "
                               f"({bad_reasons(self.bad, distinct_counts(self.bad_keys))}); no step can be made")

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
            e: Entry = it.ref
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

    def _build(self, entries: list[Entry]) -> PackedBatch:
        """PackedBatch of decoded entries: prepared ones are finished straight into one pixel buffer per
        kind (shared memory in a worker), so every pixel is written once and never copied again."""
        bufs: dict[str, torch.Tensor | None] = {"image": None, "video": None}
        slices: list[dict[str, torch.Tensor]] = [{} for _ in entries]
        all_prepared = all(e.prepared is not None for e in entries)  # else some were encoded eagerly: concatenate
        for kind in bufs if all_prepared else ():
            rows = [e.prepared.patches(kind) for e in entries]
            if sum(rows):
                buf = bufs[kind] = pixel_buffer(sum(rows), entries[0].prepared.pixel_dim, self.shared_pixels)
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
        if not self.stream_ended:   # every sample was read: the bad fraction is known, however few they were
            self.stream_ended = True
            self._check_fraction()
        plan = self.packer.flush()
        if plan is None:
            return False
        self._add_plan(plan)
        return True

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

    def _restore_reading(self, st: dict) -> list[PackItem]:
        """Restore the reader position, shuffle buffer and packer counters; the packer's items, re-read."""
        self.stream.load_state(st["stream"])
        sh = st["shuffle"]
        self.buffer.load_state({"draws": sh["draws"], "buffer": [self._pos_in(x) for x in sh["buffer"]]},
                               self.limits)
        self.buffer.early_emits = int(st.get("shuffle_early_emits", 0))
        p = st["packer"]
        self.packer.plans, self.packer.emitted_bins = int(p["plans"]), int(p["emitted_bins"])
        self.packer.emitted_tokens = int(p["emitted_tokens"])
        raws = read_positions([self._pos_in(x) for x in p["items"]], self.limits)
        items = [self._restored_item(s, carried=int(x[3])) for s, x in zip(raws, p["items"])]
        return [it for it in items if it is not None]

    def _restored_item(self, s: RawSample, carried: int = 0) -> PackItem | None:
        """A packer item of a restored state, sized again (``_item``); None for one a mode drops (counted)."""
        return self._item(s, carried)

    def _restore_barrier(self, st: dict) -> None:
        """The epoch barrier's state (states saved before it existed: the epochs the stream is in)."""
        self.epoch_in = [int(x) for x in st.get("epochs_in", [self._source_epoch(k) for k in range(len(self.epoch_in))])]
        self.closing = {int(k) for k in st.get("closing", [])}
        self.held = read_positions([self._pos_in(x) for x in st.get("held", [])], self.limits)
        self.epoch_good = [1] * len(self.epoch_in)   # unknown before the restore: assumed usable
        self.stream_ended = bool(st.get("stream_ended", False))


class SplitPipeline(WorkerPipeline):
    """Per-rank splits (``SplitLoader``): reader split (rank, worker) of ``world_size x workers`` reads its share
    of the shards, packs a window of ``pack_window`` samples and emits its packs in order, one batch each, then
    ``(None, state)`` when its share ends (its final counts: samples skipped after its last batch)."""

    def __init__(self, *args: Any, **kw: Any):
        self.pending: deque[list[PackItem]] = deque()   # this reader's packs, in emission order
        super().__init__(*args, **kw)

    @property
    def where(self) -> str:
        return f"rank {self.rank} worker {self.worker} (reader split {self.split})"

    def _split(self) -> tuple[int, int]:
        return self.rank * self.W + self.worker, self.world * self.W

    def _new_packer(self) -> WindowPacker:
        return WindowPacker(self.cfg.micro_batch_tokens, self.cfg.pack_window, num_ranks=1, micro_batches_per_step=1,
                            cost_model=self.cfg.cost_model, seed=mix64(self.cfg.seed, self.split))

    def _item(self, s: RawSample, carried: int = 0) -> PackItem:
        """An encoder with ``estimate`` sizes the sample (exact, no pixel decoding) and it is encoded when its pack
        is built, so the window holds compressed samples, not ~10 MB of decoded pixels per clip."""
        if self.can_estimate:
            t, v = self._call("estimate", s.shard, s.key, s.key, s.members)
            return PackItem(s.key, int(t), int(v), Entry(s.position, s.members), carried)
        enc = self._encode(s.shard, s.key, s.members)
        return PackItem(s.key, enc.num_tokens, enc.num_vision_patches, Entry(s.position, None, enc), carried)

    def _add_plan(self, plan: list[list[list[PackItem]]]) -> None:
        self.pending.extend(plan[0])

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

    def __iter__(self) -> Iterator[tuple[Any, dict]]:
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
                yield None, self.state()   # the final counts (bad samples read after the last batch, or with none)
                return

    def state(self) -> dict:
        """Plain-data snapshot; samples are [shard index, ordinal in the shard, key]."""
        def pos(it: PackItem) -> list:
            return self._pos_out(it.ref.pos)

        shuffle = self.buffer.state
        shuffle["buffer"] = [self._pos_out(tuple(p)) for p in shuffle["buffer"]]
        extra = {"source_seen": list(self.source_seen)} if self.mixed else {}
        return extra | {
            "split": self.split, "num_splits": self.num_splits, "group_rank": 0,
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

    def _restore(self, st: dict) -> None:
        if (st["split"], st["num_splits"]) != (self.split, self.num_splits) or st.get("group_rank", 0):
            raise LoaderStateError(
                f"worker state is for reader split {st['split']}/{st['num_splits']} (group rank "
                f"{st.get('group_rank', 0)}) but this worker reads split {self.split}/{self.num_splits}")
        self.packer.items = self._restore_reading(st)
        for b in st["pending"]:
            raws = read_positions([self._pos_in(x) for x in b], self.limits)
            self.pending.append([PackItem(s.key, 0, 0, Entry(s.position, s.members)) for s in raws])
        self.counter, self.seen, self.batches = int(st["counter"]), int(st["seen"]), int(st["batches"])
        self.bad = Counter({k: int(v) for k, v in st["bad"].items()})
        self.bad_keys = self._keys_in(st.get("bad_keys", {}))
        self._restore_barrier(st)
        self.samples_out, self.overflow = int(st["samples_out"]), int(st["estimate_overflow"])
        if self.mixed:
            self.source_seen = [int(x) for x in st["source_seen"]]
