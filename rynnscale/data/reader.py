"""Streaming shard reader: pattern expansion, deterministic shard splits, tar streaming, shuffle buffer.

Shards are webdataset tars whose members are named ``{key}.{member}``; consecutive members with
the same key form one sample. Tars are untrusted input: every name goes through
``rynnscale.data.schema.split_tar_name`` (no path separators, ``..``, control characters, ...),
members are size-limited before their bytes are read, and a corrupt or truncated tar ends that
shard with one bad sample of reason ``corrupt_tar`` instead of crashing the run.

Determinism and resume. A sample is addressed by its *position* ``(shard path, ordinal, key)``:
the ordinal counts the key groups of the tar in order (bad groups included). The stream of one
reader split is a pure function of (shard list, seed, epoch, split): the shard order of an epoch
is a seeded permutation of all shards, split ``i`` of ``n`` takes ``order[i::n]`` (disjoint, and
every shard exactly once per epoch over all splits). ``ShardStream.state`` is (epoch, index in the
split's shard order, groups consumed in the current shard); ``ShuffleBuffer.state`` is a draw
counter plus the positions of its contents, which ``read_positions`` re-reads on restore.

Small shard sets. With ``sample_split=True`` a ShardStream over fewer shards than splits splits at
the sample level instead of raising: every split walks all shards of the epoch order and keeps
the groups whose ordinal ``i`` in the shard at order position ``p`` has ``(i + p) % n == split``
(the others are walked over by header only). Still disjoint, still every sample once per epoch.

Mixtures. ``MixtureStream`` interleaves one ShardStream per source (each split over the readers
on its own): draw ``n`` picks source ``k`` with probability ``weight_k / sum(weights)`` from
``mix64(seed, split, n)``, so its state is the draw counter plus every source's stream state.
Sources cycle independently (a small source starts its next epoch while a large one continues).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from braceexpand import braceexpand

from rynnscale.config.schema import ConfigError
from rynnscale.data.schema import SchemaError, member_kind, split_tar_name

log = logging.getLogger(__name__)

#: Reasons the reader reports for samples it cannot deliver (the encoder adds its own).
READER_REASONS = ("corrupt_tar", "bad_member", "too_large")

_GLOB_CHARS = set("*?[")
_MASK64 = (1 << 64) - 1


class ShardPatternError(ConfigError):
    """A shard pattern that matches no file (or is malformed): the recipe's setting, so a ``ConfigError`` (reported
    without a traceback, exit code 2)."""


class ReaderStateError(ValueError):
    """A saved reader/loader state that does not fit the shards or configuration at hand."""


class ShardIntegrityError(ValueError):
    """A shard's size (or sha256) differs from what the ``manifest.json`` beside it records."""


# dir -> {shard name: ShardInfo} (None: no readable manifest); (path, size, mtime_ns, hashed) already checked
_MANIFESTS: dict[str, dict | None] = {}
_VERIFIED: set[tuple[str, int, int, bool]] = set()


def verify_shard(path: str, verify_sha256: bool = False) -> None:
    """Check ``path`` against the manifest beside it (size always, sha256 if asked), once per process per
    (size, mtime). A shard the manifest does not list, or without a manifest, is not checked. A mismatch is a
    ``ShardIntegrityError`` naming the shard: the whole shard changed or is damaged since it was written, so
    skipping it sample by sample would hide a data problem (and shift every resume position in it)."""
    from rynnscale.data.manifest import ManifestError, read_manifest, sha256_file

    try:
        st = os.stat(path)
    except OSError:
        return   # iter_tar_samples reports an unopenable shard as corrupt_tar
    key = (path, st.st_size, st.st_mtime_ns, bool(verify_sha256))
    if key in _VERIFIED:
        return
    d = os.path.dirname(os.path.abspath(path))
    if d not in _MANIFESTS:
        try:
            _MANIFESTS[d] = read_manifest(d).by_name()
        except (ManifestError, OSError):
            _MANIFESTS[d] = None
    info = (_MANIFESTS[d] or {}).get(os.path.basename(path))
    if info is not None:
        if st.st_size != info.num_bytes:
            raise ShardIntegrityError(f"shard {path}: {st.st_size} bytes but its manifest.json records "
                                      f"{info.num_bytes}; the shard is truncated or was replaced (rewrite it or "
                                      "its manifest)")
        if verify_sha256:
            got = sha256_file(path)
            if got != info.sha256:
                raise ShardIntegrityError(f"shard {path}: sha256 {got} but its manifest.json records {info.sha256} "
                                          "(data.verify_shards=true); the shard is corrupt or was replaced")
    _VERIFIED.add(key)


# ----------------------------------------------------------------------------- shard patterns


def expand_shard_patterns(patterns: str | Sequence[str]) -> list[str]:
    """Paths, globs and webdataset brace patterns (``shard-{000..009}.tar``) -> shard paths.

    Brace patterns are expanded first, then each result is globbed if it holds ``* ? [``
    (matches sorted) or must name an existing file or directory. A directory (what ``rynnscale data
    convert`` writes) means its shards: those its ``manifest.json`` lists, in manifest order, else its
    ``*.tar`` files sorted. Order follows the patterns; a file listed twice (also through a symlink) is kept
    once. Raises
    ShardPatternError naming the pattern that matched nothing."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not patterns:
        raise ShardPatternError("no shard patterns given (data.train_shards is empty)")
    out: list[str] = []
    seen: set[str] = set()
    for pat in patterns:
        pat = os.fspath(pat)
        try:
            expanded = list(braceexpand(pat))
        except Exception as e:  # braceexpand raises on unbalanced braces
            raise ShardPatternError(f"shard pattern {pat!r} is malformed: {e}") from None
        found: list[str] = []
        for p in expanded:
            p = os.path.expanduser(p)
            if _GLOB_CHARS & set(p):
                found.extend(m for m in sorted(glob.glob(p)) if os.path.isfile(m))
            elif os.path.isfile(p):
                found.append(p)
            elif os.path.isdir(p):
                found.extend(_directory_shards(p))
            elif len(expanded) > 1:
                raise ShardPatternError(f"shard pattern {pat!r}: expanded name {p!r} is not a file")
        if not found:
            raise ShardPatternError(f"shard pattern {pat!r} matches no file")
        for p in found:
            ap, real = os.path.abspath(p), os.path.realpath(p)
            if real not in seen:   # the same file, whatever path (a symlinked directory) reaches it
                seen.add(real)
                out.append(ap)
    return out


_WARNED_INCOMPLETE: set[str] = set()


def _directory_shards(d: str) -> list[str]:
    """The shards of directory ``d``: its manifest's (all must exist), else its ``*.tar`` sorted."""
    from rynnscale.data.manifest import MANIFEST_NAME, ManifestError, read_manifest

    if os.path.isfile(os.path.join(d, MANIFEST_NAME)):
        try:
            m = read_manifest(d)
            names = [s.name for s in m.shards]
        except ManifestError as e:
            raise ShardPatternError(f"shard directory {d!r}: {e}") from None
        missing = [n for n in names if not os.path.isfile(os.path.join(d, n))]
        if missing:
            raise ShardPatternError(f"shard directory {d!r}: its {MANIFEST_NAME} lists {missing[0]} but that file is "
                                    f"missing ({len(missing)} of {len(names)} listed shards missing); re-run the "
                                    "conversion into this directory (it resumes) or name the shards with a glob")
        if not names:
            raise ShardPatternError(f"shard directory {d!r}: its {MANIFEST_NAME} lists no shard")
        if m.info.get("complete") is False and d not in _WARNED_INCOMPLETE:
            _WARNED_INCOMPLETE.add(d)
            log.warning("shard directory %s: its conversion did not finish (%s says complete: false): reading the %d "
                        "shards written so far; run the conversion again to finish it", d, MANIFEST_NAME, len(names))
        return [os.path.join(d, n) for n in names]
    tars = sorted(m for m in glob.glob(os.path.join(glob.escape(d), "*.tar")) if os.path.isfile(m))
    if not tars:
        raise ShardPatternError(f"shard directory {d!r} holds no {MANIFEST_NAME} and no *.tar file")
    return tars


# ----------------------------------------------------------------------------- deterministic randomness


def mix64(*values: int) -> int:
    """Counter-based 64-bit hash (splitmix64 chain): the loader's only source of randomness,
    so a random draw is a pure function of (seed, stream, counter) and state is just a counter."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h


def epoch_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The epoch's order of all shard indices: a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return list(range(num_shards))
    rng = np.random.Generator(np.random.PCG64(mix64(seed, epoch, 0x5A4D)))
    return [int(i) for i in rng.permutation(num_shards)]


def order_digest(order: Sequence[int]) -> str:
    """A short digest of a seeded order that a resume state's position indexes (the shard order of an epoch, GRPO's
    prompt order): saved with the position, it tells a resume whether it recomputed the same order (numpy does
    not promise a seeded permutation's stream across versions)."""
    return hashlib.sha256(",".join(str(int(i)) for i in order).encode()).hexdigest()[:16]


def split_shard_order(order: Sequence[int], split: int, num_splits: int) -> list[int]:
    """Split ``split`` of ``num_splits``: every ``num_splits``-th shard of the epoch order."""
    if not 0 <= split < num_splits:
        raise ValueError(f"split {split} is outside [0, {num_splits})")
    return list(order[split::num_splits])


# ----------------------------------------------------------------------------- tar streaming


@dataclass(frozen=True)
class ReaderLimits:
    """How untrusted tars are read. Size limits are checked from the headers before any bytes are read
    (``data.max_member_bytes`` / ``data.max_sample_bytes``). Only plain tars are read: a member of a
    gzip / bzip2 / xz / zstd shard can expand ~1000x from a few KiB on disk, so compressed shards are
    refused (one ``corrupt_tar`` of reason text ``compressed``), as are GNU sparse members.

    ``defer_media``: media members (videos, frames) are not read while walking the tar; the sample
    carries where their bytes lie (:class:`DeferredMedia`) and :func:`read_deferred` fetches them by
    random access when the sample is decoded. The global-order loader uses it so a rank reads only its
    own samples' media (``data.defer_media``). Everything else is the same either way: the same samples,
    bad reasons and keys, and :func:`sample_bytes` counts deferred bytes too, so shuffles do not change."""

    max_member_bytes: int = 1 << 30      # one member
    max_sample_bytes: int = 2 << 30      # all members of one sample
    max_members: int = 4096              # members of one sample (frame sequences can be long)
    verify_sha256: bool = False          # data.verify_shards: hash each shard against its manifest.json once
    defer_media: bool = False            # record media members' byte ranges instead of reading them


class MediaReadError(ValueError):
    """Deferred media could not be read back (the shard shrank, changed or cannot be opened)."""


@dataclass(frozen=True)
class DeferredMedia:
    """Media members of a sample that were not read: ``spans`` is ((member, data offset, size), ...) in
    the shard, whose size was ``shard_bytes`` when it was walked (a rewritten shard is detected)."""

    shard_bytes: int
    spans: tuple[tuple[str, int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(size for _, _, size in self.spans)


def read_deferred(shard: str, media: DeferredMedia) -> dict[str, bytes]:
    """The bytes of deferred media members, read by position; raises MediaReadError naming the shard."""
    where = os.path.basename(shard)
    out: dict[str, bytes] = {}
    try:
        with open(shard, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != media.shard_bytes:
                raise MediaReadError(f"shard {where} has {size} bytes, {media.shard_bytes} when it was indexed: "
                                     f"it changed while being read")
            for member, offset, n in media.spans:
                f.seek(offset)
                data = f.read(n)
                if len(data) != n:
                    raise MediaReadError(f"{where}: member {member!r} is truncated ({len(data)} of {n} bytes)")
                out[member] = data
    except OSError as e:
        raise MediaReadError(f"cannot read media from shard {where}: {e}") from e
    return out


@dataclass
class RawSample:
    """One key group of a tar: ``members`` maps member name (``conv.json``) -> bytes.

    ``bad_reason`` is set (one of READER_REASONS) when the group cannot be used; ``members`` is
    then empty and ``bad_detail`` says why."""

    shard: str
    index: int
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    bad_reason: str | None = None
    bad_detail: str = ""
    deferred: DeferredMedia | None = None   # media members not read yet (ReaderLimits.defer_media)

    @property
    def position(self) -> tuple[str, int, str]:
        return (self.shard, self.index, self.key)

    @property
    def is_bad(self) -> bool:
        return self.bad_reason is not None


def _raw_key(name: str) -> str:
    """Group key of a tar entry name: everything before the first dot (webdataset style)."""
    return name.split(".", 1)[0]


def _printable_key(raw: str) -> str:
    return raw if raw.isprintable() and len(raw) <= 128 else repr(raw[:128])


class _Group:
    """Members of one key group being collected."""

    __slots__ = ("key", "members", "nbytes", "bad_reason", "bad_detail", "refs", "spans")

    def __init__(self, key: str):
        self.key = key
        self.members: dict[str, bytes] = {}
        self.spans: dict[str, tuple[int, int]] = {}   # deferred media: member -> (data offset, size)
        self.nbytes = 0
        self.bad_reason: str | None = None
        self.bad_detail = ""
        self.refs: set[str] | None = None   # media members conv.json names, once it was read (None: unknown)

    def fail(self, reason: str, detail: str) -> None:
        if self.bad_reason is None:
            self.bad_reason, self.bad_detail = reason, detail
            self.members = {}
            self.spans = {}


def iter_tar_samples(path: str, limits: ReaderLimits = ReaderLimits(), start: int = 0,
                     wanted: set[int] | None = None, every: tuple[int, int] | None = None,
                     verify: bool = True) -> Iterator[RawSample]:
    """Stream the key groups of one tar in order, as RawSamples with their ordinal ``index``.

    Groups before ``start`` (or not in ``wanted``, or with ``index % every[0] != every[1]``) are
    walked over without reading their bytes.
    Never raises on bad data: an unreadable/corrupt/truncated tar yields a ``corrupt_tar`` sample
    (the group being read when the damage was found) and stops; unsafe names, links and
    duplicates give ``bad_member``; size limits ``too_large``. Unknown but safe member names
    are dropped (the encoder only reads members the schema knows)."""
    max_wanted = max(wanted) if wanted else None
    where = os.path.basename(path)

    def keep(i: int) -> bool:
        return i >= start and (wanted is None or i in wanted) and (every is None or i % every[0] == every[1])

    shard_bytes = 0

    def emit(g: _Group, i: int) -> RawSample:
        deferred = DeferredMedia(shard_bytes, tuple((m, o, n) for m, (o, n) in g.spans.items())) if g.spans else None
        return RawSample(path, i, _printable_key(g.key), g.members, g.bad_reason, g.bad_detail, deferred)

    if verify:   # off only for tools that report manifest mismatches themselves (data inspect)
        verify_shard(path, limits.verify_sha256)   # raises ShardIntegrityError: a manifest mismatch is not per-sample
    compressed = _compression(path)
    if compressed is not None:
        if keep(0):
            yield RawSample(path, 0, "<shard>", {}, "corrupt_tar",
                            f"shard {where} is {compressed}-compressed: only plain tar shards are read (a member of a "
                            f"compressed tar can expand ~1000x past the size checks; decompress the shard first)")
        return
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        if keep(0):
            yield RawSample(path, 0, "<shard>", {}, "corrupt_tar", f"cannot open tar: {e}")
        return
    index, group = -1, None
    keys_seen: set[str] = set()
    with tf:
        try:
            shard_bytes = os.fstat(tf.fileobj.fileno()).st_size
        except (OSError, AttributeError, ValueError):
            shard_bytes = -1   # unknown: read_deferred then reports the shard as changed
        try:
            while (ti := tf.next()) is not None:
                tf.members.clear()  # tarfile keeps every header it read; a shard can have millions
                if ti.isdir():
                    continue
                raw = _raw_key(ti.name)
                if group is None or raw != group.key:
                    if group is not None and keep(index):
                        yield emit(group, index)
                    if max_wanted is not None and index >= max_wanted:
                        return
                    index += 1
                    group = _Group(raw)
                    if raw in keys_seen:
                        group.fail("bad_member", f"key {_printable_key(raw)!r} appears twice in the shard")
                    keys_seen.add(raw)
                if group.bad_reason is not None or not keep(index):
                    continue  # groups we do not deliver are walked over without reading their data
                _add_member(tf, ti, group, limits, where)
            end_problem = _check_end_of_archive(tf)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            i = max(index, 0)
            if keep(i):
                bad = _Group(group.key if group is not None else "<shard>")
                bad.fail("corrupt_tar", f"tar is corrupt or truncated: {e}")
                yield emit(bad, i)
            return
    if end_problem is not None:
        # tarfile stopped early without an error: the last group may be cut, so it is the bad one
        i = max(index, 0)
        if keep(i):
            bad = _Group(group.key if group is not None else "<shard>")
            bad.fail("corrupt_tar", end_problem)
            yield emit(bad, i)
    elif group is not None and keep(index):
        yield emit(group, index)


_COMPRESSION_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
                      (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "lz4"))


def _compression(path: str) -> str | None:
    """The compression a shard's first bytes announce (None: plain or unreadable, tarfile reports those)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head[257:262] == b"ustar":   # a plain tar header (whatever its first member's name starts with)
        return None
    return next((name for magic, name in _COMPRESSION_MAGIC if head.startswith(magic)), None)


def _add_member(tf: tarfile.TarFile, ti: tarfile.TarInfo, group: _Group, limits: ReaderLimits, where: str) -> None:
    """Validate one tar entry and add its bytes to ``group`` (or mark the group bad)."""
    try:
        _, member = split_tar_name(ti.name, allow_unknown=True, where=where)
    except SchemaError as e:
        group.fail("bad_member", str(e))
        return
    if not ti.isreg() or ti.issparse():   # isreg() is True for GNU sparse members, which expand on read
        group.fail("bad_member", f"{where}: member {ti.name!r} is not a regular file (tar type {ti.type!r}"
                                 f"{', sparse' if ti.issparse() else ''})")
        return
    if member in group.members or member in group.spans:
        group.fail("bad_member", f"{where}: member {ti.name!r} appears twice")
        return
    if ti.size > limits.max_member_bytes:
        group.fail("too_large", f"{where}: member {ti.name!r} has {ti.size} bytes, limit {limits.max_member_bytes}")
        return
    group.nbytes += ti.size
    if group.nbytes > limits.max_sample_bytes:
        group.fail("too_large", f"{where}: sample has more than {limits.max_sample_bytes} bytes")
        return
    if len(group.members) + len(group.spans) >= limits.max_members:
        group.fail("too_large", f"{where}: sample has more than {limits.max_members} members")
        return
    kind = member_kind(member)
    if kind is None:
        return  # safe but not part of the schema: dropped
    if kind in ("video", "frame") and group.refs is not None and member not in group.refs:
        return  # media that the sample's conv.json (read before it) never names: skipped, payload not read
    if kind in ("video", "frame") and limits.defer_media:
        group.spans[member] = (ti.offset_data, ti.size)   # read by position when the sample is decoded
        return
    f = tf.extractfile(ti)
    data = f.read() if f is not None else b""
    if len(data) != ti.size:
        raise tarfile.ReadError(f"member {ti.name!r} is truncated ({len(data)} of {ti.size} bytes)")
    group.members[member] = data
    if kind == "conv":
        group.refs = _media_refs(data, group.key)


def _media_refs(conv: bytes, key: str) -> set[str] | None:
    """Member names the media items of a ``conv.json`` reference (None when it does not parse: then every
    member is read and the encoder reports the bad JSON)."""
    try:
        msgs = json.loads(conv).get("conversation")
        refs: set[str] = set()
        for m in msgs:
            content = m.get("content")
            for item in content if isinstance(content, list) else ():
                for kind in ("image", "video"):
                    ref = item.get(kind) if isinstance(item, dict) else None
                    for name in ref if isinstance(ref, list) else [ref]:
                        if isinstance(name, str):
                            refs.add(name[len(key) + 1:] if name.startswith(key + ".") else name)
        return refs
    except (ValueError, TypeError, AttributeError, RecursionError, UnicodeDecodeError):
        return None


def _check_end_of_archive(tf: tarfile.TarFile) -> str | None:
    """tarfile stops silently at a truncated or invalid header after the first member. A
    well-formed archive ends with a zero block followed only by zeros; anything else is corrupt."""
    f = tf.fileobj
    try:
        f.seek(tf.offset)
        block = f.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE:
            return f"tar ends without an end-of-archive block at byte {tf.offset} (truncated)"
        if block.count(0) != len(block):
            return f"invalid tar header at byte {tf.offset}"
        while chunk := f.read(1 << 16):
            if chunk.count(0) != len(chunk):
                return f"non-zero data after the end-of-archive block (from byte {tf.offset})"
    except (OSError, EOFError, zlib.error) as e:
        return f"cannot read the end of the tar: {e}"
    return None


def read_positions(positions: Sequence[tuple[str, int, str]], limits: ReaderLimits = ReaderLimits()
                   ) -> list[RawSample]:
    """Re-read samples by position (restore of shuffle buffers / carry-over); same order as given.

    Raises ReaderStateError when a shard no longer holds the sample (missing file, fewer groups
    or a different key): the data changed since the state was saved."""
    by_shard: dict[str, set[int]] = {}
    for shard, idx, _ in positions:
        by_shard.setdefault(shard, set()).add(int(idx))
    got: dict[tuple[str, int], RawSample] = {}
    for shard, wanted in by_shard.items():
        if not os.path.isfile(shard):
            raise ReaderStateError(f"cannot restore loader state: shard {shard!r} no longer exists")
        for s in iter_tar_samples(shard, limits, wanted=wanted):
            got[(shard, s.index)] = s
    out = []
    for shard, idx, key in positions:
        s = got.get((shard, int(idx)))
        if s is None or s.key != key:
            found = "nothing" if s is None else f"key {s.key!r}"
            raise ReaderStateError(
                f"cannot restore loader state: shard {shard!r} sample #{idx} should be key {key!r} but holds "
                f"{found}; the shards changed since the state was saved")
        out.append(s)
    return out


# ----------------------------------------------------------------------------- the split stream


class ShardStream:
    """Endless (or ``epochs``-long) stream of RawSamples from one split of the shards.

    ``split`` / ``num_splits`` identify the reader among all readers that share the data (e.g.
    rank * workers + worker). Every epoch reshuffles the shard order with (seed, epoch).
    Fewer shards than splits raise ShardPatternError unless ``sample_split`` (then every split
    reads every ``num_splits``-th sample of every shard, see the module docstring). ``name``
    (e.g. a mixture source) prefixes error messages."""

    def __init__(self, shards: Sequence[str], *, seed: int, split: int, num_splits: int, shuffle: bool = True,
                 epochs: int | None = None, limits: ReaderLimits = ReaderLimits(), sample_split: bool = False,
                 name: str = ""):
        if num_splits < 1 or not 0 <= split < num_splits:
            raise ValueError(f"split {split} of {num_splits} is invalid")
        self.where = f"source {name!r}: " if name else ""
        if not shards:
            raise ShardPatternError(f"{self.where}no shards given")
        if len(shards) < num_splits and not sample_split:
            raise ShardPatternError(
                f"{self.where}{len(shards)} shards cannot feed {num_splits} readers (ranks x dataloader workers); "
                f"every reader needs at least one shard: write more, smaller shards or use fewer workers")
        self.shards = list(shards)
        self.seed, self.split, self.num_splits = seed, split, num_splits
        self.shuffle, self.epochs, self.limits = shuffle, epochs, limits
        self.strided = len(self.shards) < num_splits   # sample-level split (only reachable with sample_split)
        self.epoch = 0
        self.order_pos = 0      # index into this split's shard list of the current epoch
        self.in_shard = 0       # groups of the current shard already delivered
        self._digest: tuple[int, str] = (-1, "")   # (epoch, digest of its shard order)

    def split_shards(self, epoch: int) -> list[str]:
        """The shards this split reads in ``epoch`` (all of them, in epoch order, when strided)."""
        order = epoch_shard_order(len(self.shards), self.seed, epoch, self.shuffle)
        if self.strided:
            return [self.shards[i] for i in order]
        return [self.shards[i] for i in split_shard_order(order, self.split, self.num_splits)]

    def _every(self) -> tuple[int, int] | None:
        """Sample filter for the shard at ``order_pos`` when strided: ordinal i with (i + pos) % n == split."""
        return (self.num_splits, (self.split - self.order_pos) % self.num_splits) if self.strided else None

    def _order_digest(self, epoch: int) -> str:
        """A digest of ``epoch``'s shard order (cached per epoch): the state's position indexes that order."""
        if self._digest[0] != epoch:
            self._digest = (epoch, order_digest(epoch_shard_order(len(self.shards), self.seed, epoch, self.shuffle)))
        return self._digest[1]

    @property
    def state(self) -> dict:
        return {"epoch": self.epoch, "order_pos": self.order_pos, "in_shard": self.in_shard,
                "order": self._order_digest(self.epoch)}

    def load_state(self, st: dict) -> None:
        """Continue at the saved position; ReaderStateError if it is inside an epoch whose shard order is now
        another (numpy's seeded permutation is not promised across numpy versions: the position would point
        into another order, reading some shards of the epoch twice and skipping others). States saved before
        the digest load unchecked."""
        self.epoch, self.order_pos, self.in_shard = int(st["epoch"]), int(st["order_pos"]), int(st["in_shard"])
        saved = st.get("order")
        if saved is not None and (self.order_pos or self.in_shard) and saved != self._order_digest(self.epoch):
            raise ReaderStateError(
                f"{self.where}the shard order of epoch {self.epoch} is not the one the state was saved with (the same "
                f"seed and shards give another permutation: numpy {np.__version__} draws differently from the numpy "
                "that saved it?); continuing would read some shards of this epoch twice and skip others. Resume "
                "with the numpy version the run was saved with")

    def __iter__(self) -> Iterator[RawSample]:
        while self.epochs is None or self.epoch < self.epochs:
            mine = self.split_shards(self.epoch)
            resumed_mid_epoch = self.order_pos > 0 or self.in_shard > 0
            delivered = 0
            while self.order_pos < len(mine):
                shard = mine[self.order_pos]
                for s in iter_tar_samples(shard, self.limits, start=self.in_shard, every=self._every()):
                    self.in_shard = s.index + 1
                    delivered += 1
                    yield s
                self.order_pos += 1
                self.in_shard = 0
            # an endless stream over empty shards would loop forever; a finite one (evaluation: one epoch) just
            # ends -- a held-out set smaller than the ranks leaves some empty, and they must still take part
            if delivered == 0 and not resumed_mid_epoch and self.epochs is None:
                names = ", ".join(os.path.basename(p) for p in mine)
                if self.strided:
                    raise ShardPatternError(
                        f"{self.where}reader split {self.split}/{self.num_splits} got no samples in epoch {self.epoch}: "
                        f"its {len(mine)} shards ({names}) are fewer than the {self.num_splits} readers, so each reader "
                        f"takes every {self.num_splits}-th sample, and they hold too few samples for that")
                raise ShardPatternError(f"{self.where}reader split {self.split}/{self.num_splits}: its shards hold no "
                                        f"samples at all ({names})")
            self.epoch += 1
            self.order_pos = 0


def source_seed(seed: int, k: int) -> int:
    """Shard-order seed of mixture source ``k``: source 0 uses the run seed (so a one-source
    mixture reads exactly like ``train_shards``), the others independent hashes of it."""
    return seed if k == 0 else mix64(seed, 0x50BCE, k)


class MixtureStream:
    """Weighted interleaving of one ShardStream per mixture source, for one reader split.

    ``sources`` is ``[(name, weight, shards)]``. Draw ``n`` takes the next sample of source ``k``
    with probability ``weight_k / sum(weights of live sources)``, from the 53-bit uniform
    ``mix64(seed, split, 0x4D1C, n)``; the state is the draw counter, per-source draw counts and
    exhausted flags, and every source's ShardStream state (plain JSON data, no RNG object).
    Each source is split over ``num_splits`` readers on its own (sample-level when it has fewer
    shards than readers) and cycles through its epochs independently. With ``epochs`` set, a
    source that finished its epochs drops out and the draw is repeated (same counter) over the
    remaining ones; the stream ends when every source is done, so each sample is read exactly
    ``epochs`` times and only the interleaving follows the weights."""

    def __init__(self, sources: Sequence[tuple[str, float, Sequence[str]]], *, seed: int, split: int, num_splits: int,
                 shuffle: bool = True, epochs: int | None = None, limits: ReaderLimits = ReaderLimits()):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.names = [str(n) for n, _, _ in sources]
        self.weights = [float(w) for _, w, _ in sources]
        for name, w in zip(self.names, self.weights):
            if not (w > 0 and w < float("inf")):
                raise ValueError(f"mixture source {name!r} has weight {w!r}; weights must be finite and > 0")
        if sum(self.weights) == float("inf"):
            raise ValueError(f"mixture weights {self.weights} sum to inf; only their ratios matter: scale them down")
        self.seed, self.split = seed, split
        self.streams = [ShardStream(shards, seed=source_seed(seed, k), split=split, num_splits=num_splits,
                                    shuffle=shuffle, epochs=epochs, limits=limits, sample_split=True, name=name)
                        for k, (name, _, shards) in enumerate(sources)]
        self.draws = 0
        self.taken = [0] * len(sources)          # samples delivered per source
        self.exhausted = [False] * len(sources)  # finished all its epochs (only with ``epochs``)

    def pick(self, n: int) -> int:
        """The source of draw ``n`` among the live sources (pure function of n and the live set)."""
        live = [k for k in range(len(self.weights)) if not self.exhausted[k]]
        if len(live) == 1:
            return live[0]
        u = (mix64(self.seed, self.split, 0x4D1C, n) >> 11) * 2.0 ** -53   # uniform in [0, 1)
        target, acc = u * sum(self.weights[k] for k in live), 0.0
        for k in live:
            acc += self.weights[k]
            if target < acc:
                return k
        return live[-1]  # rounding at the top end

    @property
    def state(self) -> dict:
        return {"draws": self.draws, "taken": list(self.taken), "exhausted": list(self.exhausted),
                "sources": [st.state for st in self.streams]}

    def load_state(self, st: dict) -> None:
        if len(st["sources"]) != len(self.streams):
            raise ReaderStateError(f"mixture state has {len(st['sources'])} sources but this mixture has "
                                   f"{len(self.streams)} ({', '.join(self.names)})")
        self.draws = int(st["draws"])
        self.taken = [int(x) for x in st["taken"]]
        self.exhausted = [bool(x) for x in st["exhausted"]]
        for stream, s in zip(self.streams, st["sources"]):
            stream.load_state(s)

    def __iter__(self) -> Iterator[RawSample]:
        its: list[Iterator[RawSample] | None] = [None] * len(self.streams)  # opened lazily, from the current state
        while not all(self.exhausted):
            k = self.pick(self.draws)
            if its[k] is None:
                its[k] = iter(self.streams[k])
            s = next(its[k], None)
            if s is None:
                self.exhausted[k] = True   # redraw with the same counter among the others
                continue
            self.draws += 1
            self.taken[k] += 1
            yield s


def sample_bytes(s: RawSample) -> int:
    """Payload bytes of a RawSample's members, deferred ones included (so the shuffle is the same either way)."""
    return sum(len(v) for v in s.members.values()) + (s.deferred.nbytes if s.deferred is not None else 0)


class ShuffleBuffer:
    """Seeded sample-level shuffle buffer (webdataset style: fill, then emit a random slot and
    refill it). Draw ``n`` picks slot ``mix64(seed, stream, n) % size``, so the RNG state is ``n``.

    ``max_bytes`` (``data.shuffle_buffer_bytes``; 0 = unbounded) bounds the bytes the buffer holds:
    while its samples' payloads total more, random samples are emitted early (:meth:`pop_excess`).
    Early emits shrink the effective shuffle window below ``size`` samples (to roughly
    ``max_bytes / mean sample bytes``); they are counted in ``early_emits`` and logged once. Emits
    are draws like any other, so the stream stays a pure function of the seed and the data."""

    def __init__(self, size: int, seed: int, stream: int, max_bytes: int = 0):
        self.size, self.seed, self.stream = max(0, int(size)), seed, stream
        self.max_bytes = max(0, int(max_bytes))
        self.buf: list[RawSample] = []
        self.nbytes = 0
        self.draws = 0
        self.early_emits = 0
        self._warned = False

    def _slot(self, n: int) -> int:
        j = mix64(self.seed, self.stream, 0xB0FF, self.draws) % n
        self.draws += 1
        return j

    def push(self, s: RawSample) -> RawSample | None:
        """Add ``s``; returns the sample to emit, or None while the buffer is filling. Call
        :meth:`pop_excess` after it until None to keep the byte bound."""
        if self.size == 0:
            return s
        self.nbytes += sample_bytes(s)
        if len(self.buf) < self.size:
            self.buf.append(s)
            return None
        j = self._slot(len(self.buf))
        out, self.buf[j] = self.buf[j], s
        self.nbytes -= sample_bytes(out)
        return out

    def pop_excess(self) -> RawSample | None:
        """A random sample emitted early while the buffer holds more than ``max_bytes`` (else None)."""
        if not self.max_bytes or self.nbytes <= self.max_bytes or not self.buf:
            return None
        self.early_emits += 1
        if not self._warned:
            self._warned = True
            log.warning("shuffle buffer (stream %d) holds %d samples of %d bytes > data.shuffle_buffer_bytes=%d: "
                        "emitting samples early, so the shuffle window is smaller than data.shuffle_buffer=%d "
                        "samples (counted as shuffle_early_emits; logged once)", self.stream, len(self.buf),
                        self.nbytes, self.max_bytes, self.size)
        return self.pop()

    def pop(self) -> RawSample | None:
        """Drain one sample at the end of a finite stream (None when empty)."""
        if not self.buf:
            return None
        j = self._slot(len(self.buf))
        out = self.buf[j]
        self.buf[j] = self.buf[-1]
        self.buf.pop()
        self.nbytes -= sample_bytes(out)
        return out

    def evict(self, pred: Callable[[RawSample], bool]) -> list[RawSample]:
        """Take every sample with ``pred(sample)`` out, in a seeded random order (draws, like ``pop``); the
        others keep their order (an epoch barrier: a source's samples leave before its next epoch enters)."""
        out, rest = [s for s in self.buf if pred(s)], [s for s in self.buf if not pred(s)]
        if not out:
            return []
        for k in range(len(out) - 1, 0, -1):
            j = self._slot(k + 1)
            out[k], out[j] = out[j], out[k]
        self.buf = rest
        self.nbytes -= sum(sample_bytes(s) for s in out)
        return out

    @property
    def state(self) -> dict:
        return {"draws": self.draws, "buffer": [list(s.position) for s in self.buf]}

    def load_state(self, st: dict, limits: ReaderLimits = ReaderLimits()) -> None:
        self.draws = int(st["draws"])
        self.buf = read_positions([tuple(p) for p in st["buffer"]], limits)
        self.nbytes = sum(sample_bytes(s) for s in self.buf)


def shuffled(stream: Iterator[RawSample], buffer: ShuffleBuffer) -> Iterator[RawSample]:
    """Pass a stream through a shuffle buffer; bad samples skip the buffer (reported at once)."""
    for s in stream:
        if s.is_bad:
            yield s
            continue
        out = buffer.push(s)
        if out is not None:
            yield out
        while (out := buffer.pop_excess()) is not None:
            yield out
    while (out := buffer.pop()) is not None:
        yield out
