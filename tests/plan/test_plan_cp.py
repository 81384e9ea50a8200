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
