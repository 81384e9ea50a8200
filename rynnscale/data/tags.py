"""RynnBrain-style grounding tags in answer text: format, parse, and 0-1000 coordinate helpers.

Syntax (as RynnBrain's cookbooks, demo and RynnScale's evaluation write it)::

    <object> <frame 3>: (x1, y1), (x2, y2) </object>        box (top-left, bottom-right) or one point
    <area> <frame 0>: (x, y), (x, y), ... </area>           points inside a region
    <affordance> <frame 5>: (x, y) </affordance>             one point
    <traj> <frame 0>: (x, y), (x, y), ... </traj>            ordered trajectory points
    <grasp_pose> <frame 2>: (x, y), (x, y), (x, y), (x, y) </grasp_pose>   4 gripper-rectangle corners

Coordinates are integers in 0..1000, normalised to the image width (x) and height (y), origin at
the top-left. ``<frame n>`` (0-based index of the image/frame in the sample) is omitted for a
single image. ``<trajectory>`` is accepted as a spelling of ``<traj>`` when parsing (RynnBrain's
prompts use ``<trajectory>``, RynnScale's data ``traj``); after ``<frame n>`` the parser also
accepts ``;`` (RynnBrain's demo) or nothing instead of ``:``. The grasp-pose layout is our
choice (RynnBrain's public material does not pin it down): four corners in order.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "NORM_MAX",
    "KINDS",
    "TagError",
    "Grounding",
    "format_tag",
    "format_object",
    "format_area",
    "format_affordance",
    "format_traj",
    "format_grasp_pose",
    "parse_tags",
    "clamp_norm",
    "pixel_to_norm",
    "norm_to_pixel",
    "box_pixel_to_norm",
]

NORM_MAX = 1000
KINDS = ("object", "area", "affordance", "traj", "grasp_pose")
# spelling in text -> canonical kind
_SPELLINGS = {"object": "object", "area": "area", "affordance": "affordance", "traj": "traj", "trajectory": "traj", "grasp_pose": "grasp_pose"}
# canonical kind -> allowed point counts (min, max); None = unbounded
_COUNTS = {"object": (1, 2), "area": (1, None), "affordance": (1, 1), "traj": (1, None), "grasp_pose": (4, 4)}

# ASCII digits only: ``\d`` also takes Arabic-Indic or fullwidth digits, which int() reads as numbers
_NUM = r"-?[0-9]+(?:\.[0-9]+)?"
_POINT = rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)"
_POINT_RE = re.compile(_POINT)
_FRAME_RE = re.compile(r"<frame\s*([0-9]+)>\s*[:;]?")
_STRICT_BODY_RE = re.compile(rf"\s*(?:<frame\s*([0-9]+)>\s*[:;]?\s*)?((?:{_POINT})(?:\s*,\s*{_POINT})*)?\s*")
_TAG_ALT = "|".join(sorted(_SPELLINGS, key=len, reverse=True))
_TAG_RE = re.compile(rf"<({_TAG_ALT})>(.*?)</\1>", re.DOTALL)
_TAG_RE_I = re.compile(rf"<({_TAG_ALT})>(.*?)</\1>", re.DOTALL | re.IGNORECASE)
_ANY_TAG_RE = re.compile(rf"</?(?:{_TAG_ALT})>", re.IGNORECASE)   # a mis-cased tag is a stray tag, not text


class TagError(ValueError):
    """Malformed grounding tag or out-of-range coordinates."""


@dataclass(frozen=True)
class Grounding:
    """One parsed/formattable tag: canonical ``kind``, 0-1000 ``points`` [(x, y), ...], the
    ``frame`` index (None for a single image) and the ``tag`` spelling used in the text."""

    kind: str
    points: tuple[tuple[int, int], ...]
    frame: int | None = None
    tag: str | None = None

    def to_text(self) -> str:
        return format_tag(self.kind, self.points, self.frame, tag=self.tag)


def clamp_norm(v: float) -> int:
    """Round half up to an integer and clamp into 0..1000."""
    if not math.isfinite(v):
        raise TagError(f"coordinate {v!r} is not finite")
    return min(NORM_MAX, max(0, math.floor(v + 0.5)))


def pixel_to_norm(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """Continuous pixel coordinates (0..width, pixel i's centre at i + 0.5) -> 0..1000 ints,
    rounded and clamped (the RynnBrain convention ``round(x / width * 1000)``)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return clamp_norm(x / width * NORM_MAX), clamp_norm(y / height * NORM_MAX)


def norm_to_pixel(nx: float, ny: float, width: int, height: int) -> tuple[float, float]:
    """0..1000 coordinates -> continuous pixel coordinates (``floor`` gives the pixel index)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return nx / NORM_MAX * width, ny / NORM_MAX * height


def box_pixel_to_norm(box_xyxy: Sequence[float], width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Pixel box (x1, y1, x2, y2) with continuous edge coordinates -> ((x1, y1), (x2, y2)) in 0..1000."""
    x1, y1, x2, y2 = box_xyxy
    return pixel_to_norm(min(x1, x2), min(y1, y2), width, height), pixel_to_norm(max(x1, x2), max(y1, y2), width, height)


def _canonical(kind: str) -> str:
    if kind not in _SPELLINGS:
        raise TagError(f"unknown tag kind {kind!r} (known: {', '.join(_SPELLINGS)})")
    return _SPELLINGS[kind]


def _check_points(kind: str, points: Sequence[tuple[int, int]], ctx: str) -> None:
    lo, hi = _COUNTS[kind]
    n = len(points)
    if n < lo or (hi is not None and n > hi):
        want = f"{lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'many'}"
        raise TagError(f"{ctx}: <{kind}> takes {want} point(s), got {n}")
    for x, y in points:
        if not (0 <= x <= NORM_MAX and 0 <= y <= NORM_MAX):
            raise TagError(f"{ctx}: point ({x}, {y}) is outside 0..{NORM_MAX}")
    if kind == "object" and n == 2:
        (x1, y1), (x2, y2) = points
        if x1 > x2 or y1 > y2:
            raise TagError(f"{ctx}: <object> box must be (top-left), (bottom-right), got ({x1}, {y1}), ({x2}, {y2})")


def format_tag(kind: str, points: Iterable[Sequence[int]], frame: int | None = None, *, tag: str | None = None) -> str:
    """Render one tag, e.g. ``<traj> <frame 0>: (120, 340), (180, 330) </traj>``.

    ``points`` are integer (x, y) pairs in 0..1000 (use ``pixel_to_norm``/``clamp_norm`` first);
    ``tag`` picks the spelling (e.g. "trajectory"), default the canonical one."""
    canon = _canonical(kind)
    spelling = tag if tag is not None else canon
    if _canonical(spelling) != canon:
        raise TagError(f"tag spelling {spelling!r} does not belong to kind {canon!r}")
    pts = []
    for p in points:
        if len(p) != 2:
            raise TagError(f"<{spelling}>: a point must be (x, y), got {p!r}")
        try:
            pts.append((operator.index(p[0]), operator.index(p[1])))
        except TypeError:
            raise TagError(f"<{spelling}>: coordinates must be integers in 0..{NORM_MAX}, got {p!r}") from None
    _check_points(canon, pts, f"<{spelling}>")
    body = ", ".join(f"({x}, {y})" for x, y in pts)
    if frame is not None:
        frame = operator.index(frame)
        if frame < 0:
            raise TagError(f"<{spelling}>: frame index must be >= 0, got {frame}")
        body = f"<frame {frame}>: {body}"
    return f"<{spelling}> {body} </{spelling}>"


def format_object(box_or_point: Sequence, frame: int | None = None) -> str:
    """``<object>`` from a box ((x1, y1), (x2, y2)) / (x1, y1, x2, y2) or a point (x, y), all 0..1000."""
    flat = list(box_or_point)
    scalars = all(not hasattr(v, "__len__") for v in flat)  # numbers (python or numpy), not pairs
    if len(flat) == 4 and scalars:
        pts = [flat[:2], flat[2:]]
    elif len(flat) == 2 and scalars:
        pts = [flat]
    else:
        pts = flat
    return format_tag("object", pts, frame)


def format_area(points: Iterable[Sequence[int]], frame: int | None = None) -> str:
    return format_tag("area", points, frame)


def format_affordance(point: Sequence[int], frame: int | None = None) -> str:
    return format_tag("affordance", [point], frame)


def format_traj(points: Iterable[Sequence[int]], frame: int | None = None, *, spelling: str = "traj") -> str:
    """``<traj>`` (or ``<trajectory>`` with ``spelling="trajectory"``) from ordered points."""
    return format_tag("traj", points, frame, tag=spelling)


def format_grasp_pose(corners: Iterable[Sequence[int]], frame: int | None = None) -> str:
    """``<grasp_pose>`` from the four corners of the gripper rectangle, in order."""
    return format_tag("grasp_pose", corners, frame)


_MAX_DIGITS = 18  # longer integers are out of any range here; int() of 4,300+ digits raises ValueError


def _num(s: str, strict: bool, ctx: str) -> int:
    if strict:
        if "." in s:
            raise TagError(f"{ctx}: coordinate {s!r} is not an integer")
        digits = s.lstrip("-").lstrip("0") or "0"
        if len(digits) > _MAX_DIGITS:
            raise TagError(f"{ctx}: coordinate {s[:24]}... ({len(s)} characters) is outside 0..{NORM_MAX}")
        return -int(digits) if s.startswith("-") else int(digits)
    v = float(s)  # a model's answer may hold a number of hundreds of digits: float() gives inf, clamped
    return clamp_norm(v) if math.isfinite(v) else (NORM_MAX if v > 0 else 0)


def _frame(s: str, strict: bool, ctx: str) -> int:
    digits = s.lstrip("0") or "0"
    if len(digits) <= _MAX_DIGITS:
        return int(digits)
    if strict:
        raise TagError(f"{ctx}: frame number {s[:24]}... has {len(s)} digits")
    return 10**_MAX_DIGITS  # matches no reference frame


def parse_tags(text: str, kinds: Iterable[str] | None = None, *, strict: bool = True) -> list[Grounding]:
    """All grounding tags in ``text`` (in order), optionally only those of ``kinds``
    (canonical names or spellings, e.g. {"traj"} also matches ``<trajectory>``).

    ``strict`` (for training data): tag bodies must be ``[<frame n>[:|;]] (x, y), ...`` with
    integer coordinates in 0..1000 and the point count the kind allows, and no tag may be left
    unclosed; violations raise TagError quoting the tag. Non-strict (for model outputs):
    case-insensitive, stray text tolerated, numbers rounded and clamped, empty tags skipped."""
    want = None if kinds is None else {_canonical(k) for k in kinds}
    out: list[Grounding] = []
    rx = _TAG_RE if strict else _TAG_RE_I
    consumed: list[tuple[int, int]] = []
    for m in rx.finditer(text):
        spelling = m.group(1) if strict else m.group(1).lower()
        kind = _SPELLINGS[spelling]
        body = m.group(2)
        ctx = f"tag {m.group(0)[:80]!r}"
        consumed.append(m.span())
        if strict:
            bm = _STRICT_BODY_RE.fullmatch(body)
            if bm is None:
                raise TagError(f"{ctx}: body must be '[<frame n>:] (x, y), (x, y), ...'")
            frame = _frame(bm.group(1), True, ctx) if bm.group(1) is not None else None
            pts = [(_num(x, True, ctx), _num(y, True, ctx)) for x, y in _POINT_RE.findall(bm.group(2) or "")]
            _check_points(kind, pts, ctx)
        else:
            fm = _FRAME_RE.search(body)
            frame = _frame(fm.group(1), False, ctx) if fm else None
            pts = [(_num(x, False, ctx), _num(y, False, ctx)) for x, y in _POINT_RE.findall(body)]
            if not pts:
                continue
        if want is None or kind in want:
            out.append(Grounding(kind=kind, points=tuple(pts), frame=frame, tag=spelling))
    if strict:
        pos, pieces = 0, []
        for a, b in consumed:
            pieces.append(text[pos:a])
            pos = b
        pieces.append(text[pos:])
        rest = " ".join(pieces)
        stray = _ANY_TAG_RE.search(rest)
        if stray:
            raise TagError(f"unmatched tag {stray.group(0)!r} in {text[:120]!r}")
    return out
