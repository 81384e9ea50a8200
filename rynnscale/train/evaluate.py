"""Evaluation during training: held-out eval loss and a grounding metric on greedy generations.

``Evaluator(cfg, args, rank, world_size)`` reads the held-out shards (``eval.shards``, else a synthetic
eval set generated with another seed than the training set, see ``rynnscale.train.data_files``).
``evaluate(model, ctx)`` returns (all ranks' totals, identical on every rank):

- ``eval_loss``: mean next-token cross-entropy over ALL assistant tokens of the held-out set (or its
  first ``eval.max_batches`` packed micro-batches per rank); ``eval_tokens``: that token count;
  ``eval_skipped``: held-out samples skipped as bad (counted and logged by reason, as in training).
- grounding, over the first ``eval.grounding_samples`` held-out samples whose reference answer has tags:
  the prompt is the sample up to its first assistant token, the answer is greedily generated
  (``rynnscale.models.generate``: batches of prompts up to ``train.micro_batch_tokens`` tokens, KV cache), both
  answers' tags are parsed (``parse_tags``, lenient for the generation) and tags are paired by kind in order of appearance:

  - ``grounding_point_error``: mean L2 distance (0-1000 units) over paired points on the same frame
    (``<affordance>``, ``<area>``, ``<grasp_pose>`` points index by index; ``<object>`` point vs point, or box
    vs point by the box centre);
  - ``grounding_box_iou``: mean IoU over paired ``<object>`` boxes (0 for a box on another frame, as the GRPO
    reward scores it);
  - ``grounding_traj_error``: mean L2 over the trajectory points that fall on the same frame
    (point k of a ``<traj>`` starting at ``<frame f>`` is frame f + k);
  - ``grounding_tag_recall``: reference tags that got a same-kind tag in the generation;
  - ``grounding_frame_match``: of those pairs, the ones on the reference's frame (a trajectory: sharing a frame);
    point pairs on other frames count here, not in the point error;
  - ``grounding_format_valid``: generations whose tags pass the strict training-data syntax (and that
    have tags when the reference has);
  - ``grounding_exact_match``: generations equal to the reference answer text (whitespace-stripped);
  - ``grounding_truncated``: generations cut by ``eval.max_new_tokens`` before their stop token (a cut answer
    scores as a miss however right it was; a warning names the references longer than the cap).

  A metric with nothing to average is None (e.g. no boxes in the eval set).

Distributed (FSDP / EP): every forward is a collective, so all ranks run the same number of forwards:
eval batches are streamed (one all-reduce per forward says whether any rank has one left; a rank that has none
runs a throw-away repeat), and every rank makes as many generate calls as the busiest (a rank out of prompts
decodes a filler, not waited for), each until every rank's real prompts have stopped (an all-reduce per decoding step) or ``eval.max_new_tokens`` are out. The model is put in eval mode under ``torch.no_grad`` and restored to its previous mode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from rynnscale.batch import IGNORE_INDEX, EncodedSample, PackedBatch, filler_batch
from rynnscale.data.tags import TagError, parse_tags
from rynnscale.data.tokenizer import VisionTokenIds
from rynnscale.parallel.precision import autocast, compute_dtype
from rynnscale.train.data_files import eval_data_dir, prepare_eval_files, synthetic_eval_enabled
from rynnscale.train.rewards import box_iou, box_of, centre, l2, pair_by_kind

__all__ = ["Evaluator", "box_iou", "eval_shard_patterns", "grounding_scores", "prompt_groups", "split_prompt",
           "summarize_grounding"]

log = logging.getLogger(__name__)

IM_END = "<|im_end|>"
GENERATION_BATCH = 16   # at most this many grounding prompts decoded together (one prefill row, one KV cache)


# ----------------------------------------------------------------------------------------- data
def eval_shard_patterns(cfg: Any) -> list[str]:
    """``eval.shards``, else the synthetic eval set's glob (without generating it)."""
    if cfg.eval.shards:
        return [str(p) for p in cfg.eval.shards]
    if synthetic_eval_enabled(cfg):
        return [str(eval_data_dir(cfg) / "*.tar")]
    raise ValueError("evaluation needs held-out data: set 'eval.shards', or 'data.synthetic.num_samples' > 0 with "
                     "'eval.synthetic_samples' > 0")



# ----------------------------------------------------------------------------------------- metrics
GROUNDING_SUMS = ("point_err_sum", "points", "iou_sum", "boxes", "traj_err_sum", "traj_points", "ref_tags",
                  "matched_tags", "frame_match", "format_valid", "exact_match", "truncated", "samples")


def grounding_scores(generated: str, reference: str) -> dict[str, float]:
    """Sums and counts (keys GROUNDING_SUMS) comparing one generated answer with its reference;
    :func:`summarize_grounding` turns totals of these into the metrics. ``truncated`` stays 0 here: whether the
    generation ran out of tokens is the caller's to add."""
    out = dict.fromkeys(GROUNDING_SUMS, 0.0)
    out["samples"] = 1.0
    ref = parse_tags(reference, strict=False)
    gen = parse_tags(generated, strict=False)
    try:
        strict_ok = bool(parse_tags(generated, strict=True)) or not ref
    except TagError:
        strict_ok = False
    out["format_valid"] = float(strict_ok)
    out["exact_match"] = float(generated.strip() == reference.strip())
    out["ref_tags"] = float(len(ref))
    for r, g in pair_by_kind(ref, gen):
        if g is None:
            continue
        out["matched_tags"] += 1
        if r.kind == "traj":
            f_ref = 0 if r.frame is None else r.frame
            f_gen = 0 if g.frame is None else g.frame
            gen_at = {f_gen + k: p for k, p in enumerate(g.points)}
            shared = [(p, gen_at[f_ref + k]) for k, p in enumerate(r.points) if f_ref + k in gen_at]
            out["frame_match"] += float(bool(shared))
            for p, q in shared:
                out["traj_err_sum"] += l2(p, q)
                out["traj_points"] += 1
            continue
        same_frame = r.frame == g.frame
        out["frame_match"] += float(same_frame)
        if r.kind == "object" and len(r.points) == 2 and len(g.points) == 2:
            out["iou_sum"] += box_iou(box_of(r), box_of(g)) if same_frame else 0.0
            out["boxes"] += 1
        elif not same_frame:       # a point on another frame: counted by frame_match, not as a distance
            continue
        elif r.kind == "object":   # point vs point, or box vs point: compare centres
            out["point_err_sum"] += l2(centre(r), centre(g))
            out["points"] += 1
        else:                      # affordance / area / grasp_pose: points index by index
            for p, q in zip(r.points, g.points):
                out["point_err_sum"] += l2(p, q)
                out["points"] += 1
    return out


def summarize_grounding(t: dict[str, float]) -> dict[str, float | int | None]:
    """Totals of :func:`grounding_scores` (summed over samples and ranks) -> the grounding metrics."""
    def ratio(a: str, b: str) -> float | None:
        return t[a] / t[b] if t[b] > 0 else None
    return {
        "grounding_samples": int(t["samples"]),
        "grounding_point_error": ratio("point_err_sum", "points"),
        "grounding_box_iou": ratio("iou_sum", "boxes"),
        "grounding_traj_error": ratio("traj_err_sum", "traj_points"),
        "grounding_tag_recall": ratio("matched_tags", "ref_tags"),
        "grounding_frame_match": ratio("frame_match", "matched_tags"),
        "grounding_format_valid": ratio("format_valid", "samples"),
        "grounding_exact_match": ratio("exact_match", "samples"),
        "grounding_truncated": ratio("truncated", "samples"),
    }


# ----------------------------------------------------------------------------------------- prompts
def split_prompt(sample: EncodedSample, ids: VisionTokenIds, merge_size: int) -> tuple[EncodedSample, list[int]]:
    """(prompt, reference ids): the prompt is the sample up to its first assistant token (it ends with
    ``<|im_start|>assistant\\n``) with the images and videos of those tokens only (``ids``: the encoder's vision
    token ids; ``merge_size``: its spatial merge); the reference is that assistant turn's labelled tokens (with its
    ``<|im_end|>``). Raises ValueError naming the key if the sample has no labelled token."""
    lab = sample.labels_l
    nz = (lab != IGNORE_INDEX).nonzero()
    if nz.numel() == 0:
        raise ValueError(f"sample {sample.key!r} has no assistant tokens to evaluate")
    first = int(nz[0])
    end = first
    while end < lab.numel() and int(lab[end]) != IGNORE_INDEX:
        end += 1
    ids_l = sample.input_ids_l[:first]
    image_grid, image_pixels = _media_before(sample, ids_l, ids.image_pad, sample.image_grid_thw,
                                             sample.pixel_values, merge_size, "image")
    video_grid, video_pixels = _media_before(sample, ids_l, ids.video_pad, sample.video_grid_thw,
                                             sample.pixel_values_videos, merge_size, "video")
    prompt = replace(sample, input_ids_l=ids_l, labels_l=sample.labels_l[:first],
                     position_ids_3l=sample.position_ids_3l[:, :first], pixel_values=image_pixels,
                     image_grid_thw=image_grid, pixel_values_videos=video_pixels, video_grid_thw=video_grid)
    return prompt, sample.input_ids_l[first:end].tolist()


def _media_before(sample: EncodedSample, ids_l: torch.Tensor, pad_id: int, grid_n3: torch.Tensor | None,
                  pixels: torch.Tensor | None, merge_size: int, what: str):
    """(grids, pixel rows) of the leading images (videos) whose pad tokens all lie in ``ids_l`` (a later turn's
    media are not the prompt's); (None, None) when there are none."""
    if grid_n3 is None or pixels is None:
        return None, None
    pads = int((ids_l == pad_id).sum())
    tokens_n = (grid_n3.prod(-1) // (merge_size * merge_size)).cumsum(0)
    k = int((tokens_n <= pads).sum())
    if pads != (int(tokens_n[k - 1]) if k else 0):
        raise ValueError(f"sample {sample.key!r}: its prompt has {pads} {what} pad tokens, which is not a whole "
                         f"number of its {what}s' tokens ({tokens_n.tolist()} cumulative)")
    if k == 0:
        return None, None
    return grid_n3[:k], pixels[: int(grid_n3[:k].prod(-1).sum())]


def prompt_groups(lengths: list[int], budget_tokens: int) -> list[list[int]]:
    """Indices of the prompts prefilled together, in order: consecutive, at most ``GENERATION_BATCH``, their tokens
    within ``budget_tokens`` (``train.micro_batch_tokens``: the memory the run planned a forward for); a longer
    prompt alone."""
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not groups or len(groups[-1]) == GENERATION_BATCH or used + n > budget_tokens:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def _text_prompt(ids: list[int]) -> EncodedSample:
    """A text-only prompt (filler for ranks with fewer grounding samples than others)."""
    from rynnscale.models.mrope import text_position_ids

    t = torch.tensor(ids, dtype=torch.long)
    return EncodedSample(key="filler", input_ids_l=t, labels_l=torch.full_like(t, IGNORE_INDEX),
                         position_ids_3l=text_position_ids(len(ids)))


# ----------------------------------------------------------------------------------------- evaluator
class Evaluator:
    """Held-out evaluation of one data-parallel rank (see the module docstring).

    Trainer hook: ``Evaluator.from_run(cfg, args, ctx)`` once (generates the synthetic eval set on rank 0
    if needed), then ``record.update(evaluator.evaluate(model, ctx))`` every ``eval.every_steps``."""

    def __init__(self, cfg: Any, args: Any, rank: int = 0, world_size: int = 1):
        from rynnscale.data.balance import CostModel
        from rynnscale.data.pipeline import build_encoder
        from rynnscale.data.reader import expand_shard_patterns

        if not 0 <= rank < world_size:
            raise ValueError(f"Evaluator: rank {rank} is outside [0, world_size={world_size})")
        self.cfg, self.args, self.rank, self.world_size = cfg, args, rank, world_size
        self.patterns = eval_shard_patterns(cfg)
        try:
            self.shards = expand_shard_patterns(self.patterns)
        except ValueError as e:
            raise ValueError(f"eval.shards {self.patterns}: {e} (a synthetic eval set is generated by "
                             "rynnscale.train.data_files.prepare_eval_files / Evaluator.from_run)") from None
        self.encoder = build_encoder(cfg, args)
        self.cost_model = CostModel.from_args(args)
        tok = self.encoder.tok
        self.eos_ids = [tok.token_to_id(IM_END)]
        if self.eos_ids[0] is None:
            raise ValueError(f"the tokenizer has no {IM_END} token (needed to end generations)")
        self._samples: list[tuple[EncodedSample, list[int]]] | None = None

    @classmethod
    def from_run(cls, cfg: Any, args: Any, ctx: Any) -> Evaluator:
        """Generate the synthetic eval set on rank 0 if it is the held-out set (others wait), then build."""
        prepare_eval_files(cfg, ctx)
        # a CP group is one data-parallel rank (its ranks evaluate the same samples, see ``evaluate``)
        return cls(cfg, args, ctx.data_rank, ctx.data_world_size)

    # -- data
    def loader(self):
        """A fresh finite loader over the held-out shards: one epoch, no shuffling, this rank's split."""
        from rynnscale.data.loader import LoaderConfig, SplitLoader

        lc = LoaderConfig.from_run_config(self.cfg, train_shards=list(self.patterns), mixture=[], num_epochs=1,
                                          shuffle_buffer=0, shuffle_shards=False, num_workers=0,
                                          micro_batches_per_step=1, min_samples_for_bad_check=1 << 62,
                                          cost_model=self.cost_model)
        return SplitLoader(lc, self.encoder, rank=self.rank, world_size=self.world_size,
                           shards_name="eval.shards" if self.cfg.eval.shards else "the synthetic eval set")

    def grounding_samples(self) -> list[tuple[EncodedSample, list[int]]]:
        """This rank's (prompt, reference ids) pairs: of the first ``eval.grounding_samples`` held-out samples
        (shard order) whose reference answer has tags, every ``world_size``-th one. Cached."""
        if self._samples is not None:
            return self._samples
        from rynnscale.data.encode import SampleError
        from rynnscale.data.reader import iter_tar_samples

        want, found, mine = self.cfg.eval.grounding_samples, 0, []
        cap, too_long, longest = self.cfg.eval.max_new_tokens, 0, 0
        for shard in self.shards:
            if found >= want:
                break
            for raw in iter_tar_samples(shard):
                if found >= want:
                    break
                if raw.is_bad:
                    continue
                try:
                    sample = self.encoder.encode(raw.key, raw.members)
                    prompt, ref_ids = split_prompt(sample, self.encoder.ids, self.encoder.spec.merge_size)
                except (SampleError, ValueError) as e:
                    log.warning("eval: skipping %s in %s: %s", raw.key, shard, e)
                    continue
                if not parse_tags(self._decode(ref_ids), strict=False):
                    continue
                if found % self.world_size == self.rank:
                    mine.append((prompt, ref_ids))
                found += 1
                too_long += len(ref_ids) > cap   # (with its stop token: a right answer needs them all)
                longest = max(longest, len(ref_ids))
        if found < want:
            log.warning("eval: only %d of eval.grounding_samples=%d held-out samples have tagged answers", found, want)
        if too_long and self.rank == 0:
            log.warning("eval: %d of %d grounding references are longer than eval.max_new_tokens=%d (longest %d tokens "
                        "with the stop token): their generations are cut and score as misses however right they are "
                        "(grounding_truncated); raise eval.max_new_tokens", too_long, found, cap, longest)
        self._samples = mine
        self._num_found = found
        return mine

    def _decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.eos_ids]
        return self.encoder.tok.decode(ids, skip_special_tokens=True)

    # -- the evaluation
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, ctx: Any | None = None) -> dict[str, Any]:
        """Eval loss + grounding metrics (module docstring); ``ctx`` is the trainer's DistContext (its
        ``sum(list) -> list`` over ranks and ``device``); None = one process on the model's device."""
        device = ctx.device if ctx is not None else next(model.parameters()).device
        # context parallelism: evaluation runs the whole rows with CP off on every rank of a CP group (same
        # samples, same forwards, so FSDP's collectives match; correct but not memory-sharded), and each
        # group's sums count once
        total: Callable[[list[float]], list[float]] = ctx.sum_data if ctx is not None else (lambda v: list(v))
        was_training = model.training
        cp, model.cp = getattr(model, "cp", None), None
        model.eval()
        try:
            with autocast(compute_dtype(self.cfg.train.dtype, device), device):
                loss_sum, n_tokens, skipped = self._eval_loss(model, device, total)
                ground = self._grounding(model, device, total, lockstep=ctx is not None and ctx.distributed)
        finally:
            model.train(was_training)
            model.cp = cp
        out: dict[str, Any] = {"eval_loss": loss_sum / n_tokens if n_tokens else None, "eval_tokens": int(n_tokens),
                               "eval_skipped": skipped}
        out.update(ground)
        return out

    def _eval_loss(self, model, device, total) -> tuple[float, int, int]:
        """(loss sum, target tokens, held-out samples skipped as bad), each summed over the ranks. Batches are
        evaluated as they are read (never all held at once); every forward, the ranks agree by an all-reduce whether
        any still has a batch, and a rank that has none runs a throw-away repeat of its first (FSDP's collectives)."""
        cap = self.cfg.eval.max_batches
        loader = self.loader()
        batches = iter(loader)
        first: PackedBatch | None = None
        loss_sum, n_tok, n_read = 0.0, 0, 0
        chunk = self.cfg.train.loss_chunk_tokens
        while True:
            real = None if cap and n_read >= cap else next(batches, None)
            if real is not None:
                n_read += 1
                if first is None:
                    first = real
            if total([0.0 if real is None else 1.0])[0] == 0:   # every rank is out of batches
                break
            batch = (real if real is not None else first or filler_batch(self.eos_ids[0])).to(device)
            ls = model.loss_sum(batch, model(batch), chunk)
            if real is not None:
                loss_sum += float(ls)
                n_tok += batch.num_target_tokens
        skipped = sum(loader.bad_counts.values())
        if skipped:   # the eval loss is over the other samples: say which were left out and why
            log.warning("eval: %d held-out samples skipped on rank %d (%s); eval_loss is over the rest", skipped,
                        self.rank, loader.bad_summary())
        loss_sum, n_tok, skipped = total([loss_sum, float(n_tok), float(skipped)])
        return loss_sum, int(n_tok), int(skipped)

    def _grounding(self, model, device, total, lockstep: bool = False) -> dict[str, Any]:
        """``lockstep`` (several processes): every rank decodes until all are done -- FSDP's collectives need the
        same forwards everywhere, and the ranks of a CP group, though given the same prompts, must not rely on
        stopping at the same token."""
        if self.cfg.eval.grounding_samples <= 0:
            return {}
        from rynnscale.models.generate import SamplingParams, generate

        mine = self.grounding_samples()
        lockstep = lockstep or self.world_size > 1
        groups = prompt_groups([int(p.input_ids_l.numel()) for p, _ in mine], self.cfg.train.micro_batch_tokens)
        n_groups = len(groups)
        all_done = None
        if lockstep:  # same number of generate calls and forwards on every rank
            counts = [0.0] * self.world_size
            counts[self.rank] = float(n_groups)
            n_groups = int(max(total(counts)))
            all_done = lambda done: total([0.0 if done else 1.0])[0] == 0  # noqa: E731
        sums = dict.fromkeys(GROUNDING_SUMS, 0.0)
        params = SamplingParams(self.cfg.eval.max_new_tokens, stop_ids=tuple(self.eos_ids))
        for g in range(n_groups):   # batched greedy decoding with a KV cache
            idx = groups[g] if g < len(groups) else []
            if not idx:   # this rank has no prompt left: a filler keeps it in lockstep, never waited for
                generate(model, [_text_prompt([self.eos_ids[0]] * 2)], params, device=device, all_done=all_done,
                         fillers=[True])
                continue
            gens = generate(model, [mine[i][0] for i in idx], params, device=device, all_done=all_done)
            for i, new_ids in zip(idx, gens):
                s = grounding_scores(self._decode(new_ids), self._decode(mine[i][1]))
                s["truncated"] = float(not new_ids or new_ids[-1] not in self.eos_ids)   # out of tokens, not stopped
                for k in GROUNDING_SUMS:
                    sums[k] += s[k]
        totals = dict(zip(GROUNDING_SUMS, total([sums[k] for k in GROUNDING_SUMS])))
        return summarize_grounding(totals)
