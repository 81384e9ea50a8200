"""Tiny Qwen3.5 / Qwen3.5-MoE configs, transformers models with randomised weights (the oracle) and our models
loaded from them, and packed rows of text / image / video samples: shared by the tests of the Qwen3.5 family."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from rynnscale.batch import PackedBatch
from rynnscale.data.tokenizer import default_tokenizer_dir
from rynnscale.models import args_from_hf_config
from rynnscale.models.mrope import mrope_position_ids

IMG, VID, VS, VE = 250, 251, 252, 253
PATCH = 4
PATCH_DIM = 3 * 2 * PATCH * PATCH  # C * temporal_patch * ps * ps

TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
            linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                             "mrope_section": [2, 1, 1], "mrope_interleaved": True})
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
           router_aux_loss_coef=0.01)
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=PATCH,
              num_position_embeddings=16)


def tiny_config(moe: bool, tie: bool = False, text_only: bool = False, **text_overrides) -> dict:
    """A config.json dict of a tiny Qwen3.5 (``moe``: Qwen3.5-MoE; ``text_only``: ``qwen3_5(_moe)_text``)."""
    text = copy.deepcopy(TEXT) | (copy.deepcopy(MOE) if moe else {}) | text_overrides
    kind = "qwen3_5_moe" if moe else "qwen3_5"
    if text_only:
        return {"model_type": f"{kind}_text", **text, "tie_word_embeddings": tie}
    return {"model_type": kind, "text_config": text, "vision_config": dict(VISION), "image_token_id": IMG,
            "video_token_id": VID, "vision_start_token_id": VS, "vision_end_token_id": VE,
            "tie_word_embeddings": tie}


def hf_model(cfg: dict, seed: int = 0):
    """transformers' model of ``cfg`` in fp32 (eager attention), weights randomised so every part matters:
    linear / embedding weights 0.05 N(0, 1), convolutions 0.15 N(0, 1), zero-centred norms 0.1 N(0, 1), other norms
    1 + 0.1 N(0, 1), routers N(0, 1) (wide margins: no top-k ties between implementations), dt_bias 0.5 N(0, 1),
    A_log as transformers initialises it. (At 0.1 N(0, 1) linear weights the fp32 model itself is ~1e-5 from its
    float64 value, so a 1e-5 comparison would measure the conditioning, not the implementation.)"""
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**cfg)
    config._attn_implementation = "eager"
    if cfg["model_type"].endswith("_text"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    else:
        hf = transformers.AutoModelForImageTextToText.from_config(config)
    hf = hf.float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("A_log"):
                continue
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn_like(p))
            elif "visual" in name and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("conv1d.weight"):
                p.copy_(0.15 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return hf.eval()


def build_pair(cfg: dict, seed: int = 0, attn_backend: str = "loop"):
    """(args, transformers model, our model loaded from its state dict with strict=True)."""
    from rynnscale.models.qwen3_5.model import new_model

    hf = hf_model(cfg, seed)
    args = args_from_hf_config(cfg)
    ours = new_model(args, attn_backend=attn_backend)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return args, hf, ours.eval()


def text_sample(g: torch.Generator, n: int) -> dict:
    return dict(ids=torch.randint(0, 200, (n,), generator=g).tolist(), image_grid=None, video_grid=None)


def make_samples(g: torch.Generator, multimodal: bool, lengths: tuple[int, ...] = (11, 70, 14)) -> list[dict]:
    """Three samples. Text only: of ``lengths`` tokens (70 crosses a DeltaNet chunk of 64). Multimodal: a text
    sample of lengths[1], an image + a 2-frame video (timestamps as text between frames), text + image."""
    def text(n):
        return torch.randint(0, 200, (n,), generator=g).tolist()

    if multimodal:
        samples = [text_sample(g, lengths[1]),
                   dict(ids=text(3) + [VS] + [IMG] * 6 + [VE] + text(2) + text(1) + [VS] + [VID] * 4 + [VE]
                        + text(1) + [VS] + [VID] * 4 + [VE] + text(4),
                        image_grid=torch.tensor([[1, 4, 6]]), video_grid=torch.tensor([[2, 4, 4]])),
                   dict(ids=text(2) + [VS] + [IMG] * 4 + [VE] + text(66), image_grid=torch.tensor([[1, 4, 4]]),
                        video_grid=None)]
    else:
        samples = [text_sample(g, n) for n in lengths]
    for s in samples:
        s["ids"] = torch.tensor(s["ids"])
        labels = s["ids"].clone()
        labels[0] = -100
        labels[(labels == IMG) | (labels == VID) | (labels == VS)] = -100
        s["labels"] = labels
        s["pixel_values"] = None if s["image_grid"] is None else \
            torch.randn(int(s["image_grid"].prod(-1).sum()), PATCH_DIM, generator=g)
        s["pixel_values_videos"] = None if s["video_grid"] is None else \
            torch.randn(int(s["video_grid"].prod(-1).sum()), PATCH_DIM, generator=g)
    return samples


def _cat(xs):
    xs = [x for x in xs if x is not None]
    return torch.cat(xs) if xs else None


def pack(samples: list[dict], merge: int = 2) -> PackedBatch:
    pos = [mrope_position_ids(s["ids"], s["image_grid"], s["video_grid"], spatial_merge_size=merge,
                              image_token_id=IMG, video_token_id=VID) for s in samples]
    lens = torch.tensor([s["ids"].numel() for s in samples])
    batch = PackedBatch(
        input_ids_l=torch.cat([s["ids"] for s in samples]), labels_l=torch.cat([s["labels"] for s in samples]),
        position_ids_3l=torch.cat(pos, dim=1),
        cu_seqlens=torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32), max_seqlen=int(lens.max()),
        pixel_values=_cat([s["pixel_values"] for s in samples]), image_grid_thw=_cat([s["image_grid"] for s in samples]),
        pixel_values_videos=_cat([s["pixel_values_videos"] for s in samples]),
        video_grid_thw=_cat([s["video_grid"] for s in samples]))
    batch.validate()
    return batch


def hf_forward(hf, s: dict):
    """transformers' output on one sample (batch of one, no padding, no cache), with its mean loss."""
    ids = s["ids"]
    kw = dict(input_ids=ids[None], labels=s["labels"][None], use_cache=False)
    if s["image_grid"] is not None or s["video_grid"] is not None or hasattr(hf.model, "visual"):
        tt = torch.zeros_like(ids)
        tt[ids == IMG] = 1
        tt[ids == VID] = 2
        kw.update(mm_token_type_ids=tt[None], pixel_values=s["pixel_values"], image_grid_thw=s["image_grid"],
                  pixel_values_videos=s["pixel_values_videos"], video_grid_thw=s["video_grid"])
    return hf(**kw)


QWEN3_VL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)


def tiny_moe_dir(path: Path, **ids: int) -> Path:
    """A tiny transformers Qwen3.5-MoE directory (``save_pretrained``) with the bundled Qwen3 tokenizer, whose
    special token ids the config's vision ids match (Qwen3-VL's), vocabulary 151,936."""
    cfg = tiny_config(True, tie=True)
    cfg["text_config"].update(vocab_size=151936)
    cfg["vision_config"].update(patch_size=16)
    cfg.update(QWEN3_VL_IDS | ids)
    hf_model(cfg).save_pretrained(path)
    for f in default_tokenizer_dir().iterdir():
        shutil.copy(f, path / f.name)
    return path
