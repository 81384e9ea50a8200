"""The Qwen3.5 parallel plan: Qwen3-VL's (``qwen3_vl/parallelize.py``: context parallelism -- the gated
full-attention layers through Ulysses / ring attention, the Gated DeltaNet layers by the state scan of ``cp.py`` --
then EP over the routed experts of every ``SparseMoeBlock`` (our ``SharedExpertMoeBlock`` is one; its shared
expert stays a dense part of the decoder layer), activation checkpointing, compile and FSDP2 units over decoder
layers and vision blocks)."""

from rynnscale.models.qwen3_vl.parallelize import parallelize

__all__ = ["parallelize"]
