"""Apply expert parallelism, activation checkpointing and FSDP2 to a Qwen3-VL model, in that order.

FSDP2 units (``fully_shard``), innermost first:
- each MoE layer's ``mlp.experts`` on the expert mesh ``[dp_replicate,] edp_shard`` (after EP kept this
  rank's E/ep experts): their gradients are reduced over those ranks only;
- each decoder layer and each vision block on the dense mesh ``[dp_replicate,] dp_shard``;
- ``lm_head`` when it is not tied to the embedding (a tied head stays with the embedding in the root);
- the root (embedding, vision patch embed / mergers, final norm, tied head), NOT resharded after
  forward, because ``model.loss_sum`` (the head) is called after the root's forward has returned.
Gradients are SUMMED, not averaged, over data-parallel ranks (``set_gradient_divide_factor(1)``): the
training step already divides the loss by the global target-token count of the step, so the sum of the
ranks' gradients is the gradient of the global-batch loss.

Mixed precision (GPU): bf16 parameters for compute, fp32 gradient reduction, fp32 sharded master weights
(the optimiser sees the fp32 shards). CPU: fp32 throughout.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from rynnscale.parallel.checkpointing import apply_activation_checkpointing
from rynnscale.parallel.expert_parallel import apply_expert_parallel, moe_blocks
from rynnscale.parallel.mesh import Meshes

log = logging.getLogger("rynnscale")


def mixed_precision_policy(device: torch.device, dtype_name: str) -> MixedPrecisionPolicy:
    """bf16 compute + fp32 reduce on GPU (``train.dtype`` auto/bfloat16); fp32 on CPU or ``float32``."""
    use_bf16 = dtype_name == "bfloat16" or (dtype_name == "auto" and device.type == "cuda")
    if use_bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def parallelize_model(model: nn.Module, meshes: Meshes, *, dtype_name: str = "auto",
                      ac_mode: str = "none", ac_every: int = 1, reshard_after_forward: bool = True) -> nn.Module:
    """EP -> activation checkpointing -> FSDP2 on a materialised (CPU or device) model, in place.

    FSDP2 moves the shards to the mesh's device. Returns the model (now an ``FSDPModule``)."""
    layout = meshes.layout
    device = torch.device(meshes.dense.device_type)
    if layout.ep > 1:
        n = apply_expert_parallel(model, meshes.ep_group, layout.ep, meshes.ep_rank)
        log.info("expert parallel: %d MoE layers, %d experts per rank", n,
                 moe_blocks(model)[0].experts.num_experts if n else 0)
    apply_activation_checkpointing(model, ac_mode, every=ac_every)
    mp = mixed_precision_policy(device, dtype_name)
    kw = dict(mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for block in moe_blocks(model):
        fully_shard(block.experts, mesh=meshes.expert, **kw)
    for blocks in model.activation_checkpoint_targets():
        for block in blocks:
            fully_shard(block, mesh=meshes.dense, **kw)
    if model.lm_head.weight is not model.model.language_model.embed_tokens.weight:
        fully_shard(model.lm_head, mesh=meshes.dense, **kw)
    # the root stays unsharded from forward to backward: the loss head (``model.loss_sum`` ->
    # ``lm_head``) runs AFTER the root's forward, and a tied head's weight is a root parameter
    fully_shard(model, mesh=meshes.dense, mp_policy=mp, reshard_after_forward=False)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    model.always_run_vision = True
    return model


def is_expert_param(name: str) -> bool:
    return name.endswith(("experts.gate_up_proj", "experts.down_proj"))


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, meshes: Meshes | None) -> dict[str, torch.Tensor]:
    """The full (unsharded, all experts) ``state_dict`` with HF keys, on the CPU of EVERY rank.

    A collective: all ranks must call it. FSDP shards are all-gathered (``full_tensor``); expert
    weights are then concatenated over the EP group in expert order. For tests and small models
    (it materialises the whole model per rank)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in model.state_dict().items():
        t = value.full_tensor() if isinstance(value, DTensor) else value
        if meshes is not None and meshes.ep is not None and is_expert_param(name):
            parts = [torch.empty_like(t) for _ in range(meshes.layout.ep)]
            dist.all_gather(parts, t.contiguous(), group=meshes.ep_group)
            t = torch.cat(parts, dim=0)
        out[name] = t.detach().cpu().clone()
    return out
