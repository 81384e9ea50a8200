"""`rynnscale train` on the demo recipe (shortened): kernels refused on CPU. Compiled vs eager through the CLI
runs in tests/parallel/test_torchrun.py; the quick start itself (files written, metrics complete, loss falls)
runs as the README writes it in tests/test_readme.py."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_liger_kernels_on_cpu_fail_fast_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rynnscale", "train", str(REPO / "recipes" / "demo_tiny.yaml"),
                           f"run.output_dir={tmp_path / 'run'}", "model.kernels=liger", "logging.progress=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "model.kernels=liger needs a CUDA device" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "synthetic_data").exists()  # failed before any data work
