"""Model-FLOP accounting (rynnscale/models/qwen3_vl/flops.py, rynnscale/models/stats.py) against a hand count, ANCHORS.md's formula and
torch's own FlopCounterMode on a tiny multimodal MoE model.

Tolerances: the hand count and ANCHORS' formula must match exactly (integers in float64); torch's
count of the matmuls and attention actually executed in forward + backward must match ours to 1e-9
relative (ours counts causal attention as half of what torch counts for a masked kernel, and the
lm_head on the labelled rows only when told so; both adjusted explicitly below).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rynnscale.batch import PackedBatch
from rynnscale.config.schema import LoRAConfig
from rynnscale.models.mrope import mrope_position_ids
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs, TextArgs, VisionArgs
from rynnscale.models.qwen3_vl.flops import anchor_flops_per_step, step_flops
from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
from rynnscale.models.stats import batch_flops, param_stats
from rynnscale.train.build import build_model, model_config_for

IMG, VID, VS, VE = 250, 251, 252, 253


def tiny_args() -> Qwen3VLArgs:
    return Qwen3VLArgs(
        text=TextArgs(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3],
                      rope_theta=10000.0, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      mlp_only_layers=[1]),
        vision=VisionArgs(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                          num_position_embeddings=16, deepstack_visual_indexes=[0, 1], patch_size=4),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)


def test_hand_count_tiny():
    args = tiny_args()
    st = param_stats(build_model(model_config_for(args), meta=True)[1])
    grid = torch.tensor([[1, 4, 6], [2, 4, 4]])
    f = step_flops(args, st, [10, 30], grid)
    H, d, Hq, Hkv, E, k, I_moe, I_dense, V = 64, 16, 4, 2, 8, 2, 32, 96, 256
    attn = H * Hq * d + 2 * H * Hkv * d + Hq * d * H
    moe_layer = attn + H * E + k * 3 * H * I_moe
    dense_layer = attn + 3 * H * I_dense
    assert f.text_linear == 6 * (2 * moe_layer + dense_layer) * 40
    assert f.lm_head == 6 * V * H * 40
    assert f.text_attention == 6 * 3 * Hq * d * (10 ** 2 + 30 ** 2)
    D, Iv, out_h, patch_dim = 32, 48, 64, 3 * 2 * 4 * 4
    P = 24 + 32
    block = 3 * D * D + D * D + 2 * D * Iv
    merger = (4 * D) ** 2 + 4 * D * out_h
    assert f.vision_linear == 6 * 2 * block * P + 4 * patch_dim * D * P + 6 * 3 * merger * P / 4
    assert f.vision_attention == 12 * 2 * D * (24 ** 2 + 2 * 16 ** 2)
    assert f.total == f.decoder + f.vision
    # labelled-rows variant only changes the lm_head
    assert step_flops(args, st, [10, 30], grid, loss_tokens=7).lm_head == 6 * V * H * 7
    # the vision pieces we subtract as non-matmul are exactly what param_stats counted besides them
    pos_embed = 16 * D
    merger_non_matmul = 3 * (4 * D + out_h) + D * 2 + 2 * (2 * 4 * D)  # fc biases, final norm (D), deepstack norms (4D)
    assert st.vision_other == patch_dim * D + D + pos_embed + 3 * merger + merger_non_matmul


@pytest.mark.parametrize("moe", [True, False])
def test_matches_anchor_formula_unpacked_rows(moe):
    """A3B slice / 8B-dense slice at their real widths (meta device): 4 x 4096 unpacked rows."""
    text = dict(vocab_size=151936, num_hidden_layers=8, num_attention_heads=32, head_dim=128)
    if moe:
        text |= dict(hidden_size=2048, num_key_value_heads=4, num_experts=128, num_experts_per_tok=8,
                     moe_intermediate_size=768)
    else:
        text |= dict(hidden_size=4096, num_key_value_heads=8, intermediate_size=12288)
    args = Qwen3VLArgs(text=TextArgs(**text), vision=VisionArgs(depth=2, out_hidden_size=text["hidden_size"],
                                                                  deepstack_visual_indexes=[0, 1]))
    st = param_stats(build_model(model_config_for(args), meta=True)[1])
    ours = step_flops(args, st, [4096] * 4)
    assert ours.total == anchor_flops_per_step(args, 4, 4096)
    if moe:  # ANCHORS: 319.2 TFLOP/s at 59,074 tokens/s -> 5.40 TFLOP per 16k-token step
        assert math.isclose(ours.total / 1e12, 319.2 / 59074 * 16384, rel_tol=2e-3)
    else:    # 561.8 TFLOP/s at 40,710 tokens/s
        assert math.isclose(ours.total / 1e12, 561.8 / 40710 * 16384, rel_tol=2e-3)


def _shape_flops(q_shape, k_shape) -> int:
    """QK^T + PV of one (unmasked) attention call: 2 matmuls x 2 FLOPs per MAC."""
    batch = math.prod(q_shape[:-2])
    return 4 * batch * q_shape[-2] * k_shape[-2] * q_shape[-1]


def _cpu_sdpa_mapping():
    """torch's FlopCounterMode has no formula for the CPU flash-attention kernel; count it like the
    CUDA ones (no causal discount, backward = 2 x forward)."""
    aten = torch.ops.aten

    def fwd(q, k, v, *args, out_shape=None, **kwargs):
        return _shape_flops(q, k)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return 2 * _shape_flops(q, k)

    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


def _batch(args: Qwen3VLArgs, g: torch.Generator) -> PackedBatch:
    def text(n):
        return torch.randint(0, 200, (n,), generator=g).tolist()

    docs = [
        (text(9), None, None),
        (text(3) + [VS] + [IMG] * 6 + [VE] + text(2) + [VS] + [VID] * 4 + [VE] + text(1) + [VS] + [VID] * 4
         + [VE] + text(5), torch.tensor([[1, 4, 6]]), torch.tensor([[2, 4, 4]])),
        (text(17), None, None),
    ]
    ids, labels, pos, igrid, vgrid = [], [], [], [], []
    for toks, ig, vg in docs:
        t = torch.tensor(toks)
        lab = t.clone()
        lab[0] = -100
        ids.append(t)
        labels.append(lab)
        pos.append(mrope_position_ids(t, ig, vg, spatial_merge_size=2, image_token_id=IMG, video_token_id=VID))
        igrid += [ig] if ig is not None else []
        vgrid += [vg] if vg is not None else []
    lens = torch.tensor([t.numel() for t in ids])
    ig, vg = torch.cat(igrid), torch.cat(vgrid)
    pd = 3 * 2 * 4 * 4
    b = PackedBatch(torch.cat(ids), torch.cat(labels), torch.cat(pos, 1),
                    torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32), int(lens.max()),
                    torch.randn(int(ig.prod(-1).sum()), pd, generator=g), ig,
                    torch.randn(int(vg.prod(-1).sum()), pd, generator=g), vg)
    b.validate()
    return b


def _torch_counted_flops(model, batch) -> int:
    """FLOPs of one forward + backward of the training loss, counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as counter:
        out = model(batch)
        loss = model.loss_sum(batch, out, chunk_tokens=16) / batch.num_target_tokens + out.aux_loss
        loss.backward()
    return counter.get_total_flops()


def test_matches_torch_flop_counter():
    torch.manual_seed(0)
    args = tiny_args()
    model = Qwen3VLForConditionalGeneration(args, attn_backend="loop", gemm_backend="loop")
    model.init_weights(seed=0)
    batch = _batch(args, torch.Generator().manual_seed(0))
    counted = _torch_counted_flops(model, batch)
    # the fused linear + CE runs on the rows that have a target after the shift
    st = param_stats(build_model(model_config_for(args), meta=True)[1])
    ours = batch_flops(args, st, batch, loss_tokens=batch.num_target_tokens)
    expected = ours.total + ours.text_attention  # torch counts causal attention as full: 2 x ours
    assert counted > 0
    assert abs(counted - expected) <= 1e-9 * expected, (counted, expected, ours.as_dict())
    # every part is really present in this model and batch
    assert min(ours.as_dict().values()) > 0


def test_expert_lora_factors_count_for_the_routed_tokens_only():
    """LoRA on the experts (``model.lora.experts``) gives every expert factors of its own, and a token runs through
    its top-k experts' only; the count charged every token all E experts' factors (they were counted with the dense
    weights), so model TFLOP/s and MFU of such a run read high (about +20% of the decoder's linear FLOPs on
    Qwen3-VL-30B-A3B at rank 16). torch's FlopCounterMode on the tiny model, with every parameter trainable (every
    backward matmul runs, as the count assumes), must match to 1e-9 relative."""
    from rynnscale.models.lora import LoRASpec, apply_lora
    from rynnscale.models.registry import family_of

    torch.manual_seed(0)
    args = tiny_args()
    model = Qwen3VLForConditionalGeneration(args, attn_backend="loop", gemm_backend="loop")
    model.init_weights(seed=0)
    apply_lora(model, LoRASpec(rank=4, alpha=8.0, targets=("*.q_proj",), experts=True), family_of(model).is_experts)
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():   # B = 0 at init: nonzero, so that the factors' gradients are real work
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.02)
    batch = _batch(args, torch.Generator().manual_seed(0))
    counted = _torch_counted_flops(model, batch)
    ours = batch_flops(args, param_stats(model), batch, loss_tokens=batch.num_target_tokens)
    expected = ours.total + ours.text_attention  # torch counts causal attention as full: 2 x ours
    assert abs(counted - expected) <= 1e-9 * expected, (counted, expected)


def _counted_and_ours(args, batch, **model_keys):
    """torch's count of one forward + backward of the model a recipe with ``model_keys`` (lora, freeze) builds, and
    ours as the trainer counts it (``param_stats`` of the same recipe's meta model), per-document attention ("loop")
    and per-expert GEMMs (FlopCounterMode sees them all)."""
    cfg = model_config_for(args, attn_backend="loop", **model_keys)
    model = build_model(cfg, "cpu")[1]
    for m in model.modules():
        if hasattr(m, "gemm_backend"):
            m.gemm_backend = "loop"
    counted = _torch_counted_flops(model, batch)
    ours = batch_flops(args, param_stats(build_model(cfg, meta=True)[1]), batch, loss_tokens=batch.num_target_tokens)
    return counted, ours


@pytest.mark.parametrize("keys", [
    dict(lora=LoRAConfig(rank=4, experts=True)),    # adapters on attention, dense MLP and experts; base frozen
    dict(lora=LoRAConfig(rank=4, vision=True)),     # ... and on the vision blocks
    dict(freeze=["model.visual.*"]),                # a frozen vision tower under a trained decoder
    dict(freeze=["model.visual.*", "model.language_model.embed_tokens.*", "model.language_model.layers.0.*"]),
], ids=["lora_experts", "lora_vision", "frozen_tower", "frozen_first_layer"])
def test_frozen_weights_count_what_the_backward_computes(keys):
    """A frozen weight needs no weight gradient (4 FLOPs per weight and token), nor an input gradient where nothing
    below it trains (2: forward only; attention likewise 1/3); the count charged every weight 6, so MFU of a LoRA run
    or one with a frozen vision tower read high. Against torch's FlopCounterMode on the real forward + backward of the
    tiny multimodal MoE model as the recipe builds it, 1e-9 relative (torch counts causal attention as full)."""
    torch.manual_seed(0)
    args = tiny_args()
    batch = _batch(args, torch.Generator().manual_seed(0))
    counted, ours = _counted_and_ours(args, batch, **keys)
    full = batch_flops(args, param_stats(build_model(model_config_for(args), meta=True)[1]), batch,
                       loss_tokens=batch.num_target_tokens)
    expected = ours.total + ours.text_attention
    assert ours.total < full.total
    assert abs(counted - expected) <= 1e-9 * expected, (counted, expected, ours.as_dict())



@pytest.mark.parametrize("keys", [dict(lora=LoRAConfig(rank=4, experts=True, vision=True)),
                                  dict(freeze=["model.visual.*"])], ids=["lora", "frozen_tower"])
@pytest.mark.parametrize("ac", ["full", "selective"])
def test_checkpointed_blocks_count_as_the_plain_ones(keys, ac):
    """The trainer counts the meta model its recipe builds, its blocks wrapped for activation checkpointing (the
    model's parameter names carry ``_checkpoint_wrapped_module.``; the stage patterns match names within a block):
    the frozen weights' skipped passes are those of the plain blocks, as the base recipes checkpoint. Exact."""
    args = tiny_args()
    batch = _batch(args, torch.Generator().manual_seed(0))

    def counted(**extra):
        model = build_model(model_config_for(args, **keys, **extra), meta=True)[1]
        return model, batch_flops(args, param_stats(model), batch, loss_tokens=batch.num_target_tokens)

    wrapped, ours = counted(activation_checkpointing=ac)
    assert any("_checkpoint_wrapped_module." in n for n, _ in wrapped.named_parameters())
    plain, full = counted()
    assert ours.as_dict() == full.as_dict()
    assert ours.total < batch_flops(args, param_stats(build_model(model_config_for(args), meta=True)[1]), batch,
                                    loss_tokens=batch.num_target_tokens).total

def test_trainable_tower_on_a_text_only_batch():
    """Vision adapters (``model.lora.vision``) make the decoder's input need a gradient only on a batch that runs the
    tower: on a text-only row the first layer's q / k / v take no input gradient. torch, 1e-9 relative."""
    args = tiny_args()
    b = _batch(args, torch.Generator().manual_seed(0))
    n = int(b.cu_seqlens[1])   # the first document: text only
    text = PackedBatch(b.input_ids_l[:n], b.labels_l[:n], b.position_ids_3l[:, :n], b.cu_seqlens[:2], n)
    counted, ours = _counted_and_ours(args, text, lora=LoRAConfig(rank=4, vision=True))
    expected = ours.total + ours.text_attention
    assert ours.vision == 0
    assert abs(counted - expected) <= 1e-9 * expected, (counted, expected, ours.as_dict())


def test_frozen_weights_qwen35_hybrid_lora() -> None:
    """Qwen3.5 (hybrid DeltaNet / gated attention, MoE + shared expert, vision) under the default LoRA targets: the
    three DeltaNet layers have no adapter and nothing below them trains, so they run forward only, as does the frozen
    vision tower; the full-attention layer's adapters make everything above it need gradients. torch's FlopCounterMode
    sees every matmul but the DeltaNet layers' depthwise convolution (element-wise shifted products here) and the
    delta rule's triangular solve (no counter formula), forward-only here: subtracted as we count them; it counts
    causal attention as full (2 x ours). 1e-9 relative."""
    from qwen35_helpers import make_samples, pack, tiny_config

    from rynnscale.models import args_from_hf_config
    from rynnscale.models.qwen3_5.gated_delta import CHUNK

    torch.manual_seed(0)
    args = args_from_hf_config(tiny_config(True))
    batch = pack(make_samples(torch.Generator().manual_seed(0), multimodal=True))
    counted, ours = _counted_and_ours(args, batch, lora=LoRAConfig(rank=4))
    t = args.text
    cu = batch.cu_seqlens.tolist()
    lens = [b - a for a, b in zip(cu, cu[1:])]
    n_lin, T = t.num_linear_layers, sum(lens)
    assert n_lin == 3 and t.num_hidden_layers == 4
    full_attn = 6 * t.num_attention_heads * t.head_dim * sum(s * s for s in lens)   # one layer, with its backward
    conv_fwd = 2 * n_lin * t.linear_conv_dim * t.linear_conv_kernel_dim * T
    padded = sum(CHUNK * math.ceil(s / CHUNK) for s in lens)
    solve_fwd = 2 * n_lin * t.linear_num_value_heads * padded * CHUNK * (t.linear_key_head_dim + t.linear_value_head_dim) / 2
    expected = ours.total + full_attn - conv_fwd - solve_fwd
    assert abs(counted - expected) <= 1e-9 * expected, (counted, expected, ours.as_dict())


def test_step_flops_meter_counts_real_micro_batches_once_per_cp_group() -> None:
    """The trainer's model TFLOP/s and MFU (metrics.jsonl): the family's FLOPs of the rank's real micro-batches,
    none for fillers nor for ranks other than the first of a context-parallel group."""
    from rynnscale.batch import filler_batch
    from rynnscale.train.metrics import StepFlopsMeter

    args = tiny_args()
    st = param_stats(build_model(model_config_for(args), meta=True)[1])
    batch = _batch(args, torch.Generator().manual_seed(0))
    meter = StepFlopsMeter(args, st, peak=2.0)
    assert meter.local([batch, filler_batch(), batch]) == 2 * batch_flops(args, st, batch).total
    assert meter.local([batch], cp_rank=1) == 0.0
    rec = meter.record(4e12, 2.0, world_size=2)
    assert rec == {"model_tflops_per_s": 2.0, "mfu": 0.5}
    assert StepFlopsMeter(args, st, peak=None).record(4e12, 2.0, 1)["mfu"] is None


@pytest.mark.parametrize("name,rate", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 NVL", 835.0),
                                       ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
                                       ("NVIDIA H20", 148.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H800 PCIe", 756.0),
                                       ("NVIDIA H800", 989.0), ("Tesla T4", None)])
def test_peak_rate_by_card_name(monkeypatch, name, rate):
    """MFU's denominator from the card's name (vendor's dense bf16 rate): an H100 NVL was taken for the SXM card
    (989 instead of 835 TFLOP/s, MFU 16% low), an H800 PCIe likewise (989 for 756); an unknown card gives None (MFU not logged)."""
    import torch

    from rynnscale.train.metrics import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda", 0)) == rate
    assert peak_tflops(torch.device("cuda", 0), configured=500.0) == 500.0
    assert peak_tflops(torch.device("cpu")) is None


def test_unknown_card_logs_once_how_to_set_the_peak(monkeypatch, caplog):
    """A card missing from the rate table gave mfu null without a word: the run's log must name the card and the
    setting, once (not every step), and say nothing for a known card or a configured rate."""
    import logging

    from rynnscale.train import metrics

    monkeypatch.setattr(metrics, "_UNKNOWN_CARDS_LOGGED", set())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX PRO 6000 Blackwell")
    dev = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        assert metrics.peak_tflops(dev) is None
        assert metrics.peak_tflops(dev) is None
        assert metrics.peak_tflops(dev, configured=400.0) == 400.0
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "RTX PRO 6000 Blackwell" in msgs[0] and "logging.peak_tflops" in msgs[0], msgs
    caplog.clear()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        assert metrics.peak_tflops(dev) == 989.0
    assert not caplog.records
