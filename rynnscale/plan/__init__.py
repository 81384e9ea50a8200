"""The ``rynnscale plan`` memory / communication / step-time planner (see ``planner``)."""

from __future__ import annotations

from typing import Any

from rynnscale.config.model_args import resolve_model_args
from rynnscale.config.schema import PlanConfig
from rynnscale.models.stats import ParamStats, param_stats
from rynnscale.plan.planner import (
    Plan,
    PlanError,
    Profile,
    Workload,
    estimate_memory,
    format_plan,
    make_plan,
    resolve_layout,
)
from rynnscale.train.build import build_model
from rynnscale.train.optim import largest_param_group


def plan_recipe(cfg: Any, recipe: str = "", *, cluster: PlanConfig | None = None, profile: str = "gpu",
                doc_tokens: int = 0) -> Plan:
    """Plan a loaded RootConfig on ``cluster`` (default: the recipe's ``plan`` section). The model is the
    one training would build (``rynnscale.train.build``), on the meta device."""
    arch = resolve_model_args(cfg.model, check_paths=False)
    pc = cfg.plan
    c = cluster or pc
    args, model = build_model(cfg.model, meta=True, arch=arch)
    st = param_stats(model, largest_param_group(model, cfg.optim))
    lay = resolve_layout(c.world, cfg.parallel.dp_replicate, cfg.parallel.dp_shard, cfg.parallel.ep,
                         args.text.num_experts, cfg.parallel.cp)
    w = Workload(micro_batch_tokens=cfg.train.micro_batch_tokens, grad_accum=cfg.train.grad_accum,
                 visual_tokens=pc.visual_tokens_per_micro_batch, doc_tokens=doc_tokens,
                 loss_chunk_tokens=cfg.train.loss_chunk_tokens, checkpointing=cfg.model.activation_checkpointing,
                 every=cfg.model.activation_checkpointing_every, cp_attention=cfg.model.cp_attention,
                 objective="grpo" if _runs_grpo(cfg) else cfg.train.objective)
    return make_plan(recipe, arch.source, args, st, lay, w, c, Profile.named(profile))



def _runs_grpo(cfg: Any) -> bool:
    """The recipe, or one of its stages, trains with GRPO: a suggested override applies to every stage, and
    validation refuses CP and accumulation for GRPO."""
    from rynnscale.config.load import stage_config

    return cfg.train.objective == "grpo" or any(
        stage_config(cfg, i, check_paths=False).train.objective == "grpo" for i in range(len(cfg.stages)))


__all__ = ["ParamStats", "Plan", "PlanError", "Profile", "Workload", "estimate_memory", "format_plan",
           "make_plan", "param_stats", "plan_recipe", "resolve_layout"]
