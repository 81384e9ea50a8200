"""The Gated DeltaNet's sequence operations on packed rows (``rynnscale.models.qwen3_5.gated_delta``) against their
definitions, and the whole linear-attention layer's gradients against a float64 reference.

- chunked delta rule == token-by-token definition in float64 (outputs, final states, gradients: 1e-10), over
  documents shorter than, equal to and longer than a chunk, an empty one, with and without initial states; under
  bf16 autocast it is the fp32 function (outputs, states, gradients);
- each document of a packed row == that document alone (the state restarts at boundaries), and == transformers'
  own chunked rule (``torch_chunk_gated_delta_rule``, fp32, 1e-5);
- causal convolution == ``F.conv1d`` per document (+ SiLU), and with ``initial_tc`` == the convolution of the
  document continued from its previous tokens;
- generation's decoding step (``recurrent_gated_delta_step``: one token of each of B sequences from their states) ==
  the definition over the same tokens (float64, 1e-12) and == transformers' ``torch_recurrent_gated_delta_rule``
  (fp32, 1e-6); its convolution over a cached window (``cache.decode_conv``) == ``causal_conv1d`` (float64, 1e-14);
- the layer (``GatedDeltaNet``) in fp32 with the chunked rule vs the same layer in float64 with the definition:
  output rel 1e-5 and every parameter / input gradient within 1e-4 of its norm.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rynnscale.models.qwen3_5 import gated_delta
from rynnscale.models.qwen3_5.args import TextArgs
from rynnscale.models.qwen3_5.cache import decode_conv
from rynnscale.models.qwen3_5.gated_delta import (
    causal_conv1d,
    chunk_gated_delta_rule,
    recurrent_gated_delta_rule_ref,
    recurrent_gated_delta_step,
)
from rynnscale.models.qwen3_5.text import GatedDeltaNet

LENS = [5, 16, 0, 37, 16, 1]      # chunk 16: shorter, equal, empty, longer (3 chunks), equal, one token


def _per_value_head(x_thd: torch.Tensor, Hv: int = 4) -> torch.Tensor:
    """Query / key heads repeated for the value heads each serves (consecutive ones), as transformers' Qwen3.5
    layer does before calling its rules: transformers < 5.2x's rule functions take equal head counts only."""
    return x_thd.repeat_interleave(Hv // x_thd.shape[-2], dim=-2)


def _inputs(lens, Hk=2, Hv=4, dk=8, dv=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q = torch.randn(T, Hk, dk, generator=g, dtype=dtype)
    k = torch.randn(T, Hk, dk, generator=g, dtype=dtype)
    v = torch.randn(T, Hv, dv, generator=g, dtype=dtype)
    gate = -torch.rand(T, Hv, generator=g, dtype=dtype) * 2.0
    beta = torch.rand(T, Hv, generator=g, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, gate, beta, cu


@pytest.mark.parametrize("with_initial", [False, True])
def test_chunked_rule_equals_the_definition_in_float64(with_initial: bool) -> None:
    q, k, v, gate, beta, cu = _inputs(LENS)
    init = torch.randn(len(LENS), 4, 8, 6, dtype=torch.float64) if with_initial else None
    leaves = [x.requires_grad_() for x in (q, k, v, gate, beta)] + ([init.requires_grad_()] if with_initial else [])
    o, s = chunk_gated_delta_rule(q, k, v, gate, beta, cu, initial_state=init, output_final_state=True, chunk=16)
    o_ref, s_ref = recurrent_gated_delta_rule_ref(q, k, v, gate, beta, cu, initial_state=init)
    assert (o - o_ref).abs().max() <= 1e-10 * o_ref.abs().max()
    assert (s - s_ref).abs().max() <= 1e-10 * s_ref.abs().max()
    if with_initial:  # the empty document's final state is its initial state
        assert torch.equal(s[2], init[2])
    w_o, w_s = torch.randn_like(o), torch.randn_like(s)
    grads = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * w_o).sum() + (s_ref * w_s).sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, grads_ref):
        assert (a - b).norm() <= 1e-10 * b.norm(), name


def test_each_document_of_a_packed_row_equals_it_alone_and_transformers() -> None:
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    lens = [70, 3, 130]
    q, k, v, gate, beta, cu = _inputs(lens, dtype=torch.float32, seed=1)
    o, _ = chunk_gated_delta_rule(q, k, v, gate, beta, cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone, _ = chunk_gated_delta_rule(q[a:b], k[a:b], v[a:b], gate[a:b], beta[a:b], torch.tensor([0, b - a]))
        assert torch.allclose(o[a:b], alone, rtol=0, atol=1e-6 * float(alone.abs().max()))
        hf, _ = torch_chunk_gated_delta_rule(_per_value_head(q)[None, a:b], _per_value_head(k)[None, a:b],
                                             v[None, a:b], gate[None, a:b], beta[None, a:b],
                                             use_qk_l2norm_in_kernel=True)
        assert (o[a:b] - hf[0]).abs().max() <= 1e-5 * hf.abs().max()


def test_causal_conv_restarts_per_document_and_continues_from_initial_tokens() -> None:
    g = torch.Generator().manual_seed(2)
    lens, C, K = [7, 1, 12], 10, 4
    x = torch.randn(sum(lens), C, generator=g, dtype=torch.float64)
    w = torch.randn(C, K, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 7, 8, 20])
    y = causal_conv1d(x, w, cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = F.silu(F.conv1d(x[a:b].T[None], w[:, None], padding=K - 1, groups=C)[0, :, :b - a]).T
        assert torch.allclose(y[a:b], ref, rtol=0, atol=1e-12)
    # initial_ntc: the K-1 tokens before each document (context parallelism; zeros: the document starts here)
    prev = torch.randn(3, K - 1, C, generator=g, dtype=torch.float64)
    prev[1] = 0
    y_cont = causal_conv1d(x, w, cu, initial_ntc=prev)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        whole = torch.cat([prev[n], x[a:b]])
        ref = F.silu(F.conv1d(whole.T[None], w[:, None], padding=K - 1, groups=C)[0, :, :whole.shape[0]]).T[K - 1:]
        assert torch.allclose(y_cont[a:b], ref, rtol=0, atol=1e-12)
    assert torch.equal(y_cont[7:8], y[7:8])   # a zero context is a document start


def test_decoding_step_equals_the_definition_and_transformers() -> None:
    """B = 3 sequences from random states (one from zeros: None), 5 steps of one token each."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    B, steps = 3, 5
    q, k, v, gate, beta, _ = _inputs([B] * steps, seed=3)     # token t of sequence b: row t * B + b
    init = torch.randn(B, 4, 8, 6, dtype=torch.float64)
    init[2] = 0
    # the definition: sequence b's tokens as one document, from its state
    cu = torch.arange(0, B * steps + 1, steps)
    by_seq = torch.arange(B * steps).view(steps, B).T.reshape(-1)
    o_ref, s_ref = recurrent_gated_delta_rule_ref(q[by_seq], k[by_seq], v[by_seq], gate[by_seq], beta[by_seq], cu,
                                                  initial_state=init)
    state, outs = None, []
    state32, outs32, outs_hf, state_hf = init.float(), [], [], init.float()
    for t in range(steps):
        sl = slice(t * B, (t + 1) * B)
        o, state = recurrent_gated_delta_step(q[sl], k[sl], v[sl], gate[sl], beta[sl],
                                              init.clone() if state is None else state)
        outs.append(o)
        o32, state32 = recurrent_gated_delta_step(*(x[sl].float() for x in (q, k, v, gate, beta)), state32)
        outs32.append(o32)
        o_hf, state_hf = torch_recurrent_gated_delta_rule(
            *(x[sl].float()[:, None] for x in (_per_value_head(q), _per_value_head(k), v, gate, beta)),
            initial_state=state_hf,
            output_final_state=True, use_qk_l2norm_in_kernel=True)
        outs_hf.append(o_hf[:, 0])
    o = torch.stack(outs, dim=1).reshape(B * steps, 4, 6)           # sequence-major, as o_ref
    assert (o - o_ref).abs().max() <= 1e-12 * o_ref.abs().max()
    assert (state - s_ref).abs().max() <= 1e-12 * s_ref.abs().max()
    o32, o_hf = torch.stack(outs32), torch.stack(outs_hf)
    assert (o32 - o_hf).abs().max() <= 1e-6 * o_hf.abs().max()
    assert (state32 - state_hf).abs().max() <= 1e-6 * state_hf.abs().max()
    o0, s0 = recurrent_gated_delta_step(q[:B], k[:B], v[:B], gate[:B], beta[:B], None)   # None: zero states
    o0_ref, s0_ref = recurrent_gated_delta_step(q[:B], k[:B], v[:B], gate[:B], beta[:B], torch.zeros_like(init))
    assert torch.equal(o0, o0_ref) and torch.equal(s0, s0_ref)


def test_decoding_convolution_equals_the_varlen_convolution() -> None:
    g = torch.Generator().manual_seed(4)
    B, C, K, n = 3, 10, 4, 6
    x = torch.randn(B * n, C, generator=g, dtype=torch.float64)   # sequence-major rows: n inputs of each sequence
    w = torch.randn(C, K, generator=g, dtype=torch.float64)
    y = causal_conv1d(x, w, torch.arange(0, B * n + 1, n))
    xs = x.view(B, n, C)
    for t in range(n):   # the window: the K-1 inputs before t (zeros before the sequence's start)
        window = torch.cat([x.new_zeros(B, K - 1, C), xs], dim=1)[:, t:t + K - 1]
        want = y.view(B, n, C)[:, t]     # the same sum in the same order; SiLU's vector / scalar paths may differ
        assert (decode_conv(xs[:, t], window, w) - want).abs().max() <= 1e-14 * want.abs().max()


def _reference_rule(q, k, v, g, beta, cu_seqlens, **kwargs):
    o, _ = recurrent_gated_delta_rule_ref(q, k, v, g, beta, cu_seqlens)
    return o, None


def test_linear_attention_layer_gradients_equal_a_float64_reference(monkeypatch) -> None:
    args = TextArgs(hidden_size=48, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                    linear_value_head_dim=8, linear_conv_kernel_dim=4, num_hidden_layers=1)
    torch.manual_seed(0)
    layer = GatedDeltaNet(args)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "A_log":
                p.copy_(torch.empty_like(p).uniform_(0.5, 4).log())
            elif name == "norm.weight":
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    ref = copy.deepcopy(layer).double()
    lens = [20, 70, 9]
    cu = torch.tensor([0, 20, 90, 99])
    x = torch.randn(sum(lens), 48, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    w = torch.randn(sum(lens), 48)
    (layer(x, cu) * w).sum().backward()
    out = layer(x.detach(), cu)
    monkeypatch.setattr(gated_delta, "chunk_gated_delta_rule", _reference_rule)
    out64 = ref(x64, cu)
    (out64 * w.double()).sum().backward()
    assert (out.double() - out64).abs().max() <= 1e-5 * out64.abs().max()
    assert (x.grad.double() - x64.grad).norm() <= 1e-4 * x64.grad.norm()
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        g64 = ref_params[name].grad
        assert float(g64.norm()) > 0, name
        assert (p.grad.double() - g64).norm() <= 1e-4 * g64.norm(), name


def test_chunked_rule_under_bf16_autocast_is_the_fp32_function() -> None:
    """The chunked rule computes in fp32 whatever autocast is active (a bf16 training step hands it bf16 q / k / v
    under autocast): output, final states and gradients equal the fp32 ones (fp32 inputs, CPU bf16 autocast).
    Before, autocast ran its matmuls (UT transform, intra-chunk scores, the state updates) in bf16: output 5e-3 off
    over 256 tokens, 3x the error of bf16 inputs with fp32 arithmetic."""
    q, k, v, gate, beta, cu = _inputs([150, 106], dk=16, dv=16, dtype=torch.float32, seed=3)
    gate = gate * 0.05   # slow decay: the state carries far, as in a trained layer
    init = torch.randn(2, 4, 16, 16)

    def run(autocast: bool):
        ts = [t.clone().requires_grad_() for t in (q, k, v, gate, beta, init)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o, final = chunk_gated_delta_rule(*ts[:5], cu, initial_state=ts[5], output_final_state=True)
        (o.square().sum() + final.square().sum()).backward()
        return [o.detach(), final.detach(), *(t.grad for t in ts)]

    names = ("out", "final", "dq", "dk", "dv", "dg", "dbeta", "dinit")
    for got, want, name in zip(run(True), run(False), names):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
