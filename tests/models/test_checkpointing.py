"""Activation checkpointing modes give the same loss, aux loss and gradients as no checkpointing
(MoE model with an image and a video, so decoder layers and vision blocks are both recomputed)."""

from __future__ import annotations

import pytest
import torch
from test_text_parity import make_samples, pack, tiny_args
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
from rynnscale.parallel.activation_checkpoint import apply_activation_checkpointing


def _loss_and_grads(mode: str, every: int = 1):
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(tiny_args(moe=True), attn_backend="loop")
    model.init_weights(seed=5, std=0.1)
    n = apply_activation_checkpointing(model, mode, every)
    batch = pack(make_samples(torch.Generator().manual_seed(7), multimodal=True))
    out = model(batch)
    loss = model.loss_sum(batch, out, chunk_tokens=16) + out.aux_loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return model, n, loss.detach(), out.expert_counts, grads


def test_modes_give_identical_loss_and_grads():
    ref_model, n0, ref_loss, ref_counts, ref_grads = _loss_and_grads("none")
    assert n0 == 0
    for mode, every, expected in (("full", 1, 4 + 2), ("every_k", 2, 2 + 1), ("selective", 1, 4 + 2)):
        model, n, loss, counts, grads = _loss_and_grads(mode, every)
        assert n == expected
        assert sum(isinstance(m, CheckpointWrapper) for m in model.modules()) == expected
        assert torch.equal(loss, ref_loss) and torch.equal(counts, ref_counts)
        # names differ only by the wrapper prefix; state_dict keys do not differ at all
        assert set(model.state_dict()) == set(ref_model.state_dict())
        strip = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in grads.items()}
        assert set(strip) == set(ref_grads)
        for k, g in ref_grads.items():
            torch.testing.assert_close(strip[k], g, rtol=0, atol=0, msg=k)
    # wrapped model still loads plain HF-style keys strictly
    model.load_state_dict(ref_model.state_dict(), strict=True)


def test_bad_mode():
    model = Qwen3VLForConditionalGeneration(tiny_args(moe=False))
    with pytest.raises(ValueError, match="not one of"):
        apply_activation_checkpointing(model, "bogus")
    with pytest.raises(ValueError, match="positive integer"):
        apply_activation_checkpointing(model, "every_k", 0)
