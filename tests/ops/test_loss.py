"""linear_cross_entropy (chunked, fused gradients) == F.cross_entropy on full float64 logits; linear_log_probs
(chunked, recomputed in backward) == log_softmax of full float64 logits, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rynnscale.ops.loss import linear_cross_entropy, linear_log_probs


def _reference(h, w, y):
    h = h.detach().double().requires_grad_()
    w = w.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_full_logits(chunk_tokens, dtype):
    torch.manual_seed(0)
    L, H, V = 37, 16, 50
    h = torch.randn(L, H, dtype=dtype, requires_grad=True)
    w = torch.randn(V, H, dtype=dtype, requires_grad=True)
    y = torch.randint(0, V, (L,))
    y[torch.rand(L) < 0.3] = -100
    y[0] = -100
    loss = linear_cross_entropy(h, w, y, chunk_tokens=chunk_tokens)
    (loss * 0.5).backward()  # a non-unit incoming gradient must scale the fused gradients
    ref_loss, ref_gh, ref_gw = _reference(h, w, y)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    torch.testing.assert_close(h.grad.double(), 0.5 * ref_gh, **tol)
    torch.testing.assert_close(w.grad.double(), 0.5 * ref_gw, **tol)
    assert torch.count_nonzero(h.grad[y == -100]) == 0  # ignored rows get no gradient


def test_bf16_close_and_all_ignored_and_no_grad():
    torch.manual_seed(1)
    L, H, V = 20, 32, 40
    h = torch.randn(L, H).bfloat16().requires_grad_()
    w = (torch.randn(V, H) * 0.3).bfloat16().requires_grad_()
    y = torch.randint(0, V, (L,))
    loss = linear_cross_entropy(h, w, y, chunk_tokens=8)
    loss.backward()
    ref_loss, ref_gh, ref_gw = _reference(h, w, y)
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-2, atol=0)
    torch.testing.assert_close(h.grad.double(), ref_gh, rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=5e-2, atol=2e-2)

    h32 = torch.randn(5, H, requires_grad=True)
    w32 = torch.randn(V, H, requires_grad=True)
    none = linear_cross_entropy(h32, w32, torch.full((5,), -100), chunk_tokens=4)
    none.backward()
    assert float(none.detach()) == 0.0 and torch.count_nonzero(h32.grad) == 0 and torch.count_nonzero(w32.grad) == 0
    with torch.no_grad():
        val = linear_cross_entropy(h32, w32, torch.arange(5), chunk_tokens=2)
    torch.testing.assert_close(val.double(), _reference(h32, w32, torch.arange(5))[0])
    with pytest.raises(ValueError, match="labels shape"):
        linear_cross_entropy(h32, w32, torch.arange(4))


@pytest.mark.parametrize("chunk_tokens", [1, 5, 64])
@pytest.mark.parametrize("dtype,temperature", [(torch.float64, 1.0), (torch.float64, 0.7), (torch.float32, 1.3)])
def test_log_probs_match_full_logits(chunk_tokens, dtype, temperature):
    torch.manual_seed(2)
    L, H, V = 29, 16, 50
    h = torch.randn(L, H, dtype=dtype, requires_grad=True)
    w = torch.randn(V, H, dtype=dtype, requires_grad=True)
    y = torch.randint(0, V, (L,))
    y[torch.rand(L) < 0.3] = -100
    g = torch.randn(L, dtype=dtype)   # a different incoming gradient per token
    got = linear_log_probs(h, w, y, chunk_tokens=chunk_tokens, temperature=temperature)
    (got * g).sum().backward()
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    keep = y != -100
    ref = torch.zeros(L, dtype=torch.float64)
    ref[keep] = torch.log_softmax(hr @ wr.t() / temperature, -1)[keep].gather(1, y[keep, None]).squeeze(1)
    (ref * g.double()).sum().backward()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), ref, **tol)
    torch.testing.assert_close(h.grad.double(), hr.grad, **tol)
    torch.testing.assert_close(w.grad.double(), wr.grad, **tol)
    assert torch.count_nonzero(got[~keep]) == 0 and torch.count_nonzero(h.grad[~keep]) == 0


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32-params", "bf16-params"])
def test_log_probs_gradients_under_autocast_are_those_of_the_forward(weight_dtype):
    """Under bf16 autocast (a one-process GRPO step: fp32 parameters; or bf16 weights and fp32 hidden) the backward
    recomputes the logits as the forward computed them: the gradient equals autograd's through the same autocast
    expression (grad h rel 1e-3, grad w rel 1e-2: fp32 vs bf16 accumulation). It was 2.8e-2 off (lse of bf16
    logits against fp32 recomputed ones) and bf16 weights crashed the backward."""
    torch.manual_seed(0)
    L, H, V, T = 24, 32, 50, 0.7
    h = (torch.randn(L, H) * 2).requires_grad_()
    w = (torch.randn(V, H) * 0.5).to(weight_dtype).requires_grad_()
    y = torch.randint(0, V, (L,))
    g = torch.randn(L)
    hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_log_probs(h, w, y, chunk_tokens=7, temperature=T)
        ref = torch.log_softmax((hr @ wr.t()).float() / T, -1).gather(1, y[:, None]).squeeze(1)
    (got * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(got, ref.detach(), rtol=0, atol=1e-5)

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    assert rel(h.grad, hr.grad) <= 1e-3, rel(h.grad, hr.grad)
    assert rel(w.grad, wr.grad) <= 1e-2, rel(w.grad, wr.grad)
