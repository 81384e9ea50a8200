"""The packed micro-batch: the one contract between the data path and the model.

A micro-batch is ONE row of concatenated whole samples (no padding inside a pack).
Sample ``i`` occupies tokens ``cu_seqlens[i]:cu_seqlens[i+1]``; attention never crosses
those boundaries and MRoPE positions restart at 0 in every sample.

Tensor shapes (L = tokens in the row, P = vision patches, N = images or videos):
- ``input_ids_l``      int64 [L]
- ``labels_l``         int64 [L]   HF convention: *unshifted*; -100 = no loss. Token t is
                                   predicted from position t-1 of the same sample. The first
                                   token of every sample is always -100, so shifting the whole
                                   row never pairs tokens of two different samples.
- ``position_ids_3l``  int64 [3, L] MRoPE (temporal, height, width) positions per sample.
- ``cu_seqlens``       int32 [S+1] sample boundaries, ``cu_seqlens[-1] == L``.
- ``pixel_values``     float [P_img, C*T*ps*ps] image patches (HF processor layout) or None
- ``image_grid_thw``   int64 [N_img, 3] or None
- ``pixel_values_videos`` / ``video_grid_thw`` likewise for videos.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class PackedBatch:
    input_ids_l: torch.Tensor
    labels_l: torch.Tensor
    position_ids_3l: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    sample_keys: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids_l.numel())

    @property
    def num_samples(self) -> int:
        return int(self.cu_seqlens.numel() - 1)

    @property
    def num_target_tokens(self) -> int:
        """Tokens that carry a loss (after the causal shift)."""
        return int((self.labels_l[1:] != -100).sum())

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None) -> PackedBatch:
        """Move every tensor to ``device``; cast floating tensors to ``float_dtype`` if given."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
                if float_dtype is not None and v.is_floating_point():
                    v = v.to(float_dtype)
            out[f.name] = v
        return PackedBatch(**out)

    def validate(self) -> None:
        """Cheap structural checks; raises ValueError naming the broken field."""
        L = self.num_tokens
        if self.labels_l.shape != (L,):
            raise ValueError(f"labels_l has shape {tuple(self.labels_l.shape)}, expected ({L},)")
        if self.position_ids_3l.shape != (3, L):
            raise ValueError(f"position_ids_3l has shape {tuple(self.position_ids_3l.shape)}, expected (3, {L})")
        if int(self.cu_seqlens[0]) != 0 or int(self.cu_seqlens[-1]) != L:
            raise ValueError(f"cu_seqlens must run from 0 to {L}, got {self.cu_seqlens.tolist()}")
        for name in ("pixel_values", "pixel_values_videos"):
            grid = getattr(self, "image_grid_thw" if name == "pixel_values" else "video_grid_thw")
            pv = getattr(self, name)
            if (pv is None) != (grid is None):
                raise ValueError(f"{name} and its grid_thw must both be set or both be None")
            if pv is not None and int(grid.prod(-1).sum()) != pv.shape[0]:
                raise ValueError(f"{name} has {pv.shape[0]} patches but its grid_thw sums to {int(grid.prod(-1).sum())}")


@dataclass
class EncodedSample:
    """One sample after decoding, visual preprocessing and tokenisation; packing concatenates these.

    Shapes as in PackedBatch, for a single sample of length L (positions start at 0)."""

    key: str
    input_ids_l: torch.Tensor
    labels_l: torch.Tensor
    position_ids_3l: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids_l.numel())

    @property
    def num_vision_patches(self) -> int:
        return sum(int(g.prod(-1).sum()) for g in (self.image_grid_thw, self.video_grid_thw) if g is not None)
