"""rynnscale.ops.fused: the torch path against independent references (float64 math, transformers'
Qwen3 RoPE), the backend choice, and -- where CUDA and liger-kernel are present -- liger's kernels
against the torch path (forward and backward, bf16 tolerances stated per test), alone and inside the
model (loss and every gradient of a tiny MoE model with kernels=liger vs kernels=torch)."""

from __future__ import annotations

import collections

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


@needs_liger
@pytest.mark.gpu
def test_liger_norm_and_rope_take_fp32_weights_beside_bf16_activations():
    """What single-GPU training hands liger under bf16 autocast: bf16 q / k, fp32 norm weights and fp32 cos / sin.
    Output in bf16, forward and gradients within 1e-2 x max (2e-2 for the norm weight's gradient, summed over
    2,400 rows) of float64 math on the same inputs."""
    torch.manual_seed(0)
    x = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(128, device="cuda") + 0.5
    dy = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert fused.pick("auto", x, params=(w,)) == "liger"
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fused.rms_norm(xx, ww, 1e-6, "liger")
    (y.float() * dy.float()).sum().backward()
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    y_ref = wd * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    (y_ref * dy.double()).sum().backward()
    assert y.dtype == torch.bfloat16 and ww.grad.dtype == torch.float32
    _close([y.double(), xx.grad.double()], [y_ref, xd.grad], 1e-2)
    _close([ww.grad.double()], [wd.grad], 2e-2)

    L, Hq, Hkv, D = 333, 16, 4, 128
    q = torch.randn(L, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(L, Hkv, D, device="cuda", dtype=torch.bfloat16)
    ang = torch.randn(L, D // 2, device="cuda") * 50
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert fused.pick("auto", q, k, params=(cos, sin)) == "liger"
        a = _grads(lambda q, k: fused.rotary_qk(q * 1, k * 1, cos, sin, "liger"), q, k)
    b = _grads(lambda q, k: fused.rotary_qk(q, k, cos.double(), sin.double(), "torch"), q.double(), k.double())
    _close(a[0], b[0], 1e-2)
    _close(a[1], b[1], 1e-2)


@needs_liger
@pytest.mark.gpu
def test_liger_in_single_gpu_training_matches_torch(monkeypatch):
    """The single-GPU trainer's setting on the real kernels (fp32 parameters, bf16 autocast, no FSDP): tiny MoE
    model, ``kernels=liger`` and ``auto`` against the fp32 run without autocast: loss within 1e-2 (relative), worst
    gradient error at most 1.5x + 1e-2 that of ``kernels=torch`` under the same autocast; ``auto`` runs the
    attention's q/k norms and RoPE on liger (they used to fall back to torch there)."""
    from test_text_parity import make_samples, pack, tiny_args

    from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

    backends = []
    rotary_qk = fused.rotary_qk
    monkeypatch.setattr(fused, "rotary_qk", lambda *a: backends.append(a[-1]) or rotary_qk(*a))
    batch = pack(make_samples(torch.Generator().manual_seed(7), multimodal=True)).to("cuda")
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(tiny_args(moe=True)).to("cuda")
    model.init_weights(seed=5, std=0.1)
    model.set_kernels("torch")
    out = model(batch)
    loss = model.loss_sum(batch, out, chunk_tokens=16) + out.aux_loss
    loss.backward()
    ref_loss, ref = loss.detach().float(), {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None}
    res = {}
    for kernels in ("torch", "liger", "auto"):
        model.zero_grad(set_to_none=True)
        model.set_kernels(kernels)
        backends.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch)
            loss = model.loss_sum(batch, out, chunk_tokens=16) + out.aux_loss
        loss.backward()
        res[kernels] = loss.detach().float(), {k: p.grad.float() for k, p in model.named_parameters()
                                               if p.grad is not None}
        assert set(backends) == {"torch" if kernels == "torch" else "liger"}, (kernels, backends)
    bound = 1.5 * _worst_grad_error(res["torch"][1], ref) + 1e-2   # looser than the CPU test's: real kernels
    for kernels in ("liger", "auto"):
        torch.testing.assert_close(res[kernels][0], ref_loss, rtol=1e-2, atol=0)
        assert _worst_grad_error(res[kernels][1], ref) <= bound, kernels


# ------------------------------------------------------------------ liger's calls under autocast, on the CPU
LIGER_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check_operands(calls: list, op: str, activations: tuple, params: tuple = ()) -> None:
    """The operand rule of ``rynnscale.ops.fused`` for liger-kernel 0.8.5's functions: activations of ONE
    floating dtype; weights / cos / sin in that dtype, or fp32 beside activations in the active autocast dtype
    (the single-GPU case; liger's own transformers patches hand its kernels the same under AMP)."""
    calls.append((op, tuple(t.dtype for t in (*activations, *params))))
    act = {t.dtype for t in activations}
    dtype = activations[0].dtype
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    allowed = {dtype, torch.float32} if dtype == autocast else {dtype}
    if len(act) != 1 or dtype not in LIGER_FLOATS or not {t.dtype for t in params} <= allowed:
        raise RuntimeError(f"stand-in liger {op}: operands {calls[-1][1]} break the dtype rule"
                           f" (autocast {autocast})")


def _fake_liger_modules(calls: list) -> dict:
    """Stand-ins for the liger-kernel 0.8.5 functions rynnscale calls, computing in the dtypes liger's source
    does: the Triton ones are not autocast-aware (autocast is off inside them); RMSNorm ("llama" casting) takes
    rstd in fp32, casts x / rms back to x's dtype, multiplies by the weight as it is (fp32 weights: an fp32
    product) and stores in x's dtype; RoPE loads q / k in cos / sin's dtype, rotates there and stores in q / k's
    dtype; SwiGLU takes silu in fp32, cast to up's dtype; the fused linear cross-entropy is
    ``torch.amp.custom_fwd`` (its matmuls run under the caller's autocast), loss fp32, gradients computed in its
    forward."""
    import types

    def rms_norm(x, w, eps, offset, casting_mode, in_place):
        _check_operands(calls, "rms_norm", (x,), (w,))
        assert casting_mode == "llama" and offset == 0.0
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            x_hat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
            return (x_hat * w).to(x.dtype)

    def rope(q_bhld, k_bhld, cos_bld, sin_bld):
        _check_operands(calls, "rope", (q_bhld, k_bhld), (cos_bld, sin_bld))
        assert cos_bld.dtype == sin_bld.dtype
        with torch.autocast(q_bhld.device.type, enabled=False):
            cos, sin = cos_bld[:, None], sin_bld[:, None]
            return tuple((t.to(cos.dtype) * cos + fused.rotate_half(t.to(cos.dtype)) * sin).to(t.dtype)
                         for t in (q_bhld, k_bhld))

    def silu_mul(a, b):
        _check_operands(calls, "silu_mul", (a, b))
        with torch.autocast(a.device.type, enabled=False):
            return F.silu(a.float()).to(b.dtype) * b

    def silu_mul_packed(y, in_place):
        gate, up = y.chunk(2, dim=-1)
        return silu_mul(gate, up)

    class LinearCrossEntropy(torch.autograd.Function):
        """liger computes the gradients inside its forward -- and only when ``_input`` requires grad (0.8.5: then
        the weight's too, if it requires grad; else no gradient at all) -- its backward scales them."""

        @staticmethod
        def forward(ctx, h, w, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction,
                    softcap, return_z_loss, accum_dtype):
            _check_operands(calls, "linear_cross_entropy", (h,), (w,))
            assert bias is None and ce_weight is None and reduction == "sum" and accum_dtype == torch.float32
            with torch.enable_grad():
                hh = h.detach().requires_grad_(h.requires_grad)
                ww = w.detach().requires_grad_(h.requires_grad and w.requires_grad)
                logits = hh @ ww.t()   # custom_fwd: the caller's autocast applies
                loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
                wanted = [t for t in (hh, ww) if t.requires_grad]
                grads = dict(zip(map(id, wanted), torch.autograd.grad(loss, wanted))) if wanted else {}
            ctx.grads = [grads.get(id(t)) for t in (hh, ww)]
            return loss.detach(), None, None, None

        @staticmethod
        def backward(ctx, grad_loss, *unused):
            return (*[g if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads], *[None] * 10)

    def fn(f):
        return type("Function", (), {"apply": staticmethod(f)})

    mods = {n: types.ModuleType(n) for n in ("liger_kernel", "liger_kernel.ops", "liger_kernel.ops.rms_norm",
                                             "liger_kernel.ops.rope", "liger_kernel.ops.swiglu",
                                             "liger_kernel.ops.fused_linear_cross_entropy")}
    mods["liger_kernel.ops.rms_norm"].LigerRMSNormFunction = fn(rms_norm)
    mods["liger_kernel.ops.rope"].LigerRopeFunction = fn(rope)
    mods["liger_kernel.ops.swiglu"].LigerSiLUMulFunction = fn(silu_mul)
    mods["liger_kernel.ops.swiglu"].LigerFusedGateUpSiLUMulFunction = fn(silu_mul_packed)
    mods["liger_kernel.ops.fused_linear_cross_entropy"].LigerFusedLinearCrossEntropyFunction = LinearCrossEntropy
    for name in ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"):
        setattr(mods["liger_kernel.ops"], name, mods[f"liger_kernel.ops.{name}"])
    return mods


@pytest.fixture
def fake_liger(monkeypatch):
    """liger-kernel 'installed' and runnable on the CPU: its functions are the stand-ins above; yields the
    (op, operand dtypes) of every call."""
    import sys

    calls: list = []
    for name, mod in _fake_liger_modules(calls).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(fused, "liger_import_error", lambda: None)
    monkeypatch.setattr(fused, "liger_runs_on", lambda device: True)
    return calls


def _autocast_step(model, batch, kernels: str):
    """Loss and every gradient of one bf16-autocast forward / backward with ``kernels``."""
    model.zero_grad(set_to_none=True)
    model.set_kernels(kernels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        loss = model.loss_sum(batch, out, chunk_tokens=16) + out.aux_loss
    loss.backward()
    return loss.detach().float(), {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None}


def _worst_grad_error(grads: dict, ref: dict) -> float:
    """max over parameters of max|g - ref| / max|ref|."""
    assert set(grads) == set(ref)
    return max((grads[k] - r).abs().max().item() / r.abs().max().item() for k, r in ref.items())


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32_params", "bf16_params"])
def test_liger_under_autocast_takes_every_op_and_is_as_close_as_torch(fake_liger, moe, param_dtype):
    """Single-GPU training (fp32 parameters, bf16 autocast: no FSDP mixed precision) and FSDP2 mixed precision
    (bf16 parameters, same autocast): ``kernels=liger`` runs every liger op -- the q/k norms and the RoPE included,
    there with bf16 q / k beside fp32 norm weights and cos / sin -- under the operand rule, and ``auto`` makes the
    same calls (it used to take the torch path for the q/k norms and the RoPE, and an explicit ``liger`` stopped at
    the first forward). Against the fp32 run without autocast (the reference): loss within 1e-2 (relative), and the
    worst gradient error (max|diff| / max|ref| over all parameters) at most 1.25x + 5e-3 that of ``kernels=torch``
    under the same autocast. Norm weights away from 1, so that a cast of them would show."""
    from test_text_parity import make_samples, pack, tiny_args

    from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

    batch = pack(make_samples(torch.Generator().manual_seed(7), multimodal=True))
    model = Qwen3VLForConditionalGeneration(tiny_args(moe=moe))
    model.init_weights(seed=5, std=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    model.set_kernels("torch")
    out = model(batch)
    (model.loss_sum(batch, out, chunk_tokens=16) + out.aux_loss).backward()   # fp32, no autocast: the reference
    ref_loss = (model.loss_sum(batch, out, chunk_tokens=16) + out.aux_loss).detach()
    ref = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.to(param_dtype)
    loss_torch, grads_torch = _autocast_step(model, batch, "torch")
    assert fake_liger == []
    bound = 1.25 * _worst_grad_error(grads_torch, ref) + 5e-3
    runs = {}
    for kernels in ("liger", "auto"):
        fake_liger.clear()
        loss, grads = _autocast_step(model, batch, kernels)
        runs[kernels] = list(fake_liger)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
        assert _worst_grad_error(grads, ref) <= bound, (kernels, _worst_grad_error(grads, ref), bound)
    assert runs["auto"] == runs["liger"]
    calls = runs["liger"]
    assert {op for op, _ in calls} == {"rms_norm", "rope", "silu_mul", "linear_cross_entropy"}
    layers, p, bf16 = tiny_args(moe).text.num_hidden_layers, param_dtype, torch.bfloat16
    expected = collections.Counter()
    expected[("rope", (bf16, bf16, p, p))] += layers         # cos / sin in the embeddings' dtype
    expected[("rms_norm", (bf16, p))] += 2 * layers          # the q / k norms
    expected[("rms_norm", (p, p))] += 2 * layers + 1         # the residual stream's norms
    assert {k: n for k, n in collections.Counter(calls).items() if k[0] in ("rope", "rms_norm")} == expected


def test_auto_falls_back_only_where_liger_cannot_run_and_says_so_once(fake_liger, monkeypatch, caplog):
    """On a device liger runs on: under bf16 autocast, bf16 activations beside fp32 weights (single-GPU training)
    take liger; outside autocast the same pair stays on the torch path (liger's RMSNorm would return bf16 where
    the torch path promotes to fp32), and so does a weight of another half dtype -- logged once per reason, not
    silently; an explicit ``liger`` names the dtypes. liger not importing on a GPU under ``auto``: logged once."""
    import logging

    monkeypatch.setattr(fused, "_WARNED", set())
    x_bf16, w_fp32 = torch.zeros(4, 8, dtype=torch.bfloat16), torch.ones(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.pick("auto", x_bf16, params=(w_fp32,)) == "liger"
        assert fused.pick("liger", x_bf16, params=(w_fp32,)) == "liger"
        assert fused.pick("auto", x_bf16.float(), params=(w_fp32,)) == "liger"
        assert fused.pick("auto", x_bf16, params=(w_fp32.half(),)) == "torch"
    with caplog.at_level(logging.WARNING, logger="rynnscale.ops.fused"):
        for _ in range(3):
            assert fused.pick("auto", x_bf16, params=(w_fp32,)) == "torch"
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and all("model.kernels=auto" in m for m in msgs), msgs   # one per reason
    assert "torch.float16" in msgs[0] and "torch.float32" in msgs[1]
    with pytest.raises(ValueError, match=r"model\.kernels=liger needs weights in the activations' dtype torch\.bf"):
        fused.pick("liger", x_bf16, params=(w_fp32,))
    monkeypatch.setattr(fused, "liger_import_error", lambda: "ImportError: no module named liger_kernel")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rynnscale.ops.fused"):
        assert fused.pick("auto", x_bf16) == "torch" and fused.pick("auto", x_bf16) == "torch"
    assert [r.getMessage() for r in caplog.records] == [
        "model.kernels=auto: liger-kernel does not import (ImportError: no module named liger_kernel); the plain "
        "PyTorch RMSNorm / RoPE / SwiGLU / loss run. pip install -e '.[gpu]' for its kernels"]


def test_fused_loss_trains_the_head_when_nothing_before_it_needs_a_gradient(fake_liger):
    """``model.freeze`` over everything but ``lm_head`` (a linear probe): the hidden states need no gradient, and
    liger's fused linear cross-entropy then computes none -- not the weight's either (0.8.5 computes gradients only
    when its input requires grad). The loss must not hand it that case: lm_head's gradient equals the torch
    path's (fp32: rtol 1e-5); with hidden states that need a gradient liger is used, with the same gradients."""
    torch.manual_seed(0)
    h = torch.randn(40, 16)
    w = 0.1 * torch.randn(50, 16)
    y = torch.randint(0, 50, (40,))
    y[::3] = -100
    grads = {}
    for kernels, h_grad in (("torch", False), ("liger", False), ("auto", False), ("liger", True)):
        hh, ww = h.clone().requires_grad_(h_grad), w.clone().requires_grad_()
        linear_cross_entropy(hh, ww, y, chunk_tokens=16, kernels=kernels).backward()
        assert ww.grad is not None, kernels
        grads[kernels, h_grad] = ww.grad
    assert [op for op, _ in fake_liger] == ["linear_cross_entropy"]   # only where the hidden states need grad
    for key, g in grads.items():
        torch.testing.assert_close(g, grads["torch", False], rtol=1e-5, atol=1e-6, msg=str(key))
