"""Model card (README.md) of an exported Hugging Face directory: what it was trained from, on what, for
how long, with which final losses, under which config -- so an exported model explains itself.

``summarize_run(output_dir)`` reads the run's ``metrics.jsonl`` (the last record per step wins, so a
resumed run counts once); ``write_model_card(out_dir, cfg, summary)`` writes ``out_dir/README.md``
(Hugging Face card: YAML front matter + markdown, the resolved config embedded at the end).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"


def summarize_run(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Steps, tokens, final train loss (mean of the last min(10, n) steps and the last step's), and the
    latest eval metrics (``eval_*`` / ``grounding_*`` keys) from ``output_dir/metrics.jsonl``."""
    from rynnscale.train.metrics import METRICS_FILE, read_metrics

    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"summarize_run: {path} does not exist (has the run logged any step?)")
    by_step = {int(rec["step"]): rec for rec in read_metrics(Path(output_dir))}
    if not by_step:
        raise ValueError(f"summarize_run: {path} has no records")
    recs = [by_step[s] for s in sorted(by_step)]
    last = recs[-1]
    # a skipped (non-finite) step's loss is null (NaN in files written before): left out of the mean
    tail = [r["loss"] for r in recs[-10:] if r.get("loss") is not None and math.isfinite(r["loss"])]
    summary: dict[str, Any] = {
        "steps": int(last["step"]), "tokens_seen": int(last.get("tokens_seen", 0)),
        "final_loss": None if last.get("loss") is None else float(last["loss"]),
        "final_loss_mean_last_steps": sum(tail) / len(tail) if tail else None,
        "mean_over_last_steps": len(tail),
    }
    evals = [r for r in recs if r.get("eval_loss") is not None]
    if evals:
        summary["eval_step"] = int(evals[-1]["step"])
        summary.update({k: v for k, v in evals[-1].items() if k.startswith(("eval_", "grounding_"))})
    return summary


def _exported_model(out: Path, cfg: Any) -> tuple[str, bool]:
    """(model_type, text-only) of the exported model: its config.json (the export writes it), else the recipe's
    inline ``model.arch`` (a card written without an export's config)."""
    try:
        hf = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        hf = dict(cfg.model.arch or {})
    model_type = str(hf.get("model_type") or "qwen3_vl")
    text_only = any(str(a).endswith("ForCausalLM") for a in hf.get("architectures") or ()) or model_type.endswith("_text")
    return model_type, text_only


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_model_card(out_dir: str | os.PathLike, cfg: Any, summary: dict[str, Any]) -> Path:
    """Write ``out_dir/README.md`` for the run ``cfg`` (a RootConfig) with ``summary`` (from
    :func:`summarize_run`, plus any extra keys, e.g. ``{"base": ...}`` to name the base explicitly).
    The directory must exist (an export). Returns the card's path."""
    from rynnscale.config import to_yaml

    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"write_model_card: {out} is not a directory (export the model first)")
    for key in ("steps", "tokens_seen", "final_loss"):
        if key not in summary:
            raise ValueError(f"write_model_card: summary lacks {key!r} (use rynnscale.train.model_card."
                             "summarize_run(run.output_dir))")
    name = cfg.run.name or out.parent.name
    base = summary.get("base") or (cfg.model.init_from if cfg.model.init_from else
                                   "random initialisation (inline architecture `model.arch`)")
    model_type, text_only = _exported_model(out, cfg)
    arch = "MoE" if "moe" in model_type else None
    auto_class = "AutoModelForCausalLM" if text_only else "AutoModelForImageTextToText"
    if cfg.data.mixture:
        data_rows = [f"| {m.name} | {m.weight:g} | {', '.join(f'`{s}`' for s in m.shards)} |" for m in cfg.data.mixture]
    else:
        shards = list(cfg.data.train_shards) or ([f"built-in synthetic egocentric set ({cfg.data.synthetic.num_samples} "
                                                 f"samples, seed {cfg.data.synthetic.seed})"]
                                                if cfg.data.synthetic.num_samples > 0 else [])
        data_rows = [f"| train | 1 | {', '.join(shards)} |"]
    metric_rows = [f"| {k} | {_fmt(v)} |" for k, v in summary.items()
                   if k.startswith(("eval_", "grounding_")) and k != "eval_step"]
    front = ["---", "library_name: transformers",
             f"pipeline_tag: {'text-generation' if text_only else 'image-text-to-text'}", "tags:", "- rynnscale",
             f"- {model_type}", "- embodied"]
    if cfg.model.init_from:
        front.append(f"base_model: {json.dumps(str(base))}")
    front.append("---")
    lines = front + [
        "", f"# {name}", "",
        f"Trained with rynnscale from **{base}**{f' ({arch})' if arch else ''}. Load with "
        f"`transformers.{auto_class}.from_pretrained(<this directory>)`.", "",
        "## Training", "",
        "| | |", "|---|---|",
        f"| base | {base} |",
        f"| steps | {_fmt(summary['steps'])} |",
        f"| tokens seen | {_fmt(summary['tokens_seen'])} |",
        f"| final train loss (last step) | {_fmt(summary['final_loss'])} |",
        f"| final train loss (mean of last {summary.get('mean_over_last_steps', 1)} steps) | "
        f"{_fmt(summary.get('final_loss_mean_last_steps'))} |",
        *([f"| tokens per micro-batch | {_fmt(cfg.train.micro_batch_tokens)} x {cfg.train.grad_accum} accumulation |"]
          if cfg.train.objective != "grpo" else   # GRPO has no accumulation: a rollout batch splits into steps
          [f"| tokens per micro-batch | {_fmt(cfg.train.micro_batch_tokens)} |",
           f"| GRPO | {cfg.rl.prompts_per_step} prompts x {cfg.rl.group_size} answers per rollout, "
           f"{cfg.rl.policy_steps} optimiser step(s) per rollout |"]),
        f"| optimiser | AdamW, lr {cfg.optim.lr:g}, {cfg.optim.schedule} schedule |",
        "", "## Data", "", "| source | weight | shards |", "|---|---|---|", *data_rows, "",
    ]
    if metric_rows:
        lines += ["## Evaluation", "", f"Held-out evaluation at step {summary.get('eval_step', summary['steps'])} "
                  f"(shards: {', '.join(f'`{s}`' for s in cfg.eval.shards) or 'synthetic held-out set'}).", "",
                  "| metric | value |", "|---|---|", *metric_rows, ""]
    lines += ["## Config", "", "The resolved recipe this model was trained with:", "", "```yaml",
              to_yaml(cfg).rstrip(), "```", ""]
    path = out / CARD_NAME
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
