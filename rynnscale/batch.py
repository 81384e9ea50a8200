"""The packed micro-batch: the one contract between the data path and the model (and ``DataStep``, what the
loader hands the trainer per optimiser step).

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
- ``pixel_values``     [P_img, C*T*ps*ps] image patches (HF processor layout) or None, either
                       uint8 (raw pixel values, not normalised: 4x less host memory, worker
                       transfer and H2D traffic; the model normalises them on its device with
                       ``pixel_norm``) or floating (already normalised, as HF's processor outputs).
- ``image_grid_thw``   int64 [N_img, 3] or None
- ``pixel_values_videos`` / ``video_grid_thw`` likewise for videos.
- ``pixel_norm``       :class:`PixelNorm`: how uint8 pixels become model input; required when a
                       pixel tensor is uint8, set by the data path from its processor settings.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

import torch

#: label of a token that carries no loss (transformers' convention; ``cross_entropy``'s default ``ignore_index``)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PixelNorm:
    """The processor's rescale + normalisation of uint8 pixels (mean / std per channel, rescale factor).

    :meth:`normalize` is transformers' fast-processor arithmetic exactly (``rescale_and_normalize``):
    the rescale is fused into float32 ``mean' = mean * (1 / rescale)``, ``std' = std * (1 / rescale)``,
    then ``(x.float() - mean') / std'`` in float32, so it is bitwise equal to HF's ``pixel_values``
    on any device with IEEE float32 division. Kept here, beside the batch that carries it, so the
    data path (which knows the processor settings) and the model (which applies them) share one
    implementation."""

    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale: float = 1 / 255

    def __post_init__(self):
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"PixelNorm: mean {self.mean} and std {self.std} need one value per channel")
        if any(s == 0 for s in self.std) or not self.rescale > 0:
            raise ValueError(f"PixelNorm: std {self.std} must be non-zero and rescale {self.rescale} > 0")

    def fused(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 mean' and std' [C] with the rescale folded in (computed on the CPU as HF does, then
        moved; cached per device so a training step makes no tiny host-to-device copies). Read-only."""
        return _fused_mean_std(self, str(torch.device(device) if device is not None else "cpu"))

    def normalize_(self, x_pd: torch.Tensor) -> torch.Tensor:
        """In place on float32 patches [P, C*T*ps*ps] holding raw 0..255 values; returns ``x_pd``."""
        if x_pd.dtype != torch.float32 or x_pd.dim() != 2:
            raise ValueError(f"PixelNorm.normalize_: expected float32 [P, D] patches, got {x_pd.dtype} "
                             f"{tuple(x_pd.shape)}")
        C = len(self.mean)
        if x_pd.shape[1] % C:
            raise ValueError(f"PixelNorm: patch width {x_pd.shape[1]} is not a multiple of {C} channels")
        mean_c, std_c = self.fused(x_pd.device)
        view_pcx = x_pd.view(x_pd.shape[0], C, -1)  # HF column order: channel first
        view_pcx.sub_(mean_c.view(1, C, 1)).div_(std_c.view(1, C, 1))
        return x_pd

    def normalize(self, x_pd: torch.Tensor) -> torch.Tensor:
        """uint8 patches [P, C*T*ps*ps] -> new float32 normalised patches (same device)."""
        if x_pd.dtype != torch.uint8:
            raise ValueError(f"PixelNorm.normalize: expected uint8 patches, got {x_pd.dtype}")
        return self.normalize_(x_pd.to(torch.float32))


@functools.lru_cache(maxsize=32)
def _fused_mean_std(norm: PixelNorm, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    mean_c = torch.tensor(norm.mean, dtype=torch.float32) * (1.0 / norm.rescale)
    std_c = torch.tensor(norm.std, dtype=torch.float32) * (1.0 / norm.rescale)
    return mean_c.to(device), std_c.to(device)


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
    pixel_norm: PixelNorm | None = None
    filler: bool = False    # a row that only keeps a rank in lockstep (same forwards as its peers); trains nothing

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids_l.numel())

    @property
    def num_samples(self) -> int:
        return int(self.cu_seqlens.numel() - 1)

    @property
    def num_target_tokens(self) -> int:
        """Tokens that carry a loss (after the causal shift)."""
        return int((self.labels_l[1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None) -> PackedBatch:
        """Move every tensor to ``device``; cast floating tensors to ``float_dtype`` if given (uint8
        pixels stay uint8: the model normalises them in float32 before its own cast)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
                if float_dtype is not None and v.is_floating_point():
                    v = v.to(float_dtype)
            out[f.name] = v
        return type(self)(**out)   # a subclass (an objective's batch with extra per-token tensors) stays one

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
            if pv is not None and pv.dtype == torch.uint8 and self.pixel_norm is None:
                raise ValueError(f"{name} is uint8 (raw pixels) but pixel_norm is None: set it from the processor "
                                 "settings (VisionSpec.pixel_norm) or pass normalised float pixels")
            if pv is not None and pv.dtype != torch.uint8 and not pv.is_floating_point():
                raise ValueError(f"{name} must be uint8 (raw) or floating (normalised), got {pv.dtype}")


def filler_batch(token_id: int = 0) -> PackedBatch:
    """A 2-token text row with ``filler=True``: the micro-batch of a rank that has no real one left where its
    peers do (a training step whose packs all went bad, the end of an evaluation set), so every rank runs
    the same forwards and collectives. Consumers discard its loss: the trainer weights it 0 and does not
    count its tokens; the row itself is ordinary (one target token), so every loss path runs unchanged."""
    ids = torch.tensor([token_id, token_id], dtype=torch.long)
    return PackedBatch(input_ids_l=ids, labels_l=torch.tensor([IGNORE_INDEX, token_id]),
                       position_ids_3l=torch.arange(2).expand(3, 2).clone(),
                       cu_seqlens=torch.tensor([0, 2], dtype=torch.int32), max_seqlen=2, filler=True)


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
    pixel_norm: PixelNorm | None = None     # set when the pixel tensors are uint8 (see PackedBatch)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids_l.numel())

    @property
    def num_vision_patches(self) -> int:
        return sum(int(g.prod(-1).sum()) for g in (self.image_grid_thw, self.video_grid_thw) if g is not None)


@dataclass
class DataStep:
    """One optimiser step of data on one rank: the loader -> trainer contract (``rynnscale.data.loader``).

    ``micro_batches``: this rank's, exactly ``grad_accum`` of them (a filler where the plan left a slot empty
    or every sample of a pack went bad); ``packs``: the packs the plan gave the whole step (ranks x grad_accum,
    fewer in an epoch's short last step); ``samples``: "<shard>:<key>" of the WHOLE global step (every rank's),
    sorted; ``rank_costs``: the estimated cost of every data-parallel rank's micro-batches; ``bad`` /
    ``bad_distinct``: the run's skipped samples by reason so far, every rank's (occurrences, distinct samples);
    ``state``: the loader state after this step (JSON-able, the same on every rank, loadable on any layout:
    resuming from it continues with the next step); ``metrics``: facts of the step's data to log with it (global
    values, the same on every rank: a GRPO step's rewards and rollout statistics)."""

    index: int
    micro_batches: list[PackedBatch]
    packs: int = 0
    samples: list[str] = field(default_factory=list)
    rank_costs: list[float] = field(default_factory=list)
    bad: dict[str, int] = field(default_factory=dict)
    bad_distinct: dict[str, int] = field(default_factory=dict)
    state: dict | None = None
    metrics: dict = field(default_factory=dict)
