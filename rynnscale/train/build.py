"""The one model build path, used by training, evaluation, the planner, the memory measurement and the
benchmarks: recipe -> architecture (``rynnscale.config.model_args``) -> the family's model (``rynnscale.models`` registry)
on the META device -> kernels -> LoRA -> ``model.freeze`` -> the family's parallel plan (EP, activation
checkpointing, compile, FSDP2) -> ``to_empty`` allocates only this rank's shards -> fill
them from ``model.init_from`` (each rank reads only its rows of each tensor) or a random init drawn
exactly as the single-process init draws it.

No rank ever holds the whole model: a 30B model on 16 ranks costs each rank its shards plus one tensor.
A single process is the same path with no meshes (checkpointing and compile only).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rynnscale.checkpoint.hf import load_hf_weights
from rynnscale.config.model_args import ResolvedArch, resolve_model_args
from rynnscale.config.schema import ConfigError, ModelConfig, RootConfig
from rynnscale.models import family_of
from rynnscale.models.lora import LoRASpec, apply_lora, frozen_adapters, is_adapter_param
from rynnscale.ops.attention import require_varlen
from rynnscale.ops.fused import require_liger
from rynnscale.parallel import precision
from rynnscale.parallel.fsdp import init_sharded_weights
from rynnscale.parallel.layout import LayoutError, ParallelLayout
from rynnscale.parallel.mesh import build_meshes, device_type_of
from rynnscale.train.optim import freeze_parameters

if TYPE_CHECKING:
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.parallel.mesh import Meshes

log = logging.getLogger(__name__)


def restore_buffers(model: nn.Module) -> None:
    """After ``to_empty`` buffers hold garbage (they are not in HF checkpoints nor in ``init_weights``):
    every module owning buffers must recompute them in a ``reset_buffers()`` method, else this raises
    naming them (rather than train with uninitialised rotary tables or the like)."""
    bad = []
    for name, module in model.named_modules():
        own = [b for b, _ in module.named_buffers(recurse=False)]
        if not own:
            continue
        if callable(getattr(module, "reset_buffers", None)):
            module.reset_buffers()
        else:
            bad += [f"{name}.{b}" if name else b for b in own]
    if bad:
        raise RuntimeError(f"buffers {bad} cannot be restored after meta-device construction: give their module "
                           "a reset_buffers() that recomputes them")


def build_model(cfg: ModelConfig, device: torch.device | str | None = None, seed: int = 0, *,
                meshes: Meshes | None = None, compute_dtype: torch.dtype | None = None, meta: bool = False,
                param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
                arch: ResolvedArch | None = None) -> tuple[Any, nn.Module]:
    """Build ``(args, model)`` from a recipe's ``model`` section.

    ``meshes`` (from ``build_meshes``): EP + FSDP2 over them, this rank's shards only; None: one process.
    ``meta=True``: stop before any storage (the planner counts parameters; ``init_from`` may then be off
    this machine when ``model.preset`` names its architecture). ``compute_dtype``: FSDP2's mixed precision
    (default: ``train.dtype: auto`` on ``device``); ``arch``: the architecture already resolved from ``cfg``
    (``ResolvedRun.arch``; default: resolve it); ``param_dtype`` stores the parameters in that dtype instead of fp32 (no
    fp32 master copy: benchmarks, frozen weights). Loading validates every tensor (missing / unexpected /
    shape) and fails listing the names rather than leave anything randomly initialised; random init
    (no ``init_from``) is bitwise the single-process ``init_weights(seed)`` on every layout."""
    args = (arch or resolve_model_args(cfg, check_paths=not meta)).args
    spec = family_of(args)
    device = torch.device(device or "cpu")
    if compute_dtype is None:
        compute_dtype = precision.compute_dtype("auto", device)
    if cfg.kernels == "liger" and not meta:
        try:   # ``auto`` falls back per call; an explicit ``liger`` must be usable
            require_liger(device)
        except ValueError as e:   # the recipe's setting: reported briefly (exit code 2)
            raise ConfigError(str(e)) from None
    if cfg.attn_backend == "varlen" and not meta:
        try:   # likewise an explicit flash varlen attention, before any data work (fp32 compute: no kernel)
            require_varlen(device, compute_dtype)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    with torch.device("meta"):
        model = spec.new_model(args, attn_backend=cfg.attn_backend)
    model.set_kernels(cfg.kernels)
    lora = lora_spec(cfg)
    if lora is not None:  # adapters on the meta model, before the plan: EP and FSDP2 split them too
        try:
            apply_lora(model, lora, experts_of=spec.is_experts)
        except ValueError as e:   # targets matching no module: the recipe's setting
            raise ConfigError(str(e)) from None
        model.lora_spec = lora
    if cfg.freeze:
        freeze_parameters(model, cfg.freeze)
        if lora is not None:
            _refuse_frozen_lora(model, cfg.freeze, lora)
    spec.parallelize(model, meshes, compute_dtype=compute_dtype, ac_mode=cfg.activation_checkpointing,
                     ac_every=cfg.activation_checkpointing_every, compile=cfg.compile,
                     reshard_after_forward=reshard_after_forward, cp_attention=cfg.cp_attention)
    if param_dtype is not None:
        model.to(dtype=param_dtype)
    if meta:
        return args, model
    model.to_empty(device=device)
    embed = model.input_embeddings().weight
    if args.tie_word_embeddings and model.lm_head.weight is not embed:
        raise RuntimeError("lm_head.weight is no longer tied to embed_tokens.weight after to_empty (FSDP2 must "
                           "keep the alias)")
    restore_buffers(model)
    select = None
    if cfg.init_from is not None:
        log.info("loaded %s", load_hf_weights(model, cfg.init_from))
        if lora is None:
            return args, model
        select = is_adapter_param  # the base came from the checkpoint; draw the adapters only
    if meshes is not None:
        init_sharded_weights(model, seed, select=select)
    else:
        model.init_weights(seed, select=select)
    return args, model


def _refuse_frozen_lora(model: nn.Module, freeze: list[str], spec: LoRASpec) -> None:
    """``model.freeze`` (applied after LoRA) must not undo a ``model.lora`` option: freeze all of its adapters
    (a ``model.lora.vision: true`` run on a recipe that freezes ``model.visual.blocks.*`` trained no vision
    adapter, silently) or every parameter of a ``model.lora.trainable`` pattern. Freezing some adapters is said."""
    def culprits(names: list[str]) -> list[str]:
        return [p for p in freeze if any(fnmatch.fnmatchcase(n, p) for n in names)]

    options, frozen = frozen_adapters(model, spec)
    if frozen:
        where = f"{frozen[0].removesuffix('lora_A').rstrip('._')}{', ...' if len(frozen) > 1 else ''}"
        patterns = culprits(frozen + [n[:-1] + "B" for n in frozen])
        if options:
            raise ConfigError(f"config key 'model.freeze' pattern(s) {patterns} freeze every LoRA adapter of "
                              f"{', '.join(options)} ({where}), which would then train nothing; LoRA freezes the "
                              "base by itself: remove those patterns from model.freeze (e.g. model.freeze=[]), or drop "
                              "the option")
        log.warning("model.freeze pattern(s) %s freeze %d LoRA adapter(s) (%s): they stay at B = 0 and change nothing",
                    patterns, len(frozen), where)
    named = list(model.named_parameters(remove_duplicate=False))
    for pat in spec.trainable:
        hits = [(n, p) for n, p in named if fnmatch.fnmatchcase(n, pat)]
        if hits and not any(p.requires_grad for _, p in hits):
            raise ConfigError(f"config key 'model.lora.trainable' pattern {pat!r} asks to train {hits[0][0]}"
                              f"{', ...' if len(hits) > 1 else ''}, but 'model.freeze' pattern(s) "
                              f"{culprits([n for n, _ in hits])} freeze it; remove one of the two")


def lora_spec(cfg: ModelConfig) -> LoRASpec | None:
    """``model.lora`` as a ``LoRASpec`` (None when ``rank`` is 0: a full fine-tune)."""
    lc = cfg.lora
    if lc.rank <= 0:
        return None
    return LoRASpec(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=tuple(lc.targets),
                    experts=lc.experts, vision=lc.vision, trainable=tuple(lc.trainable))


def resolve_layout(cfg: RootConfig, world_size: int, num_experts: int) -> ParallelLayout:
    """``parallel.*`` of a recipe on ``world_size`` ranks (``LayoutError`` naming the keys)."""
    p = cfg.parallel
    return ParallelLayout.resolve(world_size, p.dp_replicate, p.dp_shard, p.ep, num_experts, p.cp)


@dataclass(frozen=True)
class ResolvedRun:
    """A recipe resolved once at start-up and passed down: the architecture (its family's args, read once
    from ``config.json`` / the preset / ``model.arch``), the parallel layout on this world size and the
    compute dtype on this device."""

    cfg: RootConfig
    arch: ResolvedArch
    layout: ParallelLayout
    compute_dtype: torch.dtype

    @property
    def args(self) -> Any:
        return self.arch.args


def resolve_run(cfg: RootConfig, ctx: DistContext) -> ResolvedRun:
    """``cfg`` on ``ctx``'s world size and device (errors name the keys). A layout this world size cannot take is
    the recipe's setting: a ``ConfigError`` (one line per rank, exit code 2), not a traceback."""
    arch = resolve_model_args(cfg.model)
    try:
        layout = resolve_layout(cfg, ctx.world_size, arch.args.text.num_experts) if ctx.distributed \
            else ParallelLayout.single()
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    p = cfg.parallel
    asked = {k: v for k, v in (("ep", p.ep), ("cp", p.cp), ("dp_replicate", p.dp_replicate)) if v > 1}
    if not ctx.distributed and asked:
        log.warning("one process: %s ignored (a single process holds the whole model and every token; launch "
                    "with torchrun on several processes to use them)",
                    ", ".join(f"parallel.{k}={v}" for k, v in asked.items()))
    return ResolvedRun(cfg, arch, layout, precision.compute_dtype(cfg.train.dtype, ctx.device))


def build(run: ResolvedRun, ctx: DistContext) -> nn.Module:
    """The run's model on ``ctx``: one process, or (torchrun) this rank's shards under ``run.layout``, whose
    meshes are stored in ``ctx.meshes``."""
    if ctx.distributed:
        ctx.meshes = build_meshes(run.layout, device_type_of(ctx.device), timeout_s=run.cfg.parallel.timeout_s)
        log.info("parallel layout: %s", run.layout)
    return build_model(run.cfg.model, ctx.device, run.cfg.run.seed, meshes=ctx.meshes,
                       compute_dtype=run.compute_dtype, arch=run.arch)[1]


def model_config_for(args: Any, **model_keys) -> ModelConfig:
    """A ``model`` section whose inline architecture is ``args`` (plus any other ``model.*`` keys), for
    callers that hold an architecture rather than a recipe (tests, benchmarks)."""
    return ModelConfig(arch=args.to_hf_config(), **model_keys)
