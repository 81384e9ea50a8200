"""The model card names the model the export holds (its config.json), whatever the recipe's source of the
architecture: a MoE model from a preset / init_from is labelled MoE, a text-only Qwen3.5 export is loaded with
AutoModelForCausalLM and tagged text-generation (not an image-text-to-text Qwen3-VL)."""

from __future__ import annotations

import json
from pathlib import Path

from rynnscale.config import load_config
from rynnscale.train.model_card import write_model_card

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SUMMARY = {"steps": 3, "tokens_seen": 300, "final_loss": 1.5}


def _card(out: Path, recipe: str, config_json: dict) -> str:
    (out / "config.json").write_text(json.dumps(config_json))
    return write_model_card(out, load_config(RECIPES / recipe, [], check_paths=False), SUMMARY).read_text()


def test_card_of_a_preset_moe_export_says_moe(tmp_path: Path) -> None:
    card = _card(tmp_path, "base/qwen3_vl_30b_a3b.yaml",
                 {"model_type": "qwen3_vl_moe", "architectures": ["Qwen3VLMoeForConditionalGeneration"]})
    assert "(MoE)" in card and "pipeline_tag: image-text-to-text" in card and "- qwen3_vl_moe\n" in card
    assert "transformers.AutoModelForImageTextToText.from_pretrained" in card


def test_card_of_a_text_only_export_loads_as_causal_lm(tmp_path: Path) -> None:
    card = _card(tmp_path, "base/qwen3_5_122b_a10b.yaml",
                 {"model_type": "qwen3_5_moe_text", "architectures": ["Qwen3_5MoeForCausalLM"]})
    assert "transformers.AutoModelForCausalLM.from_pretrained" in card and "AutoModelForImageTextToText" not in card
    assert "pipeline_tag: text-generation" in card and "- qwen3_5_moe_text\n" in card and "qwen3-vl" not in card
    assert "(MoE)" in card
