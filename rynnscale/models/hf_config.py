"""config.json reading rules the Qwen families share, written once so that they resolve a config the way
transformers 5 does (``modeling_rope_utils.RotaryEmbeddingConfigMixin``) and refuse what they cannot build."""

from __future__ import annotations

from typing import Any

from rynnscale.models.spec import ArchConfigError

ROPE_TYPES = ("default", "mrope")   # unscaled rope; "mrope" is the 4.x spelling of the same


def read_rope(text_cfg: dict[str, Any], where: str, family: str, keys: tuple[str, ...]) -> None:
    """Lift ``keys`` (e.g. ``rope_theta``, ``mrope_section``) from the nested rope dict into ``text_cfg``, in place.

    transformers takes ``rope_scaling`` (4.x) if set, else ``rope_parameters`` (5.x), and a key in that dict wins over
    the same flat key (e.g. a top-level ``rope_theta`` left over from a 4.x config); a flat key counts only when the
    dict lacks it. Scaled rope (``rope_type`` yarn, linear, dynamic, ...) is refused: our models implement only the
    unscaled one, and dropping the scaling would silently compute another function."""
    for rope_key in ("rope_parameters", "rope_scaling"):
        rope = text_cfg.get(rope_key) or {}
        if not isinstance(rope, dict):
            raise ArchConfigError(f"{where}.{rope_key}={rope!r} must be a mapping")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ArchConfigError(f"{where}.{rope_key}.rope_type={kind!r} is not supported: {family} is built with "
                                  "unscaled rope only; allowed: 'default'")
        if rope.get("mrope_interleaved", True) is not True:
            raise ArchConfigError(f"{where}.{rope_key}.mrope_interleaved={rope['mrope_interleaved']!r}: {family} uses "
                                  "interleaved MRoPE (transformers ignores the key and always interleaves)")
    rope = text_cfg.get("rope_scaling") or text_cfg.get("rope_parameters") or {}
    for key in keys:
        if key in rope:
            text_cfg[key] = rope[key]


def read_tie(cfg: dict[str, Any], text_cfg: dict[str, Any], where: str) -> bool:
    """``tie_word_embeddings`` from the top level of the config only, default False, as transformers reads it (a
    ``text_config.tie_word_embeddings`` of a vision-language config is ignored there too); ``text_cfg``'s copy is
    dropped so that it is not read as a text key."""
    text_cfg.pop("tie_word_embeddings", None)
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ArchConfigError(f"{where}.tie_word_embeddings={tie!r} has type {type(tie).__name__}, expected bool")
    return tie
