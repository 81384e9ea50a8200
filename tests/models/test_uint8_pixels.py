"""Raw uint8 pixels + ``PackedBatch.pixel_norm`` give the model exactly the input (and logits) of the
float32 normalised pixels; ``PackedBatch.to`` keeps them uint8; a missing norm is a clear error."""

from __future__ import annotations

import pytest
import torch

from rynnscale.batch import PackedBatch, PixelNorm
from rynnscale.models.mrope import mrope_position_ids
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs, TextArgs, VisionArgs
from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

IMG, VID, VS, VE = 250, 251, 252, 253
PATCH_DIM = 3 * 2 * 4 * 4  # C * temporal_patch * ps * ps


def tiny_model() -> Qwen3VLForConditionalGeneration:
    args = Qwen3VLArgs(
        text=TextArgs(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3],
                      rope_theta=10000.0),
        vision=VisionArgs(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          num_position_embeddings=16, deepstack_visual_indexes=[0, 1], patch_size=4),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    model = Qwen3VLForConditionalGeneration(args, attn_backend="loop")
    model.init_weights(seed=0, std=0.1)
    return model.eval()


def raw_batch(g: torch.Generator, norm: PixelNorm | None) -> PackedBatch:
    """One sample: text, an image (grid 1x4x6) and a 2-temporal-patch video (grid 2x4x4), uint8 pixels."""
    def text(n):
        return torch.randint(0, 200, (n,), generator=g).tolist()

    ids = torch.tensor(text(3) + [VS] + [IMG] * 6 + [VE] + text(2) + [VS] + [VID] * 4 + [VE] + text(1) + [VS]
                       + [VID] * 4 + [VE] + text(4))
    img_grid, vid_grid = torch.tensor([[1, 4, 6]]), torch.tensor([[2, 4, 4]])
    labels = ids.clone()
    labels[0] = -100
    return PackedBatch(
        input_ids_l=ids, labels_l=labels,
        position_ids_3l=mrope_position_ids(ids, img_grid, vid_grid, spatial_merge_size=2, image_token_id=IMG,
                                           video_token_id=VID),
        cu_seqlens=torch.tensor([0, ids.numel()], dtype=torch.int32), max_seqlen=int(ids.numel()),
        pixel_values=torch.randint(0, 256, (24, PATCH_DIM), dtype=torch.uint8, generator=g), image_grid_thw=img_grid,
        pixel_values_videos=torch.randint(0, 256, (32, PATCH_DIM), dtype=torch.uint8, generator=g),
        video_grid_thw=vid_grid, pixel_norm=norm)


@pytest.mark.parametrize("norm", [PixelNorm(), PixelNorm((0.48145466, 0.4578275, 0.40821073),
                                                         (0.26862954, 0.26130258, 0.27577711), 1 / 255)],
                         ids=["qwen3vl", "clip"])
def test_uint8_pixels_give_the_same_logits_as_normalised_floats(norm: PixelNorm) -> None:
    torch.manual_seed(0)
    model = tiny_model()
    raw = raw_batch(torch.Generator().manual_seed(1), norm)
    raw.validate()
    # the float batch: HF's fused arithmetic written out here (x - mean/rescale) / (std/rescale), float32
    mean = torch.tensor(norm.mean) * (1.0 / norm.rescale)
    std = torch.tensor(norm.std) * (1.0 / norm.rescale)

    def hf_norm(x):
        return x.float().view(x.shape[0], 3, -1).sub(mean.view(1, 3, 1)).div(std.view(1, 3, 1)).view(x.shape)

    floats = PackedBatch(**{**vars(raw), "pixel_values": hf_norm(raw.pixel_values),
                            "pixel_values_videos": hf_norm(raw.pixel_values_videos), "pixel_norm": None})
    assert torch.equal(norm.normalize(raw.pixel_values), floats.pixel_values)
    with torch.no_grad():
        want = model.logits(model(floats).hidden_ld)
        got = model.logits(model(raw).hidden_ld)
    assert torch.equal(got, want)
    # a low-precision move keeps raw pixels uint8 (normalised in float32 by the model), casts float ones
    moved = raw.to("cpu", torch.bfloat16)
    assert moved.pixel_values.dtype == torch.uint8 and moved.pixel_norm == norm
    assert floats.to("cpu", torch.bfloat16).pixel_values.dtype == torch.bfloat16


def test_uint8_pixels_without_norm_are_an_error() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    raw = raw_batch(torch.Generator().manual_seed(2), None)
    with pytest.raises(ValueError, match="pixel_values is uint8 .* pixel_norm is None"):
        raw.validate()
    with pytest.raises(ValueError, match="uint8 \\(raw\\) but batch.pixel_norm is None"):
        model(raw)
