"""Global sample order (``TrainLoader``): the samples of a step depend on the data, the seed
and the global micro-batch count only -- not on the world size, the workers or the accumulation -- and
the layout-free state resumes on another layout with nothing lost or repeated."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from rynnscale.data.loader import LoaderConfig, LoaderStateError, SplitLoader, TrainLoader
from tests.data.test_loader_resume import ByteEncoder, write_text_shards


def _cfg(d: Path, **kw) -> LoaderConfig:
    base = dict(train_shards=[str(d / "shard-{000..003}.tar")], seed=3, micro_batch_tokens=300, pack_window=4,
                shuffle_buffer=6)
    return LoaderConfig(**(base | kw))


def _steps(loaders: list[TrainLoader], ga: int, n: int, its: list | None = None) -> list[list[str]]:
    """``n`` global steps of a layout (one loader per rank): sorted sample keys of each step."""
    its = its if its is not None else [iter(x) for x in loaders]
    out = []
    for _ in range(n):
        steps = [next(it) for it in its]
        assert all(len(st.micro_batches) == ga for st in steps)
        keys = [k for st in steps for b in st.micro_batches for k in b.sample_keys]
        assert sorted(k.split(":")[-1] for k in steps[0].samples) == sorted(keys)
        out.append(sorted(keys))
    return out


def _layout(d: Path, world: int, ga: int, workers: int = 0, **kw) -> list[TrainLoader]:
    return [TrainLoader(_cfg(d, micro_batches_per_step=ga, num_workers=workers, **kw), ByteEncoder(), rank=r,
                        world_size=world) for r in range(world)]


def test_steps_do_not_depend_on_layout(tmp_path: Path) -> None:
    write_text_shards(tmp_path, 4, 12)
    ref = _steps(_layout(tmp_path, 1, 4), 4, 8)                # 1 rank x grad_accum 4
    assert _steps(_layout(tmp_path, 2, 2), 2, 8) == ref         # 2 ranks x 2
    assert _steps(_layout(tmp_path, 4, 1, workers=2), 1, 8) == ref  # 4 ranks x 1, 2 workers each
    flat: list[str] = []                                        # steps within the first epoch (48 samples)
    for st in ref:
        if len(flat) + len(st) > 48:
            break
        flat += st
    assert flat and len(flat) == len(set(flat))


@pytest.mark.parametrize("balance", ["cost", "tokens", "none"])
def test_resume_on_another_layout(tmp_path: Path, balance: str) -> None:
    """2 ranks x ga 1 for 6 steps, then the state of rank 0 (with planned steps) continues on 1 rank x ga 2
    (and 2 workers) exactly like a straight 1-rank run; and the planned steps are re-packed when the step size
    changes: to the end of the epoch every sample is trained exactly once (nothing lost, nothing repeated)."""
    keys = write_text_shards(tmp_path, 4, 40)
    kw = dict(balance=balance, num_epochs=1, micro_batch_tokens=100, pack_window=8)   # plans of several steps
    straight = _steps(_layout(tmp_path, 1, 2, **kw), 2, 12)
    first = _layout(tmp_path, 2, 1, **kw)
    assert _steps(first, 1, 6) == straight[:6]
    sd = first[0].state_dict()
    assert sd == first[1].state_dict()   # the same on every rank
    assert sd["state"]["steps"], "the test wants a state with planned steps"
    resumed = _layout(tmp_path, 1, 2, workers=2, **kw)
    resumed[0].load_state_dict(sd)
    assert _steps(resumed, 2, 6) == straight[6:]
    # another global micro-batch count (4 per step): the epoch ends with every sample trained exactly once
    wider = _layout(tmp_path, 2, 2, **kw)
    for x in wider:
        x.load_state_dict(sd)
    after = [k for st in _to_the_end(wider, 2) for k in st]
    before = [k for st in straight[:6] for k in st]
    assert Counter(before + after) == Counter(keys)


def test_old_state_is_refused_clearly(tmp_path: Path) -> None:
    write_text_shards(tmp_path, 4, 12)
    old = SplitLoader(_cfg(tmp_path), ByteEncoder())
    next(iter(old))
    new = TrainLoader(_cfg(tmp_path), ByteEncoder())
    with pytest.raises(LoaderStateError, match="per-rank split loader"):
        new.load_state_dict(old.state_dict())


def test_epochs_are_not_periodic_and_cover_every_sample(tmp_path: Path) -> None:
    """3 epochs through the real loader: every sample exactly 3 times (the final flush included), and each
    epoch's order differs from the previous one (shard order and shuffle draws are reseeded per epoch)."""
    write_text_shards(tmp_path, 4, 12)
    loader = TrainLoader(_cfg(tmp_path, num_epochs=3), ByteEncoder())
    order = [k for st in loader for b in st.micro_batches for k in b.sample_keys]
    assert Counter(order) == Counter({k: 3 for k in set(order)}) and len(set(order)) == 48
    seen: Counter[str] = Counter()
    epochs: list[list[str]] = [[], [], []]
    for k in order:
        epochs[seen[k]].append(k)
        seen[k] += 1
    for a, b in zip(epochs, epochs[1:]):
        assert a != b
        rank_a = {k: i for i, k in enumerate(a)}
        shift = Counter(rank_a[k] - i for i, k in enumerate(b))
        assert shift.most_common(1)[0][1] < len(b) // 4, "epoch order is a shifted copy of the previous one"


def test_mixture_weights_and_elastic_resume(tmp_path: Path) -> None:
    """Global order with data.mixture: per-source shares hit the weights within 0.05 over >= 600 samples
    (binomial sd ~0.02), and a 2-rank state continues on 1 rank exactly."""
    from rynnscale.data.loader import MixtureSource
    from tests.data.test_mixture import SOURCES, source_of, write_source

    for i, (name, n, per, _) in enumerate(SOURCES):
        write_source(tmp_path, name, n, per, seed=i)
    mix = [MixtureSource(name, [str(tmp_path / name / "*.tar")], w) for name, _, _, w in SOURCES]

    def layout(world: int, ga: int) -> list[TrainLoader]:
        return _layout(tmp_path, world, ga, train_shards=[], mixture=mix)

    straight = _steps(layout(1, 2), 2, 66)
    share = Counter(source_of(k) for st in straight for k in st)
    total = sum(share.values())
    assert total >= 600
    for name, _, _, w in SOURCES:
        assert abs(share[name] / total - w) <= 0.05, (name, share[name] / total, w)
    first = layout(2, 1)
    assert _steps(first, 1, 5) == straight[:5]
    resumed = layout(1, 2)
    resumed[0].load_state_dict(first[1].state_dict())
    assert _steps(resumed, 2, 5) == straight[5:10]


def _uneven_shards(d: Path) -> tuple[set[str], set[str], set[str]]:
    """4 shards: short texts, texts of a whole budget's length (299 bytes: alone in a pack) some of them BAD,
    and texts whose size estimate is 40% low. -> (all keys, BAD keys, keys with a low estimate)."""
    rng = np.random.default_rng(7)
    keys, bad, low = set(), set(), set()
    for s in range(4):
        with wds.TarWriter(str(d / f"shard-{s:03d}.tar")) as w:
            for i in range(14):
                k = f"s{s}-{i:02d}"
                kind = i % 7
                if kind == 0:
                    text = ("BAD" if i % 2 == 0 else "OK ") + "x" * 296   # 299 tokens
                    bad |= {k} if text.startswith("BAD") else set()
                elif kind in (1, 2):
                    text = "L" + "y" * int(rng.integers(120, 200))
                    low.add(k)
                else:
                    text = (k + " ") * int(rng.integers(2, 12))
                w.write({"__key__": k, "conv.json": json.dumps({"text": text}).encode()})
                keys.add(k)
    return keys, bad, low


def _low_estimate(key: str, members: dict) -> tuple[int, int]:
    text = json.loads(members["conv.json"])["text"]
    n = len(text.encode())
    return (max(1, int(0.6 * n)) if text.startswith("L") else n), 0


@pytest.mark.parametrize(("world", "ga"), [(2, 1), (2, 2), (1, 3)])
def test_every_rank_yields_its_share_whatever_the_data_does(tmp_path: Path, world: int, ga: int) -> None:
    """Low size estimates (packs over the budget after encoding) and packs that go wholly bad do not change
    how many micro-batches a rank yields per step: the trainer's steps stay aligned with the loader's on
    every rank (the same step's samples), every micro-batch fits the budget, fillers take the slots of
    packs with nothing left, and over one epoch every good sample is trained exactly once unless counted
    as ``estimate_overflow``."""
    keys, bad, low = _uneven_shards(tmp_path)
    cfg = _cfg(tmp_path, micro_batches_per_step=ga, num_epochs=1, max_bad_fraction=1.0)
    loaders = [TrainLoader(cfg, ByteEncoder(), rank=r, world_size=world, cost_estimator=_low_estimate)
               for r in range(world)]
    its = [iter(x) for x in loaders]
    trained: list[str] = []
    steps = fillers = 0
    while True:
        got = [next(it, None) for it in its]
        if all(g is None for g in got):
            break
        assert all(g is not None for g in got), "ranks ended at different steps"
        assert all(len(g.micro_batches) == ga for g in got), "a rank yielded another number of micro-batches"
        steps += 1
        step_keys = {s.split(":")[-1] for s in got[0].samples}
        assert all(g.samples == got[0].samples and g.index == got[0].index for g in got)   # aligned
        for b in (b for g in got for b in g.micro_batches):
            b.validate()
            assert b.num_tokens <= 300
            fillers += b.filler
            assert not b.filler or (b.sample_keys == [] and b.num_tokens == 2)
            assert set(b.sample_keys) <= step_keys
            trained += b.sample_keys
    dropped = sum(x.bad_counts.get("estimate_overflow", 0) for x in loaders)
    overflowed = sum(x.stats()["estimate_overflow"] for x in loaders)
    assert steps > 3 and overflowed > 0                     # the low estimates did overflow packs
    assert len(trained) == len(set(trained)) and not set(trained) & bad
    assert len(trained) + len(bad) + dropped == len(keys) and set(trained) <= keys, [x.bad_counts for x in loaders]
    assert sum(x.stats()["filler_batches"] for x in loaders) == fillers
    if ga == 1:
        assert fillers > 0   # a rank whose only pack was one BAD sample
    print(f"world={world} ga={ga}: {steps} steps, {overflowed} packs overflowed, {dropped} samples dropped, "
          f"{fillers} fillers")


# -- epochs of data smaller than the packing window (issue 27.4) ---------------------------------------------


def _epoch_walk(steps: list[list[str]], keys: set[str]) -> int:
    """Assert that ``steps`` (sample keys per step, in order) run through whole epochs: every sample once per
    epoch, an epoch's last step before the next epoch's first (counts equal at every epoch end); returns the
    epochs completed."""
    left, done = set(keys), 0
    for i, st in enumerate(steps):
        assert len(st) == len(set(st)), f"step {i} trains a sample twice: {st}"
        if not left:
            left, done = set(keys), done + 1
        assert set(st) <= left, f"step {i} repeats {sorted(set(st) - left)} before the epoch trained {sorted(left)}"
        left -= set(st)
    return done + (not left)


@pytest.mark.parametrize("shuffle_buffer", [0, 4, 64])
@pytest.mark.parametrize(("world", "ga"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_small_data_set_trains_each_sample_once_per_epoch(tmp_path: Path, world: int, ga: int,
                                                          shuffle_buffer: int) -> None:
    """12 samples, a packing window of 16 x N samples and shuffle buffers of none, 4 and 64 samples: over 6
    epochs every epoch trains each sample exactly once (the next epoch's copies never join a window of the
    current one), so counts are equal after every epoch; the order is the same on every layout; with steps of
    <= 2 packs of ~2 samples no sample is in two consecutive steps and epochs are not replays of each other."""
    keys = set(write_text_shards(tmp_path, 2, 6))
    cfg = dict(train_shards=[str(tmp_path / "shard-*.tar")], micro_batch_tokens=100, pack_window=16,
               shuffle_buffer=shuffle_buffer)
    steps = _steps(_layout(tmp_path, world, ga, **cfg), ga, 60)
    n = world * ga
    if (world, ga) != (1, 1):   # the same global order as one rank accumulating
        assert steps == _steps(_layout(tmp_path, 1, n, **cfg), n, 60)
    flat = [k for st in steps for k in st]
    epochs = _epoch_walk(steps, keys)
    assert epochs >= 6 and len(flat) >= 6 * len(keys)
    if n <= 2:   # (4 micro-batches of ~2 samples: two steps hold more than the 12 samples)
        repeats = [i for i in range(1, len(steps)) if set(steps[i]) & set(steps[i - 1])]
        assert not repeats, [(steps[i - 1], steps[i]) for i in repeats]
        orders = {tuple(flat[e * len(keys):(e + 1) * len(keys)]) for e in range(6)}
        assert len(orders) >= 3, orders   # steps in another order each epoch, not a replay


def _to_the_end(loaders: list[TrainLoader], ga: int) -> list[list[str]]:
    """The remaining steps of a finite stream (sorted sample keys of each)."""
    its, out = [iter(x) for x in loaders], []
    while True:
        steps = [next(it, None) for it in its]
        if all(st is None for st in steps):
            return out
        assert all(st is not None and len(st.micro_batches) == ga for st in steps)
        out.append(sorted(k for st in steps for b in st.micro_batches for k in b.sample_keys))


def test_small_data_set_resumes_mid_epoch_on_any_layout(tmp_path: Path) -> None:
    """A state saved mid-epoch with planned steps continues exactly on the same micro-batch count and, on
    another one, re-packs the planned steps with nothing lost or repeated: over the 3 epochs every sample
    is trained 3 times, in whole epochs."""
    keys = set(write_text_shards(tmp_path, 2, 6))
    cfg = dict(train_shards=[str(tmp_path / "shard-*.tar")], micro_batch_tokens=100, pack_window=16,
               shuffle_buffer=4, num_epochs=3)
    straight = _to_the_end(_layout(tmp_path, 1, 2, **cfg), 2)
    assert _epoch_walk(straight, keys) == 3
    first = _layout(tmp_path, 2, 1, **cfg)
    before = _steps(first, 1, 5)
    assert before == straight[:5]
    sd = first[0].state_dict()
    assert sd["state"]["steps"], "the test wants a state with planned steps"
    assert sd["state"]["stream"]["epoch"] >= 1 and sum(map(len, before)) % len(keys), "... saved mid-epoch"
    same = _layout(tmp_path, 1, 2, **cfg)
    same[0].load_state_dict(sd)
    assert _to_the_end(same, 2) == straight[5:]
    for world, ga in ((2, 2), (1, 3)):   # 4 and 3 micro-batches per step instead of 2
        other = _layout(tmp_path, world, ga, **cfg)
        for x in other:
            x.load_state_dict(sd)
        after = _to_the_end(other, ga)
        assert Counter(k for st in before + after for k in st) == Counter({k: 3 for k in keys}), (world, ga)
        assert _epoch_walk(before + after, keys) == 3


def test_mixture_sources_cycle_whole_epochs(tmp_path: Path) -> None:
    """In a mixture every source cycles its own epochs: a source's next-epoch copies enter the packing window
    only after its current epoch left it, so each source's samples run through whole epochs (the 8- and
    12-sample sources more than 10 times in 80 steps), whatever the layout."""
    from rynnscale.data.loader import MixtureSource
    from tests.data.test_mixture import SOURCES, source_of, write_source

    keys = {name: set(write_source(tmp_path, name, n, per, seed=i)) for i, (name, n, per, _) in enumerate(SOURCES)}
    mix = [MixtureSource(name, [str(tmp_path / name / "*.tar")], w) for name, _, _, w in SOURCES]
    steps = _steps(_layout(tmp_path, 1, 2, train_shards=[], mixture=mix), 2, 80)
    assert _steps(_layout(tmp_path, 2, 1, train_shards=[], mixture=mix), 1, 80) == steps
    for name in keys:
        mine = [[k for k in st if source_of(k) == name] for st in steps]
        epochs = _epoch_walk([st for st in mine if st], keys[name])
        assert epochs >= (10 if name != "big" else 1), (name, epochs)
    repeats = sum(bool(set(a) & set(b)) for a, b in zip(steps, steps[1:]))
    print(f"{repeats} of {len(steps) - 1} consecutive step pairs share a sample")


def test_a_resume_on_another_layout_keeps_a_mixture_sources_epochs_apart(tmp_path: Path) -> None:
    """A mixture's saved steps can hold two plans, the end of a source's epoch and then its next epoch's copies;
    a resume at another N re-packed them as one group, putting both epochs' copies of a source in one step (a
    sample trained twice before its epoch ended). Each plan is now re-packed on its own: in every step, the
    samples of a source belong to one epoch, and the run still trains every sample exactly num_epochs times."""
    import copy

    from rynnscale.data.loader import MixtureSource
    from tests.data.test_mixture import write_source

    for i, (name, n) in enumerate([("asrc", 3), ("bsrc", 3), ("csrc", 8)]):
        write_source(tmp_path, name, 1, n, seed=i + 375)
    mix = [MixtureSource(n, [str(tmp_path / n / "*.tar")], w) for n, w in [("asrc", 0.3), ("bsrc", 0.3), ("csrc", 50.0)]]

    def steps(world: int, ga: int, sd: dict | None = None) -> tuple[list[list[str]], list[dict]]:
        cfg = LoaderConfig(mixture=mix, seed=65, micro_batch_tokens=100, pack_window=3, shuffle_buffer=0,
                           num_epochs=2, balance="tokens", micro_batches_per_step=ga)
        loaders = [TrainLoader(cfg, ByteEncoder(), rank=r, world_size=world) for r in range(world)]
        for loader in loaders:
            if sd is not None:
                loader.load_state_dict(copy.deepcopy(sd))
        out, sds = [], []
        for got in zip(*loaders):
            out.append([k for g in got for b in g.micro_batches if not b.filler for k in b.sample_keys])
            sds.append(loaders[0].state_dict())
        return out, sds

    straight, sds = steps(2, 1)
    resumed = straight[:7] + steps(2, 2, sd=sds[6])[0]     # after step 7, on grad_accum 2 (N 2 -> 4)
    for run in (straight, resumed):
        seen: Counter[str] = Counter()
        for step in run:
            epochs = {}
            for key in step:
                epochs.setdefault(key.rstrip("-0123456789"), set()).add(seen[key])
                seen[key] += 1
            assert all(len(e) == 1 for e in epochs.values()), (step, epochs)
        assert set(seen.values()) == {2} and len(seen) == 14


def test_shuffle_early_emits_are_counted_and_kept_across_a_resume(tmp_path: Path) -> None:
    """A byte-bounded shuffle buffer lets samples out early: the training loader's stats counted 0 (its state
    left the counter out), and a restore reset it."""
    write_text_shards(tmp_path, 4, 10)
    cfg = LoaderConfig(train_shards=[str(tmp_path / "*.tar")], micro_batch_tokens=100, pack_window=2,
                       shuffle_buffer=20, shuffle_buffer_bytes=200, num_epochs=1)
    loader = TrainLoader(cfg, ByteEncoder())
    it = iter(loader)
    next(it)
    early = loader.stats()["shuffle_early_emits"]
    assert early > 0
    again = TrainLoader(cfg, ByteEncoder())
    again.load_state_dict(loader.state_dict())
    assert again.stats()["shuffle_early_emits"] == early


@pytest.mark.parametrize("budget, window", [(50, 4), (200, 8)])
def test_resume_with_another_micro_batch_budget_loses_and_repeats_nothing(tmp_path: Path, budget: int,
                                                                          window: int) -> None:
    """A run that resumes with another ``train.micro_batch_tokens`` (lowered after an out-of-memory error) or
    ``data.pack_window`` was refused with a LoaderStateError traceback, so its checkpoints could not be continued at
    all. The samples drawn but not trained (packer window, planned steps) are sized again and re-packed, like a
    resume on another micro-batch count: to the end of the epoch each sample is trained exactly once, except those
    over the new budget, skipped and counted as too_long (a 12..72-token sample does not fit 50). A state saved
    before it recorded its budget (the fingerprint's value) loads the same way."""
    keys = write_text_shards(tmp_path, 4, 30)
    size = {k: len(text_of_key(tmp_path, k)) for k in keys}
    cfg = dict(num_epochs=1, micro_batch_tokens=100, pack_window=8, max_bad_fraction=1.0)
    first = _layout(tmp_path, 2, 1, **cfg)
    before = _steps(first, 1, 7)
    sd = json.loads(json.dumps(first[0].state_dict()))
    assert len(sd["state"]["steps"]) > 1 and sd["state"]["packer"]["items"], "the test wants planned steps, a window"
    old = json.loads(json.dumps(sd))   # as saved before: the budget in the fingerprint only
    del old["state"]["budget"]
    old["config"] |= {"micro_batch_tokens": 100, "pack_window": 8}
    for state in (sd, old):
        resumed = _layout(tmp_path, 1, 2, workers=2, **(cfg | dict(micro_batch_tokens=budget, pack_window=window)))
        resumed[0].load_state_dict(state)
        its = [iter(x) for x in resumed]
        after = []
        for st in its[0]:
            assert all(b.num_tokens <= budget for b in st.micro_batches)
            after.append(sorted(k for b in st.micro_batches for k in b.sample_keys))
        trained = [k for st in before + after for k in st]
        done = {k for st in before for k in st}
        too_long = {k for k in keys if k not in done and size[k] > budget}
        assert Counter(trained) == Counter({k: 1 for k in keys if k not in too_long})
        assert resumed[0].bad_counts == ({"too_long": len(too_long)} if too_long else {})
        assert bool(too_long) == (budget == 50)


def test_resume_with_a_smaller_budget_counts_skipped_samples_as_a_straight_run(tmp_path: Path) -> None:
    """After a resume with a smaller ``micro_batch_tokens`` the samples drawn but not trained are sized again and
    re-packed: no skipped sample may be counted twice (stream-level bad ones, too_long) or also trained. Over two
    epochs with every kind of bad sample, the run's counts (as logged with each step and as its final loader
    state carries them) are a straight run's at the new budget, but for the samples over it that the first leg
    trained legitimately at the old budget (one fewer too_long each, one more trained)."""
    from tests.data.test_loader_resume import add_bad_shards

    rng = np.random.default_rng(1)
    size = {}
    for s in range(4):
        with wds.TarWriter(str(tmp_path / f"shard-{s:03d}.tar")) as w:
            for i in range(16):
                k = f"s{s}-{i:02d}"
                text = ("BAD " if i % 7 == 3 else "") + (k + " ") * int(rng.integers(2, 12))   # 12..72 tokens
                w.write({"__key__": k, "conv.json": json.dumps({"text": text}).encode()})
                size[k] = len(text)
    add_bad_shards(tmp_path, 100)   # a bad member name, a rejected conversation, 101 tokens, a truncated tar

    def loader(budget: int, window: int = 8, workers: int = 0) -> TrainLoader:
        return TrainLoader(LoaderConfig(train_shards=[str(tmp_path / "shard-*.tar")], seed=3, shuffle_buffer=6,
                                        micro_batch_tokens=budget, pack_window=window, num_epochs=2,
                                        max_bad_fraction=1.0, micro_batches_per_step=2, num_workers=workers),
                           ByteEncoder())

    def keys(st) -> list[str]:
        return [k for b in st.micro_batches for k in b.sample_keys]

    straight = loader(50)
    straight_trained = Counter(k for st in straight for k in keys(st))
    first = loader(100)
    it = iter(first)
    before = [k for _ in range(4) for k in keys(next(it))]
    sd = json.loads(json.dumps(first.state_dict()))
    drawn = [x[2] for st in sd["state"]["steps"] for b in st for x in b] + [x[2] for x in sd["state"]["packer"]["items"]]
    assert any(size.get(k, 0) > 50 for k in drawn), "the test wants drawn samples over the new budget"
    resumed = loader(50, window=4, workers=2)
    resumed.load_state_dict(sd)
    steps = list(resumed)
    after = [k for st in steps for k in keys(st)]
    over = Counter(k for k in before if size.get(k, 0) > 50)   # trained at the old budget: not skipped as too_long
    assert over, "the test wants the first leg to train a sample over the new budget"
    assert Counter(before + after) == straight_trained + over
    want = Counter(straight.bad_counts)
    want.subtract({"too_long": sum(over.values())})
    assert steps[-1].bad == resumed.bad_counts == dict(+want)
    assert resumed.samples_seen == straight.samples_seen == sum(want.values()) + len(before) + len(after)
    bad_distinct = {k: v for k, v in resumed.bad_distinct.items() if k != "too_long"}
    assert bad_distinct == {k: v for k, v in straight.bad_distinct.items() if k != "too_long"}
    again = loader(50)   # what the final checkpoint carries
    again.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    assert again.bad_counts == dict(+want) and list(again) == []


def text_of_key(d: Path, key: str) -> str:
    """The text of sample ``key`` as written (its ByteEncoder token count is its byte length)."""
    shard = d / f"shard-{int(key[1:key.index('-')]):03d}.tar"
    for s in wds.WebDataset(str(shard), shardshuffle=False):
        if s["__key__"] == key:
            return json.loads(s["conv.json"])["text"]
    raise KeyError(key)


# -- manifest cost hints made with other encoder settings than the run's -----------------------------------


def test_cost_hints_made_with_other_settings_lose_no_sample(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Shards converted with the default encoder settings (the jsonl converter's cost hints), trained with a
    higher ``image_min_pixels``: every image is larger than its hint, and packs planned on the hints overflowed
    the budget once decoded (8 of 12 samples skipped as estimate_overflow). Such hints are now left unused (a
    warning names the setting) and every sample trains once; with a lower ``image_max_pixels`` the hints are
    upper bounds and are used (logged: packs may be part empty); with the same settings, silence."""
    import logging

    from PIL import Image

    from rynnscale.data.encode import EncoderConfig, SampleEncoder
    from rynnscale.data.manifest import read_manifest
    from rynnscale.data.tokenizer import load_tokenizer
    from rynnscale.data.vision_preprocess import VisionSpec
    from rynnscale.data_pipelines.jsonl import convert_jsonl

    (tmp_path / "media").mkdir()
    lines = []
    for i in range(12):
        Image.new("RGB", (64, 64), (20 * i, 100, 50)).save(tmp_path / "media" / f"{i}.jpg")
        lines.append(json.dumps({"conversation": [
            {"role": "user", "content": [{"type": "image", "image": f"{i}.jpg"}, {"type": "text", "text": "Where?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<object> (400, 200) </object>"}]}],
            "licence": "CC0-1.0"}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    convert_jsonl(tmp_path / "d.jsonl", out, media_root=tmp_path / "media", lines_per_shard=4, progress=False)
    hints = [t for s in read_manifest(out).shards for t in s.sample_costs["num_tokens"]]
    tok = load_tokenizer()

    def run(vision: VisionSpec) -> tuple[list[str], list[int], dict]:
        enc = SampleEncoder(tok, EncoderConfig(vision=vision, max_tokens=4096))
        loader = TrainLoader(LoaderConfig(train_shards=[str(out / "*.tar")], micro_batch_tokens=4096, pack_window=4,
                                          shuffle_buffer=0, num_epochs=1, max_bad_fraction=1.0), enc)
        batches = [b for st in loader for b in st.micro_batches if not b.filler]
        return ([k for b in batches for k in b.sample_keys], [int(n) for b in batches for n in b.cu_seqlens.diff()],
                loader.bad_counts)

    with caplog.at_level(logging.WARNING, logger="rynnscale.data.global_order"):
        keys, sizes, bad = run(VisionSpec(image_min_pixels=1_000_000))
    assert bad == {} and len(keys) == len(set(keys)) == 12
    assert min(sizes) > max(hints)   # the hints were low for every sample
    assert "vision.image_min_pixels: 65536, this run 1000000" in caplog.text and "not used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rynnscale.data.global_order"):
        keys, sizes, bad = run(VisionSpec(image_min_pixels=4096, image_max_pixels=16384))
    assert bad == {} and len(set(keys)) == 12 and max(sizes) < min(hints)
    assert "vision.image_max_pixels: 16777216, this run 16384" in caplog.text and "part empty" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rynnscale.data.global_order"):
        keys, sizes, bad = run(VisionSpec())
    assert bad == {} and len(set(keys)) == 12 and sorted(sizes) == sorted(hints)
    assert "cost hints" not in caplog.text


def test_a_cost_estimate_over_the_budget_skips_no_sample(tmp_path: Path) -> None:
    """``cost_estimator`` is a cheap guess: one over the budget (or below one token) for a sample that fits was
    final, and the sample was skipped as too_long (a 0 crashed the loader with a traceback naming no sample);
    now the encoder measures such a sample, and every sample of the epoch trains once. An estimator that fails
    is an error naming the shard and key."""
    keys = write_text_shards(tmp_path, 4, 12)   # ByteEncoder: every sample 4..70 tokens, within the budget of 300

    def rough(key: str, members: dict) -> tuple[int, int]:
        n = len(json.loads(members["conv.json"])["text"].encode())
        return (10 * n if key.endswith("3") else 0 if key.endswith("5") else n), 0

    loader = TrainLoader(_cfg(tmp_path, num_epochs=1), ByteEncoder(), cost_estimator=rough)
    trained = [k for st in loader for b in st.micro_batches for k in b.sample_keys]
    assert loader.bad_counts == {} and sorted(trained) == sorted(keys)

    def broken(key: str, members: dict) -> tuple[int, int]:
        raise KeyError("video.mp4")

    with pytest.raises(RuntimeError, match=r"cost_estimator failed on shard .*shard-00\d\.tar' key 's\d-\d\d'"):
        next(iter(TrainLoader(_cfg(tmp_path), ByteEncoder(), cost_estimator=broken)))


def test_hint_settings_from_a_hostile_manifest_neither_flood_the_log_nor_pass(tmp_path: Path) -> None:
    """``info.cost_hints.encoder`` is untrusted: a value of another type makes the hints unused (as another
    setting would), and the value is cut in the log line (a 100k-character string was logged whole)."""
    from rynnscale.data.encode import EncoderConfig
    from rynnscale.data.manifest import ManifestHints, sha256_file

    write_text_shards(tmp_path, 1, 3)
    shard = tmp_path / "shard-000.tar"
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": "rynnscale-shards", "version": 1, "info": {"cost_hints": {"encoder": {
            "fps": "x" * 100_000, "vision": [1, 2], "max_frames": 768}}},
        "shards": [{"name": shard.name, "num_samples": 3, "num_bytes": shard.stat().st_size,
                    "sha256": sha256_file(shard), "sample_costs": {"num_tokens": [5, 6, 7]}}]}))
    hints = ManifestHints(EncoderConfig().size_settings())
    assert hints.get(str(shard), 0) is None
    diff = hints.ignored[str(tmp_path)]
    assert [d.split(":")[0] for d in diff] == ["vision", "fps"] and max(map(len, diff)) < 400, diff
    assert ManifestHints().get(str(shard), 2) == (7, 0)   # an encoder without settings: hints as they are


def test_a_shard_order_that_changed_under_a_saved_state_is_refused(tmp_path: Path, monkeypatch) -> None:
    """The state keeps the position in an epoch's shard order, which numpy's seeded permutation recomputes on
    resume; numpy does not promise that permutation across versions, and another one made the resumed epoch
    read some shards twice and skip others, silently. The state now carries a digest of the order: a mid-epoch
    resume under another order is a clear error, and states without the digest still load."""
    import numpy as np

    from rynnscale.data import reader

    keys = write_text_shards(tmp_path, 4, 12)
    first = TrainLoader(_cfg(tmp_path, num_epochs=1), ByteEncoder())
    it = iter(first)
    before = [k for _ in range(3) for b in next(it).micro_batches for k in b.sample_keys]
    sd = first.state_dict()
    assert sd["state"]["stream"]["order_pos"] > 0, "the test wants a state saved mid-epoch"
    old = copy.deepcopy(sd)
    del old["state"]["stream"]["order"]   # saved before the digest
    resumed = TrainLoader(_cfg(tmp_path, num_epochs=1), ByteEncoder())
    resumed.load_state_dict(old)
    after = [k for st in resumed for b in st.micro_batches for k in b.sample_keys]
    assert Counter(before + after) == Counter(keys)

    numpy_order = reader.epoch_shard_order
    monkeypatch.setattr(reader, "epoch_shard_order",   # another numpy's draws: the same seed, another permutation
                        lambda n, seed, epoch, shuffle=True: list(np.roll(numpy_order(n, seed, epoch, shuffle), 1)))
    other = TrainLoader(_cfg(tmp_path, num_epochs=1), ByteEncoder())
    other.load_state_dict(sd)
    with pytest.raises(reader.ReaderStateError, match=r"shard order of epoch 0 is not the one the state was saved"):
        next(iter(other))
