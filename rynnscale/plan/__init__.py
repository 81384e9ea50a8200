"""The ``rynnscale plan`` memory / communication / step-time planner (see ``planner``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rynnscale.plan.model_stats import ParamStats, build_meta_model, param_stats
from rynnscale.plan.planner import (
    Cluster,
    Layout,
    Plan,
    PlanError,
    Profile,
    Workload,
    estimate_memory,
    format_plan,
    make_plan,
    resolve_layout,
)


def recipe_arch(cfg: Any) -> tuple[Any, str]:
    """(Qwen3VLArgs, description) of a recipe's model: init_from's config.json if it is on this
    machine, else ``model.preset``, else the inline ``model.arch``."""
    from rynnscale.models.qwen3_vl.args import Qwen3VLArgs
    from rynnscale.models.qwen3_vl.presets import preset_config

    m = cfg.model
    if m.init_from is not None and (Path(m.init_from) / "config.json").is_file():
        from rynnscale.checkpoint.hf import read_hf_config

        return read_hf_config(m.init_from)[0], f"{m.init_from}/config.json"
    if m.preset is not None:
        return Qwen3VLArgs.from_hf_config(preset_config(m.preset), strict=True, where=f"preset {m.preset}"), \
            f"preset {m.preset}"
    if m.arch is not None:
        return Qwen3VLArgs.from_hf_config(dict(m.arch), strict=True, where="model.arch"), "inline model.arch"
    raise PlanError(f"model.init_from={m.init_from!r} has no config.json on this machine and no 'model.preset' "
                    "names its architecture; set model.preset (see rynnscale/models/qwen3_vl/presets.py)")


def plan_recipe(cfg: Any, recipe: str = "", *, cluster: Cluster | None = None, profile: str = "gpu",
                doc_tokens: int = 0) -> Plan:
    """Plan a loaded RootConfig on ``cluster`` (default: the recipe's ``plan`` section)."""
    args, where = recipe_arch(cfg)
    pc = cfg.plan
    c = cluster or Cluster(pc.nodes, pc.gpus_per_node, pc.gpu_mem_gib, pc.peak_tflops, pc.mfu, pc.nvlink_gbps,
                           pc.ib_gbps)
    model = build_meta_model(args, list(cfg.model.freeze), cfg.model.activation_checkpointing,
                             cfg.model.activation_checkpointing_every)
    st = param_stats(model, list(cfg.optim.groups), cfg.optim.weight_decay)
    lay = resolve_layout(c.world, cfg.parallel.dp_replicate, cfg.parallel.dp_shard, cfg.parallel.ep,
                         args.text.num_experts)
    w = Workload(micro_batch_tokens=cfg.train.micro_batch_tokens, grad_accum=cfg.train.grad_accum,
                 visual_tokens=pc.visual_tokens_per_micro_batch, doc_tokens=doc_tokens,
                 loss_chunk_tokens=cfg.train.loss_chunk_tokens, checkpointing=cfg.model.activation_checkpointing,
                 every=cfg.model.activation_checkpointing_every)
    return make_plan(recipe, where, args, st, lay, w, c, Profile.named(profile))


__all__ = ["Cluster", "Layout", "ParamStats", "Plan", "PlanError", "Profile", "Workload", "build_meta_model",
           "estimate_memory", "format_plan", "make_plan", "param_stats", "plan_recipe", "recipe_arch",
           "resolve_layout"]
