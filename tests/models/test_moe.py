"""SparseMoeBlock vs transformers' Qwen3VLMoeTextSparseMoeBlock (eager per-expert loop, the oracle),
incl. experts that receive zero tokens; the load-balancing loss vs a float64 reference and HF's."""

from __future__ import annotations

import pytest
import torch

from rynnscale.models.qwen3_vl.args import TextArgs
from rynnscale.models.qwen3_vl.moe import SparseMoeBlock, load_balancing_loss

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf_moe  # noqa: E402

E, K, H, INTER = 8, 2, 32, 24


def _args() -> TextArgs:
    return TextArgs(vocab_size=64, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, mrope_section=[2, 3, 3], num_experts=E,
                    num_experts_per_tok=K, moe_intermediate_size=INTER)


def _hf_block():
    cfg = transformers.Qwen3VLMoeTextConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K,
                                            moe_intermediate_size=INTER, hidden_act="silu")
    cfg._experts_implementation = "eager"
    block = hf_moe.Qwen3VLMoeTextSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.2 * torch.randn_like(p))
        # experts 5, 6, 7 can never win: their router rows push their logits far down
        block.gate.weight[5:] = -10.0
    return block


def _pair(gemm_backend: str):
    torch.manual_seed(0)
    hf = _hf_block()
    ours = SparseMoeBlock(_args(), gemm_backend=gemm_backend)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.mark.parametrize("gemm_backend", ["grouped_mm", "loop"])
def test_block_matches_hf_with_idle_experts(gemm_backend):
    hf, ours = _pair(gemm_backend)
    assert set(dict(ours.named_parameters())) == {"gate.weight", "experts.gate_up_proj", "experts.down_proj"}
    x = torch.randn(1, 19, H)
    x[0, :, :] += 1.0  # positive inputs so the negative router rows of experts 5..7 lose every time
    x_hf, x_ours = x.clone().requires_grad_(), x[0].clone().requires_grad_()
    y_hf = hf(x_hf)
    y_ours, stats = ours(x_ours)
    torch.testing.assert_close(y_ours, y_hf[0], rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y_ours)
    y_hf[0].backward(g)
    y_ours.backward(g)
    torch.testing.assert_close(x_ours.grad, x_hf.grad[0], rtol=1e-5, atol=1e-6)
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        # P is not part of y, so the router gradient here is through the top-k weights only (as HF).
        # atol scales with the tensor: the routing weight multiplies the down projection's input here and
        # its output in transformers (the same function, rounded in another order)
        ref = hf_params[name].grad
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")
    # the idle experts really got no tokens and no gradient; the counts add up to T*k
    assert stats.counts_e[5:].sum() == 0 and int(stats.counts_e.sum()) == 19 * K
    assert torch.count_nonzero(ours.experts.gate_up_proj.grad[5:]) == 0
    # counts == HF's top-k choices
    _, _, idx = hf.gate(x[0])
    assert torch.equal(stats.counts_e, torch.bincount(idx.reshape(-1), minlength=E))
    torch.testing.assert_close(stats.prob_mean_e, torch.softmax(x[0] @ hf.gate.weight.t(), -1).mean(0))


def test_single_token_and_dispatch_roundtrip():
    _, ours = _pair("auto")
    x = torch.randn(1, H)
    y, stats = ours(x)
    assert y.shape == (1, H) and int(stats.counts_e.sum()) == K
    # an empty row (e.g. a rank whose micro-batch is all padding) runs and backpropagates
    x0 = torch.randn(0, H, requires_grad=True)
    y0, stats0 = ours(x0)
    (y0.sum() + stats0.prob_mean_e.sum()).backward()
    assert y0.shape == (0, H) and int(stats0.counts_e.sum()) == 0
    # dispatch -> identity experts, weighted -> combine == x times the sum of the (renormalised) weights == x
    x = torch.randn(13, H)
    _, w, idx = ours.gate(x)
    x_sorted, d = ours.dispatch(x, w, idx)
    assert torch.equal(d.offsets_e[-1], torch.tensor(13 * K, dtype=torch.int32))
    assert (torch.diff(idx.reshape(-1)[d.perm_s]) >= 0).all()  # rows really grouped by expert
    weighted = x_sorted * d.weight_s[:, None]
    torch.testing.assert_close(ours.combine(weighted, d), x, rtol=1e-6, atol=1e-6)
    assert torch.equal(d.inv_perm_s[d.perm_s], torch.arange(13 * K))


def _reference_lb(logits_lte: torch.Tensor, k: int, extra_counts_le=None) -> torch.Tensor:
    """float64: mean over layers of E * sum_e f_e * P_e, f from (optionally globally summed) top-k counts."""
    p = logits_lte.double().softmax(-1)
    n_layers, _, n_e = p.shape
    out = []
    for layer in range(n_layers):
        counts = torch.bincount(p[layer].topk(k, -1).indices.reshape(-1), minlength=n_e).double()
        if extra_counts_le is not None:
            counts = counts + extra_counts_le[layer].double()
        out.append(n_e * ((counts / counts.sum()) * p[layer].mean(0)).sum())
    return torch.stack(out).mean()


def test_load_balancing_loss_reference_reducer_and_hf():
    torch.manual_seed(1)
    n_layers, T = 3, 40
    logits = torch.randn(n_layers, T, E) * 2
    logits[1, :, 0] += 4.0  # one unbalanced layer
    probs = logits.softmax(-1).requires_grad_()
    counts = torch.stack([torch.bincount(probs[i].topk(K, -1).indices.reshape(-1), minlength=E)
                          for i in range(n_layers)])
    ours = load_balancing_loss(probs.mean(1), counts)
    torch.testing.assert_close(ours.double(), _reference_lb(logits, K), rtol=1e-6, atol=0)
    ours.backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0

    # global batch: another "rank" contributes counts; the reducer sums them (identity in one process)
    other = torch.randint(0, 30, (n_layers, E))
    glob = load_balancing_loss(probs.mean(1), counts, counts_reducer=lambda c: c + other)
    torch.testing.assert_close(glob.double(), _reference_lb(logits, K, other), rtol=1e-6, atol=0)
    assert not torch.allclose(glob, ours)

    # a perfectly balanced router gives exactly 1 per layer
    flat = torch.full((2, E), 1.0 / E)
    torch.testing.assert_close(load_balancing_loss(flat, torch.full((2, E), 5)), torch.tensor(1.0))

    # one layer: HF's load_balancing_loss_func uses f = counts / tokens (sums to k) -> k * ours
    hf_val = hf_moe.load_balancing_loss_func((logits[1],), E, K)
    torch.testing.assert_close(hf_val / K, load_balancing_loss(probs[1:2].mean(1), counts[1:2]).detach())
