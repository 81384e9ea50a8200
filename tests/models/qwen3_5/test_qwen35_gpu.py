"""Qwen3.5's GPU path (issue 24.6): flash-linear-attention's varlen kernels (``fla-core``: the chunked gated delta
rule with ``cu_seqlens``, the causal convolution; causal-conv1d's kernel when installed) against the plain PyTorch
path, on CUDA (marked ``gpu``: skipped without a device; bench/gpu_check.py runs them).

- the delta rule over documents shorter than, equal to and longer than a chunk, with initial / final states:
  outputs, states and the gradients of q, k, v, g, beta; fp32 within 1e-3 of each tensor's max (fla's Triton dots
  use TF32), bf16 within 3e-2;
- the convolution and its gradients (fp32 1e-5);
- a tiny Qwen3.5-MoE with its tower: ``model.kernels=auto`` (fla) vs ``torch``: logits rel 1e-3 (fp32), every
  parameter gradient within 1e-2 of its norm.
"""

from __future__ import annotations

import pytest
import torch
from qwen35_helpers import make_samples, pack, tiny_config

from rynnscale.models import args_from_hf_config
from rynnscale.models.qwen3_5 import gated_delta
from rynnscale.models.qwen3_5.model import new_model

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def needs_fla():
    if gated_delta.fla_import_error() is not None:
        pytest.skip(f"flash-linear-attention does not import: {gated_delta.fla_import_error()}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_fla_delta_rule_equals_the_torch_path(dtype, tol) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)
    lens = [70, 3, 64, 130]
    T, Hk, Hv, dk, dv = sum(lens), 2, 4, 64, 64
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q, k = (torch.randn(T, Hk, dk, generator=g).to(DEV, dtype) for _ in range(2))
    v = torch.randn(T, Hv, dv, generator=g).to(DEV, dtype)
    gate = (-torch.rand(T, Hv, generator=g) * 2).to(DEV)
    beta = torch.rand(T, Hv, generator=g).to(DEV, dtype)
    init = torch.randn(len(lens), Hv, dk, dv, generator=g).to(DEV)
    outs = {}
    for name, fn in (("fla", gated_delta.fla_gated_delta_rule), ("torch", gated_delta.chunk_gated_delta_rule)):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, gate, beta)]
        o, s = fn(*leaves, cu, initial_state=init, output_final_state=True)
        ((o.float() ** 2).sum() + s.float().sum()).backward()
        outs[name] = (o, s, [x.grad for x in leaves])
    (o_f, s_f, g_f), (o_t, s_t, g_t) = outs["fla"], outs["torch"]
    assert _rel(o_f, o_t) <= tol and _rel(s_f, s_t) <= tol
    for name, a, b in zip("q k v g beta".split(), g_f, g_t):
        assert _rel(a, b) <= 3 * tol, name


def test_fla_causal_conv_equals_the_torch_path() -> None:
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(200, 96, generator=g).to(DEV)
    w = torch.randn(96, 4, generator=g).to(DEV)
    cu = torch.tensor([0, 7, 8, 150, 200], device=DEV)
    res = {}
    for name, fn in (("fla", gated_delta.fla_causal_conv1d), ("torch", gated_delta.causal_conv1d)):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww, cu)
        (y ** 2).sum().backward()
        res[name] = (y, xx.grad, ww.grad)
    for a, b in zip(res["fla"], res["torch"]):
        assert _rel(a, b) <= 1e-5


def test_model_with_fla_kernels_equals_the_torch_path() -> None:
    # head dims of 32: Triton's block sizes (the CPU tests' 16 / 8 may be below them)
    args = args_from_hf_config(tiny_config(True, linear_key_head_dim=32, linear_value_head_dim=32))
    torch.manual_seed(0)
    ref = new_model(args, attn_backend="sdpa_mask")
    ref.init_weights(0, std=0.05)
    fast = new_model(args, attn_backend="sdpa_mask")
    fast.load_state_dict(ref.state_dict())
    ref.set_kernels("torch")
    fast.set_kernels("auto")
    batch = pack(make_samples(torch.Generator().manual_seed(0), multimodal=True)).to(DEV)
    grads, logits = [], []
    for m in (fast.to(DEV), ref.to(DEV)):
        out = m(batch)
        m.loss_sum(batch, out).backward()
        logits.append(m.logits(out.hidden_ld).detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert _rel(logits[0], logits[1]) <= 1e-3
    for n, g_ref in grads[1].items():
        if g_ref is not None and float(g_ref.norm()) > 0:
            assert float((grads[0][n] - g_ref).norm() / g_ref.norm()) <= 1e-2, n
