"""grouped_mm: fused kernel == per-expert loop == float64 dense reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from rynnscale.ops.grouped_gemm import grouped_mm, grouped_mm_loop, grouped_mm_usable


def _reference(x_tk, w_enk, counts):
    """float64, via a per-row gather of the expert weight (independent of both backends)."""
    expert_t = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return torch.einsum("tk,tnk->tn", x_tk.double(), w_enk.double()[expert_t])


def _run(backend, x, w, offs, g):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = grouped_mm(x, w, offs, backend=backend)
    y.backward(g)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [4, 4, 4, 4], [0, 9, 0, 0]])
def test_fast_matches_loop_and_reference_fp32(counts):
    torch.manual_seed(0)
    E, N, K = len(counts), 16, 8
    T = sum(counts)
    x, w = torch.randn(T, K), torch.randn(E, N, K)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    g = torch.randn(T, N)
    assert grouped_mm_usable(x, w)
    fast = _run("grouped_mm", x, w, offs, g)
    loop = _run("loop", x, w, offs, g)
    ref_x, ref_w = x.double().requires_grad_(), w.double().requires_grad_()
    ref = _reference(ref_x, ref_w, counts)
    ref.backward(g.double())
    for a, b, r in zip(fast, loop, (ref.detach(), ref_x.grad, ref_w.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)
    # experts with no rows get exactly zero weight gradient
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(fast[2][e]) == 0 and torch.count_nonzero(loop[2][e]) == 0


def test_bf16_and_expanded_grad():
    torch.manual_seed(1)
    counts = [5, 0, 3]
    x, w = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(3, 8, 16, dtype=torch.bfloat16)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    assert grouped_mm_usable(x, w)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() for _ in range(2)]
    ys = [grouped_mm(xi, wi, offs, backend=b) for xi, wi, b in zip(xs, ws, ("grouped_mm", "loop"))]
    for y in ys:
        y.float().sum().backward()  # stride-0 gradient: the kernel needs it made contiguous
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ws[0].grad, ws[1].grad, rtol=1e-2, atol=1e-2)


def test_auto_falls_back_and_empty_input():
    torch.manual_seed(2)
    # float64 and a bf16 width that is not a 16-byte multiple are not kernel inputs: auto uses the loop
    x, w = torch.randn(6, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    offs = torch.tensor([2, 6], dtype=torch.int32)
    assert not grouped_mm_usable(x, w)
    assert not grouped_mm_usable(x.bfloat16(), w.bfloat16())
    torch.testing.assert_close(grouped_mm(x, w, offs), grouped_mm_loop(x, w, offs))
    # zero tokens in the whole layer: output [0, N], gradients are zeros, not an error
    w = torch.randn(4, 8, 8, requires_grad=True)
    x = torch.randn(0, 8, requires_grad=True)
    for backend in ("grouped_mm", "loop"):
        y = grouped_mm(x, w, torch.zeros(4, dtype=torch.int32), backend=backend)
        assert y.shape == (0, 8)
        y.sum().backward()
    assert w.grad is None or torch.count_nonzero(w.grad) == 0
    with pytest.raises(ValueError, match="offsets must have shape"):
        grouped_mm(torch.randn(3, 8), torch.randn(2, 8, 8), torch.tensor([3], dtype=torch.int32))


def test_autocast_casts_to_kernel_dtype(monkeypatch):
    """fp32 operands under bf16 autocast use the kernel in bf16 (not the loop, not a dtype error)."""
    import rynnscale.ops.grouped_gemm as gg

    calls = []
    real = gg._torch_grouped_mm
    monkeypatch.setattr(gg, "_torch_grouped_mm", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    torch.manual_seed(3)
    x, w = torch.randn(6, 16, requires_grad=True), torch.randn(2, 8, 16, requires_grad=True)
    offs = torch.tensor([4, 6], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_mm(x, w, offs)
    y.float().sum().backward()
    assert calls == [torch.bfloat16] and y.dtype == torch.bfloat16
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), grouped_mm_loop(x, w, offs).detach(), rtol=2e-2, atol=5e-2)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_kernel_matches_float64_at_a3b_expert_widths():
    """The CUDA kernel on bf16 at the A3B expert shape (H 2048 -> 2 x 768, 16 experts with uneven and
    empty groups): forward and both gradients within 1e-2 (relative norm) of float64 math on the same
    bf16 values, as close as the per-expert loop; an empty expert's weight gradient is exactly zero."""
    torch.manual_seed(4)
    counts = [700, 0, 13, 512, 1, 300, 0, 977, 64, 250, 2, 800, 40, 0, 333, 100]
    E, N, K = len(counts), 2 * 768, 2048
    T = sum(counts)
    x = torch.randn(T, K, device="cuda").bfloat16()
    w = (torch.randn(E, N, K, device="cuda") * K ** -0.5).bfloat16()
    g = torch.randn(T, N, device="cuda").bfloat16()
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    assert grouped_mm_usable(x, w)
    fast = _run("grouped_mm", x, w, offs, g)
    loop = _run("loop", x, w, offs, g)
    ends = offs.tolist()
    xd, wd, gd = x.double(), w.double(), g.double()
    ref_y, ref_dx, ref_dw = torch.empty(T, N, device="cuda", dtype=torch.float64), torch.empty_like(xd), torch.empty_like(wd)
    for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)):
        ref_y[s:t] = xd[s:t] @ wd[e].t()
        ref_dx[s:t] = gd[s:t] @ wd[e]
        ref_dw[e] = gd[s:t].t() @ xd[s:t]
    for name, a, b, r in zip(("y", "dx", "dw"), fast, loop, (ref_y, ref_dx, ref_dw)):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all(), name
        assert _rel(a, r) <= 1e-2, (name, _rel(a, r))
        assert _rel(a, r) <= 2 * _rel(b, r) + 1e-3, (name, _rel(a, r), _rel(b, r))
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(fast[2][e]) == 0
