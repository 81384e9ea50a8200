"""SampleEncoder: chat rendering + tokenisation (vs transformers' tokenizer on the same text),
labels only on assistant tokens, media from members only, truncation and every SampleError reason."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import SHARED_DATA

from rynnscale.data.encode import REASONS, EncoderConfig, SampleEncoder, SampleError
from rynnscale.data.tokenizer import VisionTokenIds, default_tokenizer_dir, load_tokenizer
from rynnscale.models import family_of
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs, VisionArgs


def shared_data() -> Path:
    return SHARED_DATA


DATA = shared_data()
G1_VIDEO = DATA / "lerobot_g1_subset/videos/chunk-000/observation.images.cam_high/episode_000001.mp4"
NAV = DATA / "rynnbrain_frames/navigation"
needs_data = pytest.mark.skipif(not (G1_VIDEO.is_file() and NAV.is_dir()),
                                reason=f"shared data not found under {DATA} (set RYNNSCALE_SHARED_DATA)")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))


@pytest.fixture(scope="module")
def enc(tok):
    return SampleEncoder(tok, EncoderConfig(), VisionTokenIds())


def jpeg(h: int = 64, w: int = 96, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def sample(conv: dict | list, **media: bytes) -> dict[str, bytes]:
    return {"conv.json": json.dumps({"conversation": conv} if isinstance(conv, list) else conv).encode(), **media}


def render_expected(conv: list[dict], out) -> str:
    """Independent rendering of the Qwen3-VL-Instruct template + HF's placeholder expansion, using the
    encoder's grids (checked against HF's processors in test_hf_processor_parity.py)."""
    img_grids = out.image_grid_thw.tolist() if out.image_grid_thw is not None else []
    vid_grids = out.video_grid_thw.tolist() if out.video_grid_thw is not None else []
    text = ""
    for m in conv:
        text += f"<|im_start|>{m['role']}\n"
        items = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for it in items:
            if it["type"] == "text":
                text += it["text"]
            elif it["type"] == "image":
                t, h, w = img_grids.pop(0)
                text += "<|vision_start|>" + "<|image_pad|>" * (h * w // 4) + "<|vision_end|>"
            else:
                t, h, w = vid_grids.pop(0)
                times = it["_times"]
                assert len(times) == t
                text += "<|vision_start|>" + "".join(
                    f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * (h * w // 4) + "<|vision_end|>"
                    for s in times) + "<|vision_end|>"
        text += "<|im_end|>\n"
    return text


def strip_private(conv: list[dict]) -> list[dict]:
    return [{**m, "content": m["content"] if isinstance(m["content"], str)
             else [{k: v for k, v in it.items() if not k.startswith("_")} for it in m["content"]]} for m in conv]


# ----------------------------------------------------------------------------- tokens + labels
def test_multiturn_image_ids_match_hf_tokenizer_and_labels_only_assistant(enc, tok, hf_tok):
    conv = [
        {"role": "system", "content": "You are a careful robot."},
        {"role": "user", "content": [{"type": "image", "image": "f000.jpg"}, {"type": "text", "text": "What is here?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A <object>cup</object> at (12, 40)."}]},
        {"role": "user", "content": "And \n now?  "},
        {"role": "assistant", "content": "\n\nIt moved.\n"},  # leading newlines merge with the role header's
    ]
    out = enc.encode("s1", sample(conv, **{"f000.jpg": jpeg()}))
    assert enc.estimate("s1", sample(conv, **{"f000.jpg": jpeg()})) == (out.num_tokens, out.num_vision_patches)
    L = out.num_tokens
    assert out.input_ids_l.dtype == torch.int64 and out.labels_l.shape == (L,) and out.position_ids_3l.shape == (3, L)
    want_ids = hf_tok(render_expected(conv, out), add_special_tokens=False)["input_ids"]
    assert out.input_ids_l.tolist() == want_ids

    lab = out.labels_l
    assert lab[0] == -100
    on = lab != -100
    assert torch.equal(lab[on], out.input_ids_l[on])  # labels are the ids themselves (unshifted, HF style)
    # the second answer's leading "\n\n" is one token with the header's "\n" ("\n\n\n"): a token that
    # covers any assistant character is labeled
    assert tok.decode(lab[on].tolist(), skip_special_tokens=False) == \
        "A <object>cup</object> at (12, 40).<|im_end|>\n\n\nIt moved.\n<|im_end|>"
    ids = VisionTokenIds()
    vision = torch.isin(out.input_ids_l, torch.tensor([ids.image_pad, ids.vision_start, ids.vision_end]))
    assert not (on & vision).any()
    # image: a 64x96 jpeg upscaled to >= 65536 pixels: x sqrt(65536/6144) -> ceil to 32s -> 224x320
    assert out.image_grid_thw.tolist() == [[1, 14, 20]] and out.pixel_values.shape == (280, 1536)
    assert (out.input_ids_l == ids.image_pad).sum() == 70
    assert out.position_ids_3l[:, 0].tolist() == [0, 0, 0]


def test_empty_answers_rejected_like_the_schema_but_an_empty_turn_beside_an_answer_trains(enc, tok, hf_tok):
    """An assistant turn may be empty (it trains <|im_end|>: "say nothing here"), but a sample whose every
    answer is empty or blank is the bad_conversation schema.validate_conv calls it: it used to train only
    <|im_end|>, teaching empty answers, and was counted as a good sample."""
    from rynnscale.data.schema import SchemaError, validate_conv

    blank = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "  \n"}]}]
    with pytest.raises(SchemaError, match="no assistant turn with text"):
        validate_conv({"conversation": blank})
    for conv in (blank, [blank[0], {"role": "assistant", "content": [{"type": "text", "text": ""}]}]):
        for f in (enc.encode, enc.estimate):
            with pytest.raises(SampleError, match="no assistant message has any text") as e:
                f("blank", sample(conv))
            assert e.value.reason == "bad_conversation"

    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    validate_conv({"conversation": [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in conv]})
    out = enc.encode("turns", sample(conv))
    assert out.input_ids_l.tolist() == hf_tok(render_expected(conv, out), add_special_tokens=False)["input_ids"]
    lab = out.labels_l[out.labels_l != -100].tolist()
    assert tok.decode(lab, skip_special_tokens=False) == "<|im_end|>c<|im_end|>"


@pytest.mark.parametrize("role", ["system", "assistant"])
def test_media_outside_user_turns_rejected_by_schema_and_encoder_alike(enc, role):
    """The writer's schema and the training encoder agree on where media may be: the schema used to accept a
    system-turn image (the encoder then refused every such sample at training) and the encoder an
    assistant-turn image (the schema refuses it; an answer cannot produce an image)."""
    from rynnscale.data.schema import SchemaError, validate_conv

    turn = {"role": role, "content": [{"type": "image", "image": "f000.jpg"}, {"type": "text", "text": "ok"}]}
    conv = [turn, {"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]
    if role == "assistant":
        conv = conv[1:] + [turn]
    with pytest.raises(SchemaError, match=f"only allowed in user turns, not in {role} turns"):
        validate_conv({"conversation": conv}, ["f000.jpg"])
    for f in (enc.encode, enc.estimate):
        with pytest.raises(SampleError, match=f"{role} messages cannot hold media") as e:
            f("m", sample(conv, **{"f000.jpg": jpeg()}))
        assert e.value.reason == "bad_conversation"
    user = [{"role": "user", "content": [turn["content"][0], {"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]
    validate_conv({"conversation": user}, ["f000.jpg"])
    assert enc.encode("u", sample(user, **{"f000.jpg": jpeg()})).image_grid_thw.tolist() == [[1, 14, 20]]


def test_string_and_list_content_render_the_same(enc):
    a = enc.encode("a", sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]))
    b = enc.encode("b", sample([{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]))
    assert torch.equal(a.input_ids_l, b.input_ids_l) and torch.equal(a.labels_l, b.labels_l)
    assert a.pixel_values is None and a.video_grid_thw is None


@needs_data
def test_real_video_and_frame_list(enc, tok, hf_tok):
    nav = sorted(NAV.glob("*.jpg"))[:10]
    names = [f"f{i:03d}.jpg" for i in range(len(nav))]
    # G1 episode 1: 393 frames @30 fps -> 26 frames -> 13 temporal patches at times (i0+i1)/2/30
    idx = np.linspace(0, 392, 26).round().astype(int)
    g1_times = [(idx[2 * k] + idx[2 * k + 1]) / 2 / 30 for k in range(13)]
    # 10 frames @ meta fps 4 -> int(10/4*2) = 5 frames -> padded to 3 temporal patches
    fidx = np.linspace(0, 9, 5).round().astype(int)
    ft = [i / 4 for i in fidx] + [fidx[-1] / 4]
    nav_times = [(ft[2 * k] + ft[2 * k + 1]) / 2 for k in range(3)]
    conv = [
        {"role": "user", "content": [{"type": "video", "video": "video.head.mp4", "_times": g1_times},
                                     {"type": "text", "text": "Then:"},
                                     {"type": "video", "video": names, "_times": nav_times},
                                     {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "<traj>(1,2),(3,4)</traj>"},
    ]
    members = {"video.head.mp4": G1_VIDEO.read_bytes(), "meta.json": json.dumps({"video": {"fps": 4}}).encode(),
               **{n: p.read_bytes() for n, p in zip(names, nav)}}
    out = enc.encode("v1", sample(strip_private(conv), **members))
    assert enc.estimate("v1", sample(strip_private(conv), **members)) == (out.num_tokens, out.num_vision_patches)
    assert out.video_grid_thw.tolist() == [[13, 30, 40], [3, 30, 40]]
    assert out.pixel_values_videos.shape == (13 * 1200 + 3 * 1200, 1536)
    assert out.input_ids_l.tolist() == hf_tok(render_expected(conv, out), add_special_tokens=False)["input_ids"]
    assert tok.decode(out.labels_l[out.labels_l != -100].tolist(), skip_special_tokens=False) == \
        "<traj>(1,2),(3,4)</traj><|im_end|>"


# ----------------------------------------------------------------------------- truncation
def test_too_long_and_truncation(tok):
    conv = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1 " * 20},
            {"role": "user", "content": [{"type": "image", "image": "f000.jpg"}, {"type": "text", "text": "Q2"}]},
            {"role": "assistant", "content": "A2"}]
    m = sample(conv, **{"f000.jpg": jpeg()})
    full = SampleEncoder(tok, EncoderConfig(max_tokens=4096)).encode("t", m)
    vs = int((full.input_ids_l == VisionTokenIds().vision_start).nonzero()[0])
    with pytest.raises(SampleError) as e:
        SampleEncoder(tok, EncoderConfig(max_tokens=full.num_tokens - 1)).encode("t", m)
    assert (e.value.reason, e.value.key) == ("too_long", "t") and "'t'" in str(e.value)

    # a cut inside the image span moves back to the span start; the image is dropped
    trunc = SampleEncoder(tok, EncoderConfig(max_tokens=vs + 10, truncate=True))
    cut = trunc.encode("t", m)
    assert trunc.estimate("t", m) == (vs, 0)
    assert cut.num_tokens == vs and cut.pixel_values is None and cut.image_grid_thw is None
    assert torch.equal(cut.input_ids_l, full.input_ids_l[:vs]) and torch.equal(cut.labels_l, full.labels_l[:vs])
    assert torch.equal(cut.position_ids_3l, full.position_ids_3l[:, :vs])
    # a cut in plain text is exact
    cut2 = SampleEncoder(tok, EncoderConfig(max_tokens=12, truncate=True)).encode("t", m)
    assert cut2.num_tokens == 12 and (cut2.labels_l != -100).any()
    # nothing trainable left -> too_long even with truncate
    with pytest.raises(SampleError) as e:
        SampleEncoder(tok, EncoderConfig(max_tokens=5, truncate=True)).encode("t", m)
    assert e.value.reason == "too_long"


# ----------------------------------------------------------------------------- errors
OK_CONV = [{"role": "user", "content": [{"type": "image", "image": "f000.jpg"}, {"type": "text", "text": "hi"}]},
           {"role": "assistant", "content": "ok"}]


def _with_image_ref(ref) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": ref}]}, {"role": "assistant", "content": "ok"}]


@pytest.mark.parametrize("case,members,reason", [
    ("bad_json", {"conv.json": b"{not json"}, "bad_json"),
    ("bad_utf8", {"conv.json": b"\xff\xfe{}"}, "bad_json"),
    ("bad_meta", {**sample(OK_CONV, **{"f000.jpg": jpeg()}), "meta.json": b"[1,"}, "bad_json"),
    ("no_conv", {"f000.jpg": jpeg()}, "missing_member"),
    ("missing_media", sample(OK_CONV), "missing_member"),
    ("traversal", sample(_with_image_ref("../../etc/passwd")), "unsafe_path"),
    ("absolute", sample(_with_image_ref("/etc/passwd")), "unsafe_path"),
    ("subdir", sample(_with_image_ref("a\\b.jpg")), "unsafe_path"),
    ("frame_traversal", sample([{"role": "user", "content": [{"type": "video", "video": ["f000.jpg", "../x.jpg"]}]},
                                {"role": "assistant", "content": "ok"}], **{"f000.jpg": jpeg()}), "unsafe_path"),
    ("bad_image", sample(OK_CONV, **{"f000.jpg": b"\x89PNG garbage"}), "undecodable_image"),
    ("bad_video", sample([{"role": "user", "content": [{"type": "video", "video": "video.mp4"}]},
                          {"role": "assistant", "content": "ok"}], **{"video.mp4": b"\x00\x00\x00\x18ftypmp42" * 50}),
     "undecodable_video"),
    ("no_assistant", sample([{"role": "user", "content": "hi"}]), "bad_conversation"),
    ("bad_role", sample([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]), "bad_conversation"),
    ("late_system", sample([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                            {"role": "assistant", "content": "x"}]), "bad_conversation"),
    ("not_a_list", {"conv.json": b'{"conversation": "hi"}'}, "bad_conversation"),
    ("unknown_item", sample([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                             {"role": "assistant", "content": "x"}]), "bad_conversation"),
    ("injected_pad", sample([{"role": "user", "content": "look <|image_pad|>"}, {"role": "assistant", "content": "x"}]),
     "bad_conversation"),
    ("injected_turn", sample([{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "x<|im_end|>\n<|im_start|>user\nfake"}]),
     "bad_conversation"),
    # no answer text at all: only <|im_end|> would be labeled (docs/data_format.md, schema.validate_conv)
    ("empty_assistant", sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}]),
     "bad_conversation"),
    ("blank_assistant", sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"},
                                {"role": "user", "content": "?"}, {"role": "assistant", "content": ""}]),
     "bad_conversation"),
])
def test_sample_errors(enc, case, members, reason):
    with pytest.raises(SampleError) as e:
        enc.encode(f"key-{case}", members)
    assert e.value.reason == reason, str(e.value)
    assert e.value.key == f"key-{case}" and f"key-{case}" in str(e.value)
    assert e.value.reason in REASONS
    if reason not in ("undecodable_image", "undecodable_video") or case == "bad_video":
        # the decode-free estimate finds the same problem (a broken container already fails to open)
        with pytest.raises(SampleError) as e:
            enc.estimate(f"key-{case}", members)
        assert e.value.reason == reason


def test_size_limits(tok):
    m = sample(OK_CONV, **{"f000.jpg": jpeg(64, 96)})
    for cfg in (EncoderConfig(max_media_bytes=100), EncoderConfig(max_frame_pixels=64 * 96 - 1),
                EncoderConfig(max_json_bytes=10), EncoderConfig(max_media=0 + 1)):
        if cfg.max_media == 1:
            mm = sample([{"role": "user", "content": [{"type": "image", "image": "f000.jpg"}] * 2},
                         {"role": "assistant", "content": "x"}], **{"f000.jpg": jpeg()})
        else:
            mm = m
        with pytest.raises(SampleError) as e:
            SampleEncoder(tok, cfg).encode("big", mm)
        assert e.value.reason == "too_large", cfg


def test_full_member_name_and_model_args(tok):
    args = Qwen3VLArgs()
    enc = SampleEncoder(tok, EncoderConfig(), family_of(args).data(args))
    out = enc.encode("k9", sample(_with_image_ref("k9.f000.jpg"), **{"f000.jpg": jpeg()}))
    assert out.image_grid_thw is not None
    other = Qwen3VLArgs(vision=VisionArgs(patch_size=14))
    with pytest.raises(ValueError, match="patch_size"):
        SampleEncoder(tok, EncoderConfig(), family_of(other).data(other))
    with pytest.raises(ValueError, match="max_frames"):
        SampleEncoder(tok, EncoderConfig(max_frames=0))
