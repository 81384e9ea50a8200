"""Typed config schema of a training run.

Every recipe is validated against these dataclasses (through omegaconf structured configs), so an
unknown key, a wrong type or a value outside its allowed set fails before any work starts, with a
message naming the key. Keys listed in the issue as a contract (``run.output_dir``, ``train.max_steps``,
``parallel.ep``, ...) keep their names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key."""


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
    # Published architecture (rynnscale.models.qwen3_vl.presets) used where init_from's config.json is
    # not on this machine (planning on a laptop); when both exist they must describe the same model.
    preset: str | None = None
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns over HF parameter names
    lora: LoRAConfig = field(default_factory=LoRAConfig)


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


@dataclass
class TrainConfig:
    max_steps: int = 100
    micro_batch_tokens: int = 4096      # token budget of one packed micro-batch (per rank)
    grad_accum: int = 1
    max_grad_norm: float = 1.0          # <= 0 disables clipping
    loss_chunk_tokens: int = 2048       # tokens per chunk of the fused linear + cross-entropy
    log_every: int = 1
    dtype: str = "auto"                 # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16
    max_nonfinite_steps: int = 5        # inf/NaN loss or grad norm: step skipped, no save; abort after this many in a row


@dataclass
class OptimGroupConfig:
    """Parameters whose HF name matches ``pattern`` (fnmatch) train with lr * lr_scale."""
    pattern: str = ""
    lr_scale: float = 1.0
    weight_decay: float | None = None   # None = optim.weight_decay


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1           # cosine floor as a fraction of lr
    warmup_steps: int = 0
    schedule: str = "cosine"            # cosine | constant | linear
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_ratio: float = 0.0           # > 0: warmup over this fraction of train.max_steps (overrides warmup_steps)
    groups: list[OptimGroupConfig] = field(default_factory=list)  # per-module lr / weight decay, first match wins


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1                  # -1 = all remaining ranks
    ep: int = 1                         # expert parallel degree, carved out of dp_shard x cp (must divide it)
    cp: int = 1                         # context parallel degree: ranks splitting one sequence (same samples)
    timeout_s: float = 600.0            # timeout of every collective: a dead / diverged rank fails the job


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


@dataclass
class CheckpointConfig:
    every_steps: int = 0                # 0 = only at the end
    keep_last: int = 2
    resume: str = "auto"                # auto | none | PATH
    export_hf: bool = False             # export the final checkpoint to <run.output_dir>/hf
    async_save: bool = False            # DCP write in the background (finished at the next save / the end)


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


# Allowed values of string-enum keys (checked in load.validate with a message listing them).
CHOICES: dict[str, tuple[str, ...]] = {
    "run.device": ("auto", "cpu", "cuda"),
    "model.activation_checkpointing": ("none", "full", "every_k", "selective"),
    "model.attn_backend": ("auto", "varlen", "sdpa_mask", "loop"),
    "model.kernels": ("auto", "torch", "liger"),
    "model.cp_attention": ("auto", "ulysses", "ring"),
    "train.dtype": ("auto", "float32", "bfloat16"),
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
        if not shards or isinstance(shards, str):
            raise ConfigError(f"config key '{k}.shards' = {shards!r} of source {name!r}: give a non-empty list of "
                              "shard paths, globs or brace patterns")
        if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and 0 < weight < float("inf")):
            raise ConfigError(f"config key '{k}.weight' = {weight!r} of source {name!r} must be a finite number > 0")
