"""`rynnscale train` end to end on the demo recipe (shortened): files written, metrics complete, loss falls."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
METRIC_KEYS = {"step", "loss", "aux_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "expert_load_max_over_mean",
               "model_tflops_per_s", "mfu"}


@pytest.mark.slow
def test_demo_recipe_trains_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rynnscale", "train", str(REPO / "recipes" / "demo_tiny.yaml"),
           f"run.output_dir={out}", "train.max_steps=40", "data.synthetic.num_samples=300",
           "data.synthetic.samples_per_shard=100", "logging.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    for r in records:
        assert METRIC_KEYS <= r.keys(), METRIC_KEYS - r.keys()
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["expert_load_max_over_mean"] >= 1.0
        assert r["model_tflops_per_s"] > 0 and r["mfu"] is None    # no peak rate is known for a CPU
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert first > 11 and last < first - 2, (first, last)  # starts at ~ln(151936) and falls clearly
    assert records[0]["lr"] < records[9]["lr"]              # warmup
    assert (out / "config.yaml").is_file() and (out / "training.png").stat().st_size > 10_000
    assert (out / "synthetic_data" / "manifest.json").is_file()
    assert any((out / "wandb").glob("offline-run-*")), "wandb should log offline by default"


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # Inductor compiles C++ on the CPU (~30 s)
def test_compiled_run_matches_eager_run(tmp_path):
    """model.compile=true trains the demo to the same per-step losses as eager (rel 1e-5: Inductor
    reorders fp32 sums); rows change length every step, so this also covers dynamic-shape recompiles."""
    data = tmp_path / "data"
    common = [str(REPO / "recipes" / "demo_tiny.yaml"), "train.max_steps=4", "data.synthetic.num_samples=60",
              f"data.synthetic.output_dir={data}", "checkpoint.every_steps=0", "logging.progress=false"]
    outs = {}
    for name, extra in (("eager", []), ("compiled", ["model.compile=true"])):
        outs[name] = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "rynnscale", "train", *common, f"run.output_dir={outs[name]}",
                               *extra], capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    eager, compiled = _losses(outs["eager"]), _losses(outs["compiled"])
    assert len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_liger_kernels_on_cpu_fail_fast_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rynnscale", "train", str(REPO / "recipes" / "demo_tiny.yaml"),
                           f"run.output_dir={tmp_path / 'run'}", "model.kernels=liger", "logging.progress=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "model.kernels=liger needs a CUDA device" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "synthetic_data").exists()  # failed before any data work
