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
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from rynnscale.parallel.checkpointing import apply_activation_checkpointing
from rynnscale.parallel.compile import compile_blocks
from rynnscale.parallel.expert_parallel import apply_expert_parallel, expert_shards, moe_blocks
from rynnscale.parallel.mesh import Meshes

log = logging.getLogger("rynnscale")


def mixed_precision_policy(device: torch.device, dtype_name: str) -> MixedPrecisionPolicy:
    """bf16 compute + fp32 reduce on GPU (``train.dtype`` auto/bfloat16); fp32 on CPU or ``float32``."""
    use_bf16 = dtype_name == "bfloat16" or (dtype_name == "auto" and device.type == "cuda")
    if use_bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def parallelize_model(model: nn.Module, meshes: Meshes, *, dtype_name: str = "auto",
                      ac_mode: str = "none", ac_every: int = 1, reshard_after_forward: bool = True,
                      compile: bool = False) -> nn.Module:
    """EP -> activation checkpointing -> (``compile``: torch.compile per block) -> FSDP2 on the model, in
    place. Returns it (now an ``FSDPModule``).

    On a META model (the distributed build, ``rynnscale.models.build.build_sharded_model``) nothing is
    allocated: EP slices the meta expert weights, FSDP2 makes meta DTensor shards; then
    ``model.to_empty(device=...)`` allocates only this rank's shards and ``init_sharded_weights`` /
    ``load_hf_weights`` fill them. On a materialised (CPU or device) model FSDP2 moves the shards to the
    mesh's device. A tied ``lm_head`` stays one parameter of the root (FSDP2 keeps the alias)."""
    layout = meshes.layout
    device = torch.device(meshes.dense.device_type)
    if layout.ep > 1:
        n = apply_expert_parallel(model, meshes.ep_group, layout.ep, meshes.ep_rank)
        log.info("expert parallel: %d MoE layers, %d experts per rank", n,
                 moe_blocks(model)[0].experts.num_experts if n else 0)
    apply_activation_checkpointing(model, ac_mode, every=ac_every)
    if compile:
        compile_blocks(model)
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


# ------------------------------------------------------------------ filling a sharded model
@dataclass(frozen=True)
class LocalPiece:
    """One parameter / buffer of a (possibly sharded) model and where this rank's data sits in its FULL
    tensor (all experts, unsharded): rows ``[lo, hi)`` of dim 0 of a tensor of shape ``full_shape``.
    FSDP2 shards dim 0 (``Shard(0)``, ``torch.chunk`` sizes) and EP splits experts on dim 0, so one
    row range says it all."""

    tensor: torch.Tensor          # the module's attribute (Parameter / buffer; a DTensor under FSDP2)
    local: torch.Tensor           # this rank's storage to write into: the whole tensor or its shard
    full_shape: tuple[int, ...]
    lo: int
    hi: int

    def of(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the full tensor ``full`` (a view; 0-dim tensors are whole)."""
        return full[self.lo:self.hi] if full.dim() else full


def _shard_rows(t: torch.Tensor, name: str) -> tuple[int, int]:
    """Rows of ``t``'s GLOBAL dim 0 held by this rank (DTensor placements Replicate / Shard(0) only)."""
    from torch.distributed.tensor import DTensor

    if t.dim() == 0:
        return 0, 1
    lo, hi = 0, t.shape[0]
    if not isinstance(t, DTensor):
        return lo, hi
    mesh = t.device_mesh
    for d, placement in enumerate(t.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard(dim=0):
            raise NotImplementedError(f"{name}: placement {placement} (only Replicate / Shard(0) are supported)")
        n, k, r = hi - lo, mesh.size(d), mesh.get_local_rank(d)
        chunk = -(-n // k)  # torch.chunk: ceil-sized pieces, the last ranks may get fewer or none
        lo, hi = lo + min(r * chunk, n), lo + min((r + 1) * chunk, n)
    local_rows = t.to_local().shape[0]
    if hi - lo != local_rows:
        raise RuntimeError(f"{name}: computed rows [{lo}, {hi}) of {t.shape[0]} but the local shard has "
                           f"{local_rows} (placements {t.placements})")
    return lo, hi


def local_pieces(model: nn.Module) -> dict[str, LocalPiece]:
    """Every parameter and buffer (tied aliases included), named as ``named_parameters`` spells them
    (activation-checkpoint wrapper segments included) -> its ``LocalPiece``. Plain tensors: the whole
    tensor. FSDP2 DTensors: the local shard. EP expert weights: offset by this rank's first expert,
    ``full_shape`` with all ``E`` experts."""
    from torch.distributed.tensor import DTensor

    ep = expert_shards(model)
    out = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        lo, hi = _shard_rows(t, name)
        shape = tuple(t.shape)
        if name in ep:
            offset, total = ep[name]
            lo, hi, shape = lo + offset, hi + offset, (total, *shape[1:])
        with torch.no_grad():  # no_grad: to_local() is the shard itself, not an autograd view
            local = t.to_local() if isinstance(t, DTensor) else t
        out[name] = LocalPiece(t, local, shape, lo, hi)
    return out


@torch.no_grad()
def init_sharded_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """``model.init_weights(seed, std)`` for a sharded (FSDP2 / EP) model with storage (after
    ``to_empty``): every FULL tensor is generated on the shard's device with the same draws in the same
    order as the single-process init, this rank keeps its piece, and the full tensor is dropped before
    the next (peak: the shards plus one full tensor). Bitwise equal to the single-process init on the
    same device type."""
    pieces = local_pieces(model)

    def fill(name: str, init: Callable[[torch.Tensor], torch.Tensor]) -> None:
        piece = pieces[name]
        full = torch.empty(piece.full_shape, dtype=piece.local.dtype, device=piece.local.device)
        init(full)
        piece.local.copy_(piece.of(full))

    model.init_weights(seed, std, fill=fill)
