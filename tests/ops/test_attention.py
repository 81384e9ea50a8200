"""varlen_attention backends (loop, sdpa_mask, and varlen on CUDA) == a float64 per-document reference,
with GQA, causal and bidirectional masks, and zero-length documents; forward and backward."""

from __future__ import annotations

import math

import pytest
import torch

from rynnscale.ops.attention import varlen_attention


def _reference(q, k, v, cu_seqlens, causal):
    """Explicit float64 softmax attention per document (no SDPA), k/v heads repeated for GQA."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    b = cu_seqlens.tolist()
    for s, e in zip(b[:-1], b[1:]):
        if e == s:
            continue
        qd = q[s:e].transpose(0, 1)  # [H, n, D]
        kd = k[s:e].repeat_interleave(groups, dim=1).transpose(0, 1)
        vd = v[s:e].repeat_interleave(groups, dim=1).transpose(0, 1)
        scores = qd @ kd.transpose(1, 2) / math.sqrt(q.shape[-1])
        if causal:
            n = e - s
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[s:e] = (scores.softmax(-1) @ vd).transpose(0, 1)
    return out


def _inputs(seed, lens, hq, hkv, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    q = torch.randn(T, hq, d, generator=g, dtype=dtype)
    k = torch.randn(T, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(T, hkv, d, generator=g, dtype=dtype)
    return q, k, v, cu, max(lens)


def _run(backend, q, k, v, cu, max_len, causal, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = varlen_attention(q, k, v, cu, max_len, causal=causal, backend=backend)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa2", "mqa"])
def test_backends_match_float64_reference(causal, heads):
    lens = [5, 0, 9, 1, 0, 7]  # zero-length and single-token documents inside the row
    q, k, v, cu, max_len = _inputs(0, lens, *heads)
    torch.manual_seed(0)
    grad_out = torch.randn_like(q)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref = _reference(qr, kr, vr, cu, causal)
    ref.backward(grad_out.double())
    for backend in ("loop", "sdpa_mask"):
        got = _run(backend, q, k, v, cu, max_len, causal, grad_out)
        for a, r in zip(got, (ref.detach(), qr.grad, kr.grad, vr.grad)):
            torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5, msg=backend)


def test_documents_do_not_interact():
    q, k, v, cu, max_len = _inputs(1, [6, 4], 2, 1)
    base = varlen_attention(q, k, v, cu, max_len, backend="loop")
    k2, v2 = k.clone(), v.clone()
    k2[6:] += 5.0  # perturb the second document only
    v2[6:] -= 3.0
    for backend in ("loop", "sdpa_mask"):
        out = varlen_attention(q, k2, v2, cu, max_len, backend=backend)
        torch.testing.assert_close(out[:6], base[:6], rtol=0, atol=1e-6)
        assert not torch.allclose(out[6:], base[6:])


def test_all_documents_empty_and_bad_backend():
    q, k, v, _, _ = _inputs(2, [0], 2, 2)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    for backend in ("loop", "sdpa_mask"):
        assert varlen_attention(q, k, v, cu, 0, backend=backend).shape == (0, 2, 8)
    with pytest.raises(ValueError, match="not one of"):
        varlen_attention(q, k, v, cu, 0, backend="flash9")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen backend needs CUDA (torch varlen_attn)")
def test_varlen_backend_on_cuda():
    q, k, v, cu, max_len = _inputs(3, [37, 0, 64, 5], 8, 2, d=64, dtype=torch.bfloat16)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    ref = _reference(q.cpu(), k.cpu(), v.cpu(), cu, causal=True)
    out = varlen_attention(q, k, v, cu.cuda(), max_len, causal=True, backend="varlen")
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen backend needs CUDA (torch varlen_attn)")
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_backend_gradients_match_loop_on_cuda(causal):
    """Forward and q/k/v gradients of the flash varlen kernel vs one SDPA per document (bf16, GQA 8:2,
    an empty document): max |diff| <= 2e-2 x max |value|."""
    q, k, v, cu, max_len = _inputs(4, [37, 0, 64, 5], 8, 2, d=64, dtype=torch.bfloat16)
    res = {}
    for backend in ("varlen", "loop"):
        qq, kk, vv = (t.cuda().requires_grad_() for t in (q, k, v))
        out = varlen_attention(qq, kk, vv, cu.cuda(), max_len, causal=causal, backend=backend)
        out.backward(torch.ones_like(out))
        res[backend] = [out.float(), qq.grad.float(), kk.grad.float(), vv.grad.float()]
    for a, b in zip(res["varlen"], res["loop"]):
        assert (a - b).abs().max().item() <= 2e-2 * b.abs().max().item() + 1e-3


def test_explicit_varlen_on_cpu_names_the_key():
    """An explicit flash varlen backend on CPU fails naming model.attn_backend (not the dispatcher's wall of text)."""
    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match=r"model\.attn_backend=varlen needs a CUDA device"):
        varlen_attention(q, q, q, torch.tensor([0, 4], dtype=torch.int32), 4, backend="varlen")


# ------------------------------------------------------------------ the flash varlen path's inputs, on the CPU
def _fake_flash(calls):
    """Stand-in for ``torch.nn.attention.varlen.varlen_attn`` that enforces the flash kernel's input contract
    (q / k / v of ONE dtype, float16 or bfloat16; head dim a multiple of 8 up to 256; int32 cu_seqlens on q's
    device) and computes the float64 reference, so the argument preparation runs without a GPU."""

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False,
                    is_causal=None):
        calls.append((q.dtype, k.dtype, v.dtype))
        if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"FlashAttention only support fp16 and bf16 data type, got {q.dtype} {k.dtype} {v.dtype}")
        if q.shape[-1] % 8 or q.shape[-1] > 256:
            raise RuntimeError(f"head dim {q.shape[-1]}")
        assert cu_q.dtype == torch.int32 and cu_q.device == q.device
        causal = tuple(window_size) == (-1, 0) or bool(is_causal)
        return _reference(q, k, v, cu_q, causal).to(q.dtype)

    return varlen_attn


@pytest.fixture
def fake_flash(monkeypatch):
    import torch.nn.attention.varlen as varlen_mod

    from rynnscale.ops import attention

    calls: list = []
    monkeypatch.setattr(attention, "_varlen_available", lambda device: True)
    monkeypatch.setattr(varlen_mod, "varlen_attn", _fake_flash(calls))
    return calls


def test_varlen_under_autocast_gets_one_half_dtype(fake_flash):
    """Under bf16 autocast a norm with fp32 weights hands attention fp32 q / k next to a bf16 v (single-GPU
    training: fp32 parameters + autocast); the flash kernel must get all three in bf16 (it is not autocast-aware
    and rejects fp32). Output within bf16 rounding (2e-2) of the float64 reference."""
    q, k, v, cu, max_len = _inputs(5, [9, 0, 16, 3], 4, 2, d=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = varlen_attention(q, k, v.bfloat16(), cu, max_len, causal=True, backend="auto")
    assert fake_flash == [(torch.bfloat16,) * 3]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _reference(q, k, v.bfloat16().float(), cu, True), rtol=2e-2, atol=2e-2)


def test_auto_leaves_the_flash_kernel_for_inputs_it_cannot_take(fake_flash):
    """fp32 without autocast (train.dtype=float32 on a GPU) or a head dim flash does not take: ``auto`` runs the
    per-document loop (same result) instead of crashing in the kernel; bf16 at head dim 16 takes the kernel."""
    for d, dtype in ((16, torch.float32), (12, torch.bfloat16)):
        q, k, v, cu, max_len = _inputs(6, [7, 5], 4, 2, d=d, dtype=dtype)
        out = varlen_attention(q, k, v, cu, max_len, causal=True, backend="auto")
        torch.testing.assert_close(out, varlen_attention(q, k, v, cu, max_len, causal=True, backend="loop"),
                                   rtol=0, atol=0)
    assert fake_flash == []
    q, k, v, cu, max_len = _inputs(6, [7, 5], 4, 2, d=16, dtype=torch.bfloat16)
    varlen_attention(q, k, v, cu, max_len, causal=True, backend="auto")
    assert fake_flash == [(torch.bfloat16,) * 3]


def test_explicit_varlen_names_the_dtype_it_cannot_take(fake_flash):
    q, k, v, cu, max_len = _inputs(7, [4], 2, 2, d=16)
    with pytest.raises(ValueError, match=r"model\.attn_backend=varlen cannot take torch\.float32 inputs"):
        varlen_attention(q, k, v, cu, max_len, backend="varlen")
    with pytest.raises(ValueError, match=r"model\.attn_backend=varlen needs q, k and v of one dtype"):
        varlen_attention(q, k, v.bfloat16(), cu, max_len, backend="varlen")
    assert fake_flash == []


def test_explicit_varlen_with_fp32_compute_is_a_config_error(monkeypatch):
    """model.attn_backend=varlen with train.dtype=float32 on a GPU fails at build, naming the key (not in the
    first forward with the kernel's message)."""
    from test_text_parity import tiny_args

    from rynnscale.config.schema import ConfigError
    from rynnscale.ops import attention
    from rynnscale.train.build import build_model, model_config_for

    monkeypatch.setattr(attention, "_varlen_available", lambda device: True)
    args = tiny_args(moe=False)
    with pytest.raises(ConfigError, match=r"model\.attn_backend=varlen cannot take torch\.float32"):
        build_model(model_config_for(args, attn_backend="varlen"), torch.device("cuda"), compute_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_varlen_under_cuda_autocast_with_fp32_q_matches_loop():
    """The single-GPU training pattern on the real kernel: fp32 q / k, bf16 v under bf16 autocast; forward and
    gradients of ``varlen`` within 2e-2 x max of the per-document loop under the same autocast."""
    q, k, v, cu, max_len = _inputs(8, [37, 0, 64, 5], 8, 2, d=64)
    res = {}
    for backend in ("varlen", "loop"):
        qq, kk = (t.cuda().requires_grad_() for t in (q, k))
        vv = v.cuda().bfloat16().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = varlen_attention(qq, kk, vv, cu.cuda(), max_len, causal=True, backend=backend)
        out.float().sum().backward()
        res[backend] = [out.float(), qq.grad.float(), kk.grad.float(), vv.grad.float()]
    for a, b in zip(res["varlen"], res["loop"]):
        assert (a - b).abs().max().item() <= 2e-2 * b.abs().max().item() + 1e-3


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_model_under_autocast_hands_flash_one_half_dtype(fake_flash, family):
    """A whole model as single-GPU training runs it (fp32 parameters, bf16 autocast, attn_backend auto with the
    flash kernel available): every text and vision attention call reaches the kernel in bf16, and the loss is
    within 1e-2 (relative) of the same model on the per-document loop."""
    if family == "qwen3_vl":
        from test_text_parity import make_samples, pack, tiny_args

        from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

        batch = pack(make_samples(torch.Generator().manual_seed(7), multimodal=True))
        model = Qwen3VLForConditionalGeneration(tiny_args(moe=True))
        model.init_weights(seed=5, std=0.1)
    else:
        from qwen35_helpers import make_samples, pack, tiny_config

        from rynnscale.models import args_from_hf_config
        from rynnscale.models.qwen3_5.model import new_model

        batch = pack(make_samples(torch.Generator().manual_seed(7), multimodal=True))
        model = new_model(args_from_hf_config(tiny_config(moe=False)))
        model.init_weights(seed=5, std=0.1)
    losses = {}
    for backend in ("auto", "loop"):
        for m in model.modules():
            if hasattr(m, "attn_backend"):
                m.attn_backend = backend
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch)
            losses[backend] = float(model.loss_sum(batch, out)) / batch.num_target_tokens
    assert fake_flash and set(fake_flash) == {(torch.bfloat16,) * 3}
    assert abs(losses["auto"] - losses["loop"]) <= 1e-2 * abs(losses["loop"])
