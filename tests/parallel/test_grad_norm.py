"""``clip_grad_norm_`` / ``global_grad_norm`` (one process, no group) against torch's own clip_grad_norm_ on the same
gradients: float64 models (the tests' oracle runs) get a float64 norm and coefficient, as torch computes them."""

from __future__ import annotations

import pytest
import torch

from rynnscale.parallel.distributed import clip_grad_norm_, global_grad_norm


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_clip_grad_norm_equals_torch(dtype, rel):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in (7, 300, 1)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, ref):
        a.grad = torch.randn_like(a) * 3
        b.grad = a.grad.clone()
    total = clip_grad_norm_(ours, 0.5, None)
    want = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    assert total.dtype == dtype
    assert abs(total.item() - want.item()) <= rel * want.item()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=rel, atol=0)


def test_grad_norm_without_gradients_is_zero_on_the_parameters_device():
    p = torch.nn.Parameter(torch.ones(3))
    n = global_grad_norm([p], None)
    assert n.item() == 0.0 and n.device == p.device and n.dtype == torch.float32
