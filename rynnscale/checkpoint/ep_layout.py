"""Expert-parallel checkpoint layout: present DCP the GLOBAL expert tensors.

Under expert parallelism every EP rank holds a different slice of the experts in a parameter of the
same name and shape (``...mlp.experts.gate_up_proj [E/ep, 2I, H]``, FSDP-sharded further over
``edp_shard``). Saved as they are, DCP would see one tensor of E/ep experts written by several ranks
with the same offsets and keep only one rank's copy: the checkpoint would silently lose experts.

This adapter is applied to the ``{"model": ..., "optim": ...}`` state dict right before ``dcp.save`` /
``dcp.load`` (it leaves the training parameters alone): each expert tensor (weights and their AdamW
moments) becomes a ``DTensor`` of the global shape ``[E, ...]`` over an "expert-major" mesh whose
ranks are ordered ``[ep, edp_shard]`` (``[dp_replicate, ep * edp_shard]`` with HSDP, replicated over
``dp_replicate``), placements ``Shard(0)``, wrapping this rank's local shard WITHOUT a copy. Rank
``(ep_rank, edp)`` then holds rows ``ep_rank * E/ep + edp * E/(ep * edp_shard) ...`` of the global
tensor, which is exactly where EP + FSDP put them, so DCP writes (and reads, in place) a layout-free
checkpoint: it loads into any other ``ep`` / world size, a single process, or ``export-hf``.

Requirement: ``E/ep`` divisible by ``edp_shard`` (FSDP's chunks of the local experts then coincide with
the even chunks of the global tensor); otherwise ``CheckpointError`` names the sizes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from rynnscale.checkpoint.dcp import CheckpointError
from rynnscale.parallel.fqn import clean_fqn


class ExpertCheckpointLayout:
    """Adapter ``state -> state`` that turns this rank's expert shards into global-shape DTensors.

    Build it once on every rank (creating the expert-major mesh is a collective); ``None`` from
    ``for_model`` when the model has no expert parallelism (nothing to adapt)."""

    def __init__(self, expert_fqns: dict[str, int], meshes: Any):
        from torch.distributed.device_mesh import DeviceMesh

        self.expert_fqns = expert_fqns          # parameter FQN -> total experts E
        layout = meshes.layout
        self.ep, self.edp, self.replicas = layout.ep, layout.edp_shard, layout.dp_replicate
        ranks_red = meshes.world.mesh          # [dp_replicate, edp_shard, ep] global ranks
        expert_major = ranks_red.permute(0, 2, 1).reshape(self.replicas, self.ep * self.edp)  # [R, ep*edp]
        if self.replicas == 1:
            self.mesh = DeviceMesh(meshes.world.device_type, expert_major[0], mesh_dim_names=("expert_global",))
        else:
            self.mesh = DeviceMesh(meshes.world.device_type, expert_major,
                                   mesh_dim_names=("dp_replicate", "expert_global"))

    @classmethod
    def for_model(cls, model: nn.Module, meshes: Any | None) -> ExpertCheckpointLayout | None:
        """The adapter for ``model`` under ``meshes`` (None without EP)."""
        if meshes is None or meshes.layout.ep <= 1:
            return None
        from rynnscale.parallel.expert_parallel import expert_shards

        fqns = {clean_fqn(name): total for name, (_offset, total) in expert_shards(model).items()}
        if not fqns:
            return None
        return cls(fqns, meshes)

    def _global(self, key: str, t: torch.Tensor, total: int) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        local = t._local_tensor if isinstance(t, DTensor) else t
        per_rank = total // self.ep
        if per_rank % self.edp:
            raise CheckpointError(
                f"{key}: {per_rank} experts per EP rank (num_experts={total}, parallel.ep={self.ep}) are not divisible "
                f"by the expert FSDP degree edp_shard={self.edp}; choose parallel.ep / dp_shard so that they are")
        local_shape = (per_rank // self.edp, *local.shape[1:])
        if tuple(local.shape) != local_shape:
            raise CheckpointError(f"{key}: local expert shard has shape {list(local.shape)}, expected {list(local_shape)}")
        shape = torch.Size((total, *local.shape[1:]))
        stride = torch.empty(shape, device="meta").stride()
        placements = (Shard(0),) if self.replicas == 1 else (Replicate(), Shard(0))
        return DTensor.from_local(local, self.mesh, placements, run_check=False, shape=shape, stride=stride)

    def __call__(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``{"model": sd, "optim": osd}`` whose expert tensors are global DTensors sharing
        storage with the originals (so an in-place DCP load fills the originals)."""
        out = dict(state)
        if "model" in state:
            model_sd = dict(state["model"])
            for key, total in self.expert_fqns.items():
                if key in model_sd:
                    model_sd[key] = self._global(f"model.{key}", model_sd[key], total)
            out["model"] = model_sd
        if "optim" in state:
            osd = dict(state["optim"])
            per_param = dict(osd.get("state", {}))
            for key, total in self.expert_fqns.items():
                if key in per_param:
                    per_param[key] = {k: self._global(f"optim.state.{key}.{k}", v, total)
                                      if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                                      for k, v in per_param[key].items()}
            osd["state"] = per_param
            out["optim"] = osd
        return out
