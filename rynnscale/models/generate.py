"""Greedy decoding with our packed-row model (evaluation of tagged answers, smoke tests).

No KV cache: every new token re-runs the whole forward on the growing row (prompt + generated so far),
one sample per row. That is quadratic in the answer length and re-runs the vision tower per token, which
is fine at the scale it is used for (a few eval samples, answers of tens of tokens, tiny models) and
keeps it exactly the training forward -- no second code path that could drift from it.

Positions follow transformers' generation rule: the prompt keeps its MRoPE positions (``[3, L]``,
starting at 0), and the k-th generated text token gets ``mrope_next_position(prompt) + k`` in all
three rows (HF: ``cache_position + rope_delta``). Parity with ``transformers``' greedy ``generate``
on an exported checkpoint is tested in ``tests/models/test_generate.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from rynnscale.batch import IGNORE_INDEX, PackedBatch
from rynnscale.models.mrope import mrope_next_position, text_position_ids


def prompt_batch(prompt: Any, new_ids: list[int], device: torch.device | None = None) -> PackedBatch:
    """One-sample PackedBatch of ``prompt`` (EncodedSample-like: ``input_ids_l`` [L], ``position_ids_3l``
    [3, L], optional ``pixel_values`` / ``image_grid_thw`` / ``pixel_values_videos`` / ``video_grid_thw``)
    followed by the text tokens ``new_ids`` [K] at positions ``next, next+1, ...``; labels all -100."""
    ids_l = torch.as_tensor(prompt.input_ids_l, dtype=torch.long).reshape(-1)
    pos_3l = torch.as_tensor(prompt.position_ids_3l, dtype=torch.long)
    if pos_3l.shape != (3, ids_l.numel()):
        raise ValueError(f"prompt position_ids_3l has shape {tuple(pos_3l.shape)}, expected (3, {ids_l.numel()})")
    if new_ids:
        ids_l = torch.cat([ids_l, torch.tensor(new_ids, dtype=torch.long)])
        pos_3l = torch.cat([pos_3l, text_position_ids(len(new_ids), mrope_next_position(pos_3l))], dim=1)
    L = int(ids_l.numel())
    batch = PackedBatch(
        input_ids_l=ids_l, labels_l=torch.full_like(ids_l, IGNORE_INDEX), position_ids_3l=pos_3l,
        cu_seqlens=torch.tensor([0, L], dtype=torch.int32), max_seqlen=L,
        pixel_values=getattr(prompt, "pixel_values", None), image_grid_thw=getattr(prompt, "image_grid_thw", None),
        pixel_values_videos=getattr(prompt, "pixel_values_videos", None),
        video_grid_thw=getattr(prompt, "video_grid_thw", None))
    return batch.to(device) if device is not None else batch


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompt: Any, max_new_tokens: int, eos_ids: Iterable[int] = (),
                    *, device: torch.device | None = None, run_all_steps: bool = False) -> list[int]:
    """Greedy continuation of ONE prompt: the new token ids (the eos token included when one ends it,
    as transformers' ``generate`` returns it), at most ``max_new_tokens`` of them.

    ``model`` is our ``Qwen3VLForConditionalGeneration`` (``forward(PackedBatch)`` + ``logits``); it is
    run as it is (put it in eval mode yourself; ``rynnscale.train.evaluate`` does). ``device`` defaults
    to the device of the model's first parameter. ``run_all_steps``: always run ``max_new_tokens`` forwards
    and cut the result at the first eos afterwards (ranks of an FSDP model must run the same number of
    forwards, since every forward is a collective)."""
    if max_new_tokens < 0:
        raise ValueError(f"greedy_generate: max_new_tokens={max_new_tokens} must be >= 0")
    if int(torch.as_tensor(prompt.input_ids_l).numel()) == 0:
        raise ValueError("greedy_generate: the prompt has no tokens")
    eos = {int(e) for e in eos_ids}
    if device is None:
        device = next(model.parameters()).device
    new_ids: list[int] = []
    for _ in range(max_new_tokens):
        batch = prompt_batch(prompt, new_ids, device)
        hidden_ld = model(batch).hidden_ld
        next_id = int(model.logits(hidden_ld[-1:]).float().argmax(-1)[0])  # ties: lowest id, as torch.argmax in HF
        new_ids.append(next_id)
        if next_id in eos and not run_all_steps:
            break
    for i, t in enumerate(new_ids):
        if t in eos:
            return new_ids[:i + 1]
    return new_ids
