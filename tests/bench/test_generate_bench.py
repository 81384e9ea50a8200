"""Smoke test of bench/generate.py on CPU: every variant runs, rynnscale's KV-cache and cache-less generations
equal transformers' ``generate`` token for token (the script exits 1 otherwise), and the table prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parents[2]


def test_generate_bench_runs_and_matches_transformers(tmp_path: Path) -> None:
    out = tmp_path / "gen.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "generate.py"), "--hidden", "64", "--layers", "2",
                           "--new-tokens", "4", "--repeats", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "new tok/s" in proc.stdout and "CPU" in proc.stdout
    data = json.loads(out.read_text())
    assert data["ok"] and set(data["rows"]) == {"ours-kv-batch", "ours-kv", "ours-nocache", "hf", "hf-batch"}
    assert all(r["matches_hf"] for k, r in data["rows"].items() if k.startswith("ours"))
    assert all(r["new_tokens"] == 4 * len(data["prompt_tokens"]) for r in data["rows"].values())


def test_every_variant_is_warmed_up_before_it_is_timed() -> None:
    """Only ``ours-kv-batch`` and ``hf`` were warmed up: the first (timed) call of the others carried their first-call
    costs, the whole figure with ``--repeats 1``. A variant whose first call burns CPU is now timed without it."""
    import time

    bench = load_bench_script("generate")
    calls = {"ours-kv-batch": 0, "ours-nocache": 0, "hf-batch": 0}

    def variant(name: str):
        def run():
            calls[name] += 1
            if calls[name] == 1:                 # first-call cost: 0.3 s of CPU
                t0 = time.process_time()
                while time.process_time() - t0 < 0.3:
                    pass
            return [[calls[name]]]
        return run

    results, times = bench.timed_passes({name: variant(name) for name in calls}, repeats=1)
    assert calls == dict.fromkeys(calls, 2) and results == dict.fromkeys(calls, [[2]])
    assert all(t == [pytest.approx(0.0, abs=0.1)] for t in times.values()), times
