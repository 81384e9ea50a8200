"""Qwen3-VL vision tower (ViT + 2-D rotary + learned interpolated positions + patch mergers).

Computes the same function as transformers' ``Qwen3VLVisionModel`` (also used unchanged by
Qwen3-VL-MoE) with identical parameter names and shapes, so HF's ``model.visual`` state dict loads
with ``strict=True``. Differences are in *how*, not *what*:
- the Conv3d patch embedding (stride == kernel) runs as one matmul on the flattened patches;
- patch coordinates, rotary angles and the bilinear position-embedding resampling are computed
  for all images at once (no Python loop over images) and the 4-tap blend is an ``embedding_bag``;
- attention is ``rynnscale.ops.attention.varlen_attention`` with one document per temporal frame.

Patch order (HF processor layout): per image/video, frame by frame, and inside a frame in
spatial-merge-block order ``(block_row, block_col, in_row, in_col)``, so the ``m*m`` patches that
the merger fuses into one LLM token are consecutive rows.

Shapes: P = patches, M = P / merge^2 merged tokens, D = hidden_size, Dh = head_dim, O = out_hidden_size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from rynnscale.models.lora import LoRALinear
from rynnscale.models.qwen3_vl.args import VisionArgs
from rynnscale.ops.attention import varlen_attention
from rynnscale.ops.fused import rotary

ROPE_THETA = 10_000.0  # HF Qwen3VLVisionConfig default (rope_parameters: axial, theta 10000)
LAYER_NORM_EPS = 1e-6

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


# ----------------------------------------------------------------------------- patch geometry
@dataclass
class VisionPatchMeta:
    """Per-forward geometry derived from ``grid_thw`` (integers only, no weights).

    ``coords_4p`` int64 [4, P]: row, col, grid height, grid width of every patch (patch order above).
    ``cu_seqlens`` int32 [F+1]: one attention document per temporal frame (h*w patches).
    ``max_seqlen``: the largest h*w.
    """

    coords_4p: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def num_patches(self) -> int:
        return int(self.coords_4p.shape[1])

    def to(self, device: torch.device | str) -> VisionPatchMeta:
        return VisionPatchMeta(self.coords_4p.to(device, non_blocking=True),
                               self.cu_seqlens.to(device, non_blocking=True), self.max_seqlen)


def vision_patch_meta(grid_thw: torch.Tensor, spatial_merge_size: int) -> VisionPatchMeta:
    """Patch coordinates and frame boundaries for ``grid_thw`` [N, 3] (t, h, w in patches).

    Computed on CPU (one tiny device->host copy if ``grid_thw`` lives on an accelerator; keep it on
    CPU to avoid that sync). Vectorised over all images/videos."""
    grid = grid_thw.detach().to("cpu", torch.int64)
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"vision grid_thw must have shape [N, 3] (t, h, w); got {tuple(grid_thw.shape)}")
    m = spatial_merge_size
    if (grid <= 0).any():
        raise ValueError(f"vision grid_thw entries must be positive; got {grid.tolist()}")
    if ((grid[:, 1:] % m) != 0).any():
        raise ValueError(f"vision grid_thw h and w must be multiples of spatial_merge_size={m}; got {grid.tolist()}")
    t_n, h_n, w_n = grid.unbind(1)
    hw_n = h_n * w_n
    counts_n = t_n * hw_n
    num_patches = int(counts_n.sum())
    item_p = torch.repeat_interleave(torch.arange(grid.shape[0]), counts_n, output_size=num_patches)
    starts_n = counts_n.cumsum(0) - counts_n
    # index of each patch inside its frame (0 .. h*w-1), repeating over the t frames
    within_p = (torch.arange(num_patches) - starts_n[item_p]) % hw_n[item_p]
    h_p, w_p = h_n[item_p], w_n[item_p]
    block_p = within_p // (m * m)
    blocks_per_row_p = w_p // m
    row_p = (block_p // blocks_per_row_p) * m + (within_p // m) % m
    col_p = (block_p % blocks_per_row_p) * m + within_p % m
    frame_lens_f = torch.repeat_interleave(hw_n, t_n)
    cu_seqlens = F.pad(frame_lens_f.cumsum(0), (1, 0)).to(torch.int32)
    max_seqlen = int(hw_n.max()) if grid.shape[0] else 0
    return VisionPatchMeta(torch.stack([row_p, col_p, h_p, w_p]), cu_seqlens, max_seqlen)


def apply_vision_rotary(x_phd: torch.Tensor, cos_pd: torch.Tensor, sin_pd: torch.Tensor) -> torch.Tensor:
    """Rotate q or k [P, H, Dh] by the 2-D angles (cos/sin [P, Dh], fp32); math in fp32 as HF."""
    return rotary(x_phd.float(), cos_pd, sin_pd).to(x_phd.dtype)


# ----------------------------------------------------------------------------- modules
class VisionPatchEmbed(nn.Module):
    """Conv3d patchifier kept as a Conv3d parameter ([D, C, T, ps, ps] + bias); applied as a matmul."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        kernel = (args.temporal_patch_size, args.patch_size, args.patch_size)
        self.proj = nn.Conv3d(args.in_channels, args.hidden_size, kernel_size=kernel, stride=kernel, bias=True)
        self.patch_dim = args.in_channels * args.temporal_patch_size * args.patch_size ** 2

    def forward(self, pixels_pk: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        # stride == kernel: each output is the dot product of one flattened (C, T, ps, ps) patch
        return F.linear(pixels_pk.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs, attn_backend: str):
        super().__init__()
        self.num_heads = args.num_heads
        self.head_dim = args.hidden_size // args.num_heads
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(args.hidden_size, 3 * args.hidden_size, bias=True)
        self.proj = nn.Linear(args.hidden_size, args.hidden_size, bias=True)

    def forward(self, x_pd: torch.Tensor, cos_pd: torch.Tensor, sin_pd: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        P = x_pd.shape[0]
        q_phd, k_phd, v_phd = self.qkv(x_pd).view(P, 3, self.num_heads, self.head_dim).unbind(1)
        q_phd = apply_vision_rotary(q_phd, cos_pd, sin_pd)
        k_phd = apply_vision_rotary(k_phd, cos_pd, sin_pd)
        o_phd = varlen_attention(q_phd, k_phd, v_phd, cu_seqlens, max_seqlen, causal=False,
                                 backend=self.attn_backend)
        return self.proj(o_phd.reshape(P, -1))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        if args.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act={args.hidden_act!r} is not supported; "
                             f"allowed: {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[args.hidden_act]
        self.linear_fc1 = nn.Linear(args.hidden_size, args.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm ViT block; the unit that activation checkpointing / FSDP wrap."""

    def __init__(self, args: VisionArgs, attn_backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(args.hidden_size, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(args.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(args, attn_backend)
        self.mlp = VisionMLP(args)

    def forward(self, x_pd: torch.Tensor, cos_pd: torch.Tensor, sin_pd: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        x_pd = x_pd + self.attn(self.norm1(x_pd), cos_pd, sin_pd, cu_seqlens, max_seqlen)
        return x_pd + self.mlp(self.norm2(x_pd))


class VisionPatchMerger(nn.Module):
    """Fuse each m*m block of patches into one token [M, O].

    ``postshuffle_norm`` (deepstack mergers) normalises the concatenated m*m*D vector; the final
    merger normalises each patch (D) before concatenating."""

    def __init__(self, args: VisionArgs, postshuffle_norm: bool):
        super().__init__()
        self.merged_dim = args.hidden_size * args.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged_dim if postshuffle_norm else args.hidden_size, eps=LAYER_NORM_EPS)
        self.linear_fc1 = nn.Linear(self.merged_dim, self.merged_dim, bias=True)
        self.linear_fc2 = nn.Linear(self.merged_dim, args.out_hidden_size, bias=True)

    def forward(self, x_pd: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x_mk = self.norm(x_pd.reshape(-1, self.merged_dim))
        else:
            x_mk = self.norm(x_pd).reshape(-1, self.merged_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x_mk)))


class Qwen3VLVisionModel(nn.Module):
    """Qwen3-VL vision tower: ``forward(pixel_values [P, C*T*ps*ps], grid_thw [N, 3])`` ->
    ``(embeds [M, O], deepstack: list of [M, O], one per deepstack_visual_indexes entry)``.

    ``embeds`` equals HF's ``pooler_output``; ``deepstack`` equals HF's ``deepstack_features``."""

    def __init__(self, args: VisionArgs, attn_backend: str = "auto"):
        super().__init__()
        _validate(args)
        self.args = args
        self.spatial_merge_size = args.spatial_merge_size
        self.head_dim = args.hidden_size // args.num_heads
        self.num_grid_per_side = math.isqrt(args.num_position_embeddings)
        self.patch_embed = VisionPatchEmbed(args)
        self.pos_embed = nn.Embedding(args.num_position_embeddings, args.hidden_size)
        self.blocks = nn.ModuleList([VisionBlock(args, attn_backend) for _ in range(args.depth)])
        self.merger = VisionPatchMerger(args, postshuffle_norm=False)
        self.deepstack_visual_indexes = list(args.deepstack_visual_indexes)
        self.deepstack_merger_list = nn.ModuleList(
            [VisionPatchMerger(args, postshuffle_norm=True) for _ in self.deepstack_visual_indexes])
        self._deepstack_slot = {layer: j for j, layer in enumerate(self.deepstack_visual_indexes)}
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_plan(self, std: float = 0.02,
                  prefix: str = "") -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """HF's init as ``(parameter name, in-place init of the FULL tensor)`` in the order the RNG is
        consumed: normal(0, std) for linear/conv/embedding weights, zero biases, LayerNorm 1/0.
        ``init_weights`` runs it in place; a sharded build runs it on one full tensor at a time."""
        normal = partial(nn.init.normal_, mean=0.0, std=std)
        plan: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = []
        for name, mod in self.named_modules(prefix=prefix.removesuffix(".")):
            p = f"{name}." if name else ""
            if isinstance(mod, (nn.Linear, nn.Conv3d)):
                plan.append((p + "weight", normal))
                if mod.bias is not None:
                    plan.append((p + "bias", nn.init.zeros_))
                if isinstance(mod, LoRALinear):
                    plan += mod.init_plan(p)
            elif isinstance(mod, nn.Embedding):
                plan.append((p + "weight", normal))
            elif isinstance(mod, nn.LayerNorm):
                plan += [(p + "weight", nn.init.ones_), (p + "bias", nn.init.zeros_)]
        return plan

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """``init_plan`` applied in place (draws from the global RNG)."""
        params = dict(self.named_parameters())
        for name, init in self.init_plan(std):
            init(params[name])

    # ------------------------------------------------------------------ position inputs
    def rotary_cos_sin(self, coords_4p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Axial 2-D rope angles -> (cos, sin) fp32 [P, Dh]: Dh/4 frequencies on the row, Dh/4 on
        the column, the [row | col] half repeated twice (rotate_half layout)."""
        quarter = self.head_dim // 4
        half = self.head_dim // 2
        inv_freq_f = 1.0 / (ROPE_THETA ** (torch.arange(0, half, 2, device=coords_4p.device,
                                                          dtype=torch.float32) / half))
        angles_p2f = coords_4p[:2].T.float()[:, :, None] * inv_freq_f  # [P, 2, Dh/4]
        angles_pd = angles_p2f.reshape(-1, 2 * quarter).repeat(1, 2)  # [P, Dh]
        return angles_pd.cos(), angles_pd.sin()

    def interpolated_pos_embed(self, coords_4p: torch.Tensor) -> torch.Tensor:
        """Learned square position grid resampled to each image's (h, w) grid, [P, D] fp32.

        Bilinear with align_corners=True (grid corners map to table corners), as HF's
        ``F.interpolate`` equivalent; computed as a 4-tap ``embedding_bag``."""
        side = self.num_grid_per_side
        row_p, col_p, h_p, w_p = coords_4p

        def taps(idx_p: torch.Tensor, size_p: torch.Tensor):
            src_p = idx_p.float() * (side - 1) / (size_p - 1).clamp(min=1)
            lo_p = src_p.floor()
            frac_p = src_p - lo_p
            lo_p = lo_p.long()
            hi_p = (lo_p + 1).clamp(max=side - 1)
            return lo_p, hi_p, frac_p

        r0, r1, fr = taps(row_p, h_p)
        c0, c1, fc = taps(col_p, w_p)
        idx_p4 = torch.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], dim=1)
        wgt_p4 = torch.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc], dim=1)
        # fp32 table so low-precision params still blend in fp32 (as HF: bf16 rows * fp32 weights)
        return F.embedding_bag(idx_p4, self.pos_embed.weight.float(), per_sample_weights=wgt_p4, mode="sum")

    # ------------------------------------------------------------------ forward
    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                meta: VisionPatchMeta | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``meta`` (from ``vision_patch_meta``) may be precomputed, e.g. by the data loader."""
        if meta is None:
            meta = vision_patch_meta(grid_thw, self.spatial_merge_size)
        patch_dim = self.patch_embed.patch_dim
        if pixel_values.dim() != 2 or pixel_values.shape != (meta.num_patches, patch_dim):
            raise ValueError(
                f"vision pixel_values has shape {tuple(pixel_values.shape)}; expected [{meta.num_patches}, "
                f"{patch_dim}] (sum of t*h*w over grid_thw, C*T*ps*ps)")
        meta = meta.to(pixel_values.device)

        x_pd = self.patch_embed(pixel_values)
        x_pd = x_pd + self.interpolated_pos_embed(meta.coords_4p).to(x_pd.dtype)
        cos_pd, sin_pd = self.rotary_cos_sin(meta.coords_4p)

        deepstack: list[torch.Tensor] = []
        for layer, block in enumerate(self.blocks):
            x_pd = block(x_pd, cos_pd, sin_pd, meta.cu_seqlens, meta.max_seqlen)
            slot = self._deepstack_slot.get(layer)
            if slot is not None:
                deepstack.append(self.deepstack_merger_list[slot](x_pd))
        return self.merger(x_pd), deepstack


def vision_blocks(model: Qwen3VLVisionModel) -> nn.ModuleList:
    """The per-layer blocks (for activation checkpointing / FSDP wrapping)."""
    return model.blocks


def _validate(args: VisionArgs) -> None:
    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"vision_config.{key}={getattr(args, key)!r} is invalid: {allowed}")

    need(args.num_heads > 0 and args.hidden_size % args.num_heads == 0, "num_heads",
         f"must divide hidden_size={args.hidden_size}")
    need((args.hidden_size // max(args.num_heads, 1)) % 4 == 0, "hidden_size",
         "head_dim = hidden_size / num_heads must be a multiple of 4 (2-D rotary)")
    need(args.num_position_embeddings >= 1, "num_position_embeddings", "must be positive")
    need(all(0 <= i < args.depth for i in args.deepstack_visual_indexes), "deepstack_visual_indexes",
         f"each must be in [0, depth={args.depth})")
    need(len(set(args.deepstack_visual_indexes)) == len(args.deepstack_visual_indexes),
         "deepstack_visual_indexes", "must not repeat a layer")
    need(args.hidden_act in _ACTIVATIONS, "hidden_act", f"allowed: {sorted(_ACTIVATIONS)}")
