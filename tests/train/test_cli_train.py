"""`rynnscale train` on the demo recipe (shortened): compiled vs eager, kernels refused on CPU. The quick start
itself (files written, metrics complete, loss falls) runs as the README writes it in tests/test_readme.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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
