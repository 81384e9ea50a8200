"""Parity of our Qwen3-VL vision tower with transformers' (the oracle), fp32 on CPU.

Tiny random tower; HF weights are copied into ours with ``load_state_dict(strict=True)``.
Checks: merged embeddings and every deepstack feature (rel. 1e-5), all parameter and input
gradients (rel. 1e-4), the position-embedding resampling against ``F.interpolate`` for grids that
differ from the learned table (up/down-sampling, non-square), attention backends, init, meta init.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from rynnscale.models.qwen3_vl.args import VisionArgs
from rynnscale.models.qwen3_vl.vision import Qwen3VLVisionModel, vision_blocks, vision_patch_meta

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as HFVisionModel  # noqa: E402
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeVisionConfig  # noqa: E402
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (  # noqa: E402
    Qwen3VLMoeVisionModel as HFMoeVisionModel,
)

TINY = VisionArgs(depth=3, hidden_size=32, num_heads=4, intermediate_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=48,
                  num_position_embeddings=64, deepstack_visual_indexes=[0, 2])

# table side is sqrt(64) = 8: (1, 8, 8) hits the table exactly; the others interpolate:
# non-square down/up-sampling, and a video with t=2 temporal patches.
GRIDS = [[1, 8, 8], [1, 6, 10], [2, 4, 6]]
INTERP_GRIDS = [[1, 8, 8], [1, 4, 4], [1, 12, 6], [1, 2, 16], [1, 2, 2], [3, 10, 14]]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _assert_rel(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Norm-relative error <= tol, and no single element off by more than 10*tol*max|ref|."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = _rel(ours, ref)
    max_abs = (ours - ref).abs().max().item()
    assert err <= tol and max_abs <= tol * ref.abs().max().item() * 10, (
        f"{what}: relative error {err:.2e}, max abs diff {max_abs:.2e} (tol {tol:.0e})")


def _build_pair(args: VisionArgs, moe: bool = False, attn_backend: str = "auto"):
    torch.manual_seed(0)
    cfg_cls, hf_cls = (Qwen3VLMoeVisionConfig, HFMoeVisionModel) if moe else (Qwen3VLVisionConfig, HFVisionModel)
    hf = hf_cls(cfg_cls(**dataclasses.asdict(args))).float().eval()
    # HF's init leaves LayerNorms at 1/0 and biases at 0: randomise everything so that each
    # parameter's role is actually exercised by the comparison.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.1)
            if ".norm" in name and name.endswith("weight"):
                p.add_(1.0)
    ours = Qwen3VLVisionModel(args, attn_backend=attn_backend).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _inputs(args: VisionArgs, grids: list[list[int]], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    grid_thw = torch.tensor(grids, dtype=torch.int64)
    num_patches = int(grid_thw.prod(1).sum())
    patch_dim = args.in_channels * args.temporal_patch_size * args.patch_size ** 2
    return torch.randn(num_patches, patch_dim, generator=g), grid_thw


def _hf_forward(hf, pixel_values, grid_thw):
    out = hf(pixel_values, grid_thw)
    return out.pooler_output, list(out.deepstack_features)


def test_state_dict_names_and_shapes_match_hf():
    hf, ours = _build_pair(TINY)
    ours_sd, hf_sd = ours.state_dict(), hf.state_dict()
    assert list(ours_sd) == list(hf_sd)
    for k in hf_sd:
        assert ours_sd[k].shape == hf_sd[k].shape, k
    assert ours.patch_embed.proj.weight.shape == (32, 3, 2, 16, 16)
    assert vision_blocks(ours) is ours.blocks and isinstance(ours.blocks, torch.nn.ModuleList)


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3_vl", "qwen3_vl_moe"])
def test_forward_and_backward_match_hf(moe):
    hf, ours = _build_pair(TINY, moe=moe)
    pix, grid = _inputs(TINY, GRIDS)
    pix_ours, pix_hf = pix.clone().requires_grad_(), pix.clone().requires_grad_()

    emb, deep = ours(pix_ours, grid)
    emb_hf, deep_hf = _hf_forward(hf, pix_hf, grid)
    merged = int(grid.prod(1).sum()) // 4
    assert emb.shape == (merged, TINY.out_hidden_size)
    assert len(deep) == len(deep_hf) == len(TINY.deepstack_visual_indexes)
    _assert_rel(emb, emb_hf, 1e-5, "merged embeddings")
    for i, (d, d_hf) in enumerate(zip(deep, deep_hf)):
        _assert_rel(d, d_hf, 1e-5, f"deepstack[{i}]")

    # backprop one random projection of all outputs through both towers
    g = torch.Generator().manual_seed(2)
    projs = [torch.randn(emb.shape, generator=g) for _ in range(1 + len(deep))]
    loss = sum((o * r).sum() for o, r in zip([emb, *deep], projs))
    loss_hf = sum((o * r).sum() for o, r in zip([emb_hf, *deep_hf], projs))
    loss.backward()
    loss_hf.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = hf_params[name].grad
        assert p.grad is not None and ref is not None, f"{name}: missing gradient"
        assert ref.abs().sum() > 0, f"{name}: HF gradient is all zero, the check would be vacuous"
        _assert_rel(p.grad, ref, 1e-4, f"grad {name}")
    _assert_rel(pix_ours.grad, pix_hf.grad, 1e-4, "grad pixel_values")


@torch.no_grad()
def test_interpolated_pos_embed_matches_f_interpolate():
    """Resampled position table == bilinear F.interpolate(align_corners=True), in merge-block order."""
    torch.manual_seed(0)
    ours = Qwen3VLVisionModel(TINY)
    ours.pos_embed.weight.normal_()
    side, m, D = 8, TINY.spatial_merge_size, TINY.hidden_size
    table_dss = ours.pos_embed.weight.T.reshape(1, D, side, side)
    grid = torch.tensor(INTERP_GRIDS)
    meta = vision_patch_meta(grid, m)
    got_pd = ours.interpolated_pos_embed(meta.coords_4p)
    expect = []
    for t, h, w in INTERP_GRIDS:
        img_dhw = F.interpolate(table_dss, size=(h, w), mode="bilinear", align_corners=True)[0]
        blocks = img_dhw.permute(1, 2, 0).reshape(h // m, m, w // m, m, D).permute(0, 2, 1, 3, 4)
        expect.append(blocks.reshape(h * w, D).repeat(t, 1))
    _assert_rel(got_pd, torch.cat(expect), 1e-6, "interpolated pos embed")
    # the exact-size grid must reproduce table rows (no blending)
    first = got_pd[:64]
    rows = meta.coords_4p[0, :64] * side + meta.coords_4p[1, :64]
    torch.testing.assert_close(first, ours.pos_embed.weight[rows], rtol=0, atol=1e-6)
    # cu_seqlens: one document per frame
    assert meta.cu_seqlens.tolist()[:3] == [0, 64, 80] and meta.cu_seqlens[-1] == grid.prod(1).sum()
    assert meta.max_seqlen == 140


@torch.no_grad()
def test_interpolation_grids_match_hf_end_to_end():
    """Whole-tower parity on grids that differ from the table (non-square, up/down-sampled)."""
    hf, ours = _build_pair(TINY)
    pix, grid = _inputs(TINY, INTERP_GRIDS, seed=3)
    emb, deep = ours(pix, grid)
    emb_hf, deep_hf = _hf_forward(hf, pix, grid)
    _assert_rel(emb, emb_hf, 1e-5, "merged embeddings (interpolation grids)")
    for i, (d, d_hf) in enumerate(zip(deep, deep_hf)):
        _assert_rel(d, d_hf, 1e-5, f"deepstack[{i}] (interpolation grids)")


@torch.no_grad()
def test_eps_sensitive_inputs_match_hf():
    """Patch features whose variance is near the LayerNorm eps (tiny pixels, position table and patch bias): the
    first block's norm then depends on eps strongly, so an eps 10x off in either direction fails (random inputs
    have a variance far above eps and hide it; 100x was caught only by the multimodal text test)."""
    from rynnscale.models.qwen3_vl.vision import LAYER_NORM_EPS

    hf, ours = _build_pair(TINY)
    hf.pos_embed.weight.mul_(1e-3)
    hf.patch_embed.proj.bias.mul_(1e-3)
    ours.load_state_dict(hf.state_dict(), strict=True)
    pix, grid = _inputs(TINY, GRIDS, seed=7)
    pix = pix * 3e-4
    seen = []
    hook = ours.blocks[0].norm1.register_forward_hook(lambda m, args, out: seen.append(args[0].var(-1).mean()))
    emb, deep = ours(pix, grid)
    hook.remove()
    assert 0.3 * LAYER_NORM_EPS < float(seen[0]) < 10 * LAYER_NORM_EPS   # the premise: variance ~ eps
    emb_hf, deep_hf = _hf_forward(hf, pix, grid)
    _assert_rel(emb, emb_hf, 1e-5, "merged embeddings (eps-sensitive inputs)")
    for i, (d, d_hf) in enumerate(zip(deep, deep_hf)):
        _assert_rel(d, d_hf, 1e-5, f"deepstack[{i}] (eps-sensitive inputs)")


@pytest.mark.parametrize("backend", ["loop", "sdpa_mask"])
@torch.no_grad()
def test_attention_backends_match_hf(backend):
    hf, ours = _build_pair(TINY, attn_backend=backend)
    pix, grid = _inputs(TINY, GRIDS, seed=4)
    emb, _ = ours(pix, grid)
    emb_hf, _ = _hf_forward(hf, pix, grid)
    _assert_rel(emb, emb_hf, 1e-5, f"merged embeddings ({backend})")


def test_attention_stays_inside_each_frame():
    """Changing one frame's pixels must not change another frame's outputs."""
    torch.manual_seed(0)
    ours = Qwen3VLVisionModel(TINY).eval()
    pix, grid = _inputs(TINY, [[2, 4, 4]], seed=5)
    emb, _ = ours(pix, grid)
    pix2 = pix.clone()
    pix2[16:] += 1.0  # second temporal frame only
    emb2, _ = ours(pix2, grid)
    torch.testing.assert_close(emb2[:4], emb[:4], rtol=0, atol=0)
    assert not torch.allclose(emb2[4:], emb[4:])


def test_init_weights_follows_hf_and_meta_init_works():
    torch.manual_seed(0)
    big = dataclasses.replace(TINY, hidden_size=64, intermediate_size=256)
    ours = Qwen3VLVisionModel(big)
    std = ours.blocks[0].mlp.linear_fc1.weight.std().item()
    assert 0.017 < std < 0.023, std
    assert torch.all(ours.blocks[0].norm1.weight == 1) and torch.all(ours.merger.norm.bias == 0)
    assert torch.all(ours.blocks[0].attn.qkv.bias == 0) and torch.all(ours.patch_embed.proj.bias == 0)
    assert 0.017 < ours.pos_embed.weight.std().item() < 0.023

    with torch.device("meta"):
        meta_model = Qwen3VLVisionModel(TINY)
    meta_model.to_empty(device="cpu")
    meta_model.init_weights()
    pix, grid = _inputs(TINY, [[1, 4, 6]], seed=6)
    emb, deep = meta_model(pix, grid)
    assert emb.shape == (6, TINY.out_hidden_size) and torch.isfinite(emb).all()


def test_errors_name_the_problem():
    ours = Qwen3VLVisionModel(TINY)
    pix, grid = _inputs(TINY, [[1, 4, 4]])
    with pytest.raises(ValueError, match=r"pixel_values has shape \(15, 1536\); expected \[16, 1536\]"):
        ours(pix[:15], grid)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        ours(pix[:12], torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match=r"vision_config.deepstack_visual_indexes"):
        Qwen3VLVisionModel(dataclasses.replace(TINY, deepstack_visual_indexes=[3]))
    with pytest.raises(ValueError, match=r"vision_config.hidden_act"):
        Qwen3VLVisionModel(dataclasses.replace(TINY, hidden_act="swish9"))
