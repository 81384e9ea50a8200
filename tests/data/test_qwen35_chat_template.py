"""Qwen3.5 conversations -> tokens against Qwen3.5's own chat template (trl's ``chat_templates/qwen3_5_nothink.jinja``,
rendered by transformers' ``apply_chat_template`` and tokenised by transformers' tokenizer): text, image,
multi-turn, system prompt, reasoning in ``<think>`` tags / ``reasoning_content`` and none, white space around
content. Every token equal; the labelled tokens are the answer (with its reasoning when it has one) and
``<|im_end|>``, so the prompt before them is the template's generation prompt (thinking or not).

Videos are left out: Qwen3.5's processor is ``Qwen3VLProcessor`` (transformers' auto mapping), whose expansion of a
video placeholder ``tests/data/test_hf_processor_parity.py`` checks."""

from __future__ import annotations

import dataclasses
import importlib.resources
import io
import json

import numpy as np
import pytest
from PIL import Image

from rynnscale.batch import IGNORE_INDEX
from rynnscale.data.encode import EncoderConfig, SampleEncoder, SampleError
from rynnscale.data.tokenizer import default_tokenizer_dir, load_tokenizer
from rynnscale.models import args_from_hf_config, family_of

transformers = pytest.importorskip("transformers")
# the oracle: trl's copy of the template the Qwen3.5-2B and smaller checkpoints ship (trl's README; 4B and larger
# ship it with thinking on by default, the only difference), read from the installed trl (a test dependency)
TEMPLATE = (importlib.resources.files("trl") / "chat_templates" / "qwen3_5_nothink.jinja").read_text()
IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
TEXT = dict(vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, layer_types=["linear_attention"] * 3 + ["full_attention"])


def encoder(text_only: bool = False) -> SampleEncoder:
    """Qwen3.5's data contract over the bundled Qwen3 tokenizer (a text-only one with that tokenizer's vision ids:
    a text-only config has none, and Qwen3.5's defaults are its own tokenizer's)."""
    cfg = ({"model_type": "qwen3_5_text", **TEXT} if text_only else
           {"model_type": "qwen3_5", "text_config": TEXT, **IDS,
            "vision_config": {"depth": 1, "hidden_size": 32, "num_heads": 2, "out_hidden_size": 64}})
    args = args_from_hf_config(cfg)
    contract = dataclasses.replace(family_of(args).data(args), **IDS)
    return SampleEncoder(load_tokenizer(None), EncoderConfig(), contract)


@pytest.fixture(scope="module")
def hf_tok():
    return transformers.AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))


def jpeg(h: int = 64, w: int = 96) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def template_messages(conv: list[dict]) -> list[dict]:
    """Our conv.json messages as the template takes them (an image item is ``{"type": "image"}``)."""
    out = []
    for m in conv:
        c = m["content"]
        if isinstance(c, list):
            c = [{"type": "image"} if "image" in it else {"type": "text", "text": it["text"]} for it in c]
        out.append({**m, "content": c})
    return out


def template_ids(hf_tok, conv: list[dict], image_pads: int = 0, **kw) -> list[int]:
    text = hf_tok.apply_chat_template(template_messages(conv), chat_template=TEMPLATE, tokenize=False, **kw)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * image_pads)   # the processor's expansion
    return hf_tok(text, add_special_tokens=False)["input_ids"]


THINK = "<think>\nLet me look: 3 apples, then 2 more.\n</think>\n\n"
CONVERSATIONS = {
    "system-and-text": [{"role": "system", "content": "  You are RynnBrain.\n"},
                        {"role": "user", "content": " How many apples? \n"},
                        {"role": "assistant", "content": "Five apples. "}],
    "think-tags": [{"role": "user", "content": "How many apples?"},
                   {"role": "assistant", "content": THINK + "  Five."}],
    "reasoning-content": [{"role": "user", "content": "How many apples?"},
                          {"role": "assistant", "content": "Five.", "reasoning_content": "\n3 + 2 = 5\n"}],
    "multi-turn": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "How many apples?"},
                   {"role": "assistant", "content": THINK + "Five."},
                   {"role": "user", "content": [{"type": "text", "text": " And pears? "}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "Two"}, {"type": "text", "text": "."}]},
                   {"role": "user", "content": "Sure?"},
                   {"role": "assistant", "content": "<think>\nYes.\n</think>\n\nSure."}],
    "image": [{"role": "user", "content": [{"type": "text", "text": "  "}, {"type": "image", "image": "a.jpg"},
                                           {"type": "text", "text": " Where is the cup?\n"}]},
              {"role": "assistant", "content": "On the table."}],
    "image-last": [{"role": "user", "content": [{"type": "text", "text": "\nLook: "},
                                                {"type": "image", "image": "a.jpg"}]},
                   {"role": "assistant", "content": THINK + "A cup."}],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_tokens_equal_the_qwen35_template(hf_tok, name: str) -> None:
    conv = CONVERSATIONS[name]
    media = {"a.jpg": jpeg()} if "image" in name else {}
    out = encoder().encode(name, {"conv.json": json.dumps({"conversation": conv}).encode(), **media})
    pads = int(out.image_grid_thw.prod(-1).sum()) // 4 if out.image_grid_thw is not None else 0
    assert out.input_ids_l.tolist() == template_ids(hf_tok, conv, pads)

    # the last turn's labels: its answer (and reasoning) + <|im_end|>; what comes before is the generation prompt
    labels = out.labels_l.tolist()
    last_user = max(i for i, m in enumerate(conv) if m["role"] == "user")
    prompt = template_ids(hf_tok, conv[:last_user + 1], pads, add_generation_prompt=True,
                          enable_thinking="<think>" in json.dumps(conv[-1]) or "reasoning_content" in conv[-1])
    assert all(t == IGNORE_INDEX for t in labels[len(prompt) - 2:len(prompt)]) and labels[len(prompt)] != IGNORE_INDEX
    assert labels[len(prompt):] == out.input_ids_l.tolist()[len(prompt):-1] + [IGNORE_INDEX]
    assert out.input_ids_l.tolist()[:len(prompt)] == prompt


def test_text_only_qwen35_renders_the_same_and_a_conversation_without_a_user_is_refused(hf_tok) -> None:
    conv = CONVERSATIONS["multi-turn"]
    out = encoder(text_only=True).encode("t", {"conv.json": json.dumps({"conversation": conv}).encode()})
    assert out.input_ids_l.tolist() == template_ids(hf_tok, conv)
    lone = [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(SampleError, match="needs a user query"):
        encoder(text_only=True).encode("lone", {"conv.json": json.dumps({"conversation": lone}).encode()})



def test_schema_takes_reasoning_content_in_assistant_turns_only() -> None:
    from rynnscale.data.schema import SchemaError, validate_conv

    def conv(role: str, reasoning) -> dict:
        return {"conversation": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                                 {"role": role, "content": [{"type": "text", "text": "a"}],
                                  "reasoning_content": reasoning}]}

    assert validate_conv(conv("assistant", "r"))[1]["reasoning_content"] == "r"
    for role, reasoning in (("user", "r"), ("assistant", 3)):
        with pytest.raises(SchemaError, match=r"conversation\[1\]: reasoning_content: must be a string, in an assistant"):
            validate_conv(conv(role, reasoning))
