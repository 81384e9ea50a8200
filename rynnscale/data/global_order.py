"""The global sample order: ONE layout-free plan of every training step, read by every rank.

Every (rank, worker) reads the whole stream (split 0 of 1, one shuffle buffer), sizes every sample (manifest
hints, else measured) and runs the same deterministic plan: FFD packing over a window of ``pack_window x N``
samples into steps of ``N = world_size x micro_batches_per_step`` packs. A step's packs go to ranks only
when the step is taken (``balance``), so the samples of step k depend on N alone; each rank decodes only its
own packs (media read by position). Worker w of W takes steps base+w, base+w+W, ... The state (stream
position, shuffle buffer, packer items, planned steps) is the same on every rank and loads at any world
size, worker count and accumulation; with another N the planned steps are re-packed on their own, so
nothing is lost or repeated. docs/data_loader.md has the whole design.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Iterator
from functools import cached_property

from rynnscale.batch import PackedBatch, filler_batch
from rynnscale.data.balance import CostModel, assign_equal_count
from rynnscale.data.encode import SampleError
from rynnscale.data.manifest import ManifestHints, size_settings
from rynnscale.data.packing import PackItem, WindowPacker
from rynnscale.data.reader import MediaReadError, RawSample, mix64, read_positions
from rynnscale.data.worker import Entry, WorkerPipeline, relative_names

log = logging.getLogger(__name__)

GLOBAL_STATE_VERSION = 2      # the layout-free state of the global order


def _sample_id(it: PackItem) -> tuple[str, int]:
    """A packed sample's identity: (shard path, ordinal in the shard)."""
    return it.ref.pos[0], it.ref.pos[1]


class GlobalPipeline(WorkerPipeline):
    """A worker's copy of the global plan; yields ``((this rank's micro-batches, step info), state)`` per step
    it takes (module docstring)."""

    def __init__(self, *args, **kw):
        self.steps: deque[list[list[PackItem]]] = deque()   # planned steps not yet taken
        self.step_plans: deque[int] = deque()   # ... the plan each came from (a re-pack keeps plans apart)
        self.plan_no = 0
        self.step_no = self.base = 0   # global steps taken from ``steps`` (all workers); at the restore
        self.bad_step: Counter[str] = Counter()  # bad samples found decoding this step's packs
        self.bad_step_keys: list[list] = []      # ... as [reason, shard #, ordinal]
        self.last_step: set[tuple[str, int]] = set()   # the samples of the last step taken
        self._warned_encode_estimate = False
        self._warned_hints: set[str] = set()   # shard directories whose hints were made with other settings
        self.resized = False   # restored from a state saved with another micro_batch_tokens
        super().__init__(*args, **kw)
        self.names = relative_names(self.shards)   # "<shard>:<key>" names of the sample log
        # stream-level bad samples are the same on every rank and worker: one of them names them
        self.log_stream_bad = self.rank == 0 and self.worker == 0

    @property
    def N(self) -> int:
        """Micro-batches of one global step."""
        return self.world * self.cfg.micro_batches_per_step

    @property
    def where(self) -> str:
        return f"rank {self.rank} worker {self.worker} (global order)"

    @property
    def defer_media(self) -> bool:   # media are read by position, by the rank that decodes them
        return self.cfg.defer_media

    def _split(self) -> tuple[int, int]:
        return 0, 1

    def _new_packer(self) -> WindowPacker:
        """Steps of N packs; which rank trains which pack is decided per step (``_assign``)."""
        cm = CostModel(1.0, 0.0, 0.0) if self.cfg.balance == "tokens" else self.cfg.cost_model
        return WindowPacker(self.cfg.micro_batch_tokens, self.cfg.pack_window * self.N, num_ranks=self.N,
                            micro_batches_per_step=1, cost_model=cm, seed=mix64(self.cfg.seed, 0))

    def _check_whole(self) -> bool:
        return min(self.epoch_in) >= 1 or self.stream_ended

    @cached_property
    def hints(self) -> ManifestHints:
        """The manifests' cost hints, of those made with this run's encoder settings (``ManifestHints``)."""
        return ManifestHints(size_settings(self.encoder))

    def _estimate(self, s: RawSample) -> tuple[int, int]:
        hint = self.hints.get(s.shard, s.index)
        d = os.path.dirname(s.shard)
        if d not in self._warned_hints and (d in self.hints.ignored or d in self.hints.upper_bounds):
            self._warned_hints.add(d)
            if self.log_stream_bad:
                ignored = d in self.hints.ignored   # (upper bounds: info, the samples they overstate may be few)
                log.log(logging.WARNING if ignored else logging.INFO,
                        "%s: the cost hints of %s were made with other data settings than this run's (%s), %s. "
                        "Convert the shards with this run's recipe (rynnscale data convert ... --recipe RECIPE.yaml "
                        "[key=value ...]) for hints that fit", self.where, d,
                        "; ".join(self.hints.ignored[d] if ignored else self.hints.upper_bounds[d]),
                        "under which samples may be larger than the hints say: they are not used, every sample is "
                        "measured instead, on every rank (slower)" if ignored else
                        "under which samples can only be smaller: packs planned on them may be part empty")
        if hint is not None and 1 <= hint[0] <= self.cfg.micro_batch_tokens:
            return hint  # the manifest is untrusted too: implausible hints are measured instead
        # measuring needs the media: every rank reads them for that, then lets them go (the window holds no
        # media whatever the world size; the rank that decodes the sample reads them again)
        members = s.members if s.deferred is None else self._read_deferred(s.shard, s.key, s.members, s.deferred)
        if self.estimator is not None:
            try:
                t, v = (int(x) for x in self.estimator(s.key, members))
            except SampleError:
                raise
            except Exception as e:
                raise RuntimeError(f"cost_estimator failed on shard {s.shard!r} key {s.key!r}: "
                                   f"{type(e).__name__}: {e}") from e
            if 1 <= t <= self.cfg.micro_batch_tokens:
                return t, v
            # a cheap estimate over the budget (or below one token) skips no sample: the encoder measures it
        if self.can_estimate:
            t, v = self._call("estimate", s.shard, s.key, s.key, members)
            return int(t), int(v)
        if not self._warned_encode_estimate and self.estimator is None:
            self._warned_encode_estimate = True
            log.warning("global order: shard %s has no per-sample cost hints and no cost_estimator was given: every "
                        "rank encodes every sample to measure it", s.shard)
        enc = self._encode(s.shard, s.key, members)
        return enc.num_tokens, enc.num_vision_patches

    def _item(self, s: RawSample, carried: int = 0) -> PackItem:
        """Sized by the manifest hint, else measured (``_estimate``); its members stay compressed (media deferred)
        until this rank decodes the sample, if its pack is this rank's."""
        t, v = self._estimate(s)
        return PackItem(s.key, t, v, Entry(s.position, s.members, deferred=s.deferred), carried)


    def _count_bad(self, reason: str, pos: tuple[str, int, str], detail: str, decoding: bool = False) -> None:
        """As ``WorkerPipeline._count_bad``; a sample found bad decoding this rank's pack is counted by this rank
        only and reported with the step (``TrainLoader`` sums them), since no other rank sees it."""
        if not decoding:
            super()._count_bad(reason, pos, detail)
            return
        self.bad_step[reason] += 1
        self.bad_step_keys.append([reason, self.shard_index[pos[0]], pos[1]])
        self._log_bad(reason, pos, detail)


    def _add_plan(self, plan: list[list[list[PackItem]]]) -> None:
        # plan[slot][i] is pack ``slot`` of the plan's step i (a short step is the plan's last)
        steps = [[p[i] for p in plan if i < len(p)] for i in range(max(len(p) for p in plan))]
        self.steps.extend(steps)
        self.step_plans.extend([self.plan_no] * len(steps))
        self.plan_no += 1
        self._step_before({_sample_id(it) for b in steps[-1] for it in b})

    def _step_before(self, ids: set[tuple[str, int]]) -> None:
        """The samples of the last step planned: the next plan keeps them out of its first step (the packer's
        ``avoid``), so a sample's copies of two epochs are not trained in consecutive steps."""
        self.packer.avoid = (lambda it: _sample_id(it) in ids) if ids else None

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
                            f"micro-batches of {budget} tokens have no room left for it (the size estimate was low: the "
                            "shards' manifest cost hints, made by another tokenizer?, or the cost_estimator)",
                            decoding=True)
        return bins, overflowed

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

    def __iter__(self) -> Iterator[tuple[tuple[list[PackedBatch], dict], dict]]:
        """Global order: every worker plans every step; worker w takes steps base + w, base + w + W, ...
        Samples move from the stream to the packer only between steps taken, so a state is never mid-sample."""
        src = iter(self.stream)
        while True:
            if self.steps:
                step = self.steps.popleft()
                self.step_plans.popleft()
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

    def state(self) -> dict:
        """Plain-data snapshot; samples are [shard index, ordinal in the shard, key]."""
        def pos(it: PackItem) -> list:
            return self._pos_out(it.ref.pos)

        # layout-free: nothing here depends on the rank, the world size or the worker
        shuffle = self.buffer.state
        shuffle["buffer"] = [self._pos_out(tuple(p)) for p in shuffle["buffer"]]
        return {
            "stream": self.stream.state, "shuffle": shuffle, "step_no": self.step_no, "N": self.N,
            "budget": self.cfg.micro_batch_tokens,
            "packer": {"plans": self.packer.plans, "emitted_bins": self.packer.emitted_bins,
                       "emitted_tokens": self.packer.emitted_tokens,
                       "items": [pos(it) + [it.carried] for it in self.packer.items]},
            "steps": [[[pos(it) + [it.num_tokens, it.vision_patches] for it in b] for b in st] for st in self.steps],
            "step_plans": [p - self.step_plans[0] for p in self.step_plans] if self.step_plans else [],
            "counter": self.counter, "seen": self.seen, "bad": dict(self.bad), "source_seen": list(self.source_seen),
            "bad_keys": self._keys_out(self.bad_keys), "epochs_in": list(self.epoch_in),
            "closing": sorted(self.closing), "held": [self._pos_out(x.position) for x in self.held],
            "last_step": sorted([self.shard_index[p], i] for p, i in self.last_step),
            "shuffle_early_emits": self.buffer.early_emits, "stream_ended": self.stream_ended,
        }


    def _restore(self, st: dict) -> None:
        """Continue from a state. Saved with another micro-batch count (``N``) or budget (``micro_batch_tokens``;
        states without it are the loader's): the planned steps are re-packed (``_repack``), and with another budget
        every sample drawn but not trained is sized again, a sample over the new budget skipped as ``too_long``."""
        self.log_stream_bad = self.rank == 0 and self.worker == 0   # (set again after the base class' __init__)
        self.counter, self.seen = int(st["counter"]), int(st["seen"])
        self.bad = Counter({k: int(v) for k, v in st["bad"].items()})
        self.bad_keys = self._keys_in(st.get("bad_keys", {}))
        saved_budget = int(st.get("budget", self.cfg.micro_batch_tokens))
        self.resized = saved_budget != self.cfg.micro_batch_tokens
        if self.resized and self.log_stream_bad:
            log.info("data: the state was saved with micro_batch_tokens=%d, this run has %d: the samples drawn but "
                     "not trained yet are sized again and re-packed (nothing lost or repeated; one that no longer "
                     "fits is skipped as too_long)", saved_budget, self.cfg.micro_batch_tokens)
        items = self._restore_reading(st)
        steps = []
        for saved in st["steps"]:
            bins = []
            for b in saved:
                raws = read_positions([self._pos_in(x) for x in b], self.limits)
                if self.resized:
                    sized = [self._restored_item(s) for s in raws]
                    bins.append([it for it in sized if it is not None])
                else:
                    bins.append([PackItem(s.key, int(x[3]), int(x[4]), Entry(s.position, s.members, deferred=s.deferred))
                                 for s, x in zip(raws, b)])
            steps.append(bins)
        self.packer.items = items
        self.step_no = self.base = int(st["step_no"])
        self.source_seen = [int(x) for x in st["source_seen"]]
        self._restore_barrier(st)
        self.last_step = {self._pos_in([*x, ""])[:2] for x in st.get("last_step", [])}
        same = int(st["N"]) == self.N and not self.resized
        self._step_before({_sample_id(it) for b in steps[-1] for it in b} if steps and same else self.last_step)
        plans = [int(x) for x in st.get("step_plans", [])]   # absent in states saved before plans were recorded
        plans = plans if len(plans) == len(steps) else [0] * len(steps)
        if same:
            self.steps, self.step_plans = deque(steps), deque(plans)
            self.plan_no = plans[-1] + 1 if plans else 0
        else:
            self._repack(steps, plans)

    def _restored_item(self, s: RawSample, carried: int = 0) -> PackItem | None:
        """A sample drawn but not trained, sized for this budget; after a resume with another
        ``micro_batch_tokens`` one that is bad or too long now is skipped and counted (None), as it would be
        arriving from the stream."""
        if not self.resized:
            return self._item(s, carried)
        try:
            it = self._item(s, carried)
        except SampleError as e:
            self._count_bad(e.reason, s.position, e.detail)
            return None
        except MediaReadError as e:
            self._count_bad("corrupt_tar", s.position, str(e))
            return None
        if it.num_tokens > self.cfg.micro_batch_tokens:
            self._count_bad("too_long", s.position, f"{it.num_tokens} tokens do not fit micro_batch_tokens="
                            f"{self.cfg.micro_batch_tokens} (the run resumed with a smaller budget)")
            return None
        return it

    def _repack(self, steps: list[list[list[PackItem]]], plans: list[int]) -> None:
        """Another number of micro-batches per step: the planned steps' samples become the first steps again,
        each plan's re-packed on its own (a plan never mixes a source's two epochs: the barrier), and in order a
        new group wherever a sample's copy of the next epoch follows (states without plan ids), so nothing is lost
        or repeated and the epoch barrier holds; each group's last re-packed step may be short."""
        groups: list[list[PackItem]] = [[]]
        ids: set[tuple[str, int]] = set()
        prev = plans[0] if plans else 0
        for plan, bins in zip(plans, steps):
            for it in (it for b in bins for it in b):
                if _sample_id(it) in ids or plan != prev:
                    groups.append([])
                    ids = set()
                    prev = plan
                groups[-1].append(PackItem(it.key, it.num_tokens, it.vision_patches, it.ref))
                ids.add(_sample_id(it))
        for items in groups:
            if items:
                p = self.packer
                tmp = WindowPacker(p.budget, p.window, num_ranks=p.num_ranks, cost_model=p.cost_model,
                                   seed=p.seed, max_carry=p.max_carry)
                tmp.items, tmp.plans, tmp.avoid = items, p.plans, p.avoid
                self._add_plan(tmp.flush())
