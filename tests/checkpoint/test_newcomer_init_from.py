"""model.init_from with hostile files (issue 15): absurd config.json sizes and a truncated safetensors file are
refused with a message naming the key / file before any large allocation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from rynnscale.checkpoint.hf import HFCheckpointError, _checkpoint_sources
from rynnscale.models import read_hf_config
from rynnscale.models.qwen3_vl.args import MAX_PARAMS, ArchConfigError

DEMO = Path(__file__).resolve().parents[2] / "recipes" / "demo_tiny.yaml"


def _config(tmp_path: Path, **text: int) -> Path:
    arch = yaml.safe_load(DEMO.read_text())["model"]["arch"]
    arch["text_config"].update(text)
    (tmp_path / "config.json").write_text(json.dumps(arch))
    return tmp_path


def test_tiny_config_reads(tmp_path: Path) -> None:
    args, _ = read_hf_config(_config(tmp_path))
    assert args.estimated_params() < 20e6


@pytest.mark.parametrize("field, value", [("hidden_size", 10**9), ("num_hidden_layers", 10**6),
                                          ("vocab_size", 10**12), ("num_experts", -1)])
def test_absurd_sizes_name_the_key_and_the_maximum(tmp_path: Path, field: str, value: int) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ArchConfigError, match=rf"text_config\.{field}={value}.*must be in \[.*\]"):
        read_hf_config(_config(tmp_path, **{field: value}))
    assert time.perf_counter() - t0 < 5


def test_sizes_within_bounds_but_too_many_parameters_are_refused(tmp_path: Path) -> None:
    d = _config(tmp_path, hidden_size=65536, intermediate_size=1 << 20, num_hidden_layers=1024,
                num_experts=0, num_attention_heads=1024, num_key_value_heads=1024, head_dim=64)
    with pytest.raises(ArchConfigError, match=rf"more than the maximum {MAX_PARAMS:.0e}".replace("+", r"\+")):
        read_hf_config(d)


def test_truncated_safetensors_is_refused_naming_the_sizes(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1000), "b": torch.ones(10)}, str(tmp_path / "model.safetensors"))
    _checkpoint_sources(tmp_path)      # complete: fine
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(HFCheckpointError, match=r"model.safetensors: truncated: \d+ bytes but its safetensors header "
                                                r"needs \d+ \(100 missing\)"):
        _checkpoint_sources(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(HFCheckpointError, match="not a complete safetensors file"):
        _checkpoint_sources(tmp_path)
