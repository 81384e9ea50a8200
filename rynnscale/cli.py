"""The ``rynnscale`` command line: ``rynnscale <command> ...``.

Heavy modules (torch, transformers, av) are imported inside the command that needs them so that
``rynnscale --help`` and config errors answer instantly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NOT_BUILT_EXIT = 3


def _not_built(what: str, issue: int) -> int:
    print(f"rynnscale: '{what}' is not built yet (tracked in issue {issue}).", file=sys.stderr)
    return NOT_BUILT_EXIT


def _cmd_train(args: argparse.Namespace) -> int:
    from rynnscale.config import ConfigError, load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"rynnscale train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from rynnscale.config import to_yaml
        print(to_yaml(cfg))
        return 0
    from rynnscale.train.trainer import run_training

    run_training(cfg)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_cmd == "synth":
        from rynnscale.data_pipelines.synthetic import generate_synthetic

        manifest = generate_synthetic(
            args.out, args.num_samples, seed=args.seed, frames=args.frames, width=args.width,
            height=args.height, samples_per_shard=args.samples_per_shard, workers=args.workers)
        print(f"wrote {manifest}")
        return 0
    if args.data_cmd == "convert":
        return _not_built(f"data convert {args.source}", 3)
    if args.data_cmd == "inspect":
        return _not_built("data inspect", 3)
    return 2


def _cmd_ckpt(args: argparse.Namespace) -> int:
    return _not_built(f"ckpt {args.ckpt_cmd}", 5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rynnscale", description="Distributed training for embodied Qwen3-VL brain models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML recipe", description=(
        "Train from a YAML recipe. Overrides use dotlist syntax, e.g. train.max_steps=10 run.output_dir=runs/x. "
        "Under torchrun every rank runs this same command."))
    t.add_argument("recipe", type=Path, help="recipe YAML (may 'extends:' another)")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("data", help="prepare and inspect datasets")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("synth", help="generate the built-in synthetic egocentric dataset")
    s.add_argument("out", type=Path)
    s.add_argument("--num-samples", type=int, default=2000)
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--frames", type=int, default=4)
    s.add_argument("--width", type=int, default=64)
    s.add_argument("--height", type=int, default=64)
    s.add_argument("--samples-per-shard", type=int, default=250)
    s.add_argument("--workers", type=int, default=1)
    c = dsub.add_parser("convert", help="convert LeRobot / jsonl / frame folders to shards")
    c.add_argument("source", choices=["lerobot", "jsonl", "frames"])
    c.add_argument("rest", nargs=argparse.REMAINDER)
    i = dsub.add_parser("inspect", help="counts and histograms of a shard directory")
    i.add_argument("dir", type=Path)
    d.set_defaults(func=_cmd_data)

    k = sub.add_parser("ckpt", help="checkpoint tools (export to Hugging Face, inspect)")
    ksub = k.add_subparsers(dest="ckpt_cmd", required=True)
    e = ksub.add_parser("export-hf", help="export a checkpoint to a transformers directory")
    e.add_argument("ckpt", type=Path)
    e.add_argument("out", type=Path)
    ki = ksub.add_parser("inspect", help="print a checkpoint's step, tokens, config and tensors")
    ki.add_argument("ckpt", type=Path)
    k.set_defaults(func=_cmd_ckpt)

    b = sub.add_parser("bench", help="benchmarks (see bench/)")
    b.add_argument("name", nargs="?", default="")
    b.set_defaults(func=lambda a: _not_built("bench", 7))

    pl = sub.add_parser("plan", help="memory / communication planner for a recipe")
    pl.add_argument("recipe", type=Path)
    pl.set_defaults(func=lambda a: _not_built("plan", 6))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
