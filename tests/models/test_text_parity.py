"""Parity of our Qwen3-VL (dense and MoE) with transformers (the oracle) on tiny random configs, fp32 CPU.

HF's state dict is loaded into ours with strict=True; the same samples are run by HF one at a time
(batch 1, no padding, use_cache=False) and by us packed into ONE row. Checked:
- logits of every sample: max|diff| <= 1e-5 * max|logits|;
- loss: ours loss_sum / targets == HF's mean loss over the same targets (rel 1e-5);
- every parameter gradient: ||g_ours - g_hf|| <= 1e-4 * ||g_hf|| (and both nonzero where HF's is);
- MoE: expert counts equal HF's top-k choices, aux loss equals a float64 reference built from
  HF's router logits;
- packing: 3 samples in one row == each sample alone (text-only and multimodal), also for ours alone.
"""

from __future__ import annotations

import pytest
import torch

from rynnscale.batch import PackedBatch
from rynnscale.models.mrope import mrope_position_ids
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs, TextArgs, VisionArgs
from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

transformers = pytest.importorskip("transformers")

IMG, VID, VS, VE = 250, 251, 252, 253
PATCH_DIM = 3 * 2 * 4 * 4  # C * temporal_patch * ps * ps


def tiny_args(moe: bool, tie: bool = False) -> Qwen3VLArgs:
    return Qwen3VLArgs(
        text=TextArgs(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3],
                      rope_theta=10000.0, num_experts=8 if moe else 0, num_experts_per_tok=2,
                      moe_intermediate_size=32, mlp_only_layers=[2] if moe else [], router_aux_loss_coef=0.01),
        vision=VisionArgs(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          num_position_embeddings=16, deepstack_visual_indexes=[0, 1], patch_size=4),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
        tie_word_embeddings=tie)


def build_pair(moe: bool, tie: bool = False, seed: int = 0, args: Qwen3VLArgs | None = None):
    """HF model with randomised weights (std 0.1, norms around 1) and ours loaded from it strictly."""
    torch.manual_seed(seed)
    args = args or tiny_args(moe, tie)
    hf_cfg = args.to_hf_config()
    cfg_cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    cfg = cfg_cls(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"
    hf_cls = transformers.Qwen3VLMoeForConditionalGeneration if moe else transformers.Qwen3VLForConditionalGeneration
    hf = hf_cls(cfg).float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn_like(p))  # wide router margins: no top-k ties between implementations
            else:
                p.copy_(0.1 * torch.randn_like(p))
    ours = Qwen3VLForConditionalGeneration(args, attn_backend="loop")
    ours.load_state_dict(hf.state_dict(), strict=True)
    return args, hf, ours


def make_samples(g: torch.Generator, multimodal: bool):
    """Three samples: text only, image + 2-frame video, text + image. Each a dict of HF-style fields."""
    def text(n):
        return torch.randint(0, 200, (n,), generator=g).tolist()

    samples = [dict(ids=text(11), image_grid=None, video_grid=None)]
    if multimodal:
        samples.append(dict(ids=text(3) + [VS] + [IMG] * 6 + [VE] + text(2)
                            + text(1) + [VS] + [VID] * 4 + [VE] + text(1) + [VS] + [VID] * 4 + [VE] + text(4),
                            image_grid=torch.tensor([[1, 4, 6]]), video_grid=torch.tensor([[2, 4, 4]])))
        samples.append(dict(ids=text(2) + [VS] + [IMG] * 4 + [VE] + text(6),
                            image_grid=torch.tensor([[1, 4, 4]]), video_grid=None))
    else:
        samples += [dict(ids=text(7), image_grid=None, video_grid=None),
                    dict(ids=text(14), image_grid=None, video_grid=None)]
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


def pack(samples, merge: int = 2) -> PackedBatch:
    pos = [mrope_position_ids(s["ids"], s["image_grid"], s["video_grid"], spatial_merge_size=merge,
                              image_token_id=IMG, video_token_id=VID) for s in samples]
    lens = torch.tensor([s["ids"].numel() for s in samples])
    batch = PackedBatch(
        input_ids_l=torch.cat([s["ids"] for s in samples]),
        labels_l=torch.cat([s["labels"] for s in samples]),
        position_ids_3l=torch.cat(pos, dim=1),
        cu_seqlens=torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32),
        max_seqlen=int(lens.max()),
        pixel_values=_cat([s["pixel_values"] for s in samples]),
        image_grid_thw=_cat([s["image_grid"] for s in samples]),
        pixel_values_videos=_cat([s["pixel_values_videos"] for s in samples]),
        video_grid_thw=_cat([s["video_grid"] for s in samples]))
    batch.validate()
    return batch


def hf_forward(hf, s, moe: bool):
    ids = s["ids"]
    tt = torch.zeros_like(ids)
    tt[ids == IMG] = 1
    tt[ids == VID] = 2
    kw = dict(input_ids=ids[None], labels=s["labels"][None], use_cache=False, mm_token_type_ids=tt[None],
              pixel_values=s["pixel_values"], image_grid_thw=s["image_grid"],
              pixel_values_videos=s["pixel_values_videos"], video_grid_thw=s["video_grid"])
    if moe:
        kw["output_router_logits"] = True
    return hf(**kw)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def run_parity(moe: bool, multimodal: bool, tie: bool = False, args: Qwen3VLArgs | None = None,
               samples: list[dict] | None = None):
    args, hf, ours = build_pair(moe, tie, args=args)
    samples = samples or make_samples(torch.Generator().manual_seed(1), multimodal)
    batch = pack(samples)

    # HF, one sample at a time; loss as a sum over targets so the packed gradient is comparable
    hf_logits, hf_router, hf_loss_sum, n_targets = [], [], 0.0, 0
    for s in samples:
        out = hf_forward(hf, s, moe)
        n = int((s["labels"][1:] != -100).sum())
        ce = out.loss - args.text.router_aux_loss_coef * out.aux_loss if moe else out.loss  # HF adds aux
        hf_loss_sum = hf_loss_sum + ce * n
        n_targets += n
        hf_logits.append(out.logits[0].detach())
        if moe:
            hf_router.append([r.detach() for r in out.router_logits])
    hf_loss_sum.backward()

    out = ours(batch)
    logits = ours.logits(out.hidden_ld).detach()
    bounds = batch.cu_seqlens.tolist()
    for i, ref in enumerate(hf_logits):
        got = logits[bounds[i]:bounds[i + 1]]
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), f"sample {i} logits differ"
    loss_sum = ours.loss_sum(batch, out, chunk_tokens=8)
    assert batch.num_target_tokens == n_targets
    torch.testing.assert_close(loss_sum / n_targets, hf_loss_sum.detach() / n_targets, rtol=1e-5, atol=0)
    loss_sum.backward()

    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        ref = hf_params[name].grad
        if ref is None or float(ref.norm()) == 0.0:
            assert p.grad is None or float(p.grad.norm()) == 0.0, name
            continue
        assert p.grad is not None, f"{name} has no gradient"
        assert _rel(p.grad, ref) <= 1e-4, f"{name}: relative gradient error {_rel(p.grad, ref):.2e}"
        checked += 1
    # every decoder parameter (and, with media, every vision parameter) really received a gradient
    expected = [n for n, _ in ours.named_parameters() if multimodal or not n.startswith("model.visual.")]
    assert checked == len(expected)
    if multimodal:  # the vision tower really got gradients through both paths
        assert ours.model.visual.deepstack_merger_list[1].linear_fc2.weight.grad.norm() > 0
        assert ours.model.visual.merger.linear_fc2.weight.grad.norm() > 0

    if moe:
        check_moe_stats(args, out, hf_router)
    else:
        assert out.expert_counts is None and float(out.aux_loss) == 0.0
    return ours, batch, out


def check_moe_stats(args, out, hf_router):
    """Expert counts == HF's top-k; aux loss == float64 per-layer reference from HF's router logits."""
    E, k = args.text.num_experts, args.text.num_experts_per_tok
    moe_layers = [i for i in range(args.text.num_hidden_layers) if args.text.layer_is_moe(i)]
    assert out.expert_counts.shape == (len(moe_layers), E) and out.expert_counts.dtype == torch.long
    lbs = []
    for j in range(len(moe_layers)):
        # HF records router logits for MoE layers only, in order
        logits_te = torch.cat([r[j] for r in hf_router]).double()
        probs_te = logits_te.softmax(-1)
        counts_e = torch.bincount(probs_te.topk(k, dim=-1).indices.reshape(-1), minlength=E)
        assert torch.equal(out.expert_counts[j], counts_e)
        f_e = counts_e.double() / counts_e.sum()
        lbs.append(E * (f_e * probs_te.mean(0)).sum())
    # the model scales by top_k so the coefficient means what it means in transformers' configs
    ref = args.text.router_aux_loss_coef * k * torch.stack(lbs).mean()
    torch.testing.assert_close(out.aux_loss.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_text_parity_packed(moe):
    run_parity(moe, multimodal=False, tie=not moe)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_multimodal_parity_packed(moe):
    ours, batch, out = run_parity(moe, multimodal=True)
    # and packed == ours alone, sample by sample
    samples = make_samples(torch.Generator().manual_seed(1), multimodal=True)
    with torch.no_grad():
        packed = ours.logits(ours(batch).hidden_ld)
        bounds = batch.cu_seqlens.tolist()
        for i, s in enumerate(samples):
            alone = ours.logits(ours(pack([s])).hidden_ld)
            torch.testing.assert_close(packed[bounds[i]:bounds[i + 1]], alone, rtol=1e-5, atol=1e-5)


def non_square_samples(g: torch.Generator):
    """Text; a wide image (4 x 8 patches); a tall 2-frame video (8 x 4 patches per frame): H != W extents."""
    def text(n):
        return torch.randint(0, 200, (n,), generator=g).tolist()

    samples = [dict(ids=text(9), image_grid=None, video_grid=None),
               dict(ids=text(3) + [VS] + [IMG] * 8 + [VE] + text(4), image_grid=torch.tensor([[1, 4, 8]]),
                    video_grid=None),
               dict(ids=text(2) + [VS] + [VID] * 8 + [VE] + text(1) + [VS] + [VID] * 8 + [VE] + text(5),
                    image_grid=None, video_grid=torch.tensor([[2, 8, 4]]))]
    for s in samples:
        s["ids"] = torch.tensor(s["ids"])
        labels = s["ids"].clone()
        labels[0] = -100
        labels[(labels == IMG) | (labels == VID) | (labels == VS)] = -100
        s["labels"] = labels
        for key, grid in (("pixel_values", s["image_grid"]), ("pixel_values_videos", s["video_grid"])):
            s[key] = None if grid is None else torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g)
    return samples


@pytest.mark.parametrize("sections", [[4, 1, 3], [3, 4, 1]], ids=["h_shorter", "w_shorter"])
def test_asymmetric_mrope_sections_match_hf(sections):
    """Every other config has equal H and W rotary sections, where using one for the other is invisible; here
    they differ (head_dim 16: the sections decide which of frequencies 4, 5, 7 rotate by T, H or W) and the
    image and video grids are not square, so H and W positions differ too. rope_theta 100 keeps those
    frequencies far from zero."""
    args = tiny_args(moe=False)
    args.text.mrope_section, args.text.rope_theta = list(sections), 100.0
    run_parity(False, multimodal=True, args=args, samples=non_square_samples(torch.Generator().manual_seed(5)))


def test_errors_name_the_problem():
    args = tiny_args(moe=False)
    ours = Qwen3VLForConditionalGeneration(args, attn_backend="loop")
    ours.init_weights(0)
    samples = make_samples(torch.Generator().manual_seed(2), multimodal=True)
    bad = pack(samples[1:2])
    bad.image_grid_thw = torch.tensor([[1, 4, 4]])
    bad.pixel_values = bad.pixel_values[:16]
    with pytest.raises(ValueError, match="image_pad"):
        ours(bad)
    batch = pack(samples[:1] * 2)
    batch.labels_l[batch.cu_seqlens[1]] = 5
    with pytest.raises(ValueError, match="first token of every sample"):
        ours.loss_sum(batch, ours(batch))


def test_meta_init_and_tied_embeddings():
    args = tiny_args(moe=True, tie=True)
    with torch.device("meta"):
        m = Qwen3VLForConditionalGeneration(args)
    m.to_empty(device="cpu")
    assert m.lm_head.weight is m.model.language_model.embed_tokens.weight  # still tied before any init
    m.init_weights(seed=3)
    assert m.lm_head.weight is m.model.language_model.embed_tokens.weight
    sd = m.state_dict()
    assert float(sd["model.language_model.layers.0.input_layernorm.weight"].min()) == 1.0
    assert abs(float(sd["model.language_model.layers.0.mlp.experts.gate_up_proj"].std()) - 0.02) < 2e-3
    assert float(sd["model.visual.blocks.0.attn.qkv.bias"].abs().max()) == 0.0
    ref = Qwen3VLForConditionalGeneration(args)
    ref.init_weights(seed=3)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, sd[k]), k  # same seed -> same weights, meta or not
    samples = make_samples(torch.Generator().manual_seed(4), multimodal=False)
    out = m(pack(samples))
    assert torch.isfinite(out.hidden_ld).all() and torch.isfinite(out.aux_loss)


def _hf_text_config(args: Qwen3VLArgs, text_over: dict) -> tuple[dict, object]:
    """``args``' config.json with ``text_over`` merged into its text_config, and transformers' reading of it."""
    cfg = args.to_hf_config()
    cfg["text_config"] = {**cfg["text_config"], **text_over}
    return cfg, transformers.AutoConfig.for_model(**cfg).text_config


@pytest.mark.parametrize("kind", ["yarn", "linear", "dynamic"])
def test_scaled_rope_is_refused_naming_the_key(kind):
    """transformers builds the scaled rope of these rope_types; ours is unscaled, so reading one must fail, not drop it."""
    from rynnscale.models.spec import ArchConfigError

    rope = {"rope_type": kind, "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    cfg, _ = _hf_text_config(tiny_args(moe=False), {"rope_parameters": rope})
    with pytest.raises(ArchConfigError, match=rf"text_config\.rope_parameters\.rope_type='{kind}' is not supported"):
        Qwen3VLArgs.from_hf_config(cfg)


@pytest.mark.parametrize("text_over", [
    {"rope_theta": 1e6},                                                        # flat 4.x key left over
    {"rope_scaling": {"rope_type": "default", "rope_theta": 7e5, "mrope_section": [2, 3, 3]}},
    {"rope_theta": 1e6, "rope_parameters": {"rope_type": "default", "mrope_section": [3, 3, 2]}},
], ids=["flat_theta", "rope_scaling", "flat_theta_only"])
def test_rope_keys_resolve_as_in_transformers(text_over):
    """A config holding rope_theta / mrope_section in several places: the value transformers uses is ours."""
    cfg, hf_text = _hf_text_config(tiny_args(moe=False), text_over)
    ours = Qwen3VLArgs.from_hf_config(cfg).text
    assert ours.rope_theta == hf_text.rope_parameters["rope_theta"]
    assert ours.mrope_section == list(hf_text.rope_parameters["mrope_section"])


def test_norm_topk_prob_false_is_refused():
    """transformers' Qwen3-VL-MoE router always renormalises the top-k weights; a config asking otherwise would
    train and export a model transformers runs differently, so it is refused naming the key."""
    from rynnscale.models.spec import ArchConfigError

    cfg = tiny_args(moe=True).to_hf_config()
    assert cfg["text_config"]["norm_topk_prob"] is True and Qwen3VLArgs.from_hf_config(cfg).text.norm_topk_prob
    cfg["text_config"]["norm_topk_prob"] = False
    with pytest.raises(ArchConfigError, match=r"text_config\.norm_topk_prob=False is invalid: only true"):
        Qwen3VLArgs.from_hf_config(cfg)
