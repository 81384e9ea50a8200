"""Wire a recipe's ``data`` section into a ``TrainLoader``: shards (or the built-in synthetic set, which
``rynnscale.train.data_files`` generates), tokenizer, sample encoder and packing budget."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rynnscale.config.schema import RootConfig
from rynnscale.models import family_of

log = logging.getLogger(__name__)


def synthetic_data_dir(cfg: RootConfig) -> Path:
    return Path(cfg.data.synthetic.output_dir or Path(cfg.run.output_dir) / "synthetic_data")


def synthetic_shard_patterns(cfg: RootConfig) -> list[str]:
    """Glob of the synthetic shards (without generating them); [] when synthetic data is off."""
    return [str(synthetic_data_dir(cfg) / "*.tar")] if cfg.data.synthetic.num_samples > 0 else []


def tokenizer_source(cfg: RootConfig) -> str | None:
    """``data.tokenizer``, else the init checkpoint's tokenizer, else the bundled Qwen3 tokenizer (None)."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if cfg.model.init_from and (Path(cfg.model.init_from) / "tokenizer.json").is_file():
        return cfg.model.init_from
    return None


def build_encoder(cfg: RootConfig, args: Any):
    """The sample encoder for the model ``args`` describe: its family's ``DataContract`` (vision token ids,
    patching, position ids) with the recipe's ``data`` settings and token budget."""
    from rynnscale.data.encode import EncoderConfig, SampleEncoder
    from rynnscale.data.tokenizer import load_tokenizer

    d = cfg.data
    contract = family_of(args).data(args)
    geometry = {} if contract.vision is None else dict(
        patch_size=contract.vision.patch_size, temporal_patch_size=contract.vision.temporal_patch_size,
        merge_size=contract.vision.merge_size)
    enc_cfg = EncoderConfig(
        image_min_pixels=d.image_min_pixels, image_max_pixels=d.image_max_pixels,
        video_min_pixels=d.video_min_pixels, video_max_pixels=d.video_max_pixels,
        fps=d.video_fps, min_frames=d.video_min_frames, max_frames=d.video_max_frames,
        max_tokens=cfg.train.micro_batch_tokens, truncate=d.truncate,
        max_frame_pixels=d.max_image_pixels, max_media_bytes=d.max_member_bytes, **geometry)
    return SampleEncoder(load_tokenizer(tokenizer_source(cfg)), enc_cfg, token_ids=contract)


def build_train_data(cfg: RootConfig, args: Any, *, rank: int, world_size: int):
    """The rank's ``TrainLoader`` (an endless iterable of PackedBatch with state_dict / bad_counts).

    Only reads: a synthetic set must already exist (``rynnscale.train.data_files.prepare_data_files``).
    ``rank`` / ``world_size`` are the DATA-parallel rank and size (EP ranks hold different data, so today
    the whole world; ranks of one context-parallel group would pass the same data rank)."""
    from rynnscale.data.balance import CostModel
    from rynnscale.data.loader import LoaderConfig, TrainLoader

    shards = list(cfg.data.train_shards) + synthetic_shard_patterns(cfg)
    # training reads the global sample order: a step's samples do not depend on the layout, so a resume on
    # another world size / ep / grad_accum continues exactly (evaluation keeps the per-rank split)
    loader_cfg = LoaderConfig.from_run_config(cfg, train_shards=shards, cost_model=CostModel.from_args(args),
                                              global_order=True)
    log.info("data: %s, %d tokens per micro-batch, %d micro-batches per step",  # mixture: from data.mixture
             shards or [f"{m.name} (weight {m.weight:g}): {m.shards}" for m in loader_cfg.mixture],
             cfg.train.micro_batch_tokens, cfg.train.grad_accum)
    return TrainLoader(loader_cfg, build_encoder(cfg, args), rank=rank, world_size=world_size)
