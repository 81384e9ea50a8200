"""``manifest.json``: the index of a shard directory (name, sample count, byte size, sha256 and
optional per-sample cost hints of every finished shard), read by the training loader, evaluation,
``data inspect`` and the converters (which write it: ``rynnscale.data_pipelines.shards``).

Everything here only READS and validates (a manifest is untrusted input: shard names must be plain
file names in the directory). The format is documented in ``docs/data_format.md``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rynnscale.data.schema import is_finite_number
from rynnscale.fsutil import sha256_file

__all__ = ["sha256_file"]  # re-exported: the manifest's checksum, read by loader and converters

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "rynnscale-shards"
MANIFEST_VERSION = 1
_SHARD_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,200}\.tar")
COST_NAME_RE = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A manifest.json that is missing, unreadable or does not follow the format."""


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard as recorded in the manifest.

    ``sample_costs`` maps a cost-hint name (e.g. ``num_tokens``, ``vision_patches``) to one
    value per sample, in the order the samples appear in the tar."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str
    sample_costs: dict[str, list[float | int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "num_samples": self.num_samples, "num_bytes": self.num_bytes, "sha256": self.sha256}
        if self.sample_costs:
            d["sample_costs"] = {k: list(v) for k, v in sorted(self.sample_costs.items())}
        return d


@dataclass(frozen=True)
class Manifest:
    """Parsed manifest.json: finished shards sorted by name plus free-form dataset ``info``."""

    shards: tuple[ShardInfo, ...]
    info: dict = field(default_factory=dict)

    @property
    def total_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.num_bytes for s in self.shards)

    def by_name(self) -> dict[str, ShardInfo]:
        return {s.name: s for s in self.shards}

    def to_json(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "total_samples": self.total_samples,
            "total_bytes": self.total_bytes,
            "info": self.info,
            "shards": [s.to_json() for s in self.shards],
        }


# ------------------------------------------------------------------------------------- manifest


def _check_shard_entry(d: Any, i: int, where: str) -> ShardInfo:
    w = f"{where}: shards[{i}]"
    if not isinstance(d, Mapping):
        raise ManifestError(f"{w}: must be an object")
    unknown = set(d) - {"name", "num_samples", "num_bytes", "sha256", "sample_costs"}
    if unknown:
        raise ManifestError(f"{w}: unknown fields {sorted(unknown)}")
    name = d.get("name")
    # shard names come from an untrusted file: they must be plain file names in the directory
    if not isinstance(name, str) or not _SHARD_NAME_RE.fullmatch(name) or ".." in name:
        raise ManifestError(f"{w}.name: {name!r} is not a plain shard file name ending in .tar")
    for k in ("num_samples", "num_bytes"):
        v = d.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ManifestError(f"{w}.{k}: must be a non-negative integer, got {v!r}")
    sha = d.get("sha256")
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise ManifestError(f"{w}.sha256: must be 64 lowercase hex characters, got {sha!r}")
    costs = d.get("sample_costs", {})
    if not isinstance(costs, Mapping):
        raise ManifestError(f"{w}.sample_costs: must be an object of name -> list")
    out_costs: dict[str, list] = {}
    for cname, vals in costs.items():
        if not isinstance(cname, str) or not COST_NAME_RE.fullmatch(cname):
            raise ManifestError(f"{w}.sample_costs: bad cost name {cname!r} (lowercase identifier expected)")
        if not isinstance(vals, list) or len(vals) != d["num_samples"]:
            raise ManifestError(
                f"{w}.sample_costs.{cname}: must be a list with one value per sample ({d['num_samples']}), "
                f"got {len(vals) if isinstance(vals, list) else type(vals).__name__}"
            )
        if not all(is_finite_number(v) for v in vals):
            raise ManifestError(f"{w}.sample_costs.{cname}: values must be finite numbers")
        out_costs[cname] = list(vals)
    return ShardInfo(name=name, num_samples=d["num_samples"], num_bytes=d["num_bytes"], sha256=sha, sample_costs=out_costs)


def manifest_from_json(obj: Any, where: str = MANIFEST_NAME) -> Manifest:
    """Validate a parsed manifest object; raises ManifestError naming the bad field."""
    if not isinstance(obj, Mapping):
        raise ManifestError(f"{where}: must be a JSON object")
    if obj.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{where}: format must be {MANIFEST_FORMAT!r}, got {obj.get('format')!r}")
    if obj.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"{where}: version {obj.get('version')!r} is not supported (expected {MANIFEST_VERSION})")
    shards_raw = obj.get("shards")
    if not isinstance(shards_raw, list):
        raise ManifestError(f"{where}: shards must be a list")
    shards = [_check_shard_entry(d, i, where) for i, d in enumerate(shards_raw)]
    seen: set[str] = set()
    for s in shards:
        if s.name in seen:
            raise ManifestError(f"{where}: shard {s.name!r} is listed twice")
        seen.add(s.name)
    info = obj.get("info", {})
    if not isinstance(info, Mapping):
        raise ManifestError(f"{where}: info must be an object")
    m = Manifest(shards=tuple(sorted(shards, key=lambda s: s.name)), info=dict(info))
    for k, actual in (("total_samples", m.total_samples), ("total_bytes", m.total_bytes)):
        if k in obj and obj[k] != actual:
            raise ManifestError(f"{where}: {k} is {obj[k]!r} but the shards add up to {actual}")
    return m


def _manifest_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate ``manifest.json`` (``path`` is the file or the shard directory)."""
    p = _manifest_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{p}: no manifest here (expected {MANIFEST_NAME} beside the shards)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{p}: cannot read manifest: {e}") from e
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:   # JSONDecodeError, and ints of 4,300+ digits
        raise ManifestError(f"{p}: invalid JSON: {str(e)[:200]}") from e
    return manifest_from_json(obj, where=str(p))



def completed_shards(out_dir: str | os.PathLike, *, verify_sha256: bool = False) -> dict[str, ShardInfo]:
    """Shards that are finished: listed in the manifest and present with the recorded size
    (and sha256 if ``verify_sha256``). Converters skip these on restart. Missing manifest -> {}."""
    out = Path(out_dir)
    if not (out / MANIFEST_NAME).exists():
        return {}
    done = {}
    for s in read_manifest(out).shards:
        p = out / s.name
        try:
            if p.stat().st_size != s.num_bytes:
                continue
        except FileNotFoundError:
            continue
        if verify_sha256 and sha256_file(p) != s.sha256:
            continue
        done[s.name] = s
    return done


class ManifestHints:
    """Per-sample (num_tokens, vision_patches) hints from the manifest.json beside each shard.

    ``settings``: the run's ``size_settings(encoder)``. A manifest records the settings its hints were
    made with (``info.cost_hints.encoder``, written by the converters); where this run's may make a sample
    LARGER (a higher pixel bound, frame rate or frame count; another patching), the hints may be low, and a
    pack planned on them overflows the budget once decoded (samples skipped): the directory has no hints for
    this run (``ignored``: its samples are measured). Where they can only make samples smaller the hints are
    upper bounds and are used (``upper_bounds``: packs may be part empty); another chat template (Qwen3.5's adds a
    reasoning block) or another tokenizer (``_tokenizer_difference``) may make it larger too. Settings a manifest
    does not record (older converters) are taken as the same; a missing chat template is Qwen3-VL's (the only one
    converters rendered with before recording it)."""

    def __init__(self, settings: Mapping | None = None):
        self.settings = settings
        self._dirs: dict[str, dict | None] = {}
        # directory -> ["key: hints' value, this run's", ...] of the settings that differ
        self.ignored: dict[str, list[str]] = {}
        self.upper_bounds: dict[str, list[str]] = {}

    def get(self, shard: str, index: int) -> tuple[int, int] | None:
        d = os.path.dirname(shard)
        if d not in self._dirs:
            try:
                m = read_manifest(d)
            except (ManifestError, OSError):
                self._dirs[d] = None
            else:
                self._dirs[d] = m.by_name()
                made = m.info.get("cost_hints")
                if isinstance(made, Mapping) and self.settings:
                    larger, smaller = _hint_differences(made, self.settings)
                    if larger:
                        self.ignored[d] = larger + smaller
                        self._dirs[d] = None
                    elif smaller:
                        self.upper_bounds[d] = smaller
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


def size_settings(encoder: Any) -> dict | None:
    """The size settings of ``encoder``'s config (``EncoderConfig.size_settings``), the chat template it renders
    conversations with and the budget it cuts long samples to (``truncate_at``, None: it does not cut them); None
    for an encoder without them (its hints cannot be judged: used as they are)."""
    f = getattr(getattr(encoder, "cfg", None), "size_settings", None)
    if not callable(f):
        return None
    cfg = encoder.cfg
    return {**f(), "chat_template": getattr(encoder, "chat_template", "qwen3_vl"),
            "truncate_at": cfg.max_tokens if getattr(cfg, "truncate", False) else None,
            "tokenizer_sha256": getattr(encoder, "tokenizer_sha256", None)}


def _hint_differences(made: Mapping, settings: Mapping) -> tuple[list[str], list[str]]:
    """How the settings a manifest's hints were ``made`` with (``info.cost_hints``) differ from a run's
    (``size_settings``): (those under which a sample may be larger, those under which it can only be smaller)."""
    larger = _tokenizer_difference(made, settings.get("tokenizer_sha256"))
    recorded = made.get("encoder")
    if not isinstance(recorded, Mapping):
        return larger, []
    # recorded only when another: every converter rendered with Qwen3-VL's before
    recorded = {"chat_template": "qwen3_vl", **recorded}
    mine = {k: v for k, v in settings.items() if k != "tokenizer_sha256"}
    grow, smaller = _differences(recorded, mine)
    return larger + grow + _truncation_difference(recorded, mine), smaller


def _tokenizer_difference(made: Mapping, mine: str | None) -> list[str]:
    """Hints made with another tokenizer may be low (its text splits into more tokens): ``["tokenizer: ..."]`` when
    the fingerprint ``made`` records (``tokenizer_sha256``, ``tokenizer_fingerprint``) is not this run's (``mine``;
    None: not judged), else []. A manifest without one (converters before it) is judged by the tokenizer at its
    recorded path (``tokenizer``; None: the bundled one) where that is on this machine, else taken as the same."""
    if mine is None:
        return []
    where = made.get("tokenizer")
    if "tokenizer_sha256" in made:
        theirs = made["tokenizer_sha256"]
    elif "tokenizer" not in made:
        return []
    elif where is None or isinstance(where, str):
        from rynnscale.data.tokenizer import tokenizer_path_fingerprint

        theirs = tokenizer_path_fingerprint(where)
        if theirs is None:
            return []
    else:
        theirs = None
    if theirs == mine:
        return []
    name = "the bundled Qwen3 tokenizer" if where is None else repr(where)[:200]   # (untrusted: cut)
    theirs = theirs[:16] if isinstance(theirs, str) else repr(theirs)[:60]
    return [f"tokenizer: {name} (sha256 {theirs}), this run's sha256 {mine[:16]}"]


# size settings under which a larger value never makes a sample smaller (pixel bounds, frames, frame rate)
_GROWING = {"vision.image_min_pixels", "vision.image_max_pixels", "vision.video_min_pixels", "vision.video_max_pixels",
            "vision.max_video_tokens", "fps", "min_frames", "max_frames"}


def _truncation_difference(recorded: Mapping, mine: Mapping) -> list[str]:
    """Hints made by an encoder that cut long samples to its ``max_tokens`` are the cut sizes: a run that does not
    cut them, or cuts them longer, may see those samples larger (``["key: recorded, this run's"]``, else [])."""
    cut = recorded.get("max_tokens") if recorded.get("truncate") is True else None
    mine_cut = mine.get("truncate_at")
    if not is_finite_number(cut) or (mine_cut is not None and mine_cut <= cut):
        return []
    return [f"truncate at max_tokens: {repr(cut)[:60]}, this run "
            f"{'does not truncate' if mine_cut is None else mine_cut}"]


def _differences(recorded: Mapping, mine: Mapping, prefix: str = "") -> tuple[list[str], list[str]]:
    """The settings of ``mine`` that ``recorded`` holds with another value, as ``"key: recorded, this run's"``:
    (those that may make a sample larger, those that only make it smaller). Nested dicts are compared key by
    key; keys ``recorded`` lacks are not compared."""
    larger: list[str] = []
    smaller: list[str] = []
    for k, v in mine.items():
        key, r = prefix + k, recorded.get(k, v)
        if isinstance(v, Mapping) and isinstance(r, Mapping):
            a, b = _differences(r, v, key + ".")
            larger, smaller = larger + a, smaller + b
        elif r != v:
            shrinks = key in _GROWING and is_finite_number(r) and is_finite_number(v) and v < r
            (smaller if shrinks else larger).append(f"{key}: {repr(r)[:60]}, this run {v!r}")   # (untrusted: cut)
    return larger, smaller
