"""The sample schema as code: member names, keys, ``meta.json`` and ``conv.json``.

A sample is one key in a webdataset tar; its members are stored as ``{key}.{member}``.
Shards, manifests and jsonl files are untrusted input, so every name that comes out of
them goes through these checks before it is used for anything (the reader, the encoder
and the converters all call them). Every function here is pure: no I/O, no global state.
Errors are ``SchemaError`` (a ``ValueError``) whose message names the file/field at fault.

See ``docs/data_format.md`` for the prose version of this module.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "SchemaError",
    "is_finite_number",
    "parse_json",
    "META_SCHEMA_VERSION",
    "MAX_KEY_LEN",
    "MAX_MEMBER_NAME_LEN",
    "META_MEMBER",
    "CONV_MEMBER",
    "ARRAY_MEMBERS",
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "member_kind",
    "validate_member_name",
    "validate_key",
    "split_tar_name",
    "validate_meta",
    "validate_conv",
    "validate_sample_members",
    "build_sample_members",
]


class SchemaError(ValueError):
    """A sample, key or member name that does not follow the shard schema."""


META_SCHEMA_VERSION = 1
MAX_KEY_LEN = 128
MAX_MEMBER_NAME_LEN = 64

META_MEMBER = "meta.json"
CONV_MEMBER = "conv.json"
# array member -> kind; all are numpy .npy files (np.save, allow_pickle=False)
ARRAY_MEMBERS = {"action.npy": "action", "action_ts.npy": "action_ts", "state.npy": "state"}
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")

_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
# video.mp4 or video.<cam>.mp4; the camera name has no dots (webdataset splits on the first dot)
_VIDEO_RE = re.compile(r"video(?:\.([A-Za-z0-9_-]{1,32}))?\.(" + "|".join(VIDEO_EXTENSIONS) + r")")
# f000.jpg ... f999999.png: one frame of a frame sequence (or a single image)
_FRAME_RE = re.compile(r"f([0-9]{3,6})\.(" + "|".join(IMAGE_EXTENSIONS) + r")")


def _fail(where: str, msg: str) -> SchemaError:
    return SchemaError(f"{where}: {msg}" if where else msg)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes | str, where: str = "") -> Any:
    """Untrusted JSON (a member, a jsonl line) -> object; ``SchemaError`` naming ``where`` for what ``json.loads``
    would crash a long job on: invalid UTF-8 or JSON, nesting too deep (RecursionError), an integer over
    Python's 4300-digit conversion limit, and (as an escape) a lone surrogate, which no UTF-8 writer or
    tokenizer accepts."""
    try:
        obj = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
    except RecursionError:
        raise _fail(where, "nested too deeply to parse (RecursionError)") from None
    except (UnicodeDecodeError, ValueError) as e:   # ValueError: also a > 4300-digit integer (int-str limit)
        raise _fail(where, str(e)[:200]) from None
    try:
        data = raw if isinstance(raw, (bytes, bytearray)) else raw.encode("utf-8")
    except UnicodeEncodeError:   # a str holding a lone surrogate itself
        data = None
    if data is None or _SURROGATE_ESCAPE.search(data):   # else only escapes could smuggle one past the decode
        _check_surrogates(obj, where)
    return obj


def _check_surrogates(obj: Any, where: str) -> None:
    """Raise on a lone surrogate in any string (key or value) of parsed JSON; iterative, so as deep as json
    parsed it."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError as e:
                raise _fail(where, f"a string holds a lone surrogate {o[e.start]!r} at character {e.start} "
                                   "(not valid Unicode)") from None
        elif isinstance(o, dict):
            stack += list(o.keys()) + list(o.values())
        elif isinstance(o, list):
            stack += o


def member_kind(name: str) -> str | None:
    """Kind of an allowed member name ("meta", "conv", "video", "frame", "action", "action_ts",
    "state"), or None if the name is not one the schema knows. Does not check safety."""
    if name == META_MEMBER:
        return "meta"
    if name == CONV_MEMBER:
        return "conv"
    if name in ARRAY_MEMBERS:
        return ARRAY_MEMBERS[name]
    if _VIDEO_RE.fullmatch(name):
        return "video"
    if _FRAME_RE.fullmatch(name):
        return "frame"
    return None


def _check_safe_name(name: Any, what: str, max_len: int, where: str) -> str:
    """Reject names that could escape a directory or confuse a tar reader."""
    if not isinstance(name, str):
        raise _fail(where, f"{what} must be a string, got {type(name).__name__}")
    if not name:
        raise _fail(where, f"{what} is empty")
    if len(name) > max_len:
        raise _fail(where, f"{what} {name[:40]!r}... is {len(name)} characters, more than the limit {max_len}")
    bad = [c for c in name if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise _fail(where, f"{what} {name!r} contains control characters {bad!r}")
    if "/" in name or "\\" in name:
        raise _fail(where, f"{what} {name!r} contains a path separator")
    if ".." in name:
        raise _fail(where, f"{what} {name!r} contains '..'")
    if name.startswith((".", "~")) or (len(name) > 1 and name[1] == ":"):
        raise _fail(where, f"{what} {name!r} looks like a hidden, home-relative or drive path")
    if not name.isascii():
        raise _fail(where, f"{what} {name!r} contains non-ASCII characters")
    return name


def validate_member_name(name: str, *, allow_unknown: bool = False, where: str = "") -> str:
    """Check one member name (the part after ``{key}.``) and return it.

    Unsafe names (path separators, ``..``, absolute/hidden paths, control characters, over
    ``MAX_MEMBER_NAME_LEN`` characters) are always rejected. Names the schema does not know
    (see ``member_kind``) are rejected unless ``allow_unknown`` (readers may skip them)."""
    _check_safe_name(name, "member name", MAX_MEMBER_NAME_LEN, where)
    if not allow_unknown and member_kind(name) is None:
        raise _fail(
            where,
            f"member name {name!r} is not part of the sample schema (allowed: meta.json, conv.json, "
            f"video.mp4 / video.<cam>.mp4 (.webm, .mkv), fNNN.jpg / .png, action.npy, action_ts.npy, state.npy)",
        )
    return name


def validate_key(key: str, *, where: str = "") -> str:
    """Check a sample key and return it: 1..MAX_KEY_LEN characters of ``[A-Za-z0-9_-]``.

    No dots (webdataset splits ``key.member`` at the first dot), no separators."""
    _check_safe_name(key, "sample key", MAX_KEY_LEN, where)
    if not _KEY_RE.fullmatch(key):
        raise _fail(where, f"sample key {key!r} may only contain letters, digits, '_' and '-'")
    return key


def split_tar_name(tar_name: str, *, allow_unknown: bool = False, where: str = "") -> tuple[str, str]:
    """Split a tar entry name ``{key}.{member}`` into (key, member), validating both halves."""
    if not isinstance(tar_name, str) or "." not in tar_name:
        raise _fail(where, f"tar entry {tar_name!r} is not of the form '{{key}}.{{member}}'")
    key, member = tar_name.split(".", 1)
    validate_key(key, where=where)
    validate_member_name(member, allow_unknown=allow_unknown, where=where)
    return key, member


# ----------------------------------------------------------------------------------- meta.json

_META_KEYS = {
    "schema_version",
    "source",
    "licence",
    "task",
    "embodiment",
    "episode",
    "clip_start_s",
    "video",
    "action",
    "state",
    "extra",
}
_VIDEO_KEYS = {"fps", "num_frames", "width", "height", "frame_indices", "timestamps"}
_ARRAY_META_KEYS = {"space", "units", "dims"}


def _unknown_keys(d: Mapping, allowed: set[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            hint = difflib.get_close_matches(str(k), sorted(allowed), n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise _fail(where, f"unknown field {k!r} (allowed: {', '.join(sorted(allowed))}; put free-form data under 'extra'){extra}")


def _str_field(d: Mapping, k: str, where: str, *, required: bool, allow_empty: bool = False, max_len: int = 4096) -> str | None:
    if k not in d:
        if required:
            raise _fail(where, f"missing required field {k!r}")
        return None
    v = d[k]
    if not isinstance(v, str):
        raise _fail(where, f"{k}: must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise _fail(where, f"{k}: must not be empty")
    if len(v) > max_len:
        raise _fail(where, f"{k}: is {len(v)} characters, more than {max_len}")
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """A finite int or float (not bool); an int too large for a float (400 digits) is not."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _validate_video_meta(v: Any, where: str) -> dict:
    if not isinstance(v, Mapping):
        raise _fail(where, f"must be an object, got {type(v).__name__}")
    _unknown_keys(v, _VIDEO_KEYS, where)
    out: dict[str, Any] = {}
    if "fps" not in v:
        raise _fail(where, "missing required field 'fps'")
    if not is_finite_number(v["fps"]) or v["fps"] <= 0:
        raise _fail(where, f"fps: must be a positive finite number, got {v['fps']!r}")
    out["fps"] = float(v["fps"])
    for k in ("num_frames", "width", "height"):
        if k in v:
            if not _is_int(v[k]) or v[k] < 1:
                raise _fail(where, f"{k}: must be a positive integer, got {v[k]!r}")
            out[k] = int(v[k])
    n = out.get("num_frames")
    if "frame_indices" in v:
        fi = v["frame_indices"]
        if not isinstance(fi, list) or not all(_is_int(i) and i >= 0 for i in fi):
            raise _fail(where, "frame_indices: must be a list of non-negative integers")
        if any(b < a for a, b in zip(fi, fi[1:])):
            raise _fail(where, "frame_indices: must be non-decreasing")
        if n is not None and len(fi) != n:
            raise _fail(where, f"frame_indices: has {len(fi)} entries but num_frames is {n}")
        out["frame_indices"] = list(fi)
    if "timestamps" in v:
        ts = v["timestamps"]
        if not isinstance(ts, list) or not all(is_finite_number(t) and t >= 0 for t in ts):
            raise _fail(where, "timestamps: must be a list of finite non-negative numbers (seconds)")
        if any(b < a for a, b in zip(ts, ts[1:])):
            raise _fail(where, "timestamps: must be non-decreasing")
        if n is not None and len(ts) != n:
            raise _fail(where, f"timestamps: has {len(ts)} entries but num_frames is {n}")
        if "frame_indices" in out and len(ts) != len(out["frame_indices"]):
            raise _fail(where, f"timestamps: has {len(ts)} entries but frame_indices has {len(out['frame_indices'])}")
        out["timestamps"] = [float(t) for t in ts]
    return out


def _validate_array_meta(v: Any, where: str) -> dict:
    if not isinstance(v, Mapping):
        raise _fail(where, f"must be an object, got {type(v).__name__}")
    _unknown_keys(v, _ARRAY_META_KEYS, where)
    out: dict[str, Any] = {"space": _str_field(v, "space", where, required=True, max_len=256)}
    if "units" not in v:
        raise _fail(where, "missing required field 'units' (a string for all dimensions or one per dimension)")
    units = v["units"]
    if isinstance(units, str):
        if not units.strip():
            raise _fail(where, "units: must not be empty")
    elif not (isinstance(units, list) and units and all(isinstance(u, str) and u.strip() for u in units)):
        raise _fail(where, "units: must be a non-empty string or a list of non-empty strings")
    out["units"] = units if isinstance(units, str) else list(units)
    if "dims" in v:
        dims = v["dims"]
        if not (isinstance(dims, list) and dims and all(isinstance(d, str) and d for d in dims)):
            raise _fail(where, "dims: must be a non-empty list of dimension names")
        if isinstance(units, list) and len(units) != len(dims):
            raise _fail(where, f"units: has {len(units)} entries but dims has {len(dims)}")
        out["dims"] = list(dims)
    return out


def validate_meta(meta: Any, *, where: str = "meta.json") -> dict:
    """Validate a parsed ``meta.json`` and return a normalised copy (defaults filled in).

    Required: ``source``, ``licence`` (non-empty strings), ``task`` (string, may be empty).
    Optional: ``schema_version`` (int, default 1), ``embodiment`` (default "unknown"),
    ``episode`` (str or int), ``clip_start_s`` (seconds in the source episode),
    ``video`` {fps (required), num_frames, width, height, frame_indices, timestamps},
    ``action`` / ``state`` {space, units (str or one per dim), dims}, ``extra`` (free-form object).
    Unknown top-level fields are rejected (they are usually typos, e.g. 'license')."""
    if not isinstance(meta, Mapping):
        raise _fail(where, f"must be a JSON object, got {type(meta).__name__}")
    _unknown_keys(meta, _META_KEYS, where)
    out: dict[str, Any] = {}
    ver = meta.get("schema_version", META_SCHEMA_VERSION)
    if not _is_int(ver) or not 1 <= ver <= META_SCHEMA_VERSION:
        raise _fail(where, f"schema_version: {ver!r} is not supported (this code reads 1..{META_SCHEMA_VERSION})")
    out["schema_version"] = ver
    out["source"] = _str_field(meta, "source", where, required=True, max_len=256)
    out["licence"] = _str_field(meta, "licence", where, required=True, max_len=256)
    out["task"] = _str_field(meta, "task", where, required=True, allow_empty=True)
    out["embodiment"] = _str_field(meta, "embodiment", where, required=False, max_len=256) or "unknown"
    if "episode" in meta:
        ep = meta["episode"]
        if not (_is_int(ep) or isinstance(ep, str)):
            raise _fail(where, f"episode: must be an integer or a string, got {type(ep).__name__}")
        out["episode"] = ep
    if "clip_start_s" in meta:
        if not is_finite_number(meta["clip_start_s"]) or meta["clip_start_s"] < 0:
            raise _fail(where, f"clip_start_s: must be a finite non-negative number, got {meta['clip_start_s']!r}")
        out["clip_start_s"] = float(meta["clip_start_s"])
    if "video" in meta:
        out["video"] = _validate_video_meta(meta["video"], f"{where}: video")
    for k in ("action", "state"):
        if k in meta:
            out[k] = _validate_array_meta(meta[k], f"{where}: {k}")
    if "extra" in meta:
        if not isinstance(meta["extra"], Mapping):
            raise _fail(where, f"extra: must be an object, got {type(meta['extra']).__name__}")
        out["extra"] = dict(meta["extra"])
    return out


# ----------------------------------------------------------------------------------- conv.json

_ROLES = ("system", "user", "assistant")
_ITEM_KEYS = {"text": {"type", "text"}, "image": {"type", "image"}, "video": {"type", "video"}}


def validate_conv(conv: Any, member_names: Iterable[str] | None = None, *, where: str = "conv.json") -> list[dict]:
    """Validate a parsed ``conv.json`` and return its list of turns.

    Form (RynnScale style): ``{"conversation": [{"role": "user"|"assistant"|"system",
    "content": [{"type": "text", "text": str} | {"type": "image", "image": "f000.jpg"} |
    {"type": "video", "video": "video.mp4" or ["f000.jpg", "f001.jpg", ...]}]}]}``; an assistant turn may carry
    ``"reasoning_content": str`` (rendered by Qwen3.5's template only: ``rynnscale.data.encode``).
    Media items must name members of the same sample (checked against ``member_names`` when
    given); images/frame lists name frame members, a video string names a video member.
    Media only in user turns; at least one assistant turn must carry text."""
    names = set(member_names) if member_names is not None else None
    if not isinstance(conv, Mapping) or "conversation" not in conv:
        raise _fail(where, "must be a JSON object with a 'conversation' list")
    _unknown_keys(conv, {"conversation"}, where)
    turns = conv["conversation"]
    if not isinstance(turns, list) or not turns:
        raise _fail(where, "conversation: must be a non-empty list of turns")
    has_answer = False
    for ti, turn in enumerate(turns):
        tw = f"{where}: conversation[{ti}]"
        if not isinstance(turn, Mapping):
            raise _fail(tw, "must be an object with 'role' and 'content'")
        _unknown_keys(turn, {"role", "content", "reasoning_content"}, tw)
        role = turn.get("role")
        if role not in _ROLES:
            raise _fail(tw, f"role: must be one of {_ROLES}, got {role!r}")
        if "reasoning_content" in turn and (role != "assistant" or not isinstance(turn["reasoning_content"], str)):
            raise _fail(tw, "reasoning_content: must be a string, in an assistant turn")
        content = turn.get("content")
        if not isinstance(content, list) or not content:
            raise _fail(tw, "content: must be a non-empty list of items")
        for ci, item in enumerate(content):
            iw = f"{tw}.content[{ci}]"
            if not isinstance(item, Mapping) or item.get("type") not in _ITEM_KEYS:
                raise _fail(iw, f"must be an object with type one of {tuple(_ITEM_KEYS)}")
            typ = item["type"]
            _unknown_keys(item, _ITEM_KEYS[typ], iw)
            if typ == "text":
                if not isinstance(item.get("text"), str):
                    raise _fail(iw, "text: must be a string")
                if role == "assistant" and item["text"].strip():
                    has_answer = True
                continue
            if role != "user":   # as the encoder: media in a system turn would make every sample bad at training
                raise _fail(iw, f"{typ} items are only allowed in user turns, not in {role} turns")
            refs = item.get(typ)
            if typ == "video" and isinstance(refs, list):
                if not refs:
                    raise _fail(iw, "video: frame list is empty")
                want = "frame"
            elif isinstance(refs, str):
                refs = [refs]
                want = "video" if typ == "video" else "frame"
            else:
                raise _fail(iw, f"{typ}: must be a member name" + (" or a list of frame member names" if typ == "video" else ""))
            for r in refs:
                validate_member_name(r, where=iw)
                if member_kind(r) != want:
                    raise _fail(iw, f"{typ}: {r!r} is not a {want} member")
                if names is not None and r not in names:
                    raise _fail(iw, f"{typ}: names member {r!r}, which the sample does not contain")
    if not has_answer:
        raise _fail(where, "conversation: has no assistant turn with text (nothing to train on)")
    return [dict(t) for t in turns]


def validate_sample_members(member_names: Iterable[str], meta: Mapping | None = None, *, where: str = "") -> dict[str, list[str]]:
    """Check the set of members of one sample; return {kind: sorted member names}.

    Requires meta.json and conv.json; action.npy and action_ts.npy come together; when the
    validated ``meta`` is given, video/frame members need ``meta['video']`` and arrays need
    ``meta['action']`` / ``meta['state']``."""
    by_kind: dict[str, list[str]] = {}
    for name in member_names:
        validate_member_name(name, where=where)
        by_kind.setdefault(member_kind(name), []).append(name)
    for kind, req in (("meta", META_MEMBER), ("conv", CONV_MEMBER)):
        if kind not in by_kind:
            raise _fail(where, f"sample has no {req}")
    if ("action" in by_kind) != ("action_ts" in by_kind):
        raise _fail(where, "action.npy and action_ts.npy must be present together")
    if meta is not None:
        if ("video" in by_kind or "frame" in by_kind) and "video" not in meta:
            raise _fail(where, "sample has video/frame members but meta.json has no 'video' section (fps, timestamps)")
        for k in ("action", "state"):
            if k in by_kind and k not in meta:
                raise _fail(where, f"sample has {k}.npy but meta.json has no {k!r} section (space, units)")
    return {k: sorted(v) for k, v in by_kind.items()}


def build_sample_members(meta: Mapping, conv: Mapping, media: Mapping[str, bytes], *, where: str = "",
                         meta_where: str = "meta.json", conv_where: str = "conv.json") -> dict[str, bytes]:
    """A converter's sample, checked and serialised: ``{meta.json, conv.json, **media}``.

    ``meta`` is validated (and normalised) first, then ``conv`` against the ``media`` member
    names, then the whole member set. Both JSON members are compact (``conv.json`` keeps
    non-ASCII text as UTF-8), so the same sample always gives the same bytes (shards are
    deterministic). ``where`` / ``meta_where`` / ``conv_where`` prefix the error messages."""
    meta = validate_meta(meta, where=meta_where)
    validate_conv(conv, media, where=conv_where)
    members = {META_MEMBER: json.dumps(meta, separators=(",", ":")).encode(),
               CONV_MEMBER: json.dumps(conv, separators=(",", ":"), ensure_ascii=False).encode(), **media}
    validate_sample_members(members, meta, where=where)
    return members
