"""Build a Qwen3-VL model from a recipe's ``model`` section: a local HF checkpoint or an inline architecture."""

from __future__ import annotations

import logging

import torch

from rynnscale.config.schema import ModelConfig
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs

log = logging.getLogger("rynnscale")


def model_args(cfg: ModelConfig) -> Qwen3VLArgs:
    if cfg.init_from is not None:
        from rynnscale.checkpoint.hf import read_hf_config

        args, _ = read_hf_config(cfg.init_from)
        return args
    return Qwen3VLArgs.from_hf_config(dict(cfg.arch), strict=True, where="model.arch")


def build_model(cfg: ModelConfig, device: torch.device, seed: int):
    """Construct on the meta device, materialise on ``device``, then load HF weights or initialise randomly.

    Returns ``(args, model)``. Loading validates every tensor (missing / unexpected / shape) and fails
    listing the names rather than leaving anything randomly initialised."""
    from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

    args = model_args(cfg)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(args, attn_backend=cfg.attn_backend)
    model.to_empty(device=device)
    if cfg.init_from is not None:
        from rynnscale.checkpoint.hf import load_hf_weights

        report = load_hf_weights(model, cfg.init_from)
        log.info("loaded %s", report)
    else:
        model.init_weights(seed)
    return args, model
