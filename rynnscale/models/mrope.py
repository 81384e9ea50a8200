"""Qwen3-VL multimodal RoPE positions (MRoPE) for one sample.

Every token gets three position ids (temporal, height, width). Text tokens use the same value in
all three rows, counting up by one. A run of consecutive vision pad tokens (the tokens between one
``<|vision_start|>`` and ``<|vision_end|>``) is one image, or ONE temporal patch of a video: Qwen3-VL
writes a timestamp as text before every temporal patch, so each video is split into per-frame grids
with t=1 (exactly like transformers' ``Qwen3VLModel.get_rope_index``). Inside a run the positions
are ``(start, start + h, start + w)`` over the merged ``h x w`` grid, and the next text token starts
at ``start + max(h, w)``.

Shared by the Qwen vision-language families (Qwen3-VL, Qwen3.5 use the same rule); ``text_position_ids``
and ``mrope_next_position`` are the 1-D case every family's generation uses. The functions here work on one sample (positions start at 0) so packing can concatenate samples
whose positions restart at 0; they run on CPU in the data loader (numpy inside, no torch ops per run).
"""

from __future__ import annotations

import numpy as np
import torch


def _per_frame_grids(grid_thw: torch.Tensor | None, what: str) -> np.ndarray:
    """[N, 3] (t, h, w) grids -> [sum t, 2] (h, w) grids, one row per temporal patch."""
    if grid_thw is None:
        return np.zeros((0, 2), dtype=np.int64)
    g = np.asarray(torch.as_tensor(grid_thw).detach().cpu(), dtype=np.int64).reshape(-1, 3)
    if (g <= 0).any():
        raise ValueError(f"mrope_position_ids: {what} has a non-positive entry: {g.tolist()}")
    return np.repeat(g[:, 1:], g[:, 0], axis=0)


def mrope_position_ids(
    input_ids_l: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    *,
    spatial_merge_size: int,
    image_token_id: int,
    video_token_id: int,
) -> torch.Tensor:
    """MRoPE position ids [3, L] (int64) of ONE sample, starting at 0.

    Equal to ``transformers`` ``Qwen3VLModel.get_rope_index`` for that sample (batch of one, no
    padding). ``image_grid_thw`` [N, 3] / ``video_grid_thw`` [M, 3] are the patch grids (before the
    spatial merge) in the order the images / videos occur in ``input_ids_l``. Raises ValueError if
    the number or length of the pad-token runs does not match the grids.
    """
    ids = np.asarray(torch.as_tensor(input_ids_l).detach().cpu(), dtype=np.int64).reshape(-1)
    L = ids.shape[0]
    m = int(spatial_merge_size)
    # modality per token: 0 text, 1 image, 2 video (same codes as HF's mm_token_type_ids)
    kind_l = np.zeros(L, dtype=np.int64)
    kind_l[ids == image_token_id] = 1
    kind_l[ids == video_token_id] = 2
    grids = {1: _per_frame_grids(image_grid_thw, "image_grid_thw"),
             2: _per_frame_grids(video_grid_thw, "video_grid_thw")}
    used = {1: 0, 2: 0}
    names = {1: "image", 2: "video"}

    pos_3l = np.empty((3, L), dtype=np.int64)
    # run boundaries: indices where the modality changes
    starts = np.concatenate([[0], np.flatnonzero(kind_l[1:] != kind_l[:-1]) + 1]) if L else np.zeros(0, np.int64)
    ends = np.concatenate([starts[1:], [L]]) if L else np.zeros(0, np.int64)
    cur = 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        kind = int(kind_l[s])
        if kind == 0:
            pos_3l[:, s:e] = np.arange(cur, cur + e - s)
            cur += e - s
            continue
        k = used[kind]
        if k >= grids[kind].shape[0]:
            raise ValueError(
                f"mrope_position_ids: {names[kind]} pad-token run #{k} at token {s} has no grid left "
                f"({grids[kind].shape[0]} {names[kind]} temporal patches in the grid_thw)")
        h, w = (grids[kind][k] // m).tolist()
        if e - s != h * w:
            raise ValueError(
                f"mrope_position_ids: {names[kind]} pad-token run #{k} at token {s} has {e - s} tokens but its "
                f"grid gives {h}x{w}={h * w} (each run must be one image / one temporal patch of a video)")
        used[kind] = k + 1
        pos_3l[0, s:e] = cur
        pos_3l[1, s:e] = np.repeat(np.arange(h), w) + cur
        pos_3l[2, s:e] = np.tile(np.arange(w), h) + cur
        cur += max(h, w)
    for kind in (1, 2):
        if used[kind] != grids[kind].shape[0]:
            raise ValueError(
                f"mrope_position_ids: {grids[kind].shape[0]} {names[kind]} temporal patches in the grid_thw but "
                f"{used[kind]} {names[kind]} pad-token runs in input_ids")
    return torch.from_numpy(pos_3l)


def mrope_next_position(position_ids_3l: torch.Tensor) -> int:
    """Position of the next text token after a sample: ``max + 1`` over all three rows (0 if empty).

    This is HF's rule for continuing positions (generation); ``next - L`` is HF's ``rope_delta``."""
    return int(position_ids_3l.max()) + 1 if position_ids_3l.numel() else 0


def mrope_rope_delta(position_ids_3l: torch.Tensor) -> int:
    """HF's ``mrope_position_deltas`` for one sample: ``max + 1 - L``."""
    return mrope_next_position(position_ids_3l) - int(position_ids_3l.shape[-1])


def text_position_ids(length: int, start: int = 0) -> torch.Tensor:
    """[3, length] positions of pure text continuing at ``start`` (all three rows equal)."""
    return torch.arange(start, start + length, dtype=torch.long).expand(3, length).clone()
