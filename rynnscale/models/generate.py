"""Generation with our packed-row models: batched prompts, a KV cache, greedy or sampled decoding.

``generate(model, prompts, SamplingParams(...), num_samples=G, seeds=...)`` continues every prompt G times
and returns the new token ids of each continuation (the stop token included when one ends it, as
transformers' ``generate`` returns it). It runs on the model as it is -- the training model in place, FSDP /
EP sharded, LoRA adapters active, no second copy of the weights:

1. prefill: the P prompts are packed into ONE row (one document each: the training forward's own varlen
   attention, the vision tower run once over all their images / videos) with the model's cache
   (``CausalLM.new_cache``) -- keys / values of every prompt token stored;
2. the cache is repeated G times per prompt (``KVCache.repeat_interleave``): samples of a prompt share its
   prefill;
3. decode: a row of one token per sequence, ``model(row, cache=cache)``, the logits of those tokens, pick
   the next ones, until every sequence has stopped or ``max_new_tokens`` are out.

A family without cache support (``model.supports_cache`` False) decodes with ``use_cache=False``: every
step re-runs the full forward on the packed rows prompt + generated so far (quadratic, the vision tower
again per step; kept as the reference the KV cache is measured against, ``bench/generate.py``).

Positions follow transformers' generation rule: a prompt keeps its MRoPE positions ([3, L] from 0) and its
k-th new token gets ``mrope_next_position(prompt) + k`` in all three rows (HF: ``cache_position +
rope_delta``). Greedy parity with transformers' ``generate`` on an exported checkpoint is tested in
``tests/models/test_generate.py``.

Sampling (``temperature > 0``): logits / temperature, then top-k, then top-p (transformers' order and
rules: top-k keeps every token at least as likely as the k-th; top-p keeps the smallest most-likely set
whose probability reaches ``top_p``; of tied tokens, ours keeps the higher ids, transformers' follows its
unstable sort), then inverse-CDF sampling with one uniform number per sequence and step from that sequence's
own ``torch.Generator`` (``seeds[i]``): a continuation depends on its seed, not on the other sequences of the
batch or on the device's RNG -- up to the last bits of the logits, which can change with the batch's shape
(matrix-multiply blocking: ~1e-6 relative on CPU in fp32), so a draw or a greedy pick at a near-tie may differ
between a prompt decoded alone and in a batch.

Lockstep (FSDP / EP: every forward is a collective): every rank must call ``generate`` with the same
number of prompts and samples (pad with filler prompts, marked in ``fillers``: their sequences count as stopped
from the start, so a rank waits only for its real ones), and pass ``all_done(local_done) -> bool`` telling
whether every rank is done (an all-reduce); ranks then run the same number of forwards. Context
parallelism is switched off for the call (whole rows on every rank).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rynnscale.batch import IGNORE_INDEX, PackedBatch
from rynnscale.models.mrope import mrope_next_position, text_position_ids


@dataclass(frozen=True)
class SamplingParams:
    """How continuations are picked. ``temperature`` 0 = greedy (argmax; ties: lowest id); ``top_k`` 0 and
    ``top_p`` 1.0 = off; ``stop_ids``: token ids that end a continuation (kept in it), or one id."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingParams: max_new_tokens={self.max_new_tokens} must be >= 0")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingParams: temperature={self.temperature} must be a finite number >= 0")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams: top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams: top_p={self.top_p} must be in (0, 1]")
        object.__setattr__(self, "stop_ids", _token_ids(self.stop_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _token_ids(stop_ids: Any) -> tuple[int, ...]:
    """``stop_ids`` (one id or an iterable of ids: ints, NumPy / 0-d tensor integers) as a tuple of ints."""
    try:
        return (operator.index(stop_ids),)
    except TypeError:
        pass
    try:
        if isinstance(stop_ids, (str, bytes)):
            raise TypeError
        return tuple(operator.index(t) for t in stop_ids)
    except TypeError:
        raise ValueError(f"SamplingParams: stop_ids={stop_ids!r} must be token ids (ints), e.g. "
                         "tokenizer.token_to_id('<|im_end|>'), which is None for a token the tokenizer lacks") from None


# ----------------------------------------------------------------------------------------- rows
def pack_rows(prompts: Sequence[Any], continuations: Sequence[Sequence[int]] | None = None,
              device: torch.device | None = None) -> PackedBatch:
    """One PackedBatch row of the prompts (EncodedSample-like: ``input_ids_l`` [L], ``position_ids_3l``
    [3, L], optional ``pixel_values`` / ``image_grid_thw`` / ``pixel_values_videos`` / ``video_grid_thw`` /
    ``pixel_norm``), prompt i followed by the text tokens ``continuations[i]`` at positions ``next, next+1,
    ...``; one document per prompt, labels all -100."""
    ids, pos, lens = [], [], []
    media: dict[str, list[torch.Tensor]] = {k: [] for k in ("pixel_values", "image_grid_thw",
                                                            "pixel_values_videos", "video_grid_thw")}
    pixels: list[tuple[int, str, int, Any]] = []   # (prompt, key, index in media[key], its pixel_norm)
    for i, p in enumerate(prompts):
        ids_l = torch.as_tensor(p.input_ids_l, dtype=torch.long).reshape(-1)
        pos_3l = torch.as_tensor(p.position_ids_3l, dtype=torch.long)
        if ids_l.numel() == 0:
            raise ValueError(f"prompt {i} has no tokens")
        if pos_3l.shape != (3, ids_l.numel()):
            raise ValueError(f"prompt {i}: position_ids_3l has shape {tuple(pos_3l.shape)}, expected "
                             f"(3, {ids_l.numel()})")
        new = list(continuations[i]) if continuations is not None else []
        if new:
            pos_3l = torch.cat([pos_3l, text_position_ids(len(new), mrope_next_position(pos_3l))], dim=1)
            ids_l = torch.cat([ids_l, torch.tensor(new, dtype=torch.long)])
        ids.append(ids_l)
        pos.append(pos_3l)
        lens.append(int(ids_l.numel()))
        for k, parts in media.items():
            v = getattr(p, k, None)
            if v is not None:
                if k.startswith("pixel_values"):
                    pixels.append((i, k, len(parts), getattr(p, "pixel_norm", None)))
                parts.append(torch.as_tensor(v))
    norm = _common_pixels(media, pixels)
    ids_l = torch.cat(ids)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    batch = PackedBatch(
        input_ids_l=ids_l, labels_l=torch.full_like(ids_l, IGNORE_INDEX), position_ids_3l=torch.cat(pos, dim=1),
        cu_seqlens=cu, max_seqlen=max(lens), pixel_norm=norm,
        **{k: (torch.cat(v) if v else None) for k, v in media.items()})
    return batch.to(device) if device is not None else batch


def _common_pixels(media: dict[str, list[torch.Tensor]], pixels: list[tuple[int, str, int, Any]]) -> Any:
    """The row's ``pixel_norm``: the prompts' own when all their pixels are raw uint8 under one norm; otherwise
    (raw and normalised prompts mixed, or two norms) every raw part is normalised here with its prompt's norm
    (in ``media``, in place) and the row carries none -- one norm for the row must not be applied to pixels it
    does not describe, nor raw 0..255 values reach the tower as if normalised."""
    raw = [(i, k, j, n) for i, k, j, n in pixels if media[k][j].dtype == torch.uint8]
    for i, k, _, n in raw:
        if n is None:
            raise ValueError(f"prompt {i}: {k} is uint8 (raw pixels) but its pixel_norm is None: set it from the "
                             "processor settings (VisionSpec.pixel_norm) or pass normalised float pixels")
    if not raw:
        return None
    if len(raw) == len(pixels) and len({n for *_, n in raw}) == 1:
        return raw[0][3]
    for _, k, j, n in raw:
        media[k][j] = n.normalize(media[k][j])
    return None


def prompt_batch(prompt: Any, new_ids: list[int], device: torch.device | None = None) -> PackedBatch:
    """One-sample row: ``prompt`` followed by ``new_ids`` (``pack_rows`` of one prompt)."""
    return pack_rows([prompt], [new_ids], device)


def _decode_row(tokens: list[int], positions: list[int], device: torch.device) -> PackedBatch:
    """A row of one text token per sequence (sequence i: ``tokens[i]`` at ``positions[i]``)."""
    B = len(tokens)
    ids_l = torch.tensor(tokens, dtype=torch.long)
    return PackedBatch(input_ids_l=ids_l, labels_l=torch.full_like(ids_l, IGNORE_INDEX),
                       position_ids_3l=torch.tensor(positions, dtype=torch.long).expand(3, B).clone(),
                       cu_seqlens=torch.arange(B + 1, dtype=torch.int32), max_seqlen=1).to(device)


# ----------------------------------------------------------------------------------------- picking
def filtered_probs(logits_bv: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution [B, V] (fp32, zeros outside the kept set) of ``logits_bv``: / temperature, then
    top-k, then top-p (the module docstring). ``temperature`` must be > 0."""
    if temperature <= 0:
        raise ValueError(f"filtered_probs: temperature={temperature} must be > 0 (0 is greedy: argmax)")
    x = logits_bv.float()
    bad = ~torch.isfinite(x.amax(-1))   # a NaN or +inf logit, or every logit -inf: no distribution to draw from
    if bad.any():
        raise ValueError(f"filtered_probs: the logits of sequence(s) {bad.nonzero().flatten().tolist()[:8]} are not "
                         "finite (a NaN or +inf logit, or all -inf): the model's weights or inputs went bad")
    logits = x / temperature
    over = torch.isinf(logits.amax(-1))   # a tiny temperature overflowed the largest logits: shift them to 0 first
    if over.any():
        logits[over] = (x[over] - x[over].amax(-1, keepdim=True)) / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:   # transformers' TopPLogitsWarper: ascending stable sort, drop while the mass <= 1 - top_p
        p_sorted, order = torch.sort(probs, dim=-1, stable=True)
        drop_sorted = p_sorted.cumsum(-1) <= 1 - top_p
        drop_sorted[:, -1] = False                # the most likely token always stays (ties: the highest id)
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from(probs_bv: torch.Tensor, uniforms_b: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row: the first token whose cumulative probability exceeds ``u * total``
    (``uniforms_b`` in [0, 1)); never a token of probability 0. -> [B] int64."""
    cdf = torch.cumsum(probs_bv, -1, dtype=torch.float64)   # = .double().cumsum(-1) bit for bit, without the copy
    target = uniforms_b.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs_bv.shape[-1] - 1)


class _Picker:
    """Greedy or seeded sampling of the next token of every sequence."""

    def __init__(self, params: SamplingParams, seeds: Sequence[int] | None, n: int):
        self.params = params
        self.generators = None
        if not params.greedy:
            if seeds is None or len(seeds) != n:
                raise ValueError(f"sampled generation needs one seed per sequence ({n}), got "
                                 f"{None if seeds is None else len(seeds)}")
            self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, logits_bv: torch.Tensor) -> list[int]:
        p = self.params
        if self.generators is None:
            return (logits_bv if logits_bv.dtype == torch.float64 else logits_bv.float()).argmax(-1).tolist()
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        return sample_from(filtered_probs(logits_bv, p.temperature, p.top_k, p.top_p), u).tolist()


# ----------------------------------------------------------------------------------------- the loop
@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Sequence[Any], params: SamplingParams, *, num_samples: int = 1,
             seeds: Sequence[int] | None = None, device: torch.device | None = None, use_cache: bool | None = None,
             all_done: Callable[[bool], bool] | None = None,
             fillers: Sequence[bool] | None = None) -> list[list[int]]:
    """New token ids of ``num_samples`` continuations of every prompt, prompt-major (prompt 0's samples,
    then prompt 1's, ...). ``seeds``: one per continuation, same order (sampling only). ``use_cache`` None:
    the KV cache when the model supports it. ``all_done``: the lockstep agreement of distributed ranks
    (module docstring). ``fillers[i]`` True: prompt i only keeps this rank in lockstep; it runs in every
    forward but is never waited for, and its continuations come back empty. Put the model in eval mode
    yourself (``rynnscale.train.evaluate`` does)."""
    if num_samples < 1:
        raise ValueError(f"generate: num_samples={num_samples} must be >= 1")
    P = len(prompts)
    if fillers is not None and len(fillers) != P:
        raise ValueError(f"generate: fillers has {len(fillers)} entries for {P} prompts")
    B = P * num_samples
    if B == 0 or params.max_new_tokens == 0:
        return [[] for _ in range(B)]
    cached = bool(getattr(model, "supports_cache", False)) if use_cache is None else use_cache
    if cached and not getattr(model, "supports_cache", False):
        raise ValueError(f"{type(model).__name__} does not support a KV cache (supports_cache is False); "
                         "generate with use_cache=False")
    device = device if device is not None else next(model.parameters()).device
    pick = _Picker(params, seeds, B)
    stop = set(params.stop_ids)
    all_done = all_done or (lambda done: done)
    prompt_of = [i // num_samples for i in range(B)]
    next_pos = [mrope_next_position(torch.as_tensor(prompts[prompt_of[b]].position_ids_3l)) for b in range(B)]
    out: list[list[int]] = [[] for _ in range(B)]
    filler_b = [bool(fillers[prompt_of[b]]) if fillers is not None else False for b in range(B)]
    finished = list(filler_b)   # a filler is stopped from the start: nobody waits for it
    last = [0] * B              # the token each sequence feeds to the next step (a filler's: whatever it drew)
    saved_cp, model.cp = getattr(model, "cp", None), None   # whole rows on every rank
    try:
        if cached:
            prefill = pack_rows(prompts, device=device)
            cache = model.new_cache(P, int(prefill.max_seqlen) + params.max_new_tokens)
            logits = _last_logits(model, cached_forward(model, prefill, cache).hidden_ld, prefill.cu_seqlens)
            cache.repeat_interleave(num_samples)
            logits = logits.repeat_interleave(num_samples, dim=0)
        else:
            rows = [prompts[prompt_of[b]] for b in range(B)]
            row = pack_rows(rows, out, device)
            logits = _last_logits(model, model(row).hidden_ld, row.cu_seqlens)
        for k in range(params.max_new_tokens):
            for b, t in enumerate(pick(logits)):
                if not finished[b]:
                    out[b].append(t)
                    finished[b] = t in stop
                last[b] = out[b][-1] if out[b] else t
            if k == params.max_new_tokens - 1 or all_done(all(finished)):
                break
            if cached:
                row = _decode_row(last, [p + k for p in next_pos], device)
                logits = model.logits(cached_forward(model, row, cache).hidden_ld)
            else:
                row = pack_rows(rows, out, device)
                logits = _last_logits(model, model(row).hidden_ld, row.cu_seqlens)
    finally:
        model.cp = saved_cp
    return out


def cached_forward(model: torch.nn.Module, batch: PackedBatch, cache: Any) -> Any:
    """``model(batch, cache=cache)`` as one step of the cache: ``batch``'s documents continue its sequences
    (``cache.begin`` before, ``cache.end`` after; a failed forward leaves the cache as it was)."""
    cache.begin(batch.cu_seqlens, batch.input_ids_l.device)
    try:
        out = model(batch, cache=cache)
    except BaseException:
        cache.abort()
        raise
    cache.end()
    return out


def _last_logits(model: torch.nn.Module, hidden_ld: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] of the last token of every document of the row."""
    last = (cu_seqlens[1:].to(hidden_ld.device, torch.long) - 1)
    return model.logits(hidden_ld.index_select(0, last))


def greedy_generate(model: torch.nn.Module, prompt: Any, max_new_tokens: int, eos_ids: Iterable[int] | int = (),
                    *, device: torch.device | None = None, run_all_steps: bool = False,
                    use_cache: bool | None = None) -> list[int]:
    """Greedy continuation of ONE prompt (``generate`` with one prompt). ``run_all_steps``: always run
    ``max_new_tokens`` steps (the lockstep of ranks that each generate one prompt) and cut at the first
    stop token afterwards."""
    params = SamplingParams(max_new_tokens, stop_ids=eos_ids)
    return generate(model, [prompt], params, device=device, use_cache=use_cache,
                    all_done=(lambda done: False) if run_all_steps else None)[0]
