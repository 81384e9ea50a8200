"""Wire a recipe's ``data`` section into a ``TrainLoader``: shards (or the built-in synthetic set),
tokenizer, sample encoder and packing budget."""

from __future__ import annotations

import logging
from pathlib import Path

from rynnscale.config.schema import RootConfig
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs

log = logging.getLogger("rynnscale")


def synthetic_data_dir(cfg: RootConfig) -> Path:
    return Path(cfg.data.synthetic.output_dir or Path(cfg.run.output_dir) / "synthetic_data")


def synthetic_shard_patterns(cfg: RootConfig) -> list[str]:
    """Glob of the synthetic shards (without generating them); [] when synthetic data is off."""
    return [str(synthetic_data_dir(cfg) / "*.tar")] if cfg.data.synthetic.num_samples > 0 else []


def ensure_synthetic_data(cfg: RootConfig) -> list[str]:
    """Generate the built-in synthetic egocentric shards once (restartable); return their glob pattern.

    Writes files: under torch.distributed call it on ONE rank per file system, then barrier
    (``rynnscale.train.trainer.prepare_data_files``), and build the loaders with ``generate=False``."""
    s = cfg.data.synthetic
    if s.num_samples <= 0:
        return []
    from rynnscale.data_pipelines.synthetic import generate_synthetic

    out = synthetic_data_dir(cfg)
    generate_synthetic(out, s.num_samples, seed=s.seed, frames=s.frames, width=s.width, height=s.height, fps=s.fps,
                       samples_per_shard=s.samples_per_shard, progress=cfg.logging.progress)
    return [str(out / "*.tar")]


def tokenizer_source(cfg: RootConfig) -> str | None:
    """``data.tokenizer``, else the init checkpoint's tokenizer, else the bundled Qwen3 tokenizer (None)."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if cfg.model.init_from and (Path(cfg.model.init_from) / "tokenizer.json").is_file():
        return cfg.model.init_from
    return None


def build_encoder(cfg: RootConfig, args: Qwen3VLArgs):
    from rynnscale.data.encode import EncoderConfig, SampleEncoder
    from rynnscale.data.tokenizer import load_tokenizer

    d = cfg.data
    enc_cfg = EncoderConfig(
        image_min_pixels=d.image_min_pixels, image_max_pixels=d.image_max_pixels,
        video_min_pixels=d.video_min_pixels, video_max_pixels=d.video_max_pixels,
        fps=d.video_fps, min_frames=d.video_min_frames, max_frames=d.video_max_frames,
        patch_size=args.vision.patch_size, temporal_patch_size=args.vision.temporal_patch_size,
        merge_size=args.vision.spatial_merge_size, max_tokens=cfg.train.micro_batch_tokens, truncate=d.truncate)
    return SampleEncoder(load_tokenizer(tokenizer_source(cfg)), enc_cfg, token_ids=args)


def build_train_data(cfg: RootConfig, args: Qwen3VLArgs, *, rank: int, world_size: int, generate: bool = True):
    """The rank's ``TrainLoader`` (an endless iterable of PackedBatch with state_dict / bad_counts).

    ``generate=False``: the synthetic shards were already generated (by one rank); only read them."""
    from rynnscale.data.balance import CostModel
    from rynnscale.data.loader import LoaderConfig, TrainLoader

    synthetic = ensure_synthetic_data(cfg) if generate else synthetic_shard_patterns(cfg)
    shards = list(cfg.data.train_shards) + synthetic
    loader_cfg = LoaderConfig.from_run_config(cfg, train_shards=shards, cost_model=CostModel.from_args(args))
    log.info("data: %s, %d tokens per micro-batch, %d micro-batches per step",  # mixture: from data.mixture
             shards or [f"{m.name} (weight {m.weight:g}): {m.shards}" for m in loader_cfg.mixture],
             cfg.train.micro_batch_tokens, cfg.train.grad_accum)
    return TrainLoader(loader_cfg, build_encoder(cfg, args), rank=rank, world_size=world_size)
