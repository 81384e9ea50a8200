"""`rynnscale data inspect`: counts, durations, token / vision-token numbers against the real
SampleEncoder's encode (the oracle), sources/tasks, bad samples by reason, text histograms and
`--json` through the CLI."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from rynnscale.data.manifest import read_manifest
from rynnscale.data_pipelines.shard_stats import REPORT_NAME, format_histogram, format_report, histogram, inspect_shards
from rynnscale.data_pipelines.shards import ShardWriter
from rynnscale.data_pipelines.synthetic import generate_synthetic, synthetic_sample


def test_histograms():
    h = histogram([1263, 1264, 1264, 1265, 1266], bins=10, integer=True)
    assert h == {"edges": [1263, 1264, 1265, 1266, 1267], "counts": [1, 2, 1, 1], "integer": True}
    h = histogram(list(range(100)), bins=10, integer=True)
    assert h["counts"] == [10] * 10 and h["edges"][:3] == [0, 10, 20]
    h = histogram([0.5, 1.0, 1.5, 2.0], bins=3)
    assert h["counts"] == [1, 1, 2] and h["edges"] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert histogram([], 5)["counts"] == [] and format_histogram(histogram([], 5)) == "  (no data)"
    text = format_histogram({"edges": [0, 10, 20], "counts": [5, 2], "integer": True}, width=8)
    assert text.splitlines() == ["    0 – 9 │████████│ 5", "  10 – 19 │███▎    │ 2"]  # 2/5 of 8 cells = 3 2/8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """6 synthetic samples (2 shards) + a shard of 3 broken samples, and a converter report."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("inspect")
    generate_synthetic(d, 6, seed=2, frames=4, width=64, height=64, fps=2.0, samples_per_shard=3, progress=False)
    _, good = synthetic_sample(100, seed=2)
    with ShardWriter(d, "broken", max_samples=10, start_index=0) as w:
        w.write("bad-json", {**good, "conv.json": b"{not json"})
        w.write("bad-member-ref", {**good, "conv.json": good["conv.json"].replace(b"video.mp4", b"video.cam.mp4")})
        w.write("bad-video", {**good, "video.mp4": b"\x00" * 64})
    (d / REPORT_NAME).write_text(json.dumps({"converter": "jsonl", "totals": {"lines": 10}, "bad": {"unsafe_path": 2}}))
    return d


def test_inspect_counts_tokens_and_bad_reasons(dataset: Path):
    from rynnscale.data.encode import SampleEncoder
    from rynnscale.data.reader import iter_tar_samples
    from rynnscale.data.tokenizer import load_tokenizer

    r = inspect_shards(dataset)
    m = read_manifest(dataset)
    assert r["manifest"]["shards"] == 3 and r["manifest"]["samples"] == 9 == r["samples_read"]
    assert r["manifest"]["bytes"] == m.total_bytes == sum(p.stat().st_size for p in dataset.glob("*.tar"))
    assert r["bad"] == {"bad_json": 1, "bad_schema": 1, "undecodable_video": 1}
    assert any("bad-member-ref" in e for e in r["bad_examples"]["bad_schema"])
    # oracle: the real encoder's output lengths and vision tokens for the good samples
    enc = SampleEncoder(load_tokenizer())
    toks, vis = [], []
    for s in m.shards:
        if s.name.startswith("synthetic"):
            for raw in iter_tar_samples(str(dataset / s.name)):
                e = enc.encode(raw.key, raw.members)
                toks.append(e.num_tokens)
                vis.append(e.num_vision_patches // 4)
    assert r["tokens"]["count"] == 6 and r["tokens"]["sum"] == sum(toks)
    assert (r["tokens"]["min"], r["tokens"]["max"]) == (min(toks), max(toks))
    assert r["vision_tokens"]["sum"] == sum(vis) and sum(r["tokens"]["histogram"]["counts"]) == 6
    # 4 frames at 2 fps: 2 s per clip (the schema-valid sample with a broken video counts too)
    assert r["duration_s"]["count"] == 7 and r["duration_s"]["min"] == r["duration_s"]["max"] == 2.0
    assert r["sources"] == {"synthetic": 7} and r["embodiments"] == {"head_camera": 7}
    assert r["converter_report"]["bad"] == {"unsafe_path": 2}
    text = format_report(r)
    for want in ("shards: 3", "samples: 9", "bad_json 1", "undecodable_video 1", "unsafe_path 2", "tokens per sample", "█"):
        assert want in text, want


def test_shard_problems_manifest_hints_and_cli(dataset: Path, tmp_path: Path, capsys):
    from rynnscale.cli import main

    r = inspect_shards(dataset, estimate=False, max_samples=4)
    assert r["samples_read"] == 4 and not r["complete"] and r["tokens"]["from"] == "manifest"
    assert r["tokens"]["count"] == 0  # the synthetic manifest has raw-size hints only (no num_tokens)
    d = tmp_path / "copy"
    d.mkdir()
    for p in dataset.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    name = read_manifest(d).shards[0].name
    with open(d / name, "r+b") as f:  # cut the first shard: listed size no longer matches, last sample corrupt
        f.truncate(3000)
    assert main(["data", "inspect", str(d), "--json", "--no-estimate"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["shard_problems"] == [f"{name}: 3000 bytes, the manifest says {read_manifest(d).shards[0].num_bytes}"]
    assert out["bad"].get("corrupt_tar") == 1
    assert main(["data", "inspect", str(dataset)]) == 0
    assert "bad samples: bad_json 1" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "nowhere")]) == 2
    with tarfile.open(dataset / read_manifest(dataset).shards[-1].name) as tf:  # the report's inputs are unchanged
        assert len(tf.getmembers()) > 0
