"""GRPO rollouts: prompts -> G sampled answers each (KV-cache generation on the training model) -> rewards ->
group-normalised advantages -> ``RolloutBatch`` micro-batches for the ``GRPO`` objective."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from rynnscale.batch import IGNORE_INDEX, EncodedSample, PackedBatch, filler_batch
from rynnscale.data.tags import parse_tags
from rynnscale.models.generate import SamplingParams, generate, pack_rows
from rynnscale.models.lora import adapters_disabled
from rynnscale.parallel.precision import autocast
from rynnscale.train.evaluate import split_prompt
from rynnscale.train.objectives import GRPO, RolloutBatch
from rynnscale.train.rewards import GroundingReward, RewardSpec
from rynnscale.train.step import StepStats, train_step

log = logging.getLogger(__name__)


def group_advantages(rewards: Sequence[float], group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> list[float]:
    """Advantage of every sample (groups of ``group_size`` consecutive samples = one prompt's answers):
    ``(r - mean(group)) / (std(group) + eps)`` (``scale``; else without the division), the mean and the
    unbiased std over the group's finite rewards. A NaN reward (a failed reward function) is left out of its
    group's statistics and gets advantage 0, as does every sample of a group with fewer than 2 finite rewards
    (TRL's ``nanmean`` / ``nanstd`` / ``nan_to_num``)."""
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"group_advantages: {len(rewards)} rewards do not form groups of {group_size}")
    out: list[float] = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start:start + group_size]]
        ok = [r for r in group if math.isfinite(r)]
        mean = sum(ok) / len(ok) if ok else math.nan
        std = math.sqrt(sum((r - mean) ** 2 for r in ok) / (len(ok) - 1)) if len(ok) > 1 else math.nan
        for r in group:
            a = (r - mean) / (std + eps) if scale else r - mean
            out.append(a if math.isfinite(a) else 0.0)
    return out


# ----------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PromptRef:
    """Where a prompt-eligible sample lies (``rynnscale.data.reader`` position) and its reference answer."""

    shard: str
    index: int
    key: str
    reference: str


def reference_answer(conv_json: bytes) -> str | None:
    """The text of a conversation's first assistant turn (text items joined), or None."""
    try:
        conv = json.loads(conv_json)
    except (ValueError, UnicodeDecodeError):
        return None
    for msg in (conv.get("conversation") or []) if isinstance(conv, dict) else []:
        if isinstance(msg, dict) and msg.get("role") == "assistant":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text")
            return None
    return None


class PromptSet:
    """The prompts of a GRPO stage: every sample of ``shards`` whose first assistant turn (the reference answer)
    has grounding tags, indexed once by reading ``conv.json`` only (media stay on disk until a prompt is used).

    Order: a permutation of the index per epoch (``seed``, epoch); global position ``p`` is prompt
    ``order(p // N)[p % N]``. A step takes the next ``prompts_per_step`` positions; data rank ``r`` of ``R``
    gets the positions ``== r (mod R)``: which prompts a step sees depends on the step only, not on the layout,
    so the position (``step * prompts_per_step``) is the whole resume state."""

    def __init__(self, shards: Sequence[str], *, seed: int = 0, require_tags: bool = True):
        from rynnscale.data.reader import ReaderLimits, iter_tar_samples

        self.seed = int(seed)
        self.refs: list[PromptRef] = []
        self.skipped = 0
        for shard in shards:
            for raw in iter_tar_samples(shard, ReaderLimits(defer_media=True)):
                ref = None if raw.is_bad else reference_answer(raw.members.get("conv.json", b""))
                if ref is None or (require_tags and not parse_tags(ref, strict=False)):
                    self.skipped += 1
                    continue
                self.refs.append(PromptRef(raw.shard, raw.index, raw.key, ref))
        if not self.refs:
            raise ValueError(f"no prompt with a tagged reference answer in {len(shards)} shard(s) "
                             f"({self.skipped} samples skipped): GRPO needs grounding questions")

    def __len__(self) -> int:
        return len(self.refs)

    def order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch, 0x9E0]).permutation(len(self.refs)).tolist()

    def positions(self, step: int, per_step: int, rank: int = 0, world: int = 1) -> list[int]:
        """Global positions of data rank ``rank``'s prompts at ``step``."""
        if per_step % world:
            raise ValueError(f"rl.prompts_per_step={per_step} must be a multiple of the data-parallel ranks ({world})")
        return [p for p in range(step * per_step, (step + 1) * per_step) if p % world == rank]

    def at(self, position: int) -> PromptRef:
        n = len(self.refs)
        return self.refs[self.order(position // n)[position % n]]


def load_prompts(refs: Sequence[PromptRef], encoder: Any) -> list[tuple[EncodedSample, str, str]]:
    """(prompt cut before its first assistant token, reference answer, key) of each ref: media read by
    position and encoded (``SampleError`` / ``ReaderStateError`` name the sample)."""
    from rynnscale.data.reader import ReaderLimits, read_deferred, read_positions

    raws = read_positions([(r.shard, r.index, r.key) for r in refs], ReaderLimits(defer_media=True))
    out = []
    for ref, raw in zip(refs, raws):
        members = dict(raw.members)
        if raw.deferred is not None:
            members.update(read_deferred(raw.shard, raw.deferred))
        prompt, _ = split_prompt(encoder.encode(raw.key, members))
        out.append((prompt, ref.reference, raw.key))
    return out


# ----------------------------------------------------------------------------------------- rollouts
def rollout_seed(seed: int, position: int, sample: int) -> int:
    """The sampling seed of answer ``sample`` of the prompt at global position ``position`` (layout-free)."""
    return int(np.random.default_rng([int(seed), int(position), int(sample), 0x5EED]).integers(0, 2**63 - 1))


@dataclass
class Rollout:
    """One sampled answer: its prompt, completion ids (stop token included), decoded text, reward (NaN:
    a reward function failed, ``error`` says why) and components, and the group-normalised advantage."""

    key: str
    prompt: EncodedSample
    completion: list[int]
    answer: str
    reward: float
    components: dict[str, float | None]
    advantage: float = 0.0
    error: str | None = None


def score_rollouts(prompts: Sequence[tuple[EncodedSample, str, str]], completions: Sequence[Sequence[int]],
                   group_size: int, reward: GroundingReward, decode: Callable[[list[int]], str], *,
                   scale_rewards: bool = True) -> list[Rollout]:
    """Rewards and advantages of ``group_size`` completions per prompt (prompt-major, as ``generate`` returns)."""
    out = []
    for i, ids in enumerate(completions):
        prompt, reference, key = prompts[i // group_size]
        answer = decode(list(ids))
        res = reward(answer, reference, key)
        out.append(Rollout(key, prompt, list(ids), answer, res.reward, res.components, error=res.error))
    for r, a in zip(out, group_advantages([r.reward for r in out], group_size, scale=scale_rewards)):
        r.advantage = a
    return out


def rollout_sample(r: Rollout) -> tuple[EncodedSample, torch.Tensor]:
    """(prompt + completion as one sample, its per-token advantages): labels hold the completion's ids
    (-100 on the prompt), positions continue the prompt's (``rynnscale.models.generate.pack_rows``)."""
    row = pack_rows([r.prompt], [r.completion])
    n_prompt = int(torch.as_tensor(r.prompt.input_ids_l).numel())
    labels = row.input_ids_l.clone()
    labels[:n_prompt] = IGNORE_INDEX
    adv = torch.zeros(row.num_tokens, dtype=torch.float32)
    adv[n_prompt:] = r.advantage
    sample = EncodedSample(key=r.key, input_ids_l=row.input_ids_l, labels_l=labels, position_ids_3l=row.position_ids_3l,
                           pixel_values=row.pixel_values, image_grid_thw=row.image_grid_thw,
                           pixel_values_videos=row.pixel_values_videos, video_grid_thw=row.video_grid_thw,
                           pixel_norm=row.pixel_norm)
    return sample, adv


def pack_rollouts(rollouts: Sequence[Rollout], budget_tokens: int) -> list[RolloutBatch]:
    """Rollouts, in order, into packed rows of at most ``budget_tokens`` tokens (a longer sample gets a row of
    its own); one document per rollout, advantages per token."""
    batches: list[RolloutBatch] = []
    pending: list[tuple[EncodedSample, torch.Tensor]] = []

    def flush() -> None:
        if pending:
            row = pack_rows([s for s, _ in pending])
            labels = torch.cat([s.labels_l for s, _ in pending])
            batches.append(RolloutBatch(**{f.name: getattr(row, f.name) for f in fields(row)} | {
                "labels_l": labels, "sample_keys": [s.key for s, _ in pending],
                "advantages_l": torch.cat([a for _, a in pending])}))
            pending.clear()

    for r in rollouts:
        s, adv = rollout_sample(r)
        if pending and sum(p.num_tokens for p, _ in pending) + s.num_tokens > budget_tokens:
            flush()
        pending.append((s, adv))
    flush()
    return batches


@torch.no_grad()
def score_log_probs(model: torch.nn.Module, batches: Sequence[PackedBatch], *, device: torch.device,
                    compute_dtype: torch.dtype, temperature: float = 1.0,
                    chunk_tokens: int = 4096) -> list[torch.Tensor]:
    """Per-token log-probs [L] (CPU, fp32) of every batch's labelled tokens under ``model`` as it is (the
    rollout policy before its updates, or the reference); a forward per batch on every rank (fillers too)."""
    out = []
    for b in batches:
        b = b.to(device)
        with autocast(compute_dtype, device):
            o = model(b)
            out.append(model.token_log_probs(b, o, chunk_tokens, temperature).float().cpu())
    return out


# ----------------------------------------------------------------------------------------- one GRPO step
def reward_spec(rc: Any) -> RewardSpec:
    """``rl.reward`` (RewardConfig) -> RewardSpec."""
    return RewardSpec(weights=dict(rc.weights), point_scale=rc.point_scale, traj_scale=rc.traj_scale,
                      functions=dict(rc.functions))


def objective_of(rl: Any, chunk_tokens: int) -> GRPO:
    return GRPO(clip_low=rl.clip_low, clip_high=rl.clip_high, beta=rl.kl_coef, loss_averaging=rl.loss_averaging,
                temperature=rl.temperature, chunk_tokens=chunk_tokens)


@dataclass
class RolloutStep:
    """One step's rollouts on this rank: its prompts' positions, the scored rollouts, and the micro-batches of
    each optimiser step (``parts[k]``; fillers where this rank has fewer than the busiest rank)."""

    positions: list[int]
    rollouts: list[Rollout]
    parts: list[list[PackedBatch]]
    seconds: float = 0.0


class GRPOStage:
    """Rollouts -> rewards -> advantages -> policy steps, one GRPO step at a time (``run_step``).

    Every rank generates for its own prompts (``PromptSet.positions``), G answers each, with the KV cache on
    the training model in place; rewards and group advantages stay on the rank (a group never spans ranks).
    The rollouts are packed into micro-batches of ``train.micro_batch_tokens``; the reference policy's
    log-probs (``rl.kl_coef`` > 0: ``reference`` -- a frozen copy of the stage's initial weights for a full
    fine-tune -- or, for a LoRA run, the same model inside ``adapters_disabled``) and, when a rollout batch feeds
    more than one optimiser step, the rollout policy's own log-probs are computed before any update. Then
    ``rl.epochs`` x ``rl.policy_steps`` optimiser steps (``train_step`` with the ``GRPO`` objective).

    Sampling seeds come from (``run.seed``, prompt position, answer index), so a step's rollouts depend on the
    step only: a resumed run regenerates exactly the rollouts the killed one would have."""

    def __init__(self, cfg: Any, args: Any, ctx: Any, *, reference: torch.nn.Module | None = None,
                 prompt_set: PromptSet | None = None, encoder: Any = None):
        from rynnscale.data.pipeline import build_encoder

        self.cfg, self.rl, self.ctx = cfg, cfg.rl, ctx
        self.encoder = encoder if encoder is not None else build_encoder(cfg, args)
        self.prompts = prompt_set
        self.reward = GroundingReward(reward_spec(cfg.rl.reward))
        self.objective = objective_of(cfg.rl, cfg.train.loss_chunk_tokens)
        self.reference = reference
        tok = self.encoder.tok
        stop = tok.token_to_id("<|im_end|>")
        if stop is None:
            raise ValueError("the tokenizer has no <|im_end|> token (needed to end the answers)")
        self.stop_ids = (stop,)
        rl = cfg.rl
        self.params = SamplingParams(rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
                                     stop_ids=self.stop_ids)

    def decode(self, ids: list[int]) -> str:
        return self.encoder.tok.decode([i for i in ids if i not in self.stop_ids], skip_special_tokens=True)

    # -- rollouts
    def rollout(self, step: int, model: torch.nn.Module, compute_dtype: torch.dtype) -> RolloutStep:
        """Generate, score and pack this rank's rollouts of ``step`` (model in eval mode meanwhile)."""
        ctx, rl = self.ctx, self.rl
        t0 = time.perf_counter()
        positions = self.prompts.positions(step, rl.prompts_per_step, ctx.data_rank, ctx.data_world_size)
        prompts = load_prompts([self.prompts.at(p) for p in positions], self.encoder)
        seeds = [rollout_seed(self.cfg.run.seed, p, j) for p in positions for j in range(rl.group_size)]
        was_training = model.training
        model.eval()
        try:
            with autocast(compute_dtype, ctx.device):
                completions = generate(model, [p for p, _, _ in prompts], self.params, num_samples=rl.group_size,
                                       seeds=seeds, device=ctx.device, all_done=self._all_done)
        finally:
            model.train(was_training)
        rollouts = score_rollouts(prompts, completions, rl.group_size, self.reward, self.decode,
                                  scale_rewards=rl.scale_rewards)
        for r in rollouts:
            if r.error:
                log.warning("step %d: %s (the sample gets advantage 0; the run goes on)", step + 1, r.error)
        parts = self._parts(rollouts)
        self._score(model, parts, compute_dtype)
        return RolloutStep(positions, rollouts, parts, time.perf_counter() - t0)

    def _all_done(self, done: bool) -> bool:
        return self.ctx.sum([0.0 if done else 1.0])[0] == 0

    def _parts(self, rollouts: list[Rollout]) -> list[list[PackedBatch]]:
        """Split into ``rl.policy_steps`` parts (whole groups, in order), each packed; every rank gets as many
        micro-batches per part as the busiest rank (fillers)."""
        k, g = self.rl.policy_steps, self.rl.group_size
        groups = len(rollouts) // g
        if groups % k:
            raise ValueError(f"rl.policy_steps={k} must divide the prompts per rank ({groups} = rl.prompts_per_step "
                             f"/ data-parallel ranks)")
        per = groups // k * g
        parts = [pack_rollouts(rollouts[i * per:(i + 1) * per], self.cfg.train.micro_batch_tokens) for i in range(k)]
        counts = [0.0] * (k * self.ctx.world_size)
        for i, p in enumerate(parts):
            counts[self.ctx.rank * k + i] = float(len(p))
        totals = self.ctx.sum(counts)
        for i, p in enumerate(parts):
            need = int(max(totals[r * k + i] for r in range(self.ctx.world_size)))
            p += [filler_batch(self.stop_ids[0]) for _ in range(need - len(p))]
        return parts

    def _score(self, model: torch.nn.Module, parts: list[list[PackedBatch]], compute_dtype: torch.dtype) -> None:
        """Reference and rollout-policy log-probs of every micro-batch (before any update)."""
        flat = [b for p in parts for b in p]
        kw = dict(device=self.ctx.device, compute_dtype=compute_dtype, temperature=self.rl.temperature,
                  chunk_tokens=self.cfg.train.loss_chunk_tokens)
        if self.rl.kl_coef > 0:
            if self.reference is not None:
                ref = score_log_probs(self.reference, flat, **kw)
            else:
                with adapters_disabled(model) as n:
                    if n == 0:
                        raise ValueError("rl.kl_coef > 0 needs a reference policy: a LoRA run (its base) or a frozen "
                                         "copy of the initial weights")
                    ref = score_log_probs(model, flat, **kw)
            for b, lp in zip(flat, ref):
                if isinstance(b, RolloutBatch):
                    b.ref_logp_l = lp
        if self.rl.policy_steps * self.rl.epochs > 1:   # the first update changes the policy: keep the rollout's
            for b, lp in zip(flat, score_log_probs(model, flat, **kw)):
                if isinstance(b, RolloutBatch):
                    b.old_logp_l = lp

    # -- the step
    def train(self, model: torch.nn.Module, optimizer: Any, scheduler: Any, rs: RolloutStep, *,
              compute_dtype: torch.dtype) -> list[StepStats]:
        """``rl.epochs`` passes of ``rl.policy_steps`` optimiser steps over the rollouts."""
        out = []
        for _ in range(self.rl.epochs):
            for part in rs.parts:
                out.append(train_step(model, optimizer, part, device=self.ctx.device, compute_dtype=compute_dtype,
                                      max_grad_norm=self.cfg.train.max_grad_norm, objective=self.objective,
                                      ctx=self.ctx))
                scheduler.step()
        return out

    def metrics(self, rs: RolloutStep, stats: list[StepStats], train_s: float) -> dict[str, Any]:
        """The step's global RL metrics (every rank gets the same)."""
        comps = self.reward.components
        rewards = [r.reward for r in rs.rollouts]
        ok = [x for x in rewards if math.isfinite(x)]
        local = [float(len(ok)), sum(ok), sum(x * x for x in ok), float(len(rewards) - len(ok)),
                 float(sum(len(r.completion) for r in rs.rollouts)), float(len(rs.rollouts)),
                 float(sum(bool(r.completion) and r.completion[-1] in self.stop_ids for r in rs.rollouts))]
        for c in comps:
            vals = [r.components.get(c) for r in rs.rollouts]
            vals = [v for v in vals if v is not None]
            local += [float(len(vals)), sum(vals)]
        t = self.ctx.sum(local)
        n, s, s2, failed, length, samples, stopped = t[:7]
        mean = s / n if n else None
        rec: dict[str, Any] = {
            "reward_mean": mean, "reward_std": math.sqrt(max(s2 / n - mean * mean, 0.0)) if n else None,
            "reward_failures": int(failed), "response_length": length / samples if samples else None,
            "response_stopped": stopped / samples if samples else None, "rollouts": int(samples),
            "rollout_s": rs.seconds, "train_s": train_s}
        for i, c in enumerate(comps):
            cnt, tot = t[7 + 2 * i], t[8 + 2 * i]
            rec[f"reward_{c}"] = tot / cnt if cnt else None
        tok = sum(st.metrics.get("completion_tokens", 0.0) for st in stats)
        rec["kl"] = sum(st.metrics.get("kl_sum", 0.0) for st in stats) / tok if tok else None
        rec["clip_fraction"] = sum(st.metrics.get("clipped_tokens", 0.0) for st in stats) / tok if tok else None
        rec["ratio_mean"] = sum(st.metrics.get("ratio_sum", 0.0) for st in stats) / tok if tok else None
        rec["policy_steps"] = len(stats)
        return rec
