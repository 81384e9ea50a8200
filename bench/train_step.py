"""Training-step benchmark: transformers (plain, + liger-kernel) vs rynnscale, same weights, one process.

For each case the model is built in transformers from the case's config with random weights
(HF's own init), the same state dict is loaded into rynnscale's model (HF-identical keys), the
losses of the first step (same weights, same data) are checked to agree (rel 1e-5 in fp32 on
CPU, 1e-2 in bf16 on GPU), then forward + backward + AdamW step are timed for every variant, each side
training on the cross-entropy alone (transformers computes no load-balancing loss without
``output_router_logits``, as in ../shared/ANCHORS.md; ours leaves its own out to do the same work):
tokens/s, model TFLOP/s (the family's step_flops, rynnscale/models/qwen3_vl/flops.py: decoder + lm_head + causal attention as
sum s^2 + vision tower), MFU against a matmul rate measured in this run (bf16 8192^3 on GPU, the
run's dtype on CPU), peak memory, and ours' ratios against each transformers variant. Then one
extra step of ours runs under ``StepProfiler`` (rynnscale/train/profile.py) and its step-time
breakdown is printed. The transformers rows run first, liger-kernel's rows after all others
(its patches replace transformers' classes for the rest of the process); "n/a" when
``liger_kernel`` does not import.

Cases (``--tiny`` shrinks each to CPU size, same structure):
- ``a3b``: Qwen3-VL-30B-A3B decoder widths, 8 layers, 128 experts top-8, 4 x 4096 tokens.
- ``dense8b``: Qwen3-VL-8B decoder widths, 8 layers, 4 x 4096 tokens.
- ``video``: 8B widths, 4 layers + the full 27-block vision tower, 2 x 4096 tokens, each row
  holding one 16-frame 448x448 video (8 x 28 x 28 patches, 1,568 visual tokens) laid out as the
  processor does (one vision_start / pads / vision_end run per temporal patch).
- ``packed``: the A3B slice on documents of 200-6,000 tokens packed into one 16,384-token row;
  transformers gets the same packing through ``position_ids`` (4, 1, L) with attention_mask=None
  and use_cache=False; ours through ``cu_seqlens``.
- ``q35moe`` (not in the default list: transformers >= 5.2x has Qwen3.5, the GPU image's 5.17 may not):
  Qwen3.5-35B-A3B decoder widths (RynnBrain 1.1's MoE family), 8 hybrid layers (6 Gated DeltaNet + 2 gated
  attention), 256 experts top-8 + shared expert, 4 x 4096 tokens. transformers runs its CPU torch fallbacks or
  flash-linear-attention's kernels where it finds them; liger-kernel has no Qwen3.5 patches (n/a).
Unpacked cases give ours the B rows as one packed row of B documents (same math).

Variants: ``hf`` (transformers, sdpa attention, grouped_mm experts), ``liger`` (the same + liger-kernel's
Qwen3-VL patches), ``ours`` (rynnscale as a recipe runs it by default: ``model.kernels=auto``, i.e.
liger's RMSNorm / RoPE / SwiGLU / fused loss where liger imports), ``ours-torch`` (plain PyTorch
element-wise ops), ``ours-compile`` (plain ops + regional ``torch.compile``, ``model.compile=true``;
its warmup steps include the compile) and ``ours-lora`` (``ours`` as a LoRA fine-tune: base frozen, rank-16
adapters on attention, dense MLP and, for MoE cases, every expert; its first loss equals the base's since
fresh adapters change nothing; its model FLOPs leave out the frozen weights' gradients, and it gets no ratio
against transformers, whose rows are full fine-tunes: ``x_ours`` = its tokens/s over ``ours``' full step, when both
ran). All variants of a case share the weights and the data.

CPU smoke run (each case, as bench/gpu_check.sh --dry-run runs it: tests/bench/test_gpu_check.py)::

    python bench/train_step.py --tiny --steps 1 --warmup 0

GPU (H100, torch 2.11, transformers 5.17; the image lacks liger-kernel and also omegaconf, webdataset,
braceexpand and PyAV, which rynnscale imports): ``bash bench/gpu_check.sh`` installs the carried wheels
(``bash bench/gpu_wheels.sh`` here first) and runs these cases one process each, after the GPU tests and
the trainer, under one deadline (bench/README.md, "GPU check"). Only some cases, same device call
(``carry: [".whl"]``, ``timeout_s: 600``)::

    bash bench/gpu_check.sh --sections bench_packed,bench_video --deadline 540
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rynnscale.batch import EncodedSample, PackedBatch  # noqa: E402
from rynnscale.data.packing import build_packed_batch  # noqa: E402
from rynnscale.models.mrope import mrope_position_ids  # noqa: E402
from rynnscale.models.qwen3_5.args import Qwen35Args  # noqa: E402
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs, TextArgs, VisionArgs  # noqa: E402
from rynnscale.models.stats import StepFlops, batch_flops, param_stats  # noqa: E402
from rynnscale.parallel.activation_checkpoint import MODES  # noqa: E402
from rynnscale.plan.measure import LiveTensorBytes  # noqa: E402
from rynnscale.train.build import build_model, model_config_for  # noqa: E402
from rynnscale.train.profile import StepProfiler, format_breakdown  # noqa: E402

DEFAULT_CASES = ("a3b", "dense8b", "video", "packed")
CASES = (*DEFAULT_CASES, "q35moe")
# ours = the default recipe (model.kernels=auto: liger's kernels where they import); ours-torch = plain
# PyTorch element-wise ops; ours-compile = plain ops + regional torch.compile (model.compile=true)
OURS = ("ours", "ours-torch", "ours-compile", "ours-lora")
LORA_RANK = 16  # ours-lora: rank-16 adapters on attention, dense MLP and (MoE) every expert; base frozen
VARIANTS = ("hf", "liger", *OURS)
IGNORE = -100


# ----------------------------------------------------------------------------- case definitions
@dataclass
class Case:
    name: str
    args: Qwen3VLArgs
    batch: PackedBatch          # ours: one packed row (CPU)
    hf_inputs: dict             # transformers kwargs (CPU tensors)
    n_targets: int


def case_args(name: str, tiny: bool, layers: int | None = None, experts: int | None = None) -> Qwen3VLArgs:
    """Architecture of a case (full widths, or the tiny CPU version with the same structure);
    ``layers`` overrides the decoder depth, ``experts`` the expert count of MoE cases (it changes the
    parameter count, not the activations: those depend on tokens, top-k and the widths)."""
    args = _case_args(name, tiny)
    if experts is not None and args.text.is_moe:
        args.text.num_experts = experts
    if layers is not None:
        args.text.num_hidden_layers = layers
        if isinstance(args, Qwen35Args):   # keep the 3:1 hybrid pattern
            args.text.layer_types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                                     for i in range(layers)]
        else:  # DeepStack adds one vision feature per decoder layer: at most `layers` of them
            args.vision.deepstack_visual_indexes = args.vision.deepstack_visual_indexes[:layers]
    return args


def _qwen35_args(tiny: bool) -> Qwen35Args:
    """Qwen3.5-35B-A3B's decoder widths (rynnscale/models/qwen3_5/presets.py) with 8 layers, or a tiny twin."""
    from rynnscale.models import args_from_hf_config, preset_config

    cfg = preset_config("qwen3.5-35b-a3b")
    text, vision = cfg["text_config"], cfg["vision_config"]
    text.update(num_hidden_layers=8, layer_types=text["layer_types"][:8])
    vision.update(depth=2)
    if tiny:
        text.update(vocab_size=512, hidden_size=64, num_hidden_layers=4, layer_types=text["layer_types"][:4],
                    num_attention_heads=8, num_key_value_heads=1, head_dim=32, linear_num_key_heads=2,
                    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=8,
                    num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
        text["rope_parameters"]["mrope_section"] = [2, 1, 1]
        vision.update(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                      num_position_embeddings=16)
        cfg.update(image_token_id=501, video_token_id=502, vision_start_token_id=503, vision_end_token_id=504)
    else:
        vision.update(out_hidden_size=text["hidden_size"])
    return args_from_hf_config(cfg, strict=True)


def _case_args(name: str, tiny: bool) -> Qwen3VLArgs | Qwen35Args:
    if name == "q35moe":
        return _qwen35_args(tiny)
    moe = name in ("a3b", "packed")
    if tiny:
        tok = dict(image_token_id=501, video_token_id=502, vision_start_token_id=503, vision_end_token_id=504)
        text = TextArgs(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=8 if moe else 4,
                        num_key_value_heads=1, head_dim=16, mrope_section=[2, 3, 3], intermediate_size=192,
                        num_experts=8 if moe else 0, num_experts_per_tok=2, moe_intermediate_size=32)
        vision = VisionArgs(depth=3 if name == "video" else 2, hidden_size=32, intermediate_size=64, num_heads=2,
                            out_hidden_size=64, patch_size=8, num_position_embeddings=16,
                            deepstack_visual_indexes=[0, 1])
        return Qwen3VLArgs(text=text, vision=vision, **tok)
    if moe:
        text = TextArgs(hidden_size=2048, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4,
                        head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                        intermediate_size=6144, vocab_size=151936)
        vision = VisionArgs(depth=2, out_hidden_size=2048, deepstack_visual_indexes=[0, 1])
    else:
        text = TextArgs(hidden_size=4096, num_hidden_layers=4 if name == "video" else 8, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936)
        vision = VisionArgs(depth=27, out_hidden_size=4096, deepstack_visual_indexes=[8, 16, 24]) \
            if name == "video" else VisionArgs(depth=2, out_hidden_size=4096, deepstack_visual_indexes=[0, 1])
    return Qwen3VLArgs(text=text, vision=vision)


def _text_sample(key: str, ids: torch.Tensor) -> EncodedSample:
    labels = ids.clone()
    labels[0] = IGNORE
    pos = torch.arange(ids.numel()).expand(3, -1).clone()
    return EncodedSample(key, ids, labels, pos)


def doc_lengths(total: int, lo: int, hi: int, seed: int) -> list[int]:
    """Document lengths drawn log-uniformly in [lo, hi] filling exactly ``total`` tokens (the last
    one takes the remainder, or joins the previous document if the remainder is below ``lo``)."""
    rng = random.Random(seed)
    lens: list[int] = []
    left = total
    while left > hi:
        n = min(int(math.exp(rng.uniform(math.log(lo), math.log(hi)))), left - lo)
        lens.append(n)
        left -= n
    if left >= lo or not lens:
        lens.append(left)
    else:
        lens[-1] += left
    return lens


def build_case(name: str, tiny: bool, seed: int = 0, layers: int | None = None, seq_div: int = 1,
               experts: int | None = None) -> Case:
    """``seq_div`` divides the text-case token counts (a3b, dense8b, packed), e.g. for CPU memory runs
    at real widths."""
    args = case_args(name, tiny, layers, experts)
    g = torch.Generator().manual_seed(seed)
    text_hi = min(args.vision_start_token_id, args.image_token_id, 151643) - 1
    if name in ("a3b", "dense8b", "q35moe"):
        B, S = (4, 64) if tiny else (4, 4096)
        S //= seq_div
        ids_bs = torch.randint(0, text_hi, (B, S), generator=g)
        batch = build_packed_batch([_text_sample(f"row{i}", ids_bs[i]) for i in range(B)])
        labels_bs = batch.labels_l.view(B, S)
        hf = dict(input_ids=ids_bs, labels=labels_bs)
    elif name == "packed":
        total, lo, hi = (256, 8, 96) if tiny else (16384, 200, 6000)
        total //= seq_div
        lo, hi = min(lo, total), min(hi, total)
        lens = doc_lengths(total, lo, hi, seed)
        ids = torch.randint(0, text_hi, (total,), generator=g)
        bounds = [0, *torch.tensor(lens).cumsum(0).tolist()]
        batch = build_packed_batch([_text_sample(f"doc{i}", ids[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))])
        text_pos = torch.cat([torch.arange(n) for n in lens])
        hf = dict(input_ids=batch.input_ids_l[None], labels=batch.labels_l[None],
                  position_ids=torch.cat([text_pos[None], batch.position_ids_3l])[:, None, :])
    elif name == "video":
        B, S, frames, res = (2, 64, 4, 32) if tiny else (2, 4096, 16, 448)
        v = args.vision
        grid = (frames // v.temporal_patch_size, res // v.patch_size, res // v.patch_size)
        per = grid[1] * grid[2] // v.spatial_merge_size ** 2
        npatch = grid[0] * grid[1] * grid[2]
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        samples = []
        for i in range(B):
            ids = torch.randint(0, text_hi, (S,), generator=g)
            pos = 1  # one text token first, then one <vision_start> pads <vision_end> run per temporal patch
            for _ in range(grid[0]):
                ids[pos] = args.vision_start_token_id
                ids[pos + 1:pos + 1 + per] = args.video_token_id
                ids[pos + 1 + per] = args.vision_end_token_id
                pos += per + 2
            labels = ids.clone()
            labels[0] = IGNORE
            labels[(ids == args.video_token_id) | (ids == args.vision_start_token_id)] = IGNORE
            vgrid = torch.tensor([grid])
            samples.append(EncodedSample(
                f"video{i}", ids, labels,
                mrope_position_ids(ids, None, vgrid, spatial_merge_size=v.spatial_merge_size,
                                   image_token_id=args.image_token_id, video_token_id=args.video_token_id),
                pixel_values_videos=torch.randn(npatch, patch_dim, generator=g), video_grid_thw=vgrid))
        batch = build_packed_batch(samples)
        ids_bs = batch.input_ids_l.view(B, S)
        hf = dict(input_ids=ids_bs, labels=batch.labels_l.view(B, S),
                  mm_token_type_ids=(ids_bs == args.video_token_id).long() * 2,
                  pixel_values_videos=batch.pixel_values_videos, video_grid_thw=batch.video_grid_thw)
    else:
        raise ValueError(f"unknown case {name!r}; allowed: {CASES}")
    return Case(name, args, batch, hf, batch.num_target_tokens)


# ----------------------------------------------------------------------------- models
def build_hf(args: Qwen3VLArgs | Qwen35Args, device: torch.device, dtype: torch.dtype):
    import transformers

    if isinstance(args, Qwen35Args):   # transformers' own class of the config (Qwen3_5MoeForConditionalGeneration)
        hf_cfg = args.to_hf_config()
        cfg = transformers.AutoConfig.for_model(**hf_cfg)
        kw = dict(dtype=dtype, attn_implementation="sdpa")
        if args.text.is_moe:
            kw["experts_implementation"] = "grouped_mm"
        with torch.device(device):
            return getattr(transformers, hf_cfg["architectures"][0])._from_config(cfg, **kw)
    cfg_dict = {k: v for k, v in args.to_hf_config().items() if k not in ("architectures", "model_type")}
    moe = args.text.is_moe
    cfg = (transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig)(**cfg_dict)
    cls = transformers.Qwen3VLMoeForConditionalGeneration if moe else transformers.Qwen3VLForConditionalGeneration
    kw = dict(dtype=dtype, attn_implementation="sdpa")
    if moe:
        kw["experts_implementation"] = "grouped_mm"
    with torch.device(device):
        return cls._from_config(cfg, **kw)


def lora_config(args: Qwen3VLArgs, lora: bool):
    """``model.lora`` of the ``ours-lora`` variant (rank-16 adapters on attention, dense MLP and, for MoE, every
    expert), or LoRA off."""
    from rynnscale.config.schema import LoRAConfig

    return LoRAConfig(rank=LORA_RANK, alpha=2.0 * LORA_RANK, experts=args.text.is_moe) if lora else LoRAConfig()


def variant_flops(case: Case, variant: str) -> StepFlops:
    """Model FLOPs of one step of ``variant`` on ``case``: a full fine-tune for every variant but ``ours-lora``,
    whose frozen base weights take no weight gradient (``rynnscale.models.stats.backward_skips``)."""
    mc = model_config_for(case.args, lora=lora_config(case.args, variant == "ours-lora"))
    return batch_flops(case.args, param_stats(build_model(mc, meta=True)[1]), case.batch)


def build_ours(args: Qwen3VLArgs, weights: dict, device: torch.device, dtype: torch.dtype, *, kernels: str = "auto",
               ckpt: str = "none", compile: bool = False, lora: bool = False):
    """Our model as training builds it (``rynnscale.train.build``), in ``dtype``, with ``weights``
    (``lora``: plus fresh adapters, which leave the first loss unchanged)."""
    mc = model_config_for(args, kernels=kernels, activation_checkpointing=ckpt, compile=compile,
                          lora=lora_config(args, lora))
    _, m = build_model(mc, device, param_dtype=dtype)
    m.load_state_dict(weights, strict=not lora)  # the adapters are not in the base weights
    return m


def apply_liger(moe: bool) -> None:
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl, apply_liger_kernel_to_qwen3_vl_moe

    (apply_liger_kernel_to_qwen3_vl_moe if moe else apply_liger_kernel_to_qwen3_vl)()


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul rate of this device in ``dtype`` (median of several n^3 products)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ts = []
    for i in range(13 if device.type == "cuda" else 4):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= (3 if device.type == "cuda" else 1):
            ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts) / 1e12


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(variant: str, case: Case, weights: dict, ckpt: str, device, dtype, steps: int, warmup: int,
                flops: StepFlops, ceiling: float, profile: bool) -> dict:
    """Build one variant, run warmup + timed steps (fwd + bwd + AdamW); losses of every step."""
    row = dict(case=case.name, variant=variant, ckpt=ckpt, tokens=case.batch.num_tokens)
    if variant not in OURS and ckpt not in ("none", "full"):
        return row | dict(na=f"transformers has no '{ckpt}' checkpointing")
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    breakdown = None
    if variant in OURS:
        model = build_ours(case.args, weights, device, dtype,
                           kernels="auto" if variant in ("ours", "ours-lora") else "torch",
                           ckpt=ckpt, compile=variant == "ours-compile", lora=variant == "ours-lora")
        batch = case.batch.to(device, float_dtype=dtype)

        def step():  # cross-entropy alone, as transformers trains without output_router_logits (below)
            out = model(batch)
            ce = model.loss_sum(batch, out) / case.n_targets
            ce.backward()
            return ce.detach()
    else:
        model = build_hf(case.args, device, dtype)
        model.load_state_dict(weights, strict=True)
        if ckpt == "full":  # transformers 5.24 renamed it; 5.17 (GPU machine) has the old name only
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in case.hf_inputs.items()}
        coef = case.args.text.router_aux_loss_coef

        def step():
            out = model(**inputs, use_cache=False)
            out.loss.backward()
            aux = getattr(out, "aux_loss", None)   # None: no output_router_logits, no load-balancing term
            return (out.loss - coef * aux if aux is not None else out.loss).detach()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **({"fused": True} if device.type == "cuda" else {}))
    losses, times = [], []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        losses.append(float(loss))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if profile and variant in OURS:
        prof = StepProfiler(model)
        host_batch = case.batch
        with prof.region("data wait"):
            batch = host_batch.to(device, float_dtype=dtype)
        step()
        with prof.region("optimiser"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        breakdown = prof.stop()
        prof.remove()
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    step_gib = None
    if variant != "ours-compile":  # (a dispatch mode does not see inside compiled graphs)
        # bytes of every tensor created by one forward + backward (activations, temporaries, gradients;
        # not parameters or optimiser state): a like-for-like memory figure on any device, CPU included
        with LiveTensorBytes() as mem:
            step()
        opt.zero_grad(set_to_none=True)
        step_gib = mem.peak / 2 ** 30
    t = statistics.median(times)
    tflops = flops.total / t / 1e12
    row |= dict(step_s=t, tokens_per_s=case.batch.num_tokens / t, tflops=tflops, mfu=tflops / ceiling,
                decoder_tflops=flops.decoder / t / 1e12, peak_gib=peak_gib, step_alloc_gib=step_gib,
                losses=losses, breakdown=breakdown)
    model = opt = None  # free before the next variant (the step closures hold the name, not the object)
    _free(device)
    return row


# ----------------------------------------------------------------------------- report
def _fmt(x, spec: str, na: str = "n/a") -> str:
    return na if x is None else format(x, spec)


def add_comparisons(rows: list[dict], rtol: float) -> bool:
    """Loss check vs plain transformers (same case, same ckpt, first step) and ours' speed ratios."""
    ok = True
    key = {(r["case"], r["ckpt"], r["variant"]): r for r in rows}
    for r in rows:
        if "losses" not in r:
            continue
        ref = key.get((r["case"], r["ckpt"], "hf"))
        if ref is None or "losses" not in ref:
            ref = next((x for x in rows if x["case"] == r["case"] and x["variant"] == "hf" and "losses" in x), None)
        if ref is not None and ref is not r:
            rel = abs(r["losses"][0] - ref["losses"][0]) / abs(ref["losses"][0])
            r["loss_rel_vs_hf"] = rel
            r["loss_max_rel_vs_hf"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
            r["loss_ok"] = rel <= rtol
            ok &= r["loss_ok"]
        if r["variant"] == "ours-lora":   # a LoRA step is not a full fine-tune's work: against ours' full step only
            full = key.get((r["case"], r["ckpt"], "ours"))
            if full is not None and "tokens_per_s" in full:
                r["x_ours"] = r["tokens_per_s"] / full["tokens_per_s"]
        elif r["variant"] in OURS:
            for v in ("hf", "liger"):
                other = key.get((r["case"], r["ckpt"], v))
                if other is not None and "tokens_per_s" in other:
                    r[f"x_{v}"] = r["tokens_per_s"] / other["tokens_per_s"]
                    if r.get("step_alloc_gib") and other.get("step_alloc_gib"):
                        r[f"mem_vs_{v}"] = r["step_alloc_gib"] / other["step_alloc_gib"]
                theirs = [x for x in rows if x["case"] == r["case"] and x["variant"] == v and "tokens_per_s" in x]
                if theirs:   # their fastest row over every ckpt mode, and ours' peak memory against that row's
                    best = max(theirs, key=lambda x: x["tokens_per_s"])
                    r[f"x_best_{v}"] = r["tokens_per_s"] / best["tokens_per_s"]
                    r[f"best_{v}_ckpt"] = best["ckpt"]
                    if r.get("peak_gib") and best.get("peak_gib"):
                        r[f"peak_vs_best_{v}"] = r["peak_gib"] / best["peak_gib"]
    return ok


def format_table(rows: list[dict], ceiling: float, device_name: str, dtype) -> str:
    out = [f"device {device_name}; {str(dtype).removeprefix('torch.')} matmul rate measured {ceiling:.3g} TFLOP/s",
           f"{'case':8} {'variant':12} {'ckpt':9} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peakGiB':>8} "
           f"{'stepGiB':>8} {'memxHF':>6} {'loss':>9} {'rel.vsHF':>9} {'xHF':>6} {'xliger':>6} {'xbestHF':>7} {'xbestLig':>8} {'pkxBLig':>7}"]
    for r in rows:
        head = f"{r['case']:8} {r['variant']:12} {r['ckpt']:9}"
        if "na" in r or "error" in r:
            out.append(f"{head} {'n/a' if 'na' in r else 'ERROR'}: {r.get('na') or r.get('error')}")
            continue
        rel = r.get("loss_rel_vs_hf")
        flag = "" if r.get("loss_ok", True) else " LOSS MISMATCH"
        out.append(f"{head} {r['tokens_per_s']:10.0f} {r['tflops']:8.3g} {100 * r['mfu']:5.1f}% "
                   f"{_fmt(r['peak_gib'], '8.1f'):>8} {_fmt(r.get('step_alloc_gib'), '8.3f'):>8} "
                   f"{_fmt(r.get('mem_vs_hf'), '6.2f', '-'):>6} {r['losses'][0]:9.5f} {_fmt(rel, '9.1e', '-'):>9} "
                   f"{_fmt(r.get('x_hf'), '6.2f', '-'):>6} {_fmt(r.get('x_liger'), '6.2f', '-'):>6} "
                   f"{_fmt(r.get('x_best_hf'), '7.2f', '-'):>7} {_fmt(r.get('x_best_liger'), '8.2f', '-'):>8} "
                   f"{_fmt(r.get('peak_vs_best_liger'), '7.2f', '-'):>7}{flag}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma list of {CASES}")
    p.add_argument("--ckpt", default=None, help=f"comma list of activation checkpointing modes {MODES} "
                   "(default: none,full on GPU, none on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 GPU, 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2 GPU, 1 CPU)")
    p.add_argument("--tiny", action="store_true", help="CPU-sized shapes with the same structure")
    p.add_argument("--layers", type=int, default=None, help="override the decoder depth of every case")
    p.add_argument("--experts", type=int, default=None, help="override the expert count of the MoE cases")
    p.add_argument("--seq-div", type=int, default=1, help="divide the text cases' token counts (CPU memory runs "
                   "at real widths)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--variants", default=None, help=f"comma list of {VARIANTS} (default: all on GPU; "
                   "hf,liger,ours on CPU, where Inductor's C++ compile would dominate)")
    p.add_argument("--json", type=Path, help="write all rows, FLOPs and breakdowns here")
    a = p.parse_args(argv)
    for flag, value, least in (("--steps", a.steps, 1), ("--warmup", a.warmup, 0), ("--layers", a.layers, 1),
                               ("--experts", a.experts, 1), ("--seq-div", a.seq_div, 1)):
        if value is not None and value < least:
            p.error(f"{flag} {value}: must be >= {least}")
    if a.device not in ("auto", "cpu", "cuda"):
        p.error(f"--device {a.device!r}: allowed auto, cpu, cuda")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    cases = [c for c in a.cases.split(",") if c]
    ckpts = (a.ckpt or ("none,full" if gpu else "none")).split(",")
    variants = (a.variants or (",".join(VARIANTS) if gpu else "hf,liger,ours")).split(",")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; allowed: {VARIANTS}")
    for c in cases:
        if c not in CASES:
            p.error(f"--cases: unknown case {c!r}; allowed: {CASES}")
    for c in ckpts:
        if c not in MODES:
            p.error(f"--ckpt: unknown mode {c!r}; allowed: {MODES}")
    steps = a.steps if a.steps is not None else (5 if gpu else 2)
    warmup = a.warmup if a.warmup is not None else (2 if gpu else 1)
    import transformers

    device_name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {device_name}, liger: "
          f"{'yes' if liger_available() else 'no'}", flush=True)
    ceiling = matmul_tflops(device, dtype)
    torch.manual_seed(0)

    rows, weights_of, flops_of = [], {}, {}
    built = {}

    def dump(loss_ok: bool | None) -> None:
        """Write ``--json`` (after every row too, ``partial`` until the end, so a run cut short by a time
        limit still leaves the rows it measured)."""
        if not a.json:
            return
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_name(a.json.name + ".tmp")
        tmp.write_text(json.dumps(dict(
            device=device_name, dtype=str(dtype), torch=torch.__version__, transformers=transformers.__version__,
            matmul_tflops=ceiling, tiny=a.tiny, steps=steps, warmup=warmup, loss_rtol=rtol, loss_ok=loss_ok,
            partial=loss_ok is None, flops={n: f.as_dict() for n, f in flops_of.items()}, rows=rows), indent=1))
        tmp.replace(a.json)
    for name in cases:
        try:   # e.g. transformers without the case's model class, or out of memory: report it, run the next case
            case = build_case(name, a.tiny, layers=a.layers, seq_div=a.seq_div, experts=a.experts)
            flops_of[name] = variant_flops(case, "hf")
            if "ours-lora" in variants:
                flops_of[f"{name}/ours-lora"] = variant_flops(case, "ours-lora")
            torch.manual_seed(0)
            hf = build_hf(case.args, device, dtype)
            weights_of[name] = {k: v.detach().to("cpu", copy=True) for k, v in hf.state_dict().items()}
            built[name] = case
        except Exception as e:
            err = f"case setup: {type(e).__name__}: {str(e)[:200]}"
            rows += [dict(case=name, variant=v, ckpt=ckpt, error=err) for ckpt in ckpts for v in variants]
            flops_of.pop(name, None)
            flops_of.pop(f"{name}/ours-lora", None)
            dump(None)
            print(f"{name}: {err}", flush=True)
            continue
        finally:
            hf = None
            _free(device)
        for ckpt in ckpts:
            for variant in [v for v in variants if v != "liger"]:
                try:
                    r = run_variant(variant, case, weights_of[name], ckpt, device, dtype, steps, warmup,
                                    flops_of.get(f"{name}/{variant}", flops_of[name]), ceiling,
                                    profile=variant == "ours")
                except Exception as e:  # e.g. out of memory: keep the other rows
                    r = dict(case=name, variant=variant, ckpt=ckpt, error=f"{type(e).__name__}: {str(e)[:200]}")
                    _free(device)
                rows.append(r)
                dump(None)
                print(json.dumps({k: v for k, v in r.items() if k not in ("breakdown",)}), flush=True)
    if "liger" in variants:
        have = liger_available()
        for name in built:
            for ckpt in ckpts:
                if not have:
                    rows.append(dict(case=name, variant="liger", ckpt=ckpt, na="liger_kernel does not import"))
                    continue
                if isinstance(built[name].args, Qwen35Args):
                    rows.append(dict(case=name, variant="liger", ckpt=ckpt, na="liger-kernel has no Qwen3.5 patches"))
                    continue
                try:
                    apply_liger(built[name].args.text.is_moe)
                    r = run_variant("liger", built[name], weights_of[name], ckpt, device, dtype, steps, warmup,
                                    flops_of[name], ceiling, profile=False)
                except Exception as e:
                    r = dict(case=name, variant="liger", ckpt=ckpt, error=f"{type(e).__name__}: {str(e)[:200]}")
                    _free(device)
                rows.append(r)
                dump(None)
                print(json.dumps(r), flush=True)
    order = {v: i for i, v in enumerate(VARIANTS)}
    rows.sort(key=lambda r: (cases.index(r["case"]), ckpts.index(r["ckpt"]), order[r["variant"]]))
    ok = add_comparisons(rows, rtol)

    print()
    print(format_table(rows, ceiling, device_name, dtype))
    print(f"(model FLOPs incl. the vision tower; loss = first-step CE, rel tol {rtol:g}; ratios = ours tok/s / "
          "theirs, same ckpt or their fastest row over all ckpt modes (xbest*); ours-lora, a LoRA step, is set against "
          "no transformers full step: x_ours in the JSON = its tok/s / ours' full step's, its FLOPs without the "
          "frozen weights' gradients; pkxBLig = ours' peakGiB / that liger row's; peakGiB = CUDA max allocated; stepGiB = bytes of the tensors one "
          "forward + backward creates (activations, temporaries, gradients), memxHF = ours / transformers)")
    for name in flops_of:
        f = flops_of[name]
        print(f"FLOPs/step {name}: total {f.total / 1e12:.4g} T (decoder {f.decoder / 1e12:.4g}, "
              f"vision {f.vision / 1e12:.4g}, attention {f.text_attention / 1e12:.4g})")
    for r in rows:
        if r.get("breakdown"):
            print(format_breakdown(r["breakdown"], f"ours {r['case']} ckpt={r['ckpt']}: step-time breakdown "
                                   "(one profiled step)"))
    dump(ok)
    if not ok:
        print("LOSS MISMATCH between transformers and rynnscale (see rel.vsHF)", file=sys.stderr)
    failed = sorted({f"{r['case']}/{r['variant']}" for r in rows if "error" in r})
    if failed:
        print(f"FAILED (see ERROR rows): {', '.join(failed)}", file=sys.stderr)
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
