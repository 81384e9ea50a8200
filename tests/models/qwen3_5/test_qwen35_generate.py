"""Generation with Qwen3.5's cache (``rynnscale.models.qwen3_5.cache.HybridCache``: K/V of the full-attention layers,
recurrent state + convolution window of the Gated DeltaNet layers), through ``rynnscale.models.generate``.

- the cached forward's logits equal the full forward's over prompt + everything so far: prefill bitwise, then
  decode steps (one token per sequence: the recurrent step) and multi-token continuations (the chunked rule from the
  cached states), fp32 rel 1e-5 and float64 rel 1e-12 (max |diff| / max |logits|), dense and MoE, the
  vision-language and the text-only model, prompts of different lengths (text, image + video, image; one longer
  than a DeltaNet chunk of 64 tokens) in one row;
- greedy KV-cache generation of that batch equals transformers' ``generate`` (its own hybrid cache: chunked rule in
  prefill, ``torch_recurrent_gated_delta_rule`` per new token) prompt by prompt, token for token, from the same
  weights; the cache-less generator gives the same tokens; text prompts also equal transformers' batched
  ``generate`` with the prompts left-padded;
- a forward that fails part-way leaves the cache as it was; G samples per prompt share one prefill;
- sampled generation is reproducible from its seeds (a sequence's draws depend on its seed only).
"""

from __future__ import annotations

import pytest
import torch
from generate_checks import check_seeded_sampling
from qwen35_helpers import IMG, VID, build_pair, make_samples, pack, tiny_config

from rynnscale.batch import EncodedSample
from rynnscale.models.generate import SamplingParams, cached_forward, generate, greedy_generate, pack_rows
from rynnscale.models.mrope import mrope_next_position, text_position_ids
from rynnscale.models.qwen3_5.cache import HybridCache, last_inputs

pytest.importorskip("transformers.models.qwen3_5")

NEW_TOKENS = 10
CASES = [pytest.param(moe, text_only, id=f"{'moe' if moe else 'dense'}-{'text' if text_only else 'vl'}")
         for moe in (False, True) for text_only in (False, True)]


def prompts_of(samples: list[dict]) -> list[EncodedSample]:
    """The samples as generation prompts (EncodedSample: ids, MRoPE positions, media)."""
    row = pack(samples)
    bounds = row.cu_seqlens.tolist()
    return [EncodedSample(key=f"p{i}", input_ids_l=s["ids"], labels_l=s["labels"],
                          position_ids_3l=row.position_ids_3l[:, bounds[i]:bounds[i + 1]],
                          pixel_values=s["pixel_values"], image_grid_thw=s["image_grid"],
                          pixel_values_videos=s["pixel_values_videos"], video_grid_thw=s["video_grid"])
            for i, s in enumerate(samples)]


def _prompts(text_only: bool, seed: int = 0) -> list[EncodedSample]:
    ps = prompts_of(make_samples(torch.Generator().manual_seed(seed), multimodal=not text_only))
    assert len({p.input_ids_l.numel() for p in ps}) == 3 and max(p.input_ids_l.numel() for p in ps) > 64
    return ps


def _as_dtype(batch, dtype):
    for k in ("pixel_values", "pixel_values_videos"):
        if getattr(batch, k) is not None:
            setattr(batch, k, getattr(batch, k).to(dtype))
    return batch


def _text_row(new: list[list[int]], nxt: list[int], conts: list[list[int]]):
    """A continuation row: sequence i gets the text tokens ``new[i]`` after its ``conts[i]``."""
    return pack_rows([EncodedSample(key="", input_ids_l=torch.tensor(t), labels_l=torch.tensor(t),
                                    position_ids_3l=text_position_ids(len(t), p + len(c)))
                      for t, p, c in zip(new, nxt, conts)])


FP32 = (torch.float32, 1e-5, [1, 1, 1, 3, 1])
FP64 = (torch.float64, 1e-12, [1, 1, 1, 3, 1, 70, 1])   # float64: both models and both MLPs in two cases
LOGIT_CASES = [pytest.param(*c.values, *FP32, id=f"{c.id}-fp32") for c in CASES] + \
    [pytest.param(*c.values, *FP64, id=f"{c.id}-fp64") for c in CASES if c.values[0] == c.values[1]]


@pytest.mark.parametrize("moe,text_only,dtype,rtol,steps", LOGIT_CASES)
def test_cached_logits_equal_full_forward(moe: bool, text_only: bool, dtype, rtol: float, steps: list[int]) -> None:
    """Prefill, decode steps and continuations of several tokens (fp64: one of 70, across a chunk): the logits of
    the new tokens equal the full forward's over prompt + everything so far (error relative to the logits' max)."""
    _, _, model = build_pair(tiny_config(moe, text_only=text_only))
    model.to(dtype)
    ps = _prompts(text_only)
    g = torch.Generator().manual_seed(0)
    conts: list[list[int]] = [[] for _ in ps]
    nxt = [mrope_next_position(p.position_ids_3l) for p in ps]
    with torch.no_grad():
        row = _as_dtype(pack_rows(ps), dtype)
        cache = model.new_cache(len(ps), int(row.max_seqlen) + sum(steps))
        assert isinstance(cache, HybridCache)
        got = model.logits(cached_forward(model, row, cache).hidden_ld)
        assert torch.equal(got, model.logits(model(row).hidden_ld)), "prefill logits are the full forward's"
        for step, n_new in enumerate(steps):
            new = [torch.randint(0, 200, (n_new,), generator=g).tolist() for _ in ps]
            got = model.logits(cached_forward(model, _text_row(new, nxt, conts), cache).hidden_ld)
            conts = [c + t for c, t in zip(conts, new)]
            full = _as_dtype(pack_rows(ps, conts), dtype)
            rows = torch.cat([torch.arange(e - n_new, e) for e in full.cu_seqlens[1:].tolist()])
            want = model.logits(model(full).hidden_ld)[rows]
            err = float((got - want).abs().max() / want.abs().max())
            assert err <= rtol, f"step {step} ({n_new} new token(s) per sequence): rel err {err:.2e}"
    assert cache.lengths == [p.input_ids_l.numel() + sum(steps) for p in ps]


def hf_greedy(hf, prompt: EncodedSample, n: int = NEW_TOKENS) -> list[int]:
    """transformers' greedy ``generate`` on one prompt (batch of one, its own cache)."""
    ids = prompt.input_ids_l[None]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if hasattr(hf.model, "visual"):
        tt = torch.zeros_like(ids)
        tt[ids == IMG] = 1
        tt[ids == VID] = 2
        kw["mm_token_type_ids"] = tt
        kw |= {k: getattr(prompt, k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                               "video_grid_thw") if getattr(prompt, k) is not None}
    out = hf.generate(**kw, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("moe,text_only", CASES)
def test_greedy_generate_matches_transformers(moe: bool, text_only: bool) -> None:
    _, hf, ours = build_pair(tiny_config(moe, text_only=text_only))
    ps = _prompts(text_only)
    params = SamplingParams(NEW_TOKENS)
    with torch.no_grad():
        batched = generate(ours, ps, params)                    # one prefill row, the hybrid cache
        no_cache = generate(ours, ps, params, use_cache=False)
        for i, (p, got, got_nc) in enumerate(zip(ps, batched, no_cache)):
            want = hf_greedy(hf, p)
            kind = "text" if p.pixel_values is None and p.pixel_values_videos is None else "media"
            assert got == want, f"prompt {i} ({kind}, batched, cache): ours {got} != transformers {want}"
            assert got_nc == want, f"prompt {i} ({kind}, no cache): ours {got_nc} != transformers {want}"
            assert len(set(got)) > 1, f"prompt {i}: degenerate continuation {got} would make parity meaningless"
    assert greedy_generate(ours, ps[1], NEW_TOKENS) == batched[1]
    if text_only:   # transformers' batched generate, prompts left-padded (its masked conv / recurrent state)
        assert batched == hf_greedy_left_padded(hf, ps)


def hf_greedy_left_padded(hf, prompts: list[EncodedSample], n: int = NEW_TOKENS) -> list[list[int]]:
    """transformers' greedy ``generate`` on the text prompts in one batch, left-padded with an attention mask."""
    longest = max(p.input_ids_l.numel() for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - p.input_ids_l.numel():] = p.input_ids_l
        mask[i, longest - p.input_ids_l.numel():] = 1
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                      pad_token_id=0)
    return out[:, longest:].tolist()


def test_a_failed_forward_leaves_the_cache_as_it_was() -> None:
    """A decode step that raises in its last layer (after the DeltaNet layers ran) changes nothing: the next
    steps give the tokens of an undisturbed run."""
    _, _, model = build_pair(tiny_config(False, text_only=True))
    ps = _prompts(True)
    params = SamplingParams(4)
    want = generate(model, ps, params)

    def boom(*_):
        raise RuntimeError("boom")

    with torch.no_grad():
        row = pack_rows(ps)
        cache = model.new_cache(len(ps), int(row.max_seqlen) + 8)
        first = model.logits(cached_forward(model, row, cache).hidden_ld)
        first = first[row.cu_seqlens[1:].long() - 1].argmax(-1).tolist()
        nxt = [mrope_next_position(p.position_ids_3l) for p in ps]
        state_before = [None if s is None else s.clone() for s in cache.state]
        hook = model.model.layers[-1].register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            cached_forward(model, _text_row([[t] for t in first], nxt, [[] for _ in ps]), cache)
        hook.remove()
        assert cache.mode is None and cache.lengths == [p.input_ids_l.numel() for p in ps]
        assert all(a is b or torch.equal(a, b) for a, b in zip(cache.state, state_before))
        toks, conts = first, [[t] for t in first]
        for _ in range(3):
            logits = model.logits(cached_forward(model, _text_row([[t] for t in toks], nxt, [c[:-1] for c in conts]),
                                                 cache).hidden_ld)
            toks = logits.argmax(-1).tolist()
            conts = [c + [t] for c, t in zip(conts, toks)]
    assert conts == want


def test_samples_share_one_prefill_and_windows_follow_the_tokens() -> None:
    """``repeat_interleave``: every state / window / K-V slot is repeated per sample; ``last_inputs`` keeps the last
    K-1 inputs of each sequence, across the boundary of what was cached."""
    cache = HybridCache(["linear_attention", "full_attention"], 2, 16)
    cache.state[0], cache.conv[0] = torch.arange(2.0)[:, None], torch.arange(2.0)[:, None] + 10
    cache.repeat_interleave(3)
    assert cache.batch_size == 6 and cache.state[0][:, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert cache.conv[0][:, 0].tolist() == [10, 10, 10, 11, 11, 11]
    old = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])[..., None]          # [B=2, W=3, C=1]
    x = torch.tensor([7.0, 8.0, 9.0, 10.0, 11.0])[:, None]
    got = last_inputs(x, [0, 1, 5], old)   # sequence 0 gets 1 new input, sequence 1 four
    assert got[..., 0].tolist() == [[2, 3, 7], [9, 10, 11]]
    assert last_inputs(x[:0], [0, 0, 0], old).equal(old)


def test_sampled_generation_is_reproducible_from_its_seeds() -> None:
    _, _, model = build_pair(tiny_config(True))
    check_seeded_sampling(model, _prompts(False)[1:], SamplingParams(8, temperature=1.0, top_k=50, top_p=0.95))
