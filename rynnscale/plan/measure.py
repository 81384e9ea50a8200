"""Measure the real peak memory of a training step on CPU (the planner's ground truth in tests).

``LiveTensorBytes`` is a ``TorchDispatchMode`` that counts the bytes of every tensor storage created
while it is active and subtracts them when the storage is freed (a weakref finaliser on the storage):
a CPU stand-in for ``torch.cuda.max_memory_allocated``. Storages, not tensors, are counted, so views
are free and a tensor shared by two owners is counted once. Allocations made inside a kernel that
never become tensors (e.g. a kernel's private scratch) are not seen; the planner calls those
"workspace" and keeps a separate margin for them.

``measure_train_step`` builds the model INSIDE the mode (so parameters are counted), then runs
``steps`` real optimiser steps -- forward, fused chunked loss, backward, clipping, AdamW -- on one
packed row of ``tokens`` text tokens (optionally with one image of ``image_patches`` patches), and
reports the peak and the live bytes at phase boundaries. Run it in a fresh process (``python -m
rynnscale.plan.measure``) so nothing else shares the count.
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rynnscale.models import family_of


class LiveTensorBytes(TorchDispatchMode):
    """Live / peak bytes of tensor storages created under the mode (CPU and any other device)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in self._sizes:
                continue
            n = st.nbytes()
            self._sizes[key] = n
            self.live += n
            weakref.finalize(st, self._freed, key)
        self.peak = max(self.peak, self.live)
        return out


def synthetic_batch(args, tokens: int, docs: int, image_patches: int = 0, seed: int = 0):
    """One packed row of ``docs`` equal-length samples, every token labelled (worst case for the loss);
    with ``image_patches`` > 0 the first sample starts with one image of that many patches."""
    from rynnscale.batch import IGNORE_INDEX, EncodedSample
    from rynnscale.data.packing import build_packed_batch

    g = torch.Generator().manual_seed(seed)
    contract = family_of(args).data(args)
    v = args.vision
    m2 = v.spatial_merge_size ** 2 if v is not None else 1
    samples = []
    per = tokens // docs
    for i in range(docs):
        L = per if i < docs - 1 else tokens - per * (docs - 1)
        ids = torch.randint(0, min(args.text.vocab_size, contract.image_token_id, contract.video_token_id,
                                   contract.vision_start_token_id, contract.vision_end_token_id), (L,), generator=g)
        pos = torch.arange(L).expand(3, -1).clone()
        pix = grid = None
        if i == 0 and image_patches:
            side = int(round((image_patches) ** 0.5))
            if side * side != image_patches or side % v.spatial_merge_size:
                raise ValueError(f"image_patches={image_patches} must be a square of a multiple of the merge size")
            n_vis = image_patches // m2
            ids[1:1 + n_vis] = contract.image_token_id
            grid = torch.tensor([[1, side, side]])
            pix = torch.randn(image_patches, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, generator=g)
        labels = ids.clone()
        labels[0] = IGNORE_INDEX
        samples.append(EncodedSample(f"s{i}", ids, labels, pos, pix, grid))
    return build_packed_batch(samples)


def measure_train_step(arch: dict[str, Any], *, tokens: int, docs: int = 2, image_patches: int = 0,
                       checkpointing: str = "none", every: int = 2, loss_chunk_tokens: int = 1024,
                       steps: int = 2, freeze: list[str] | None = None, weight_decay: float = 0.0,
                       seed: int = 0) -> dict[str, Any]:
    """Peak live tensor bytes of ``steps`` CPU fp32 training steps of the model ``arch`` (config.json dict)."""
    from rynnscale.config.schema import ModelConfig, OptimConfig
    from rynnscale.models import args_from_hf_config
    from rynnscale.train.build import build_model
    from rynnscale.train.optim import build_optimizer

    torch.manual_seed(seed)
    args = args_from_hf_config(arch, strict=True, where="arch")
    batch = synthetic_batch(args, tokens, docs, image_patches, seed)
    mode = LiveTensorBytes()
    phases: dict[str, int] = {}
    mc = ModelConfig(arch=arch, attn_backend="loop", activation_checkpointing=checkpointing,
                     activation_checkpointing_every=every, freeze=list(freeze or []))
    with mode:
        _, model = build_model(mc, "cpu", seed)  # the training build path, inside the count
        model.train()
        opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=weight_decay))
        phases["model"] = mode.live
        for step in range(steps):
            mode.reset_peak()
            out = model(batch)
            loss_sum = model.loss_sum(batch, out, loss_chunk_tokens)
            phases[f"step{step}_after_forward"] = mode.live
            loss = loss_sum / max(batch.num_target_tokens, 1) + out.aux_loss
            loss.backward()
            del out, loss, loss_sum
            phases[f"step{step}_fwd_bwd_peak"] = mode.peak
            phases[f"step{step}_after_backward"] = mode.live
            mode.reset_peak()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
            opt.step()
            phases[f"step{step}_optimizer_peak"] = mode.peak
            opt.zero_grad(set_to_none=True)
            phases[f"step{step}_end"] = mode.live
    peak = max(v for k, v in phases.items() if k.endswith("_peak"))
    return {"peak_bytes": peak, "phases": phases, "tokens": batch.num_tokens,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", required=True, help="config.json-shaped architecture as a JSON string")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--image-patches", type=int, default=0)
    p.add_argument("--checkpointing", default="none")
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--loss-chunk-tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--freeze", default="", help="comma-separated name patterns to freeze")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    res = measure_train_step(json.loads(a.arch), tokens=a.tokens, docs=a.docs, image_patches=a.image_patches,
                             checkpointing=a.checkpointing, every=a.every, loss_chunk_tokens=a.loss_chunk_tokens,
                             steps=a.steps, freeze=[s for s in a.freeze.split(",") if s])
    json.dump(res, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
