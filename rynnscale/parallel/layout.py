"""The parallel layout rules: ``dp_replicate x dp_shard`` data-parallel groups of ``cp`` context-parallel
ranks each, with expert parallelism (EP) carved out of the FSDP ranks. The one place these rules live:
recipe validation (no world size yet), the launch (``rynnscale.parallel.mesh.build_meshes``) and
``rynnscale plan`` all call ``ParallelLayout``.

``world = dp_replicate x dp_shard x cp``. The ``cp`` ranks of a context-parallel (CP) group hold the SAME
samples (one sequence split along its length), so the data-parallel world the loader sees is
``dp_replicate x dp_shard`` (``data_world_size``). Parameters are FSDP-sharded over ``dp_shard x cp`` (the
``fsdp`` degree; torchtitan's ``dp_shard_cp``), and ``ep`` must divide that degree and the model's
``num_experts`` (EP ranks hold different tokens: different samples, or different pieces of one sequence).
Pure Python (no torch import): the CLI validates a recipe in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """An impossible ``parallel.*`` layout for this world size / model; the message names the keys."""


def _fsdp_keys(dp_shard: int, cp: int) -> str:
    """The FSDP degree as the user wrote it (``parallel.dp_shard=N``, or ``... x parallel.cp = N`` under CP)."""
    return f"parallel.dp_shard={dp_shard}" if cp == 1 else f"parallel.dp_shard x parallel.cp = {dp_shard * cp}"


def check_layout_keys(dp_replicate: int = 1, dp_shard: int = -1, ep: int = 1, num_experts: int | None = None,
                      cp: int = 1) -> None:
    """The rules that hold for every world size: sizes >= 1 (``dp_shard`` may be -1 = all remaining
    ranks), ``ep`` divides a given ``dp_shard x cp`` (the FSDP ranks), and ``ep > 1`` needs an MoE model
    whose ``num_experts`` it divides into ``edp_shard`` even chunks per EP rank (``check_expert_chunks``;
    ``num_experts=None``: not known yet, skipped)."""
    if dp_replicate < 1:
        raise LayoutError(f"parallel.dp_replicate={dp_replicate} must be >= 1")
    if ep < 1:
        raise LayoutError(f"parallel.ep={ep} must be >= 1")
    if cp < 1:
        raise LayoutError(f"parallel.cp={cp} must be >= 1")
    if dp_shard < 1 and dp_shard != -1:
        raise LayoutError(f"parallel.dp_shard={dp_shard} must be -1 (all remaining ranks) or >= 1")
    if dp_shard != -1 and (dp_shard * cp) % ep:
        raise LayoutError(f"parallel.ep={ep} must divide {_fsdp_keys(dp_shard, cp)} (expert parallelism is carved "
                          "out of the FSDP ranks)")
    if ep > 1 and num_experts is not None:
        if num_experts <= 0:
            raise LayoutError(f"parallel.ep={ep} needs an MoE model, but the model has no experts")
        if num_experts % ep:
            raise LayoutError(f"num_experts={num_experts} is not divisible by parallel.ep={ep} (each EP rank holds "
                              "num_experts / ep whole experts)")
        if dp_shard != -1:
            check_expert_chunks(num_experts, ep, dp_shard * cp // ep, _fsdp_keys(dp_shard, cp))


def check_expert_chunks(num_experts: int, ep: int, edp_shard: int, fsdp_keys: str) -> None:
    """Under EP (``ep > 1``) the ``num_experts / ep`` experts of an EP rank must split evenly over the
    ``edp_shard`` ranks that FSDP-shard them: checkpoints store the GLOBAL expert tensors in even chunks
    (``rynnscale.checkpoint.ep_layout``), so any other split would train and then fail at the first save."""
    per_rank = num_experts // ep
    if ep > 1 and per_rank % edp_shard:
        raise LayoutError(f"num_experts={num_experts} / parallel.ep={ep} = {per_rank} experts per EP rank must be "
                          f"divisible by the expert FSDP degree {fsdp_keys} / parallel.ep = {edp_shard} (checkpoints "
                          "store each expert tensor in even chunks of whole experts); raise parallel.ep, or lower "
                          "parallel.dp_shard with parallel.dp_replicate (HSDP)")


CP_ATTENTION_MODES = ("ulysses", "ring")


def resolve_cp_attention(mode: str, num_heads: int, cp: int) -> str:
    """``model.cp_attention`` -> the decoder attention under ``parallel.cp``: ``auto`` is ``ulysses`` when ``cp``
    divides the q heads (the local kernel sees whole documents; GQA kv heads fewer than ``cp`` are replicated),
    else ``ring`` (any head count); an explicit ``ulysses`` needs that divisibility. One rule for recipe
    validation, the build (``rynnscale.parallel.context_parallel``) and the planner; ``LayoutError`` names the keys."""
    if mode not in (*CP_ATTENTION_MODES, "auto"):
        raise LayoutError(f"model.cp_attention={mode!r} is not one of {(*CP_ATTENTION_MODES, 'auto')}")
    if mode == "auto":
        return "ulysses" if num_heads % cp == 0 else "ring"
    if mode == "ulysses" and num_heads % cp:
        raise LayoutError(f"model.cp_attention=ulysses needs the q heads ({num_heads}) divisible by parallel.cp={cp}; "
                          "use model.cp_attention=ring (or auto)")
    return mode


@dataclass(frozen=True)
class ParallelLayout:
    """Resolved sizes of the mesh axes for one world size (``dp_shard`` never -1 here)."""

    world_size: int
    dp_replicate: int
    dp_shard: int
    ep: int
    cp: int = 1

    @property
    def fsdp(self) -> int:
        """FSDP degree of the dense parameters: ``dp_shard x cp`` (CP ranks shard parameters too)."""
        return self.dp_shard * self.cp

    @property
    def edp_shard(self) -> int:
        """FSDP degree of the expert parameters (FSDP ranks left after EP)."""
        return self.fsdp // self.ep

    @property
    def dp_size(self) -> int:
        """Data-parallel world = ``data_world_size`` (a CP group consumes ONE stream of samples)."""
        return self.data_world_size

    @property
    def data_world_size(self) -> int:
        """Distinct sample streams: ``dp_replicate x dp_shard`` (EP ranks see different data, CP ranks the same)."""
        return self.world_size // self.cp

    def data_rank(self, rank: int) -> int:
        """The sample stream of global ``rank`` (CP groups are ``cp`` consecutive ranks)."""
        return rank // self.cp

    def cp_rank(self, rank: int) -> int:
        """The position of global ``rank`` in its CP group."""
        return rank % self.cp

    def as_dict(self) -> dict[str, int]:
        """The layout as recorded in checkpoints (resume is exact only under the same one); ``cp`` only
        when > 1, so checkpoints written before CP existed still compare equal."""
        d = {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "ep": self.ep}
        if self.cp > 1:
            d["cp"] = self.cp
        return d

    @classmethod
    def single(cls) -> ParallelLayout:
        """One process."""
        return cls(1, 1, 1, 1, 1)

    @classmethod
    def resolve(cls, world_size: int, dp_replicate: int = 1, dp_shard: int = -1, ep: int = 1,
                num_experts: int | None = None, cp: int = 1) -> ParallelLayout:
        """Check ``parallel.{dp_replicate, dp_shard, ep, cp}`` against the world size and the model;
        ``dp_shard=-1`` takes all remaining ranks. Raises ``LayoutError`` naming the keys."""
        where = (f"(world size {world_size}: parallel.dp_replicate={dp_replicate}, parallel.dp_shard={dp_shard}, "
                 f"parallel.ep={ep}, parallel.cp={cp})")
        if world_size < 1:
            raise LayoutError(f"world size must be >= 1, got {world_size}")
        try:
            check_layout_keys(dp_replicate, dp_shard, ep, num_experts, cp)
        except LayoutError as e:
            raise LayoutError(f"{e} {where}") from None
        if world_size % (dp_replicate * cp):
            what = (f"parallel.dp_replicate={dp_replicate}" if cp == 1
                    else f"parallel.dp_replicate x parallel.cp = {dp_replicate * cp}")
            raise LayoutError(f"{what} does not divide the world size {world_size} {where}")
        if dp_shard == -1:
            dp_shard = world_size // (dp_replicate * cp)
        if dp_replicate * dp_shard * cp != world_size:
            raise LayoutError(f"parallel.dp_replicate x parallel.dp_shard x parallel.cp = "
                              f"{dp_replicate * dp_shard * cp} must equal the world size {world_size} {where}")
        if (dp_shard * cp) % ep:
            raise LayoutError(f"parallel.ep={ep} must divide {_fsdp_keys(dp_shard, cp)} (EP is carved out of the "
                              f"FSDP ranks) {where}")
        if num_experts is not None:
            try:
                check_expert_chunks(num_experts, ep, dp_shard * cp // ep, _fsdp_keys(dp_shard, cp))
            except LayoutError as e:
                raise LayoutError(f"{e} {where}") from None
        return cls(world_size, dp_replicate, dp_shard, ep, cp)
