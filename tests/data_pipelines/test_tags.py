"""RynnBrain-style grounding tags: format -> parse round trips, both trajectory spellings, strict
errors, lenient parsing of model output, and pixel <-> 0..1000 helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rynnscale.data.tags import (
    Grounding,
    TagError,
    box_pixel_to_norm,
    clamp_norm,
    format_affordance,
    format_area,
    format_grasp_pose,
    format_object,
    format_tag,
    format_traj,
    norm_to_pixel,
    parse_tags,
    pixel_to_norm,
)

_COUNTS = {"object": (1, 2), "area": (1, 8), "affordance": (1, 1), "traj": (1, 12), "grasp_pose": (4, 4)}


def test_random_round_trips():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for _ in range(300):
        kind = str(rng.choice(list(_COUNTS)))
        lo, hi = _COUNTS[kind]
        n = int(rng.integers(lo, hi + 1))
        pts = [tuple(int(v) for v in rng.integers(0, 1001, 2)) for _ in range(n)]
        if kind == "object" and n == 2:
            (x1, y1), (x2, y2) = pts
            pts = [(min(x1, x2), min(y1, y2)), (max(x1, x2), max(y1, y2))]
        frame = None if rng.random() < 0.3 else int(rng.integers(0, 50))
        tag = "trajectory" if kind == "traj" and rng.random() < 0.5 else None
        text = format_tag(kind, pts, frame, tag=tag)
        prefix, suffix = "Answer: ", " done."
        (g,) = parse_tags(prefix + text + suffix)
        assert g == Grounding(kind=kind, points=tuple(pts), frame=frame, tag=tag or kind)
        assert g.to_text() == text


def test_both_traj_spellings():
    pts = [(10, 20), (30, 40), (1000, 0)]
    short, long = format_traj(pts, 2), format_traj(pts, 2, spelling="trajectory")
    assert short == "<traj> <frame 2>: (10, 20), (30, 40), (1000, 0) </traj>"
    assert long == "<trajectory> <frame 2>: (10, 20), (30, 40), (1000, 0) </trajectory>"
    a, b = parse_tags(f"{short} then {long}")
    assert a.kind == b.kind == "traj" and a.points == b.points == tuple(pts) and a.frame == b.frame == 2
    assert (a.tag, b.tag) == ("traj", "trajectory")
    # filtering by kind: either spelling selects both
    assert len(parse_tags(f"{short} {format_object((1, 2))} {long}", kinds={"trajectory"})) == 2
    with pytest.raises(TagError, match="unmatched"):
        parse_tags("<traj> (1, 2) </trajectory>")


def test_rynnbrain_written_forms():
    # as RynnBrain's cookbook / eval prompts and demo write them (':' or ';' after the frame, or nothing)
    text = (
        "<trajectory> <frame 4>: (144, 379), (144, 369), (144, 363) </trajectory> "
        "<object> <frame 3>; (331,42),(553,271) </object> <area><frame 0> (430, 853), (450, 853)</area> "
        "<affordance> (573, 313) </affordance>"
    )
    t, o, a, f = parse_tags(text)
    assert (t.kind, t.frame, t.points) == ("traj", 4, ((144, 379), (144, 369), (144, 363)))
    assert (o.kind, o.frame, o.points) == ("object", 3, ((331, 42), (553, 271)))
    assert (a.kind, a.frame, len(a.points)) == ("area", 0, 2)
    assert (f.kind, f.frame, f.points) == ("affordance", None, ((573, 313),))


def test_format_helpers():
    assert format_object((10, 20, 30, 40), frame=1) == "<object> <frame 1>: (10, 20), (30, 40) </object>"
    assert format_object(((10, 20), (30, 40))) == "<object> (10, 20), (30, 40) </object>"
    assert format_object(np.array([[10, 20], [30, 40]])) == "<object> (10, 20), (30, 40) </object>"
    assert format_object((7, 8)) == "<object> (7, 8) </object>"
    assert format_affordance((np.int64(5), 6), frame=0) == "<affordance> <frame 0>: (5, 6) </affordance>"
    assert format_area([(1, 2), (3, 4), (5, 6)]) == "<area> (1, 2), (3, 4), (5, 6) </area>"
    corners = [(100, 100), (200, 110), (190, 210), (90, 200)]
    g = parse_tags(format_grasp_pose(corners, 7))[0]
    assert g.kind == "grasp_pose" and g.points == tuple(corners) and g.frame == 7


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: format_traj([(0, 1001)]), "outside"),
        (lambda: format_traj([(-1, 5)]), "outside"),
        (lambda: format_traj([(1.5, 5)]), "integers"),
        (lambda: format_traj([]), "point"),
        (lambda: format_object(((30, 40), (10, 20))), "top-left"),
        (lambda: format_tag("affordance", [(1, 2), (3, 4)]), "1 point"),
        (lambda: format_grasp_pose([(1, 2)] * 3), "4 point"),
        (lambda: format_tag("box", [(1, 2)]), "unknown tag"),
        (lambda: format_tag("traj", [(1, 2)], tag="object"), "spelling"),
        (lambda: format_traj([(1, 2)], frame=-1), "frame"),
    ],
)
def test_format_rejects_bad_input(call, match):
    with pytest.raises(TagError, match=match):
        call()


@pytest.mark.parametrize(
    "text, match",
    [
        ("<traj> (1, 2)", "unmatched"),
        ("(1, 2) </object>", "unmatched"),
        ("<traj> (1, 2), (3, 1001) </traj>", "outside"),
        ("<traj> (1.5, 2) </traj>", "not an integer"),
        ("<object> (5, 5), (1, 1) </object>", "top-left"),
        ("<affordance> (1, 2), (3, 4) </affordance>", "1 point"),
        ("<area> somewhere (1, 2) </area>", "body"),
        ("<traj> <frame 1>: </traj>", "point"),
    ],
)
def test_strict_parse_errors(text, match):
    with pytest.raises(TagError, match=match):
        parse_tags(text)


def test_lenient_parse_of_model_output():
    out = parse_tags("Sure! <OBJECT> <frame 7>: the cloth (645.6, 113), (1200, -3) </OBJECT> <traj></traj> <area>", strict=False)
    assert out == [Grounding("object", ((646, 113), (1000, 0)), 7, "object")]


def test_pixel_norm_helpers():
    assert pixel_to_norm(0, 0, 64, 48) == (0, 0)
    assert pixel_to_norm(64, 48, 64, 48) == (1000, 1000)
    assert pixel_to_norm(32, 12, 64, 48) == (500, 250)
    assert pixel_to_norm(-5, 100, 64, 48) == (0, 1000)  # clamped
    assert clamp_norm(499.5) == 500 and clamp_norm(1234) == 1000 and clamp_norm(-0.4) == 0
    with pytest.raises(TagError):
        clamp_norm(float("nan"))
    with pytest.raises(ValueError):
        pixel_to_norm(1, 1, 0, 10)
    rng = np.random.default_rng(1)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(16, 2000, 2))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        px, py = norm_to_pixel(*pixel_to_norm(x, y, w, h), w, h)
        assert abs(px - x) <= 0.5 * w / 1000 + 1e-9 and abs(py - y) <= 0.5 * h / 1000 + 1e-9
    # the centre of pixel (i, j) maps back into pixel (i, j) on a small frame
    for i in range(64):
        nx, ny = pixel_to_norm(i + 0.5, i + 0.5, 64, 64)
        px, py = norm_to_pixel(nx, ny, 64, 64)
        assert int(px) == i and int(py) == i
    assert box_pixel_to_norm((48, 36, 16, 12), 64, 48) == ((250, 250), (750, 750))


def test_numbers_of_hundreds_of_digits():
    """A model's degenerate answer: lenient parsing clamps (float() of 309+ digits is inf), strict parsing raises
    TagError (int() of 4,300+ digits would raise ValueError), for coordinates and frame numbers."""
    huge = "9" * 5000
    [g] = parse_tags(f"<affordance> <frame 2>: ({huge}, 12)</affordance>", strict=False)
    assert g.points == ((1000, 12),) and g.frame == 2
    [g] = parse_tags(f"<traj> <frame {huge}>: (-{huge}, 3), (4, 5)</traj>", strict=False)
    assert g.points == ((0, 3), (4, 5)) and g.frame > 10**9
    for text in (f"<affordance> ({huge}, 12)</affordance>", f"<affordance> <frame {huge}>: (1, 2)</affordance>"):
        with pytest.raises(TagError, match="digits|outside 0..1000"):
            parse_tags(text, strict=True)
    zeros = "0" * 5000   # leading zeros are not digits of the value
    [g] = parse_tags(f"<affordance> <frame {zeros}3>: ({zeros}5, 12)</affordance>", strict=True)
    assert g.points == ((5, 12),) and g.frame == 3
