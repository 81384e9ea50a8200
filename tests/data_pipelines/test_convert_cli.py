"""``rynnscale data convert`` exit codes and output-directory handling: a bad path or option exits 2 with one line
(as ``rynnscale train`` does for a bad config or path), a conversion that fails on its data exits 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rynnscale.cli import main


def _frames(d: Path, n: int, *, truncate: int | None = None) -> Path:
    """``n`` 16x16 jpg frames; frame ``truncate`` cut to 40 bytes (unreadable)."""
    from PIL import Image

    d.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 4 * i, np.uint8)).save(d / f"{i:03d}.jpg", quality=95)
    if truncate is not None:
        p = d / f"{truncate:03d}.jpg"
        p.write_bytes(p.read_bytes()[:40])
    return d


def _convert(*args: str) -> int:
    return main(["data", "convert", *args, "--no-progress", "--no-cost-hints"])


FRAMES = ["--fps", "2", "--clip-frames", "4", "--task", "walk"]


@pytest.mark.parametrize("case", ["lerobot_root_missing", "lerobot_root_is_file", "jsonl_missing", "jsonl_is_dir",
                                  "frames_missing", "frames_bad_option", "frames_too_few", "out_is_file",
                                  "out_made_with_other_settings"])
def test_user_errors_exit_2(tmp_path: Path, capsys, case: str) -> None:
    """Each used to exit 1 like a failed conversion (OUT being a file: a FileExistsError traceback). An OUT the
    refused command created is not left behind (it was: an empty directory holding the conversion's lock file)."""
    d = _frames(tmp_path / "nav", 8)
    out = tmp_path / "out"
    (tmp_path / "file").write_text("x")
    args = {
        "lerobot_root_missing": ["lerobot", str(tmp_path / "nowhere"), str(out)],
        "lerobot_root_is_file": ["lerobot", str(tmp_path / "file"), str(out)],
        "jsonl_missing": ["jsonl", str(tmp_path / "nowhere.jsonl"), str(out), "--media-root", str(tmp_path)],
        "jsonl_is_dir": ["jsonl", str(d), str(out), "--media-root", str(tmp_path)],
        "frames_missing": ["frames", str(tmp_path / "nowhere"), str(out), *FRAMES],
        "frames_bad_option": ["frames", str(d), str(out), "--fps", "2", "--clip-frames", "0", "--task", "walk"],
        "frames_too_few": ["frames", str(d), str(out), "--fps", "2", "--clip-frames", "9", "--task", "walk"],
        "out_is_file": ["frames", str(d), str(tmp_path / "file"), *FRAMES],
        "out_made_with_other_settings": ["frames", str(d), str(out), *FRAMES[:-1], "run"],
    }[case]
    if case == "out_made_with_other_settings":
        assert _convert("frames", str(d), str(out), *FRAMES) == 0
        capsys.readouterr()
    assert _convert(*args) == 2
    err = capsys.readouterr().err.strip()
    expect = {"lerobot_root_missing": "nowhere does not exist", "lerobot_root_is_file": "file is a file",
              "jsonl_missing": "nowhere.jsonl does not exist", "jsonl_is_dir": "is a directory, not a file",
              "frames_missing": "is not a directory", "frames_bad_option": "clip_frames must be >= 1",
              "frames_too_few": "8 frames, fewer than one clip of --clip-frames 9",
              "out_is_file": "file is a file", "out_made_with_other_settings": "other settings"}[case]
    assert err.startswith(f"rynnscale data convert {args[0]}: ") and expect in err and "\n" not in err, err
    assert out.exists() == (case == "out_made_with_other_settings"), case


def test_failed_conversion_exits_1(tmp_path: Path, capsys) -> None:
    """More bad clips than --max-bad-fraction is the data's fault, not a usage error: still exit 1."""
    d = _frames(tmp_path / "nav", 8, truncate=1)
    assert _convert("frames", str(d), str(tmp_path / "out"), *FRAMES) == 1
    assert "clips are bad, more than" in capsys.readouterr().err


def test_lerobot_unknown_episode_and_column_exit_2(tmp_path: Path, capsys) -> None:
    """--episodes / --action-key naming what the (real G1) dataset does not have: options to fix, exit 2."""
    pytest.importorskip("pyarrow")
    from shared_data import SHARED_DATA

    g1 = SHARED_DATA / "lerobot_g1_subset"
    if not g1.is_dir():
        pytest.skip(f"shared sample data not found at {g1}")
    assert _convert("lerobot", str(g1), str(tmp_path / "a"), "--episodes", "999") == 2
    assert "episodes [999] are not in the episode metadata" in capsys.readouterr().err
    assert _convert("lerobot", str(g1), str(tmp_path / "b"), "--episodes", "1", "--action-key", "actions") == 2
    assert "no column 'actions'; pass --action-key NAME" in capsys.readouterr().err


def test_bad_template_does_not_lock_out_a_fixed_rerun(tmp_path: Path, capsys) -> None:
    """A question template with an unknown placeholder is found at the first sample, after the manifest records the
    settings: the rerun with the template fixed was refused ('holds a dataset made with other settings') until OUT
    was deleted by hand. A manifest listing no shard has nothing to resume: the new settings start over."""
    from rynnscale.data.manifest import read_manifest

    d, out = _frames(tmp_path / "nav", 8), tmp_path / "out"
    assert _convert("frames", str(d), str(out), *FRAMES, "--question", "{nope}") == 2
    assert "question template '{nope}'" in capsys.readouterr().err
    assert _convert("frames", str(d), str(out), *FRAMES, "--question", "What is done in {duration_s} s?") == 0
    m = read_manifest(out)
    assert m.info["complete"] and m.info["question"] == "What is done in {duration_s} s?" and m.total_samples == 2
    # a directory holding shards still refuses other settings
    assert _convert("frames", str(d), str(out), *FRAMES) == 2
    assert "other settings" in capsys.readouterr().err


def test_byte_order_mark_opening_a_jsonl_or_annotations_file(tmp_path: Path) -> None:
    """Windows editors open UTF-8 files with a byte order mark: json refuses it, so a conversation jsonl lost line 1
    (a bad_json line) and a frames --annotations file stopped the run ('line 1: invalid JSON')."""
    import json

    from rynnscale.data_pipelines.frames import convert_frames
    from rynnscale.data_pipelines.jsonl import convert_jsonl

    media = _frames(tmp_path / "media", 4)
    line = {"conversation": [
        {"role": "user", "content": [{"type": "image", "image": "000.jpg"}, {"type": "text", "text": "where?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "here"}]}]}
    src = tmp_path / "c.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + (json.dumps(line) + "\r\n").encode() * 3)
    rep = convert_jsonl(src, tmp_path / "out", media_root=media, licence="MIT", max_bad_fraction=1.0,
                        progress=False, cost_hints=False)
    assert rep["totals"]["samples"] == 3 and rep["bad"] == {}, rep["bad_items"]
    ann = tmp_path / "ann.jsonl"
    ann.write_bytes(b"\xef\xbb\xbf" + json.dumps({"start_frame": 0, "end_frame": 4, "question": "What?",
                                                   "answer": "walk"}).encode() + b"\n")
    rep = convert_frames(media, tmp_path / "out_frames", fps=2.0, clip_frames=4, annotations=ann,
                         progress=False, cost_hints=False)
    assert rep["totals"]["samples"] == 1


@pytest.mark.parametrize("option", [{"question": "Do {taks}"}, {"codec": "h265"}])
def test_lerobot_bad_question_or_codec_is_refused_before_reading(tmp_path: Path, option: dict) -> None:
    """Found at the first clip, a --question typo or an unknown --codec stopped the run only after every episode's
    parquet and video had been read and indexed (and after OUT's manifest recorded it); now before anything."""
    from rynnscale.data_pipelines import lerobot

    with pytest.raises(ValueError, match="question template|unsupported codec"):
        lerobot.convert_lerobot(tmp_path / "no_dataset_here", tmp_path / "out", progress=False, cost_hints=False,
                                **option)
    assert not (tmp_path / "out" / "manifest.json").exists()
