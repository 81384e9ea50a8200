"""A tiny transformers Qwen3-VL / Qwen3-VL-MoE (the real 151,936-token vocabulary, so the bundled Qwen3
tokenizer's samples fit) and its logits on one encoded sample: the oracle of the export and LoRA tests."""

from __future__ import annotations

import torch
import transformers

IMG, VID = 151655, 151656


def tiny_hf_config(moe: bool):
    text = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[1])
        return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)


def hf_logits(hf, s) -> torch.Tensor:
    """Logits [L, V] of transformers' model on one EncodedSample (mm_token_type_ids from the pad tokens)."""
    ids = s.input_ids_l
    tt = torch.zeros_like(ids)
    tt[ids == IMG] = 1
    tt[ids == VID] = 2
    return hf(input_ids=ids[None], mm_token_type_ids=tt[None], use_cache=False, pixel_values=s.pixel_values,
              image_grid_thw=s.image_grid_thw, pixel_values_videos=s.pixel_values_videos,
              video_grid_thw=s.video_grid_thw).logits[0]
