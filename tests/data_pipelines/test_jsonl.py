"""jsonl converter: media resolved only under --media-root (absolute paths, '..', symlinks out are
rejected naming the line), both traj spellings accepted and kept, bad lines skipped + counted +
reported, the failure threshold, restart after a mid-run failure, and the shards through
TrainLoader with the real SampleEncoder. Media: real RynnBrain navigation frames + a tiny
synthetic H.264 clip."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from shared_data import SHARED_DATA

from rynnscale.data.manifest import completed_shards, read_manifest
from rynnscale.data.tags import parse_tags
from rynnscale.data_pipelines.jsonl import BadItem, ConvertError, convert_jsonl, resolve_under
from rynnscale.data_pipelines.synthetic import synthetic_sample

SHARED = SHARED_DATA
NAV = SHARED / "rynnbrain_frames" / "navigation"
pytestmark = pytest.mark.skipif(not NAV.is_dir(), reason=f"shared navigation frames not found at {NAV} (set RYNNSCALE_SHARED_DATA)")


def _turns(user: list, answer: str) -> dict:
    return {"conversation": [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


@pytest.fixture()
def media(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "frames").mkdir(parents=True)
    for i in range(4):
        shutil.copy(NAV / f"{i:03d}.jpg", root / "frames" / f"{i:03d}.jpg")
    _, m = synthetic_sample(0, seed=1, frames=4, width=64, height=64)
    (root / "clip.mp4").write_bytes(m["video.mp4"])
    (root / "notes.jpg").write_text("not an image")
    secret = tmp_path / "secret.jpg"
    shutil.copy(NAV / "010.jpg", secret)  # a real image outside the root
    (root / "link.jpg").symlink_to(secret)
    (root / "inside_link.jpg").symlink_to(root / "frames" / "001.jpg")
    return root


GOOD = [
    _turns([{"type": "image", "image": "frames/000.jpg"}, {"type": "text", "text": "Where is the door?"}],
           "The door is here: <object> (400, 200), (600, 700) </object>"),
    _turns([{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "Trace the moving object."}],
           "It moves like this: <trajectory> <frame 0>: (100, 800), (300, 600), (500, 500) </trajectory>"),
    {**_turns([{"type": "video", "video": [f"frames/{i:03d}.jpg" for i in range(4)]},
               {"type": "text", "text": "Where should I walk?"}],
              "Walk forward. <traj> <frame 0>: (500, 900), (500, 700), (520, 500) </traj>"), "fps": 1, "task": "navigate",
     "licence": "Apache-2.0", "id": "nav-1"},
]


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _samples(d: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for s in read_manifest(d).shards:
        with tarfile.open(d / s.name) as tf:
            for m in tf.getmembers():
                k, member = m.name.split(".", 1)
                out.setdefault(k, {})[member] = tf.extractfile(m).read()
    return out


def test_resolve_under(media: Path):
    assert resolve_under(media, "frames/001.jpg") == (media / "frames/001.jpg").resolve()
    assert resolve_under(media, "inside_link.jpg") == (media / "frames/001.jpg").resolve()  # symlink staying inside: fine
    for bad in ("/etc/passwd", "../secret.jpg", "frames/../../secret.jpg", "link.jpg", "~/x.jpg", "C:/x.jpg", "frames\\..\\..\\x",
                "", None, 3, "frames/\x00.jpg"):
        with pytest.raises(BadItem) as e:
            resolve_under(media, bad, "line 7")
        assert e.value.reason == "unsafe_path" and "line 7" in str(e.value), bad
    with pytest.raises(BadItem) as e:
        resolve_under(media, "frames/404.jpg", "line 8")
    assert e.value.reason == "missing_media"


def test_convert_good_and_bad_lines(media: Path, tmp_path: Path, caplog):
    torch.manual_seed(0)
    bad = [
        _turns([{"type": "image", "image": "/etc/passwd"}, {"type": "text", "text": "q"}], "a"),            # line 4
        _turns([{"type": "image", "image": "../secret.jpg"}, {"type": "text", "text": "q"}], "a"),          # line 5
        _turns([{"type": "video", "video": ["frames/000.jpg", "link.jpg"]}], "a"),                          # line 6
        '{"conversation": [',                                                                              # line 7
        _turns([{"type": "image", "image": "frames/404.jpg"}], "a"),                                        # line 8
        _turns([{"type": "image", "image": "frames/000.jpg"}], "<traj> <frame 0>: (1200, 5) </traj>"),     # line 9
        _turns([{"type": "image", "image": "notes.jpg"}], "a"),                                             # line 10
        "",                                                                                                # line 11: blank
        {"conversation": [{"role": "user", "content": [{"type": "text", "text": "only a question"}]}]},     # line 12
    ]
    src = _write(tmp_path / "data.jsonl", GOOD + bad)
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="max_bad_fraction"):
        convert_jsonl(src, out, media_root=media, lines_per_shard=100, progress=False)  # default 5% threshold
    rep = convert_jsonl(src, tmp_path / "out2", media_root=media, lines_per_shard=5, max_bad_fraction=1.0, progress=False)
    assert rep["totals"] == {"lines": 12, "samples": 3, "bad_lines": 8}
    assert rep["bad"] == {"bad_conversation": 1, "bad_json": 1, "bad_media": 1, "bad_tags": 1, "missing_media": 1,
                          "unsafe_path": 3}
    by_line = {b["line"]: b for b in rep["bad_items"]}
    assert {ln: by_line[ln]["reason"] for ln in (4, 5, 6)} == {4: "unsafe_path", 5: "unsafe_path", 6: "unsafe_path"}
    for ln in (4, 5, 6):
        assert f"line {ln}" in by_line[ln]["detail"]
    assert "outside the media root" in by_line[6]["detail"] and "absolute" in by_line[4]["detail"]
    assert json.loads((tmp_path / "out2" / "convert_report.json").read_text())["bad"] == rep["bad"]

    samples = _samples(tmp_path / "out2")
    assert sorted(samples) == ["jsonl-000000001", "jsonl-000000002", "jsonl-000000003"]
    secret = (tmp_path / "secret.jpg").read_bytes()
    assert all(secret not in v for m in samples.values() for v in m.values())  # nothing from outside the root
    s1, s2, s3 = (samples[k] for k in sorted(samples))
    assert s1["f000.jpg"] == (media / "frames/000.jpg").read_bytes()
    assert s2["video.mp4"] == (media / "clip.mp4").read_bytes()
    assert [s3[f"f{i:03d}.jpg"] for i in range(4)] == [(media / f"frames/{i:03d}.jpg").read_bytes() for i in range(4)]
    c3 = json.loads(s3["conv.json"])["conversation"]
    assert c3[0]["content"][0] == {"type": "video", "video": ["f000.jpg", "f001.jpg", "f002.jpg", "f003.jpg"]}
    m3 = json.loads(s3["meta.json"])
    assert (m3["task"], m3["licence"], m3["video"]["fps"], m3["extra"]["id"]) == ("navigate", "Apache-2.0", 1.0, "nav-1")
    m2 = json.loads(s2["meta.json"])
    assert (m2["licence"], m2["source"], m2["video"]["num_frames"]) == ("unknown", "jsonl/data", 4)
    # both spellings accepted and kept as written
    a2 = json.loads(s2["conv.json"])["conversation"][1]["content"][0]["text"]
    a3 = c3[1]["content"][0]["text"]
    assert "<trajectory>" in a2 and "<traj>" in a3
    assert [(g.kind, g.tag) for g in parse_tags(a2)] == [("traj", "trajectory")]
    assert [(g.kind, g.tag) for g in parse_tags(a3)] == [("traj", "traj")]


def test_threshold_abort_then_resume(media: Path, tmp_path: Path):
    """Lines 4-6 name media that does not exist yet: the run aborts after shard 1 once the bad
    fraction is certain to exceed the limit; shard 0 stays. With the media in place the rerun
    writes only shard 1."""
    torch.manual_seed(0)
    later = [_turns([{"type": "image", "image": f"later/{i}.jpg"}, {"type": "text", "text": "q"}], f"answer {i}") for i in range(3)]
    src = _write(tmp_path / "d.jsonl", GOOD + later)
    out = tmp_path / "out"
    kw = dict(media_root=media, lines_per_shard=3, max_bad_fraction=0.4, progress=False)
    with pytest.raises(ConvertError, match="3 of 6 lines are bad"):
        convert_jsonl(src, out, **kw)
    assert sorted(completed_shards(out)) == ["jsonl-000000.tar"]
    assert not list(out.glob(".*tmp*"))
    stamp = (out / "jsonl-000000.tar").stat().st_mtime_ns
    (media / "later").mkdir()
    for i in range(3):
        shutil.copy(NAV / f"{20 + i:03d}.jpg", media / "later" / f"{i}.jpg")
    rep = convert_jsonl(src, out, **kw)
    assert rep["totals"] == {"lines": 6, "samples": 6, "bad_lines": 0} and rep["complete"]
    assert (out / "jsonl-000000.tar").stat().st_mtime_ns == stamp
    assert sorted(completed_shards(out, verify_sha256=True)) == ["jsonl-000000.tar", "jsonl-000001.tar"]
    src.write_text(src.read_text() + json.dumps(GOOD[0]) + "\n")  # another input file: refused
    with pytest.raises(ValueError, match="input_sha256"):
        convert_jsonl(src, out, **kw)


def test_shards_through_train_loader(media: Path, tmp_path: Path):
    from rynnscale.data.encode import SampleEncoder
    from rynnscale.data.loader import LoaderConfig, TrainLoader
    from rynnscale.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    src = _write(tmp_path / "d.jsonl", GOOD)
    out = tmp_path / "out"
    convert_jsonl(src, out, media_root=media, lines_per_shard=2, progress=False)
    hints = {}
    for s in read_manifest(out).shards:
        with tarfile.open(out / s.name) as tf:
            keys = list(dict.fromkeys(x.name.split(".", 1)[0] for x in tf.getmembers()))
        hints.update(zip(keys, s.sample_costs["num_tokens"]))
    loader = TrainLoader(LoaderConfig(train_shards=[str(out / "*.tar")], micro_batch_tokens=8192, pack_window=4,
                                      shuffle_buffer=0, num_workers=0, num_epochs=1), SampleEncoder(load_tokenizer()))
    keys = []
    for b in (b for st in loader for b in st.micro_batches):
        b.validate()
        keys += b.sample_keys
        assert (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist() == [hints[k] for k in b.sample_keys]
        assert b.pixel_values is not None and b.pixel_values_videos is not None
    assert sorted(keys) == sorted(hints) and len(keys) == 3 and loader.bad_counts == {}


@pytest.mark.parametrize("cost_hints", [False, True])
def test_numbers_too_large_for_a_float_are_bad_lines(media: Path, tmp_path: Path, cost_hints: bool):
    """A 400-digit integer as a line's frame rate (``math.isfinite`` overflows on it) is a bad line, counted and
    named; the conversion goes on."""
    frames = [f"frames/{i:03d}.jpg" for i in range(4)]
    bad = [{**_turns([{"type": "video", "video": frames}], "a"), "fps": int("1" + "0" * 400)}]      # line 4
    src = _write(tmp_path / "data.jsonl", GOOD + bad)
    rep = convert_jsonl(src, tmp_path / "out", media_root=media, lines_per_shard=100, max_bad_fraction=1.0,
                        progress=False, cost_hints=cost_hints)
    assert rep["totals"] == {"lines": 4, "samples": 3, "bad_lines": 1}
    assert [b["line"] for b in rep["bad_items"]] == [4]


def test_a_line_whose_media_add_up_past_the_line_limit_is_a_bad_line(media: Path, tmp_path: Path):
    """Each media file was capped (max_media_bytes) but not their sum: a frame list may name any number of files,
    and the converter held the whole line in memory (a 2000-frame list of 1 GiB files: 2 TB). The line's media now
    share ``max_line_media_bytes`` (default the loader's max_sample_bytes, over which it would skip the sample
    anyway): the line is skipped and counted as too_large, naming the file that crossed it; the others convert."""
    frames = [f"frames/{i:03d}.jpg" for i in range(4)]
    sizes = [(media / f).stat().st_size for f in frames]
    long_list = [{**_turns([{"type": "video", "video": frames * 3}], "a"), "fps": 1}]            # line 4
    src = _write(tmp_path / "data.jsonl", GOOD + long_list)
    limit = sum(sizes) * 2                       # GOOD's 4-frame list fits; the 12-frame list does not
    rep = convert_jsonl(src, tmp_path / "out", media_root=media, lines_per_shard=100, max_bad_fraction=1.0,
                        progress=False, cost_hints=False, max_line_media_bytes=limit)
    assert rep["totals"] == {"lines": 4, "samples": 3, "bad_lines": 1}
    (bad,) = rep["bad_items"]
    assert bad["line"] == 4 and bad["reason"] == "too_large" and f"max_line_media_bytes={limit}" in bad["detail"]
    assert "frame 8" in bad["detail"], bad["detail"]       # the 9th file crosses 2x the 4 files' bytes
    # the default is the loader's per-sample cap, and it is not recorded (conversions begun before it resume)
    from rynnscale.data.reader import ReaderLimits
    from rynnscale.data_pipelines.jsonl import JsonlConfig

    assert JsonlConfig(media_root=str(media)).max_line_media_bytes == ReaderLimits().max_sample_bytes
    assert "max_line_media_bytes" not in JsonlConfig(media_root=str(media), cost_hints=False).settings()
