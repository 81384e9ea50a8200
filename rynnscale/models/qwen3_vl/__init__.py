"""Qwen3-VL (dense) and Qwen3-VL-MoE: the first model family (RynnBrain 1.0's base models).

The package's modules hold the model (``model``, ``text``, ``moe``, ``vision``), its arguments and
published presets, its parallel plan, its Hugging Face tensor layout and its FLOPs; this file registers
them as one ``ModelSpec`` under transformers' ``model_type`` values ``qwen3_vl`` and ``qwen3_vl_moe``.
Importing it stays light (no torch): the torch modules load when a model is built.
"""

from __future__ import annotations

from typing import Any

from rynnscale.models.qwen3_vl.args import HF_KEYS_WITHOUT_SHARED_DEFAULT, Qwen3VLArgs
from rynnscale.models.qwen3_vl.presets import PRESETS, PUBLISHED_PARAMS
from rynnscale.models.qwen3_vl.state_dict import ADAPTER
from rynnscale.models.registry import register
from rynnscale.models.spec import DataContract, ModelSpec, ProfilePart, VisionGeometry


def new_model(args: Qwen3VLArgs, *, attn_backend: str = "auto") -> Any:
    from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration(args, attn_backend=attn_backend)


def parallelize(model: Any, meshes: Any, **options: Any) -> Any:
    from rynnscale.models.qwen3_vl.parallelize import parallelize as plan

    return plan(model, meshes, **options)


def step_flops(*a: Any, **kw: Any) -> Any:
    from rynnscale.models.qwen3_vl.flops import step_flops as flops

    return flops(*a, **kw)


def cost_coefficients(args: Qwen3VLArgs) -> tuple[float, float, float]:
    from rynnscale.models.qwen3_vl.flops import cost_coefficients as coefficients

    return coefficients(args)


def is_experts(module: Any) -> bool:
    from rynnscale.models.qwen3_vl.moe import GroupedExperts

    return isinstance(module, GroupedExperts)


def profile_parts() -> tuple[ProfilePart, ...]:
    from rynnscale.models.causal_lm import LMHead
    from rynnscale.models.qwen3_vl.moe import GroupedExperts, SparseMoeBlock
    from rynnscale.models.qwen3_vl.text import Attention, DenseMLP
    from rynnscale.models.qwen3_vl.vision import Qwen3VLVisionModel

    return (ProfilePart(Attention, "attention"), ProfilePart(GroupedExperts, "experts"),
            ProfilePart(SparseMoeBlock, "router/permute"), ProfilePart(DenseMLP, "mlp"),
            ProfilePart(LMHead, "loss"), ProfilePart(Qwen3VLVisionModel, "vision", close_on="patch_embed"))


def data_contract(args: Qwen3VLArgs) -> DataContract:
    """Vision token ids and patching from the config; MRoPE positions (transformers' ``get_rope_index``)."""
    from functools import partial

    from rynnscale.models.mrope import mrope_position_ids

    v = args.vision
    return DataContract(
        image_token_id=args.image_token_id, video_token_id=args.video_token_id,
        vision_start_token_id=args.vision_start_token_id, vision_end_token_id=args.vision_end_token_id,
        vision=VisionGeometry(v.patch_size, v.temporal_patch_size, v.spatial_merge_size),
        position_ids=partial(mrope_position_ids, spatial_merge_size=v.spatial_merge_size,
                             image_token_id=args.image_token_id, video_token_id=args.video_token_id))


SPEC = register(ModelSpec(
    name="qwen3_vl",
    model_types=("qwen3_vl", "qwen3_vl_moe"),
    args_cls=Qwen3VLArgs,
    args_from_hf_config=Qwen3VLArgs.from_hf_config,
    new_model=new_model,
    parallelize=parallelize,
    state_dict=ADAPTER,
    step_flops=step_flops,
    cost_coefficients=cost_coefficients,
    data=data_contract,
    is_experts=is_experts,
    profile_parts=profile_parts,
    presets=PRESETS,
    published_params=PUBLISHED_PARAMS,
    hf_keys_without_shared_default=HF_KEYS_WITHOUT_SHARED_DEFAULT,
))
