"""GRPO rollouts: prompts -> G sampled answers each (KV-cache generation on the training model) -> rewards ->
group-normalised advantages -> ``RolloutBatch`` micro-batches for the ``GRPO`` objective."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from rynnscale.batch import IGNORE_INDEX, DataStep, EncodedSample, PackedBatch, filler_batch
from rynnscale.config.schema import ConfigError
from rynnscale.data.loader import counts_over_ranks
from rynnscale.data.tags import parse_tags
from rynnscale.models.generate import SamplingParams, generate, pack_rows
from rynnscale.models.lora import adapters_disabled, is_adapter_param
from rynnscale.parallel.precision import autocast
from rynnscale.train.evaluate import split_prompt
from rynnscale.train.objectives import GRPO, RolloutBatch
from rynnscale.train.rewards import GroundingReward, RewardSpec

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
    so the position (``step * prompts_per_step``) is the whole resume state, with a digest of the orders it
    indexes (``order_digest``: a resume that draws another permutation is refused)."""

    def __init__(self, shards: Sequence[str], *, seed: int = 0, require_tags: bool = True):
        from rynnscale.data.reader import ReaderLimits, iter_tar_samples

        self.seed = int(seed)
        self.refs: list[PromptRef] = []
        self._last_order: tuple[int, np.ndarray | None] = (-1, None)
        self.skipped = 0
        for shard in shards:
            for raw in iter_tar_samples(shard, ReaderLimits(defer_media=True)):
                ref = None if raw.is_bad else reference_answer(raw.members.get("conv.json", b""))
                if ref is None or (require_tags and not parse_tags(ref, strict=False)):
                    self.skipped += 1
                    continue
                self.refs.append(PromptRef(raw.shard, raw.index, raw.key, ref))
        if not self.refs:
            raise ConfigError(f"GRPO prompts (rl.prompts, else the run's data): no sample in {len(shards)} shard(s) "
                              f"({shards[0] if shards else '-'}{', ...' if len(shards) > 1 else ''}) has a reference "
                              f"answer with grounding tags ({self.skipped} samples skipped): GRPO needs grounding "
                              "questions whose first assistant turn holds <object> / <area> / <affordance> / <traj> / "
                              "<grasp_pose> tags; point rl.prompts at such shards")

    def __len__(self) -> int:
        return len(self.refs)

    def _permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order, the last one kept (``at`` asks for it prompt by prompt: an O(N) draw each)."""
        if self._last_order[0] != epoch:
            self._last_order = (epoch, np.random.default_rng([self.seed, epoch, 0x9E0]).permutation(len(self.refs)))
        return self._last_order[1]

    def order(self, epoch: int) -> list[int]:
        return self._permutation(epoch).tolist()

    def order_digest(self, epoch: int) -> str:
        """Digest of epoch ``epoch``'s order (``rynnscale.data.reader.order_digest``)."""
        from rynnscale.data.reader import order_digest

        return order_digest(self._permutation(epoch).tolist())

    def epochs_of(self, first: int, count: int) -> range:
        """The epochs positions ``first`` .. ``first + count - 1`` fall in."""
        n = len(self.refs)
        return range(first // n, (first + max(count, 1) - 1) // n + 1)

    def reseed(self, seed: int) -> None:
        """Another order (a resume whose checkpoint recorded another ``data.seed`` than the config's)."""
        self.seed, self._last_order = int(seed), (-1, None)

    def positions(self, step: int, per_step: int, rank: int = 0, world: int = 1) -> list[int]:
        """Global positions of data rank ``rank``'s prompts at ``step``."""
        if per_step % world:
            raise ValueError(f"rl.prompts_per_step={per_step} must be a multiple of the data-parallel ranks ({world})")
        return [p for p in range(step * per_step, (step + 1) * per_step) if p % world == rank]

    def at(self, position: int) -> PromptRef:
        n = len(self.refs)
        return self.refs[int(self._permutation(position // n)[position % n])]


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
        prompt, _ = split_prompt(encoder.encode(raw.key, members), encoder.ids, encoder.spec.merge_size)
        out.append((prompt, ref.reference, raw.key))
    return out


def policy_part(index: int, per_step: int, parts: int) -> int:
    """Which of a rollout's ``parts`` optimiser steps (``rl.policy_steps``) trains the prompt at place ``index``
    (0 .. ``per_step`` - 1) of its step: consecutive places, the parts as even as can be -- a function of the
    global position only, so the same on every layout (a rank's share of a part may be empty: fillers)."""
    bounds = np.linspace(0, per_step, parts + 1).round().astype(int)
    return int(np.searchsorted(bounds, index, side="right")) - 1


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
    """The ``GRPO`` objective of an ``rl`` section."""
    return GRPO(clip_low=rl.clip_low, clip_high=rl.clip_high, beta=rl.kl_coef, loss_averaging=rl.loss_averaging,
                temperature=rl.temperature, chunk_tokens=chunk_tokens)


def prompt_shards(cfg: Any) -> list[str]:
    """The GRPO prompt shards: ``rl.prompts``, else the run's training data (train shards, the mixture sources'
    shards, unweighted, or the synthetic set)."""
    from rynnscale.data.pipeline import synthetic_data_dir
    from rynnscale.data.reader import expand_shard_patterns

    patterns = list(cfg.rl.prompts) or list(cfg.data.train_shards) or [p for m in cfg.data.mixture for p in m.shards]
    if not cfg.rl.prompts and cfg.data.mixture and len({m.weight for m in cfg.data.mixture}) > 1:
        log.warning("GRPO draws its prompts from the shards of every data.mixture source alike: the mixture's "
                    "weights are not applied to prompts (set rl.prompts to choose them)")
    if not patterns and cfg.data.synthetic.num_samples > 0:
        patterns = [str(synthetic_data_dir(cfg) / "*.tar")]
    if not patterns:
        raise ValueError("GRPO has no prompts: set 'rl.prompts' (shard patterns) or the run's training data")
    return expand_shard_patterns(patterns)


@dataclass
class RolloutStep:
    """One rollout step on this rank: its prompts' global positions, the scored rollouts (prompt-major, G per
    prompt), and the micro-batches of each optimiser step (``parts[k]``; fillers where this rank has fewer than
    the busiest rank), reference / rollout-policy log-probs filled in."""

    step: int
    positions: list[int]
    rollouts: list[Rollout]
    parts: list[list[PackedBatch]]


class GRPOStage:
    """Rollouts -> rewards -> advantages -> micro-batches of the ``GRPO`` objective, one rollout step at a time.

    Every rank generates for its own prompts (``PromptSet.positions``), G answers each, with the KV cache on
    the training model in place; rewards and group advantages stay on the rank (a group never spans ranks). A
    prompt whose sample cannot be encoded is skipped and counted (``bad``). The rollouts are split into
    ``rl.policy_steps`` parts of whole groups by the prompts' global positions (``policy_part``: the same prompts
    per optimiser step on any layout), each packed into micro-batches of ``train.micro_batch_tokens``;
    the reference policy's log-probs (``rl.kl_coef`` > 0: ``reference`` -- a frozen copy of the stage's initial
    weights for a full fine-tune -- or, for a LoRA run, the same model inside ``adapters_disabled``, with
    ``base_values``, the initial values of the base parameters it trains, swapped in) and, when a rollout feeds
    more than one optimiser step, the rollout policy's own are computed before any update.

    Sampling seeds come from (``run.seed``, prompt position, answer index), so a step's rollouts depend on the
    step and the weights only: a resumed run regenerates exactly the rollouts the killed one would have (on
    another layout, up to draws at near-ties that the logits' last bits decide: ``rynnscale.models.generate``)."""

    def __init__(self, cfg: Any, args: Any, ctx: Any, *, reference: torch.nn.Module | None = None,
                 base_values: dict[str, torch.Tensor] | None = None,
                 prompt_set: PromptSet | None = None, encoder: Any = None):
        from rynnscale.data.pipeline import build_encoder

        self.cfg, self.rl, self.ctx = cfg, cfg.rl, ctx
        pps, k, world = cfg.rl.prompts_per_step, cfg.rl.policy_steps, ctx.data_world_size
        if k > pps:        # a warning, not an error: a run that did so before must still resume
            log.warning("rl.policy_steps=%d exceeds rl.prompts_per_step=%d: a rollout's prompts are split into "
                        "policy_steps parts, so %d of its optimiser steps train on nothing; lower rl.policy_steps "
                        "or raise rl.prompts_per_step", k, pps, k - pps)
        elif k > pps // world:
            log.warning("rl.policy_steps=%d exceeds the prompts a rank gets per rollout (%d: rl.prompts_per_step=%d "
                        "over %d data-parallel ranks): each optimiser step trains on its share of the prompts, and "
                        "a rank without a prompt in that share runs fillers (idles) in it", k, pps // world, pps, world)
        self.encoder = encoder if encoder is not None else build_encoder(cfg, args)
        self.prompts = prompt_set if prompt_set is not None else PromptSet(prompt_shards(cfg), seed=cfg.data.seed)
        self.reward = GroundingReward(reward_spec(cfg.rl.reward))
        self.objective = objective_of(cfg.rl, cfg.train.loss_chunk_tokens)
        self.reference = reference
        self.base_values = base_values or {}
        stop = self.encoder.tok.token_to_id("<|im_end|>")
        if stop is None:
            raise ValueError("the tokenizer has no <|im_end|> token (needed to end the answers)")
        self.stop_ids = (stop,)
        rl = cfg.rl
        self.params = SamplingParams(rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
                                     stop_ids=self.stop_ids)
        self.bad: dict[str, int] = {}     # the run's skipped prompts and failed rewards by reason, every rank's
        self._found: Counter[str] = Counter()   # ... this rank's of the rollout under way

    def decode(self, ids: list[int]) -> str:
        return self.encoder.tok.decode([i for i in ids if i not in self.stop_ids], skip_special_tokens=True)

    def _count(self, reason: str, n: int = 1) -> None:
        self._found[reason] += n

    def _settle_counts(self) -> None:
        """Add the rollout's counts of every data-parallel rank to the run's (one scalar all-reduce; the reasons
        travel only when some rank found one)."""
        found, self._found = dict(self._found), Counter()
        self.bad = dict(Counter(self.bad) + Counter(counts_over_ranks(self.ctx, found)[0]))

    # -- rollouts
    def _prompts(self, step: int) -> tuple[list[int], list[tuple[EncodedSample, str, str]]]:
        """This rank's prompt positions and prompts at ``step``; a sample that cannot be encoded is skipped."""
        from rynnscale.data.encode import SampleError
        from rynnscale.data.reader import MediaReadError

        ctx = self.ctx
        positions, prompts = [], []
        for p in self.prompts.positions(step, self.rl.prompts_per_step, ctx.data_rank, ctx.data_world_size):
            try:
                prompts += load_prompts([self.prompts.at(p)], self.encoder)
                positions.append(p)
            except (SampleError, MediaReadError) as e:
                reason = f"prompt_{getattr(e, 'reason', 'media_read')}"
                log.warning("step %d: prompt %s skipped (%s): %s", step + 1, self.prompts.at(p).key, reason, e)
                self._count(reason)
        return positions, prompts

    def rollout(self, step: int, model: torch.nn.Module, compute_dtype: torch.dtype) -> RolloutStep:
        """Generate, score, pack and score (log-probs) this rank's rollouts of ``step``."""
        ctx, rl = self.ctx, self.rl
        positions, prompts = self._prompts(step)
        gen_prompts = [p for p, _, _ in prompts] or [_filler_prompt(self.stop_ids[0])]  # a rank never idles
        seeds = [rollout_seed(self.cfg.run.seed, p, j) for p in (positions or [0]) for j in range(rl.group_size)]
        was_training = model.training
        model.eval()
        try:
            with autocast(compute_dtype, ctx.device):
                completions = generate(model, gen_prompts, self.params, num_samples=rl.group_size, seeds=seeds,
                                       device=ctx.device, all_done=self._all_done,
                                       fillers=None if prompts else [True])   # a filler is not waited for
        finally:
            model.train(was_training)
        rollouts = score_rollouts(prompts, completions[:len(prompts) * rl.group_size], rl.group_size, self.reward,
                                  self.decode, scale_rewards=rl.scale_rewards)
        for r in rollouts:
            if r.error:
                log.warning("step %d: %s (%s; the run goes on)", step + 1, r.error,
                            "the sample gets advantage 0" if math.isnan(r.reward) else "a weight-0 component: "
                            "the reward does not use it")
                self._count("reward_failed")
        self._settle_counts()
        return self._prepare(step, positions, rollouts, model, compute_dtype)

    def _all_done(self, done: bool) -> bool:
        return self.ctx.sum([0.0 if done else 1.0])[0] == 0

    def _prepare(self, step: int, positions: list[int], rollouts: list[Rollout], model: torch.nn.Module,
                 compute_dtype: torch.dtype, old_logps: list[list[float]] | None = None) -> RolloutStep:
        parts = self._parts(step, positions, rollouts)
        self._score(model, parts, compute_dtype, old_logps)
        return RolloutStep(step, positions, rollouts, parts)

    def _parts(self, step: int, positions: list[int], rollouts: list[Rollout]) -> list[list[PackedBatch]]:
        """``rl.policy_steps`` parts of whole groups, each packed: part k holds the groups of the prompts whose
        place in the step (global position) falls in its share of ``rl.prompts_per_step`` (``policy_part``), so
        an optimiser step trains on the same prompts on any layout; every rank gets as many micro-batches per
        part as the busiest rank (fillers)."""
        k, g = self.rl.policy_steps, self.rl.group_size
        part_of = [policy_part(p - step * self.rl.prompts_per_step, self.rl.prompts_per_step, k) for p in positions]
        parts = [pack_rollouts([r for i, r in enumerate(rollouts) if part_of[i // g] == j],
                               self.cfg.train.micro_batch_tokens) for j in range(k)]
        counts = [0.0] * (k * self.ctx.world_size)
        for i, p in enumerate(parts):
            counts[self.ctx.rank * k + i] = float(len(p))
        totals = self.ctx.sum(counts)
        for i, p in enumerate(parts):
            need = max(1, int(max(totals[r * k + i] for r in range(self.ctx.world_size))))
            p += [filler_batch(self.stop_ids[0]) for _ in range(need - len(p))]
        return parts

    def _score(self, model: torch.nn.Module, parts: list[list[PackedBatch]], compute_dtype: torch.dtype,
               old_logps: list[list[float]] | None) -> None:
        """Reference and rollout-policy log-probs of every micro-batch (before any update), in eval mode like the
        sampling (no LoRA dropout); ``old_logps``: the rollout policy's per completion (a resumed rollout: its
        policy is gone)."""
        was_training = model.training
        model.eval()
        try:
            self._score_eval(model, parts, compute_dtype, old_logps)
        finally:
            model.train(was_training)

    def _score_eval(self, model: torch.nn.Module, parts: list[list[PackedBatch]], compute_dtype: torch.dtype,
                    old_logps: list[list[float]] | None) -> None:
        flat = [b for p in parts for b in p]
        kw = dict(device=self.ctx.device, compute_dtype=compute_dtype, temperature=self.rl.temperature,
                  chunk_tokens=self.cfg.train.loss_chunk_tokens)
        if self.rl.kl_coef > 0:
            if self.reference is not None:
                ref = score_log_probs(self.reference, flat, **kw)
            else:
                with adapters_disabled(model) as n, swapped_values(model, self.base_values):
                    if n == 0:
                        raise ValueError("rl.kl_coef > 0 needs a reference policy: a LoRA run (its base) or a frozen "
                                         "copy of the initial weights")
                    ref = score_log_probs(model, flat, **kw)
            for b, lp in zip(flat, ref):
                if isinstance(b, RolloutBatch):
                    b.ref_logp_l = lp
        if self.rl.policy_steps * self.rl.epochs == 1:   # one update per rollout: the current policy's, detached
            return
        if old_logps is None:
            scored = score_log_probs(model, flat, **kw)
        else:
            it = iter(old_logps)
            scored = [_completion_tensor(b, it) for b in flat]
        for b, lp in zip(flat, scored):
            if isinstance(b, RolloutBatch):
                b.old_logp_l = lp

    # -- resuming inside a rollout (several optimiser steps per rollout)
    def record(self, rs: RolloutStep) -> dict[str, Any]:
        """The rollout of every rank as JSON (gathered: the same on every rank), keyed by prompt position:
        completions, rewards, advantages and the rollout policy's log-probs -- what ``restore`` needs."""
        mine: dict[str, list[dict]] = {}
        olds = iter(_completion_lists(b) for part in rs.parts for b in part if isinstance(b, RolloutBatch))
        per_sample = [x for lists in olds for x in lists]
        g = self.rl.group_size
        for i, r in enumerate(rs.rollouts):
            mine.setdefault(str(rs.positions[i // g]), []).append({
                "completion": r.completion, "reward": r.reward if math.isfinite(r.reward) else None,
                "components": r.components, "error": r.error, "advantage": r.advantage,
                "old_logp": per_sample[i] if i < len(per_sample) else None})
        gathered = [mine]
        if self.ctx.distributed:
            import torch.distributed as dist

            gathered = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, mine)
        out: dict[str, list[dict]] = {}
        for part in gathered:
            out.update(part)
        return {"step": rs.step, "samples": out}

    def restore(self, record: dict[str, Any], model: torch.nn.Module, compute_dtype: torch.dtype) -> RolloutStep:
        """The RolloutStep ``record`` describes, on this rank's share of its prompts (any layout)."""
        step = int(record["step"])
        positions, prompts = self._prompts(step)
        self._found.clear()   # counted when this rollout was made: the checkpoint's counts hold them
        rollouts, olds = [], []
        for p, (prompt, _, key) in zip(positions, prompts):
            for s in record["samples"][str(p)]:
                reward = float("nan") if s["reward"] is None else float(s["reward"])
                rollouts.append(Rollout(key, prompt, list(s["completion"]), self.decode(list(s["completion"])),
                                        reward, dict(s["components"]), float(s["advantage"]), s["error"]))
                olds.append(s["old_logp"])
        return self._prepare(step, positions, rollouts, model, compute_dtype,
                             olds if self.rl.policy_steps * self.rl.epochs > 1 else None)

    # -- what a step logs
    def rollout_metrics(self, rs: RolloutStep) -> dict[str, Any]:
        """Global reward and answer statistics of a rollout step (every rank gets the same)."""
        comps = self.reward.components
        rewards = [r.reward for r in rs.rollouts]
        ok = [x for x in rewards if math.isfinite(x)]
        local = [float(len(ok)), sum(ok), sum(x * x for x in ok), float(sum(r.error is not None for r in rs.rollouts)),
                 float(sum(len(r.completion) for r in rs.rollouts)), float(len(rs.rollouts)),
                 float(sum(bool(r.completion) and r.completion[-1] in self.stop_ids for r in rs.rollouts))]
        for c in comps:
            vals = [v for v in (r.components.get(c) for r in rs.rollouts) if v is not None]
            local += [float(len(vals)), sum(vals)]
        t = self.ctx.sum(local)
        n, s, s2, failed, length, samples, stopped = t[:7]
        mean = s / n if n else None
        rec: dict[str, Any] = {
            "rollout_step": rs.step + 1, "reward_mean": mean,
            "reward_std": math.sqrt(max(s2 / n - mean * mean, 0.0)) if n else None,
            "reward_failures": int(failed), "rollouts": int(samples),
            "response_length": length / samples if samples else None,
            "response_stopped": stopped / samples if samples else None}
        for i, c in enumerate(comps):
            cnt, tot = t[7 + 2 * i], t[8 + 2 * i]
            rec[f"reward_{c}"] = tot / cnt if cnt else None
        return rec


def _filler_prompt(token_id: int) -> EncodedSample:
    ids = torch.tensor([token_id, token_id], dtype=torch.long)
    return EncodedSample("filler", ids, torch.full_like(ids, IGNORE_INDEX), torch.arange(2).expand(3, 2).clone())


def _completion_lists(b: RolloutBatch) -> list[list[float]]:
    """Per document of ``b``: its completion tokens' ``old_logp_l`` values."""
    out = []
    bounds = b.cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        mask = b.labels_l[s:e] != IGNORE_INDEX
        out.append(b.old_logp_l[s:e][mask].tolist() if b.old_logp_l is not None else [])
    return out


def _completion_tensor(b: PackedBatch, values: Any) -> torch.Tensor | None:
    """[L] with the next documents' completion values (from the ``values`` iterator) at their completion tokens."""
    if not isinstance(b, RolloutBatch):
        return None
    out = torch.zeros(b.num_tokens, dtype=torch.float32)
    bounds = b.cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        idx = (b.labels_l[s:e] != IGNORE_INDEX).nonzero().squeeze(1) + s
        out[idx] = torch.tensor(next(values), dtype=torch.float32)
    return out


class RolloutSource:
    """The training data of a GRPO run, in the trainer's step contract: an iterator of ``DataStep``, one per
    optimiser step. A rollout step (``GRPOStage.rollout``) happens every ``rl.policy_steps x rl.epochs``
    optimiser steps; its parts are the micro-batches of those steps. ``DataStep.metrics`` carries the rollout's
    reward statistics on its first optimiser step; ``DataStep.state`` (the same on every rank) holds the optimiser
    step count and, inside a rollout, the rollout itself (``GRPOStage.record``), so a resume anywhere continues
    exactly on any layout. The prompt position follows from the step count and ``settings`` (the ``rl`` keys it
    depends on and the prompt set), saved with it: a resume whose settings differ is refused naming the key (it
    would skip or repeat prompts)."""

    def __init__(self, stage: GRPOStage, model: torch.nn.Module, compute_dtype: torch.dtype):
        self.stage, self.model, self.compute_dtype = stage, model, compute_dtype
        rl = stage.rl
        self.per_rollout = rl.policy_steps * rl.epochs
        self.steps_done = 0
        self.current: RolloutStep | None = None
        self.saved_record: dict | None = None
        self.objective = stage.objective
        keys = hashlib.sha256("\n".join(r.key for r in stage.prompts.refs).encode()).hexdigest()[:16]
        self.settings = {"prompts_per_step": rl.prompts_per_step, "policy_steps": rl.policy_steps,
                         "epochs": rl.epochs, "group_size": rl.group_size,
                         "prompts": f"{len(stage.prompts)} prompts, keys sha256 {keys}"}

    def __iter__(self) -> RolloutSource:
        return self

    def __next__(self) -> DataStep:
        rollout, k = divmod(self.steps_done, self.per_rollout)
        metrics: dict[str, Any] = {}
        if self.current is None or self.current.step != rollout:
            if self.saved_record is not None and int(self.saved_record["step"]) == rollout and k > 0:
                self.current = self.stage.restore(self.saved_record, self.model, self.compute_dtype)
            else:
                self.current = self.stage.rollout(rollout, self.model, self.compute_dtype)
                metrics = self.stage.rollout_metrics(self.current)
            self.saved_record = self.stage.record(self.current) if self.per_rollout > 1 else None
        part = self.current.parts[k % self.stage.rl.policy_steps]
        self.steps_done += 1
        inside = self.steps_done % self.per_rollout != 0
        ps = self.stage.prompts
        refs = [ps.at(p) for p in range(rollout * self.stage.rl.prompts_per_step,
                                        (rollout + 1) * self.stage.rl.prompts_per_step)]
        return DataStep(index=self.steps_done - 1, micro_batches=list(part), packs=len(part),
                        samples=sorted(f"{r.shard}:{r.key}" for r in refs), bad=dict(self.stage.bad),
                        bad_distinct=dict(self.stage.bad), metrics=metrics,
                        state={"grpo": {"optimizer_steps": self.steps_done, "bad": dict(self.stage.bad),
                                        "rollout": self.saved_record if inside else None,
                                        "settings": dict(self.settings),
                                        "order": self._order_digests(self.steps_done)}})

    def _order_digests(self, steps_done: int) -> dict[str, str]:
        """Epoch -> digest of its prompt order, for the epochs of the positions a resume after ``steps_done``
        optimiser steps uses (those of its rollout: a saved one's, or the next)."""
        per_step = self.stage.rl.prompts_per_step
        first = steps_done // self.per_rollout * per_step
        return {str(e): self.stage.prompts.order_digest(e) for e in self.stage.prompts.epochs_of(first, per_step)}

    def _check_order(self, saved: dict, steps_done: int, inside: bool) -> None:
        """ConfigError if an epoch a resume continues inside (the next position not its first, or a saved rollout's
        positions in it) now has another prompt order than the state was saved with: the position would point into
        another permutation (numpy's seeded permutation is not promised across numpy versions), training some
        prompts of the epoch twice and skipping others (or pairing a saved rollout's answers with other prompts).
        States saved before the digests load unchecked."""
        per_step, n = self.stage.rl.prompts_per_step, len(self.stage.prompts)
        first = steps_done // self.per_rollout * per_step
        epochs = self.stage.prompts.epochs_of(first, per_step) if inside else \
            ([first // n] if first % n else [])
        for e in epochs:
            if str(e) in saved and saved[str(e)] != self.stage.prompts.order_digest(e):
                raise ConfigError(
                    f"GRPO resume: the prompt order of epoch {e} is not the one the checkpoint was saved with (the same "
                    f"seed and prompts give another permutation: numpy {np.__version__} draws differently from the "
                    "numpy that saved it?); continuing would train some prompts of this epoch twice and skip others. "
                    "Resume with the numpy version the run was saved with")

    def load_state_dict(self, state: dict) -> None:
        st = state.get("grpo") if isinstance(state, dict) else None
        if st is None:
            raise ValueError("the checkpoint's data state is not a GRPO run's (train.objective changed?)")
        self._check_settings(st.get("settings") or {}, inside=st.get("rollout") is not None)  # absent: older states
        self._check_order(st.get("order") or {}, int(st["optimizer_steps"]), inside=st.get("rollout") is not None)
        self.steps_done = int(st["optimizer_steps"])
        self.stage.bad = {str(k): int(v) for k, v in st.get("bad", {}).items()}   # absent in older checkpoints
        self.saved_record = st.get("rollout")
        self.current = None

    def _check_settings(self, saved: dict, inside: bool) -> None:
        """The saved run's ``settings`` against this one's: the rollout index and prompt position of a step follow
        from ``rl.prompts_per_step``, ``rl.policy_steps`` and ``rl.epochs`` and the prompt set, the groups of a
        saved rollout from ``rl.group_size`` (only inside one): another value would skip or repeat prompts."""
        for key, now in self.settings.items():
            if key not in saved or saved[key] == now or (key == "group_size" and not inside):
                continue
            if key == "prompts":
                raise ConfigError(f"GRPO resume: the prompt set (rl.prompts, else the run's data) is {now}, but the "
                                  f"checkpoint's was {saved[key]}: its prompt position would point at other prompts; "
                                  "resume with the checkpoint's prompt shards, or start a new run from its export "
                                  "(model.init_from)")
            raise ConfigError(f"GRPO resume: config key 'rl.{key}' = {now!r}, but the checkpoint was saved with "
                              f"{saved[key]!r}: the prompt position follows from the optimiser step and these keys, "
                              "so the run would skip or repeat prompts (or regroup a saved rollout); resume with "
                              "the checkpoint's value, or start a new run from its export (model.init_from)")

    @property
    def bad_counts(self) -> dict[str, int]:
        return dict(self.stage.bad)

    def bad_summary(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.stage.bad.items()))


def trained_base_params(model: torch.nn.Module) -> list[str]:
    """The trainable parameters of a LoRA model that are not adapters (``model.lora.trainable``): updated in
    place, so the adapter-disabled model alone is no longer the initial base."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not is_adapter_param(n)]


@contextmanager
def swapped_values(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block the parameters named in ``values`` hold those values (copied in place into FSDP2's
    sharded parameters, which its next forward gathers), then their own again -- also when the block raises
    (though a forward that raised midway can leave FSDP2 holding its gathered copy for one more forward)."""
    if not values:    # a LoRA run training adapters only: nothing to swap, nothing to regather
        yield
        return
    _reshard(model)   # after a forward FSDP2 may leave the root's parameters unsharded (plain tensors)
    params = dict(model.named_parameters())   # now the sharded parameters themselves: kept for the restore
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, v in values.items():
                saved[name] = params[name].detach().clone()
                params[name].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for name, v in saved.items():
                params[name].copy_(v)
        _reshard(model)   # drop the gathered copies of the swapped values


def _reshard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def build_rollout_source(cfg: Any, run: Any, ctx: Any, model: torch.nn.Module) -> RolloutSource:
    """A GRPO run's data (``train.objective: grpo``): its prompts, reward and reference policy (``rl.kl_coef`` >
    0). A full fine-tune's reference is a frozen copy of the initial weights built like the policy (same
    ``model.init_from`` or seed, same shards); a LoRA run's is the same model with its adapters disabled, no copy,
    and when ``model.lora.trainable`` trains base parameters too, their initial values are kept and swapped in
    while the reference scores. Built before a resume loads the checkpoint, so these are the stage's initial
    values."""
    from rynnscale.train.build import build_model

    prompts = PromptSet(prompt_shards(cfg), seed=cfg.data.seed)   # before the reference: a bad set fails fast
    reference, base_values = None, {}
    if cfg.rl.kl_coef > 0 and cfg.model.lora.rank <= 0:
        _, reference = build_model(cfg.model, ctx.device, cfg.run.seed, meshes=ctx.meshes,
                                   compute_dtype=run.compute_dtype, arch=run.arch)
        reference.requires_grad_(False)
        reference.eval()
        log.info("GRPO reference policy: a frozen copy of the initial weights (rl.kl_coef=%g)", cfg.rl.kl_coef)
    elif cfg.rl.kl_coef > 0:
        params = dict(model.named_parameters())
        base_values = {n: params[n].detach().clone() for n in trained_base_params(model)}
        log.info("GRPO reference policy: the base model (adapters disabled)%s", "" if not base_values else
                 f", with the initial values of the {len(base_values)} base parameter(s) model.lora.trainable trains "
                 f"({next(iter(base_values))}, ...), kept: {sum(v.numel() for v in base_values.values()):,} numbers")
    stage = GRPOStage(cfg, run.args, ctx, reference=reference, base_values=base_values, prompt_set=prompts)
    log.info("GRPO prompts: %d tagged questions (%d samples without tags skipped); %d per step x %d answers",
             len(stage.prompts), stage.prompts.skipped, cfg.rl.prompts_per_step, cfg.rl.group_size)
    return RolloutSource(stage, model, run.compute_dtype)
