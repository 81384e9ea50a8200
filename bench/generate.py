"""Generation benchmark: rynnscale's KV-cache generation vs its cache-less generator vs transformers' ``generate``.

One tiny Qwen3-VL, or Qwen3.5 (``--family qwen3_5``: 3 Gated DeltaNet layers + 1 gated full-attention layer per 4,
its tower without DeepStack; our cache keeps the DeltaNet states and conv windows) -- transformers' init with wide
logits, saved and loaded by both sides: the same weights --
the same prompts (two synthetic videos, one image, one text question; different lengths), greedy, a fixed
number of new tokens (no stop token, so every variant decodes the same count). Variants:

- ``ours-kv-batch``: ``rynnscale.models.generate.generate`` on all prompts at once (one prefill row, KV cache);
- ``ours-kv``: the same, one prompt per call;
- ``ours-nocache``: the generator before the KV cache (one prompt per call, the full forward re-run on prompt +
  generated tokens for every new token, the vision tower included);
- ``hf``: transformers' ``generate`` one prompt per call (its DynamicCache);
- ``hf-batch``: transformers' ``generate`` on the left-padded batch.

Prints new tokens per CPU second (process time, median of ``--repeats`` round-robin passes after one untimed
warm-up call of every variant: on a shared machine wall time measures the other tenants) and each variant's ratio
to ``ours-kv-batch``; checks that every variant produced transformers' tokens (exit 1 otherwise). Figures on a CPU are CPU figures: at these sizes a decoding
step is dominated by the 151,936-row lm_head (one read of its 155 MB per step), so they show the cache's and
the batch's effect, not GPU decoding speed.
``python bench/generate.py [--family qwen3_vl|qwen3_5] [--new-tokens 32] [--moe] [--json out.json]``
(one torch thread by default: ``--threads``).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMG, VID, PAD = 151655, 151656, 151643


def qwen35_config(hidden: int, layers: int, moe: bool):
    """A tiny Qwen3.5 with the Qwen3-VL tokenizer's vision ids (the prompts are encoded with it)."""
    import transformers

    rot_half = hidden // 4 // 4 // 2   # partial rotary 0.25 of head_dim hidden / 4; MRoPE sections over its half
    text = dict(vocab_size=151936, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, initializer_range=0.2,
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=hidden // 8,
                linear_value_head_dim=hidden // 8, linear_conv_kernel_dim=4,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [rot_half - 2 * (rot_half * 3 // 8), rot_half * 3 // 8,
                                                   rot_half * 3 // 8], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
                  num_position_embeddings=64)
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=151652, vision_end_token_id=151653,
               tie_word_embeddings=False)
    if moe:
        text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=hidden // 2,
                    shared_expert_intermediate_size=hidden // 2)
        return transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision, **ids)
    return transformers.Qwen3_5Config(text_config=text, vision_config=vision, **ids)


def build(tmp: Path, hidden: int, layers: int, moe: bool, family: str = "qwen3_vl"):
    import transformers

    from rynnscale.config.schema import ModelConfig
    from rynnscale.train.build import build_model

    if family == "qwen3_5":
        torch.manual_seed(0)
        transformers.AutoModelForImageTextToText.from_config(qwen35_config(hidden, layers, moe)).save_pretrained(tmp)
        hf = transformers.AutoModelForImageTextToText.from_pretrained(tmp, dtype=torch.float32).eval()
        _, ours = build_model(ModelConfig(init_from=str(tmp), attn_backend="loop"), torch.device("cpu"), seed=0)
        return hf, ours.eval()
    half = hidden // 8        # head_dim / 2 with 4 heads; MRoPE sections in Qwen3-VL's proportions
    text = dict(vocab_size=151936, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
                  num_position_embeddings=64, deepstack_visual_indexes=[0])
    if moe:
        text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=hidden // 2)
        cfg = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    else:
        cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForImageTextToText.from_config(cfg).save_pretrained(tmp)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(tmp, dtype=torch.float32).eval()
    _, ours = build_model(ModelConfig(init_from=str(tmp), attn_backend="loop"), torch.device("cpu"), seed=0)
    return hf, ours.eval()


def prompts():
    from PIL import Image

    from rynnscale.data.encode import EncoderConfig, SampleEncoder
    from rynnscale.data.tokenizer import load_tokenizer
    from rynnscale.data.vision_preprocess import VisionSpec
    from rynnscale.data_pipelines.synthetic import render_clip, synthetic_sample

    enc = SampleEncoder(load_tokenizer(None), EncoderConfig(
        max_tokens=8192, vision=VisionSpec(image_min_pixels=1024, image_max_pixels=128 * 96)))

    def cut(s):
        first = int((s.labels_l != -100).nonzero()[0])
        return type(s)(key=s.key, input_ids_l=s.input_ids_l[:first], labels_l=s.labels_l[:first],
                       position_ids_3l=s.position_ids_3l[:, :first], pixel_values=s.pixel_values,
                       image_grid_thw=s.image_grid_thw, pixel_values_videos=s.pixel_values_videos,
                       video_grid_thw=s.video_grid_thw)

    def conv(content, answer="ok"):
        return json.dumps({"conversation": [{"role": "user", "content": content},
                                            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}).encode()

    frames, _ = render_clip(np.random.default_rng(3), frames=2, width=128, height=96)
    buf = io.BytesIO()
    Image.fromarray(frames[0]).save(buf, format="PNG")
    image = cut(enc.encode("img", {"conv.json": conv([{"type": "image", "image": "a.png"},
                                                      {"type": "text", "text": "Point to the red ball."}]),
                                   "a.png": buf.getvalue()}))
    text = cut(enc.encode("txt", {"conv.json": conv([{"type": "text", "text": "Which objects are on the table?"}])}))
    videos = [cut(enc.encode(*synthetic_sample(i, seed=7, frames=8, width=96, height=64))) for i in range(2)]
    return [videos[0], image, text, videos[1]]


def hf_inputs(ps, left_pad: bool):
    L = max(p.input_ids_l.numel() for p in ps)
    ids = torch.full((len(ps), L), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(ps):
        n = p.input_ids_l.numel()
        ids[i, L - n:] = p.input_ids_l
        mask[i, L - n:] = 1
    tt = torch.zeros_like(ids)
    tt[ids == IMG], tt[ids == VID] = 1, 2
    kw = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=tt)
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [getattr(p, k) for p in ps if getattr(p, k) is not None]
        if parts:
            kw[k] = torch.cat(parts)
    return kw


def cpu_timed(fn):
    """(result, CPU seconds of this process): with one thread, insensitive to other tenants' time slices."""
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def timed_passes(variants: dict, repeats: int) -> tuple[dict[str, list], dict[str, list[float]]]:
    """Each variant's result and CPU seconds over ``repeats`` round-robin passes (every variant sees the same
    machine load), after one untimed warm-up call of EVERY variant (first-call costs: lazy imports, allocator
    growth, mask / kernel set-up are not generation speed)."""
    for fn in variants.values():
        fn()
    results: dict[str, list] = {}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            results[name], dt = cpu_timed(fn)
            times[name].append(dt)
    return results, times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=("qwen3_vl", "qwen3_5"), default="qwen3_vl")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--moe", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a shared machine OpenMP spinning makes tiny matmuls 10x slower)")
    a = ap.parse_args(argv)
    for flag, value in (("--layers", a.layers), ("--new-tokens", a.new_tokens), ("--repeats", a.repeats),
                        ("--threads", a.threads)):
        if value < 1:
            ap.error(f"{flag} {value}: must be >= 1")
    if a.hidden < 64 or a.hidden % 64:
        ap.error(f"--hidden {a.hidden}: must be a multiple of 64 (4 heads, MRoPE sections over a quarter of each)")
    torch.set_num_threads(a.threads)
    import tempfile

    from rynnscale.models.generate import SamplingParams, generate

    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build(Path(tmp) / "hf", a.hidden, a.layers, a.moe, a.family)
    ps = prompts()
    n = a.new_tokens
    params = SamplingParams(n)
    hf_kw = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=PAD)

    def hf_one():
        res = []
        for p in ps:
            kw = hf_inputs([p], False)
            res.append(hf.generate(**kw, **hf_kw)[0, kw["input_ids"].shape[1]:].tolist())
        return res

    def hf_batch():
        kw = hf_inputs(ps, True)
        return [r.tolist() for r in hf.generate(**kw, **hf_kw)[:, kw["input_ids"].shape[1]:]]

    variants = {
        "ours-kv-batch": lambda: generate(ours, ps, params),
        "ours-kv": lambda: [generate(ours, [p], params)[0] for p in ps],
        "ours-nocache": lambda: [generate(ours, [p], params, use_cache=False)[0] for p in ps],
        "hf": hf_one,
        "hf-batch": hf_batch,
    }
    with torch.no_grad():
        results, times = timed_passes(variants, a.repeats)
    rows = {name: {"new_tokens": sum(len(t) for t in toks), "tokens": toks, "seconds": statistics.median(times[name])}
            for name, toks in results.items()}
    ok = True
    lens = [p.input_ids_l.numel() for p in ps]
    print(f"CPU ({torch.get_num_threads()} threads), {a.family} {'MoE' if a.moe else 'dense'} hidden {a.hidden} x {a.layers} "
          f"layers, vocab 151936; prompts of {lens} tokens; {n} new tokens each, greedy")
    base = rows["ours-kv-batch"]
    print(f"{'variant':<14} {'CPU s':>8} {'new tok/s':>10} {'x ours-kv-batch':>16}  tokens == hf")
    for name, r in rows.items():
        r["tokens_per_s"] = r["new_tokens"] / r["seconds"]
        same = r["tokens"] == rows["hf"]["tokens"]
        ok &= same or name == "hf-batch"   # HF's own left-padded batch may flip near-ties; reported, not failed
        r["matches_hf"] = same
        print(f"{name:<14} {r['seconds']:8.3f} {r['tokens_per_s']:10.1f} {base['seconds'] / r['seconds']:16.2f}  {same}")
    if a.json:
        a.json.write_text(json.dumps({"device": "cpu", "family": a.family, "threads": torch.get_num_threads(),
                                      "prompt_tokens": lens,
                                      "new_tokens": n, "moe": a.moe,
                                      "rows": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"}
                                               for k, v in rows.items()}, "ok": ok}, indent=1))
    if not ok:
        print("FAIL: a rynnscale variant's tokens differ from transformers' generate")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
