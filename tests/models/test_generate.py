"""greedy_generate (our model, no cache, re-running the packed forward per token) must produce exactly
the token ids of transformers' greedy ``generate`` (its KV cache, its MRoPE rope_deltas) on the same
exported weights, for a video prompt and an image prompt, dense and MoE."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from rynnscale.config.schema import ModelConfig
from rynnscale.data.encode import EncoderConfig, SampleEncoder
from rynnscale.data.tokenizer import default_tokenizer_dir, load_tokenizer
from rynnscale.data.vision_preprocess import VisionSpec
from rynnscale.data_pipelines.synthetic import render_clip, synthetic_sample
from rynnscale.models.generate import greedy_generate, prompt_batch
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


@pytest.fixture(scope="module")
def prompts():
    enc = SampleEncoder(load_tokenizer(None), EncoderConfig(
        max_tokens=4096, vision=VisionSpec(image_min_pixels=1024, image_max_pixels=96 * 64)))
    video = prompt_of(enc.encode(*synthetic_sample(0, seed=7)))
    image = prompt_of(enc.encode(*image_sample()))
    assert video.video_grid_thw is not None and image.image_grid_thw is not None
    return {"video": video, "image": image}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_greedy_generate_matches_transformers(tmp_path: Path, prompts, moe: bool) -> None:
    torch.manual_seed(0)
    src = tmp_path / "hf"
    hf = transformers.AutoModelForImageTextToText.from_config(tiny_hf_config(moe))
    hf.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(Path(default_tokenizer_dir()) / f, src / f)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    _, ours = build_model(ModelConfig(init_from=str(src), attn_backend="loop"), torch.device("cpu"), seed=0)
    ours.eval()
    for name, prompt in prompts.items():
        want = hf_greedy(hf, prompt)
        got = greedy_generate(ours, prompt, NEW_TOKENS, eos_ids=[IM_END])
        assert got == want, f"{name} prompt: ours {got} != transformers {want}"
        assert len(set(got)) > 1, f"{name}: degenerate continuation {got} would make parity meaningless"


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
    # lockstep mode (FSDP ranks): all forwards run, the answer is still cut at the first eos
    assert greedy_generate(ours, prompts["image"], 3, eos_ids=[first[0]], run_all_steps=True) == first[:1]
    assert greedy_generate(ours, prompts["image"], 0) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(ours, prompts["image"], -1)
