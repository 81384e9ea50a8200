"""Published Qwen3.5 architectures (the bases of RynnBrain 1.1) as config.json-shaped dicts, for meta-device
builds and planning without weights. RynnBrain 1.1 post-trains Qwen3.5 at 2B, 9B and 122B-A10B (ANCHORS.md), so
its checkpoints share these architectures.

The hub's config.json files are not reachable from here; every number below comes from a public copy or quote of
them found through the project's code search (third-party material, cross-checked where two sources exist):

- ``qwen3.5-9b`` (``Qwen/Qwen3.5-9B``): text sizes from a GGUF deployment guide's table quoting the hub
  config.json (hidden 4096, intermediate 12288, 32 layers, 16 q / 4 kv heads, head_dim 256, vocab 248,320,
  rms eps 1e-6, rope theta 1e7, partial rotary 0.25, interleaved MRoPE [11, 11, 10], full_attention_interval 4,
  DeltaNet 16 key / 32 value heads of 128, conv 4, max positions 262,144, one MTP layer); vision tower, token ids
  and ``tie_word_embeddings: false`` from a Qwen3.5-9B config contract in another repository's tests (depth 27,
  width 1152, MLP 4304, 16 heads, 2304 positions, patch 16, merge 2, temporal 2, out 4096) and an unsloth copy
  of the config (same tower, out 4096).
- ``qwen3.5-35b-a3b`` (``Qwen/Qwen3.5-35B-A3B``): a verbatim config.json of a fine-tune of it (same architecture
  fields): hidden 2048, 40 layers, 16 q / 2 kv heads, head_dim 256, 256 experts top-8, expert / shared MLP 512,
  DeltaNet 16 / 32 heads of 128, the tower above with out 2048, untied; cross-checked with a model-metadata table
  and slime's Megatron script for the same model.
- ``qwen3.5-122b-a10b`` (``Qwen/Qwen3.5-122B-A10B``): text sizes from an inference test script passing the
  published config (hidden 3072, head_dim 256, 48 layers, 32 q / 2 kv heads, 256 experts top-8, expert /
  shared MLP 1024, rope theta 1e7, interval 4, DeltaNet 16 key / 64 value heads of 128, conv 4, partial 0.25,
  vocab 248,320, eps 1e-6); "12 of 48 layers gated attention" and the 262K context from a model page; untied
  (a quantised release lists its LM head apart from the embeddings). NOT sourced: its vision tower. The preset
  assumes the tower every sourced Qwen3.5 size has (9B, 35B-A3B: 27 x 1152) with ``out_hidden_size`` = hidden
  size, which the architecture requires; MRoPE section [11, 11, 10] as in every sourced size.
- ``qwen3.5-2b`` (RynnBrain 1.1's smallest size): no copy of its config.json was found; there is no preset.

``PUBLISHED_PARAMS``: the sizes in the model names (billions; total, and active for MoE), which the recipe tests
compare with the count of the module built from the preset (names round to 2-3 digits; the hub counts include
the MTP head, which neither transformers nor we build).
"""

from __future__ import annotations

import copy
from typing import Any

from rynnscale.models.qwen3_5.args import default_layer_types

_TOKENS = {"image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053,
           "vision_end_token_id": 248054}
_TOWER = {"depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 4304,
          "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
          "num_position_embeddings": 2304, "deepstack_visual_indexes": []}
_ROPE = {"rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25,
         "mrope_section": [11, 11, 10], "mrope_interleaved": True}
_LINEAR = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
           "linear_num_key_heads": 16}


def _text(layers: int, **kw: Any) -> dict[str, Any]:
    return {"vocab_size": 248320, "head_dim": 256, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144, "attention_bias": False, "attn_output_gate": True,
            "full_attention_interval": 4, "layer_types": default_layer_types(layers, 4), "num_hidden_layers": layers,
            "rope_parameters": copy.deepcopy(_ROPE), "mtp_num_hidden_layers": 1, "tie_word_embeddings": False,
            **_LINEAR, **kw}


def _vl(model_type: str, text: dict[str, Any]) -> dict[str, Any]:
    arch = "Qwen3_5MoeForConditionalGeneration" if "moe" in model_type else "Qwen3_5ForConditionalGeneration"
    return {"architectures": [arch], "model_type": model_type, **_TOKENS, "tie_word_embeddings": False,
            "text_config": text, "vision_config": {**_TOWER, "out_hidden_size": text["hidden_size"]}}


PRESETS: dict[str, dict[str, Any]] = {
    "qwen3.5-9b": _vl("qwen3_5", _text(32, hidden_size=4096, intermediate_size=12288, num_attention_heads=16,
                                       num_key_value_heads=4, linear_num_value_heads=32)),
    "qwen3.5-35b-a3b": _vl("qwen3_5_moe", _text(40, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2,
                                                linear_num_value_heads=32, num_experts=256, num_experts_per_tok=8,
                                                moe_intermediate_size=512, shared_expert_intermediate_size=512,
                                                router_aux_loss_coef=0.001)),
    "qwen3.5-122b-a10b": _vl("qwen3_5_moe", _text(48, hidden_size=3072, num_attention_heads=32, num_key_value_heads=2,
                                                  linear_num_value_heads=64, num_experts=256, num_experts_per_tok=8,
                                                  moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
                                                  router_aux_loss_coef=0.001)),
}

PUBLISHED_PARAMS: dict[str, dict[str, float]] = {
    "qwen3.5-9b": {"total": 9.0},
    "qwen3.5-35b-a3b": {"total": 35.0, "active": 3.0},
    "qwen3.5-122b-a10b": {"total": 122.0, "active": 10.0},
}
