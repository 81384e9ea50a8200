"""Qwen3-VL / Qwen3-VL-MoE for training on packed rows.

``Qwen3VLForConditionalGeneration`` has exactly transformers' module tree and ``state_dict()`` keys
(``model.visual.*``, ``model.language_model.*``, ``lm_head.weight``) for both the dense and the MoE
variant, so HF weights load with ``load_state_dict(strict=True)`` and export is a plain key copy.

``forward(batch: PackedBatch) -> ModelOutput``: embeds the tokens, runs the vision tower once over
all images and videos of the row (one call; each frame is its own attention document), writes the
visual embeddings at the ``<|image_pad|>`` / ``<|video_pad|>`` positions, runs the decoder with the
DeepStack features, and returns the final-normed hidden states. Logits are NOT materialised:
``loss_sum`` uses the chunked fused ``linear_cross_entropy``; ``logits`` is there for tests/eval.

Context parallelism (``self.cp``, a ``CPGroup`` set by the parallel plan when ``parallel.cp > 1``): every
rank of the CP group gets the SAME packed row and keeps only its shard of it
(``rynnscale.parallel.context_parallel.shard_plan``: zigzag, padded to a multiple of ``2*cp`` with one pad
document at the end). Per token, in this order:
- tokens and MRoPE position ids (computed on the full row by the data path) are sharded by the plan and
  only the local tokens are embedded;
- the vision tower: the frames (temporal patches; each is its own attention document in the tower) of
  the row's images and videos are split into ``cp`` contiguous ranges balanced by patches, each rank
  encodes its range only, and the merged features (+ DeepStack features) are all-gathered
  (differentiable: the backward sums the group's gradients) so that each rank writes the rows of the
  visual tokens it owns -- no rank encodes the whole video;
- decoder attention through ``cp_attention`` (``model.cp_attention``); DeepStack features are added at
  the local visual rows; the MoE statistics count real tokens only;
- ``loss_sum``: labels are shifted on the FULL row, then sharded by the same plan (padding gets
  ``IGNORE_INDEX``), so the sum over the group of the shards' sums is the row's loss sum.
``ModelOutput.hidden_ld`` is then this rank's shard and ``ModelOutput.cp`` its ``CPShard``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn

from rynnscale.batch import PackedBatch
from rynnscale.models.causal_lm import CausalLM, LMHead
from rynnscale.models.kv_cache import KVCache
from rynnscale.models.lora import LoRALinear, expert_lora_init_plan
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs
from rynnscale.models.qwen3_vl.moe import CountsReducer, GroupedExperts, TopKRouter, load_balancing_loss
from rynnscale.models.qwen3_vl.text import RMSNorm, TextModel
from rynnscale.models.spec import ModelOutput
from rynnscale.parallel.context_parallel import CPShard, balanced_ranges, gather_rows

__all__ = ["LMHead", "ModelOutput", "Qwen3VLForConditionalGeneration", "Qwen3VLModel"]


class Qwen3VLModel(nn.Module):
    """HF's ``model``: ``visual`` + ``language_model``."""

    def __init__(self, args: Qwen3VLArgs, attn_backend: str = "auto", gemm_backend: str = "auto"):
        super().__init__()
        from rynnscale.models.qwen3_vl.vision import Qwen3VLVisionModel

        self.visual = Qwen3VLVisionModel(args.vision, attn_backend=attn_backend)
        self.language_model = TextModel(args.text, attn_backend=attn_backend, gemm_backend=gemm_backend)


class Qwen3VLForConditionalGeneration(CausalLM):
    """Dense or MoE Qwen3-VL (chosen by ``args.text.num_experts``) with HF's parameter names.

    ``forward(batch, counts_reducer=None, cache=None)``: ``counts_reducer`` is an optional ``f(local_counts [n_moe, E])
    -> global counts`` used by the load-balancing loss (e.g. all_reduce over data-parallel ranks).
    ``always_run_vision`` is set by the parallel plan (``parallelize.py``) when the tower is sharded.
    Meta-device construction: ``with torch.device("meta"): m = cls(args)``, then
    ``m.to_empty(device=...)`` and ``m.init_weights(seed)`` (which also re-ties tied embeddings)."""

    supports_cache = True

    def __init__(self, args: Qwen3VLArgs, attn_backend: str = "auto", gemm_backend: str = "auto"):
        super().__init__()
        args.validate()
        self.args = args
        self.model = Qwen3VLModel(args, attn_backend, gemm_backend)
        self.lm_head = LMHead(args.text.hidden_size, args.text.vocab_size)
        # always_run_vision (data parallel, FSDP): every rank must run the vision tower in every forward, or a
        # rank with a text-only micro-batch would skip the tower's all-gathers while the others wait (set by
        # the parallel plan, parallelize.py); without visual inputs it then runs on one dummy patch group x 0
        self.tie_weights()

    # ------------------------------------------------------------------ structure
    def input_embeddings(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.language_model.layers

    def vision_tower(self) -> nn.Module:
        return self.model.visual

    def vision_blocks(self) -> nn.ModuleList:
        return self.model.visual.blocks

    def init_plan(self, std: float = 0.02) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """HF's init as ``(parameter name, in-place init of the FULL tensor)`` in the order the RNG is
        consumed: normal(0, std) for linear / embedding / router / expert weights, zero biases, norms to
        one; the untied ``lm_head``; then the vision tower's plan. Every parameter appears once (a tied
        ``lm_head`` is the embedding); raises naming any parameter no rule covers."""
        normal = partial(nn.init.normal_, mean=0.0, std=std)
        plan: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = []
        for name, mod in self.model.language_model.named_modules(prefix="model.language_model"):
            if isinstance(mod, nn.Linear):
                plan.append((f"{name}.weight", normal))
                if mod.bias is not None:
                    plan.append((f"{name}.bias", nn.init.zeros_))
                if isinstance(mod, LoRALinear):
                    plan += mod.init_plan(f"{name}.")
            elif isinstance(mod, (nn.Embedding, TopKRouter)):
                plan.append((f"{name}.weight", normal))
            elif isinstance(mod, GroupedExperts):
                plan += [(f"{name}.gate_up_proj", normal), (f"{name}.down_proj", normal)]
                plan += expert_lora_init_plan(mod, f"{name}.")
            elif isinstance(mod, RMSNorm):
                plan.append((f"{name}.weight", nn.init.ones_))
        if self.lm_head.weight is not self.model.language_model.embed_tokens.weight:
            plan.append(("lm_head.weight", normal))
        plan += self.model.visual.init_plan(std, prefix="model.visual.")
        uncovered = sorted({n for n, _ in self.named_parameters()} - {n for n, _ in plan})
        if uncovered:
            raise RuntimeError(f"init_plan has no rule for {len(uncovered)} parameter(s): {uncovered[:10]}")
        return plan

    # ------------------------------------------------------------------ forward
    def _visual_parts(self, batch: PackedBatch):
        """(pixels, grid_thw, pad token id, name) of the batch's images, then its videos (those present)."""
        a = self.args
        for pv, grid, tok, name in ((batch.pixel_values, batch.image_grid_thw, a.image_token_id, "image"),
                                    (batch.pixel_values_videos, batch.video_grid_thw, a.video_token_id, "video")):
            if pv is None:
                continue
            if grid is None:
                raise ValueError(f"PackedBatch has {name} pixel values but no {name}_grid_thw")
            yield pv, grid, tok, name

    @staticmethod
    def _float_pixels(batch: PackedBatch, pv: torch.Tensor, name: str) -> torch.Tensor:
        """Raw uint8 pixels from the data path normalised here, on the model's device (bitwise HF's)."""
        if pv.dtype != torch.uint8:
            return pv
        if batch.pixel_norm is None:
            raise ValueError(f"PackedBatch {name} pixel values are uint8 (raw) but batch.pixel_norm is None; "
                             "the data path must set it (VisionSpec.pixel_norm)")
        return batch.pixel_norm.normalize(pv)

    @staticmethod
    def _pad_rows(ids_l: torch.Tensor, tok: int, name: str, n: int) -> torch.Tensor:
        """Row indices [n] of the ``<|name_pad|>`` tokens; their count must be the grid's merged tokens."""
        idx_v = (ids_l == tok).nonzero().squeeze(1)
        if idx_v.numel() != n:
            raise ValueError(f"PackedBatch has {idx_v.numel()} <|{name}_pad|> tokens (id {tok}) but its "
                             f"{name}_grid_thw gives {n} merged {name} tokens")
        return idx_v

    def _dummy_vision_inputs(self, embeds_lh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One zero image of ``merge x merge`` patches: (pixels, grid) that run the tower on no real input."""
        m = self.args.vision.spatial_merge_size
        pixels = embeds_lh.new_zeros(m * m, self.model.visual.patch_embed.patch_dim, dtype=torch.float32)
        return pixels, torch.tensor([[1, m, m]], dtype=torch.long, device=embeds_lh.device)

    def _visual_inputs(self, batch: PackedBatch, embeds_lh: torch.Tensor):
        """Vision tower over images + videos in one call -> (embeds with visual rows replaced,
        visual row indices [V], deepstack features list of [V, H]) or (embeds, None, None)."""
        pix, grids, kinds = [], [], []
        m2 = self.args.vision.spatial_merge_size ** 2
        for pv, grid, tok, name in self._visual_parts(batch):
            pix.append(self._float_pixels(batch, pv, name))
            grids.append(grid)
            kinds.append((tok, name, int(grid.prod(-1).sum()) // m2))
        if not pix:
            if self.always_run_vision:
                return self._dummy_vision(embeds_lh), None, None
            return embeds_lh, None, None
        # the tower casts pixels to its compute dtype itself (FSDP mixed precision keeps fp32 storage)
        vis_mh, deepstack = self.model.visual(torch.cat(pix), torch.cat(grids))
        idx_parts, start = [], 0
        for tok, name, n in kinds:
            idx_v = self._pad_rows(batch.input_ids_l, tok, name, n)
            embeds_lh = embeds_lh.index_copy(0, idx_v, vis_mh[start:start + n].to(embeds_lh.dtype))
            idx_parts.append(idx_v)
            start += n
        return embeds_lh, torch.cat(idx_parts), deepstack

    def _dummy_vision(self, embeds_lh: torch.Tensor) -> torch.Tensor:
        """Run the tower on one zero image and add 0 x its outputs: the values are unchanged (exactly),
        the tower's FSDP collectives and (zero) gradients happen."""
        vis_mh, deepstack = self.model.visual(*self._dummy_vision_inputs(embeds_lh))
        zero = sum((d.sum() for d in deepstack), vis_mh.sum()) * 0.0
        return embeds_lh + zero.to(embeds_lh.dtype)

    def _visual_inputs_cp(self, batch: PackedBatch, embeds_lh: torch.Tensor, cp: CPShard):
        """``_visual_inputs`` on a context-parallel shard: this rank encodes its share of the row's frames
        (balanced by patches), the merged + DeepStack features of all ranks are gathered, and the rows of
        the local visual tokens are written. -> (embeds, local visual rows [V_r], deepstack [V_r, H] list)."""
        m2 = self.args.vision.spatial_merge_size ** 2
        pix, frames, toks = [], [], []  # frames: (h, w) grid of every temporal patch, images first, then videos
        for pv, grid, tok, name in self._visual_parts(batch):
            pix.append(pv)
            g = grid.detach().to("cpu", torch.long).reshape(-1, 3)
            frames += [(int(h), int(w)) for t, h, w in g.tolist() for _ in range(int(t))]
            toks.append((tok, name, int(g.prod(-1).sum()) // m2))
        if not pix:
            if self.always_run_vision:
                return self._dummy_vision(embeds_lh), None, None
            return embeds_lh, None, None
        patches = [h * w for h, w in frames]
        lo, hi = balanced_ranges(patches, cp.plan.cp)[cp.rank]
        rows_per_rank = [sum(patches[a_:b_]) // m2 for a_, b_ in balanced_ranges(patches, cp.plan.cp)]
        visual = self.model.visual
        if hi > lo:
            p_lo, p_hi = sum(patches[:lo]), sum(patches[:hi])
            all_pix = torch.cat(pix) if len(pix) > 1 else pix[0]
            pv = self._float_pixels(batch, all_pix[p_lo:p_hi], "image/video")
            grid = torch.tensor([[1, h, w] for h, w in frames[lo:hi]], dtype=torch.long)
            vis_mh, deepstack = visual(pv, grid)
            feats = torch.cat([vis_mh, *deepstack], dim=1)
        else:  # no frame for this rank: the tower still runs (its FSDP collectives), on one dummy patch group
            vis_mh, deepstack = visual(*self._dummy_vision_inputs(embeds_lh))
            feats = torch.cat([vis_mh, *deepstack], dim=1)[:0]  # 0 rows, still in the graph
        feats = gather_rows(feats, rows_per_rank, cp.rank, cp.group)  # [V, O * (1 + n_deepstack)]
        # feature row of every padded-row position (-1: not a visual token), then this rank's positions
        feat_of = torch.full((cp.plan.padded_length,), -1, dtype=torch.long, device=embeds_lh.device)
        start = 0
        ids = batch.input_ids_l.to(embeds_lh.device)
        for tok, name, n in toks:
            idx_v = self._pad_rows(ids, tok, name, n)
            feat_of[idx_v] = torch.arange(start, start + n, device=feat_of.device)
            start += n
        local_feat = feat_of.index_select(0, cp.indices.to(feat_of.device))
        local_rows = (local_feat >= 0).nonzero().squeeze(1)
        mine = feats.index_select(0, local_feat.index_select(0, local_rows))
        out = self.args.vision.out_hidden_size
        embeds_lh = embeds_lh.index_copy(0, local_rows, mine[:, :out].to(embeds_lh.dtype))
        deep = [mine[:, out * (j + 1):out * (j + 2)] for j in range(mine.shape[1] // out - 1)]
        return embeds_lh, local_rows, deep

    def forward(self, batch: PackedBatch, counts_reducer: CountsReducer | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        """``cache`` (generation): the row's documents continue the cache's sequences (prefill, then one token
        per sequence); a continuation is text only, so the vision tower does not run for it on any rank."""
        lm = self.model.language_model
        if cache is not None:
            return self._forward_cached(batch, cache, counts_reducer)
        cp = self.cp_shard(batch)
        if cp is None:
            embeds_lh = lm.embed_tokens(batch.input_ids_l)
            embeds_lh, visual_idx_v, deepstack = self._visual_inputs(batch, embeds_lh)
            hidden_lh, stats = lm(embeds_lh, batch.position_ids_3l, batch.cu_seqlens, batch.max_seqlen,
                                  visual_idx_v, deepstack)
        else:
            embeds_lh = lm.embed_tokens(cp.shard(batch.input_ids_l))
            embeds_lh, visual_idx_v, deepstack = self._visual_inputs_cp(batch, embeds_lh, cp)
            hidden_lh, stats = lm(embeds_lh, cp.shard(batch.position_ids_3l, dim=1), cp.plan.cu_seqlens,
                                  cp.plan.max_seqlen, visual_idx_v, deepstack, cp=cp)
        return self._output(hidden_lh, stats, counts_reducer, cp)

    def _forward_cached(self, batch: PackedBatch, cache: KVCache, counts_reducer: CountsReducer | None) -> ModelOutput:
        lm = self.model.language_model
        embeds_lh = lm.embed_tokens(batch.input_ids_l)
        visual_idx_v = deepstack = None
        if not cache.continuing:
            embeds_lh, visual_idx_v, deepstack = self._visual_inputs(batch, embeds_lh)
        elif next(self._visual_parts(batch), None) is not None:
            raise ValueError("a KV-cache continuation row carries pixel values: media belong in the prefill")
        hidden_lh, stats = lm(embeds_lh, batch.position_ids_3l, batch.cu_seqlens, batch.max_seqlen,
                              visual_idx_v, deepstack, cache=cache)
        return self._output(hidden_lh, stats, counts_reducer, None)

    def _output(self, hidden_lh: torch.Tensor, stats: list, counts_reducer: CountsReducer | None,
                cp: CPShard | None) -> ModelOutput:
        if not stats:
            return ModelOutput(hidden_lh, hidden_lh.new_zeros((), dtype=torch.float32), None, cp)
        prob_mean_le = torch.stack([s.prob_mean_e for s in stats])
        counts_le = torch.stack([s.counts_e for s in stats])
        lb = load_balancing_loss(prob_mean_le, counts_le, counts_reducer)
        # x top_k: transformers' per-layer value is top_k x ours (its f_e sums to k), and checkpoints'
        # router_aux_loss_coef was tuned on that scale; keep the coefficient's meaning.
        coef = self.args.text.router_aux_loss_coef * self.args.text.num_experts_per_tok
        return ModelOutput(hidden_lh, lb * coef, counts_le, cp)
