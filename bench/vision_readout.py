"""Can a recipe's vision tower, trained from its initialisation, tell where the object is, and through which readout?

Renders clips of the built-in synthetic set with one object (``render_clip``), preprocesses them as the recipe's
data path does, and trains the recipe's vision tower (from ``build_model``'s initialisation) together with one
small readout per run to predict the three digits of the object's frame-0 centre in 0-1000 units (x and y: six
10-way cross-entropies, the targets an answer's digit tokens carry). The readouts:

- ``per-token linear``: one linear map of all vision tokens concatenated (a weight per token position);
- ``mean pool``: an MLP on the mean of the vision tokens;
- ``attention pool``: an MLP on an attention-weighted sum of the vision tokens (4 heads, a learned query each),
  the operation a decoder's attention head applies to the vision tokens, with keys from their content only;
- ``attention+pos``: the same with a learned vector per token position added to the keys (a decoder's RoPE lets
  its attention pick tokens by position too).

Prints the held-out error (mean distance of the greedy digits to the truth, 0-1000 units) every ``--every`` steps,
next to two answers that ignore the clip: the training set's mean position, and its most common digit at each of
the six places (where a greedy digit readout that learnt nothing from the clip ends). docs/rl.md quotes its figures.

    python bench/vision_readout.py                      # recipes/tiny/finetune/grpo_grounding.yaml, ~4 min on 1 core
    python bench/vision_readout.py --readouts mean --steps 3000 model.arch.vision_config.spatial_merge_size=4
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
READOUTS = ("per-token", "mean", "attention", "attention+pos")


class PerTokenLinear(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(tokens * dim, 60)

    def forward(self, x_bmd: torch.Tensor) -> torch.Tensor:
        return self.proj(x_bmd.flatten(1))


def _mlp(dim: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, 60))


class MeanPool(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.mlp = _mlp(dim)

    def forward(self, x_bmd: torch.Tensor) -> torch.Tensor:
        return self.mlp(x_bmd.mean(1))


class AttentionPool(nn.Module):
    """Learned queries over the tokens' keys; ``positional``: a learned vector per token position added to the
    keys, so heads can pick tokens by position as RoPE lets a decoder's attention (values stay content only)."""

    def __init__(self, tokens: int, dim: int, heads: int = 4, positional: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query_hd = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.key_pos_md = nn.Parameter(torch.randn(tokens, dim)) if positional else None
        self.mlp = _mlp(dim)

    def forward(self, x_bmd: torch.Tensor) -> torch.Tensor:
        b, m, _ = x_bmd.shape
        k_bmd = self.key(x_bmd) if self.key_pos_md is None else self.key(x_bmd) + self.key_pos_md
        k_bmhd = k_bmd.view(b, m, self.heads, self.head_dim)
        v_bmhd = self.value(x_bmd).view(b, m, self.heads, self.head_dim)
        w_bhm = torch.einsum("bmhd,hd->bhm", k_bmhd, self.query_hd).div(self.head_dim**0.5).softmax(-1)
        return self.mlp(torch.einsum("bhm,bmhd->bhd", w_bhm, v_bmhd).reshape(b, -1))


def digits_b6(xy_b2: torch.Tensor) -> torch.Tensor:
    """0-1000 coordinates -> their three decimal digits each, [B, 6] (x hundreds, tens, units, then y)."""
    v = xy_b2.round().clamp(0, 999).long()
    return torch.stack([v // 100, v // 10 % 10, v % 10], -1).flatten(1)


def render(cfg, spec, n: int) -> tuple[torch.Tensor, tuple[int, int, int], torch.Tensor]:
    """``n`` one-object clips: normalised patches [n, P, D], their grid, frame-0 centres [n, 2] in 0-1000 units."""
    from rynnscale.data.vision_preprocess import normalize_patches, preprocess_video
    from rynnscale.data_pipelines.synthetic import render_clip

    s = cfg.data.synthetic
    pixels, centres, grid = [], [], None
    for i in range(n):
        frames, truth = render_clip(np.random.default_rng([1234, i]), s.frames, s.width, s.height, (1, 1))
        vi = preprocess_video(frames, [t / s.fps for t in range(s.frames)], spec)
        pixels.append(normalize_patches(vi.pixel_values, spec).float())
        centres.append(truth.centers[0][0] / np.array([s.width, s.height]) * 1000)
        grid = vi.grid_thw
    return torch.stack(pixels), grid, torch.tensor(np.array(centres), dtype=torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes/tiny/finetune/grpo_grounding.yaml"))
    ap.add_argument("overrides", nargs="*", help="recipe overrides, as for rynnscale train (key=value)")
    ap.add_argument("--readouts", nargs="+", choices=READOUTS, default=list(READOUTS))
    ap.add_argument("--train-clips", type=int, default=None, help="default: the recipe's data.synthetic.num_samples")
    ap.add_argument("--eval-clips", type=int, default=400)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=12, help="clips per step (the SFT stage packs 11.8 a step)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from rynnscale.config import load_config
    from rynnscale.data.pipeline import build_encoder
    from rynnscale.models.qwen3_vl.vision import vision_patch_meta
    from rynnscale.train.build import build_model

    cfg = load_config(a.recipe, a.overrides)
    args, model = build_model(cfg.model, seed=cfg.run.seed)
    spec = build_encoder(cfg, args).spec
    t0 = time.time()
    train_n = a.train_clips or cfg.data.synthetic.num_samples
    pixels, grid, centres = render(cfg, spec, train_n + a.eval_clips)
    merge = spec.merge_size
    tokens = grid[0] * grid[1] * grid[2] // (merge * merge)
    held_out = centres[train_n:]
    baseline = (held_out - centres[:train_n].mean(0)).norm(dim=1).mean()
    modes_6 = digits_b6(centres[:train_n]).mode(0).values      # what a readout that ignores the clip answers
    mode_xy = (modes_6.view(2, 3) * torch.tensor([100, 10, 1])).sum(-1).float()
    blind = (held_out - mode_xy).norm(dim=1).mean()
    print(f"{a.recipe}: {cfg.data.synthetic.frames} frames of {cfg.data.synthetic.width}x{cfg.data.synthetic.height}, "
          f"patch grid {tuple(grid)}, {tokens} vision tokens a clip; {train_n} training / {a.eval_clips} held-out "
          f"clips rendered in {time.time() - t0:.0f} s; held-out error of answering every clip with the mean "
          f"position: {baseline:.0f}, with the most common digits (a readout that ignores the clip): {blind:.0f}",
          flush=True)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    vision = model.model.visual
    dim = vision.args.out_hidden_size
    heads = {"per-token": PerTokenLinear, "mean": MeanPool, "attention": AttentionPool,
             "attention+pos": lambda t, d: AttentionPool(t, d, positional=True)}
    eval_pixels = pixels[train_n:].flatten(0, 1)
    eval_grid = torch.tensor([grid] * a.eval_clips)
    results = {}
    for name in a.readouts:
        model.load_state_dict(initial)
        torch.manual_seed(cfg.run.seed)
        readout = heads[name](tokens, dim)
        opt = torch.optim.AdamW([*vision.parameters(), *readout.parameters()], lr=a.lr, weight_decay=0.0)
        batch_grid = torch.tensor([grid] * a.batch)
        meta = vision_patch_meta(batch_grid, merge)
        gen = torch.Generator().manual_seed(cfg.run.seed)
        t0, errors = time.time(), []
        for step in range(1, a.steps + 1):
            idx = torch.randint(0, train_n, (a.batch,), generator=gen)
            emb_md, _ = vision(pixels[idx].flatten(0, 1), batch_grid, meta)
            logits = readout(emb_md.view(a.batch, tokens, dim)).view(-1, 10)
            loss = nn.functional.cross_entropy(logits, digits_b6(centres[idx]).flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % a.every == 0 or step == a.steps:
                with torch.no_grad():
                    emb_md, _ = vision(eval_pixels, eval_grid)
                    d_b23 = readout(emb_md.view(a.eval_clips, tokens, dim)).view(-1, 2, 3, 10).argmax(-1)
                    pred_b2 = (d_b23 * torch.tensor([100, 10, 1])).sum(-1).float()
                    err = float((pred_b2 - centres[train_n:]).norm(dim=1).mean())
                errors.append(err)
                print(f"  {name:10s} step {step:5d} ({step * a.batch:6d} clips) loss {loss.item():.3f} "
                      f"held-out error {err:4.0f} ({time.time() - t0:.0f} s)", flush=True)
        results[name] = errors[-1]
    print("held-out error after", a.steps * a.batch, "clips:",
          ", ".join(f"{k} {v:.0f}" for k, v in results.items()),
          f"(most common digits {blind:.0f}, mean position {baseline:.0f})")


if __name__ == "__main__":
    main()
