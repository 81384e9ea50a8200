"""Text-length bombs (issue 27.2): a 10 MB conv.json of digits (10M tokens) is under every byte cap; it used to be
tokenised whole before being found too long (a loader worker peaked at 5.8-7.8 GiB, ~25 s per read, and so did
``data inspect`` and ``data convert jsonl``, which size samples the same way). Text is now tokenised only until it
passes ``max_tokens`` (``tokenizer.BudgetTokenizer``), exactly: a sample that fits tokenises as before, bit for bit;
one that does not is ``too_long`` "more than N tokens".
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rynnscale.data.encode import EncoderConfig, SampleEncoder, SampleError
from rynnscale.data.tokenizer import BudgetTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[2]

# pieces the random texts are made of: every class the pre-tokenizer split tells apart, NFC compositions (e + U+0301,
# Hangul jamo, < + U+0338, the Kelvin sign), added tokens, and characters Python and the tokenizer may class apart
PALETTE = ["0", "7", "a", "Z", "ab", "hello", " ", "  ", "\t", "\n", "\r\n", "\n\n", ".", "-", "--", "'s", "'LL", "'",
           "!", "\x01", "\x1c", "\u00a0", "\u3000", "e\u0301", "\u0301", "<\u0338", ">", "=\u0338",
           "\u1100\u1161\u11a8", "\u212a", "\u4e2d\u6587", "\U0001F600", "<|im_start|>", "<think>", "</think>",
           "<|endoftext|>", "é", "ſ", "\u0660", "x1", "1x", " 1", "\u0085", "\u2028", "_", "\u200b"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def budget_tok(tok):
    return BudgetTokenizer(tok)   # its vocabulary statistics are built once


def random_text(rng: random.Random) -> str:
    words = rng.choices(PALETTE, k=rng.choice([5, 50, 300, 1500]))
    if rng.random() < 0.4:   # a long run of one piece: a stretch without cut points
        words.insert(rng.randrange(len(words) + 1), rng.choice(PALETTE) * rng.randint(50, 400))
    return "".join(words)


def test_windowed_tokenisation_is_exact_on_random_text(tok):
    """Ids and offsets in windows of 24 characters equal one call on the whole text (300 random texts); under a
    budget the ids are an exact prefix and the count it reports lies between the budget and the true count."""
    bt = BudgetTokenizer(tok, window=24)
    assert bt.why_whole is None
    rng = random.Random(0)
    for _ in range(300):
        text = random_text(rng)
        full = tok.encode(text, add_special_tokens=False)
        ids, offs = np.asarray(full.ids), np.asarray(full.offsets).reshape(-1, 2)
        got = bt.encode(text, 10**9, offsets=True)
        assert got.complete and np.array_equal(got.ids, ids) and np.array_equal(got.offsets, offs), repr(text[:300])
        budget = rng.randint(0, len(ids) + 3)
        part = bt.encode(text, budget)
        assert np.array_equal(part.ids, ids[: len(part.ids)]), repr(text[:300])
        if len(ids) <= budget:
            assert part.complete and len(part.ids) == len(ids)
        else:
            assert part.complete or budget < part.at_least <= len(ids), (budget, part.at_least, len(ids))


STRETCHES = {   # texts with no cut point: one piece, or pieces the split joins differently in every context
    "one control character": lambda: "\x01" * 100_000,
    "two alternating": lambda: "\x01\x02" * 20_000,
    "run and dashes": lambda: "\x01" * 30_000 + "-" * 300,
    "spaces": lambda: " " * 200_000,
    "random punctuation": lambda: "".join(random.Random(1).choices("!#$%&()*+,-./:;<=>?@[]^_`{|}~", k=150_000)),
    "random letters": lambda: "".join(random.Random(2).choices("abcdefghijklmnopqrstuvwxyz", k=150_000)),
    "random CJK": lambda: "".join(chr(c) for c in random.Random(3).choices(range(0x4E00, 0xA000), k=80_000)),
    "emoji": lambda: "".join(chr(c) for c in random.Random(4).choices(range(0x1F300, 0x1F650), k=20_000)),
    "decomposed Hangul": lambda: "\u1100\u1161\u11a8" * 20_000,   # not NFC: the tokenizer's normaliser is asked
    "combining marks": lambda: "a" + "\u0301\u0316" * 40_000,
}


@pytest.mark.parametrize("name", sorted(STRETCHES))
def test_stretch_bound_never_exceeds_the_true_count(tok, budget_tok, name):
    """The bound that lets a stretch with no cut point go untokenised is a lower bound: over the whole stretch and,
    with a small budget, over the first block of 65536 characters it returns after (the longer texts)."""
    bt = budget_tok
    text = STRETCHES[name]()
    true = len(tok.encode(text, add_special_tokens=False).ids)
    whole = bt.stretch_bound(text, 10**9)
    early = bt.stretch_bound(text, 10)
    assert 0 < whole <= true and early <= true, (name, whole, early, true)
    assert whole >= true / 200, (name, whole, true)   # and not a useless one


def conv(user: str, answer: str) -> bytes:
    return json.dumps({"conversation": [{"role": "user", "content": [{"type": "text", "text": user}]},
                                        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}).encode()


@pytest.mark.parametrize("truncate", [False, True])
def test_a_sample_that_fits_encodes_as_before(tok, truncate):
    """Long texts of every kind (a 60k-character question, an answer with action-bin digits and a mixed-label run)
    encode to the same ids, labels and positions in windows of 64 characters as in one call, also when truncated."""
    rng = random.Random(5)
    user = "".join(random_text(rng) for _ in range(8)).replace("<|im_start|>", "").replace("<|endoftext|>", "")
    answer = "Action bins:\n" + "\n".join(f"<frame {i}> " + " ".join(f"{rng.randrange(256):03d}" for _ in range(26))
                                          for i in range(60))
    members = {"conv.json": json.dumps({"conversation": [
        {"role": "user", "content": [{"type": "text", "text": user}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}, {"type": "text", "text": " done" * 3000}]},
    ]}).encode()}
    cap = 9_000 if truncate else 200_000   # ~15k tokens: truncated inside the answer
    whole = SampleEncoder(tok, EncoderConfig(max_tokens=cap, truncate=truncate))
    whole._budget_tok.why_whole = "test: one call"
    windows = SampleEncoder(tok, EncoderConfig(max_tokens=cap, truncate=truncate))
    windows._budget_tok = BudgetTokenizer(tok, window=64, must_be_added=whole.ids.structural())
    a, b = whole.encode("k", members), windows.encode("k", members)
    assert a.num_tokens == b.num_tokens and (a.num_tokens == cap) == truncate
    for f in ("input_ids_l", "labels_l", "position_ids_3l"):
        assert np.array_equal(getattr(a, f).numpy(), getattr(b, f).numpy()), f
    assert whole.estimate("k", members) == windows.estimate("k", members)


def test_a_text_bomb_is_too_long_after_one_window(tok):
    """10M digits in the question: before, 10M tokens (25 s, 7 GiB); now a too_long naming more than the budget
    after tokenising one window, by encode and estimate alike; a special token past the stopping point is still
    found (bad_conversation, as when the whole text was tokenised)."""
    enc = SampleEncoder(tok)
    bomb = conv("0123456789" * 1_000_000, "ok")
    assert len(bomb) < enc.cfg.max_json_bytes
    for call in (enc.estimate, enc.encode):
        t = time.perf_counter()
        with pytest.raises(SampleError) as ei:
            call("bomb", {"conv.json": bomb})
        took = time.perf_counter() - t
        assert ei.value.reason == "too_long", ei.value.detail
        assert re.match(r"more than \d+ tokens > max_tokens=16384", ei.value.detail), ei.value.detail
        assert took < 10, f"{call.__name__} took {took:.1f} s"
    with pytest.raises(SampleError, match="bad_conversation.*special tokens"):
        enc.estimate("late", {"conv.json": conv("1" * 100_000 + "<|im_start|>", "ok")})
    letters = conv("a" * 10_000_000, "ok")   # one 10M-character piece: refused by its bound, never tokenised
    t = time.perf_counter()
    with pytest.raises(SampleError, match="more than"):
        enc.estimate("run", {"conv.json": letters})
    assert time.perf_counter() - t < 10


# ------------------------------------------------------------------------------ measured peak of a loader worker

#: Stated bound on a loader worker's, ``data inspect``'s and ``data convert jsonl``'s peak RSS growth over their
#: baseline for these text bombs (README: the text term of the per-worker bound). Before: 5.8-7.8 GiB.
TEXT_PEAK_GROWTH_BOUND_MIB = 256
#: Wall time of all three over these samples (measured 3-15 s on a shared 2-core machine); before: > 75 s.
TEXT_WALL_BOUND_S = 120

_TEXT_WORKER = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (5 << 30, 5 << 30))   # the old path needed ~7 GiB: fail, do not swap
sys.path.insert(0, sys.argv[1])
from rynnscale.data.encode import SampleEncoder
from rynnscale.data.loader import LoaderConfig, TrainLoader
from rynnscale.data.tokenizer import load_tokenizer
from rynnscale.data_pipelines.jsonl import convert_jsonl
from rynnscale.data_pipelines.shard_stats import get_estimator, inspect_shards
shards, jsonl, media, out = json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
enc = SampleEncoder(load_tokenizer())
get_estimator()   # what data inspect and the converter's cost hints use, loaded once

def kib(field):   # VmRSS / VmHWM (peak) of this process
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(field + ":")))

open("/proc/self/clear_refs", "w").write("5")   # the peak restarts here: loading two tokenizers peaks higher
base = kib("VmRSS")
t = time.perf_counter()
cfg = LoaderConfig(train_shards=shards, micro_batch_tokens=16384, pack_window=4, shuffle_buffer=4, num_workers=0,
                   num_epochs=1, max_bad_fraction=1.0, tune_malloc=False)
loader = TrainLoader(cfg, enc)
keys = [k for st in loader for b in st.micro_batches for k in b.sample_keys]
rep = inspect_shards(shards[0].rsplit("/", 1)[0])
conv = convert_jsonl(jsonl, out, media_root=media, max_bad_fraction=1.0, progress=False)
took = time.perf_counter() - t
peak = kib("VmHWM")
print(json.dumps({"keys": keys, "bad": loader.bad_counts, "inspect_bad": rep["bad"], "convert_bad": conv["bad"],
                  "base_kib": base, "peak_kib": peak, "seconds": took}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_text_bombs_peak_rss_and_time_are_bounded(tmp_path):
    from rynnscale.data_pipelines.shards import ShardWriter

    bombs = {"digits": "0123456789" * 1_000_000, "letters": "a" * 10_000_000,
             "mixed": "1 a, " * 2_000_000}
    d = tmp_path / "shards"
    meta = json.dumps({"source": "test", "licence": "MIT", "task": ""}).encode()
    fits = " " * (1 << 18)   # one 256 KiB piece that fits (2049 tokens): the bound cannot refuse it, it is tokenised
    with ShardWriter(d, max_samples=100) as w:
        for k, text in bombs.items():
            w.write(k, {"meta.json": meta, "conv.json": conv(text, "ok")})
        w.write("good", {"meta.json": meta, "conv.json": conv("Where is the cup?", "On the table.")})
        w.write("spaces", {"meta.json": meta, "conv.json": conv(fits, "ok")})
    (tmp_path / "media").mkdir()
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(b"\n".join(json.dumps({"conversation": json.loads(conv(t, "ok"))["conversation"]}).encode()
                                 for t in list(bombs.values()) + ["Where is the cup?"]) + b"\n")
    args = [str(REPO), json.dumps(sorted(str(p) for p in d.glob("*.tar"))), str(jsonl), str(tmp_path / "media"),
            str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "-c", _TEXT_WORKER, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    growth_mib = (out["peak_kib"] - out["base_kib"]) / 1024
    print(f"text bombs: baseline {out['base_kib'] / 1024:.0f} MiB, peak {out['peak_kib'] / 1024:.0f} MiB, growth "
          f"{growth_mib:.0f} MiB (bound {TEXT_PEAK_GROWTH_BOUND_MIB}), {out['seconds']:.1f} s (bound {TEXT_WALL_BOUND_S})")
    assert sorted(out["keys"]) == ["good", "spaces"] and out["bad"] == {"too_long": 3}, out
    assert out["inspect_bad"] == {"too_long": 3} and out["convert_bad"] == {"too_long": 3}, out
    assert growth_mib < TEXT_PEAK_GROWTH_BOUND_MIB, out
    assert out["seconds"] < TEXT_WALL_BOUND_S, out


def test_another_tokenizer_pipeline_is_tokenised_whole(tok):
    """Cut points are proven for Qwen2's split only: with another pre-tokenizer every text is one call (exact,
    unbounded, as before), and the reason is named."""
    from tokenizers import Tokenizer, pre_tokenizers

    other = Tokenizer.from_str(tok.to_str())
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    bt = BudgetTokenizer(other, window=16)
    assert bt.why_whole == "pre-tokenizer is not Qwen2's split + byte level"
    text = "12 34 abc " * 100
    got = bt.encode(text, 5)
    assert got.complete and got.ids.tolist() == other.encode(text, add_special_tokens=False).ids
    assert BudgetTokenizer(tok, must_be_added=[5]).why_whole == "ids [5] are not added tokens"
