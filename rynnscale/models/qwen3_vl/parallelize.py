"""The Qwen3-VL parallel plan: which modules get expert parallelism, activation checkpointing,
``torch.compile`` and FSDP2, in that order (as torchtitan's per-model ``parallelize.py``). The generic
mechanisms live in ``rynnscale.parallel``; this file knows the model's structure.

Context parallelism (``parallel.cp > 1``): the model's ``cp`` is set to this rank's ``CPGroup`` (with the
``model.cp_attention`` choice, checked against the head count here); the FSDP meshes already span the
``dp_shard x cp`` ranks, so parameters are sharded and gradients summed over the CP ranks too.

FSDP2 units (``fully_shard``), innermost first:
- each MoE layer's ``mlp.experts`` on the expert mesh ``[dp_replicate,] edp_shard`` (after EP kept this
  rank's E/ep experts): their gradients are reduced over those ranks only;
- each decoder layer and each vision block on the dense mesh ``[dp_replicate,] dp_shard`` (x cp);
- ``lm_head`` when it is not tied to the embedding (a tied head stays with the embedding in the root);
- the root (embedding, vision patch embed / mergers, final norm, tied head), NOT resharded after
  forward, because ``model.loss_sum`` (the head) is called after the root's forward has returned.
Gradients are summed over data-parallel ranks (``rynnscale.parallel.fsdp.sum_gradient_reduction``).

Under FSDP every rank must run the vision tower in every forward (its all-gathers are collectives), so
the plan sets the model's ``always_run_vision``: a rank with a text-only micro-batch runs the tower on one
dummy patch group times 0.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import fully_shard

from rynnscale.models.qwen3_vl.moe import SparseMoeBlock
from rynnscale.parallel.activation_checkpoint import apply_activation_checkpointing
from rynnscale.parallel.compile import compile_blocks
from rynnscale.parallel.context_parallel import CPGroup, resolve_mode
from rynnscale.parallel.expert_parallel import ExpertParallelDispatcher, shard_experts
from rynnscale.parallel.fsdp import mixed_precision_policy, sum_gradient_reduction
from rynnscale.parallel.mesh import Meshes

log = logging.getLogger(__name__)


def moe_blocks(model: nn.Module) -> list[SparseMoeBlock]:
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def apply_expert_parallel(model: nn.Module, ep_group: dist.ProcessGroup, ep_size: int, ep_rank: int) -> int:
    """Split every MoE layer's experts over the EP group and route its tokens through the all-to-all
    (``model`` may be a whole model or one ``SparseMoeBlock``). Returns the number of MoE layers converted."""
    blocks = moe_blocks(model)
    for block in blocks:
        # every direct parameter of the experts module is expert-major (dim 0 = E): the fused weights and,
        # with LoRA, their adapters, which thereby live with their experts
        names = tuple(n for n, _ in block.experts.named_parameters(recurse=False))
        shard_experts(block.experts, ep_rank, ep_size, names)
        block.ep_dispatcher = ExpertParallelDispatcher(ep_group, ep_size, block.num_experts)
    return len(blocks)


def parallelize(model: nn.Module, meshes: Meshes | None, *, compute_dtype: torch.dtype = torch.float32,
                ac_mode: str = "none",
                ac_every: int = 1, compile: bool = False, reshard_after_forward: bool = True,
                cp_attention: str = "auto") -> nn.Module:
    """EP -> activation checkpointing -> (``compile``: torch.compile per block) -> FSDP2, in place; returns
    the model (an ``FSDPModule`` when ``meshes`` is given). ``meshes=None`` (one process): checkpointing
    and compile only.

    On a META model (``rynnscale.train.build``) nothing is allocated: EP slices the meta expert weights,
    FSDP2 makes meta DTensor shards; ``model.to_empty(device=...)`` then allocates only this rank's
    shards. A tied ``lm_head`` stays one parameter of the root (FSDP2 keeps the alias)."""
    if meshes is not None and meshes.layout.cp > 1:
        cp = meshes.layout.cp
        resolve_mode(cp_attention, model.args.text.num_attention_heads, cp)  # fail at build, naming the keys
        model.cp = CPGroup(meshes.cp_group, cp, meshes.cp_rank, cp_attention)
        log.info("context parallel: cp=%d, attention %s", cp,
                 resolve_mode(cp_attention, model.args.text.num_attention_heads, cp))
    if meshes is not None and meshes.layout.ep > 1:
        n = apply_expert_parallel(model, meshes.ep_group, meshes.layout.ep, meshes.ep_rank)
        log.info("expert parallel: %d MoE layers, %d experts per rank", n,
                 moe_blocks(model)[0].experts.num_experts if n else 0)
    apply_activation_checkpointing(model, ac_mode, every=ac_every)
    if compile:
        compile_blocks(model)
    if meshes is None:
        return model
    mp = mixed_precision_policy(compute_dtype)
    kw = dict(mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for block in moe_blocks(model):
        fully_shard(block.experts, mesh=meshes.expert, **kw)
    for blocks in model.activation_checkpoint_targets():
        for block in blocks:
            fully_shard(block, mesh=meshes.dense, **kw)
    if model.lm_head.weight is not model.input_embeddings().weight:
        fully_shard(model.lm_head, mesh=meshes.dense, **kw)
    # the root stays unsharded from forward to backward: the loss head (``model.loss_sum`` ->
    # ``lm_head``) runs AFTER the root's forward, and a tied head's weight is a root parameter
    fully_shard(model, mesh=meshes.dense, mp_policy=mp, reshard_after_forward=False)
    sum_gradient_reduction(model)
    model.always_run_vision = True
    return model
