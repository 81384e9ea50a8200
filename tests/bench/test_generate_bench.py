"""Smoke test of bench/generate.py on CPU: every variant runs, rynnscale's KV-cache and cache-less generations
equal transformers' ``generate`` token for token (the script exits 1 otherwise), and the table prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
