"""Typed config schema of a training run.

Every recipe is validated against these dataclasses (through omegaconf structured configs), so an
unknown key, a wrong type or a value outside its allowed set fails before any work starts, with a
message naming the key. Keys listed in the issue as a contract (``run.output_dir``, ``train.max_steps``,
``parallel.ep``, ...) keep their names.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key."""


def _at_least_one(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"config key '{key}' = {value} must be >= 1")


@dataclass
class RunConfig:
    output_dir: str = "runs/default"   # metrics.jsonl, resolved config, checkpoints live here
    seed: int = 0
    name: str = ""                      # free-form run name (wandb, plots)
    device: str = "auto"                # auto | cpu | cuda


@dataclass
class LoRAConfig:
    """LoRA fine-tuning (``rynnscale/models/lora.py``): base weights frozen, low-rank adapters trained."""
    rank: int = 0                       # 0 = off (full fine-tune)
    alpha: float = 16.0                 # update scale alpha / rank
    dropout: float = 0.0                # on the adapters' input (Linear targets; experts use none)
    # fnmatch patterns over module names (HF names); default: language-model attention q/k/v/o + dense MLP
    targets: list[str] = field(default_factory=lambda: ["*.self_attn.q_proj", "*.self_attn.k_proj",
                                                        "*.self_attn.v_proj", "*.self_attn.o_proj",
                                                        "*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj"])
    experts: bool = False               # adapters on every MoE layer's fused expert tensors (per expert)
    vision: bool = False                # adapt the vision tower's blocks too
    trainable: list[str] = field(default_factory=list)  # parameter patterns kept fully trainable (e.g. 'lm_head.*')

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"config key 'model.lora.rank' = {self.rank} must be >= 0 (0 = no LoRA)")
        if self.rank == 0:   # LoRA off: any other LoRA key set would be silently ignored (a full fine-tune)
            default = LoRAConfig()
            stray = [f.name for f in dataclasses.fields(self) if f.name != "rank"
                     and getattr(self, f.name) != getattr(default, f.name)]
            if stray:
                raise ConfigError(f"config key(s) {', '.join(f'model.lora.{k}' for k in stray)} set but "
                                  "'model.lora.rank' = 0 (LoRA off: the run would train every parameter and ignore "
                                  "them); set model.lora.rank > 0 or remove the LoRA keys")
            return
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"config key 'model.lora.alpha' = {self.alpha} must be a finite number > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"config key 'model.lora.dropout' = {self.dropout} must be in [0, 1)")
        for key in ("targets", "trainable"):
            if any(not p for p in getattr(self, key)):
                raise ConfigError(f"config key 'model.lora.{key}' has an empty pattern")
        if not self.targets and not self.experts:
            raise ConfigError("model.lora.rank > 0 but 'model.lora.targets' is empty and 'model.lora.experts' is "
                              "off: nothing would be adapted")


@dataclass
class ModelConfig:
    init_from: str | None = None     # local Hugging Face Qwen3-VL(-MoE) directory
    arch: dict[str, Any] | None = None   # inline architecture in config.json form (text_config/vision_config)
    activation_checkpointing: str = "none"  # none | full | every_k | selective
    activation_checkpointing_every: int = 2  # k for every_k
    attn_backend: str = "auto"          # auto | varlen | sdpa_mask | loop
    kernels: str = "auto"               # auto | torch | liger: RMSNorm / RoPE / SwiGLU / fused loss (ops/fused.py)
    compile: bool = False               # torch.compile each decoder layer and vision block (parallel/compile.py)
    cp_attention: str = "auto"          # ulysses | ring | auto: decoder attention under parallel.cp > 1
    # Published architecture (a model family's presets: rynnscale.models.presets()) used where init_from's config.json is
    # not on this machine (planning on a laptop); when both exist they must describe the same model.
    preset: str | None = None
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns over HF parameter names
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def validate(self) -> None:
        """This section's own rules (the architecture is resolved by ``config.model_args``)."""
        _at_least_one("model.activation_checkpointing_every", self.activation_checkpointing_every)
        for i, pat in enumerate(self.freeze):
            if not pat:
                raise ConfigError(f"config key 'model.freeze[{i}]' is empty")
        self.lora.validate()


def check_synthetic_size(frames: int, width: int, height: int, prefix: str = "") -> None:
    """The synthetic generator's render bounds (``rynnscale.data_pipelines.synthetic``, which calls this too):
    ``frames`` >= 2 (Qwen3-VL's temporal patch), ``width`` and ``height`` >= 16 and even (yuv420p video).
    ``ConfigError`` naming the key (``prefix`` + name, e.g. ``data.synthetic.frames``), so that a recipe fails at
    load and ``rynnscale data synth`` with a message."""
    for key, value, ok, rule in (("frames", frames, frames >= 2, ">= 2 (Qwen3-VL's temporal patch)"),
                                 ("width", width, width >= 16 and width % 2 == 0, "even and >= 16 (yuv420p video)"),
                                 ("height", height, height >= 16 and height % 2 == 0, "even and >= 16 (yuv420p video)")):
        if not ok:
            raise ConfigError(f"{'config key ' if prefix else ''}'{prefix}{key}' = {value!r} must be {rule}")


# The synthetic generator's question types and its most objects per clip (its palette's size:
# ``rynnscale.data_pipelines.synthetic``, which checks with these too); here so a recipe is checked at load.
SYNTHETIC_QUESTION_TYPES = ("traj", "locate_last", "locate_frame", "which_moved", "affordance")
SYNTHETIC_MAX_OBJECTS = 5


def check_object_counts(objects) -> tuple[int, int]:
    """``objects`` = (fewest, most) objects per clip, checked: 1 <= fewest <= most <= the palette's size."""
    if len(objects) != 2 or not 1 <= objects[0] <= objects[1] <= SYNTHETIC_MAX_OBJECTS:
        raise ValueError(f"synthetic object counts must be [fewest, most] with 1 <= fewest <= most <= "
                         f"{SYNTHETIC_MAX_OBJECTS}, got {list(objects)}")
    return int(objects[0]), int(objects[1])


def check_question_types(questions) -> tuple[str, ...]:
    """``questions`` as a tuple after checking it is a non-empty list of known question types."""
    bad = [q for q in questions if q not in SYNTHETIC_QUESTION_TYPES]
    if not questions or bad or len(set(questions)) != len(questions):
        raise ValueError(f"synthetic question types must be distinct names from {list(SYNTHETIC_QUESTION_TYPES)}, "
                         f"got {list(questions)}")
    return tuple(questions)


@dataclass
class SyntheticDataConfig:
    """Built-in synthetic egocentric dataset, generated once into ``output_dir`` (default: under the run)."""
    num_samples: int = 0                # 0 = off
    output_dir: str | None = None    # default: <run.output_dir>/synthetic_data
    frames: int = 4
    width: int = 64
    height: int = 64
    fps: float = 2.0
    samples_per_shard: int = 250
    seed: int = 1234
    # question types drawn per clip (data_pipelines/synthetic.py QUESTION_TYPES); a subset narrows the task,
    # e.g. [affordance, locate_frame] for a set of pointing and box questions
    questions: list[str] = field(default_factory=lambda: ["traj", "locate_last", "locate_frame", "which_moved",
                                                          "affordance"])
    objects: list[int] = field(default_factory=lambda: [2, 4])   # [fewest, most] objects per clip

    def validate(self) -> None:
        check_synthetic_size(self.frames, self.width, self.height, "data.synthetic.")
        for key, check in (("questions", check_question_types), ("objects", check_object_counts)):
            try:
                check(getattr(self, key))
            except ValueError as e:
                raise ConfigError(f"config key 'data.synthetic.{key}': {e}") from None


@dataclass
class MixtureSourceConfig:
    """One shard set of a data mixture: samples are drawn from it with probability weight / sum(weights)."""
    name: str = ""
    shards: list[str] = field(default_factory=list)   # paths, globs or brace patterns
    weight: float = 1.0


@dataclass
class DataConfig:
    root: str = ""                      # base directory for ${data.root}/... shard patterns in recipes
    train_shards: list[str] = field(default_factory=list)   # paths, globs or brace patterns
    mixture: list[MixtureSourceConfig] = field(default_factory=list)  # weighted shard sets (instead of train_shards)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    tokenizer: str | None = None     # tokenizer directory; default: init_from, else the bundled Qwen3 one
    seed: int = 0
    shuffle_buffer: int = 256
    pack_window: int = 64
    num_workers: int = 0
    worker_timeout_s: float = 1800.0    # with workers: no batch for this long is an error naming it (0 = wait forever)
    balance: str = "cost"               # cost | tokens | none: how a step's packs are assigned to data-parallel ranks
    tune_malloc: bool = True            # glibc malloc keeps freed pixel buffers for reuse (per loader process)
    defer_media: bool = True            # read each sample's media by position, only on the rank that decodes it
    max_bad_fraction: float = 0.05
    verify_shards: bool = False         # sha256 of each shard vs manifest.json when opened (size is always checked)
    truncate: bool = False              # truncate over-long samples instead of skipping them
    video_fps: float = 2.0
    video_max_frames: int = 768
    video_min_frames: int = 4
    image_min_pixels: int = 65536
    image_max_pixels: int = 16777216
    video_min_pixels: int = 4096
    video_max_pixels: int = 25165824
    # bounds on untrusted shards (README "Guarantees on hostile input"); all must be >= 1
    max_member_bytes: int = 1 << 30     # one tar member, checked from its header before reading
    max_sample_bytes: int = 2 << 30     # all members of one sample
    shuffle_buffer_bytes: int = 1 << 30  # payload bytes the shuffle buffer holds; over it, samples leave early
    max_image_pixels: int = 4096 * 4096  # one image / frame / video frame as its header states, before decoding

    def validate(self) -> None:
        _at_least_one("data.pack_window", self.pack_window)
        if not (math.isfinite(self.worker_timeout_s) and self.worker_timeout_s >= 0):
            raise ConfigError(f"config key 'data.worker_timeout_s' = {self.worker_timeout_s} must be a finite number "
                              "of seconds >= 0 (0 = wait forever)")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"config key 'data.max_bad_fraction' = {self.max_bad_fraction} must be in [0, 1]")
        for lo, hi in (("video_min_frames", "video_max_frames"), ("image_min_pixels", "image_max_pixels"),
                       ("video_min_pixels", "video_max_pixels"), ("max_member_bytes", "max_sample_bytes")):
            if getattr(self, lo) > getattr(self, hi):
                raise ConfigError(f"config key 'data.{lo}' = {getattr(self, lo)} must be <= 'data.{hi}' = "
                                  f"{getattr(self, hi)}")
        if any(not str(p) for p in self.train_shards):   # as eval.shards: an empty pattern matches nothing
            raise ConfigError(f"config key 'data.train_shards' = {list(self.train_shards)} has an empty pattern")
        if self.mixture and self.train_shards:
            raise ConfigError("set either 'data.train_shards' or 'data.mixture', not both (put the plain shards into "
                              "a mixture source of their own)")
        check_mixture_sources(self.mixture, "data.mixture")
        if self.tokenizer is not None and not self.tokenizer:
            raise ConfigError("config key 'data.tokenizer' is empty; give a tokenizer directory or leave it unset "
                              "(model.init_from's tokenizer, else the bundled Qwen3 one)")
        self.synthetic.validate()
        if self.mixture and self.synthetic.num_samples > 0:   # the loader draws from the mixture's sources only
            raise ConfigError(f"set either 'data.mixture' or the synthetic set ('data.synthetic.num_samples' = "
                              f"{self.synthetic.num_samples}), not both: a mixture draws only from its sources; "
                              "write the set with 'rynnscale data synth DIR' and add DIR as a mixture source of its "
                              "own, or set data.synthetic.num_samples=0")


@dataclass
class TrainConfig:
    max_steps: int = 100
    micro_batch_tokens: int = 4096      # token budget of one packed micro-batch (per rank)
    grad_accum: int = 1
    max_grad_norm: float = 1.0          # <= 0 disables clipping
    loss_chunk_tokens: int = 2048       # tokens per chunk of the fused linear + cross-entropy
    log_every: int = 1                  # metrics.jsonl every N steps (and the last); also every step that evaluated (or GRPO rolled out)
    dtype: str = "auto"                 # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16
    max_nonfinite_steps: int = 5        # inf/NaN loss or grad norm: step skipped, no save; abort after this many in a row
    objective: str = "sft"              # sft (next-token cross-entropy) | grpo (rollouts + rewards, the rl.* section)

    def validate(self) -> None:
        for key in ("max_steps", "micro_batch_tokens", "grad_accum", "loss_chunk_tokens", "log_every"):
            _at_least_one(f"train.{key}", getattr(self, key))
        if self.micro_batch_tokens < 16:
            raise ConfigError(f"config key 'train.micro_batch_tokens' = {self.micro_batch_tokens} is too small")


@dataclass
class OptimGroupConfig:
    """Parameters whose HF name matches ``pattern`` (fnmatch) train with lr * lr_scale."""
    pattern: str = ""
    lr_scale: float = 1.0
    weight_decay: float | None = None   # None = optim.weight_decay


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1           # where the cosine and linear decays end, as a fraction of lr
    warmup_steps: int = 0
    schedule: str = "cosine"            # cosine | constant | linear
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_ratio: float = 0.0           # > 0: warmup over this fraction of train.max_steps (overrides warmup_steps)
    groups: list[OptimGroupConfig] = field(default_factory=list)  # per-module lr / weight decay, first match wins

    def validate(self) -> None:
        if self.eps <= 0:
            raise ConfigError(f"config key 'optim.eps' = {self.eps} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"config key 'optim.min_lr_ratio' = {self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ConfigError(f"config key 'optim.warmup_steps' = {self.warmup_steps} must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"config key 'optim.warmup_ratio' = {self.warmup_ratio} must be in [0, 1)")
        for i, g in enumerate(self.groups):
            if not g.pattern:
                raise ConfigError(f"config key 'optim.groups[{i}].pattern' is empty; give an fnmatch pattern over HF "
                                  "parameter names, e.g. 'model.visual.*'")
            if g.lr_scale < 0:
                raise ConfigError(f"config key 'optim.groups[{i}].lr_scale' = {g.lr_scale} must be >= 0 (to freeze "
                                  "parameters use 'model.freeze')")
            if g.weight_decay is not None and g.weight_decay < 0:
                raise ConfigError(f"config key 'optim.groups[{i}].weight_decay' = {g.weight_decay} must be >= 0")


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1                  # -1 = all remaining ranks
    ep: int = 1                         # expert parallel degree, carved out of dp_shard x cp (must divide it)
    cp: int = 1                         # context parallel degree: ranks splitting one sequence (same samples)
    timeout_s: float = 600.0            # timeout of every collective: a dead / diverged rank fails the job

    def validate(self) -> None:
        """This section's own rules; the layout's (which need the expert count) are checked by ``config.load``."""
        if self.timeout_s <= 0:
            raise ConfigError(f"config key 'parallel.timeout_s' = {self.timeout_s} must be > 0")


@dataclass
class PlanConfig:
    """Target cluster and workload assumptions for ``rynnscale plan`` (command-line flags override)."""
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    visual_tokens_per_micro_batch: int = 0  # merged visual tokens assumed inside one micro-batch (budget)
    peak_tflops: float = 790.0           # dense bf16 matmul rate per GPU (H100 SXM measured ~747-789)
    mfu: float = 0.35                    # expected model-FLOPs utilisation for the step-time estimate
    nvlink_gbps: float = 360.0           # achievable intra-node collective bandwidth per GPU, GB/s
    ib_gbps: float = 45.0                # achievable inter-node bandwidth per GPU (400 Gb/s NIC), GB/s

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> None:
        for key in ("nodes", "gpus_per_node"):
            _at_least_one(f"plan.{key}", getattr(self, key))
        for key in ("gpu_mem_gib", "peak_tflops", "nvlink_gbps", "ib_gbps"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"config key 'plan.{key}' = {getattr(self, key)} must be > 0")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"config key 'plan.mfu' = {self.mfu} must be in (0, 1]")
        if self.visual_tokens_per_micro_batch < 0:
            raise ConfigError(f"config key 'plan.visual_tokens_per_micro_batch' = "
                              f"{self.visual_tokens_per_micro_batch} must be >= 0")


@dataclass
class CheckpointConfig:
    every_steps: int = 0                # 0 = only at the end
    keep_last: int = 2                  # the newest N complete checkpoints are kept; 0 keeps every one
    resume: str = "auto"                # auto | none | PATH
    export_hf: bool = False             # export the final checkpoint to <run.output_dir>/hf
    async_save: bool = False            # DCP write in the background (finished at the next save / the end)

    def validate(self) -> None:
        """This section's own rules (whether ``resume`` names an existing checkpoint is checked by ``config.load``)."""
        if self.keep_last < 0:   # 0 = keep every checkpoint (CheckpointManager)
            raise ConfigError(f"config key 'checkpoint.keep_last' = {self.keep_last} must be >= 0 (0 keeps every "
                              "checkpoint)")
        if self.every_steps < 0:
            raise ConfigError(f"config key 'checkpoint.every_steps' = {self.every_steps} must be >= 0")


@dataclass
class EvalConfig:
    """Evaluation during training (``rynnscale.train.evaluate``): eval loss on held-out shards and a
    grounding metric on greedy generations of tagged answers."""
    shards: list[str] = field(default_factory=list)   # held-out shard patterns; [] = a synthetic eval set
    every_steps: int = 0                # 0 = off
    max_batches: int = 0                # packed micro-batches per rank per evaluation; 0 = the whole held-out set
    grounding_samples: int = 8          # samples greedily generated for the grounding metric; 0 = none
    max_new_tokens: int = 96            # generation length cap for the grounding metric
    synthetic_samples: int = 64         # size of the synthetic eval set (other seed) when eval.shards is empty

    def validate(self) -> None:
        """This section's own ranges (that an enabled evaluation has held-out data is checked by ``config.load``)."""
        for key in ("every_steps", "max_batches", "grounding_samples", "synthetic_samples"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'eval.{key}' = {getattr(self, key)} must be >= 0")
        if self.max_new_tokens < 1:
            raise ConfigError(f"config key 'eval.max_new_tokens' = {self.max_new_tokens} must be >= 1")
        if any(not str(p) for p in self.shards):
            raise ConfigError(f"config key 'eval.shards' = {list(self.shards)} has an empty pattern")


@dataclass
class WandbConfig:
    mode: str = "offline"               # offline | online | disabled
    project: str | None = None
    entity: str | None = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True               # console progress with ETA: a bar on a terminal, else a plain line ...
    progress_every: int = 10            # ... every this many steps (output redirected to a file)
    plot: bool = True                   # PNG of loss / lr / throughput at the end
    sample_log: bool = False            # OUTPUT_DIR/samples.jsonl: the "<shard>:<key>" list of every step's global batch
    peak_tflops: float = 0.0            # per-device dense bf16 TFLOP/s for mfu; 0 = the detected GPU's spec (none on CPU)


@dataclass
class RewardConfig:
    """GRPO rewards (``rynnscale.train.rewards``): weights of the built-in components (point, box, traj, format,
    exact) and of user functions (``module:function`` -> weight), and the distance scales of the [0, 1] mapping."""
    weights: dict[str, float] = field(default_factory=lambda: {"point": 1.0, "box": 1.0, "traj": 1.0,
                                                               "format": 0.2, "exact": 0.0})
    point_scale: float = 100.0          # 0-1000 units at which a point scores 1/e
    traj_scale: float = 100.0           # discrete Frechet distance (0-1000 units) at which a trajectory scores 1/e
    functions: dict[str, float] = field(default_factory=dict)


def load_reward_function(path: str) -> Callable[..., float]:
    """``module:function`` -> the callable; ValueError naming the path when it cannot be imported. Here (not in
    ``rynnscale.train.rewards``, which uses it) so that recipe validation imports a GRPO run's functions up front."""
    mod_name, sep, fn_name = path.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"reward function {path!r}: expected 'module:function' (e.g. 'my_rewards:in_gripper')")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module's
        raise ValueError(f"reward function {path!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e})") from e
    fn = mod
    for part in fn_name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"reward function {path!r}: module {mod_name!r} has no {fn_name!r}")
    if not callable(fn):
        raise ValueError(f"reward function {path!r} is not callable")
    return fn


def function_component(path: str) -> str:
    """A user function's component name: the function's own name (``pkg.mod:fn`` -> ``fn``)."""
    return path.rpartition(":")[2].rpartition(".")[2]


# the built-in GRPO reward components (rynnscale.train.rewards scores them)
BUILTIN_REWARDS = ("point", "box", "traj", "format", "exact")


@dataclass
class RLConfig:
    """GRPO (``train.objective: grpo``; ``rynnscale.train.grpo``): prompts, sampling, the loss."""
    prompts: list[str] = field(default_factory=list)   # prompt shard patterns; [] = the run's training data
    prompts_per_step: int = 8           # prompts per rollout step over all data-parallel ranks (a multiple of them)
    group_size: int = 5                 # sampled answers per prompt (RynnBrain's GRPO: 5)
    max_new_tokens: int = 128
    temperature: float = 1.0            # sampling temperature; the policy's log-probs use it too
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    kl_coef: float = 0.02               # beta of the k3 KL to the reference policy (RynnBrain: 0.02); 0 = no reference
    clip_low: float = 0.2               # importance ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    loss_averaging: str = "token"       # token | sequence
    scale_rewards: bool = True          # advantages divided by the group's reward std
    policy_steps: int = 1               # optimiser steps per rollout batch (its samples split into this many parts)
    epochs: int = 1                     # passes over each rollout batch
    reward: RewardConfig = field(default_factory=RewardConfig)

    def validate(self) -> None:
        for key in ("prompts_per_step", "group_size", "max_new_tokens", "policy_steps", "epochs"):
            _at_least_one(f"rl.{key}", getattr(self, key))
        if any(not str(p) for p in self.prompts):
            raise ConfigError(f"config key 'rl.prompts' = {list(self.prompts)} has an empty pattern")
        if self.group_size < 2:
            raise ConfigError(f"config key 'rl.group_size' = {self.group_size} must be >= 2 (advantages compare "
                              "the answers of one prompt)")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"config key 'rl.temperature' = {self.temperature} must be > 0 (GRPO samples)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"config key 'rl.top_p' = {self.top_p} must be in (0, 1]")
        if not 0 <= self.clip_low < 1 or self.clip_high < 0:
            raise ConfigError(f"config keys 'rl.clip_low' = {self.clip_low} must be in [0, 1) and 'rl.clip_high' = "
                              f"{self.clip_high} >= 0")
        r = self.reward
        for name, w in {**r.weights, **r.functions}.items():
            if not (math.isfinite(w) and w >= 0):
                raise ConfigError(f"config key 'rl.reward' weight of {name!r} = {w} must be a finite number >= 0")
        unknown = sorted(set(r.weights) - set(BUILTIN_REWARDS))
        if unknown:
            raise ConfigError(f"config key 'rl.reward.weights' has unknown component(s) {unknown}; allowed: point, box, "
                              "traj, format, exact (a user function goes under 'rl.reward.functions' as "
                              "'module:function': weight)")
        for path in r.functions:
            if path.count(":") != 1 or not all(path.split(":")):
                raise ConfigError(f"config key 'rl.reward.functions' entry {path!r} must be 'module:function'")
        if not (r.point_scale > 0 and r.traj_scale > 0):
            raise ConfigError("config keys 'rl.reward.point_scale' and 'rl.reward.traj_scale' must be > 0")
        names = [function_component(p) for p in r.functions]
        clash = sorted({n for n in names if names.count(n) > 1 or n in BUILTIN_REWARDS})
        if clash:
            raise ConfigError(f"config key 'rl.reward.functions' = {list(r.functions)}: component name(s) {clash} "
                              "clash (a function's name must differ from the built-ins and from the others)")

    def validate_rewards(self) -> None:
        """What a GRPO run's reward needs (``rynnscale.train.rewards.GroundingReward``), checked when the recipe
        loads, so that a chain's GRPO stage fails before its earlier stages train: some weight > 0, and every
        ``rl.reward.functions`` entry imports (the user's module is imported now) and is callable."""
        r = self.reward
        if not any(w > 0 for w in (*r.weights.values(), *r.functions.values())):
            raise ConfigError(f"config key 'rl.reward': every reward weight is 0 (weights {dict(r.weights)}, "
                              f"functions {dict(r.functions)}): GRPO would have nothing to learn from")
        for path in r.functions:
            try:
                load_reward_function(path)
            except ValueError as e:
                raise ConfigError(f"config key 'rl.reward.functions': {e}") from None


@dataclass
class StageConfig:
    """One stage of a staged recipe (``stages``): ``overrides`` is a recipe fragment (sections -> keys) laid over
    the recipe for this stage; the stage runs in ``<run.output_dir>/<name>`` and, after the first, starts from
    the previous stage's exported final checkpoint (``rynnscale.train.stages``)."""
    name: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RootConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    stages: list[StageConfig] = field(default_factory=list)   # [] = one run; else a chain (e.g. sft then grpo)


# Allowed values of string-enum keys (checked in load.validate with a message listing them).
CHOICES: dict[str, tuple[str, ...]] = {
    "run.device": ("auto", "cpu", "cuda"),
    "model.activation_checkpointing": ("none", "full", "every_k", "selective"),
    "model.attn_backend": ("auto", "varlen", "sdpa_mask", "loop"),
    "model.kernels": ("auto", "torch", "liger"),
    "model.cp_attention": ("auto", "ulysses", "ring"),
    "train.dtype": ("auto", "float32", "bfloat16"),
    "train.objective": ("sft", "grpo"),
    "rl.loss_averaging": ("token", "sequence"),
    "optim.schedule": ("cosine", "constant", "linear"),
    "data.balance": ("cost", "tokens", "none"),
    "logging.wandb.mode": ("offline", "online", "disabled"),
}


def check_mixture_sources(sources, key: str = "data.mixture") -> None:
    """The rules of a weighted data mixture, one place for recipe validation and the loader: every
    source has a non-empty unique ``name``, a non-empty list of ``shards`` and a finite ``weight`` > 0.
    ``sources``: objects with those attributes; ``key`` names them in the error (``ConfigError``)."""
    names: set[str] = set()
    for i, src in enumerate(sources):
        k = f"{key}[{i}]"
        name, shards, weight = getattr(src, "name", None), getattr(src, "shards", None), getattr(src, "weight", None)
        if not isinstance(name, str) or not name or name in names:
            raise ConfigError(f"config key '{k}.name' = {name!r} must be a non-empty name unique in the mixture")
        names.add(name)
        if not shards or isinstance(shards, str) or any(not str(p) for p in shards):
            raise ConfigError(f"config key '{k}.shards' = {shards!r} of source {name!r}: give a non-empty list of "
                              "shard paths, globs or brace patterns (none of them empty)")
        if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and 0 < weight < float("inf")):
            raise ConfigError(f"config key '{k}.weight' = {weight!r} of source {name!r} must be a finite number > 0")
    total = sum(float(src.weight) for src in sources)
    if total == float("inf"):   # every draw would go to the last source
        raise ConfigError(f"config key '{key}': the weights sum to {total} (too large to draw from); only their "
                          "ratios matter, so scale them down")
