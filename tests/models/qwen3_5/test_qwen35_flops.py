"""Qwen3.5's model FLOPs (``rynnscale/models/qwen3_5/flops.py``) against a hand count written from the dimensions
(exact, integers in float64), and against torch's FlopCounterMode over a real forward of the packed row.

torch counts the matmuls the code executes: ours minus what it does not see -- the depthwise convolution (ours:
element-wise shifted products) and the triangular solve of the chunked delta rule (no counter formula) -- with
causal softmax attention counted as full (2 x ours). Forward only: the backward of a triangular solve is partly
matmuls, which would blur the comparison; the backward is 2 x forward in our count by definition."""

from __future__ import annotations

import math

import torch
from qwen35_helpers import make_samples, pack, tiny_config
from torch.utils.flop_counter import FlopCounterMode

from rynnscale.models import args_from_hf_config, family_of
from rynnscale.models.qwen3_5.flops import gdn_macs_per_token_head
from rynnscale.models.qwen3_5.gated_delta import CHUNK
from rynnscale.models.qwen3_5.model import new_model
from rynnscale.models.stats import batch_flops, param_stats


def test_hand_count_tiny_moe_vl() -> None:
    args = args_from_hf_config(tiny_config(True))
    with torch.device("meta"):
        st = param_stats(new_model(args))
    grid = torch.tensor([[1, 4, 6], [2, 4, 4]])
    f = family_of(args).step_flops(args, st, [10, 70], grid)
    H, V, Hq, Hkv, d = 64, 300, 4, 2, 32
    Hk, Hv, dk, dv, K = 2, 4, 16, 8, 4
    E, k, I_moe, I_shared = 8, 2, 32, 48
    conv = 2 * Hk * dk + Hv * dv
    linear_layer = H * conv + conv * K + H * Hv * dv + 2 * H * Hv + Hv * dv * H   # in_proj_*, conv, out_proj
    full_layer = H * 2 * Hq * d + 2 * H * Hkv * d + Hq * d * H
    mlp = H * E + k * 3 * H * I_moe + 3 * H * I_shared + H
    assert f.text_linear == 6 * (3 * (linear_layer + mlp) + full_layer + mlp) * 80
    assert f.lm_head == 6 * V * H * 80
    padded = 64 + 128
    m = 3 * dk * dv + CHUNK * (2 * dk + dv) + CHUNK * (dk + dv) / 2
    assert f.text_attention == 6 * Hq * d * (10 ** 2 + 70 ** 2) + 6 * 3 * Hv * padded * m
    D, Iv, out_h, patch_dim, P = 32, 64, 64, 3 * 2 * 4 * 4, 24 + 32
    merger = (4 * D) ** 2 + 4 * D * out_h
    assert f.vision_linear == 6 * 2 * (4 * D * D + 2 * D * Iv) * P + 4 * patch_dim * D * P + 6 * merger * P / 4
    assert f.vision_attention == 12 * 2 * D * (24 ** 2 + 2 * 16 ** 2)
    a, b, c = family_of(args).cost_coefficients(args)
    active = 3 * linear_layer + full_layer + 4 * mlp + H * V
    assert math.isclose(a, 1 + 3 * Hv * m / active) and math.isclose(b, Hq * d / active) and c > 0


def test_forward_matches_torch_flop_counter_text_moe() -> None:
    args = args_from_hf_config(tiny_config(True, text_only=True))
    model = new_model(args, attn_backend="sdpa_mask")   # one SDPA call: counted like a full (unmasked) kernel
    model.init_weights(seed=0)
    for m in model.modules():
        if hasattr(m, "gemm_backend"):
            m.gemm_backend = "loop"
    batch = pack(make_samples(torch.Generator().manual_seed(0), multimodal=False, lengths=(11, 70, 14)))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(batch)
        model.loss_sum(batch, out, chunk_tokens=16)
    counted = counter.get_total_flops()
    st = param_stats(model)
    ours = batch_flops(args, st, batch, loss_tokens=batch.num_target_tokens)
    t, T = args.text, 95
    n_lin, n_full = 3, 1
    full_attn = 6 * n_full * t.num_attention_heads * t.head_dim * (11 ** 2 + 70 ** 2 + 14 ** 2)
    sdpa_full_row = 4 * n_full * t.num_attention_heads * T * T * t.head_dim   # sdpa_mask: the whole row, forward
    conv = 6 * n_lin * t.linear_conv_dim * t.linear_conv_kernel_dim * T
    padded = 64 + 128 + 64
    solve = 6 * n_lin * t.linear_num_value_heads * padded * CHUNK * (t.linear_key_head_dim + t.linear_value_head_dim) / 2
    expected_fwd = (ours.total - full_attn - conv - solve) / 3 + sdpa_full_row
    assert counted > 0 and gdn_macs_per_token_head(args) > 0
    assert abs(counted - expected_fwd) <= 1e-9 * expected_fwd, (counted, expected_fwd, ours.as_dict())
