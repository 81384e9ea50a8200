"""GRPO rewards (``rynnscale.train.rewards``) against hand-computed values: box IoU, discrete Frechet distance
(also against a brute-force minimum over all couplings), each component's mapping to [0, 1], the weighted
combination over applicable components, and user functions that fail (named, NaN reward, run goes on)."""

from __future__ import annotations

import itertools
import math
import random
import sys
from pathlib import Path

import pytest

from rynnscale.train.rewards import (
    GroundingReward,
    RewardSpec,
    box_iou,
    discrete_frechet,
    function_component,
    load_reward_function,
)


def brute_frechet(p, q) -> float:
    """min over monotone couplings (both walkers start together, end together, step 0/1 each) of the max leash."""
    best = math.inf

    def walk(i, j, worst):
        nonlocal best
        worst = max(worst, math.dist(p[i], q[j]))
        if worst >= best:
            return
        if i == len(p) - 1 and j == len(q) - 1:
            best = worst
            return
        for di, dj in ((1, 0), (0, 1), (1, 1)):
            if i + di < len(p) and j + dj < len(q):
                walk(i + di, j + dj, worst)

    walk(0, 0, 0.0)
    return best


def test_discrete_frechet_by_hand_and_brute_force() -> None:
    assert discrete_frechet([(0, 0), (1, 0), (2, 0)], [(0, 1), (1, 1), (2, 1)]) == 1.0
    assert discrete_frechet([(0, 0), (10, 0)], [(0, 0), (5, 5), (10, 0)]) == pytest.approx(5 * math.sqrt(2))
    assert discrete_frechet([(0, 0)], [(3, 4), (0, 0)]) == 5.0
    # order matters (unlike a set distance): the reversed path is far
    assert discrete_frechet([(0, 0), (100, 0)], [(100, 0), (0, 0)]) == 100.0
    rng = random.Random(0)
    for _ in range(30):
        p = [(rng.randint(0, 100), rng.randint(0, 100)) for _ in range(rng.randint(1, 5))]
        q = [(rng.randint(0, 100), rng.randint(0, 100)) for _ in range(rng.randint(1, 5))]
        assert discrete_frechet(p, q) == pytest.approx(brute_frechet(p, q), rel=1e-12)
    with pytest.raises(ValueError):
        discrete_frechet([], [(0, 0)])


def test_box_iou_by_hand() -> None:
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 2, 2), (2, 2, 4, 4)) == 0.0
    assert box_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 1.0


REF = ("Grasp it: <affordance> <frame 0>: (500, 500) </affordance> "
       "and it is here <object> <frame 1>: (100, 100), (300, 300) </object>")


def test_components_and_weighted_reward_by_hand() -> None:
    r = GroundingReward(RewardSpec())
    ans = "<affordance> <frame 0>: (530, 540) </affordance> <object> <frame 1>: (200, 100), (300, 300) </object>"
    res = r(ans, REF, "k")
    point, box = math.exp(-50 / 100), 20000 / 40000          # distance 50; gen box 100x200 inside 200x200
    assert res.components == pytest.approx({"point": point, "box": box, "traj": None, "format": 1.0, "exact": 0.0})
    # traj does not apply, exact has weight 0: (1*point + 1*box + 0.2*format) / (1 + 1 + 0.2)
    assert res.reward == pytest.approx((point + box + 0.2) / 2.2) and res.error is None
    assert r(REF, REF).reward == 1.0 and r(REF, REF).components["exact"] == 1.0


def test_each_component_mapping() -> None:
    r = GroundingReward(RewardSpec(weights={"point": 1, "box": 1, "traj": 1, "format": 1, "exact": 1},
                                   point_scale=50, traj_scale=200))
    c = r.builtin("<affordance> <frame 1>: (500, 500) </affordance>", REF)   # another frame, no object
    assert c["point"] == 0.0 and c["box"] == 0.0 and c["format"] == pytest.approx(1 / 2)
    # object given as a point against a box reference: no IoU; as a box against a point reference: its centre
    c = r.builtin("<object> <frame 1>: (200, 200) </object>", REF)
    assert c["box"] == 0.0 and c["point"] == 0.0       # the affordance is missing
    c = r.builtin("<object> (100, 100), (300, 340) </object>", "<object> (200, 200) </object>")
    assert c["point"] == pytest.approx(math.exp(-20 / 50)) and c["box"] is None
    # area: index by index, a missing point scores 0
    c = r.builtin("<area> (100, 100) </area>", "<area> (100, 130), (500, 500) </area>")
    assert c["point"] == pytest.approx((math.exp(-30 / 50) + 0) / 2)
    # trajectory: discrete Frechet distance, frames ignored; the extra end point is 104.4 from the last one
    ref = "<traj> <frame 0>: (0, 0), (100, 0), (200, 0) </traj>"
    c = r.builtin("<traj> <frame 2>: (0, 30), (100, 30), (200, 30), (300, 30) </traj>", ref)
    assert c["traj"] == pytest.approx(math.exp(-math.hypot(100, 30) / 200))
    assert c["format"] == 1.0 and c["point"] is None
    # malformed (strict syntax: coordinates in 0..1000) still scores leniently but the format is 0
    c = r.builtin("<affordance> <frame 0>: (500, 1200) </affordance>", "<affordance> <frame 0>: (500, 1000) </affordance>")
    assert c["point"] == 1.0 and c["format"] == 0.0
    # extra tags lower the format; no tags against no tags is well formed
    c = r.builtin(REF + " <area> (1, 1) </area>", REF)
    assert c["format"] == pytest.approx(2 / 3)
    assert r.builtin("plain text", "other text")["format"] == 1.0
    assert r.builtin("no tags", REF)["format"] == 0.0


def _user_module(tmp_path: Path, monkeypatch) -> str:
    (tmp_path / "my_rewards.py").write_text(
        "def constant(answer, reference, key):\n    return 0.7\n"
        "def picky(answer, reference, key):\n"
        "    if 'boom' in answer:\n        raise RuntimeError('no grip')\n"
        "    if 'nan' in answer:\n        return float('nan')\n"
        "    if 'big' in answer:\n        return 1.5\n"
        "    if 'str' in answer:\n        return 'high'\n"
        "    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    return "my_rewards"


def test_user_function_is_a_weighted_component(tmp_path: Path, monkeypatch) -> None:
    mod = _user_module(tmp_path, monkeypatch)
    r = GroundingReward(RewardSpec(weights={"format": 1.0}, functions={f"{mod}:constant": 3.0}))
    assert r.components[-1] == "constant" and function_component(f"{mod}:constant") == "constant"
    res = r("plain", "text")
    assert res.components["constant"] == 0.7 and res.reward == pytest.approx((1.0 + 3 * 0.7) / 4)


@pytest.mark.parametrize("answer,what", [("boom", "raised on sample 'syn-7': RuntimeError: no grip"),
                                         ("nan", "returned nan on sample 'syn-7'"),
                                         ("big", "returned 1.5 on sample 'syn-7'"),
                                         ("str", "returned 'high' on sample 'syn-7'")])
def test_failing_user_function_names_the_sample(tmp_path: Path, monkeypatch, answer: str, what: str) -> None:
    mod = _user_module(tmp_path, monkeypatch)
    r = GroundingReward(RewardSpec(functions={f"{mod}:picky": 1.0}))
    res = r(answer, "ref", "syn-7")
    assert math.isnan(res.reward) and f"'{mod}:picky'" in res.error and what in res.error
    assert res.components["picky"] is None and res.components["format"] == 1.0   # the rest is still reported
    assert r("fine", "ref", "syn-8").reward == pytest.approx((0.2 * 1.0 + 1.0) / 1.2)   # and the next sample


def test_configuration_errors(tmp_path: Path, monkeypatch) -> None:
    mod = _user_module(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_reward_function("my_rewards.constant")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod_xyz'"):
        load_reward_function("no_such_mod_xyz:f")
    with pytest.raises(ValueError, match="has no 'missing'"):
        load_reward_function(f"{mod}:missing")
    with pytest.raises(ValueError, match="unknown reward component"):
        GroundingReward(RewardSpec(weights={"iou": 1.0}))
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        GroundingReward(RewardSpec(weights={"point": -1.0}))
    with pytest.raises(ValueError, match="every reward weight is 0"):
        GroundingReward(RewardSpec(weights={"point": 0.0}))
    with pytest.raises(ValueError, match="clash"):
        GroundingReward(RewardSpec(functions={f"{mod}:constant": 1.0, f"{mod}.x:constant": 1.0}))


CHAIN = "stages=[{name: sft}, {name: rl, overrides: {train: {objective: grpo}}}]"


@pytest.mark.parametrize("override, pattern", [
    ("rl.reward.weights={point: 0, box: 0, traj: 0, format: 0, exact: 0}", r"every reward weight is 0"),
    ("rl.reward.functions={no_such_mod_xyz:fn: 1}", r"rl\.reward\.functions.*cannot import module 'no_such_mod_xyz'"),
    ("rl.reward.functions={my_rewards:missing: 1}", r"rl\.reward\.functions.*has no 'missing'"),
    ("rl.reward.functions={my_rewards:LIMIT: 1}", r"rl\.reward\.functions.*'my_rewards:LIMIT' is not callable"),
    ("rl.reward.functions={my_rewards:point: 1}", r"clash"),
])
def test_reward_settings_fail_when_the_recipe_loads(tmp_path: Path, monkeypatch, override, pattern) -> None:
    """A chain's GRPO stage with unusable rewards fails at load (a ConfigError naming the stage), before the SFT
    stage trains; an SFT-only run is not held to a reward it never uses (clashing names excepted)."""
    from rynnscale.config import ConfigError, load_config

    _user_module(tmp_path, monkeypatch)
    (tmp_path / "my_rewards.py").write_text((tmp_path / "my_rewards.py").read_text() +
                                           "LIMIT = 3\ndef point(answer, reference, key):\n    return 1.0\n")
    demo = Path(__file__).resolve().parents[2] / "recipes" / "demo_tiny.yaml"
    stage = "" if "clash" in pattern else r"stages\[1\] \(rl\): .*"   # a clash is refused in any run
    with pytest.raises(ConfigError, match=stage + pattern):
        load_config(demo, [CHAIN, override])
    if "clash" not in pattern:
        load_config(demo, [override])
    load_config(demo, [CHAIN, "rl.reward.functions={my_rewards:constant: 1}"])


def test_reward_is_in_unit_interval_on_random_answers() -> None:
    rng = random.Random(1)
    r = GroundingReward(RewardSpec(weights={"point": 1, "box": 1, "traj": 1, "format": 0.5, "exact": 0.1}))
    kinds = ["<affordance> ({}, {}) </affordance>", "<object> ({}, {}), ({}, {}) </object>",
             "<traj> ({}, {}), ({}, {}), ({}, {}) </traj>"]
    for _ in range(200):
        texts = [" ".join(rng.choice(kinds).format(*sorted(rng.randint(0, 1000) for _ in range(6)))
                          for _ in range(rng.randint(0, 3))) for _ in range(2)]
        res = r(*texts)
        assert 0.0 <= res.reward <= 1.0 and all(v is None or 0 <= v <= 1 for v in res.components.values())
    assert list(itertools.islice(r.components, 5)) == ["point", "box", "traj", "format", "exact"]


def test_numpy_and_tensor_numbers_are_rewards(tmp_path: Path, monkeypatch) -> None:
    """Any real number type a user function may return counts (numpy scalars, 0-d arrays and tensors); bool
    does not."""
    (tmp_path / "typed_rewards.py").write_text(
        "import numpy as np, torch\n"
        "VALUES = {'f32': np.float32(0.75), 'f64': np.float64(0.5), 'i64': np.int64(1), 'arr': np.array(0.25),\n"
        "          'tensor': torch.tensor(0.125), 'int': 0, 'bool': True, 'vec': np.array([0.5]), 'huge': 10**400,\n"
        "          'huger': 10**5000}\n"
        "def typed(answer, reference, key):\n    return VALUES[answer]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("typed_rewards", None)
    r = GroundingReward(RewardSpec(weights={"format": 0.0, "point": 1.0}, functions={"typed_rewards:typed": 1.0}))
    for answer, want in {"f32": 0.75, "f64": 0.5, "i64": 1.0, "arr": 0.25, "tensor": 0.125, "int": 0.0}.items():
        res = r(answer, "ref")
        assert res.error is None and res.components["typed"] == want and res.reward == want, answer
    for answer in ("bool", "vec", "huge", "huger"):     # huger: even its repr raises
        res = r(answer, "ref", "k")
        assert math.isnan(res.reward) and "returned" in res.error and res.components["typed"] is None


def test_a_weight_0_function_that_fails_leaves_the_reward(tmp_path: Path, monkeypatch) -> None:
    """A weight-0 function is a metric only: its failure is reported (error, None component) but the sample
    keeps its reward and so its advantage."""
    mod = _user_module(tmp_path, monkeypatch)
    r = GroundingReward(RewardSpec(weights={"format": 1.0}, functions={f"{mod}:picky": 0.0, f"{mod}:constant": 1.0}))
    res = r("boom", "ref", "syn-9")
    assert res.reward == pytest.approx((1.0 + 0.7) / 2) and "raised on sample 'syn-9'" in res.error
    assert res.components["picky"] is None and res.components["constant"] == 0.7


def test_a_number_of_hundreds_of_digits_scores_instead_of_crashing() -> None:
    """A degenerate answer repeating digits (one token each: 400 tokens) is clamped and scored, not a crash."""
    r = GroundingReward(RewardSpec(weights={"point": 1.0, "format": 0.5}))
    ref = "<affordance> <frame 0>: (1000, 500) </affordance>"
    res = r("<affordance> <frame 0>: (" + "9" * 400 + ", 500) </affordance>", ref)
    assert res.components["point"] == 1.0 and res.components["format"] == 0.0   # clamped to 1000; not well formed
    res = r("<affordance> <frame " + "7" * 5000 + ">: (1000, 500) </affordance>", ref)
    assert res.components["point"] == 0.0 and res.error is None                 # another frame


def test_mis_cased_tags_and_non_ascii_digits_are_not_the_format() -> None:
    """``<OBJECT>`` passed the strict parse (it found nothing and flagged nothing), so the format component gave 1.0
    and the whole reward was 1.0; Arabic-Indic / fullwidth digits were read as coordinates and frames. Both now
    fail the strict parse (format 0) and the lenient one reads no such digits."""
    from rynnscale.data.tags import TagError, parse_tags

    reward = GroundingReward(RewardSpec())
    ref = "<object> (500, 400) </object>"
    assert reward(ref, ref).reward == 1.0
    got = reward("<OBJECT> (500, 400) </OBJECT>", ref)
    assert got.components["format"] == 0.0 and got.reward < 1.0
    for text in ("<object> (\u0665\u0660\u0660, \u0664\u0660\u0660) </object>",
                 "<object> (\uff15\uff10\uff10, \uff14\uff10\uff10) </object>",
                 "<object> <frame \u0663>: (500, 400) </object>"):
        with pytest.raises(TagError):
            parse_tags(text, strict=True)
        assert all(g.frame is None or g.frame < 10 for g in parse_tags(text, strict=False))
        assert reward(text, ref).components["format"] == 0.0


def test_huge_weights_give_the_same_reward() -> None:
    """Weights of 1e308 (finite, accepted) summed to inf and the reward was inf / inf = NaN: a silent failed
    sample. Only their ratios matter."""
    ref, answer = "<object> (500, 400) </object>", "<object> (520, 400) </object>"
    small = GroundingReward(RewardSpec(weights={"point": 1.0, "format": 0.5}))(answer, ref).reward
    huge = GroundingReward(RewardSpec(weights={"point": 1e308, "format": 5e307}))(answer, ref).reward
    assert math.isfinite(huge) and huge == pytest.approx(small, rel=1e-12)
    with pytest.raises(ValueError, match="finite and > 0"):
        GroundingReward(RewardSpec(point_scale=math.inf))
