"""Qwen3.5 (dense) and Qwen3.5-MoE: the second built-in model family (RynnBrain 1.1's base models).

A hybrid decoder of Gated DeltaNet linear-attention layers and gated full-attention layers, a routed-expert MoE
with a gated shared expert, and Qwen3-VL's vision tower without DeepStack. Registered as two ``ModelSpec``s that
share everything but the tensor layout: ``qwen3_5`` (``model_type`` ``qwen3_5`` / ``qwen3_5_moe``, the
vision-language models, ``Qwen35Args``) and ``qwen3_5_text`` (``qwen3_5_text`` / ``qwen3_5_moe_text``, the
text-only ``Qwen3_5(Moe)ForCausalLM``, ``Qwen35TextArgs``). Importing it stays light (no torch).
"""

from __future__ import annotations

from typing import Any

from rynnscale.models.qwen3_5.args import HF_KEYS_WITHOUT_SHARED_DEFAULT, Qwen35Args, Qwen35TextArgs
from rynnscale.models.qwen3_5.presets import PRESETS, PUBLISHED_PARAMS
from rynnscale.models.qwen3_5.state_dict import ADAPTER, TEXT_ONLY_ADAPTER
from rynnscale.models.registry import register
from rynnscale.models.spec import DataContract, ModelSpec, ProfilePart, VisionGeometry


def new_model(args: Any, *, attn_backend: str = "auto") -> Any:
    from rynnscale.models.qwen3_5.model import new_model as build

    return build(args, attn_backend=attn_backend)


def parallelize(model: Any, meshes: Any, **options: Any) -> Any:
    from rynnscale.models.qwen3_5.parallelize import parallelize as plan

    return plan(model, meshes, **options)


def step_flops(*a: Any, **kw: Any) -> Any:
    from rynnscale.models.qwen3_5.flops import step_flops as flops

    return flops(*a, **kw)


def cost_coefficients(args: Any) -> tuple[float, float, float]:
    from rynnscale.models.qwen3_5.flops import cost_coefficients as coefficients

    return coefficients(args)


def is_experts(module: Any) -> bool:
    from rynnscale.models.qwen3_vl.moe import GroupedExperts

    return isinstance(module, GroupedExperts)


def profile_parts() -> tuple[ProfilePart, ...]:
    from rynnscale.models.causal_lm import LMHead
    from rynnscale.models.qwen3_5.text import MLP, GatedAttention, GatedDeltaNet, SharedExpertMoeBlock
    from rynnscale.models.qwen3_vl.moe import GroupedExperts
    from rynnscale.models.qwen3_vl.vision import Qwen3VLVisionModel

    return (ProfilePart(GatedAttention, "attention"), ProfilePart(GatedDeltaNet, "linear attention"),
            ProfilePart(GroupedExperts, "experts"), ProfilePart(SharedExpertMoeBlock, "router/permute"),
            ProfilePart(MLP, "mlp"), ProfilePart(LMHead, "loss"),
            ProfilePart(Qwen3VLVisionModel, "vision", close_on="patch_embed"))


def data_contract(args: Any) -> DataContract:
    """Vision token ids from the config; MRoPE positions by the same rule as Qwen3-VL (transformers'
    ``Qwen3_5Model.get_rope_index`` equals ``Qwen3VLModel.get_rope_index``: tests/models/qwen3_5). A text-only
    model: plain positions, samples with media refused. Conversations are rendered with Qwen3.5's chat template
    (its ``<think>`` block: ``rynnscale.data.encode``)."""
    from functools import partial

    from rynnscale.models.mrope import mrope_position_ids, text_position_ids

    v = args.vision
    if v is None:
        return DataContract(args.image_token_id, args.video_token_id, args.vision_start_token_id,
                            args.vision_end_token_id, vision=None,
                            position_ids=lambda ids_l, *_: text_position_ids(len(ids_l)), chat_template="qwen3_5")
    return DataContract(
        image_token_id=args.image_token_id, video_token_id=args.video_token_id,
        vision_start_token_id=args.vision_start_token_id, vision_end_token_id=args.vision_end_token_id,
        vision=VisionGeometry(v.patch_size, v.temporal_patch_size, v.spatial_merge_size),
        position_ids=partial(mrope_position_ids, spatial_merge_size=v.spatial_merge_size,
                             image_token_id=args.image_token_id, video_token_id=args.video_token_id),
        chat_template="qwen3_5")


def layer_activation_bytes(*a: Any, **kw: Any) -> float:
    from rynnscale.models.qwen3_5.memory import layer_activation_bytes as count

    return count(*a, **kw)


def layer_backward_bytes(*a: Any, **kw: Any) -> float:
    from rynnscale.models.qwen3_5.memory import layer_backward_bytes as count

    return count(*a, **kw)


def cp_layer_bytes(*a: Any, **kw: Any) -> tuple[float, float] | None:
    from rynnscale.models.qwen3_5.memory import cp_layer_bytes as count

    return count(*a, **kw)


def cp_layer_traffic(*a: Any, **kw: Any) -> float | None:
    from rynnscale.models.qwen3_5.memory import cp_layer_traffic as count

    return count(*a, **kw)


_COMMON = dict(new_model=new_model, parallelize=parallelize, step_flops=step_flops,
               cost_coefficients=cost_coefficients, data=data_contract, is_experts=is_experts,
               profile_parts=profile_parts, layer_activation_bytes=layer_activation_bytes,
               layer_backward_bytes=layer_backward_bytes, cp_layer_bytes=cp_layer_bytes,
               cp_layer_traffic=cp_layer_traffic,
               hf_keys_without_shared_default=HF_KEYS_WITHOUT_SHARED_DEFAULT)

SPEC = register(ModelSpec(
    name="qwen3_5", model_types=Qwen35Args.MODEL_TYPES, args_cls=Qwen35Args,
    args_from_hf_config=Qwen35Args.from_hf_config, state_dict=ADAPTER,
    presets={k: v for k, v in PRESETS.items() if v["model_type"] in Qwen35Args.MODEL_TYPES},
    published_params=PUBLISHED_PARAMS, **_COMMON))
TEXT_SPEC = register(ModelSpec(
    name="qwen3_5_text", model_types=Qwen35TextArgs.MODEL_TYPES, args_cls=Qwen35TextArgs,
    args_from_hf_config=Qwen35TextArgs.from_hf_config, state_dict=TEXT_ONLY_ADAPTER,
    presets={k: v for k, v in PRESETS.items() if v["model_type"] in Qwen35TextArgs.MODEL_TYPES},
    published_params=PUBLISHED_PARAMS, **_COMMON))
