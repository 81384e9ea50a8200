"""Wire a recipe's ``data`` section into a ``TrainLoader``: shards (or the built-in synthetic set, which
``rynnscale.train.data_files`` generates), tokenizer, sample encoder and packing budget."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rynnscale.config.schema import ConfigError, RootConfig
from rynnscale.models import family_of

log = logging.getLogger(__name__)


def synthetic_data_dir(cfg: RootConfig) -> Path:
    return Path(cfg.data.synthetic.output_dir or Path(cfg.run.output_dir) / "synthetic_data")


def synthetic_shard_patterns(cfg: RootConfig) -> list[str]:
    """Glob of the synthetic shards (without generating them); [] when synthetic data is off."""
    return [str(synthetic_data_dir(cfg) / "*.tar")] if cfg.data.synthetic.num_samples > 0 else []


def tokenizer_source(cfg: RootConfig) -> str | None:
    """``data.tokenizer``, else the init checkpoint's tokenizer, else the bundled Qwen3 tokenizer (None)."""
    from rynnscale.data.tokenizer import run_tokenizer

    return run_tokenizer(cfg.data.tokenizer, cfg.model.init_from)


def build_encoder(cfg: RootConfig, args: Any):
    """The sample encoder for the model ``args`` describe: its family's ``DataContract`` (vision token ids,
    patching, position ids) with the recipe's ``data`` settings and token budget."""
    from rynnscale.data.encode import EncoderConfig, SampleEncoder
    from rynnscale.data.tokenizer import load_tokenizer
    from rynnscale.data.vision_preprocess import VisionSpec

    d = cfg.data
    contract = family_of(args).data(args)
    geometry = {} if contract.vision is None else dict(
        patch_size=contract.vision.patch_size, temporal_patch_size=contract.vision.temporal_patch_size,
        merge_size=contract.vision.merge_size)
    vision = VisionSpec(image_min_pixels=d.image_min_pixels, image_max_pixels=d.image_max_pixels,
                        video_min_pixels=d.video_min_pixels, video_max_pixels=d.video_max_pixels, **geometry)
    enc_cfg = EncoderConfig(
        vision=vision, fps=d.video_fps, min_frames=d.video_min_frames, max_frames=d.video_max_frames,
        max_tokens=cfg.train.micro_batch_tokens, truncate=d.truncate,
        max_frame_pixels=d.max_image_pixels, max_media_bytes=d.max_member_bytes)
    return SampleEncoder(load_tokenizer(tokenizer_source(cfg)), enc_cfg, token_ids=contract)


def build_train_data(cfg: RootConfig, args: Any, *, rank: int, world_size: int, ranks: Any = None):
    """The rank's ``TrainLoader`` (an endless iterable of ``DataStep``s of the global sample order).

    Only reads: a synthetic set must already exist (``rynnscale.train.data_files.prepare_data_files``).
    ``rank`` / ``world_size`` are the DATA-parallel rank and size (EP ranks hold different data, so today
    the whole world; ranks of one context-parallel group would pass the same data rank); ``ranks`` (the
    trainer's ``DistContext``) counts the samples found bad decoding over all of them (``TrainLoader``)."""
    from rynnscale.data.balance import CostModel
    from rynnscale.data.loader import LoaderConfig, TrainLoader

    shards = list(cfg.data.train_shards) + synthetic_shard_patterns(cfg)
    # training reads the global sample order: a step's samples do not depend on the layout, so a resume on
    # another world size / ep / grad_accum continues exactly (evaluation reads per-rank splits: SplitLoader)
    loader_cfg = LoaderConfig.from_run_config(cfg, train_shards=shards, cost_model=CostModel.from_args(args))
    log.info("data: %s, %d tokens per micro-batch, %d micro-batches per step",  # mixture: from data.mixture
             shards or [f"{m.name} (weight {m.weight:g}): {m.shards}" for m in loader_cfg.mixture],
             cfg.train.micro_batch_tokens, cfg.train.grad_accum)
    loader = TrainLoader(loader_cfg, build_encoder(cfg, args), rank=rank, world_size=world_size,
                         ranks=ranks if world_size > 1 else None)
    check_budget(cfg, loader, rank)
    return loader


def check_budget(cfg: RootConfig, loader, rank: int = 0) -> None:
    """Before training: do the samples fit ``train.micro_batch_tokens``? By the shards' cost hints, confirmed
    with the run's encoder on the shortest sample that does not fit (hints may come from other settings).
    More too-long samples than ``data.max_bad_fraction`` -> ConfigError naming the value that fits; fewer -> a
    warning with the count (rank 0). Nothing to say without hints, or with ``data.truncate`` (cut, not skipped)."""
    fit = loader.budget_fit()
    if fit.hinted == 0 or fit.fitting == fit.hinted or cfg.data.truncate:
        return
    budget, long_ = fit.budget, fit.hinted - fit.fitting
    value = -(-fit.largest // 512) * 512
    counts = (f"{fit.fitting} of {fit.hinted} samples ({100 * fit.fitting / fit.hinted:.1f}%) fit "
              f"train.micro_batch_tokens={budget} by the shards' cost hints (the longest has {fit.largest} tokens)")
    if fit.too_long_share <= cfg.data.max_bad_fraction:
        if rank == 0:
            log.warning("data: %s; the other %d will be skipped as too_long (train.micro_batch_tokens=%d fits them "
                        "all)", counts, long_, value)
        return
    if fit.probe is not None and loader.sample_fits(*fit.probe) is not True:
        raise ConfigError(
            f"{counts}: the other {long_} would be skipped as too_long, more than data.max_bad_fraction="
            f"{cfg.data.max_bad_fraction:g} allows. Set train.micro_batch_tokens={value} (>= {fit.largest} fits every "
            "sample), or data.truncate=true to cut long samples")
    if rank == 0:
        log.warning("data: by the shards' cost hints %s, but this run's encoder fits %s:%d (hints from other "
                    "settings?); the budget is not checked up front", counts, *fit.probe)
