"""Smoke test of bench/train_step.py's Qwen3.5-MoE case on CPU at tiny shapes: transformers' and rynnscale's
first-step losses agree (rel 1e-5, fp32), liger is n/a (no Qwen3.5 patches), the step-time breakdown sees the
DeltaNet layers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers.models.qwen3_5")
ROOT = Path(__file__).resolve().parents[2]


def test_tiny_qwen35_moe_case_runs_and_losses_agree(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--tiny", "--cases", "q35moe",
                           "--steps", "1", "--warmup", "0", "--ckpt", "none", "--json", str(out_json)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    assert data["loss_ok"] and data["loss_rtol"] == 1e-5
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["ours"]["tokens_per_s"] > 0 and rows["hf"]["tokens_per_s"] > 0
    assert "Qwen3.5" in rows["liger"].get("na", "") or "liger_kernel" in rows["liger"].get("na", "")
    assert "linear attention" in proc.stdout and data["flops"]["q35moe"]["text_attention"] > 0
