"""The planner's memory estimate against the MEASURED peak of real CPU training steps.

Each case runs ``python -m rynnscale.plan.measure`` in a fresh process: it builds the tiny model
inside a TorchDispatchMode that counts live tensor-storage bytes (allocation and weakref-on-free),
then runs 2 real steps (forward incl. one image through the vision tower, fused chunked loss,
backward, clipping, foreach AdamW). The planner is asked about the same model, tokens, documents,
image, checkpointing and the CPU profile (fp32, per-document fused attention, foreach AdamW, no reserve), so both
sides are "peak live tensor bytes". Tolerance: 15%."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rynnscale.config.schema import OptimConfig
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs
from rynnscale.plan import Profile, Workload, estimate_memory, param_stats, resolve_layout
from rynnscale.train.build import build_model, model_config_for
from rynnscale.train.optim import largest_param_group

TEXT = {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "mrope_section": [4, 6, 6],
        "rope_theta": 10000.0}
VISION = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "patch_size": 16,
          "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 128, "num_position_embeddings": 64,
          "deepstack_visual_indexes": [0, 1]}
IDS = {"image_token_id": 2001, "video_token_id": 2002, "vision_start_token_id": 2003, "vision_end_token_id": 2004}


def arch(moe: bool) -> dict:
    text = dict(TEXT)
    if moe:
        text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1)
    return {"model_type": "qwen3_vl_moe" if moe else "qwen3_vl", "tie_word_embeddings": False,
            "text_config": text, "vision_config": dict(VISION), **IDS}


CASES = [  # (name, moe, checkpointing, tokens, docs, image patches)
    ("dense-none", False, "none", 1536, 3, 64),
    ("dense-full", False, "full", 1536, 3, 64),
    ("moe-none", True, "none", 1536, 3, 64),
    ("moe-full", True, "full", 1536, 3, 64),
]


@pytest.fixture(scope="module")
def measured() -> dict[str, dict]:
    """All cases measured in parallel subprocesses (fresh interpreters, one thread each)."""
    procs = {}
    for name, moe, ckpt, tokens, docs, patches in CASES:
        cmd = [sys.executable, "-m", "rynnscale.plan.measure", "--arch", json.dumps(arch(moe)), "--tokens", str(tokens),
               "--docs", str(docs), "--checkpointing", ckpt, "--image-patches", str(patches),
               "--loss-chunk-tokens", "512"]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for name, pr in procs.items():
        stdout, stderr = pr.communicate(timeout=240)
        assert pr.returncode == 0, f"{name}: {stderr[-2000:]}"
        out[name] = json.loads(stdout)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_planner_within_15_percent_of_measured_peak(case, measured) -> None:
    name, moe, ckpt, tokens, docs, patches = case
    args = Qwen3VLArgs.from_hf_config(arch(moe), strict=True)
    model = build_model(model_config_for(args, activation_checkpointing=ckpt), meta=True)[1]
    st = param_stats(model, largest_param_group(model, OptimConfig(lr=1e-4, weight_decay=0.0)))
    m = measured[name]
    assert st.total == m["params"]
    w = Workload(micro_batch_tokens=tokens, visual_tokens=patches // 4, doc_tokens=tokens // docs,
                 frame_patches=patches, loss_chunk_tokens=512, checkpointing=ckpt)
    est = estimate_memory(args, st, resolve_layout(1, 1, -1, 1, args.text.num_experts), w, Profile.named("cpu"))
    ratio = est.peak / m["peak_bytes"]
    # activations must be a real share of the peak, or the comparison would only test the parameter count
    assert est.activations_saved + est.backward_workspace > 0.25 * est.peak
    assert 0.85 <= ratio <= 1.15, (f"{name}: planner {est.peak / 1e6:.1f} MB ({est.peak_phase}) vs measured "
                                   f"{m['peak_bytes'] / 1e6:.1f} MB; phases {m['phases']}")
    # the optimiser-step peak is exact bookkeeping: params + grads + AdamW states + foreach temporaries
    assert est.peak_optimizer == pytest.approx(m["phases"]["step1_optimizer_peak"], rel=0.02)


def test_checkpointing_lowers_the_estimate_like_the_measurement(measured) -> None:
    for kind in ("dense", "moe"):
        assert measured[f"{kind}-full"]["peak_bytes"] < 0.75 * measured[f"{kind}-none"]["peak_bytes"]
