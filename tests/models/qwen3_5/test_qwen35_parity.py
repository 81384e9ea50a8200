"""Parity of our Qwen3.5 / Qwen3.5-MoE (vision-language and text-only) with transformers (the oracle), CPU.

transformers' state dict is loaded into ours with strict=True; transformers runs each sample alone (batch of one,
no padding, no cache: its DeltaNet path has no packed-sequence support on CPU), ours runs them packed in ONE row.
Checked, on rows with text, image and video samples and documents longer than one DeltaNet chunk (64 tokens):
- fp32 logits of every sample: max|diff| <= 1e-5 * max|logits|; the loss sum: rel 1e-5;
- float64: logits within 1e-6 (fp32 gives ~5e-6) -- nothing but rounding differs. transformers keeps fp32
  islands in float64 (its norms, the decay ``g``, the rotary angles: ours mirror them, for bf16 fidelity), which
  bound the agreement near 1e-7; it runs its eager experts (grouped_mm has no float64) and, as its chunked delta
  rule computes in fp32 whatever the input dtype, the float64 definition (``recurrent_gated_delta_rule_ref``);
- every parameter gradient of the summed loss: ||g_ours - g_hf|| <= 1e-4 * ||g_hf||;
- MoE: our routing counts equal transformers' top-k choices.
"""

from __future__ import annotations

import copy

import pytest
import torch
from qwen35_helpers import build_pair, hf_forward, make_samples, pack, tiny_config

from rynnscale.models.qwen3_5.gated_delta import recurrent_gated_delta_rule_ref

pytest.importorskip("transformers.models.qwen3_5")

CASES = [pytest.param(moe, text_only, id=f"{'moe' if moe else 'dense'}-{'text' if text_only else 'vl'}")
         for moe in (False, True) for text_only in (False, True)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("moe,text_only", CASES)
def test_fp32_logits_and_loss_match_transformers(moe: bool, text_only: bool) -> None:
    args, hf, ours = build_pair(tiny_config(moe, tie=moe, text_only=text_only))
    samples = make_samples(torch.Generator().manual_seed(0), multimodal=not text_only)
    batch = pack(samples)
    with torch.no_grad():
        out = ours(batch)
        logits = ours.logits(out.hidden_ld)
        loss_sum = float(ours.loss_sum(batch, out))
    start, hf_loss_sum = 0, 0.0
    with torch.no_grad():
        for s in samples:
            ref = hf_forward(hf, s)
            n = s["ids"].numel()
            err = _rel(logits[start:start + n], ref.logits[0])
            assert err <= 1e-5, f"sample of {n} tokens: logits rel err {err:.2e}"
            hf_loss_sum += float(ref.loss) * int((s["labels"][1:] != -100).sum())
            start += n
    assert loss_sum == pytest.approx(hf_loss_sum, rel=1e-5)


def _float64_delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                        use_qk_l2norm_in_kernel=False, **kwargs):
    """transformers' ``torch_chunk_gated_delta_rule`` signature ([B=1, T, heads, d]) over the float64 definition."""
    cu = torch.tensor([0, query.shape[1]])
    o, state = recurrent_gated_delta_rule_ref(query[0], key[0], value[0], g[0], beta[0], cu,
                                              use_qk_l2norm=use_qk_l2norm_in_kernel)
    return o[None], state if output_final_state else None


@pytest.mark.parametrize("moe,text_only", [CASES[1], CASES[2]])
def test_float64_logits_match_transformers(moe: bool, text_only: bool, monkeypatch) -> None:
    from transformers.models.qwen3_5 import modeling_qwen3_5
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe

    for module in (modeling_qwen3_5, modeling_qwen3_5_moe):
        monkeypatch.setattr(module, "torch_chunk_gated_delta_rule", _float64_delta_rule)
    args, hf, ours = build_pair(tiny_config(moe, text_only=text_only))
    hf.config.get_text_config()._experts_implementation = "eager"
    hf, ours = hf.double(), ours.double()
    samples = make_samples(torch.Generator().manual_seed(1), multimodal=not text_only)
    for s in samples:
        for key in ("pixel_values", "pixel_values_videos"):
            if s[key] is not None:
                s[key] = s[key].double()
    batch = pack(samples)
    with torch.no_grad():
        logits = ours.logits(ours(batch).hidden_ld)
        start = 0
        for s in samples:
            n = s["ids"].numel()
            err = _rel(logits[start:start + n], hf_forward(hf, s).logits[0])
            assert err <= 1e-6, f"sample of {n} tokens: float64 logits rel err {err:.2e}"
            start += n


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_gradients_match_transformers(moe: bool) -> None:
    """Gradients of the summed next-token loss over the row (vision-language, multimodal samples)."""
    args, hf, ours = build_pair(tiny_config(moe))
    hf.train()
    ours.train()
    samples = make_samples(torch.Generator().manual_seed(2), multimodal=True)
    batch = pack(samples)
    out = ours(batch)
    ours.loss_sum(batch, out).backward()
    for s in samples:
        ref = hf_forward(hf, s)
        (ref.loss * int((s["labels"][1:] != -100).sum())).backward()
    hf_grads = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        g_hf = hf_grads[name].grad
        if g_hf is None or float(g_hf.norm()) == 0.0:
            assert p.grad is None or float(p.grad.norm()) == 0.0, name
            continue
        err = float((p.grad - g_hf).norm() / g_hf.norm())
        assert err <= 1e-4, f"{name}: grad rel err {err:.2e}"
        checked += 1
    assert checked > 0.9 * len(hf_grads)


def test_moe_routing_counts_match_transformers_topk() -> None:
    args, hf, ours = build_pair(tiny_config(True, text_only=True))
    samples = make_samples(torch.Generator().manual_seed(3), multimodal=False)
    router_logits = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: router_logits.append(o[0].detach()))
             for layer in hf.model.layers]
    with torch.no_grad():
        counts = ours(pack(samples)).expert_counts
        for s in samples:
            hf_forward(hf, s)
    for h in hooks:
        h.remove()
    n_layers = len(hf.model.layers)
    expected = torch.zeros_like(counts)
    for j, logits_te in enumerate(router_logits):
        top = torch.topk(torch.softmax(logits_te.float(), -1), args.text.num_experts_per_tok, dim=-1).indices
        expected[j % n_layers] += torch.bincount(top.reshape(-1), minlength=args.text.num_experts)
    assert torch.equal(counts, expected)


def test_a_packed_row_of_three_documents_equals_each_alone() -> None:
    """Ours only, fp32: the DeltaNet state and convolution window restart at every document boundary."""
    _, _, ours = build_pair(tiny_config(True))
    samples = make_samples(torch.Generator().manual_seed(4), multimodal=True)
    with torch.no_grad():
        packed = ours.logits(ours(pack(samples)).hidden_ld)
        start = 0
        for s in samples:
            alone = ours.logits(ours(pack([copy.deepcopy(s)])).hidden_ld)
            n = s["ids"].numel()
            err = _rel(packed[start:start + n], alone)
            assert err <= 1e-5, f"document of {n} tokens: packed vs alone rel err {err:.2e}"
            start += n
