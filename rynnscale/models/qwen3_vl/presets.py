"""Published Qwen3-VL architectures as config.json-shaped dicts (for meta-device builds and planning).

The planner (``rynnscale plan``) and the recipe tests need the real architecture of a recipe's
init model even where its weights are not on disk. Each preset is the architecture part of the
model's ``config.json`` on the Hugging Face hub (``Qwen/Qwen3-VL-2B-Instruct``,
``Qwen/Qwen3-VL-8B-Instruct``, ``Qwen/Qwen3-VL-30B-A3B-Instruct``; the Thinking and base
variants share them). Values cross-checked against third-party copies of those config.json files
found through the project's code search (e.g. test fixtures embedding the 2B and 4B configs, vLLM /
Megatron-Bridge Qwen3-VL providers) and the Qwen3 technical report's Qwen3-30B-A3B table
(48 layers, 32 q / 4 kv heads, 128 experts, 8 routed).

``PUBLISHED_PARAMS`` holds the parameter counts published for each model, which the recipe tests
compare against the count of the module built from the preset on the meta device.
"""

from __future__ import annotations

from typing import Any

_VISION_SMALL = {  # Qwen3-VL-2B / -4B vision tower (24 blocks, width 1024)
    "depth": 24, "hidden_size": 1024, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 4096,
    "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17],
}
_VISION_LARGE = {  # Qwen3-VL-8B / -30B-A3B / -32B vision tower (27 blocks, width 1152)
    "depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 4304,
    "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
}
_ROPE = {"rope_type": "default", "rope_theta": 5_000_000, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
_TOKENS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
           "vision_end_token_id": 151653}


def _text(**kw: Any) -> dict[str, Any]:
    base = {"vocab_size": 151936, "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144, "attention_bias": False, "rope_parameters": dict(_ROPE)}
    base.update(kw)
    return base


PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-VL-2B-Instruct config.json
    "qwen3-vl-2b": {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", **_TOKENS,
        "tie_word_embeddings": True,
        "text_config": _text(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8),
        "vision_config": {**_VISION_SMALL, "out_hidden_size": 2048},
    },
    # Qwen/Qwen3-VL-8B-Instruct config.json
    "qwen3-vl-8b": {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", **_TOKENS,
        "tie_word_embeddings": False,
        "text_config": _text(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                             num_attention_heads=32, num_key_value_heads=8),
        "vision_config": {**_VISION_LARGE, "out_hidden_size": 4096},
    },
    # Qwen/Qwen3-VL-30B-A3B-Instruct config.json
    "qwen3-vl-30b-a3b": {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe", **_TOKENS,
        "tie_word_embeddings": False,
        "text_config": _text(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                             num_attention_heads=32, num_key_value_heads=4, num_experts=128,
                             num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
                             mlp_only_layers=[], norm_topk_prob=True, router_aux_loss_coef=0.001),
        "vision_config": {**_VISION_LARGE, "out_hidden_size": 2048},
    },
}

# Published parameter counts (billions). "total": the hub's safetensors parameter count of the whole
# model (model cards / hub listings: 2B -> 2.13B, 8B -> 8.77B ("8.8B"), 30B-A3B -> 31.07B ("31.1B")).
# "text_total" / "text_active": the Qwen3 report's figures for the language model of the same
# architecture (Qwen3-30B-A3B: 30.5B total, 3.3B activated). Tests allow 2% (totals) and 5% (active):
# the published figures are rounded to 2-3 significant digits.
PUBLISHED_PARAMS: dict[str, dict[str, float]] = {
    "qwen3-vl-2b": {"total": 2.13},
    "qwen3-vl-8b": {"total": 8.77},
    "qwen3-vl-30b-a3b": {"total": 31.07, "text_total": 30.5, "text_active": 3.3},
}

