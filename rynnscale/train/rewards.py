"""Verifiable rewards of a generated answer against its reference answer (GRPO), from their grounding tags.

Both answers' tags are parsed (``rynnscale.data.tags.parse_tags``: lenient for both, strict for the format
check) and paired by kind in order of appearance (``pair_by_kind``: the k-th ``<object>`` of the reference
with the k-th ``<object>`` of the answer; evaluation pairs the same way). Each reference tag scores in
[0, 1] under one component; an unpaired reference tag scores 0:

- ``point`` (``<affordance>``, ``<area>``, ``<grasp_pose>``, a one-point ``<object>``): per reference point
  ``exp(-d / point_scale)`` with ``d`` the Euclidean distance (0-1000 units) to the answer's point of the
  same index (an ``<object>`` box answer: its centre; a missing point: 0), averaged over the tag's points.
  1 at the exact point, 1/e at ``point_scale`` units. 0 when the answer's ``<frame n>`` differs;
- ``box`` (a two-point ``<object>``): the IoU of the two boxes (a point answer: 0; another frame: 0);
- ``traj`` (``<traj>``): ``exp(-F / traj_scale)`` with ``F`` the discrete Frechet distance between the two
  point sequences (RynnBrain-Bench's trajectory metric), frames not compared;
- ``format``: 0 if the answer's tags are not well formed (strict parse fails), else
  ``paired / max(reference tags, answer tags)``: 1 exactly when the answer has the reference's tag kinds, no
  more, no fewer (an answer without tags to a reference without tags: 1);
- ``exact``: 1 if the answer equals the reference (whitespace-stripped), else 0;
- user functions (``module:function``, one component each, named by the function): ``fn(answer, reference,
  key)`` must return a finite number in [0, 1] (float, int, numpy scalar, 0-d array or tensor).

A sample's component value is the mean over its reference tags of that component, or None when it has none
(``point`` / ``box`` / ``traj`` without such tags; ``format`` and ``exact`` always apply). The reward is
``sum_c w_c r_c / sum_c w_c`` over the applicable components with weight > 0: in [0, 1].

A user function that raises, or returns anything but a finite number in [0, 1], does not stop the run:
``RewardResult.error`` names the sample, the function and what happened, the caller counts it
(``reward_failures``), and, when the function's weight is above 0, the sample's reward is NaN (GRPO gives it
advantage 0 and leaves it out of its group's statistics, as TRL does with a None reward); a weight-0 function
(a metric only) leaves the reward as it is.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from rynnscale.config.schema import BUILTIN_REWARDS, function_component, load_reward_function
from rynnscale.data.tags import Grounding, TagError, parse_tags

BUILTIN_COMPONENTS = BUILTIN_REWARDS


# ----------------------------------------------------------------------------------------- geometry
def l2(a: Sequence[float], b: Sequence[float]) -> float:
    return math.hypot(a[0] - b[0], a[1] - b[1])


def box_of(g: Grounding) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) of a two-point tag, corners sorted."""
    (x1, y1), (x2, y2) = g.points
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def centre(g: Grounding) -> tuple[float, float]:
    xs, ys = zip(*g.points)
    return sum(xs) / len(xs), sum(ys) / len(ys)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes; 1.0 for two identical degenerate boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union <= 0:
        return 1.0 if tuple(a) == tuple(b) else 0.0
    return inter / union


def discrete_frechet(p: Sequence[Sequence[float]], q: Sequence[Sequence[float]]) -> float:
    """Discrete Frechet distance between two point sequences (Eiter & Mannila): the shortest leash with which
    two walkers, each stepping forward along its own sequence (or staying), can walk both from start to end."""
    if not p or not q:
        raise ValueError("discrete_frechet: both sequences need at least one point")
    prev: list[float] = []
    for i, a in enumerate(p):
        row: list[float] = []
        for j, b in enumerate(q):
            d = l2(a, b)
            if i == 0 and j == 0:
                row.append(d)
            elif i == 0:
                row.append(max(row[j - 1], d))
            elif j == 0:
                row.append(max(prev[0], d))
            else:
                row.append(max(min(prev[j], prev[j - 1], row[j - 1]), d))
        prev = row
    return prev[-1]


def pair_by_kind(ref: Sequence[Grounding], gen: Sequence[Grounding]) -> list[tuple[Grounding, Grounding | None]]:
    """Each reference tag with the answer's tag of the same kind and the same rank among its kind (or None)."""
    by_kind: dict[str, list[Grounding]] = {}
    for g in gen:
        by_kind.setdefault(g.kind, []).append(g)
    used: dict[str, int] = {}
    out = []
    for r in ref:
        i = used.get(r.kind, 0)
        cands = by_kind.get(r.kind, [])
        out.append((r, cands[i] if i < len(cands) else None))
        used[r.kind] = i + 1
    return out


def component_of(tag: Grounding) -> str:
    """Which component scores a reference tag: ``box`` (two-point object), ``traj``, else ``point``."""
    if tag.kind == "traj":
        return "traj"
    if tag.kind == "object" and len(tag.points) == 2:
        return "box"
    return "point"


# ----------------------------------------------------------------------------------------- the reward
@dataclass(frozen=True)
class RewardSpec:
    """Weights per component (built-ins and user functions by their ``module:function`` path) and scales."""

    weights: Mapping[str, float] = field(default_factory=lambda: {"point": 1.0, "box": 1.0, "traj": 1.0,
                                                                  "format": 0.2, "exact": 0.0})
    point_scale: float = 100.0
    traj_scale: float = 100.0
    functions: Mapping[str, float] = field(default_factory=dict)   # "module:function" -> weight


@dataclass
class RewardResult:
    """One sample: ``reward`` in [0, 1] (NaN when a user function failed), component values (None: not
    applicable), and the error message naming the sample when a function failed."""

    reward: float
    components: dict[str, float | None]
    error: str | None = None


class GroundingReward:
    """The reward of a recipe (module docstring): ``reward(answer, reference, key) -> RewardResult``."""

    def __init__(self, spec: RewardSpec):
        for name, w in {**spec.weights, **spec.functions}.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"reward weight of {name!r} = {w!r} must be a finite number >= 0")
        unknown = sorted(set(spec.weights) - set(BUILTIN_COMPONENTS))
        if unknown:
            raise ValueError(f"unknown reward component(s) {unknown}; built-in: {list(BUILTIN_COMPONENTS)} (a user "
                             "function goes under 'functions' as 'module:function')")
        if not (0 < spec.point_scale < math.inf and 0 < spec.traj_scale < math.inf):
            raise ValueError(f"reward point_scale={spec.point_scale} and traj_scale={spec.traj_scale} must be finite "
                             "and > 0")
        self.spec = spec
        names = [function_component(p) for p in spec.functions]
        clash = sorted({n for n in names if names.count(n) > 1 or n in BUILTIN_COMPONENTS})
        if clash:
            raise ValueError(f"reward functions {list(spec.functions)}: component name(s) {clash} clash (a "
                             "function's name must differ from the built-ins and from the others)")
        self.functions = {path: load_reward_function(path) for path in spec.functions}
        weights = {**spec.weights, **{function_component(p): w for p, w in spec.functions.items()}}
        if not any(w > 0 for w in weights.values()):
            raise ValueError("every reward weight is 0: nothing to learn from")
        top = max(weights.values())   # only the ratios matter; scaled so that their sum cannot overflow (1e308s)
        self.weights = {k: w / top for k, w in weights.items()}

    @property
    def components(self) -> list[str]:
        """Every component name, built-ins first (metrics ``reward_<name>``)."""
        return list(BUILTIN_COMPONENTS) + [function_component(p) for p in self.spec.functions]

    def builtin(self, answer: str, reference: str) -> dict[str, float | None]:
        """The built-in components of one answer (module docstring)."""
        s = self.spec
        ref = parse_tags(reference, strict=False)
        gen = parse_tags(answer, strict=False)
        scores: dict[str, list[float]] = {"point": [], "box": [], "traj": []}
        pairs = pair_by_kind(ref, gen)
        for r, g in pairs:
            comp = component_of(r)
            scores[comp].append(0.0 if g is None else _tag_score(comp, r, g, s.point_scale, s.traj_scale))
        try:
            parse_tags(answer, strict=True)
            well_formed = True
        except TagError:
            well_formed = False
        paired = sum(g is not None for _, g in pairs)
        fmt = (paired / max(len(ref), len(gen)) if (ref or gen) else 1.0) if well_formed else 0.0
        out: dict[str, float | None] = {k: (sum(v) / len(v) if v else None) for k, v in scores.items()}
        out["format"] = fmt
        out["exact"] = float(answer.strip() == reference.strip())
        return out

    def __call__(self, answer: str, reference: str, key: str = "?") -> RewardResult:
        comps = self.builtin(answer, reference)
        errors, weighed_failed = [], False
        for path, fn in self.functions.items():
            name = function_component(path)
            try:
                value = fn(answer, reference, key)
            except Exception as e:  # noqa: BLE001 - a user function's failure is counted, not fatal
                errors.append(f"reward function {path!r} raised on sample {key!r}: {type(e).__name__}: "
                              f"{_printable(e, str)}")
                comps[name] = None
            else:
                comps[name] = _as_reward(value)
                if comps[name] is None:
                    errors.append(f"reward function {path!r} returned {_printable(value, repr)} on sample {key!r}; "
                                  "expected a finite number in [0, 1]")
            weighed_failed |= comps[name] is None and self.weights[name] > 0
        error = "; ".join(errors) or None
        if weighed_failed:   # a weight-0 function (a metric only) leaves the reward alone
            return RewardResult(float("nan"), comps, error)
        num = den = 0.0
        for name, w in self.weights.items():
            if w > 0 and comps.get(name) is not None:
                num += w * comps[name]
                den += w
        return RewardResult(num / den if den > 0 else 0.0, comps, error)


def _printable(x: object, how: Callable[[object], str]) -> str:
    """``how(x)`` cut to 200 characters, or a placeholder when it raises (``repr`` of an int of 4,300+ digits
    does): the message of a failure must not be a failure of its own."""
    try:
        return how(x)[:200]
    except Exception:  # noqa: BLE001 - any user object
        return f"<unprintable {type(x).__name__}>"


def _as_reward(value: object) -> float | None:
    """A user function's value as a float in [0, 1] (any real number type: float, int, numpy scalar, 0-d array
    or tensor; not bool), else None."""
    try:
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
        v = float(value)
    except Exception:  # noqa: BLE001 - e.g. float() of an int of 400 digits; any user object's conversion
        return None
    return v if math.isfinite(v) and 0.0 <= v <= 1.0 else None


def _tag_score(comp: str, r: Grounding, g: Grounding, point_scale: float, traj_scale: float) -> float:
    if comp == "traj":
        return math.exp(-discrete_frechet(r.points, g.points) / traj_scale)
    if r.frame != g.frame:
        return 0.0
    if comp == "box":
        return box_iou(box_of(r), box_of(g)) if len(g.points) == 2 else 0.0
    if r.kind == "object":                     # one reference point: against the answer's point or box centre
        return math.exp(-l2(r.points[0], centre(g)) / point_scale)
    return sum(math.exp(-l2(p, q) / point_scale) for p, q in zip(r.points, g.points)) / len(r.points)
