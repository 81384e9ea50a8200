"""Tiny twins end to end on CPU: base pretrain (tiny 8B twin) -> checkpoint + HF export -> fine-tune twins from
that export -> export + model card -> transformers ``from_pretrained`` + ``generate`` on a held-out sample.

Data is prepared with the documented commands (recipes/tiny/README.md): synthetic shard sets per mixture
source and the held-out set, and (when ../shared/data is there) the RynnBrain navigation frames and the
LeRobot G1 subset through the converters. Every tiny twin of recipes/base and recipes/finetune runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from shared_data import SHARED_DATA

from rynnscale.cli import main as cli_main
from rynnscale.config import load_config
from rynnscale.data.reader import iter_tar_samples
from rynnscale.train.build import build_model
from rynnscale.train.evaluate import Evaluator, split_prompt
from rynnscale.train.model_card import summarize_run, write_model_card
from rynnscale.train.trainer import run_training

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny"
SHARED = SHARED_DATA
SYNTHETIC_SETS = {"ego_video_qa": 11, "spatial_grounding": 12, "trajectories": 13, "general": 14, "planning": 15,
                  "chain_of_point": 16, "heldout": 99}
IMG, VID, IM_END = 151655, 151656, 151645


def test_every_full_size_recipe_has_a_tiny_twin() -> None:
    full = {p.relative_to(ROOT / "recipes") for p in (ROOT / "recipes").glob("*/*.yaml") if p.parts[-3] != "tiny"}
    tiny = {p.relative_to(TINY) for p in TINY.glob("*/*.yaml")}
    assert full and full <= tiny, f"recipes without a tiny twin: {sorted(map(str, full - tiny))}"
    for rel in full:   # same extends chain
        first = lambda p: next((ln for ln in p.read_text().splitlines() if ln.startswith("extends:")), None)  # noqa: E731
        assert first(ROOT / "recipes" / rel) == first(TINY / rel), rel


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_data")
    for name, seed in SYNTHETIC_SETS.items():
        assert cli_main(["data", "synth", str(root / name), "--num-samples", "8", "--seed", str(seed),
                         "--samples-per-shard", "8"]) in (0, None)
    if (SHARED / "rynnbrain_frames/navigation").is_dir():
        assert cli_main(["data", "convert", "frames", str(SHARED / "rynnbrain_frames/navigation"), str(root / "navigation"),
                         "--fps", "1", "--clip-frames", "4", "--stride", "16", "--task", "walk to the kitchen door",
                         "--no-progress"]) in (0, None)
    if (SHARED / "lerobot_g1_subset").is_dir():
        assert cli_main(["data", "convert", "lerobot", str(SHARED / "lerobot_g1_subset"), str(root / "lerobot_actions"),
                         "--episodes", "1", "--clip-seconds", "2", "--stride-seconds", "4", "--fps", "2",
                         "--max-side", "64", "--action-bins", "16", "--answer-dims", "0,1", "--no-progress"]) in (0, None)
    return root


def tiny_cfg(recipe: str, data_root: Path, out: Path, *extra: str):
    return load_config(TINY / recipe, [f"data.root={data_root}", f"run.output_dir={out}", *extra])


def train(recipe: str, data_root: Path, out: Path, *extra: str):
    cfg = tiny_cfg(recipe, data_root, out, *extra)
    run_training(cfg)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, cfg.train.max_steps + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    hf_dir = out / "hf"
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer.json").is_file(), "checkpoint.export_hf"
    return cfg, hf_dir


@pytest.fixture(scope="module")
def base_export(data_root, tmp_path_factory) -> Path:
    """The tiny 8B-twin base run (the fine-tunes' init)."""
    torch.manual_seed(0)
    _, hf_dir = train("base/qwen3_vl_8b.yaml", data_root, tmp_path_factory.mktemp("base_8b"))
    return hf_dir


def hf_generate(hf, prompt, max_new_tokens: int) -> list[int]:
    ids = prompt.input_ids_l[None]
    tt = torch.zeros_like(ids)
    tt[ids == IMG] = 1
    tt[ids == VID] = 2
    media = {k: getattr(prompt, k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
             if getattr(prompt, k) is not None}
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=tt, **media,
                      do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=[IM_END], pad_token_id=IM_END)
    return out[0, ids.shape[1]:].tolist()


def test_base_to_finetune_to_export_to_transformers_generate(data_root, base_export, tmp_path) -> None:
    torch.manual_seed(0)
    cfg, hf_dir = train("finetune/planning.yaml", data_root, tmp_path / "plan", f"model.init_from={base_export}")
    # evaluation of the fine-tuned export on the held-out set (what the trainer's eval hook records)
    args, model = build_model(load_config(TINY / "finetune/planning.yaml", [f"model.init_from={hf_dir}",
                                                                            f"data.root={data_root}"]).model,
                              torch.device("cpu"), seed=0)
    ev = Evaluator(cfg, args)
    metrics = ev.evaluate(model)
    assert metrics["eval_tokens"] > 0 and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert metrics["grounding_samples"] == cfg.eval.grounding_samples
    with (tmp_path / "plan" / "metrics.jsonl").open("a") as f:   # as the trainer's hook would log it
        f.write(json.dumps({**json.loads((tmp_path / "plan" / "metrics.jsonl").read_text().splitlines()[-1]),
                            **metrics}) + "\n")

    card = write_model_card(hf_dir, cfg, summarize_run(tmp_path / "plan"))
    text = card.read_text()
    for needle in (str(base_export), "planning", "spatial_grounding", "| steps | 2 |", "final train loss",
                   "eval_loss", "grounding_tag_recall", "```yaml", "micro_batch_tokens: 512"):
        assert needle in text, f"model card lacks {needle!r}"

    # transformers loads the fine-tuned export and generates exactly what our greedy decoder generates
    hf = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
    raw = next(iter_tar_samples(str(next((data_root / "heldout").glob("*.tar")))))
    prompt, _ = split_prompt(ev.encoder.encode(raw.key, raw.members), ev.encoder.ids, ev.encoder.spec.merge_size)
    from rynnscale.models.generate import greedy_generate

    with torch.no_grad():
        want = hf_generate(hf, prompt, 8)
    model.eval()
    assert greedy_generate(model, prompt, 8, eos_ids=[IM_END]) == want and len(want) >= 1


OTHER_TWINS = ["base/qwen3_vl_2b.yaml", "base/qwen3_vl_30b_a3b.yaml", "finetune/navigation.yaml",
               "finetune/chain_of_point.yaml", "finetune/action.yaml", "finetune/planning_lora.yaml",
               "finetune/navigation_lora.yaml"]


@pytest.mark.parametrize("recipe", OTHER_TWINS)
def test_every_other_tiny_twin_trains_and_exports(recipe: str, data_root, base_export, tmp_path) -> None:
    torch.manual_seed(0)
    extra = [f"model.init_from={base_export}"] if recipe.startswith("finetune/") else []
    needs = {"finetune/navigation.yaml": "navigation", "finetune/navigation_lora.yaml": "navigation",
             "finetune/action.yaml": "lerobot_actions"}.get(recipe)
    if needs and not (data_root / needs).is_dir():
        pytest.skip(f"shared data for {recipe} not found under {SHARED} (set RYNNSCALE_SHARED_DATA)")
    cfg, hf_dir = train(recipe, data_root, tmp_path / "run", *extra)
    write_model_card(hf_dir, cfg, summarize_run(tmp_path / "run"))
    hf = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32)
    assert hf.config.model_type == ("qwen3_vl_moe" if "30b" in recipe else "qwen3_vl")
    if cfg.model.lora.rank > 0:  # a LoRA twin also writes its PEFT adapter, and trains adapters only
        assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    shutil.rmtree(tmp_path / "run" / "checkpoints", ignore_errors=True)
