"""Evaluation on 2 data-parallel gloo ranks (FSDP2 + EP 2, the tiny demo MoE) equals one process: a held-out set
of 7 samples (one bad) in 4 shards of 2, 2, 2, 1 -- 4 micro-batches on rank 0, 2 on rank 1 -- gives the single-process
eval loss (rel 1e-5: only the reduction order differs), the same target tokens (every sample once: none dropped,
no padding repeat counted), one skipped sample, and the same grounding metrics over 5 prompts (3 on rank 0 in two
prefill rows of at most train.micro_batch_tokens, 2 in one on rank 1, which decodes a filler in lockstep). The held-out batches are streamed, the ranks agreeing on each forward."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from dist_helpers import run_ranks

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _cfg(out: Path, shards: str):
    from rynnscale.config import load_config

    return load_config(RECIPES / "demo_tiny.yaml", [
        f"run.output_dir={out}", "data.synthetic.num_samples=2", "eval.synthetic_samples=7", f"eval.shards=[{shards}]",
        "eval.grounding_samples=5", "eval.max_new_tokens=3", "train.micro_batch_tokens=100",
        "model.attn_backend=loop", "model.arch.text_config.num_hidden_layers=2"])


def _evaluate(rank: int, world: int, out: str, shards: str) -> dict:
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.parallel.mesh import ParallelLayout, build_meshes
    from rynnscale.train.build import build_model
    from rynnscale.train.evaluate import Evaluator

    cfg = _cfg(Path(out), shards)
    meshes = build_meshes(ParallelLayout.resolve(world, 1, world, 2, 8), "cpu") if world > 1 else None
    args, model = build_model(cfg.model, torch.device("cpu"), seed=0, meshes=meshes,
                              compute_dtype=torch.float32)
    ctx = DistContext(rank=rank, local_rank=rank, world_size=world, meshes=meshes) if world > 1 else None
    model.train()
    ev = Evaluator(cfg, args, rank, world)
    got = ev.evaluate(model, ctx)
    assert model.training
    return got


def _write_shards(cfg, where: Path) -> None:
    """The synthetic held-out set rewritten as shards of 2 samples, the third sample's conversation broken."""
    from rynnscale.data.reader import expand_shard_patterns, iter_tar_samples
    from rynnscale.train.data_files import generate_eval_synthetic
    from rynnscale.train.evaluate import eval_shard_patterns

    generate_eval_synthetic(cfg)
    rows = [(r.key, dict(r.members)) for p in expand_shard_patterns(eval_shard_patterns(cfg)) for r in iter_tar_samples(p)]
    assert len(rows) == 7
    rows[2][1]["conv.json"] = b"{not json"
    where.mkdir(parents=True)
    for i in range(0, len(rows), 2):
        with tarfile.open(where / f"eval-{i // 2:06d}.tar", "w") as tf:
            for key, members in rows[i:i + 2]:
                for name, data in sorted(members.items()):
                    ti = tarfile.TarInfo(f"{key}.{name}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))


@pytest.mark.slow
def test_two_ranks_evaluate_every_held_out_sample_once_like_one_process(tmp_path: Path) -> None:
    from rynnscale.config import load_config

    synth = load_config(RECIPES / "demo_tiny.yaml", [f"run.output_dir={tmp_path / 'synth'}",
                                                     "data.synthetic.num_samples=2", "eval.synthetic_samples=7"])
    _write_shards(synth, tmp_path / "heldout")
    shards = str(tmp_path / "heldout" / "*.tar")
    torch.set_num_threads(1)
    one = _evaluate(0, 1, str(tmp_path / "one"), shards)
    two = run_ranks(_evaluate, 2, tmp_path / "ranks", out=str(tmp_path / "two"), shards=shards)
    assert two[0] == two[1]                                       # every rank reports the totals
    got = two[0]
    assert got["eval_skipped"] == one["eval_skipped"] == 1
    assert got["eval_tokens"] == one["eval_tokens"] > 0
    assert got["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert got["grounding_samples"] == one["grounding_samples"] == 5
    assert {k: v for k, v in got.items() if k.startswith("grounding_")} == \
        pytest.approx({k: v for k, v in one.items() if k.startswith("grounding_")})
