"""Every recipe loads and validates (with inheritance); the full-size recipes build their published
architectures on the meta device and fit their stated clusters in `rynnscale plan`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rynnscale.cli import main as cli_main
from rynnscale.config import ConfigError, load_config
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs
from rynnscale.models.qwen3_vl.presets import PUBLISHED_PARAMS
from rynnscale.models.registry import preset_config
from rynnscale.plan import param_stats
from rynnscale.train.build import build_model, model_config_for

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ALL = sorted(p for p in RECIPES.rglob("*.yaml") if not p.name.startswith("_"))
FULL_SIZE = {"base/qwen3_vl_2b.yaml": "qwen3-vl-2b", "base/qwen3_vl_8b.yaml": "qwen3-vl-8b",
             "base/qwen3_vl_30b_a3b.yaml": "qwen3-vl-30b-a3b"}


def test_recipe_set_is_complete() -> None:
    names = {str(p.relative_to(RECIPES)) for p in ALL}
    assert set(FULL_SIZE) <= names
    assert {"finetune/planning.yaml", "finetune/navigation.yaml", "finetune/chain_of_point.yaml",
            "finetune/action.yaml", "demo_tiny.yaml"} <= names


@pytest.mark.parametrize("recipe", ALL, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_loads_and_validates(recipe: Path, tmp_path: Path) -> None:
    cfg = load_config(recipe, check_paths=False)
    if cfg.model.preset is None:
        return  # demo_tiny: inline architecture, already fully validated above
    # full validation (init_from must hold a config.json) against a directory with the preset's config.json
    init = tmp_path / "init"
    init.mkdir()
    (init / "config.json").write_text(json.dumps(preset_config(cfg.model.preset)))
    cfg = load_config(recipe, [f"model.init_from={init}", "data.root=/shards"])
    assert cfg.data.mixture and all(s.weight > 0 for s in cfg.data.mixture)
    assert all(sh.startswith("/shards/") for s in cfg.data.mixture for sh in s.shards)  # ${data.root} resolved
    assert cfg.data.video_fps > 0 and cfg.data.video_max_frames <= 512
    assert cfg.optim.schedule == "cosine" and cfg.model.activation_checkpointing == "full"
    assert cfg.optim.groups or cfg.model.lora.rank > 0, "expected per-module learning rates (or LoRA)"


def test_inheritance_overrides_parent_and_keeps_the_rest() -> None:
    base = load_config(RECIPES / "base/qwen3_vl_8b.yaml", check_paths=False)
    nav = load_config(RECIPES / "finetune/navigation.yaml", check_paths=False)
    assert base.train.micro_batch_tokens == nav.train.micro_batch_tokens == 16384   # from base/_base.yaml
    assert nav.model.init_from == "runs/base_8b/hf" and base.model.init_from.endswith("Qwen3-VL-8B-Instruct")
    assert [s.name for s in nav.data.mixture] == ["navigation"]                     # list replaced, not merged
    assert nav.data.video_max_frames == 64 and base.data.video_max_frames == 512
    moe = load_config(RECIPES / "base/qwen3_vl_30b_a3b.yaml", check_paths=False)
    assert moe.parallel.ep == 2 and moe.optim.lr == 2e-6 and moe.plan.nodes == 2


def test_bad_recipe_values_name_the_key(tmp_path: Path) -> None:
    r = RECIPES / "base/qwen3_vl_2b.yaml"
    with pytest.raises(ConfigError, match=r"model.preset"):
        load_config(r, ["model.preset=qwen3-vl-3b"], check_paths=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {r}\ndata:\n  mixture:\n    - {{name: a, shards: [x.tar], weight: 0}}\n")
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].weight"):
        load_config(bad, check_paths=False)
    with pytest.raises(ConfigError, match=r"model.init_from"):
        load_config(r)   # checkpoints/hf/Qwen3-VL-2B-Instruct is not on this machine
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps(preset_config("qwen3-vl-8b")))
    with pytest.raises(ConfigError, match=r"'model.preset' = 'qwen3-vl-2b' does not describe"):
        load_config(r, [f"model.init_from={wrong}"])


@pytest.mark.parametrize("recipe,preset", sorted(FULL_SIZE.items()))
def test_meta_build_has_published_parameter_counts(recipe: str, preset: str) -> None:
    """Published totals (hub safetensors counts: 2.13B, 8.77B, 31.07B) within 1%; the 30B-A3B language
    model against the Qwen3 report's 30.5B total / 3.3B activated within 2% / 5% (rounded figures)."""
    cfg = load_config(RECIPES / recipe, check_paths=False)
    args = Qwen3VLArgs.from_hf_config(preset_config(cfg.model.preset), strict=True)
    _, model = build_model(model_config_for(args), meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    st = param_stats(model)
    pub = PUBLISHED_PARAMS[preset]
    assert st.total / 1e9 == pytest.approx(pub["total"], rel=0.01)
    if "text_active" in pub:
        assert st.text_total / 1e9 == pytest.approx(pub["text_total"], rel=0.02)
        assert st.text_active / 1e9 == pytest.approx(pub["text_active"], rel=0.05)
        assert st.active < 0.15 * st.total
    else:
        assert st.active == st.total


@pytest.mark.parametrize("recipe,nodes", [("base/qwen3_vl_30b_a3b.yaml", 2), ("base/qwen3_vl_8b.yaml", 2),
                                          ("base/qwen3_vl_2b.yaml", 1)])
def test_plan_fits_stated_cluster(recipe: str, nodes: int, capsys) -> None:
    rc = cli_main(["plan", str(RECIPES / recipe), "--nodes", str(nodes), "--gpus-per-node", "8",
                   "--gpu-mem-gib", "80", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and plan["fits"], plan["memory"]
    assert plan["memory"]["total_with_reserve"] <= 80 * 1024 ** 3
    assert plan["layout"]["dp_shard"] == nodes * 8
    assert plan["step_s"] > 0 and plan["comm"]["fsdp_allgather_bytes"] > 0
    if "30b" in recipe:
        assert plan["layout"]["ep"] == 2 and plan["comm"]["ep_all_to_all_bytes"] > 0


def test_plan_does_not_fit_and_says_what_to_change(capsys) -> None:
    rc = cli_main(["plan", str(RECIPES / "base/qwen3_vl_8b.yaml"), "model.activation_checkpointing=none",
                   "--nodes", "1", "--gpus-per-node", "1", "--gpu-mem-gib", "80"])
    out = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT" in out and "try:" in out


def test_optimizer_groups_and_freezing() -> None:
    from rynnscale.config.schema import OptimConfig, OptimGroupConfig
    from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
    from rynnscale.parallel.activation_checkpoint import apply_activation_checkpointing
    from rynnscale.train.optim import build_optimizer, build_scheduler, freeze_parameters

    torch.manual_seed(0)
    cfg = load_config(RECIPES / "demo_tiny.yaml")
    args = Qwen3VLArgs.from_hf_config(dict(cfg.model.arch), strict=True)
    model = Qwen3VLForConditionalGeneration(args)
    apply_activation_checkpointing(model, "full")   # wrapper prefixes must not change what patterns match
    n = freeze_parameters(model, ["model.visual.blocks.*"])
    assert n == sum(p.numel() for p in model.model.visual.blocks.parameters())
    assert not any(p.requires_grad for p in model.model.visual.blocks.parameters())
    ocfg = OptimConfig(lr=1e-3, weight_decay=0.1, groups=[OptimGroupConfig("model.visual.*", 0.1, 0.0)])
    opt = build_optimizer(model, ocfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["default"]["lr"] == pytest.approx(1e-3)
    assert by_name["model.visual.*"]["lr"] == pytest.approx(1e-4) and by_name["model.visual.*"]["weight_decay"] == 0
    vis = {id(p) for p in model.model.visual.parameters()}
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert len({id(p) for p in in_opt}) == len(in_opt) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(id(p) in vis for g in opt.param_groups if g["name"].startswith("model.visual") for p in g["params"])
    sched = build_scheduler(opt, OptimConfig(lr=1e-3, warmup_ratio=0.1, groups=ocfg.groups), max_steps=20)
    assert sched.get_last_lr()[0] == pytest.approx(1e-3 / 2) and sched.get_last_lr()[-1] == pytest.approx(1e-4 / 2)
    with pytest.raises(ValueError, match=r"model.freeze\[0\]"):
        freeze_parameters(model, ["model.vision.*"])
    with pytest.raises(ValueError, match=r"optim.groups\[0\].pattern"):
        build_optimizer(model, OptimConfig(groups=[OptimGroupConfig("visual.*")]))


def test_fine_tunes_start_from_a_base_recipe_export() -> None:
    """A fine-tune's ``model.init_from`` under ``runs/`` is where a base recipe of the repo writes its export
    (``checkpoint.export_hf``: ``<run.output_dir>/hf``), so running the base then the fine-tune chains."""
    exports = {}
    for p in ALL:
        cfg = load_config(p, check_paths=False)
        if cfg.checkpoint.export_hf and not cfg.stages:
            exports[str(Path(cfg.run.output_dir) / "hf")] = p.relative_to(RECIPES)
    fine_tunes = [p for p in ALL if "finetune" in p.parts]
    assert fine_tunes
    for p in fine_tunes:
        init = load_config(p, check_paths=False).model.init_from
        if init is not None and init.startswith("runs/"):
            assert init in exports, f"{p.relative_to(RECIPES)}: model.init_from={init!r} is no recipe's export " \
                                    f"(exports: {sorted(exports)})"
