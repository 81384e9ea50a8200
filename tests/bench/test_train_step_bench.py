"""bench/train_step.py's other variants on CPU at tiny shapes. Its default variants on every case (losses against
transformers, the table, the step-time breakdown) run in bench/gpu_check.sh's dry run
(tests/bench/test_gpu_check.py::check_bench_case)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bench.bench_scripts import load_bench_script

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "train_step.py"


def _load_bench():
    return load_bench_script("train_step")


@pytest.mark.slow  # Inductor's C++ compile on the CPU
def test_torch_and_compiled_variants_run_and_agree(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--steps", "1", "--warmup", "1", "--ckpt", "full",
                           "--cases", "a3b", "--variants", "hf,ours-torch,ours-compile", "--json", str(out_json)],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert set(rows) == {"hf", "ours-torch", "ours-compile"}
    for v in ("ours-torch", "ours-compile"):
        assert "error" not in rows[v], rows[v].get("error")
        assert rows[v]["loss_ok"] and rows[v]["x_hf"] > 0
        assert rows[v]["breakdown"] is None  # only the default variant is profiled
    assert f"{'a3b':8} {'ours-compile':12} {'full':9}" in proc.stdout


def test_loss_mismatch_is_flagged():
    bench = _load_bench()
    rows = [dict(case="a3b", variant="hf", ckpt="none", tokens_per_s=100.0, losses=[2.0]),
            dict(case="a3b", variant="ours", ckpt="none", tokens_per_s=150.0, losses=[2.0 * (1 + 3e-5)])]
    assert bench.add_comparisons(rows, rtol=1e-5) is False
    assert rows[1]["loss_ok"] is False and abs(rows[1]["x_hf"] - 1.5) < 1e-12
    rows[1]["losses"] = [2.0 * (1 + 5e-6)]
    assert bench.add_comparisons(rows, rtol=1e-5) is True


def test_packed_doc_lengths():
    bench = _load_bench()
    for seed in range(5):
        lens = bench.doc_lengths(16384, 200, 6000, seed)
        assert sum(lens) == 16384 and len(lens) >= 3
        assert all(200 <= n for n in lens) and max(lens) <= 6000 + 200


def test_both_sides_train_on_the_same_loss_every_step():
    """Same work on both sides: ours must not add its MoE load-balancing term while transformers (no
    output_router_logits) trains on the cross-entropy alone, or the runs diverge after the first update
    (that gap was 7.9e-6 rel by step 3; same-loss fp32 runs agree to ~1e-7)."""
    bench = _load_bench()
    case = bench.build_case("a3b", tiny=True)
    torch.manual_seed(0)
    weights = {k: v.detach().clone() for k, v in bench.build_hf(case.args, torch.device("cpu"), torch.float32)
               .state_dict().items()}
    flops = bench.StepFlops(1.0, 1.0, 1.0)
    rows = [bench.run_variant(v, case, weights, "none", torch.device("cpu"), torch.float32, steps=3, warmup=0,
                              flops=flops, ceiling=1.0, profile=False) for v in ("hf", "ours-torch")]
    assert bench.add_comparisons(rows, rtol=1e-5)
    assert rows[1]["loss_max_rel_vs_hf"] <= 1e-6, (rows[0]["losses"], rows[1]["losses"])


def test_ours_is_compared_with_the_fastest_liger_row_and_its_peak_memory():
    """The A3B target is "ours >= 1.25x transformers + liger's best at no more peak memory": the best row is
    liger's fastest over every ckpt mode, and ours' peak is set against that row's (here 40 vs 32 GiB)."""
    bench = _load_bench()
    rows = [dict(case="a3b", variant="hf", ckpt="none", tokens_per_s=100.0, peak_gib=60.0, losses=[2.0]),
            dict(case="a3b", variant="liger", ckpt="none", tokens_per_s=300.0, peak_gib=32.0, losses=[2.0]),
            dict(case="a3b", variant="liger", ckpt="full", tokens_per_s=250.0, peak_gib=25.0, losses=[2.0]),
            dict(case="a3b", variant="ours", ckpt="full", tokens_per_s=390.0, peak_gib=40.0, losses=[2.0])]
    assert bench.add_comparisons(rows, rtol=1e-5)
    ours = rows[3]
    assert abs(ours["x_liger"] - 390 / 250) < 1e-12          # same ckpt
    assert abs(ours["x_best_liger"] - 1.3) < 1e-12 and ours["best_liger_ckpt"] == "none"
    assert abs(ours["peak_vs_best_liger"] - 1.25) < 1e-12    # faster, but at more memory than that row
    for r in rows:
        r |= dict(tflops=1.0, mfu=0.5)
    table = bench.format_table(rows, 1.0, "cpu", torch.float32)
    assert "pkxBLig" in table and table.splitlines()[-1].rstrip().endswith("1.25")
    driver = load_bench_script("gpu_check")
    assert driver._vs_best_liger(ours) == " 1.30x best liger (none, 1.25x its peak)"


def test_a_case_that_cannot_be_set_up_is_reported_and_the_next_case_runs(tmp_path, monkeypatch, capsys):
    """E.g. q35moe on a transformers without Qwen3.5, or an out-of-memory building the reference weights:
    that case's rows say so, the next case is still measured, the table prints, and the exit status is 1."""
    bench = _load_bench()
    real_build_case = bench.build_case

    def build_case(name, *a, **kw):
        if name == "a3b":
            raise ImportError("transformers has no Qwen3VLMoe here")
        return real_build_case(name, *a, **kw)

    monkeypatch.setattr(bench, "build_case", build_case)
    out_json = tmp_path / "bench.json"
    rc = bench.main(["--tiny", "--cases", "a3b,packed", "--variants", "hf,ours-torch", "--steps", "1", "--warmup", "0",
                     "--json", str(out_json)])
    assert rc == 1
    rows = {(r["case"], r["variant"]): r for r in json.loads(out_json.read_text())["rows"]}
    assert "ImportError: transformers has no Qwen3VLMoe here" in rows["a3b", "hf"]["error"]
    assert "error" in rows["a3b", "ours-torch"]
    assert rows["packed", "ours-torch"]["loss_ok"] and rows["packed", "ours-torch"]["x_hf"] > 0
    out = capsys.readouterr().out
    assert "ERROR: case setup: ImportError" in out and "FLOPs/step packed" in out




def test_lora_step_is_not_compared_with_a_transformers_full_step():
    """ours-lora trains adapters only (no weight gradient for the frozen base): its tokens/s over transformers'
    full fine-tune read as a speed-up of ours (1.82x "xHF" on the tiny video case) that is the work LoRA skips, not
    the implementation. It is set against ours' full step (``x_ours``), in the table and in gpu_check's summary."""
    bench = _load_bench()
    rows = [dict(case="video", variant="hf", ckpt="none", tokens_per_s=100.0, step_alloc_gib=2.0, peak_gib=9.0,
                 losses=[2.0]),
            dict(case="video", variant="ours", ckpt="none", tokens_per_s=120.0, step_alloc_gib=1.5, peak_gib=8.0,
                 losses=[2.0]),
            dict(case="video", variant="ours-lora", ckpt="none", tokens_per_s=180.0, step_alloc_gib=1.0, peak_gib=6.0,
                 losses=[2.0])]
    assert bench.add_comparisons(rows, rtol=1e-5)
    lora = rows[2]
    assert not any(k.startswith(("x_hf", "x_liger", "x_best", "mem_vs", "peak_vs")) for k in lora), lora
    assert abs(lora["x_ours"] - 1.5) < 1e-12 and abs(rows[1]["x_hf"] - 1.2) < 1e-12
    lora |= dict(mfu=0.4)
    key = load_bench_script("gpu_check").bench_row_key(lora)
    assert key == "ours-lora/none 180 tok/s 1.50x ours full MFU 40%", key


def test_lora_variant_flops_leave_out_the_frozen_weights_gradients():
    """ours-lora's TFLOP/s and MFU were the full fine-tune's FLOPs over the LoRA step's time (MFU high by the
    frozen weights' gradients). Its FLOPs must be those of the model the variant builds (its trainable set)."""
    from rynnscale.models.stats import batch_flops, param_stats

    bench = _load_bench()
    case = bench.build_case("video", tiny=True)
    torch.manual_seed(0)
    weights = bench.build_hf(case.args, torch.device("cpu"), torch.float32).state_dict()
    model = bench.build_ours(case.args, weights, torch.device("cpu"), torch.float32, lora=True)
    lora, full = bench.variant_flops(case, "ours-lora"), bench.variant_flops(case, "hf")
    assert lora.total == batch_flops(case.args, param_stats(model), case.batch).total
    assert lora.total < full.total and lora.vision < 0.5 * full.vision   # a frozen tower runs forward only
