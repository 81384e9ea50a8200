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
    if pc.visual_tokens_per_micro_batch > cfg.train.micro_batch_tokens:
        raise PlanError(f"plan.visual_tokens_per_micro_batch={pc.visual_tokens_per_micro_batch} visual tokens do not fit "
                        f"in one micro-batch of train.micro_batch_tokens={cfg.train.micro_batch_tokens}: set "
                        f"plan.visual_tokens_per_micro_batch to at most {cfg.train.micro_batch_tokens}")
    c = cluster or pc
    args, model = build_model(cfg.model, meta=True, arch=arch)
    st = param_stats(model, largest_param_group(model, cfg.optim))
    lay = resolve_layout(c.world, cfg.parallel.dp_replicate, cfg.parallel.dp_shard, cfg.parallel.ep,
                         args.text.num_experts, cfg.parallel.cp)
    grpo = _grpo_config(cfg)   # (a GRPO step's prompts are split over the data-parallel ranks)
    w = Workload(micro_batch_tokens=cfg.train.micro_batch_tokens, grad_accum=cfg.train.grad_accum,
                 visual_tokens=pc.visual_tokens_per_micro_batch, doc_tokens=doc_tokens,
                 loss_chunk_tokens=cfg.train.loss_chunk_tokens, checkpointing=cfg.model.activation_checkpointing,
                 every=cfg.model.activation_checkpointing_every, cp_attention=cfg.model.cp_attention,
                 objective="grpo" if grpo is not None else cfg.train.objective,
                 reference_copy=grpo is not None and grpo.rl.kl_coef > 0 and grpo.model.lora.rank <= 0,
                 rollout_sequences=0 if grpo is None else -(-grpo.rl.prompts_per_step // lay.data_world_size) * grpo.rl.group_size,
                 rollout_new_tokens=0 if grpo is None else grpo.rl.max_new_tokens)
    return make_plan(recipe, arch.source, args, st, lay, w, c, Profile.named(profile))


def _grpo_config(cfg: Any) -> Any | None:
    """The config of the recipe's GRPO run (itself, or its first GRPO stage), else None. Planned as GRPO: a
    suggested override applies to every stage, validation refuses CP and accumulation for GRPO, and its reference
    copy and rollouts are counted."""
    from rynnscale.config.load import stage_config

    if cfg.train.objective == "grpo":
        return cfg
    return next((sc for sc in (stage_config(cfg, i, check_paths=False) for i in range(len(cfg.stages)))
                 if sc.train.objective == "grpo"), None)


__all__ = ["ParamStats", "Plan", "PlanError", "Profile", "Workload", "estimate_memory", "format_plan",
           "make_plan", "param_stats", "plan_recipe", "resolve_layout"]
