"""The planner's memory estimate for Qwen3.5 (its family's per-layer activation terms: ``qwen3_5/memory.py``, with
the Gated DeltaNet's chunked-rule tensors and chunk states) against the MEASURED peak of real CPU training steps
(``python -m rynnscale.plan.measure``, as tests/plan/test_memory_vs_measured.py does for Qwen3-VL): tiny dense and
MoE Qwen3.5 with an image, with and without activation checkpointing. Tolerance: 15%; measured ratios (planner /
measured) 0.93, 0.92, 0.94, 1.02 for dense / dense + full checkpointing / MoE / MoE + full checkpointing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rynnscale.config.schema import OptimConfig
from rynnscale.models import args_from_hf_config
from rynnscale.plan import Profile, Workload, estimate_memory, param_stats, resolve_layout
from rynnscale.train.build import build_model, model_config_for
from rynnscale.train.optim import largest_param_group

TEXT = {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
        "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1]}}
VISION = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "patch_size": 16,
          "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 128, "num_position_embeddings": 64}
IDS = {"image_token_id": 2001, "video_token_id": 2002, "vision_start_token_id": 2003, "vision_end_token_id": 2004}


def arch(moe: bool) -> dict:
    text = dict(TEXT)
    if moe:
        text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=96)
    return {"model_type": "qwen3_5_moe" if moe else "qwen3_5", "tie_word_embeddings": False,
            "text_config": text, "vision_config": dict(VISION), **IDS}


CASES = [("dense-none", False, "none"), ("dense-full", False, "full"), ("moe-none", True, "none"),
         ("moe-full", True, "full")]
TOKENS, DOCS, PATCHES = 1536, 3, 64


@pytest.fixture(scope="module")
def measured() -> dict[str, dict]:
    procs = {}
    for name, moe, ckpt in CASES:
        cmd = [sys.executable, "-m", "rynnscale.plan.measure", "--arch", json.dumps(arch(moe)), "--tokens", str(TOKENS),
               "--docs", str(DOCS), "--checkpointing", ckpt, "--image-patches", str(PATCHES), "--loss-chunk-tokens", "512"]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for name, pr in procs.items():
        stdout, stderr = pr.communicate(timeout=600)
        assert pr.returncode == 0, f"{name}: {stderr[-2000:]}"
        out[name] = json.loads(stdout)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_planner_within_15_percent_of_measured_peak(case, measured) -> None:
    name, moe, ckpt = case
    args = args_from_hf_config(arch(moe), strict=True)
    model = build_model(model_config_for(args, activation_checkpointing=ckpt), meta=True)[1]
    st = param_stats(model, largest_param_group(model, OptimConfig(lr=1e-4, weight_decay=0.0)))
    m = measured[name]
    assert st.total == m["params"]
    w = Workload(micro_batch_tokens=TOKENS, visual_tokens=PATCHES // 4, doc_tokens=TOKENS // DOCS,
                 frame_patches=PATCHES, loss_chunk_tokens=512, checkpointing=ckpt)
    est = estimate_memory(args, st, resolve_layout(1, 1, -1, 1, args.text.num_experts), w, Profile.named("cpu"))
    ratio = est.peak / m["peak_bytes"]
    assert est.activations_saved + est.backward_workspace > 0.25 * est.peak
    assert 0.85 <= ratio <= 1.15, (f"{name}: planner {est.peak / 1e6:.1f} MB ({est.peak_phase}) vs measured "
                                   f"{m['peak_bytes'] / 1e6:.1f} MB (ratio {ratio:.3f})")
