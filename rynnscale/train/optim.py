"""Optimiser (AdamW with per-module learning rates), parameter freezing and the LR schedule.

Name patterns are shell-style (``fnmatch``) patterns over the parameter names of the Hugging Face
state dict (``model.visual.blocks.0.attn.qkv.weight``, ``model.language_model.layers.3.mlp.experts.
gate_up_proj``, ``lm_head.weight``); wrapper prefixes that activation checkpointing or compilation
insert into ``named_parameters()`` are stripped before matching, so a recipe's patterns mean the same
thing with or without them. A pattern that matches no parameter is an error naming the config key
(a typo would otherwise silently train, or freeze, nothing).

- ``freeze_parameters(model, patterns)`` sets ``requires_grad=False`` on matching parameters
  (``model.freeze`` in a recipe). Frozen parameters get no gradient and no optimiser state.
- ``optim.groups``: ``[{pattern, lr_scale, weight_decay}]``; each trainable parameter joins the FIRST
  group whose pattern matches (else the default group: ``optim.lr``, ``optim.weight_decay``). Its
  learning rate is ``optim.lr * lr_scale`` times the schedule's factor (warmup/cosine apply to every
  group alike). Inside each group norms, biases and embeddings get no weight decay.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Any

import torch

from rynnscale.config.schema import ConfigError, OptimConfig
from rynnscale.parallel.fqn import clean_fqn


def _named(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(clean_fqn(n), p) for n, p in model.named_parameters()]


def freeze_parameters(model: torch.nn.Module, patterns: Sequence[str], key: str = "model.freeze") -> int:
    """``requires_grad=False`` for parameters matching any pattern; returns how many elements were frozen.

    Raises ConfigError naming ``key[i]`` for a pattern that matches nothing."""
    named = _named(model)
    frozen = 0
    for i, pat in enumerate(patterns):
        hits = [p for n, p in named if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(f"config key '{key}[{i}]' = {pat!r} matches no parameter "
                             f"(names look like {named[0][0]!r}, {named[-1][0]!r})")
        for p in hits:
            if p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "embed_tokens" in name or "pos_embed" in name


def param_groups(model: torch.nn.Module, weight_decay: float, groups: Iterable[Any] = (),
                 lr: float | None = None) -> list[dict]:
    """AdamW param groups: the default group, then the configured pattern groups (a parameter joins the
    first pattern that matches it, else the default group),
    each split into weight-decay (matrices, 3-D expert weights) and no-decay (norms, biases,
    embeddings) parts. Empty groups are dropped. Each group carries ``name`` and ``lr_scale``; with
    ``lr`` given, also ``lr = lr * lr_scale``."""
    groups = list(groups or ())
    buckets: list[list[tuple[str, torch.nn.Parameter]]] = [[] for _ in range(len(groups) + 1)]
    hits = [0] * len(groups)
    seen: set[int] = set()
    for name, p in _named(model):
        if id(p) in seen:  # tied weights are listed once
            continue
        seen.add(id(p))
        for gi, g in enumerate(groups):
            if fnmatch.fnmatchcase(name, _field(g, "pattern")):
                hits[gi] += 1
                if p.requires_grad:
                    buckets[gi].append((name, p))
                break
        else:
            if p.requires_grad:
                buckets[-1].append((name, p))
    for gi, g in enumerate(groups):
        if hits[gi] == 0:
            raise ValueError(f"config key 'optim.groups[{gi}].pattern' = {_field(g, 'pattern')!r} matches no "
                             "parameter (or only parameters an earlier group already took)")
    out = []
    order = [len(groups)] + list(range(len(groups)))  # default group first: get_last_lr()[0] is the base lr
    for gi in order:
        members = buckets[gi]
        if gi < len(groups):
            g = groups[gi]
            gname, scale = _field(g, "pattern"), float(_field(g, "lr_scale", 1.0))
            wd = _field(g, "weight_decay", None)
            wd = weight_decay if wd is None else float(wd)
        else:
            gname, scale, wd = "default", 1.0, weight_decay
        for decay in (True, False):
            params = [p for n, p in members if _no_decay(n, p) != decay]
            if not params:
                continue
            d = {"params": params, "weight_decay": wd if decay else 0.0, "name": f"{gname}{'' if decay else ' (no decay)'}",
                 "lr_scale": scale}
            if lr is not None:
                d["lr"] = lr * scale
            out.append(d)
    return out


def largest_param_group(model: torch.nn.Module, cfg: OptimConfig) -> int:
    """Elements of the largest AdamW param group (the foreach update's temporaries scale with it)."""
    groups = param_groups(model, cfg.weight_decay, getattr(cfg, "groups", ()))
    return max((sum(p.numel() for p in g["params"]) for g in groups), default=0)


def _field(g: Any, name: str, default: Any = ...) -> Any:
    if isinstance(g, dict):
        return g[name] if default is ... else g.get(name, default)
    return getattr(g, name) if default is ... else getattr(g, name, default)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, model_cfg: Any = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with ``cfg.groups`` learning-rate groups.

    ``model_cfg`` (the recipe's ``model`` section) is optional: when given, its ``freeze`` patterns
    are applied first (the trainer may also call ``freeze_parameters`` itself before wrapping)."""
    if model_cfg is not None and getattr(model_cfg, "freeze", None):
        freeze_parameters(model, model_cfg.freeze)
    groups = param_groups(model, cfg.weight_decay, getattr(cfg, "groups", ()), lr=cfg.lr)
    if not groups:
        raise ValueError("no trainable parameters: every parameter is frozen (check 'model.freeze')")
    on_gpu = groups[0]["params"][0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=on_gpu or None, foreach=None if on_gpu else True)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of each group's base lr for optimiser step ``step`` (0-based): linear warmup then the schedule.

    ``warmup_ratio`` > 0 (fraction of ``max_steps``) takes precedence over ``warmup_steps``."""
    warmup = warmup_steps(cfg, max_steps)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(cfg: OptimConfig, max_steps: int) -> int:
    """``optim.warmup_steps``, or ``ceil(warmup_ratio x max_steps)`` computed on the ratio as written (decimal):
    in binary floating point 0.07 x 100 is 7.000000000000001, whose ceil made a 7% warmup of 100 steps 8 steps."""
    ratio = getattr(cfg, "warmup_ratio", 0.0) or 0.0
    return math.ceil(Fraction(repr(float(ratio))) * max_steps) if ratio > 0 else cfg.warmup_steps


def warmup_warning(cfg: OptimConfig, max_steps: int) -> str | None:
    """The start-of-run warning when the warmup covers the whole run (``None`` when it does not): the lr then
    reaches ``optim.lr`` at the last step at best and never follows the schedule. A warning, not an error: a
    resumed run may raise ``train.max_steps`` later and finish the warmup."""
    warmup = warmup_steps(cfg, max_steps)
    if warmup < max_steps:
        return None
    key = (f"optim.warmup_ratio={cfg.warmup_ratio} ({warmup} steps)" if getattr(cfg, "warmup_ratio", 0.0) > 0
           else f"optim.warmup_steps={warmup}")
    peak = lr_factor(max_steps - 1, cfg, max_steps)
    reach = ("the lr reaches optim.lr only at the last step" if peak >= 1 else
             f"the lr never reaches optim.lr={cfg.lr:g}: it peaks at {peak:.3g} x optim.lr = {peak * cfg.lr:.3g} "
             "at the last step")
    return (f"{key} >= train.max_steps={max_steps}: the whole run is warmup and {reach}, with no "
            f"{cfg.schedule} schedule after it; lower the warmup or raise train.max_steps")


RECIPE_HYPERPARAMETERS = ("weight_decay", "betas", "eps")   # AdamW settings of a group the recipe, not a checkpoint, sets


class RecipeSchedule(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose checkpointed state is the step only: on resume the base learning rates, the schedule
    (``optim.lr``, ``optim.groups[].lr_scale``, ``train.max_steps``, warmup) and the groups' ``weight_decay`` /
    betas / eps come from the current recipe, not from the checkpoint, and the restored optimiser's groups get
    the lr of the resumed step at once. Loaded right after the optimiser, whose ``load_state_dict`` brings the
    saved groups' settings back. (A plain ``LambdaLR`` restores the saved base lrs, so a changed ``optim.lr`` was
    ignored for the rest of the run, and the first resumed step ran with the lr the OLD ``max_steps`` gave it,
    e.g. 0 after a finished linear decay.)"""

    def __init__(self, optimizer: torch.optim.Optimizer, factor) -> None:
        self.recipe_groups = [{k: g[k] for k in RECIPE_HYPERPARAMETERS if k in g} for g in optimizer.param_groups]
        super().__init__(optimizer, factor)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "recipe_groups"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        base_lrs = list(self.base_lrs)   # this run's optim.lr x lr_scale, set at construction
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "recipe_groups"})
        self.base_lrs = base_lrs
        for group, recipe, base, factor in zip(self.optimizer.param_groups, self.recipe_groups, base_lrs,
                                               self.lr_lambdas):
            group.update(recipe)
            group["initial_lr"], group["lr"] = base, base * factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> RecipeSchedule:
    """The lr schedule of ``lr_factor`` over ``max_steps``; its state (the step) resumes under a changed recipe."""
    return RecipeSchedule(optimizer, lambda s: lr_factor(s, cfg, max_steps))
