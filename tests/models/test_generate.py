"""Generation (``rynnscale.models.generate``): batched prompts with a KV cache, greedy and sampled.

- greedy KV-cache continuations of a batch of prompts of different lengths (video, image, text) equal
  transformers' greedy ``generate`` (its own cache, its MRoPE rope_deltas) prompt by prompt, token for token,
  on the same exported weights, dense and MoE; the cache-less path gives the same tokens;
- the KV cache's logits equal the full forward's (fp64: rel 1e-12; fp32: rel 1e-5) in prefill, decode and
  multi-token continuation steps;
- the sampling distribution (temperature, top-k, top-p) equals transformers' logits warpers (rel 1e-6), the
  inverse-CDF draw follows it, and sampled generation is reproducible from its seeds.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from generate_checks import check_seeded_sampling
from PIL import Image

from rynnscale.batch import EncodedSample
from rynnscale.config.schema import ModelConfig
from rynnscale.data.encode import EncoderConfig, SampleEncoder
from rynnscale.data.tokenizer import default_tokenizer_dir, load_tokenizer
from rynnscale.data.vision_preprocess import VisionSpec
from rynnscale.data_pipelines.synthetic import render_clip, synthetic_sample
from rynnscale.models.generate import (
    SamplingParams,
    cached_forward,
    filtered_probs,
    generate,
    greedy_generate,
    pack_rows,
    prompt_batch,
    sample_from,
)
from rynnscale.models.mrope import mrope_next_position, text_position_ids
from rynnscale.train.build import build_model

IMG, VID, IM_END = 151655, 151656, 151645
NEW_TOKENS = 12


def tiny_hf_config(moe: bool):
    # initializer_range 0.2: logits spread widely, so greedy picks are far from ties (no fp-order flakes)
    text = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
        return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


def image_sample() -> tuple[str, dict[str, bytes]]:
    """A one-image sample (a rendered table scene as PNG) with a grounding question."""
    frames_thwc, _ = render_clip(np.random.default_rng(3), frames=2, width=96, height=64)
    buf = io.BytesIO()
    Image.fromarray(frames_thwc[0]).save(buf, format="PNG")
    conv = {"conversation": [
        {"role": "user", "content": [{"type": "image", "image": "scene.png"},
                                     {"type": "text", "text": "Point to the red ball."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<affordance> (500, 400) </affordance>"}]}]}
    return "img-0", {"conv.json": json.dumps(conv).encode(), "scene.png": buf.getvalue()}


def prompt_of(sample):
    """The sample cut just before its first assistant token: (EncodedSample-like prompt, its length)."""
    first = int((sample.labels_l != -100).nonzero()[0])
    return type(sample)(key=sample.key, input_ids_l=sample.input_ids_l[:first], labels_l=sample.labels_l[:first],
                        position_ids_3l=sample.position_ids_3l[:, :first], pixel_values=sample.pixel_values,
                        image_grid_thw=sample.image_grid_thw, pixel_values_videos=sample.pixel_values_videos,
                        video_grid_thw=sample.video_grid_thw)


def hf_greedy(hf, prompt) -> list[int]:
    ids = prompt.input_ids_l[None]
    tt = torch.zeros_like(ids)
    tt[ids == IMG] = 1
    tt[ids == VID] = 2
    media = {k: getattr(prompt, k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
             if getattr(prompt, k) is not None}  # transformers chokes on explicit None media
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=tt, **media,
                      do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=[IM_END], pad_token_id=IM_END)
    return out[0, ids.shape[1]:].tolist()


def text_prompt(enc) -> EncodedSample:
    """A text-only chat prompt (ends with ``<|im_start|>assistant\n``)."""
    conv = {"conversation": [
        {"role": "user", "content": [{"type": "text", "text": "Name three colours of balls on a table."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red, blue and green."}]}]}
    return prompt_of(enc.encode("txt-0", {"conv.json": json.dumps(conv).encode()}))


@pytest.fixture(scope="module")
def prompts():
    enc = SampleEncoder(load_tokenizer(None), EncoderConfig(
        max_tokens=4096, vision=VisionSpec(image_min_pixels=1024, image_max_pixels=96 * 64)))
    video = prompt_of(enc.encode(*synthetic_sample(0, seed=7)))
    image = prompt_of(enc.encode(*image_sample()))
    text = text_prompt(enc)
    assert video.video_grid_thw is not None and image.image_grid_thw is not None
    assert len({p.input_ids_l.numel() for p in (video, image, text)}) == 3   # different lengths
    return {"video": video, "image": image, "text": text}


def exported_pair(tmp_path: Path, moe: bool):
    """(transformers model, our model) with the same weights: HF's init, saved, loaded by both."""
    torch.manual_seed(0)
    src = tmp_path / "hf"
    hf = transformers.AutoModelForImageTextToText.from_config(tiny_hf_config(moe))
    hf.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(Path(default_tokenizer_dir()) / f, src / f)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    _, ours = build_model(ModelConfig(init_from=str(src), attn_backend="loop"), torch.device("cpu"), seed=0)
    return hf, ours.eval()


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_greedy_generate_matches_transformers(tmp_path: Path, prompts, moe: bool) -> None:
    hf, ours = exported_pair(tmp_path, moe)
    names = list(prompts)
    params = SamplingParams(NEW_TOKENS, stop_ids=(IM_END,))
    batched = generate(ours, [prompts[n] for n in names], params)            # one prefill row, KV cache
    no_cache = generate(ours, [prompts[n] for n in names], params, use_cache=False)
    for name, got, got_nc in zip(names, batched, no_cache):
        want = hf_greedy(hf, prompts[name])
        assert got == want, f"{name} prompt (batched, KV cache): ours {got} != transformers {want}"
        assert got_nc == want, f"{name} prompt (no cache): ours {got_nc} != transformers {want}"
        assert len(set(got)) > 1, f"{name}: degenerate continuation {got} would make parity meaningless"
    assert greedy_generate(ours, prompts["image"], NEW_TOKENS, eos_ids=[IM_END]) == batched[names.index("image")]


def as_dtype(batch, dtype):
    for k in ("pixel_values", "pixel_values_videos"):
        if getattr(batch, k) is not None:
            setattr(batch, k, getattr(batch, k).to(dtype))
    return batch


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_kv_cache_logits_equal_full_forward(prompts, moe: bool, dtype, rtol: float) -> None:
    """Prefill, 3 decode steps, then a 3-token continuation step: the cached forward's logits of the new
    tokens equal the full forward's over prompt + everything so far (error relative to the logits' max)."""
    _, model = build_model(ModelConfig(arch=tiny_hf_config(moe).to_dict(), attn_backend="loop"), seed=0)
    model.eval().to(dtype)
    ps = [prompts["video"], prompts["image"], prompts["text"]]
    g = torch.Generator().manual_seed(0)
    conts: list[list[int]] = [[] for _ in ps]
    nxt = [mrope_next_position(p.position_ids_3l) for p in ps]
    with torch.no_grad():
        row = as_dtype(pack_rows(ps), dtype)
        cache = model.new_cache(len(ps), 64 + int(row.max_seqlen))
        got = model.logits(cached_forward(model, row, cache).hidden_ld)
        want = model.logits(model(row).hidden_ld)
        assert (got - want).abs().max() <= rtol * want.abs().max()
        for step, n_new in enumerate([1, 1, 1, 3]):
            new = [torch.randint(0, 151000, (n_new,), generator=g).tolist() for _ in ps]
            row = pack_rows([EncodedSample(key="", input_ids_l=torch.tensor(t), labels_l=torch.tensor(t),
                                           position_ids_3l=text_position_ids(n_new, p + len(c)))
                             for t, p, c in zip(new, nxt, conts)])
            got = model.logits(cached_forward(model, row, cache).hidden_ld)
            conts = [c + t for c, t in zip(conts, new)]
            full = as_dtype(pack_rows(ps, conts), dtype)
            ends = full.cu_seqlens[1:].long()
            rows = torch.cat([torch.arange(e - n_new, e) for e in ends.tolist()])
            want = model.logits(model(full).hidden_ld)[rows]
            err = float((got - want).abs().max() / want.abs().max())
            assert err <= rtol, f"step {step} ({n_new} new token(s) per sequence): rel err {err:.2e}"


def test_filtered_probs_match_transformers_warpers() -> None:
    """temperature -> top-k -> top-p as transformers' ``generate`` applies its warpers (rel 1e-6), on random
    logits and on logits with many ties (there the kept probabilities agree, and ours keep the higher ids)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    tied = torch.cat([torch.tensor([[0.5, 0.25, 0.25] + [0.0] * 47]).log(),
                      torch.randint(0, 4, (5, 50), generator=g).float()])
    cases = [(0.7, 50, 0.9), (1.3, 0, 0.5), (1.0, 7, 1.0), (0.5, 0, 1.0), (1.0, 1, 0.3), (1.0, 0, 0.75), (1.0, 9, 0.6)]
    for logits, (temperature, top_k, top_p) in [(torch.randn(6, 1000, generator=g) * 3, c) for c in cases] + [
            (tied, c) for c in cases]:
        warpers = [TemperatureLogitsWarper(temperature)]
        warpers += [TopKLogitsWarper(top_k)] if top_k else []
        warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
        want = torch.softmax(LogitsProcessorList(warpers)(None, logits.clone()), dim=-1)
        got = filtered_probs(logits, temperature, top_k, top_p)
        if logits is tied:   # which tied tokens stay is the order of transformers' unstable sort; the sets agree
            want, got = want.sort(-1).values, got.sort(-1).values
        assert torch.equal(got > 0, want > 0), (temperature, top_k, top_p)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), (temperature, top_k, top_p)
    # of tied tokens straddling the top-p boundary, the higher ids stay (a stable rule, whatever the device)
    assert (filtered_probs(tied[:1], 1.0, 0, 0.75)[0, :3] > 0).tolist() == [True, False, True]


def test_non_finite_logits_are_an_error_and_a_tiny_temperature_is_greedy() -> None:
    """A NaN or +inf logit, or a row of -inf, has no distribution: a clear error naming the sequence (before: a NaN
    row whose draw was clamped to the last vocabulary id, every step). A temperature so small that logits / T
    overflows: the argmax (before: NaN, then the last id)."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    for i, bad in ((1, float("nan")), (2, float("inf"))):
        x = logits.clone()
        x[i, 7] = bad
        with pytest.raises(ValueError, match=rf"sequence\(s\) \[{i}\] are not finite"):
            filtered_probs(x, 1.0)
    with pytest.raises(ValueError, match=r"sequence\(s\) \[3\]"):
        filtered_probs(torch.cat([logits[:3], torch.full((1, 300), float("-inf"))]), 1.0)
    probs = filtered_probs(logits, 1e-39)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.equal(probs.max(-1).values, torch.ones(4))
    assert torch.equal(sample_from(probs, torch.rand(4, dtype=torch.float64)), logits.argmax(-1))


def test_stop_ids_take_one_id_and_reject_what_is_not_a_token_id() -> None:
    """``stop_ids=tokenizer.token_to_id('<|im_end|>')`` (one int) was a bare "'int' object is not iterable", a
    missing token (None) a bare int() error, and a string of digits silently became one stop id per digit."""
    import numpy as np

    assert SamplingParams(4, stop_ids=IM_END).stop_ids == (IM_END,)
    assert SamplingParams(4, stop_ids=[np.int64(7), torch.tensor(8)]).stop_ids == (7, 8)
    assert SamplingParams(4, stop_ids=torch.tensor([IM_END, 9])).stop_ids == (IM_END, 9)
    for bad in ([None], "151645", [2.5]):
        with pytest.raises(ValueError, match="stop_ids=.* must be token ids"):
            SamplingParams(4, stop_ids=bad)


def test_inverse_cdf_draws_follow_the_distribution() -> None:
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0]]).expand(40_000, 5)
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    freq = torch.bincount(sample_from(probs, u), minlength=5).double() / 40_000
    assert freq[1] == 0 and freq[4] == 0                        # probability 0: never drawn
    assert torch.allclose(freq, probs[0].double(), atol=0.01)   # 4 sigma of a binomial at n=40k is ~0.01
    assert sample_from(probs[:2], torch.tensor([0.0, 0.9999999])).tolist() == [0, 3]


def test_sampled_generation_is_reproducible_from_its_seeds(prompts) -> None:
    _, model = build_model(ModelConfig(arch=tiny_hf_config(True).to_dict(), attn_backend="loop"), seed=0)
    model.eval()
    check_seeded_sampling(model, [prompts["image"], prompts["text"]],
                          SamplingParams(8, temperature=1.0, top_k=100, top_p=0.95))


def test_positions_continue_after_the_prompt(prompts) -> None:
    """New text tokens sit at max(prompt positions) + 1, + 2, ... in all three MRoPE rows."""
    prompt = prompts["video"]
    batch = prompt_batch(prompt, [11, 12, 13])
    L = prompt.input_ids_l.numel()
    nxt = int(prompt.position_ids_3l.max()) + 1
    assert nxt < L  # a video prompt compresses positions: next position < length (rope_delta < 0)
    assert batch.position_ids_3l[:, L:].tolist() == [[nxt, nxt + 1, nxt + 2]] * 3
    assert batch.input_ids_l[L:].tolist() == [11, 12, 13] and (batch.labels_l == -100).all()
    batch.validate()


def test_stops_at_eos_and_checks_arguments(prompts) -> None:
    torch.manual_seed(0)
    cfg = tiny_hf_config(False)
    _, ours = build_model(ModelConfig(arch=cfg.to_dict(), attn_backend="loop"), torch.device("cpu"), seed=0)
    ours.eval()
    first = greedy_generate(ours, prompts["image"], 3)
    assert len(first) == 3
    assert greedy_generate(ours, prompts["image"], 3, eos_ids=[first[0]]) == first[:1]
    assert greedy_generate(ours, prompts["image"], 3, eos_ids=first[0]) == first[:1]   # one id
    # lockstep mode (FSDP ranks): all forwards run, the answer is still cut at the first eos
    assert greedy_generate(ours, prompts["image"], 3, eos_ids=[first[0]], run_all_steps=True) == first[:1]
    assert greedy_generate(ours, prompts["image"], 0) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(ours, prompts["image"], -1)


def test_filler_prompts_are_decoded_but_not_waited_for(prompts) -> None:
    """A lockstep filler (``fillers``) runs in every forward but counts as stopped from the start: decoding ends
    when the real prompts have stopped, the real continuations are those of the real prompts alone, and a filler's
    come back empty (before, a filler had to hit a stop token itself, so a padded rank decoded to the end)."""
    _, ours = build_model(ModelConfig(arch=tiny_hf_config(False).to_dict(), attn_backend="loop"), seed=0)
    ours.eval()
    real, filler = prompts["image"], prompts["text"]
    free = generate(ours, [real, filler], SamplingParams(6))
    stop = (free[0][2],)
    assert stop[0] not in free[1]                      # the filler would never stop by itself
    forwards: list[int] = []
    ours.register_forward_pre_hook(lambda *_: forwards.append(1))
    for use_cache in (True, False):
        forwards.clear()
        got = generate(ours, [real, filler], SamplingParams(6, stop_ids=stop), fillers=[False, True],
                       use_cache=use_cache)
        assert got == [free[0][:3], []] and len(forwards) == 3, (use_cache, got, len(forwards))
    forwards.clear()   # sampled, 2 samples per prompt: the real prompt's draws are its own seeds'
    params = SamplingParams(6, temperature=1.0)
    assert generate(ours, [filler, real], params, num_samples=2, seeds=[1, 2, 3, 4], fillers=[True, False]) == \
        [[], [], *generate(ours, [real], params, num_samples=2, seeds=[3, 4])]
    with pytest.raises(ValueError, match="fillers has 1 entries for 2 prompts"):
        generate(ours, [real, filler], SamplingParams(2), fillers=[True])


def test_raw_and_normalised_pixels_in_one_batch(prompts) -> None:
    """Prompts with raw uint8 pixels (+ pixel_norm, the loader's) and prompts with normalised float pixels (HF's)
    in one batch: before, ``torch.cat`` turned the raw ones into floats of 0..255 that reached the vision tower
    as if normalised (silently other tokens than the prompt alone). Now they are normalised with their prompt's
    norm: the row's pixels equal the float prompts' bitwise (``PixelNorm`` is HF's arithmetic)."""
    import dataclasses

    enc = SampleEncoder(load_tokenizer(None), EncoderConfig(
        max_tokens=4096, vision=VisionSpec(image_min_pixels=1024, image_max_pixels=96 * 64)))
    raw = enc.encode(*image_sample(), normalize=False)
    raw = dataclasses.replace(prompt_of(raw), pixel_norm=raw.pixel_norm)
    normed = prompts["image"]
    assert raw.pixel_values.dtype == torch.uint8 and normed.pixel_values.dtype == torch.float32
    both = pack_rows([normed, raw, prompts["text"]])
    assert both.pixel_norm is None
    assert torch.equal(both.pixel_values, torch.cat([normed.pixel_values, normed.pixel_values]))
    same = pack_rows([raw, raw])                       # all raw under one norm: stays raw (the model normalises)
    assert same.pixel_values.dtype == torch.uint8 and same.pixel_norm == raw.pixel_norm
    _, ours = build_model(ModelConfig(arch=tiny_hf_config(False).to_dict(), attn_backend="loop"), seed=0)
    ours.eval()
    alone = generate(ours, [normed], SamplingParams(6))[0]
    assert generate(ours, [normed, raw], SamplingParams(6)) == [alone, alone]
    with pytest.raises(ValueError, match=r"prompt 1: pixel_values is uint8 \(raw pixels\) but its pixel_norm is None"):
        pack_rows([normed, dataclasses.replace(raw, pixel_norm=None)])


def test_generation_runs_through_active_lora_adapters(prompts) -> None:
    """On a LoRA model the cache and the no-cache paths both decode through the adapters; inside
    ``adapters_disabled`` the tokens are the base model's (GRPO's reference for a LoRA run)."""
    import dataclasses

    from rynnscale.config.schema import LoRAConfig
    from rynnscale.models.lora import adapters_disabled, is_adapter_param

    cfg = ModelConfig(arch=tiny_hf_config(False).to_dict(), attn_backend="loop", lora=LoRAConfig(rank=4, alpha=8))
    _, model = build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)   # fresh adapters (B = 0) would change nothing
    _, base = build_model(dataclasses.replace(cfg, lora=LoRAConfig()), seed=0)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not is_adapter_param(k)})
    model.eval(), base.eval()
    ps, params = [prompts["image"], prompts["text"]], SamplingParams(8)
    on = generate(model, ps, params)
    assert generate(model, ps, params, use_cache=False) == on
    with adapters_disabled(model):
        off = generate(model, ps, params)
    assert off == generate(base, ps, params) and off != on
    assert generate(model, ps, params) == on   # adapters back on after the block
