"""The parallel layout rules: ``dp_replicate x dp_shard`` data-parallel ranks, with expert parallelism
(EP) carved out of ``dp_shard``. The one place these rules live: recipe validation (no world size yet),
the launch (``rynnscale.parallel.mesh.build_meshes``) and ``rynnscale plan`` all call ``ParallelLayout``.

Every rank is a data-parallel rank (EP ranks hold different data), so ``world = dp_replicate x dp_shard``
and ``ep`` must divide ``dp_shard`` and the model's ``num_experts``. Pure Python (no torch import): the
CLI validates a recipe in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """An impossible ``parallel.*`` layout for this world size / model; the message names the keys."""


def check_layout_keys(dp_replicate: int = 1, dp_shard: int = -1, ep: int = 1, num_experts: int | None = None) -> None:
    """The rules that hold for every world size: sizes >= 1 (``dp_shard`` may be -1 = all remaining
    ranks), ``ep`` divides a given ``dp_shard``, and ``ep > 1`` needs an MoE model whose ``num_experts``
    it divides (``num_experts=None``: not known yet, skipped)."""
    if dp_replicate < 1:
        raise LayoutError(f"parallel.dp_replicate={dp_replicate} must be >= 1")
    if ep < 1:
        raise LayoutError(f"parallel.ep={ep} must be >= 1")
    if dp_shard < 1 and dp_shard != -1:
        raise LayoutError(f"parallel.dp_shard={dp_shard} must be -1 (all remaining ranks) or >= 1")
    if dp_shard != -1 and dp_shard % ep:
        raise LayoutError(f"parallel.ep={ep} must divide parallel.dp_shard={dp_shard} (expert parallelism is "
                          "carved out of the FSDP ranks)")
    if ep > 1 and num_experts is not None:
        if num_experts <= 0:
            raise LayoutError(f"parallel.ep={ep} needs an MoE model, but the model has no experts")
        if num_experts % ep:
            raise LayoutError(f"num_experts={num_experts} is not divisible by parallel.ep={ep} (each EP rank holds "
                              "num_experts / ep whole experts)")


@dataclass(frozen=True)
class ParallelLayout:
    """Resolved sizes of the mesh axes for one world size (``dp_shard`` never -1 here)."""

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

    def as_dict(self) -> dict[str, int]:
        """The layout as recorded in checkpoints (resume is exact only under the same one)."""
        return {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "ep": self.ep}

    @classmethod
    def single(cls) -> ParallelLayout:
        """One process."""
        return cls(1, 1, 1, 1)

    @classmethod
    def resolve(cls, world_size: int, dp_replicate: int = 1, dp_shard: int = -1, ep: int = 1,
                num_experts: int | None = None) -> ParallelLayout:
        """Check ``parallel.{dp_replicate, dp_shard, ep}`` against the world size and the model;
        ``dp_shard=-1`` takes all remaining ranks. Raises ``LayoutError`` naming the keys."""
        where = (f"(world size {world_size}: parallel.dp_replicate={dp_replicate}, parallel.dp_shard={dp_shard}, "
                 f"parallel.ep={ep})")
        if world_size < 1:
            raise LayoutError(f"world size must be >= 1, got {world_size}")
        try:
            check_layout_keys(dp_replicate, dp_shard, ep, num_experts)
        except LayoutError as e:
            raise LayoutError(f"{e} {where}") from None
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
        return cls(world_size, dp_replicate, dp_shard, ep)
