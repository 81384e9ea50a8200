"""Activation checkpointing of whole blocks (decoder layers, vision blocks).

Each selected block is replaced in its ``nn.ModuleList`` by torch's ``checkpoint_wrapper`` with the
non-reentrant ``torch.utils.checkpoint`` (the combination torchtitan applies before FSDP2's
``fully_shard``, so it composes with FSDP2: wrap first, then shard the wrapped blocks). The wrapper
strips its ``_checkpoint_wrapped_module.`` prefix from ``state_dict()`` keys and accepts the plain
keys in ``load_state_dict``, so HF key parity is unchanged (``named_parameters()`` do carry the
prefix; DCP's state-dict helpers understand it).

Modes: ``none`` (nothing), ``full`` (every block), ``every_k`` (blocks 0, k, 2k, ... of each list),
``selective`` (every block, but the outputs of matmuls, grouped GEMMs and attention kernels are SAVED
by torch's selective-checkpoint policy, so backward recomputes only the cheap element-wise ops: norms,
rotary, SiLU, routing softmax; attention, whose cost grows with s^2, is never recomputed).
Anything computed outside the blocks (embedding, DeepStack adds, the load-balancing loss and its
counts all-reduce, the loss head) is not recomputed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import SAC_IGNORED_OPS, CheckpointPolicy, create_selective_checkpoint_contexts

MODES = ("none", "full", "every_k", "selective")

_aten = torch.ops.aten
# ops whose outputs ``selective`` keeps (matmuls and attention kernels; names that this torch lacks are skipped)
_SAVE_OP_NAMES = ("mm", "addmm", "bmm", "linear", "_grouped_mm", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                  "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                  "_efficient_attention_forward", "_scaled_dot_product_fused_attention_overrideable")


def _varlen_attention_ops() -> frozenset:
    """torch's flash varlen attention (``torch.nn.attention.varlen``, our ``varlen`` backend) is a custom op: the
    selective policy sees ``torch_attn._varlen_attn`` itself, never the aten flash kernel inside it."""
    try:
        import torch.nn.attention.varlen  # noqa: F401  (registers the torch_attn ops)
    except ImportError:
        return frozenset()
    namespace = getattr(torch.ops, "torch_attn", None)
    return frozenset(getattr(namespace, n).default for n in ("_varlen_attn",) if hasattr(namespace, n))


SELECTIVE_SAVE_OPS = frozenset(getattr(_aten, n).default for n in _SAVE_OP_NAMES if hasattr(_aten, n)) \
    | _varlen_attention_ops()


# Profiler annotations are not computation, yet selective checkpointing counts them like any op and fails when the
# recomputation issues more of them than the forward did: FSDP2's hooks do (an FSDP unit nested in a checkpointed
# block, e.g. the experts under EP, re-enters its root pre-forward during recomputation; "record_function_enter_new
# invocation index 2 encountered during backward but not found in storage" at ep = dp_shard x cp). Torch's own set
# of ops that selective checkpointing passes through untracked takes them (as upstream PR pytorch#196862 does).
_PROFILER_OPS = frozenset(getattr(getattr(torch.ops.profiler, name), overload)
                          for name, overloads in (("_record_function_enter_new", ("default",)),
                                                  ("_record_function_enter", ("default",)),
                                                  ("_record_function_exit", ("default", "_RecordFunction")))
                          if hasattr(torch.ops.profiler, name)
                          for overload in overloads if hasattr(getattr(torch.ops.profiler, name), overload))
SAC_IGNORED_OPS.update(_PROFILER_OPS)


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _wrap(block: nn.Module, selective: bool) -> nn.Module:
    if selective:
        return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                  context_fn=functools.partial(create_selective_checkpoint_contexts, _selective_policy))
    return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


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
    step = every if mode == "every_k" else 1
    wrapped = 0
    for blocks in _targets(model):
        for i in range(0, len(blocks), step):
            if not isinstance(blocks[i], CheckpointWrapper):
                blocks[i] = _wrap(blocks[i], selective=mode == "selective")
            wrapped += 1
    return wrapped
