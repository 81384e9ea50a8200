"""MRoPE positions of one sample == transformers' Qwen3VLModel.get_rope_index (the oracle)."""

from __future__ import annotations

import pytest
import torch

from rynnscale.models.mrope import (
    mrope_next_position,
    mrope_position_ids,
    mrope_rope_delta,
    text_position_ids,
)

transformers = pytest.importorskip("transformers")

IMG, VID, VS, VE = 250, 251, 252, 253
MERGE = 2


@pytest.fixture(scope="module")
def hf_model():
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(vocab_size=256, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           spatial_merge_size=MERGE, patch_size=4, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    return transformers.Qwen3VLModel(cfg).eval()


def _hf_positions(model, ids_l, image_grid_thw, video_grid_thw):
    tt = torch.zeros_like(ids_l)
    tt[ids_l == IMG] = 1
    tt[ids_l == VID] = 2
    pos, delta = model.get_rope_index(
        ids_l[None], tt[None], image_grid_thw=None if image_grid_thw is None else image_grid_thw.clone(),
        video_grid_thw=None if video_grid_thw is None else video_grid_thw.clone())
    return pos[:, 0], int(delta[0, 0])


def _mm_sample(g: torch.Generator):
    """text, image (4x6 patches), text, a 3-frame video with a timestamp before every frame, text,
    a second image (6x2 patches), text."""
    def text(n):
        return torch.randint(0, 200, (n,), generator=g).tolist()

    image_grid = torch.tensor([[1, 4, 6], [1, 6, 2]])
    video_grid = torch.tensor([[3, 4, 4]])
    ids = text(5)
    ids += [VS] + [IMG] * 6 + [VE] + text(3)
    for _ in range(3):  # "<t seconds>" timestamp then one temporal patch of 2x2 merged tokens
        ids += text(2) + [VS] + [VID] * 4 + [VE]
    ids += text(4) + [VS] + [IMG] * 3 + [VE] + text(2)
    return torch.tensor(ids), image_grid, video_grid


def test_image_and_video_match_hf(hf_model):
    g = torch.Generator().manual_seed(0)
    ids, ig, vg = _mm_sample(g)
    ours = mrope_position_ids(ids, ig, vg, spatial_merge_size=MERGE, image_token_id=IMG, video_token_id=VID)
    ref, delta = _hf_positions(hf_model, ids, ig, vg)
    assert ours.dtype == torch.long and ours.shape == (3, ids.numel())
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert mrope_rope_delta(ours) == delta
    assert mrope_next_position(ours) == int(ref.max()) + 1
    # vision tokens really have 2-D positions (not all three rows equal)
    assert (ours[1] != ours[2]).any()


def test_two_videos_and_text_only_match_hf(hf_model):
    g = torch.Generator().manual_seed(1)
    vg = torch.tensor([[2, 2, 4], [1, 4, 2]])
    ids = torch.randint(0, 200, (3,), generator=g).tolist()
    for t, h, w in vg.tolist():
        for _ in range(t):
            ids += [7, VS] + [VID] * ((h // MERGE) * (w // MERGE)) + [VE]
    ids = torch.tensor(ids + [9, 9])
    ours = mrope_position_ids(ids, None, vg, spatial_merge_size=MERGE, image_token_id=IMG, video_token_id=VID)
    torch.testing.assert_close(ours, _hf_positions(hf_model, ids, None, vg)[0], rtol=0, atol=0)

    text = torch.randint(0, 200, (11,), generator=g)
    ours = mrope_position_ids(text, None, None, spatial_merge_size=MERGE, image_token_id=IMG, video_token_id=VID)
    torch.testing.assert_close(ours, text_position_ids(11))
    assert mrope_rope_delta(ours) == 0


def test_mismatched_grid_raises():
    ids = torch.tensor([1, VS] + [IMG] * 6 + [VE])
    with pytest.raises(ValueError, match="image pad-token run #0 .* 6 tokens"):
        mrope_position_ids(ids, torch.tensor([[1, 4, 4]]), None, spatial_merge_size=MERGE,
                           image_token_id=IMG, video_token_id=VID)
    with pytest.raises(ValueError, match="2 image temporal patches"):
        mrope_position_ids(ids, torch.tensor([[1, 4, 6], [1, 4, 6]]), None, spatial_merge_size=MERGE,
                           image_token_id=IMG, video_token_id=VID)
    with pytest.raises(ValueError, match="no grid left"):
        mrope_position_ids(ids, None, None, spatial_merge_size=MERGE, image_token_id=IMG, video_token_id=VID)
    # a whole multi-frame video written without per-frame separators is rejected, not mis-positioned
    vids = torch.tensor([VS] + [VID] * 8 + [VE])
    with pytest.raises(ValueError, match="one temporal patch"):
        mrope_position_ids(vids, None, torch.tensor([[2, 4, 4]]), spatial_merge_size=MERGE,
                           image_token_id=IMG, video_token_id=VID)
