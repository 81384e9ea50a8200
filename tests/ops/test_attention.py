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
