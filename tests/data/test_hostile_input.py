"""One hostile sample must never stop training or ``rynnscale data inspect`` (issue 17): JSON nested 200k
deep (RecursionError), a 5000-digit integer (int-str conversion limit), a lone surrogate in text (tokenizer
TypeError). Each becomes a counted ``bad_json`` skip naming the sample key, under ``data.max_bad_fraction``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rynnscale.data.encode import SampleEncoder, SampleError
from rynnscale.data.loader import LoaderConfig, TrainLoader
from rynnscale.data.reader import iter_tar_samples
from rynnscale.data.tokenizer import load_tokenizer
from rynnscale.data_pipelines.shard_stats import inspect_shards
from rynnscale.data_pipelines.shards import ShardWriter
from rynnscale.data_pipelines.synthetic import generate_synthetic

GOOD = {"conversation": [{"role": "user", "content": "Where is the cup?"},
                         {"role": "assistant", "content": "On the table."}]}
DEEP = b"[" * 200_000 + b"]" * 200_000
BIGINT = b'{"conversation": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "n": ' + \
    b"9" * 5000 + b"}"
SURROGATE = json.dumps({"conversation": [{"role": "user", "content": "bad \ud800 text"},
                                         {"role": "assistant", "content": "ok"}]}).encode()
PAIR = json.dumps({"conversation": [{"role": "user", "content": "emoji \U0001F600"},
                                    {"role": "assistant", "content": "ok"}]}).encode()   # \ud83d\ude00: valid
HOSTILE = {"deep": (DEEP, "nested too deeply"), "bigint": (BIGINT, "integer string conversion"),
           "surrogate": (SURROGATE, "lone surrogate")}


@pytest.fixture(scope="module")
def enc():
    return SampleEncoder(load_tokenizer())


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_encoder_turns_hostile_json_into_bad_json(enc, name):
    raw, detail = HOSTILE[name]
    for call in (enc.encode, enc.estimate):
        with pytest.raises(SampleError) as ei:
            call(f"key-{name}", {"conv.json": raw})
        assert ei.value.reason == "bad_json" and ei.value.key == f"key-{name}" and detail in ei.value.detail


def test_valid_surrogate_pair_escape_still_encodes(enc):
    assert b"\\ud83d\\ude00" in PAIR
    assert enc.encode("emoji", {"conv.json": PAIR}).num_tokens > 0


def _dataset(tmp_path: Path) -> Path:
    """Synthetic samples (valid meta.json) rewritten with three hostile conv.json among them."""
    src = tmp_path / "src"
    generate_synthetic(src, 9, seed=1, samples_per_shard=9, progress=False)
    samples = [s for shard in sorted(src.glob("*.tar")) for s in iter_tar_samples(str(shard))]
    out = tmp_path / "hostile"
    with ShardWriter(out, max_samples=4) as w:
        for i, s in enumerate(samples):
            members = dict(s.members)
            if i < len(HOSTILE):
                members["conv.json"] = HOSTILE[sorted(HOSTILE)[i]][0]
            w.write(s.key, members)
    return out


def test_loader_skips_and_counts_them(tmp_path, enc):
    d = _dataset(tmp_path)
    cfg = LoaderConfig(train_shards=[str(d / "*.tar")], micro_batch_tokens=4096, pack_window=4, shuffle_buffer=0,
                       num_workers=0, num_epochs=1, max_bad_fraction=0.5)
    loader = TrainLoader(cfg, enc)
    keys = [k for st in loader for b in st.micro_batches for k in b.sample_keys]
    assert len(keys) == 6 and loader.bad_counts == {"bad_json": 3}


def test_data_inspect_counts_them(tmp_path):
    d = _dataset(tmp_path)
    for estimate in (True, False):
        rep = inspect_shards(d, estimate=estimate)
        assert sum(rep["bad"].values()) == 3 and rep["bad"]["bad_json"] >= 2, rep["bad"]   # counted, no crash
        assert any("nested too deeply" in x for x in rep["bad_examples"]["bad_json"])
        assert any("integer string conversion" in x for x in rep["bad_examples"]["bad_json"])


def test_jsonl_converter_counts_them_and_goes_on(tmp_path):
    """Issue 27.3: the same inputs as jsonl lines (JSON nested 100k deep, a 5000-digit integer, a lone surrogate;
    plus an ``extra`` nested just under the parser's limit, which json.dumps then has to write) among good lines:
    before, the first one aborted the whole conversion with a traceback and no report. Now each is a bad line
    counted by reason in convert_report.json, naming its line, and the good lines become samples."""
    import sys

    from rynnscale.data_pipelines.jsonl import convert_jsonl

    depth = sys.getrecursionlimit() - 60
    deep_extra = json.dumps({**GOOD, "extra": {"x": json.loads("[" * depth + "]" * depth)}}).encode()
    hostile = [b"[" * 100_000 + b"]" * 100_000, BIGINT, SURROGATE, deep_extra]
    lines = [json.dumps(GOOD).encode()] + hostile + [json.dumps(GOOD).encode()]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "media").mkdir()
    rep = convert_jsonl(src, tmp_path / "out", media_root=tmp_path / "media", max_bad_fraction=1.0, progress=False,
                        cost_hints=False)
    saved = json.loads((tmp_path / "out" / "convert_report.json").read_text())
    assert saved["totals"] == rep["totals"] and saved["complete"] is True
    by_line = {b["line"]: b for b in saved["bad_items"]}
    assert by_line[2]["reason"] == "bad_json" and "nested too deeply" in by_line[2]["detail"], by_line
    assert by_line[3]["reason"] == "bad_json" and "integer string conversion" in by_line[3]["detail"]
    assert by_line[4]["reason"] == "bad_json" and "lone surrogate" in by_line[4]["detail"]
    assert all(f"line {n}" in by_line[n]["detail"] for n in (2, 3, 4))
    good = rep["totals"]["samples"]
    assert good + rep["totals"]["bad_lines"] == 6 and good >= 2   # the deep extra: a sample or a counted bad line
    assert sum(rep["bad"].values()) == rep["totals"]["bad_lines"] and rep["bad"]["bad_json"] >= 3
