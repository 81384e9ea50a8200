"""The ``rynnscale`` command line: ``rynnscale <command> ...``.

Heavy modules (torch, transformers, av) are imported inside the command that needs them so that
``rynnscale --help`` and config errors answer instantly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    import logging

    from rynnscale.config import ConfigError, load_config, validate

    # before loading: the config's own notes (a command-line source replacing the recipe's) are start-up lines
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:   # --print-config shows a recipe whose weights / checkpoint are not on this machine too (then exit 2)
        cfg = load_config(args.recipe, args.overrides, check_paths=not args.print_config)
    except ConfigError as e:
        print(f"rynnscale train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from rynnscale.config import to_yaml
        print(to_yaml(cfg))
        try:
            validate(cfg, check_paths=True)   # what load_config checks beyond the printed config: the paths
        except ConfigError as e:
            print(f"rynnscale train: {e} (the config above is the recipe's; this machine cannot train it as it is)",
                  file=sys.stderr)
            return 2
        return 0
    from rynnscale.parallel.distributed import reported
    from rynnscale.train.trainer import run_training

    try:
        run_training(cfg)
    except Exception as e:  # the run logged it (once, with its rank): exit non-zero without a second copy
        if not reported(e):
            if not isinstance(e, ConfigError):
                raise
            # a setting found before the run's report (run.device=cuda without a GPU): the message says it all
            print(f"rynnscale train: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_cmd == "synth":
        from rynnscale.data_pipelines.synthetic import generate_synthetic

        try:   # bad arguments (the generator's own checks, config.schema.check_synthetic_size) or OUT unusable
            objects = None
            if args.objects:
                try:
                    objects = [int(n) for n in args.objects.split(",")]
                except ValueError:
                    raise ValueError(f"--objects {args.objects!r}: expected fewest,most (two integers, e.g. 2,4)") \
                        from None
            manifest = generate_synthetic(
                args.out, args.num_samples, seed=args.seed, frames=args.frames, width=args.width,
                height=args.height, samples_per_shard=args.samples_per_shard, workers=args.workers,
                **({"questions": args.questions.split(",")} if args.questions else {}),
                **({"objects": objects} if objects is not None else {}))
        except (ValueError, OSError) as e:
            print(f"rynnscale data synth: {e}", file=sys.stderr)
            return 2
        print(f"wrote {manifest}")
        return 0
    if args.data_cmd == "convert":
        return _cmd_data_convert(args)
    if args.data_cmd == "inspect":
        import json

        from rynnscale.data.manifest import ManifestError
        from rynnscale.data_pipelines.shard_stats import HintSourceError, format_report, inspect_shards

        if args.overrides and args.recipe is None:
            print(f"rynnscale data inspect: key=value overrides ({' '.join(args.overrides)}) are a recipe's: give "
                  "the recipe with --recipe RECIPE.yaml", file=sys.stderr)
            return 2
        if args.recipe is not None and args.no_estimate:
            print("rynnscale data inspect: --recipe sets how tokens are counted, --no-estimate counts none: give one",
                  file=sys.stderr)
            return 2
        try:
            recipe = None
            if args.recipe is not None:
                from rynnscale.data_pipelines.shard_stats import hint_recipe

                recipe = hint_recipe(args.recipe, args.overrides)
            rep = inspect_shards(args.dir, estimate=not args.no_estimate, tokenizer=args.tokenizer, recipe=recipe,
                                 max_samples=args.max_samples, verify_sha256=args.verify, bins=args.bins)
        except (ManifestError, FileNotFoundError, HintSourceError) as e:
            print(f"rynnscale data inspect: {e}", file=sys.stderr)
            return 2
        print(json.dumps(rep, indent=1) if args.json else format_report(rep))
        return 1 if rep["shard_problems"] or not rep["conversion_complete"] else 0
    return 2


def _cmd_data_convert(args: argparse.Namespace) -> int:
    """``rynnscale data convert {lerobot,jsonl,frames} ...``: runs one converter, prints its totals. Exit 2 for a
    bad path or option (as ``train``), 1 when the conversion itself fails."""
    import json
    import logging

    from rynnscale.data_pipelines.shards import ConvertError, ConvertUsageError
    from rynnscale.fsutil import DirectoryLockedError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    common = dict(workers=args.workers, progress=not args.no_progress, cost_hints=not args.no_cost_hints,
                  tokenizer=args.tokenizer)
    if args.prefix:
        common["prefix"] = args.prefix
    if args.overrides and args.recipe is None:
        print(f"rynnscale data convert {args.source}: key=value overrides ({' '.join(args.overrides)}) are a "
              "recipe's: give the recipe with --recipe RECIPE.yaml", file=sys.stderr)
        return 2
    try:
        if args.recipe is not None and not args.no_cost_hints:   # the hints are the encoder's of a run of it
            from rynnscale.data_pipelines.shard_stats import hint_recipe

            common["recipe"] = hint_recipe(args.recipe, args.overrides)
        if args.source == "lerobot":
            from rynnscale.data_pipelines.lerobot import convert_lerobot

            rep = convert_lerobot(
                args.src, args.out, episodes=args.episodes, episodes_per_shard=args.episodes_per_shard,
                clip_seconds=args.clip_seconds, stride_seconds=args.stride_seconds, fps=args.fps,
                video_key=args.video_key, video_path=args.video_path, data_path=args.data_path, media=args.media, codec=args.codec, max_side=args.max_side,
                tolerance_s=args.tolerance_s, skip_nonfinite=args.skip_nonfinite, action_key=args.action_key,
                state_key=None if args.state_key in ("", "none") else args.state_key, action_space=args.action_space,
                action_units=args.action_units, action_bins=args.action_bins, binning=args.binning,
                answer_dims=args.answer_dims.split(",") if args.answer_dims else None, answer_top_k=args.answer_top_k,
                question=args.question, source=args.source_name, licence=args.licence, **common)
        elif args.source == "jsonl":
            from rynnscale.data_pipelines.jsonl import convert_jsonl

            rep = convert_jsonl(args.src, args.out, media_root=args.media_root, source=args.source_name,
                                licence=args.licence or "unknown", frames_fps=args.frames_fps,
                                lines_per_shard=args.lines_per_shard, max_bad_fraction=args.max_bad_fraction, **common)
        else:
            from rynnscale.data_pipelines.frames import DEFAULT_ANSWER, DEFAULT_QUESTION, convert_frames

            rep = convert_frames(args.src, args.out, fps=args.fps, clip_frames=args.clip_frames, stride=args.stride,
                                 keep_tail=args.keep_tail, task=args.task, question=args.question or DEFAULT_QUESTION,
                                 answer=args.answer or DEFAULT_ANSWER, annotations=args.annotations,
                                 source=args.source_name, licence=args.licence, embodiment=args.embodiment,
                                 clips_per_shard=args.clips_per_shard, max_bad_fraction=args.max_bad_fraction, **common)
    except (ConvertUsageError, ValueError, FileNotFoundError) as e:   # ValueError: an option's value, other settings
        print(f"rynnscale data convert {args.source}: {e}", file=sys.stderr)   # than OUT's manifest records
        return 2
    except (ConvertError, ImportError, DirectoryLockedError, OSError) as e:   # OSError: disk full, permissions
        print(f"rynnscale data convert {args.source}: {e}", file=sys.stderr)
        return 1
    printed = {"out": str(args.out), "totals": rep["totals"], "bad": rep.get("bad", {})}
    if rep.get("bad_episodes"):
        printed["bad_episodes"] = rep["bad_episodes"]
    print(json.dumps(printed, indent=1))
    return 0


def _cmd_ckpt(args: argparse.Namespace) -> int:
    from rynnscale.checkpoint.dcp import CheckpointError
    from rynnscale.checkpoint.hf import HFCheckpointError

    try:
        if args.ckpt_cmd == "inspect":
            import json

            from rynnscale.checkpoint.inspection import format_inspection, inspect_checkpoint

            info = inspect_checkpoint(args.ckpt)
            print(json.dumps(info, indent=1) if args.json else format_inspection(info, args.max_tensors))
            return 0 if info["complete"] else 1
        if args.ckpt_cmd == "export-hf":
            import torch

            from rynnscale.checkpoint.export import export_checkpoint_adapter, export_checkpoint_hf, tokenizer_origin

            dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
            if args.adapter is not None:   # checked before writing: one output must not replace the other
                from rynnscale.checkpoint.adapter import check_exportable
                from rynnscale.checkpoint.dcp import TRAINER_STATE
                from rynnscale.checkpoint.export import checkpoint_lora_spec
                from rynnscale.checkpoint.hf import check_export_target

                a, o = args.adapter.resolve(), args.out.resolve()
                if a == o or o in a.parents or a in o.parents:
                    raise ValueError(f"--adapter {args.adapter} and OUT {args.out} overlap: the adapter and the merged "
                                     "model need separate directories")
                check_export_target(args.adapter, None, 1, args.overwrite)   # a non-empty one, before any writing
                if (args.ckpt / TRAINER_STATE).is_file():
                    spec = checkpoint_lora_spec(args.ckpt)
                    if spec is None:
                        raise ValueError(f"--adapter: {args.ckpt} is not a LoRA run's checkpoint (its config has "
                                         "model.lora.rank = 0), so there is no adapter to write; drop --adapter")
                    try:   # e.g. model.lora.trainable: the merged model alone carries what trained
                        check_exportable(spec)
                    except ValueError as e:
                        raise ValueError(f"--adapter: {e} (OUT, without --adapter)") from None
            report = export_checkpoint_hf(args.ckpt, args.out, copy_from=args.copy_from, dtype=dtype,
                                          max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
            print(f"wrote {report.out_dir}: {report.num_tensors} tensors, {report.total_bytes / 2**20:.1f} MiB "
                  f"({report.dtype}) in {len(report.files)} files, {report.seconds:.1f}s; tokenizer from "
                  f"{tokenizer_origin(report)}")
            if args.adapter is not None:
                out = export_checkpoint_adapter(args.ckpt, args.adapter, overwrite=args.overwrite,
                                                base_model_name_or_path=str(args.copy_from) if args.copy_from else None)
                print(f"wrote the LoRA adapter (PEFT format) to {out}")
            return 0
    except (CheckpointError, HFCheckpointError, OSError, ValueError) as e:   # OSError: disk full, permissions
        print(f"rynnscale ckpt {args.ckpt_cmd}: {e}", file=sys.stderr)
        return 2
    return 2


def _cmd_plan(args: argparse.Namespace) -> int:
    """``rynnscale plan``: exit 0 if the recipe fits the cluster, 1 if it does not, 2 on a bad recipe."""
    import json

    from rynnscale.config import ConfigError, load_config

    flags = {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "gpu_mem_gib": args.gpu_mem_gib,
             "peak_tflops": args.peak_tflops, "mfu": args.mfu, "nvlink_gbps": args.nvlink_gbps,
             "ib_gbps": args.ib_gbps}
    overrides = list(args.overrides) + [f"plan.{k}={v}" for k, v in flags.items() if v is not None]
    try:
        cfg = load_config(args.recipe, overrides, check_paths=False)
    except ConfigError as e:
        print(f"rynnscale plan: {e}", file=sys.stderr)
        return 2
    from rynnscale.plan import PlanError, format_plan, plan_recipe

    try:
        plan = plan_recipe(cfg, str(args.recipe), profile=args.profile)
    except (PlanError, ValueError) as e:
        print(f"rynnscale plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


def _cmd_plot(args: argparse.Namespace) -> int:
    """``rynnscale plot RUN_DIR``: the end-of-run plot again (a run killed or failed before its end has none; a
    chain's directory gets one per stage). Exit 2 when there is nothing to plot, naming why."""
    from rynnscale.train.metrics import METRICS_FILE, plot_run

    run = args.run_dir
    if not run.is_dir():
        print(f"rynnscale plot: {run} is not a directory (pass a run's run.output_dir)", file=sys.stderr)
        return 2
    # a stage chain's directory: one run per stage folder
    runs = [run] if (run / METRICS_FILE).is_file() else sorted(d for d in run.iterdir() if (d / METRICS_FILE).is_file())
    if not runs:
        print(f"rynnscale plot: {run} has no {METRICS_FILE} (not a run directory, or the run logged no step yet)",
              file=sys.stderr)
        return 2
    status = 0
    for r in runs:
        try:
            out = plot_run(r, args.out)
        except (ValueError, OSError) as e:   # a damaged line, an unwritable directory
            print(f"rynnscale plot: {e}", file=sys.stderr)
            status = 2
            continue
        if out is None:
            print(f"rynnscale plot: {r / METRICS_FILE} holds no step yet: nothing to plot", file=sys.stderr)
            status = 2
        else:
            print(f"wrote {out}")
    return status


def _add_train_parser(sub) -> None:
    """``rynnscale train RECIPE [key=value ...]``."""
    t = sub.add_parser("train", help="train from a YAML recipe", description=(
        "Train from a YAML recipe. Overrides use dotlist syntax, e.g. train.max_steps=10 run.output_dir=runs/x. "
        "Under torchrun every rank runs this same command."))
    t.add_argument("recipe", type=Path, help="recipe YAML (may 'extends:' another)")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=_cmd_train)


def _add_data_parser(sub) -> None:
    """``rynnscale data synth | convert | inspect``."""
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
    s.add_argument("--questions", help="comma list of the question types to draw from (default all: traj, "
                   "locate_last, locate_frame, which_moved, affordance)")
    s.add_argument("--objects", help="fewest,most objects per clip (default 2,4)")
    _add_convert_parsers(dsub)
    _add_inspect_parser(dsub)
    d.set_defaults(func=_cmd_data)


def _add_convert_parsers(dsub) -> None:
    """``rynnscale data convert lerobot | jsonl | frames``."""
    c = dsub.add_parser("convert", help="convert LeRobot / jsonl / frame folders to shards")
    csub = c.add_subparsers(dest="source", required=True)

    def convert_parser(name: str, help_: str, src_help: str) -> argparse.ArgumentParser:
        cp = csub.add_parser(name, help=help_, description=help_)
        cp.add_argument("src", type=Path, help=src_help)
        cp.add_argument("out", type=Path, help="output directory (shards + manifest.json)")
        cp.add_argument("--workers", type=int, default=1, help="worker processes")
        cp.add_argument("--prefix", default=None, help="shard file / sample key prefix")
        cp.add_argument("--source-name", default=None, help="meta.json 'source' (default derived from the input)")
        cp.add_argument("--licence", default=None, help="licence of the data (default: detected, else 'unknown')")
        cp.add_argument("--tokenizer", default=None, help="tokenizer dir for the manifest's token-count hints")
        cp.add_argument("--recipe", type=Path, default=None, metavar="RECIPE.yaml",
                        help="make the cost hints with the encoder a run of this training recipe uses (its data "
                             "settings, token budget, tokenizer and model family's chat template); key=value "
                             "overrides of it follow the other arguments, as for 'rynnscale train'")
        cp.add_argument("--no-cost-hints", action="store_true", help="skip num_tokens / vision_patches hints")
        cp.add_argument("--no-progress", action="store_true")
        cp.set_defaults(overrides=[])   # key=value arguments (main() collects them): the --recipe's overrides
        return cp

    cl = convert_parser("lerobot", "LeRobotDataset v2.x / v3.0 -> clip shards", "LeRobot dataset root (with meta/info.json)")
    cl.add_argument("--clip-seconds", type=float, default=4.0)
    cl.add_argument("--stride-seconds", type=float, default=None, help="default: --clip-seconds")
    cl.add_argument("--fps", type=float, default=2.0, help="frames sampled per second (use the training fps)")
    cl.add_argument("--episodes", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                    help="comma-separated episode indices (default: all present)")
    cl.add_argument("--episodes-per-shard", type=int, default=8)
    cl.add_argument("--video-key", default=None, help="camera feature (default: the first video feature)")
    cl.add_argument("--video-path", default=None, metavar="TEMPLATE",
                    help="video file template relative to SRC, replacing meta/info.json's video_path (same fields: "
                         "{episode_chunk:03d} {episode_index:06d} {video_key}; v3.0: {chunk_index} {file_index})")
    cl.add_argument("--data-path", default=None, metavar="TEMPLATE",
                    help="parquet file template relative to SRC, replacing meta/info.json's data_path")
    cl.add_argument("--media", choices=["video", "frames"], default="video", help="re-encoded mp4 or jpg frames")
    cl.add_argument("--codec", default="auto", help="auto | libx264 | mpeg4 | libvpx-vp9")
    cl.add_argument("--max-side", type=int, default=None, help="downscale so the longer side is at most this")
    cl.add_argument("--tolerance-s", type=float, default=None,
                    help="video frames and parquet rows pair when this close in time (default half a frame); "
                         "unpaired ones are left out and counted")
    cl.add_argument("--skip-nonfinite", action="store_true",
                    help="skip (and count) episodes with NaN / inf actions or states instead of stopping")
    cl.add_argument("--action-key", default="action", help="parquet column of the actions")
    cl.add_argument("--state-key", default="observation.state", help="parquet column of the state; 'none' to skip "
                                                                     "state.npy")
    cl.add_argument("--action-space", default=None)
    cl.add_argument("--action-units", default=None)
    cl.add_argument("--action-bins", type=int, default=0, help="add discretised action tokens with N bins per dim")
    cl.add_argument("--binning", choices=["quantile", "minmax"], default="quantile")
    cl.add_argument("--answer-dims", default=None, help="comma-separated action dims shown per step in the answer")
    cl.add_argument("--answer-top-k", type=int, default=4)
    cl.add_argument("--question", default="{task}", help="user text template ({task}, {fps}, {duration_s}, ...)")

    cj = convert_parser("jsonl", "RynnScale-style conversation jsonl -> shards", "the .jsonl file")
    cj.add_argument("--media-root", type=Path, required=True, help="media paths are resolved under this directory only")
    cj.add_argument("--frames-fps", type=float, default=2.0, help="fps of frame-list videos without an 'fps' field")
    cj.add_argument("--lines-per-shard", type=int, default=500)
    cj.add_argument("--max-bad-fraction", type=float, default=0.05, help="fail when more lines than this are bad")

    cf = convert_parser("frames", "a folder of jpg/png frames -> clip shards", "frame folder")
    cf.add_argument("--fps", type=float, required=True, help="frame rate of the folder")
    cf.add_argument("--clip-frames", type=int, required=True)
    cf.add_argument("--stride", type=int, default=None, help="frames between clip starts (default: --clip-frames)")
    cf.add_argument("--keep-tail", action="store_true", help="keep a last clip shorter than --clip-frames")
    cf.add_argument("--task", default="")
    cf.add_argument("--question", default=None, help="question template (default: what task is performed)")
    cf.add_argument("--answer", default=None, help="answer template (default: '{task}')")
    cf.add_argument("--annotations", type=Path, default=None, help="jsonl of {start_frame, end_frame, question, answer}")
    cf.add_argument("--embodiment", default="unknown")
    cf.add_argument("--clips-per-shard", type=int, default=256)
    cf.add_argument("--max-bad-fraction", type=float, default=0.05,
                    help="fail when more clips than this are bad (an unreadable or mis-sized frame skips its clip)")


def _add_inspect_parser(dsub) -> None:
    """``rynnscale data inspect DIR``."""
    i = dsub.add_parser("inspect", help="counts and histograms of a shard directory")
    i.add_argument("dir", type=Path)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--no-estimate", action="store_true", help="use the manifest's token hints instead of the encoder")
    i.add_argument("--tokenizer", default=None)
    i.add_argument("--recipe", type=Path, default=None, metavar="RECIPE.yaml",
                   help="estimate with the encoder a run of this training recipe uses (its data settings, token "
                        "budget, tokenizer, chat template); key=value overrides of it follow the other arguments")
    i.set_defaults(overrides=[])   # key=value arguments (main() collects them): the --recipe's overrides
    i.add_argument("--max-samples", type=int, default=None)
    i.add_argument("--verify", action="store_true", help="also re-hash every shard")
    i.add_argument("--bins", type=int, default=10)


def _non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (a negative count would slice from the end)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_ckpt_parser(sub) -> None:
    """``rynnscale ckpt export-hf | inspect``."""
    k = sub.add_parser("ckpt", help="checkpoint tools (export to Hugging Face, inspect)")
    ksub = k.add_subparsers(dest="ckpt_cmd", required=True)
    e = ksub.add_parser("export-hf", help="export a checkpoint to a transformers directory", description=(
        "Stream the model tensors of a training checkpoint (DCP) into a Hugging Face directory, one tensor at "
        "a time (peak memory ~ the largest tensor, not the model)."))
    e.add_argument("ckpt", type=Path, help="checkpoint directory, e.g. runs/x/checkpoints/step_000100")
    e.add_argument("out", type=Path, help="output directory (must be empty unless --overwrite)")
    e.add_argument("--copy-from", type=Path, default=None,
                   help="directory whose tokenizer / processor files the export gets (and config.json if the checkpoint "
                        "lacks one); default: the run's model.init_from and the tokenizer it read its data with")
    e.add_argument("--dtype", choices=["keep", "bfloat16", "float16", "float32"], default="keep")
    e.add_argument("--max-shard-gb", type=float, default=5.0)
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--adapter", type=Path, default=None,
                   help="LoRA runs: also write the adapter in PEFT format to this directory (OUT gets the merged model)")
    ki = ksub.add_parser("inspect", help="print a checkpoint's step, tokens, config and tensors")
    ki.add_argument("ckpt", type=Path)
    ki.add_argument("--json", action="store_true", help="print the summary as JSON")
    ki.add_argument("--max-tensors", type=_non_negative_int, default=None,
                    help="list at most this many tensors (0: none; default: all)")
    k.set_defaults(func=_cmd_ckpt)


def _add_plan_parser(sub) -> None:
    """``rynnscale plan RECIPE``."""
    pl = sub.add_parser("plan", help="memory / communication planner for a recipe", description=(
        "Per-GPU memory, communication per step, a fits / does-not-fit verdict and an estimated step time for a "
        "recipe on a cluster, computed on paper (the model is built on the meta device). Cluster flags default "
        "to the recipe's plan.* section."))
    pl.add_argument("recipe", type=Path)
    pl.add_argument("overrides", nargs="*", help="key=value recipe overrides (e.g. train.micro_batch_tokens=8192)")
    pl.add_argument("--nodes", type=int, help="nodes (plan.nodes)")
    pl.add_argument("--gpus-per-node", type=int, help="GPUs per node (plan.gpus_per_node)")
    pl.add_argument("--gpu-mem-gib", type=float, help="memory per GPU in GiB (plan.gpu_mem_gib)")
    pl.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s per GPU (default 790: H100 measured)")
    pl.add_argument("--mfu", type=float, help="expected model-FLOPs utilisation (default 0.35)")
    pl.add_argument("--nvlink-gbps", type=float, help="intra-node GB/s per GPU (default 360)")
    pl.add_argument("--ib-gbps", type=float, help="inter-node GB/s per GPU (default 45: 400 Gb/s NIC)")
    pl.add_argument("--profile", choices=["gpu", "cpu"], default="gpu",
                    help="gpu: FSDP2 bf16 + flash attention (default); cpu: fp32 + math attention")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=_cmd_plan)


def _add_plot_parser(sub) -> None:
    """``rynnscale plot RUN_DIR``."""
    pt = sub.add_parser("plot", help="plot a run's metrics.jsonl (loss, lr, tokens/s; GRPO: reward and KL)",
                        description=(
        "Writes RUN_DIR/training.png from RUN_DIR/metrics.jsonl, as a run does at its end: for a run that was killed "
        "or is still running, or a stage chain's directory (one plot per stage)."))
    pt.add_argument("run_dir", type=Path, help="the run's run.output_dir")
    pt.add_argument("--out", default="training.png", help="file name inside the run directory (default training.png)")
    pt.set_defaults(func=_cmd_plot)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rynnscale", description="Distributed training for embodied Qwen3-VL brain models.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train_parser, _add_data_parser, _add_ckpt_parser, _add_plan_parser, _add_plot_parser):
        add(sub)
    return p

def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may also follow option flags (``train R --print-config k=v``, ``plan R --nodes 2 k=v``):
    # argparse stops the positional list at the first flag (and parse_intermixed_args refuses subparsers)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "overrides", None) is None or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
