"""Activation checkpointing modes give the same loss, aux loss and gradients as no checkpointing
(MoE model with an image and a video, so decoder layers and vision blocks are both recomputed)."""

from __future__ import annotations

import contextlib

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


def test_selective_keeps_the_flash_varlen_attention_output():
    """The ``varlen`` backend's kernel (torch.nn.attention.varlen) is a custom op: the selective policy sees that op,
    not the aten flash kernel inside it, so it must be on the save list or every layer's attention is recomputed
    in backward on the GPU. The op the dispatch mode sees is read off a real call (it fails on the CPU after)."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    from torch.utils._python_dispatch import TorchDispatchMode

    from rynnscale.parallel.activation_checkpoint import SELECTIVE_SAVE_OPS

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    q = torch.randn(4, 2, 8, device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=q.device)
    with Record(), contextlib.suppress(RuntimeError, NotImplementedError):
        varlen.varlen_attn(q, q, q, cu, cu, 4, 4)
    assert seen, "varlen_attn dispatched no op"
    assert seen[0] in SELECTIVE_SAVE_OPS, f"{seen[0]} (the varlen kernel as selective checkpointing sees it)"
