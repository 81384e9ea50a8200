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

Blocks that do not trace whole: a checkpointed region cannot hold a graph break, and a block calling an
eager-only function (``torch.compiler.disable``: the per-expert GEMM loop, the per-document attention loop,
the DeltaNet delta rule, the EP all-to-all, the CP collectives) makes torch run the whole checkpoint eagerly,
with dynamo off inside it: nothing of that block would be compiled. The block inside the wrapper is
therefore compiled too: where the wrapper traces, its graph holds the inner block's code (one graph, the
checkpoint in it); where it does not, the checkpoint runs eagerly around the inner block's compiled parts
(the pieces between the eager-only calls, compiled with dynamic shapes from the start), as without
checkpointing. Selective checkpointing's policy then
applies to the eager calls; the compiled parts are recomputed whole (Inductor calls its matmul library
kernels as ``out=`` variants, which the policy does not save).

Packed rows change length every step: shapes are compiled dynamically after the first change
(torch's automatic dynamic shapes), so a run recompiles about once, not once per length.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

log = logging.getLogger(__name__)


def compile_blocks(model: nn.Module, *, fullgraph: bool = False, backend="inductor") -> int:
    """Compile every block of ``model.activation_checkpoint_targets()`` in place; returns the count.

    Call after activation checkpointing and before ``fully_shard``. ``fullgraph=True`` turns graph
    breaks into errors (useful to check a kernel path is traceable). Modules of the blocks whose
    ``kernels`` is ``auto`` switch to ``torch`` (Inductor fuses those ops); the loss head, outside
    the blocks, keeps its choice. A checkpointed block is compiled both whole (with its checkpoint) and inside
    the wrapper (module docstring); ``backend`` is ``torch.compile``'s (a callable records the graphs)."""
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
            if isinstance(block, CheckpointWrapper):
                # where the checkpointed block does not trace whole (a graph break, e.g. a
                # ``torch.compiler.disable`` call), torch runs its checkpoint eagerly with dynamo off:
                # the block compiled on its own is still compiled, in pieces between those calls.
                # Dynamic from the first call: a recomputation must rerun the code its forward ran, and a
                # static graph replaced by a dynamic one in between (EP: each layer receives another number
                # of rows) failed selective checkpointing's replay ("aten.repeat_interleave.Tensor
                # encountered during backward but not found in storage")
                block._checkpoint_wrapped_module.compile(fullgraph=fullgraph, backend=backend, dynamic=True)
            block.compile(fullgraph=fullgraph, backend=backend)
            n += 1
    log.info("torch.compile: %d blocks compiled", n)
    return n
