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
