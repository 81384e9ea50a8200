"""bf16 parity: rynnscale's model against transformers' from the same weights, in bf16, on the same batch.

For each case (bench/train_step.py's definitions: by default the packed A3B mix and the video case,
cut to ``--layers`` decoder layers), transformers' model is built with its own random init in bf16 and
its state dict is loaded into ours (HF-identical keys; ours as a recipe runs it: ``model.kernels=auto``,
i.e. liger's kernels where they import, flash varlen attention on CUDA). Then:

1. Logits before any update, at ``--positions`` sampled positions: the per-position relative error
   ``|ours - hf| / |hf|`` of the logit rows (L2 over the vocabulary), and, as the scale bf16 itself
   sets, each model's error against transformers in fp32 on the same (bf16-valued) weights. Printed as
   percentiles (p50, p90, p99, max).
2. ``--steps`` optimiser steps (AdamW, same hyper-parameters, bf16 parameters on both sides) on that
   batch, each model trained on its cross-entropy alone (transformers adds its load-balancing term only
   with ``output_router_logits``; ours' is left out to match). The two losses must agree within
   ``--rtol`` (1e-2) at every step, else the script exits 1.

GPU: ``python bench/bf16_parity.py --json out.json`` (bench/gpu_check.sh runs it as its ``parity``
section). CPU smoke run, tiny shapes: ``python bench/bf16_parity.py --tiny --steps 3``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import CASES, build_case, build_hf, build_ours  # noqa: E402

PERCENTILES = (50, 90, 99, 100)


def percentiles(x: torch.Tensor) -> dict[str, float]:
    q = torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64)
    vals = torch.quantile(x.double().cpu(), q).tolist()
    return {("max" if p == 100 else f"p{p}"): v for p, v in zip(PERCENTILES, vals)}


def row_rel_err(a_pv: torch.Tensor, ref_pv: torch.Tensor) -> torch.Tensor:
    """Per-position relative error of logit rows: |a - ref| / |ref| (L2 over the vocabulary)."""
    a, ref = a_pv.double(), ref_pv.double()
    return (a - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-30)


def hf_reference_fp32(args, weights: dict, device: torch.device):
    """transformers in fp32 on the same weights; experts through its per-expert loop (the fused grouped
    kernel takes bf16 only on CUDA)."""
    import transformers

    cfg_dict = {k: v for k, v in args.to_hf_config().items() if k not in ("architectures", "model_type")}
    moe = args.text.is_moe
    cfg = (transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig)(**cfg_dict)
    cls = transformers.Qwen3VLMoeForConditionalGeneration if moe else transformers.Qwen3VLForConditionalGeneration
    kw = dict(dtype=torch.float32, attn_implementation="sdpa")
    if moe:
        kw["experts_implementation"] = "eager"
    with torch.device(device):
        model = cls._from_config(cfg, **kw)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return model.eval()


def elementwise_kernels(device: torch.device) -> str:
    """What ``model.kernels=auto`` runs here: liger's kernels on CUDA where they import, else the torch ops."""
    from rynnscale.ops import fused

    err = fused.liger_import_error()
    return "liger" if device.type == "cuda" and err is None else f"torch ({'no CUDA' if device.type != 'cuda' else err})"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(name: str, tiny: bool, layers: int | None, device: torch.device, steps: int, lr: float,
             positions: int, rtol: float) -> dict:
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    if device.type == "cuda":   # peak_gib is this case's (both models, the fp32 reference), not the run's so far
        torch.cuda.reset_peak_memory_stats(device)
    case = build_case(name, tiny, layers=layers)
    B, S = case.hf_inputs["input_ids"].shape
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in case.hf_inputs.items()}
    logits_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    batch = case.batch.to(device, float_dtype=dtype)
    # the same positions of every row; ours holds the B rows as one packed row of B documents
    k = max(1, min(S, positions // B))
    pos_k = torch.randperm(S, generator=torch.Generator().manual_seed(0))[:k].sort().values
    ours_pos = torch.cat([b * S + pos_k for b in range(B)]).to(device)

    torch.manual_seed(0)
    hf = build_hf(case.args, device, dtype)
    weights = {k_: v.detach().to("cpu", copy=True) for k_, v in hf.state_dict().items()}
    ours = build_ours(case.args, weights, device, dtype)
    res: dict = dict(case=name, tokens=case.batch.num_tokens, targets=case.n_targets, positions=int(ours_pos.numel()),
                     layers=case.args.text.num_hidden_layers, moe=case.args.text.is_moe, lr=lr, rtol=rtol,
                     kernels=elementwise_kernels(device))

    # 1. logits before any update
    hf.eval()
    ours.eval()
    with torch.no_grad():
        hf_logits = hf(**logits_inputs, use_cache=False, logits_to_keep=pos_k.to(device)).logits
        hf_logits = hf_logits.float().reshape(-1, hf_logits.shape[-1])
        ours_logits = ours.logits(ours(batch).hidden_ld[ours_pos]).float()
    res["logits_rel_ours_vs_hf"] = percentiles(row_rel_err(ours_logits, hf_logits))
    try:
        ref = hf_reference_fp32(case.args, weights, device)
        with torch.no_grad():
            ref_logits = ref(**{k_: (v.float() if v.is_floating_point() else v) for k_, v in logits_inputs.items()},
                             use_cache=False, logits_to_keep=pos_k.to(device)).logits
        ref_logits = ref_logits.reshape(-1, ref_logits.shape[-1])
        res["logits_rel_hf_vs_fp32"] = percentiles(row_rel_err(hf_logits, ref_logits))
        res["logits_rel_ours_vs_fp32"] = percentiles(row_rel_err(ours_logits, ref_logits))
        ref = ref_logits = None
    except Exception as e:  # the fp32 reference is context; the parity itself does not depend on it
        res["fp32_reference_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    hf_logits = ours_logits = None
    _free(device)

    # 2. optimiser steps on the same batch, cross-entropy only on both sides
    hf.train()
    ours.train()
    fused = {"fused": True} if device.type == "cuda" else {}
    opt_h = torch.optim.AdamW(hf.parameters(), lr=lr, weight_decay=0.0, **fused)
    opt_o = torch.optim.AdamW(ours.parameters(), lr=lr, weight_decay=0.0, **fused)
    coef = case.args.text.router_aux_loss_coef
    losses_h, losses_o, rels = [], [], []
    for _ in range(steps):
        out = hf(**inputs, use_cache=False)
        aux = getattr(out, "aux_loss", None)
        ce_h = out.loss - coef * aux if aux is not None else out.loss
        ce_h.backward()
        opt_h.step()
        opt_h.zero_grad(set_to_none=True)
        o = ours(batch)
        ce_o = ours.loss_sum(batch, o) / case.n_targets
        ce_o.backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)
        h, w = float(ce_h.detach()), float(ce_o.detach())
        losses_h.append(h)
        losses_o.append(w)
        rels.append(abs(w - h) / abs(h) if h == h and w == w else float("inf"))
    res |= dict(steps=steps, losses_hf=losses_h, losses_ours=losses_o, loss_rel=rels,
                max_loss_rel=max(rels) if rels else None,
                ok=bool(rels) and all(r <= rtol for r in rels), seconds=time.perf_counter() - t0)
    if device.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    hf = ours = opt_h = opt_o = None
    _free(device)
    return res


def _fmt_pct(p: dict | None) -> str:
    return "n/a" if not p else "  ".join(f"{k} {v:.2e}" for k, v in p.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="packed,video", help=f"comma list of {CASES}")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of every case (default 2)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--rtol", type=float, default=1e-2, help="per-step loss tolerance (relative)")
    p.add_argument("--positions", type=int, default=512, help="logit rows compared (spread over the batch)")
    p.add_argument("--tiny", action="store_true", help="CPU-sized shapes with the same structure")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    for flag, value in (("--steps", a.steps), ("--layers", a.layers), ("--positions", a.positions)):
        if value < 1:
            p.error(f"{flag} {value}: must be >= 1")
    if a.device not in ("auto", "cpu", "cuda"):
        p.error(f"--device {a.device!r}: allowed auto, cpu, cuda")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    cases = [c for c in a.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            p.error(f"--cases: unknown case {c!r}; allowed: {CASES}")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    import transformers

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"bf16 parity: torch {torch.__version__}, transformers {transformers.__version__}, {name}; "
          f"{a.steps} steps, lr {a.lr:g}, rtol {a.rtol:g}", flush=True)
    report = dict(device=name, torch=torch.__version__, transformers=transformers.__version__, tiny=a.tiny,
                  steps=a.steps, rtol=a.rtol, cases=[])

    def dump(final: bool) -> None:
        report["partial"] = not final
        report["ok"] = bool(report["cases"]) and all(c.get("ok") for c in report["cases"])
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = a.json.with_name(a.json.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=1))
            tmp.replace(a.json)

    for c in cases:
        try:
            r = run_case(c, a.tiny, a.layers, device, a.steps, a.lr, a.positions, a.rtol)
        except Exception as e:  # e.g. out of memory: report it, go on with the next case
            r = dict(case=c, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            _free(device)
        report["cases"].append(r)
        dump(final=False)
        if "error" in r:
            print(f"{c}: ERROR {r['error']}", flush=True)
            continue
        print(f"{c}: {r['tokens']} tokens, {r['layers']} layers, kernels={r['kernels']}; loss rel per step max "
              f"{r['max_loss_rel']:.2e} ({'ok' if r['ok'] else 'MISMATCH'}, tol {a.rtol:g}); loss "
              f"{r['losses_hf'][0]:.4f} -> {r['losses_hf'][-1]:.4f} (hf), {r['losses_ours'][0]:.4f} -> "
              f"{r['losses_ours'][-1]:.4f} (ours)", flush=True)
        print(f"  logits rel err, {r['positions']} rows: ours vs hf   {_fmt_pct(r['logits_rel_ours_vs_hf'])}")
        print(f"                          hf vs fp32  {_fmt_pct(r.get('logits_rel_hf_vs_fp32'))}")
        print(f"                          ours vs fp32 {_fmt_pct(r.get('logits_rel_ours_vs_fp32'))}", flush=True)
        if "fp32_reference_error" in r:
            print(f"  (fp32 reference failed: {r['fp32_reference_error']})")
    dump(final=True)
    if not report["ok"]:
        print("bf16 PARITY FAILED (see above)", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
