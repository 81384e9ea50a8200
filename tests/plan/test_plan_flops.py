"""The planner's model FLOPs (its step-time estimate) are the family's ``step_flops``, the count metrics.jsonl
reports (tests/train/test_flops.py and tests/models/qwen3_5/test_qwen35_flops.py check that count against
torch's FlopCounterMode); a text-only model plans without a vision tower.

Tolerances: hand counts are exact (integers in float64)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rynnscale.config.load import load_config
from rynnscale.models.registry import family_of
from rynnscale.models.stats import param_stats
from rynnscale.plan import plan_recipe
from rynnscale.plan.planner import PlanError, Workload, model_flops_per_step
from rynnscale.train.build import build_model

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _cfg(recipe: str, *over: str):
    return load_config(RECIPES / recipe, list(over), check_paths=False)


def test_quadratic_attention_only_in_the_full_attention_layers_of_the_hybrid() -> None:
    """Qwen3.5-9B: 32 layers of which 8 are softmax attention (16 q heads x 256); the other 24 are Gated DeltaNet,
    linear in length. One 16,384-token document vs two of 8,192 (both whole 64-token chunks: the DeltaNet and
    matmul work are equal) differ by the softmax term of the 8 layers alone: 6 x 8 x 16 x 256 x (16384^2 - 2 x
    8192^2) per micro-batch. (Counting all 32 layers as softmax attention overstated the 9B's step by 17%.)"""
    cfg = _cfg("base/qwen3_5_9b.yaml", "plan.visual_tokens_per_micro_batch=0")
    one_doc = plan_recipe(cfg, "9b", doc_tokens=16384).flops_per_step
    two_docs = plan_recipe(cfg, "9b", doc_tokens=8192).flops_per_step
    assert one_doc - two_docs == 6 * 8 * 16 * 256 * (16384 ** 2 - 2 * 8192 ** 2)


@pytest.mark.parametrize("recipe", ["base/qwen3_5_9b.yaml", "base/qwen3_vl_30b_a3b.yaml"])
def test_planner_flops_are_the_familys_step_flops(recipe: str) -> None:
    """The same documents and frames through ``step_flops`` (10,240 merged visual tokens = 52 frames of 784
    patches + one of 192) x grad_accum: the planner predicts the number the trainer's metrics will log."""
    cfg = _cfg(recipe, "train.grad_accum=3")
    args, model = build_model(cfg.model, meta=True)
    st = param_stats(model)
    w = Workload(micro_batch_tokens=16384, grad_accum=3, visual_tokens=10240, doc_tokens=4000)
    grid = torch.tensor([[52, 28, 28], [1, 8, 24]])
    expected = 3 * family_of(args).step_flops(args, st, [4000] * 4 + [384], grid).total
    assert model_flops_per_step(args, st, w) == pytest.approx(expected, rel=1e-12)
    assert plan_recipe(cfg, recipe, doc_tokens=4000).flops_per_step == pytest.approx(expected, rel=1e-12)


def _text_only_cfg(tmp_path: Path, visual_tokens: int):
    import yaml

    text = {"model_type": "qwen3_5_text", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
            "linear_value_head_dim": 8, "tie_word_embeddings": False}
    recipe = tmp_path / "text_only.yaml"
    recipe.write_text(yaml.safe_dump({"extends": str(RECIPES / "tiny/base/_base.yaml"), "model": {"arch": text},
                                      "optim": {"groups": []},
                                      "plan": {"visual_tokens_per_micro_batch": visual_tokens}}))
    return load_config(recipe, [], check_paths=False)


def test_text_only_model_plans(tmp_path: Path) -> None:
    """A text-only Qwen3.5 (``qwen3_5_text``, no vision tower) plans; a visual budget for it is a clear error."""
    plan = plan_recipe(_text_only_cfg(tmp_path, 0), "text_only")
    assert plan.memory.vision_activations == 0 and plan.memory.peak > 0 and plan.flops_per_step > 0
    with pytest.raises(PlanError, match=r"plan\.visual_tokens_per_micro_batch=64 .*no vision tower"):
        plan_recipe(_text_only_cfg(tmp_path, 64), "text_only")


def _suggested_overrides(suggestion: str) -> list[str]:
    import re

    return re.findall(r"\b([a-z_]+\.[a-z_.]+=\S+?)(?=[\s)]|$)", suggestion)


@pytest.mark.parametrize("recipe, over, cluster", [
    # GRPO: config validation refuses parallel.cp > 1 and train.grad_accum != 1
    ("finetune/chain_of_point_grpo.yaml", ["train.micro_batch_tokens=131072", "model.activation_checkpointing=full"],
     []),
    # a visual budget of 40,000 tokens: a smaller micro-batch must carry a smaller budget, or the planner refuses it
    ("base/qwen3_vl_8b.yaml", ["train.micro_batch_tokens=65536", "plan.visual_tokens_per_micro_batch=40000",
                               "model.activation_checkpointing=full"], ["plan.gpu_mem_gib=40", "plan.gpus_per_node=2"]),
])
def test_every_suggestion_passes_the_recipes_validation(recipe: str, over: list[str], cluster: list[str]) -> None:
    """What `rynnscale plan` advises for a recipe that does not fit is a set of recipe overrides that load (the
    same validation training runs) and plan."""
    plan = plan_recipe(_cfg(recipe, *over, *cluster), recipe)
    assert not plan.fits
    changes = [_suggested_overrides(s) for s in plan.suggestions]
    assert any(changes), plan.suggestions
    for keys in changes:
        cfg = _cfg(recipe, *over, *cluster, *keys)   # raises ConfigError on an override training would refuse
        if any(k.startswith("train.micro_batch_tokens=") for k in keys):
            plan_recipe(cfg, recipe)   # PlanError on a visual budget the smaller micro-batch cannot hold
    if "grpo" in recipe:
        assert plan.recommended_cp is None


@pytest.mark.parametrize("extra,copy", [([], True), (["stages.grpo.rl.kl_coef=0"], False),
                                        (["stages.grpo.model.lora.rank=4"], False)])
def test_a_grpo_chain_counts_its_reference_copy(extra: list[str], copy: bool) -> None:
    """A GRPO stage of a full fine-tune with rl.kl_coef > 0 holds a frozen copy of the weights (the trainer builds it
    like the policy): the plan left it out, under-estimating the chain's memory by a whole parameter shard. It is
    the bytes of the model the trainer builds (CPU profile: fp32, one rank); no copy with LoRA or without KL. The
    rollouts' KV cache is stated per token (k and v of every layer, bf16 on the GPU profile)."""
    from rynnscale.train.build import build_model

    cfg = _cfg("tiny/finetune/grpo_grounding.yaml", "plan.nodes=1", "plan.gpus_per_node=1", *extra)
    plan = plan_recipe(cfg, "grpo", profile="cpu")
    args, model = build_model(cfg.model, meta=True)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert plan.memory.reference == (weights if copy else 0)
    assert plan.workload["objective"] == "grpo" and plan.workload["rollout_sequences"] == 4 * 8
    t = args.text
    per_token = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * 2
    kv = [a for a in plan_recipe(cfg, "grpo").assumptions if "KV cache" in a]
    assert kv and f"KV cache {per_token} B per token" in kv[0], kv


def test_ep_traffic_counts_a_pass_more_in_every_recomputed_moe_layer() -> None:
    """The all-to-alls of a recomputed MoE layer run again in backward: under full and selective checkpointing
    every layer's (selective saves the matmuls, not the collectives: 16 all-to-all calls per step like full vs 10
    without, measured on 4 gloo ranks with ep=2), under every_k the checkpointed ones'. The plan counted the
    extra pass for full only."""
    from rynnscale.plan.planner import estimate_comm, resolve_layout

    cfg = _cfg("base/qwen3_vl_30b_a3b.yaml")
    args, model = build_model(cfg.model, meta=True)
    st = param_stats(model)
    lay = resolve_layout(16, 1, -1, 8, args.text.num_experts, 1)
    t = args.text
    per_pass = 2 * 4096 * t.num_experts_per_tok * t.hidden_size * 2 * 7 / 8      # dispatch + combine, one layer
    n_moe = sum(t.layer_is_moe(i) for i in range(t.num_hidden_layers))
    every2 = sum(1 for i in range(t.num_hidden_layers) if t.layer_is_moe(i) and i % 2 == 0)
    want = {"none": 2 * n_moe, "full": 3 * n_moe, "selective": 3 * n_moe, "every_k": 2 * n_moe + every2}
    for mode, passes in want.items():
        w = Workload(micro_batch_tokens=4096, checkpointing=mode, every=2)
        assert estimate_comm(args, st, lay, w, cfg.plan).ep_all_to_all_bytes == pytest.approx(passes * per_pass), mode


def test_a_smaller_micro_batch_trains_and_the_planner_names_its_visual_budget() -> None:
    """`plan.visual_tokens_per_micro_batch` is the planner's assumption, not a training setting: lowering
    `train.micro_batch_tokens` under the base recipes' 10,240-token visual budget (what one does after an
    out-of-memory error) was refused by `rynnscale train` too. The planner still refuses to plan more visual tokens
    than a micro-batch holds, naming both keys; with both set it plans."""
    cfg = _cfg("base/qwen3_vl_8b.yaml", "train.micro_batch_tokens=8192")   # loads: a training run starts
    assert cfg.train.micro_batch_tokens == 8192 and cfg.plan.visual_tokens_per_micro_batch == 10240
    with pytest.raises(PlanError, match=r"plan\.visual_tokens_per_micro_batch=10240 .*train\.micro_batch_tokens=8192"
                                        r".*at most 8192"):
        plan_recipe(cfg, "8b")
    ok = plan_recipe(_cfg("base/qwen3_vl_8b.yaml", "train.micro_batch_tokens=8192",
                          "plan.visual_tokens_per_micro_batch=5120"), "8b")
    assert ok.workload["visual_tokens"] == 5120
