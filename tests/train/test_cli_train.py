"""`rynnscale train` on the demo recipe (shortened): kernels refused on CPU; settings found at run start (a
freeze pattern or LoRA target matching nothing, shards matching no file, model.attn_backend=varlen or run.device=cuda
without a GPU) are brief
messages with exit code 2, not tracebacks. Compiled vs eager through the CLI
runs in tests/parallel/test_torchrun.py; the quick start itself (files written, metrics complete, loss falls)
runs as the README writes it in tests/test_readme.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}   # this checkout's code


def test_liger_kernels_on_cpu_fail_fast_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rynnscale", "train", str(REPO / "recipes" / "demo_tiny.yaml"),
                           f"run.output_dir={tmp_path / 'run'}", "model.kernels=liger", "logging.progress=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model.kernels=liger needs a CUDA device" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "synthetic_data").exists()  # failed before any data work


@pytest.mark.parametrize("overrides, message", [
    (["model.freeze=[nothing*]"], "config key 'model.freeze[0]' = 'nothing*' matches no parameter"),
    (["model.lora.rank=4", "model.lora.targets=[nomatch*]"], "model.lora: no module matches targets"),
    (["model.lora.rank=4", "model.lora.targets=['*.self_attn.q_proj', lm_head]"],
     "model.lora.targets pattern 'lm_head' matches lm_head (LMHead): LoRA adapts nn.Linear modules only"),
    (["data.train_shards=/nonexistent/*.tar"], "shard pattern '/nonexistent/*.tar' matches no file"),
    pytest.param(["model.attn_backend=varlen"], "model.attn_backend=varlen needs a CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")),
    pytest.param(["run.device=cuda"], "config key 'run.device' = 'cuda' but no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")),
])
def test_settings_found_at_run_start_are_brief_with_exit_code_2(tmp_path, overrides, message):
    proc = subprocess.run([sys.executable, "-m", "rynnscale", "train", str(REPO / "recipes" / "demo_tiny.yaml"),
                           f"run.output_dir={tmp_path / 'run'}", "logging.progress=false", *overrides],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120, env=ENV)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_overrides_may_follow_option_flags(capsys):
    """``train RECIPE --print-config k=v``: argparse alone refused the override after the flag."""
    from rynnscale.cli import main

    assert main(["train", str(REPO / "recipes" / "demo_tiny.yaml"), "train.max_steps=5", "--print-config",
                 "train.max_steps=7", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "lr: 0.5" in out
    with pytest.raises(SystemExit):
        main(["train", str(REPO / "recipes" / "demo_tiny.yaml"), "--print-config", "--bogus"])


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.dp_replicate=2"], 3, "parallel.dp_replicate=2 does not divide the world size 3"),
    (["parallel.cp=2", "parallel.dp_shard=2"], 6, "must equal the world size 6"),
])
def test_layout_the_world_size_cannot_take_is_a_brief_config_error(overrides, world, message):
    """The launch's layout check (world size known only under torchrun) raises the recipe's ``ConfigError``, which
    every rank reports in one line with exit code 2 (``report_failures``' brief types), not a traceback per rank."""
    from rynnscale.config import ConfigError, load_config
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.train.build import resolve_run

    cfg = load_config(REPO / "recipes" / "demo_tiny.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        resolve_run(cfg, DistContext(world_size=world))


def test_an_output_dir_that_cannot_be_created_is_one_line_and_exit_code_2(tmp_path):
    """run.output_dir under a regular file (a typo, a read-only or foreign path): was a FileNotFoundError /
    NotADirectoryError traceback from the run-directory lock, exit code 1, after two 'could not write
    run_status.json' warnings."""
    (tmp_path / "afile").write_text("")
    proc = subprocess.run([sys.executable, "-m", "rynnscale", "train", str(REPO / "recipes" / "demo_tiny.yaml"),
                           f"run.output_dir={tmp_path / 'afile' / 'run'}", "logging.progress=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "run_status.json" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("cannot be created") == 1 and "pass a writable run.output_dir" in proc.stderr, \
        proc.stderr[-2000:]
