"""Typed config schema of a training run.

Every recipe is validated against these dataclasses (through omegaconf structured configs), so an
unknown key, a wrong type or a value outside its allowed set fails before any work starts, with a
message naming the key. Keys listed in the issue as a contract (``run.output_dir``, ``train.max_steps``,
``parallel.ep``, ...) keep their names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunConfig:
    output_dir: str = "runs/default"   # metrics.jsonl, resolved config, checkpoints live here
    seed: int = 0
    name: str = ""                      # free-form run name (wandb, plots)
    device: str = "auto"                # auto | cpu | cuda


@dataclass
class ModelConfig:
    init_from: str | None = None     # local Hugging Face Qwen3-VL(-MoE) directory
    arch: dict[str, Any] | None = None   # inline architecture in config.json form (text_config/vision_config)
    activation_checkpointing: str = "none"  # none | full | every_k
    activation_checkpointing_every: int = 2  # k for every_k
    attn_backend: str = "auto"          # auto | varlen | sdpa_mask | loop


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
class DataConfig:
    train_shards: list[str] = field(default_factory=list)   # paths, globs or brace patterns
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    tokenizer: str | None = None     # tokenizer directory; default: init_from, else the bundled Qwen3 one
    seed: int = 0
    shuffle_buffer: int = 256
    pack_window: int = 64
    num_workers: int = 0
    max_bad_fraction: float = 0.05
    truncate: bool = False              # truncate over-long samples instead of skipping them
    video_fps: float = 2.0
    video_max_frames: int = 768
    video_min_frames: int = 4
    image_min_pixels: int = 65536
    image_max_pixels: int = 16777216
    video_min_pixels: int = 4096
    video_max_pixels: int = 25165824


@dataclass
class TrainConfig:
    max_steps: int = 100
    micro_batch_tokens: int = 4096      # token budget of one packed micro-batch (per rank)
    grad_accum: int = 1
    max_grad_norm: float = 1.0          # <= 0 disables clipping
    loss_chunk_tokens: int = 2048       # tokens per chunk of the fused linear + cross-entropy
    log_every: int = 1
    dtype: str = "auto"                 # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16


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


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1                  # -1 = all remaining ranks
    ep: int = 1


@dataclass
class CheckpointConfig:
    every_steps: int = 0                # 0 = only at the end
    keep_last: int = 2
    resume: str = "auto"                # auto | none | PATH
    export_hf: bool = False


@dataclass
class WandbConfig:
    mode: str = "offline"               # offline | online | disabled
    project: str | None = None
    entity: str | None = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True               # console progress bar with ETA
    plot: bool = True                   # PNG of loss / lr / throughput at the end


@dataclass
class RootConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Allowed values of string-enum keys (checked in load.validate with a message listing them).
CHOICES: dict[str, tuple[str, ...]] = {
    "run.device": ("auto", "cpu", "cuda"),
    "model.activation_checkpointing": ("none", "full", "every_k"),
    "model.attn_backend": ("auto", "varlen", "sdpa_mask", "loop"),
    "train.dtype": ("auto", "float32", "bfloat16"),
    "optim.schedule": ("cosine", "constant", "linear"),
    "logging.wandb.mode": ("offline", "online", "disabled"),
}
