"""Activation checkpointing of whole blocks (decoder layers, vision blocks).

Each selected block is replaced in its ``nn.ModuleList`` by torch's ``checkpoint_wrapper`` with the
non-reentrant ``torch.utils.checkpoint`` (the combination torchtitan applies before FSDP2's
``fully_shard``, so it composes with FSDP2: wrap first, then shard the wrapped blocks). The wrapper
strips its ``_checkpoint_wrapped_module.`` prefix from ``state_dict()`` keys and accepts the plain
keys in ``load_state_dict``, so HF key parity is unchanged (``named_parameters()`` do carry the
prefix; DCP's state-dict helpers understand it).

Modes: ``none`` (nothing), ``full`` (every block), ``every_k`` (blocks 0, k, 2k, ... of each list).
Anything computed outside the blocks (embedding, DeepStack adds, the load-balancing loss and its
counts all-reduce, the loss head) is not recomputed.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

MODES = ("none", "full", "every_k")


def _targets(model: nn.Module) -> list[nn.ModuleList]:
    if hasattr(model, "activation_checkpoint_targets"):
        return list(model.activation_checkpoint_targets())
    raise TypeError(f"{type(model).__name__} has no activation_checkpoint_targets(); cannot find its blocks")


def apply_activation_checkpointing(model: nn.Module, mode: str = "none", every: int = 1) -> int:
    """Wrap the model's blocks in place; returns how many blocks are checkpointed (already-wrapped
    blocks are left alone and counted)."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {MODES}")
    if mode == "every_k" and (not isinstance(every, int) or every < 1):
        raise ValueError(f"activation checkpointing every={every!r} must be a positive integer for mode 'every_k'")
    if mode == "none":
        return 0
    step = 1 if mode == "full" else every
    wrapped = 0
    for blocks in _targets(model):
        for i in range(0, len(blocks), step):
            if not isinstance(blocks[i], CheckpointWrapper):
                blocks[i] = checkpoint_wrapper(blocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            wrapped += 1
    return wrapped
