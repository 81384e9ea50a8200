"""The GRPO loss (``rynnscale.train.objectives.GRPO``) against TRL's own loss computation (the oracle).

TRL's ``GRPOTrainer._compute_loss`` runs unchanged on a stand-in trainer whose model call returns the given
per-token log-probs; ours runs on the same log-probs, old / reference log-probs, advantages and masks, laid
out as packed rows (one document per completion). Loss and gradient w.r.t. the log-probs agree: fp64 rel
1e-10, fp32 rel 1e-5, for token averaging (TRL ``dapo`` and ``bnpo``) and sequence averaging (TRL ``grpo``),
with and without the KL term, clipping on both sides. Then: the objective on a model equals the same terms
computed from full fp64 logits, and group-normalised advantages equal TRL's formula (``nanstd``)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from rynnscale.batch import IGNORE_INDEX
from rynnscale.train.objectives import GRPO, RolloutBatch, grpo_token_terms, sequence_token_weights

EPS_LOW, EPS_HIGH = 0.2, 0.28


def trl_loss(logps, old, ref, adv, mask, loss_type: str, beta: float) -> torch.Tensor:
    """TRL's ``_compute_loss`` on the given [B, T] per-token log-probs (one process, no accumulation)."""
    B, T = logps.shape
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH, use_vllm=False, vllm_importance_sampling_correction=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=T,
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                    reduce=lambda x, reduction="sum": x, sync_gradients=True),
        _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(fake, None, inputs)


def ours(logps, old, ref, adv, mask, averaging: str, beta: float) -> torch.Tensor:
    """Our loss on the same values as packed rows: document b = completion b's T positions (mask 0 = padding)."""
    B, T = logps.shape
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
    m = mask.reshape(-1).to(logps.dtype)
    terms = grpo_token_terms(logps.reshape(-1), old.reshape(-1), ref.reshape(-1) if beta else None,
                             adv[:, None].expand(B, T).reshape(-1), EPS_LOW, EPS_HIGH, beta)
    if averaging == "token":
        return (terms["loss"] * m).sum() / m.sum()
    return (terms["loss"] * sequence_token_weights(cu, m).to(logps.dtype)).sum() / B


def inputs(dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    mask = (torch.rand(B, T, generator=g) < 0.8).long()
    mask[:, 0] = 1
    mask[2, 5:] = 0                                            # a shorter completion
    logps = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).to(dtype)
    old = logps + (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).to(dtype)   # ratios well outside 1 +- eps
    ref = logps + (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    adv = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("beta", [0.0, 0.02])
@pytest.mark.parametrize("averaging,loss_types", [("token", ["dapo", "bnpo"]), ("sequence", ["grpo"])])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_loss_and_gradients_equal_trl(averaging, loss_types, beta, dtype, rtol) -> None:
    logps, old, ref, adv, mask = inputs(dtype)
    ratio = torch.exp(logps - old)
    assert ((ratio < 1 - EPS_LOW) & (adv[:, None] < 0)).any() and ((ratio > 1 + EPS_HIGH) & (adv[:, None] > 0)).any()
    x = logps.clone().requires_grad_()
    got = ours(x, old, ref, adv, mask, averaging, beta)
    (g_ours,) = torch.autograd.grad(got, x)
    for loss_type in loss_types:
        y = logps.clone().requires_grad_()
        want = trl_loss(y, old, ref, adv, mask, loss_type, beta)
        (g_trl,) = torch.autograd.grad(want, y)
        assert abs(float(got.detach()) - float(want.detach())) <= rtol * abs(float(want.detach())), loss_type
        err = float((g_ours - g_trl).abs().max() / g_trl.abs().max())
        assert err <= rtol, f"{loss_type}: gradient rel err {err:.2e}"
        assert torch.count_nonzero(g_ours[mask == 0]) == 0


def test_objective_on_a_model_equals_terms_from_full_logits() -> None:
    """GRPO.loss on a tiny model (fp64): its loss and gradient equal the terms computed from log_softmax of the
    full logits (log-probs at temperature 0.8, chunked); the logged sums (KL, clipped tokens) match."""
    from rynnscale.config.schema import ModelConfig
    from rynnscale.models.mrope import text_position_ids
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.train.build import build_model
    from rynnscale.train.objectives import StepNormalizer

    arch = {"model_type": "qwen3_vl", "text_config": {
        "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                                     "mrope_section": [2, 1, 1]}},
        "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                          "out_hidden_size": 32, "deepstack_visual_indexes": []}, "tie_word_embeddings": False,
        "image_token_id": 296, "video_token_id": 297, "vision_start_token_id": 298, "vision_end_token_id": 299}
    _, model = build_model(ModelConfig(arch=arch, attn_backend="loop"), seed=0)
    model.double()
    g = torch.Generator().manual_seed(0)
    lens, prompt = [7, 11, 5], [3, 4, 2]
    ids = torch.randint(0, 300, (sum(lens),), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    adv = torch.zeros(sum(lens), dtype=torch.float64)
    start = 0
    for n, p, a in zip(lens, prompt, [1.5, -0.7, 0.3]):
        labels[start + p:start + n] = ids[start + p:start + n]
        adv[start + p:start + n] = a
        start += n
    mask = labels != IGNORE_INDEX
    old = torch.where(mask, -torch.rand(sum(lens), generator=g, dtype=torch.float64) * 6, 0.0)
    ref = torch.where(mask, -torch.rand(sum(lens), generator=g, dtype=torch.float64) * 6, 0.0)
    batch = RolloutBatch(input_ids_l=ids, labels_l=labels,
                         position_ids_3l=torch.cat([text_position_ids(n) for n in lens], 1),
                         cu_seqlens=torch.tensor([0, 7, 18, 23], dtype=torch.int32), max_seqlen=11,
                         advantages_l=adv, old_logp_l=old, ref_logp_l=ref)
    assert type(batch.to("cpu")) is RolloutBatch
    for averaging in ("token", "sequence"):
        obj = GRPO(beta=0.05, loss_averaging=averaging, temperature=0.8, chunk_tokens=4)
        norm = StepNormalizer(count=int(mask.sum()) if averaging == "token" else 3, forwards=1)
        model.zero_grad()
        part = obj.loss(model, batch, norm, DistContext(device=torch.device("cpu")))
        part.loss.backward()
        got_grad = model.lm_head.weight.grad.clone()
        model.zero_grad()
        out = model(batch)
        logits = model.logits(out.hidden_ld) / 0.8
        full = torch.zeros(sum(lens), dtype=torch.float64)
        full[1:] = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).squeeze(1)
        full = torch.where(mask, full, 0.0)
        terms = grpo_token_terms(full, old, ref, adv, 0.2, 0.2, 0.05)
        w = mask.double() if averaging == "token" else sequence_token_weights(batch.cu_seqlens, mask)
        want = (terms["loss"] * w).sum() / norm.count
        want.backward()
        assert float(part.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-10)
        torch.testing.assert_close(got_grad, model.lm_head.weight.grad, rtol=1e-9, atol=1e-12)
        assert float(part.sums["kl_sum"]) == pytest.approx(float((terms["kl"] * mask).sum()), rel=1e-10)
        assert float(part.sums["clipped_tokens"]) == float((terms["clipped"] & mask).sum())
        assert float(part.sums["completion_tokens"]) == float(mask.sum())


def test_group_advantages_equal_trl_formula() -> None:
    from rynnscale.train.grpo import group_advantages

    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(4 * 5, generator=g, dtype=torch.float64)
    rewards[7] = float("nan")                        # a failed reward: out of its group's statistics, advantage 0
    rewards[15:20] = 0.5                             # a group without spread: advantages 0
    grouped = rewards.view(-1, 5)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(5)
    std = nanstd(grouped, dim=1).repeat_interleave(5)
    want = torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)
    got = group_advantages(rewards.tolist(), 5)
    # rel 1e-6: TRL's Bessel factor count / (count - 1) divides int64 tensors, i.e. is computed in fp32
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-6, atol=1e-12)
    assert got[7] == 0.0 and got[15:20] == [0.0] * 5
    unscaled = group_advantages(rewards.tolist(), 5, scale=False)
    torch.testing.assert_close(torch.tensor(unscaled, dtype=torch.float64), torch.nan_to_num(rewards - mean, nan=0.0))
