"""Files a run generates before training: the built-in synthetic egocentric set and its held-out twin.

Generation writes shards, so under torch.distributed it runs on as few ranks as possible: global rank
0 first (on a shared file system every node then sees the files), then local rank 0 of every node
whose file system still lacks the finished manifest; all other ranks wait at barriers
(``once_per_filesystem``). The loaders only ever read (``rynnscale.data.pipeline``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rynnscale.config.schema import ConfigError, RootConfig
from rynnscale.data.manifest import MANIFEST_NAME
from rynnscale.data.pipeline import synthetic_data_dir
from rynnscale.train.metrics import progress_bars

#: seed offset of the synthetic eval set (its samples differ from the training set's)
EVAL_SEED_OFFSET = 1_000_003


def eval_data_dir(cfg: RootConfig) -> Path:
    """Where the synthetic eval set lives: ``synthetic_eval`` beside the training synthetic set."""
    return synthetic_data_dir(cfg).parent / "synthetic_eval"


def synthetic_eval_enabled(cfg: RootConfig) -> bool:
    """The synthetic eval set is the held-out data (no ``eval.shards`` given)."""
    return not cfg.eval.shards and cfg.data.synthetic.num_samples > 0 and cfg.eval.synthetic_samples > 0


def once_per_filesystem(ctx: Any, out_dir: Path, generate: Callable[[], Any]) -> None:
    """Run ``generate`` (which writes ``out_dir`` with a manifest) on global rank 0, then on local rank 0
    of any node that does not see ``out_dir/manifest.json`` yet; every rank returns after the files exist.
    ``ctx``: anything with ``rank``, ``local_rank`` and ``barrier()`` (a ``DistContext``)."""
    if ctx.rank == 0:
        generate()
    ctx.barrier()
    if ctx.rank != 0 and ctx.local_rank == 0 and not (Path(out_dir) / MANIFEST_NAME).exists():
        generate()
    ctx.barrier()


def synthetic_content(cfg: RootConfig) -> dict[str, Any]:
    """``data.synthetic.questions`` and ``objects`` checked by the generator (a ConfigError naming the key)."""
    from rynnscale.data_pipelines.synthetic import check_object_counts, check_question_types

    s = cfg.data.synthetic
    out = {}
    for key, check in (("questions", check_question_types), ("objects", check_object_counts)):
        try:
            out[key] = check(getattr(s, key))
        except ValueError as e:
            raise ConfigError(f"config key 'data.synthetic.{key}': {e}") from None
    return out


def _generate(out: Path, num_samples: int, **kw: Any) -> None:
    """``generate_synthetic``; what it refuses (``out`` holds a set generated with other settings: a recipe's
    ``data.synthetic`` changed on an existing run directory) is a setting to fix, a ConfigError (one line, exit 2)
    instead of a traceback."""
    from rynnscale.data_pipelines.synthetic import generate_synthetic

    try:
        generate_synthetic(out, num_samples, **kw)
    except ValueError as e:
        raise ConfigError(f"data.synthetic: {e} (set data.synthetic.output_dir, or the data.synthetic keys back)"
                          ) from None


def generate_train_synthetic(cfg: RootConfig) -> None:
    """Write the training synthetic set (restartable: finished shards are kept)."""
    s = cfg.data.synthetic
    _generate(synthetic_data_dir(cfg), s.num_samples, seed=s.seed, frames=s.frames, width=s.width,
              height=s.height, fps=s.fps, samples_per_shard=s.samples_per_shard,
              progress=progress_bars(cfg), **synthetic_content(cfg))


def generate_eval_synthetic(cfg: RootConfig) -> None:
    """Write the held-out synthetic set (seed = ``data.synthetic.seed + EVAL_SEED_OFFSET``)."""
    s = cfg.data.synthetic
    _generate(eval_data_dir(cfg), cfg.eval.synthetic_samples, seed=s.seed + EVAL_SEED_OFFSET,
              frames=s.frames, width=s.width, height=s.height, fps=s.fps,
              samples_per_shard=s.samples_per_shard, prefix="synthetic_eval",
              progress=False, **synthetic_content(cfg))


def prepare_data_files(cfg: RootConfig, ctx: Any) -> None:
    """Generate the synthetic training set where the recipe uses it, once per file system."""
    if cfg.data.synthetic.num_samples > 0:
        once_per_filesystem(ctx, synthetic_data_dir(cfg), lambda: generate_train_synthetic(cfg))


def prepare_eval_files(cfg: RootConfig, ctx: Any) -> None:
    """Generate the synthetic held-out set where it is the eval data, once per file system."""
    if synthetic_eval_enabled(cfg):
        once_per_filesystem(ctx, eval_data_dir(cfg), lambda: generate_eval_synthetic(cfg))
