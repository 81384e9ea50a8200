"""rynnscale.ops.fused: the torch path against independent references (float64 math, transformers'
Qwen3 RoPE), the backend choice, and -- where CUDA and liger-kernel are present -- liger's kernels
against the torch path (forward and backward, bf16 tolerances stated per test), alone and inside the
model (loss and every gradient of a tiny MoE model with kernels=liger vs kernels=torch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rynnscale.ops import fused
from rynnscale.ops.loss import linear_cross_entropy

CUDA = torch.cuda.is_available()
LIGER = CUDA and fused.liger_import_error() is None
needs_liger = pytest.mark.skipif(not LIGER, reason="needs CUDA and liger-kernel (pip install .[gpu])")


# ----------------------------------------------------------------------------- torch path (CPU)
def test_rms_norm_matches_float64_reference():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16, dtype=torch.bfloat16)
    w = torch.rand(16, dtype=torch.bfloat16) + 0.5
    y = fused.rms_norm(x, w, 1e-6)
    xd = x.double()
    ref = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * w
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=0, atol=0)  # fp32 math then one bf16 rounding == fp64 then rounding
    # the bf16 kernel upcasts internally: bitwise the explicit fp32 path (transformers' formula)
    hf_formula = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    torch.testing.assert_close(y, hf_formula, rtol=0, atol=0)
    big = torch.randn(512, 2048, dtype=torch.bfloat16) * 3
    torch.testing.assert_close(fused.rms_norm(big, torch.ones(2048, dtype=torch.bfloat16), 1e-6),
                               F.rms_norm(big.float(), (2048,), eps=1e-6).to(torch.bfloat16), rtol=0, atol=0)


def test_rotary_qk_matches_transformers():
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    torch.manual_seed(0)
    L, Hq, Hkv, D = 7, 4, 2, 8
    q, k = torch.randn(L, Hq, D), torch.randn(L, Hkv, D)
    ang = torch.randn(L, D // 2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    q_o, k_o = fused.rotary_qk(q, k, cos, sin)
    # transformers: q [B, H, L, D], cos [B, L, D]
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(q_o, q_ref[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(k_o, k_ref[0].transpose(0, 1), rtol=0, atol=0)


def test_silu_mul_packed_equals_split_halves():
    torch.manual_seed(0)
    gate_up = torch.randn(6, 2 * 10, dtype=torch.float64, requires_grad=True)
    y = fused.silu_mul_packed(gate_up)
    ref = F.silu(gate_up[:, :10]) * gate_up[:, 10:]
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(fused.silu_mul(gate_up[:, :10], gate_up[:, 10:]), ref, rtol=0, atol=0)


def test_silu_mul_backward_is_exact_and_keeps_only_its_inputs():
    """The custom backward (sigmoid recomputed) against autograd's (float64 gradcheck, and fp32 vs the
    autograd formula at 1e-6); backward keeps only gate and up (or gate|up), not silu(gate)."""
    torch.manual_seed(0)
    g = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    gu = torch.randn(5, 14, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused.silu_mul, (g, u))
    assert torch.autograd.gradcheck(fused.silu_mul_packed, (gu,))
    x = torch.randn(64, 2 * 96, requires_grad=True)
    dy = torch.randn(64, 96)
    got = torch.autograd.grad(fused.silu_mul_packed(x), x, dy)[0]
    ref = torch.autograd.grad(F.silu(x[:, :96]) * x[:, 96:], x, dy)[0]
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    xb = x.detach().to(torch.bfloat16).requires_grad_()  # half inputs: fp32 math inside, bf16 out
    got_b = torch.autograd.grad(fused.silu_mul_packed(xb), xb, dy.to(torch.bfloat16))[0]
    assert got_b.dtype == torch.bfloat16
    torch.testing.assert_close(got_b.float(), ref, rtol=2e-2, atol=2e-2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().nbytes()) or t,
                                                  lambda t: t):
        fused.silu_mul_packed(x)
    assert sum(saved) == x.untyped_storage().nbytes()  # just gate|up


def test_pick_rules_on_cpu():
    x = torch.zeros(2, 4)
    assert fused.pick("auto", x) == "torch" and fused.pick("torch", x) == "torch"
    with pytest.raises(ValueError, match="model.kernels=liger needs a CUDA device"):
        fused.pick("liger", x)
    with pytest.raises(ValueError, match="not one of"):
        fused.pick("triton", x)


def test_set_kernels_reaches_every_kernel_user():
    from test_text_parity import tiny_args

    from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
    from rynnscale.models.qwen3_vl.moe import GroupedExperts
    from rynnscale.models.qwen3_vl.text import Attention, DenseMLP, RMSNorm

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(tiny_args(moe=True))
    n = model.set_kernels("auto")
    users = [m for m in model.modules() if isinstance(m, (RMSNorm, Attention, DenseMLP, GroupedExperts))]
    assert users and all(m.kernels == "auto" for m in users) and model.lm_head.kernels == "auto"
    assert n == len(users) + 1
    with pytest.raises(ValueError, match="not one of"):
        model.set_kernels("fast")


# ----------------------------------------------------------------------------- liger vs torch (GPU)
def _grads(fn, *inputs):
    ins = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*ins)
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(1)
    sum((o.float() * torch.randn_like(o.float())).sum() for o in outs).backward()
    return [o.detach().float() for o in outs], [t.grad.float() for t in ins if t.grad is not None]


def _close(a, b, rel):
    for x, y in zip(a, b):
        err = (x - y).abs().max().item()
        assert err <= rel * y.abs().max().item() + 1e-6, (err, y.abs().max().item())


@needs_liger
@pytest.mark.gpu
def test_liger_rms_norm_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16)
    w = (torch.rand(128, device="cuda") + 0.5).to(torch.bfloat16)
    a = _grads(lambda x, w: fused.rms_norm(x, w, 1e-6, "liger"), x, w)
    b = _grads(lambda x, w: fused.rms_norm(x, w, 1e-6, "torch"), x, w)
    _close(a[0], b[0], 1e-2)  # bf16: one rounding step apart
    _close(a[1], b[1], 2e-2)  # dW sums 2,400 rows in a different order


@needs_liger
@pytest.mark.gpu
def test_liger_rotary_and_swiglu_match_torch():
    torch.manual_seed(0)
    L, Hq, Hkv, D = 333, 16, 4, 128
    q = torch.randn(L, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(L, Hkv, D, device="cuda", dtype=torch.bfloat16)
    ang = torch.randn(L, D // 2, device="cuda")
    cos = torch.cat([ang, ang], -1).cos().to(torch.bfloat16)
    sin = torch.cat([ang, ang], -1).sin().to(torch.bfloat16)
    # liger rotates in place: hand it copies, compare with the torch path on the originals
    a = _grads(lambda q, k: fused.rotary_qk(q * 1, k * 1, cos, sin, "liger"), q, k)
    b = _grads(lambda q, k: fused.rotary_qk(q, k, cos, sin, "torch"), q, k)
    _close(a[0], b[0], 1e-2)
    _close(a[1], b[1], 1e-2)
    gu = torch.randn(500, 2 * 768, device="cuda", dtype=torch.bfloat16)
    _close(*[_grads(lambda t, be=be: fused.silu_mul_packed(t, be), gu)[0] for be in ("liger", "torch")], 1e-2)
    _close(*[_grads(lambda t, be=be: fused.silu_mul_packed(t, be), gu)[1] for be in ("liger", "torch")], 1e-2)


@needs_liger
@pytest.mark.gpu
def test_liger_linear_cross_entropy_matches_torch():
    torch.manual_seed(0)
    L, H, V = 1000, 256, 5000
    h = torch.randn(L, H, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(V, H, device="cuda") * 0.05).to(torch.bfloat16)
    y = torch.randint(0, V, (L,), device="cuda")
    y[torch.rand(L, device="cuda") < 0.3] = -100
    outs = {}
    for be in ("liger", "torch"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(hh, ww, y, chunk_tokens=256, kernels=be)
        (loss * 0.5).backward()
        outs[be] = (loss.detach().float(), hh.grad.float(), ww.grad.float())
    torch.testing.assert_close(outs["liger"][0], outs["torch"][0], rtol=2e-3, atol=0)
    _close(outs["liger"][1:], outs["torch"][1:], 2e-2)


@needs_liger
@pytest.mark.gpu
def test_model_with_liger_kernels_matches_torch_kernels():
    """Tiny MoE model in bf16 on CUDA: loss rel 1e-2, every gradient max|diff| <= 5e-2 x max|grad|
    (bf16 end to end, different rounding points); exercises the in-place RoPE after liger's norms."""
    from test_text_parity import make_samples, pack, tiny_args

    from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

    batch = pack(make_samples(torch.Generator().manual_seed(7), multimodal=True)).to("cuda", float_dtype=torch.bfloat16)
    res = {}
    for be in ("liger", "torch"):
        torch.manual_seed(0)
        model = Qwen3VLForConditionalGeneration(tiny_args(moe=True)).to("cuda")
        model.init_weights(seed=5, std=0.1)
        model.to(torch.bfloat16).set_kernels(be)
        out = model(batch)
        loss = model.loss_sum(batch, out, chunk_tokens=16) + out.aux_loss
        loss.backward()
        res[be] = (loss.detach().float(), {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(res["liger"][0], res["torch"][0], rtol=1e-2, atol=0)
    assert set(res["liger"][1]) == set(res["torch"][1])
    for k, g in res["torch"][1].items():
        err = (res["liger"][1][k] - g).abs().max().item()
        assert err <= 5e-2 * g.abs().max().item() + 1e-4, (k, err)
