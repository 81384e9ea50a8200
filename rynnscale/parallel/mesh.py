"""Device meshes of a ``ParallelLayout`` (``rynnscale.parallel.layout``: the rules): ``dp_replicate x
(dp_shard x cp)`` for dense parameters, with expert parallelism (EP) carved out of the ``dp_shard x cp``
FSDP ranks, and context-parallel (CP) groups of ``cp`` consecutive ranks that hold the same samples.

``world = dp_replicate x dp_shard x cp``; ``ep`` must divide ``fsdp = dp_shard x cp``. The ``fsdp`` ranks of
one replica are laid out as ``[edp_shard, ep]`` with ``ep`` innermost, so an EP group is ``ep`` consecutive
ranks (the same node when ``ep <= GPUs per node``, where the all-to-all runs over NVLink):

    global rank = ((replica * edp_shard) + edp) * ep + ep_rank = (replica * dp_shard + data) * cp + cp_rank

(the same ranks, factored two ways: a CP group is ``cp`` consecutive ranks too, its data rank
``rank // cp``).

- dense params: FSDP over ``dp_shard`` (the flattened mesh of all ``fsdp = dp_shard x cp`` ranks of a
  replica, torchtitan's ``dp_shard_cp``; named ``dp_shard`` below), HSDP-replicated over ``dp_replicate``.
- expert params: split over ``ep`` by expert index (rank ``ep_rank`` holds experts
  ``[ep_rank * E/ep, (ep_rank+1) * E/ep)``), FSDP over ``edp_shard``, replicated over ``dp_replicate``;
  their gradients are reduced over those ``dp_replicate x edp_shard`` ranks only.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from rynnscale.parallel.layout import LayoutError, ParallelLayout

__all__ = ["LayoutError", "Meshes", "ParallelLayout", "build_meshes", "device_type_of"]


@dataclass
class Meshes:
    """The meshes one rank needs. ``dense``: [dp_replicate, dp_shard] (1-D [dp_shard] without HSDP);
    ``expert``: [dp_replicate, edp_shard] (1-D [edp_shard] without HSDP), the FSDP mesh of expert params;
    ``ep``: 1-D EP group mesh (None if ep == 1); ``dp_shard``: 1-D mesh of the ``dp_shard x cp`` FSDP
    ranks, over which every rank holds a distinct piece of every parameter (the group for global norms);
    ``cp``: 1-D CP group mesh (None if cp == 1)."""

    layout: ParallelLayout
    world: DeviceMesh
    dense: DeviceMesh
    expert: DeviceMesh
    dp_shard: DeviceMesh
    ep: DeviceMesh | None
    cp: DeviceMesh | None = None

    @property
    def cp_rank(self) -> int:
        return 0 if self.cp is None else self.cp.get_local_rank()

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return None if self.cp is None else self.cp.get_group()

    @property
    def ep_rank(self) -> int:
        return 0 if self.ep is None else self.ep.get_local_rank()

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return None if self.ep is None else self.ep.get_group()


def build_meshes(layout: ParallelLayout, device_type: str, timeout_s: float | None = None) -> Meshes:
    """Create the world mesh ``[dp_replicate, edp_shard, ep]`` and its views, and (cp > 1) the CP mesh
    ``[data, cp]`` over the same ranks (needs an initialised default process group of
    ``layout.world_size`` ranks). ``timeout_s`` (``parallel.timeout_s``): the collective timeout of every
    sub-group the meshes create (FSDP, EP, CP, HSDP); torch gives them its defaults (30 min on gloo, 10 on
    NCCL), not the default group's, so a hung EP all-to-all waited 30 min whatever the recipe said. None:
    torch's defaults."""
    if dist.get_world_size() != layout.world_size:
        raise LayoutError(f"layout is for {layout.world_size} ranks but the process group has {dist.get_world_size()}")
    world = init_device_mesh(device_type, (layout.dp_replicate, layout.edp_shard, layout.ep),
                             mesh_dim_names=("dp_replicate", "edp_shard", "ep"))
    dp_shard = world["edp_shard", "ep"]._flatten("dp_shard")
    hsdp = layout.dp_replicate > 1
    dense = world["dp_replicate", "dp_shard"] if hsdp else dp_shard
    expert = world["dp_replicate", "edp_shard"] if hsdp else world["edp_shard"]
    ep = world["ep"] if layout.ep > 1 else None
    cp = None
    if layout.cp > 1:
        ranks = torch.arange(layout.world_size).reshape(layout.data_world_size, layout.cp)
        cp = DeviceMesh(device_type, ranks, mesh_dim_names=("data", "cp"))["cp"]
    meshes = Meshes(layout, world, dense, expert, dp_shard, ep, cp)
    if timeout_s is not None:
        set_group_timeouts(meshes, timeout_s)
    return meshes


def set_group_timeouts(meshes: Meshes, timeout_s: float) -> None:
    """Set the collective timeout of every process group of ``meshes`` (each dimension of the world, the
    flattened FSDP and the CP mesh; the dense / expert / EP views share those groups)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout  # (torchtitan sets its mesh timeouts so)

    timeout = datetime.timedelta(seconds=timeout_s)
    groups: dict[int, dist.ProcessGroup] = {}
    for mesh in (meshes.world, meshes.dp_shard, meshes.cp):
        if mesh is not None:
            for dim in range(mesh.ndim):
                group = mesh.get_group(dim)
                groups[id(group)] = group
    for group in groups.values():
        _set_pg_timeout(timeout, group)


def device_type_of(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"
