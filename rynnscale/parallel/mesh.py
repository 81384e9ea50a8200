"""Parallel layout and device meshes: ``dp_replicate x dp_shard`` for dense parameters, with expert
parallelism (EP) carved out of ``dp_shard``.

Every rank is a data-parallel rank (EP ranks hold different data), so ``world = dp_replicate x dp_shard``
and ``ep`` must divide ``dp_shard``. The ranks of one replica are laid out as ``[edp_shard, ep]`` with
``ep`` innermost, so an EP group is ``ep`` consecutive ranks (the same node when ``ep <= GPUs per node``,
where the all-to-all runs over NVLink):

    global rank = ((replica * edp_shard) + edp) * ep + ep_rank

- dense params: FSDP over ``dp_shard`` (= ``edp_shard x ep`` flattened), HSDP-replicated over ``dp_replicate``.
- expert params: split over ``ep`` by expert index (rank ``ep_rank`` holds experts
  ``[ep_rank * E/ep, (ep_rank+1) * E/ep)``), FSDP over ``edp_shard``, replicated over ``dp_replicate``;
  their gradients are reduced over those ``dp_replicate x edp_shard`` ranks only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class LayoutError(ValueError):
    """An impossible ``parallel.*`` layout for this world size / model."""


@dataclass(frozen=True)
class ParallelLayout:
    """Resolved sizes of the mesh axes (``dp_shard`` never -1 here)."""

    world_size: int
    dp_replicate: int
    dp_shard: int
    ep: int

    @property
    def edp_shard(self) -> int:
        """FSDP degree of the expert parameters (data-parallel ranks left inside ``dp_shard`` after EP)."""
        return self.dp_shard // self.ep

    @property
    def dp_size(self) -> int:
        """Data-parallel world: every rank (EP ranks see different data)."""
        return self.world_size

    @classmethod
    def resolve(cls, world_size: int, dp_replicate: int = 1, dp_shard: int = -1, ep: int = 1,
                num_experts: int = 0) -> ParallelLayout:
        """Check ``parallel.{dp_replicate, dp_shard, ep}`` against the world size and the model;
        ``dp_shard=-1`` takes all remaining ranks. Raises ``LayoutError`` naming the keys."""
        where = f"(world size {world_size}: parallel.dp_replicate={dp_replicate}, parallel.dp_shard={dp_shard}, " \
                f"parallel.ep={ep})"
        if world_size < 1:
            raise LayoutError(f"world size must be >= 1, got {world_size}")
        if dp_replicate < 1 or ep < 1 or (dp_shard < 1 and dp_shard != -1):
            raise LayoutError(f"parallel sizes must be >= 1 (dp_shard may be -1) {where}")
        if world_size % dp_replicate:
            raise LayoutError(f"parallel.dp_replicate={dp_replicate} does not divide the world size {world_size} {where}")
        if dp_shard == -1:
            dp_shard = world_size // dp_replicate
        if dp_replicate * dp_shard != world_size:
            raise LayoutError(f"parallel.dp_replicate x parallel.dp_shard = {dp_replicate * dp_shard} must equal the "
                              f"world size {world_size} {where}")
        if dp_shard % ep:
            raise LayoutError(f"parallel.ep={ep} must divide parallel.dp_shard={dp_shard} (EP is carved out of the "
                              f"FSDP ranks) {where}")
        if ep > 1:
            if num_experts <= 0:
                raise LayoutError(f"parallel.ep={ep} needs an MoE model, but the model has no experts {where}")
            if num_experts % ep:
                raise LayoutError(f"num_experts={num_experts} is not divisible by parallel.ep={ep} {where}")
        return cls(world_size, dp_replicate, dp_shard, ep)


@dataclass
class Meshes:
    """The meshes one rank needs. ``dense``: [dp_replicate, dp_shard] (1-D [dp_shard] without HSDP);
    ``expert``: [dp_replicate, edp_shard] (1-D [edp_shard] without HSDP), the FSDP mesh of expert params;
    ``ep``: 1-D EP group mesh (None if ep == 1); ``dp_shard``: 1-D mesh over which every rank holds a
    distinct piece of every parameter (the group for global norms)."""

    layout: ParallelLayout
    world: DeviceMesh
    dense: DeviceMesh
    expert: DeviceMesh
    dp_shard: DeviceMesh
    ep: DeviceMesh | None

    @property
    def ep_rank(self) -> int:
        return 0 if self.ep is None else self.ep.get_local_rank()

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return None if self.ep is None else self.ep.get_group()


def build_meshes(layout: ParallelLayout, device_type: str) -> Meshes:
    """Create the world mesh ``[dp_replicate, edp_shard, ep]`` and its views (needs an initialised
    default process group of ``layout.world_size`` ranks)."""
    if dist.get_world_size() != layout.world_size:
        raise LayoutError(f"layout is for {layout.world_size} ranks but the process group has {dist.get_world_size()}")
    world = init_device_mesh(device_type, (layout.dp_replicate, layout.edp_shard, layout.ep),
                             mesh_dim_names=("dp_replicate", "edp_shard", "ep"))
    dp_shard = world["edp_shard", "ep"]._flatten("dp_shard")
    hsdp = layout.dp_replicate > 1
    dense = world["dp_replicate", "dp_shard"] if hsdp else dp_shard
    expert = world["dp_replicate", "edp_shard"] if hsdp else world["edp_shard"]
    ep = world["ep"] if layout.ep > 1 else None
    return Meshes(layout, world, dense, expert, dp_shard, ep)


def device_type_of(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"
