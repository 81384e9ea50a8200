"""The Qwen3.5 family's seam pieces: arguments from config.json (strict keys, validation naming keys, round trip
through transformers' AutoConfig), the HF tensor layout (every tensor and shape of transformers' models), the
init plan, the data contract (vision ids from the config; MRoPE positions equal transformers' ``get_rope_index``)."""

from __future__ import annotations

import math

import pytest
import torch
from qwen35_helpers import IMG, VE, VID, VS, hf_model, tiny_config

from rynnscale.models import ArchConfigError, args_from_hf_config, family, family_of
from rynnscale.models.qwen3_5.args import Qwen35Args, Qwen35TextArgs

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.qwen3_5")

VARIANTS = [pytest.param(moe, text_only, tie, id=f"{'moe' if moe else 'dense'}-{'text' if text_only else 'vl'}-"
                         f"{'tied' if tie else 'untied'}")
            for moe in (False, True) for text_only in (False, True) for tie in (False, True)]


def test_model_types_resolve_to_the_two_layouts() -> None:
    for model_type in ("qwen3_5", "qwen3_5_moe"):
        assert family(model_type).name == "qwen3_5" and family(model_type).args_cls is Qwen35Args
    for model_type in ("qwen3_5_text", "qwen3_5_moe_text"):
        assert family(model_type).name == "qwen3_5_text" and family(model_type).args_cls is Qwen35TextArgs
    args = args_from_hf_config(tiny_config(True, text_only=True))
    assert isinstance(args, Qwen35TextArgs) and family_of(args).state_dict.embed_key == "model.embed_tokens.weight"
    assert family_of(args_from_hf_config(tiny_config(False))).name == "qwen3_5"


@pytest.mark.parametrize("moe,text_only,tie", VARIANTS)
def test_config_round_trips_through_transformers(moe: bool, text_only: bool, tie: bool) -> None:
    args = args_from_hf_config(tiny_config(moe, tie, text_only), strict=True)
    assert args.model_type == ("qwen3_5_moe" if moe else "qwen3_5") + ("_text" if text_only else "")
    hf_cfg = transformers.AutoConfig.for_model(**args.to_hf_config())
    again = args_from_hf_config(hf_cfg.to_dict(), strict=True)
    assert again == args
    text = hf_cfg.get_text_config()
    assert text.layer_types == args.text.layer_types and text.rope_parameters["partial_rotary_factor"] == 0.25


@pytest.mark.parametrize("moe,text_only,tie", VARIANTS)
def test_param_shapes_are_every_tensor_of_transformers_model(moe: bool, text_only: bool, tie: bool) -> None:
    cfg = tiny_config(moe, tie, text_only)
    hf = hf_model(cfg)
    args = args_from_hf_config(cfg)
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    if tie:
        theirs.pop("lm_head.weight")
    assert family_of(args).state_dict.param_shapes(args) == theirs
    assert "lm_head.weight" in family_of(args).state_dict.param_shapes(args, include_tied=True)


def test_published_config_keys_are_read_and_typos_named() -> None:
    cfg = tiny_config(True)
    text = cfg["text_config"]
    del text["layer_types"]
    text.update(full_attention_interval=2, attn_output_gate=True, mtp_num_hidden_layers=1,
                mtp_use_dedicated_embeddings=False)
    args = args_from_hf_config(cfg, strict=True)
    assert args.text.layer_types == ["linear_attention", "full_attention"] * 2
    with pytest.raises(ArchConfigError, match=r"text_config: unknown key\(s\) \['linear_num_kv_heads'\]"):
        args_from_hf_config(tiny_config(True, linear_num_kv_heads=2), strict=True)
    args_from_hf_config(tiny_config(True, linear_num_kv_heads=2))          # not strict: a checkpoint's extra key
    bad = [({"layer_types": ["linear_attention"] * 3}, "layer_types"),
           ({"layer_types": ["linear_attention"] * 3 + ["sliding"]}, "layer_types"),
           ({"linear_num_key_heads": 3}, "linear_num_key_heads"),
           ({"attn_output_gate": False}, "attn_output_gate"),
           ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
           ({"hidden_size": 1 << 20}, "hidden_size"),
           ({"num_key_value_heads": 3}, "num_key_value_heads"),
           ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
           ({"vocab_size": 200}, "vocab_size")]
    for override, key in bad:
        with pytest.raises(ArchConfigError, match=key):
            args_from_hf_config(tiny_config(True, **override))
    with pytest.raises(ArchConfigError, match="MoE key"):
        args_from_hf_config(tiny_config(False, num_experts=4), strict=True)
    with pytest.raises(ArchConfigError, match="text-only"):
        args_from_hf_config({**tiny_config(False), "model_type": "qwen3_5_text"})


def test_init_plan_covers_every_parameter_with_transformers_rules() -> None:
    from rynnscale.models.qwen3_5.model import new_model

    for cfg in (tiny_config(True), tiny_config(False, tie=True, text_only=True)):
        args = args_from_hf_config(cfg)
        with torch.device("meta"):
            model = new_model(args)
        model.to_empty(device="cpu")
        model.init_weights(seed=3, std=0.02)
        params = dict(model.named_parameters())
        for name, p in params.items():
            if name.endswith("linear_attn.norm.weight") or name.endswith("dt_bias"):
                assert torch.equal(p, torch.ones_like(p)), name
            elif name.endswith("A_log"):
                assert math.log(0.01) <= float(p.min()) and float(p.max()) <= math.log(16), name
            elif name.endswith("layernorm.weight") or name.endswith("_norm.weight") or name.endswith("model.norm.weight") \
                    or name.endswith("language_model.norm.weight"):
                assert torch.equal(p, torch.zeros_like(p)), name        # zero-centred: 1 + weight
            elif p.dim() >= 2 and p.numel() > 1000:
                assert 0.015 < float(p.detach().std()) < 0.025, name
        if args.tie_word_embeddings:
            assert model.lm_head.weight is model.input_embeddings().weight
        # same seed, same draws
        again = new_model(args)
        again.init_weights(seed=3, std=0.02)
        assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in params.items())


def test_data_contract_ids_from_config_and_positions_equal_transformers_get_rope_index() -> None:
    cfg = tiny_config(False)
    args = args_from_hf_config(cfg)
    contract = family_of(args).data(args)
    assert (contract.image_token_id, contract.video_token_id, contract.vision_start_token_id,
            contract.vision_end_token_id) == (IMG, VID, VS, VE)
    assert (contract.vision.patch_size, contract.vision.merge_size) == (4, 2)
    hf = hf_model(cfg)
    ids = torch.tensor([1, 2, VS] + [IMG] * 6 + [VE, 5] + [VS] + [VID] * 4 + [VE, 7] + [VS] + [VID] * 4
                       + [VE, 8, 9, VS] + [IMG] * 16 + [VE, 3])
    image_grid, video_grid = torch.tensor([[1, 4, 6], [1, 8, 8]]), torch.tensor([[2, 4, 4]])
    tt = torch.zeros_like(ids)
    tt[ids == IMG], tt[ids == VID] = 1, 2
    theirs, _ = hf.model.get_rope_index(ids[None], tt[None], image_grid, video_grid.clone())
    assert torch.equal(contract.position_ids(ids, image_grid, video_grid), theirs[:, 0])
    text_only = args_from_hf_config(tiny_config(False, text_only=True))
    c = family_of(text_only).data(text_only)
    assert c.vision is None and torch.equal(c.position_ids(ids[:5], None, None), torch.arange(5).expand(3, 5))


def test_a_released_config_json_is_read_strictly() -> None:
    """The keys of a released Qwen3.5-MoE config.json (a verbatim copy of a Qwen3.5-35B-A3B fine-tune's, see
    presets.py): top-level hidden_size and special ids, mtp / mamba_ssm_dtype / attn_output_gate in the text
    config, an empty deepstack_visual_indexes in the vision config."""
    from rynnscale.models import preset_config

    published = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"], "bos_token_id": None, "dtype": "bfloat16",
        "eos_token_id": 248046, "hidden_size": 2048, "image_token_id": 248056, "model_type": "qwen3_5_moe",
        "pad_token_id": 248044, "tie_word_embeddings": False, "transformers_version": "5.13.0.dev0",
        "video_token_id": 248057, "vision_end_token_id": 248054, "vision_start_token_id": 248053,
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "attn_output_gate": True, "bos_token_id": 248044,
            "dtype": "bfloat16", "eos_token_id": 248044, "full_attention_interval": 4, "head_dim": 256,
            "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"], "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
            "linear_value_head_dim": 128, "mamba_ssm_dtype": "float32", "max_position_embeddings": 262144,
            "model_type": "qwen3_5_moe_text", "moe_intermediate_size": 512, "mtp_num_hidden_layers": 1,
            "mtp_use_dedicated_embeddings": False, "num_attention_heads": 16, "num_experts": 256,
            "num_experts_per_tok": 8, "num_hidden_layers": 4, "num_key_value_heads": 2, "output_router_logits": False,
            "pad_token_id": 248044, "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06,
            "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "partial_rotary_factor": 0.25,
                                "rope_theta": 10000000, "rope_type": "default"},
            "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 512, "tie_word_embeddings": False,
            "use_cache": False, "vocab_size": 248320},
        "vision_config": {
            "deepstack_visual_indexes": [], "depth": 27, "dtype": "bfloat16", "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 1152, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304,
            "model_type": "qwen3_5_moe_vision", "num_heads": 16, "num_position_embeddings": 2304,
            "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
    }
    args = args_from_hf_config(published, strict=True)
    preset = preset_config("qwen3.5-35b-a3b")
    preset["text_config"].update(num_hidden_layers=4, layer_types=preset["text_config"]["layer_types"][:4])
    assert args == args_from_hf_config(preset, strict=True)
    with pytest.raises(ArchConfigError, match="deepstack_visual_indexes"):
        args_from_hf_config({**published, "vision_config": {**published["vision_config"],
                                                             "deepstack_visual_indexes": [8]}})
    with pytest.raises(ArchConfigError, match="hidden_size"):
        args_from_hf_config({**published, "hidden_size": 4096})
