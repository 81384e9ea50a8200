"""Parameter names as checkpoints spell them.

Activation checkpointing (``checkpoint_wrapper``), ``torch.compile`` and FSDP1-style wrappers insert
segments into ``named_parameters()`` names that ``state_dict()`` keys (and Hugging Face names) do
not carry. ``clean_fqn`` removes them: the one place that knows the wrapper segments."""

from __future__ import annotations

WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_fqn(name: str) -> str:
    """``named_parameters()`` name -> ``state_dict()`` / HF name (wrapper segments removed)."""
    for seg in WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name
