"""FSDP2 mechanisms every model's parallel plan uses (the Qwen3-VL plan, which decides WHAT is wrapped,
is ``rynnscale.models.qwen3_vl.parallelize``):

- ``mixed_precision_policy``: bf16 parameters for compute with fp32 gradient reduction and fp32 sharded
  master weights on GPU (the optimiser sees the fp32 shards); fp32 throughout on CPU.
- ``sum_gradient_reduction``: gradients are SUMMED, not averaged, over data-parallel ranks: the training
  step already divides the loss by the global target-token count of the step, so the sum of the ranks'
  gradients is the gradient of the global-batch loss.
- ``gather_full_state_dict``: the whole model on every rank (tests, small models).
- ``local_pieces`` / ``init_sharded_weights``: where this rank's shard sits in each full tensor, and a
  sharded random init bitwise equal to the single-process one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from rynnscale.parallel.expert_parallel import expert_shards
from rynnscale.parallel.fqn import clean_fqn
from rynnscale.parallel.mesh import Meshes

log = logging.getLogger(__name__)


def mixed_precision_policy(compute: torch.dtype) -> MixedPrecisionPolicy:
    """Parameters cast to ``compute`` (``rynnscale.parallel.precision.compute_dtype``) for forward / backward,
    gradients reduced in fp32; fp32 compute: no casts."""
    if compute != torch.float32:
        return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def sum_gradient_reduction(model: nn.Module) -> None:
    """Every FSDP unit of ``model`` reduces gradients as a plain SUM (no 1/N; gloo has no PREMUL_SUM)."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, meshes: Meshes | None) -> dict[str, torch.Tensor]:
    """The full (unsharded, all experts) ``state_dict`` with HF keys, on the CPU of EVERY rank.

    A collective: all ranks must call it. FSDP shards are all-gathered (``full_tensor``); expert
    weights are then concatenated over the EP group in expert order. For tests and small models
    (it materialises the whole model per rank)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    split = {clean_fqn(n) for n in expert_shards(model)} if meshes is not None and meshes.ep is not None else set()
    out = {}
    for name, value in model.state_dict().items():
        t = value.full_tensor() if isinstance(value, DTensor) else value
        if name in split:
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
def init_sharded_weights(model: nn.Module, seed: int, std: float = 0.02,
                         select: Callable[[str], bool] | None = None) -> None:
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

    model.init_weights(seed, std, fill=fill, select=select)
