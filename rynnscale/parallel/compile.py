"""Regional ``torch.compile``: compile each block (decoder layer, vision block) on its own.

Why per block and not the whole model: every decoder layer runs the same code, so one compiled
graph serves all of them (compile time does not grow with depth); the data-dependent parts outside
the blocks (vision placement, the loss head's labelled-row selection, the load-balancing loss) stay
eager; and FSDP2's per-block hooks stay outside the compiled regions. What it buys: Inductor fuses
the element-wise work between matmuls (RMSNorm, RoPE, SwiGLU, routing softmax/top-k, residual
adds) into few kernels, the same job liger-kernel does by hand (``model.kernels``).

Order (as torchtitan): activation checkpointing wraps a block first, then the wrapper is compiled
(checkpointing, selective too, becomes part of the graph), then FSDP2 shards it. ``nn.Module.compile``
compiles in place, so module names and ``state_dict`` keys do not change (HF key parity holds).

Packed rows change length every step: shapes are compiled dynamically after the first change
(torch's automatic dynamic shapes), so a run recompiles about once, not once per length.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def compile_blocks(model: nn.Module, *, fullgraph: bool = False) -> int:
    """Compile every block of ``model.activation_checkpoint_targets()`` in place; returns the count.

    Call after activation checkpointing and before ``fully_shard``. ``fullgraph=True`` turns graph
    breaks into errors (useful to check a kernel path is traceable). Modules of the blocks whose
    ``kernels`` is ``auto`` switch to ``torch`` (Inductor fuses those ops); the loss head, outside
    the blocks, keeps its choice."""
    if not hasattr(model, "activation_checkpoint_targets"):
        raise TypeError(f"{type(model).__name__} has no activation_checkpoint_targets(); cannot find its blocks")
    # every block of one list shares the code; allow a recompile per list for the dynamic-shape switch
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    n = 0
    for blocks in model.activation_checkpoint_targets():
        for block in blocks:
            # inside a compiled block Inductor does the fusing: "auto" kernels become the plain ops
            # (liger's hand-written kernels would be opaque calls in the graph); an explicit "liger" stays
            for m in block.modules():
                if getattr(m, "kernels", None) == "auto":
                    m.kernels = "torch"
            block.compile(fullgraph=fullgraph)
            n += 1
    log.info("torch.compile: %d blocks compiled", n)
    return n
