"""LeRobot datasets whose files are not where meta/info.json's templates say (issue 15): the error names the
expected path and what is there; a folder differing only in plurality, or the same path under another top
folder, is found with a warning; --video-path / --data-path override the templates.

Metadata only (read_lerobot checks that files exist, it does not decode them): the real v2.1 metadata of the
shared G1 subset with placeholder files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from shared_data import SHARED_DATA

from rynnscale.data_pipelines.jsonl import ConvertError
from rynnscale.data_pipelines.lerobot import convert_lerobot, read_lerobot

G1 = SHARED_DATA / "lerobot_g1_subset"
pytestmark = pytest.mark.skipif(not (G1 / "meta" / "info.json").is_file(), reason=f"{G1} not found")
CAM = "observation.images.cam_high"
EPS = [1, 2, 4]


def _dataset(root: Path, data_dir: str = "data", video_dir: str = "videos", top: str = "") -> Path:
    shutil.copytree(G1 / "meta", root / "meta", copy_function=shutil.copyfile)
    for ep in EPS:
        d = root / top / data_dir / "chunk-000" / f"episode_{ep:06d}.parquet"
        v = root / top / video_dir / "chunk-000" / CAM / f"episode_{ep:06d}.mp4"
        for p in (d, v):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"placeholder")
    return root


def test_files_where_the_templates_say_are_found(tmp_path: Path) -> None:
    meta = read_lerobot(_dataset(tmp_path / "ds"), episodes=EPS)
    assert [e.index for e in meta.episodes] == EPS


def test_a_folder_differing_in_plurality_is_found_with_a_warning(tmp_path: Path, caplog) -> None:
    root = _dataset(tmp_path / "ds", video_dir="video")
    with caplog.at_level(logging.WARNING):
        meta = read_lerobot(root, episodes=EPS)
    assert [e.index for e in meta.episodes] == EPS
    assert meta.episodes[0].video_file == f"video/chunk-000/{CAM}/episode_000001.mp4"
    text = caplog.text
    assert "video_path" in text and "videos/chunk-000" in text and "video/chunk-000" in text and "--video-path" in text


def test_the_same_path_under_another_top_folder_is_found(tmp_path: Path, caplog) -> None:
    root = _dataset(tmp_path / "ds", top="g1")
    with caplog.at_level(logging.WARNING):
        meta = read_lerobot(root, episodes=EPS)
    assert meta.episodes[0].data_file == "g1/data/chunk-000/episode_000001.parquet"
    assert meta.episodes[0].video_file.startswith("g1/videos/")
    assert "--data-path" in caplog.text


def test_nothing_found_names_the_expected_path_and_what_is_there(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", video_dir="recordings")
    with pytest.raises(ConvertError) as e:
        convert_lerobot(root, tmp_path / "out", episodes=EPS, progress=False)
    msg = str(e.value)
    assert f"videos/chunk-000/{CAM}/episode_000001.mp4" in msg, msg     # the first expected path
    assert "recordings" in msg and "video_path" in msg and "--video-path" in msg, msg   # what is there; the fix


def test_template_overrides(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", video_dir="recordings")
    meta = read_lerobot(root, episodes=EPS,
                        video_path="recordings/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
    assert [e.index for e in meta.episodes] == EPS


def test_cli_offers_the_overrides(tmp_path: Path, capsys) -> None:
    from rynnscale.cli import main

    root = _dataset(tmp_path / "ds", video_dir="recordings")
    rc = main(["data", "convert", "lerobot", str(root), str(tmp_path / "out"), "--episodes", "1",
               "--video-path", "nowhere/{video_key}/episode_{episode_index:06d}.mp4", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "nowhere/" + CAM + "/episode_000001.mp4" in err, err
