"""Build a Qwen3-VL model from a recipe's ``model`` section: a local HF checkpoint or an inline architecture;
whole on one device (``build_model``) or as this rank's shards only (``build_sharded_model``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rynnscale.config.schema import ModelConfig
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs

if TYPE_CHECKING:
    from rynnscale.parallel.mesh import Meshes

log = logging.getLogger("rynnscale")


def model_args(cfg: ModelConfig) -> Qwen3VLArgs:
    if cfg.init_from is not None:
        from rynnscale.checkpoint.hf import read_hf_config

        args, _ = read_hf_config(cfg.init_from)
        return args
    return Qwen3VLArgs.from_hf_config(dict(cfg.arch), strict=True, where="model.arch")


def _meta_model(cfg: ModelConfig):
    """``(args, model)`` with every parameter on the meta device (no storage)."""
    from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

    args = model_args(cfg)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(args, attn_backend=cfg.attn_backend)
    model.set_kernels(cfg.kernels)
    return args, model


def check_kernels_usable(cfg: ModelConfig, device: torch.device) -> None:
    """``model.kernels: liger`` fails at build time where liger cannot run (``auto`` falls back per call)."""
    if cfg.kernels == "liger":
        from rynnscale.ops.fused import require_liger

        require_liger(device)


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


def build_model(cfg: ModelConfig, device: torch.device, seed: int):
    """Construct on the meta device, materialise on ``device``, then load HF weights or initialise randomly.

    Returns ``(args, model)``. Loading validates every tensor (missing / unexpected / shape) and fails
    listing the names rather than leaving anything randomly initialised. ``cfg.kernels`` is applied
    (``set_kernels``); ``cfg.compile`` is not: compile after activation checkpointing
    (``rynnscale.parallel.compile.compile_blocks``)."""
    check_kernels_usable(cfg, device)
    args, model = _meta_model(cfg)
    model.to_empty(device=device)
    restore_buffers(model)
    if cfg.init_from is not None:
        from rynnscale.checkpoint.hf import load_hf_weights

        report = load_hf_weights(model, cfg.init_from)
        log.info("loaded %s", report)
    else:
        model.init_weights(seed)
    return args, model


def build_sharded_model(cfg: ModelConfig, meshes: Meshes, device: torch.device, seed: int, *,
                        freeze: Sequence[str] = (), **parallelize_kw: Any):
    """The distributed build: no rank ever holds the whole model, only its shards plus one tensor.

    Meta construction -> ``freeze`` patterns (``model.freeze``) -> ``parallelize_model`` on the meta
    model (EP keeps this rank's experts, activation checkpointing, FSDP2; ``parallelize_kw`` go there)
    -> ``to_empty(device)`` allocates this rank's shards -> fill them: ``cfg.init_from`` through
    ``load_hf_weights`` (each rank reads only its rows of each tensor: its experts, its FSDP shard),
    else ``init_sharded_weights`` (each FULL tensor drawn exactly as the single-process
    ``init_weights(seed)`` draws it, then cut). Returns ``(args, model)``; equal, gathered, to
    ``build_model(cfg, device, seed)``. Pass ``compile=cfg.compile`` in ``parallelize_kw`` to compile the
    blocks between checkpointing and FSDP2."""
    from rynnscale.parallel.fsdp import init_sharded_weights, parallelize_model

    check_kernels_usable(cfg, device)
    args, model = _meta_model(cfg)
    if freeze:
        from rynnscale.train.optim import freeze_parameters

        freeze_parameters(model, freeze)
    parallelize_model(model, meshes, **parallelize_kw)
    model.to_empty(device=device)
    embed = model.model.language_model.embed_tokens.weight
    if args.tie_word_embeddings and model.lm_head.weight is not embed:
        raise RuntimeError("lm_head.weight is no longer tied to embed_tokens.weight after to_empty (FSDP2 must "
                           "keep the alias)")
    restore_buffers(model)
    if cfg.init_from is not None:
        from rynnscale.checkpoint.hf import load_hf_weights

        report = load_hf_weights(model, cfg.init_from)
        log.info("loaded %s", report)
    else:
        init_sharded_weights(model, seed)
    return args, model
