"""The planner models context parallelism (issue 12): per-rank activations shrink with cp, parameters shard
over dp_shard x cp, the CP attention traffic is counted, and a CP degree is recommended for the long recipe."""

from __future__ import annotations

from pathlib import Path

from rynnscale.config.load import load_config
from rynnscale.models import preset_config
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs
from rynnscale.plan import plan_recipe
from rynnscale.plan.planner import cp_attention_mode, cp_traffic_per_layer

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _plan(**over):
    cfg = load_config(RECIPES / "base/qwen3_vl_30b_a3b_long.yaml", [f"{k}={v}" for k, v in over.items()],
                      check_paths=False)
    return plan_recipe(cfg, "recipes/base/qwen3_vl_30b_a3b_long.yaml")


def test_long_recipe_fits_with_the_recommended_cp():
    plans = {cp: _plan(**{"parallel.cp": cp}) for cp in (1, 2, 4)}
    acts = [plans[cp].memory.activations_saved for cp in (1, 2, 4)]
    assert acts[0] > acts[1] > acts[2]  # per-rank activations fall with cp
    # parameters shard over dp_shard x cp = all 16 GPUs at every cp (dp_shard shrinks as cp grows)
    assert plans[1].memory.params == plans[2].memory.params == plans[4].memory.params
    assert plans[1].comm.cp_bytes == 0 < plans[2].comm.cp_bytes
    assert plans[2].fits and plans[2].recommended_cp == 2
    assert not _plan(**{"model.activation_checkpointing": "none"}).fits


def test_cp_modes_and_traffic():
    t = Qwen3VLArgs.from_hf_config(preset_config("qwen3-vl-30b-a3b")).text  # 32 q heads, 4 kv heads
    assert cp_attention_mode(t, 4) == "ulysses" and cp_attention_mode(t, 64) == "ring"
    uly, mode = cp_traffic_per_layer(t, 2, 65536, recompute=False)
    assert mode == "ulysses"
    # q, k, v, out of 32768 local tokens, half of it leaves the rank, forward + backward, bf16
    assert uly == (2 * 32 + 2 * 4) * 128 * 32768 * 2 * 0.5 * 2
    assert cp_traffic_per_layer(t, 1, 65536, recompute=False) == (0.0, "")


def test_the_plan_runs_the_recipes_cp_attention_and_refuses_an_impossible_ulysses():
    """model.cp_attention=ring is planned as ring (not the auto rule's ulysses); ulysses with q heads that
    parallel.cp does not divide fails at load (as the build would on every rank), not as a fitting plan."""
    import pytest

    from rynnscale.config import ConfigError

    auto, ring = _plan(**{"parallel.cp": 2}), _plan(**{"parallel.cp": 2, "model.cp_attention": "ring"})
    assert auto.comm.cp_mode == "ulysses" and ring.comm.cp_mode == "ring"
    assert ring.memory.total_with_reserve != auto.memory.total_with_reserve and ring.comm.cp_bytes != auto.comm.cp_bytes
    t = Qwen3VLArgs.from_hf_config(preset_config("qwen3-vl-30b-a3b")).text
    assert cp_attention_mode(t, 2, "ring") == "ring"
    with pytest.raises(ConfigError, match=r"model\.cp_attention.*q heads \(4\) divisible by parallel\.cp=3"):
        load_config(RECIPES / "demo_tiny.yaml", ["parallel.cp=3", "model.cp_attention=ulysses"])
    load_config(RECIPES / "demo_tiny.yaml", ["parallel.cp=3", "model.cp_attention=ring"])


def test_qwen35_cp_traffic_counts_ulysses_on_its_attention_layers_only():
    """Qwen3.5's Gated DeltaNet layers do not all-to-all under CP: they gather their runs' state maps and convolution
    tails (``models/qwen3_5/cp.py``). The plan counts Ulysses on the full-attention layers (1 in 4) and the scan's
    gathers on the others; before, every layer was charged a Ulysses layer's traffic (4x for Qwen3.5-9B)."""
    import torch

    from rynnscale.config.model_args import resolve_model_args
    from rynnscale.models import family_of
    from rynnscale.models.qwen3_5 import cp as cp_scan
    from rynnscale.parallel.context_parallel import CPShard, shard_plan

    cfg = load_config(RECIPES / "base/qwen3_5_9b.yaml", ["parallel.cp=2"], check_paths=False)
    plan = plan_recipe(cfg, "recipes/base/qwen3_5_9b.yaml")
    args = resolve_model_args(cfg.model, check_paths=False).args
    t = args.text
    n_linear = sum(t.is_linear(i) for i in range(t.num_hidden_layers))
    n_full = t.num_hidden_layers - n_linear
    assert 0 < n_full < n_linear
    w = plan.workload
    full_ckpt = w["checkpointing"] == "full"
    uly, mode = cp_traffic_per_layer(t, 2, w["micro_batch_tokens"], full_ckpt, mode=w["cp_attention"])
    scan_of = family_of(args).cp_layer_traffic   # the family's count (models/qwen3_5/memory.py)
    linear_layer = next(i for i in range(t.num_hidden_layers) if t.is_linear(i))
    scan = scan_of(args, linear_layer, 2, w["micro_batch_tokens"], w["doc_tokens"], full_ckpt)
    assert scan_of(args, t.layer_types.index("full_attention"), 2, w["micro_batch_tokens"], w["doc_tokens"],
                   full_ckpt) is None
    assert mode == "ulysses" and 0 < scan < uly / 4
    assert plan.comm.cp_bytes == (uly * n_full + scan * n_linear) * w["grad_accum"]
    # the scan's count of runs (2 cp - 1 per document) is the layout's: documents of 100 tokens, cp 2 and 4
    for cp in (2, 4):
        cu = torch.arange(0, 801, 100)
        lay = cp_scan.run_layout(CPShard(shard_plan(cu, cp), 0, None, "auto"))
        assert len(lay.run_len) == 8 * (2 * cp - 1)
