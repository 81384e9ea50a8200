"""Regional torch.compile computes the same function as eager: loss, aux loss, expert counts and every
parameter gradient of a tiny MoE model with an image and a video (decoder layers AND vision blocks
compiled), alone, under activation checkpointing, and with LoRA adapters (attention, MLP, experts, vision;
base frozen) under full checkpointing; a second packed row of another length reuses
the compiled blocks (dynamic shapes) and still matches eager. Tolerance: Inductor reorders fp32
reductions, so max |diff| <= 1e-4 x max |grad| per gradient tensor, rel 1e-5 on the loss (eager vs eager is bit-exact)."""

from __future__ import annotations

import pytest
import torch
from test_text_parity import make_samples, pack, tiny_args

from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
from rynnscale.parallel.activation_checkpoint import apply_activation_checkpointing
from rynnscale.parallel.compile import compile_blocks

pytestmark = pytest.mark.slow  # Inductor compiles C++ on the CPU: ~3 min on 2 cores; dynamo's tracing alone ~45 s


def _model(ac: str, compiled: bool, lora: bool = False):
    model = Qwen3VLForConditionalGeneration(tiny_args(moe=True), attn_backend="sdpa_mask", gemm_backend="auto")
    model.init_weights(seed=5, std=0.1)
    if lora:  # adapters on attention, MLP, every expert and the vision blocks; B non-zero so all factors move
        from lora_helpers import add_random_lora

        add_random_lora(model, seed=6)
    model.set_kernels("auto")
    apply_activation_checkpointing(model, ac)
    if compiled:
        assert compile_blocks(model) == len(model.model.language_model.layers) + len(model.model.visual.blocks)
        kernels = {m.kernels for m in model.model.language_model.layers.modules() if hasattr(m, "kernels")}
        assert kernels == {"torch"} and model.lm_head.kernels == "auto"  # Inductor fuses inside the blocks
    return model


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    loss = model.loss_sum(batch, out, chunk_tokens=16) + out.aux_loss
    loss.backward()
    grads = {k.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
             for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), out.expert_counts, grads


@pytest.mark.parametrize("ac,lora", [("none", False), ("selective", False), ("full", True)],
                         ids=["none", "selective", "lora+full"])
def test_compiled_blocks_match_eager(ac, lora):
    torch._dynamo.reset()
    eager, comp = _model(ac, False, lora), _model(ac, True, lora)
    assert set(comp.state_dict()) == set(eager.state_dict())  # compile in place: HF keys unchanged
    lengths = set()
    for seed, keep in ((7, 3), (8, 2)):  # the second row is shorter: dynamic shapes, no wrong reuse
        batch = pack(make_samples(torch.Generator().manual_seed(seed), multimodal=True)[:keep])
        lengths.add(batch.input_ids_l.numel())
        ref_loss, ref_counts, ref_grads = _step(eager, batch)
        loss, counts, grads = _step(comp, batch)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        assert torch.equal(counts, ref_counts)
        assert set(grads) == set(ref_grads)
        for k, g in ref_grads.items():  # relative to the tensor's largest entry (sums reordered)
            err = (grads[k] - g).abs().max().item()
            assert err <= 1e-4 * g.abs().max().item() + 1e-12, f"{k}: max |diff| {err:.3g}"
    assert len(lengths) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ac", ["none", "selective"])
def test_compiled_blocks_match_eager_on_cuda_bf16(ac):
    """The GPU path: bf16, flash varlen attention and the grouped-GEMM kernel inside the compiled graph
    (fullgraph=True: no graph break allowed). bf16 tolerances: loss rel 1e-2, every gradient max |diff|
    <= 5e-2 x max |grad|."""
    torch._dynamo.reset()
    batch = pack(make_samples(torch.Generator().manual_seed(7), multimodal=True)).to("cuda", float_dtype=torch.bfloat16)
    res = []
    for compiled in (False, True):
        model = Qwen3VLForConditionalGeneration(tiny_args(moe=True)).to("cuda")
        model.init_weights(seed=5, std=0.1)
        model.to(torch.bfloat16)
        apply_activation_checkpointing(model, ac)
        if compiled:
            compile_blocks(model, fullgraph=True)
        res.append(_step(model, batch))
    (ref_loss, ref_counts, ref_grads), (loss, counts, grads) = res
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=1e-2, atol=0)
    for k, g in ref_grads.items():
        err = (grads[k].float() - g.float()).abs().max().item()
        assert err <= 5e-2 * g.float().abs().max().item() + 1e-4, (k, err)


def _linear_calls(gm: torch.fx.GraphModule) -> int:
    """Linear layers in a graph dynamo captured, those inside a checkpoint's subgraph included."""
    return sum(1 for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
               if n.op == "call_function" and "linear" in str(n.target))


def _compiled_graphs(kind: str, ac: str) -> list[tuple[int, bool]]:
    """(linear calls, holds a checkpoint) of every graph compiled during one forward + backward of a tiny ``kind``
    model (a recording backend: no Inductor)."""
    torch._dynamo.reset()
    captured = []

    def record(gm, example_inputs):
        checkpointed = any("checkpoint" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        captured.append((_linear_calls(gm), checkpointed))
        return gm.forward

    if kind == "qwen3.5":   # DeltaNet layers (their delta rule is torch.compiler.disable'd) and a MoE
        import qwen35_helpers as h

        from rynnscale.models import args_from_hf_config
        from rynnscale.models.qwen3_5.model import new_model

        model = new_model(args_from_hf_config(h.tiny_config(moe=True)), attn_backend="sdpa_mask")
        batch = h.pack(h.make_samples(torch.Generator().manual_seed(7), multimodal=True))
    else:                   # the MoE's fp32 CPU experts take the per-expert loop (torch.compiler.disable'd)
        model = Qwen3VLForConditionalGeneration(tiny_args(moe=kind == "qwen3-vl-moe"), attn_backend="sdpa_mask")
        batch = pack(make_samples(torch.Generator().manual_seed(7), multimodal=True))
    model.init_weights(seed=5, std=0.1)
    apply_activation_checkpointing(model, ac)
    compile_blocks(model, backend=record)
    out = model(batch)
    (model.loss_sum(batch, out, chunk_tokens=16) + out.aux_loss).backward()
    return captured


@pytest.mark.parametrize("kind", ["qwen3-vl-dense", "qwen3-vl-moe", "qwen3.5"])
def test_checkpointed_blocks_are_compiled(kind):
    """Checkpointing does not change what is compiled: a block with an eager-only call (the per-expert GEMM loop,
    the DeltaNet delta rule) traced as one checkpointed graph breaks, and torch then ran the whole block eagerly
    (no graph at all); compiled on its own inside the checkpoint, its parts between those calls are compiled.
    Blocks that trace whole (every block of the dense model) keep the checkpoint inside their one graph."""
    reference = sum(n for n, _ in _compiled_graphs(kind, "none"))
    assert reference > 0
    for ac in ("full", "selective"):
        graphs = _compiled_graphs(kind, ac)
        assert sum(n for n, _ in graphs) == reference, ac
        if kind == "qwen3-vl-dense":
            assert graphs and all(checkpointed for _, checkpointed in graphs), (ac, graphs)
