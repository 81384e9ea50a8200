"""Recipe loading: inheritance, overrides, validation errors naming the key."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from rynnscale.config import ConfigError, load_config, save_resolved
from rynnscale.config.load import stage_config

REPO = Path(__file__).resolve().parents[2]

TINY_ARCH = """
model:
  arch:
    model_type: qwen3_vl
    text_config: {vocab_size: 151936, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2,
                  num_key_value_heads: 1, head_dim: 16, intermediate_size: 64, mrope_section: [2, 3, 3]}
    vision_config: {depth: 1, hidden_size: 32, num_heads: 2, intermediate_size: 64, out_hidden_size: 32,
                    deepstack_visual_indexes: [0]}
data:
  synthetic: {num_samples: 8}
"""


@pytest.fixture
def recipe(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(TINY_ARCH + "train: {max_steps: 7, micro_batch_tokens: 512}\noptim: {lr: 0.001}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrain: {max_steps: 9}\nrun: {seed: 3}\n")
    return child


def test_inheritance_and_overrides(recipe):
    cfg = load_config(recipe, ["optim.lr=0.01", "data.train_shards=[a.tar,b.tar]"])
    assert cfg.train.max_steps == 9            # child overrides parent
    assert cfg.train.micro_batch_tokens == 512  # parent value kept
    assert cfg.run.seed == 3
    assert cfg.optim.lr == 0.01                 # dotlist override wins
    assert cfg.data.train_shards == ["a.tar", "b.tar"]
    assert cfg.model.arch["text_config"]["hidden_size"] == 32


def test_typo_names_key_and_suggests(recipe):
    with pytest.raises(ConfigError, match=r"train\.max_step'.*did you mean 'train\.max_steps'"):
        load_config(recipe, ["train.max_step=5"])


@pytest.mark.parametrize("override, pattern", [
    ("train.max_steps=abc", r"train\.max_steps"),
    ("optim.schedule=cosin", r"optim\.schedule.*cosine"),
    ("logging.wandb.mode=loud", r"logging\.wandb\.mode.*offline"),
    ("data.balance=lpt", r"data\.balance.*cost.*tokens.*none"),
    ("train.grad_accum=0", r"train\.grad_accum"),
    ("parallel.dp_shard=0", r"parallel\.dp_shard"),
    ("optim.warmup_steps=-1", r"optim\.warmup_steps"),
    ("model.arch.text_config.hidden_sze=3", r"hidden_sze"),
    ("model.arch.text_config.num_key_value_heads=3", r"num_key_value_heads"),
    ("model.init_from=/nonexistent", r"'model\.init_from' = '/nonexistent': no config\.json there"),
    ("checkpoint.resume=/no/such/ckpt", r"checkpoint\.resume"),
    # the synthetic generator's own bounds, at load (not a traceback at run start)
    ("data.synthetic.frames=1", r"'data\.synthetic\.frames' = 1 must be >= 2"),
    ("data.synthetic.width=33", r"'data\.synthetic\.width' = 33 must be even and >= 16"),
    ("data.synthetic.height=8", r"'data\.synthetic\.height' = 8 must be even and >= 16"),
    ("data.tokenizer=/nonexistent", r"'data\.tokenizer' = '/nonexistent': no tokenizer there"),
    ("data.tokenizer=''", r"'data\.tokenizer' is empty"),
])
def test_invalid_values_fail_naming_key(recipe, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(recipe, [override])


def test_inheritance_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_resolved_config_round_trips(recipe, tmp_path):
    cfg = load_config(recipe, ["optim.lr=0.02"])
    out = tmp_path / "out" / "config.yaml"
    save_resolved(cfg, out)
    assert load_config(out) == cfg


def test_cli_typo_fails_fast_naming_key(recipe):
    """The issue's acceptance check: a recipe typo fails in under 5 s with a message naming the key."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rynnscale", "train", str(recipe), "train.max_step=5"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2
    assert "train.max_step" in proc.stderr and "train.max_steps" in proc.stderr
    assert elapsed < 5, f"took {elapsed:.1f}s"


def test_demo_recipe_is_valid():
    cfg = load_config(REPO / "recipes" / "demo_tiny.yaml")
    assert cfg.model.arch is not None and cfg.data.synthetic.num_samples > 0


def test_command_line_init_from_replaces_the_recipe_arch(tmp_path):
    """``rynnscale train demo.yaml model.init_from=DIR`` fine-tunes DIR (the recipe's inline arch yields);
    in a recipe file, two architecture sources are still an error."""
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "demo_tiny.yaml"
    cfg = load_config(recipe, ["model.init_from=/somewhere"], check_paths=False)
    assert cfg.model.init_from == "/somewhere" and cfg.model.arch is None
    both = tmp_path / "both.yaml"
    both.write_text(f"extends: {recipe}\nmodel:\n  init_from: /somewhere\n")
    with pytest.raises(ConfigError, match="exactly one of 'model.init_from'"):
        load_config(both, check_paths=False)


def test_command_line_arch_replaces_a_recipe_init_from_and_its_preset():
    """``model.arch=...`` on the command line of a full-size recipe (a tiny smoke test of it) replaces the recipe's
    ``model.init_from`` and the ``model.preset`` naming that directory's architecture; before, the preset was kept
    and the load failed with "'model.preset' ... cannot be combined with an inline 'model.arch'"."""
    arch = ("model.arch={model_type: qwen3_vl, text_config: {vocab_size: 151936, hidden_size: 32, num_hidden_layers: 2, "
            "num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16, intermediate_size: 64, mrope_section: "
            "[2, 3, 3]}, vision_config: {depth: 1, hidden_size: 32, num_heads: 2, intermediate_size: 64, "
            "out_hidden_size: 32, deepstack_visual_indexes: [0]}}")
    for name in ("base/qwen3_vl_2b.yaml", "finetune/planning.yaml"):
        cfg = load_config(REPO / "recipes" / name, [arch])
        assert (cfg.model.init_from, cfg.model.preset, cfg.model.arch["text_config"]["hidden_size"]) == (None, None, 32)
    with pytest.raises(ConfigError, match=r"'model\.preset'.*cannot be combined with an inline 'model\.arch'"):
        load_config(REPO / "recipes" / "base/qwen3_vl_2b.yaml", [arch, "model.preset=qwen3-vl-2b"])


@pytest.mark.parametrize("override, key", [
    ("model.lora.alpha=32", "model.lora.alpha"), ("model.lora.experts=true", "model.lora.experts"),
    ("model.lora.vision=true", "model.lora.vision"), ("model.lora.targets=[x]", "model.lora.targets"),
    ("model.lora.trainable=[lm_head.*]", "model.lora.trainable"),
])
def test_lora_keys_without_a_rank_are_refused(recipe, override, key):
    """model.lora.rank=0 is LoRA off: another LoRA key set would be ignored and the run a full fine-tune."""
    with pytest.raises(ConfigError, match=rf"{key}.*'model\.lora\.rank' = 0"):
        load_config(recipe, [override])
    assert load_config(recipe, [override, "model.lora.rank=4"]).model.lora.rank == 4


@pytest.mark.parametrize("overrides, pattern", [
    (["model.arch.model_type=qwen3_vl"], r"MoE key\(s\) \[.*'num_experts'.*\] in a dense qwen3_vl config"),
    (["model.arch.text_config.num_experts=0"], r"num_experts=0 in a qwen3_vl_moe config"),
])
def test_qwen3_vl_model_type_must_agree_with_its_moe_keys(overrides, pattern):
    """An inline Qwen3-VL arch whose model_type contradicts its MoE keys is refused, not silently made dense."""
    with pytest.raises(ConfigError, match=pattern):
        load_config(REPO / "recipes" / "demo_tiny.yaml", overrides)


def test_qwen3_vl_moe_without_num_experts_is_refused(tmp_path):
    arch = TINY_ARCH.replace("model_type: qwen3_vl", "model_type: qwen3_vl_moe")
    (tmp_path / "moe.yaml").write_text(arch)
    with pytest.raises(ConfigError, match=r"num_experts=None in a qwen3_vl_moe config"):
        load_config(tmp_path / "moe.yaml")


def test_grad_accum_under_grpo_is_refused_pointing_at_policy_steps(tmp_path):
    """GRPO never reads train.grad_accum (a rollout batch splits into rl.policy_steps steps): refused, also in a
    stage; the model card of a GRPO run claims no accumulation."""
    from rynnscale.train.model_card import write_model_card

    demo = REPO / "recipes" / "demo_tiny.yaml"
    with pytest.raises(ConfigError, match=r"train\.grad_accum' = 4.*rl\.policy_steps"):
        load_config(demo, ["train.objective=grpo", "train.grad_accum=4"])
    with pytest.raises(ConfigError, match=r"stages\[1\].*train\.grad_accum' = 2"):
        load_config(demo, ["train.grad_accum=2", "stages=[{name: sft}, {name: rl, overrides: {train: "
                                                 "{objective: grpo}}}]"])
    cfg = load_config(demo, ["train.objective=grpo", "rl.policy_steps=2"])
    card = write_model_card(tmp_path, cfg, {"steps": 1, "tokens_seen": 1, "final_loss": 1.0}).read_text()
    assert "accumulation" not in card and "2 optimiser step(s) per rollout" in card


def test_typo_inside_a_list_item_names_the_item_key_and_the_file(recipe, tmp_path):
    """A typo'd key in a list of sections (``data.mixture[i]``, ``optim.groups[i]``) names the item's key, its
    allowed fields and the recipe file that holds it (was: "unknown config key 'weigth' (allowed under '<root>':
    checkpoint, data, ...)"), also when the typo is in a parent recipe."""
    parent = tmp_path / "mix_parent.yaml"
    parent.write_text(TINY_ARCH.replace("synthetic: {num_samples: 8}", "synthetic: {num_samples: 0}\n  mixture:\n"
                                        "    - {name: a, shards: [x.tar], weigth: 2}\n"))
    child = tmp_path / "mix_child.yaml"
    child.write_text("extends: mix_parent.yaml\ntrain: {max_steps: 9}\n")
    want = (r"recipe .*mix_parent\.yaml: unknown config key 'data\.mixture\[0\]\.weigth'; did you mean "
            r"'data\.mixture\[0\]\.weight'\? \(allowed under 'data\.mixture\[0\]': name, shards, weight\)")
    for path in (parent, child):
        with pytest.raises(ConfigError, match=want):
            load_config(path, check_paths=False)
    with pytest.raises(ConfigError, match=r"^override: unknown config key 'optim\.groups\[0\]\.lr_scal'; did you "
                                          r"mean 'optim\.groups\[0\]\.lr_scale'"):
        load_config(recipe, ["optim.groups=[{pattern: 'model.visual.*', lr_scal: 0.1}]"])
    with pytest.raises(ConfigError, match=r"recipe .*base\.yaml: unknown config key 'train\.max_step'"):
        (tmp_path / "base.yaml").write_text(TINY_ARCH + "train: {max_step: 7}\n")
        load_config(recipe, check_paths=False)


@pytest.mark.parametrize("override, pattern", [
    ("data.synthetic.objects=[4,2]", r"config key 'data\.synthetic\.objects'.*fewest <= most <= 5, got \[4, 2\]"),
    ("data.synthetic.objects=[0,1]", r"config key 'data\.synthetic\.objects'"),
    ("data.synthetic.objects=[1,2,3]", r"config key 'data\.synthetic\.objects'"),
    ("data.synthetic.questions=[affordance,pointing]", r"config key 'data\.synthetic\.questions'.*'pointing'"),
    ("data.synthetic.questions=[]", r"config key 'data\.synthetic\.questions'"),
])
def test_synthetic_content_is_checked_at_load(recipe, override, pattern):
    """``data.synthetic.objects`` / ``questions`` fail at load (``--print-config``, ``plan``), not when the run
    starts generating; in a staged recipe, before the first stage trains (was: after it)."""
    with pytest.raises(ConfigError, match=pattern):
        load_config(recipe, [override])
    staged = recipe.parent / "staged.yaml"
    key, value = override.split("=", 1)
    staged.write_text(f"extends: {recipe.name}\nstages:\n  - {{name: sft, overrides: {{}}}}\n"
                      f"  - {{name: more, overrides: {{data: {{synthetic: {{{key.rsplit('.', 1)[1]}: {value}}}}}}}}}\n")
    with pytest.raises(ConfigError, match=r"stages\[1\] \(more\).*" + pattern):
        load_config(staged)


def test_one_field_of_a_list_item_can_be_overridden(tmp_path):
    """``data.mixture[1].weight=2`` (or ``data.mixture.1.weight=2``) changes that source's weight and keeps the
    recipe's other sources (was: "unknown config key '0' (allowed under '<root>': ...)"); a wrong index or field
    is refused naming the override."""
    r = tmp_path / "mix.yaml"
    r.write_text(TINY_ARCH.replace("synthetic: {num_samples: 8}", "synthetic: {num_samples: 0}\n  mixture:\n"
                                   "    - {name: a, shards: [a.tar], weight: 1}\n"
                                   "    - {name: b, shards: [b.tar], weight: 1}\n"))
    for key in ("data.mixture[1].weight", "data.mixture.1.weight"):
        cfg = load_config(r, [f"{key}=3", "data.mixture[0].shards=z.tar"])
        assert [(s.name, s.shards, s.weight) for s in cfg.data.mixture] == [("a", ["z.tar"], 1.0), ("b", ["b.tar"], 3.0)]
    with pytest.raises(ConfigError, match=r"'data\.mixture\[2\]\.weight=3'.*'data\.mixture' has 2 item\(s\)"):
        load_config(r, ["data.mixture[2].weight=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.mixture\[0\]\.wieght'; did you mean "
                                          r"'data\.mixture\[0\]\.weight'"):
        load_config(r, ["data.mixture[0].wieght=3"])
    with pytest.raises(ConfigError, match=r"'data\.mixture\[0\]\.weight' = 0\.0 of source 'a' must be"):
        load_config(r, ["data.mixture[0].weight=0"])


def test_a_stage_cannot_change_a_key_the_recipe_refers_to(tmp_path):
    """``${data.root}`` references are resolved once for the whole recipe: a stage's ``data.root`` reached
    ``data.root`` only, and the stage silently trained on the recipe's root's shards. Refused naming the stage key
    and the reference; a stage that sets the referring key itself, or a command-line ``data.root``, still works."""
    base = tmp_path / "base.yaml"
    base.write_text(TINY_ARCH.replace("synthetic: {num_samples: 8}", "root: /shared\n  train_shards: "
                                      "['${data.root}/a/*.tar']"))
    staged = tmp_path / "staged.yaml"
    staged.write_text("extends: base.yaml\nstages:\n  - {name: one, overrides: {}}\n"
                      "  - {name: two, overrides: {data: {root: /other}}}\n")
    want = r"'stages\[1\]\.overrides\.data\.root' \(two\): 'data\.train_shards\[0\]' refers to 'data\.root'"
    with pytest.raises(ConfigError, match=want):
        load_config(staged)
    staged.write_text("extends: base.yaml\nstages:\n  - {name: one, overrides: {}}\n"
                      "  - {name: two, overrides: {}}\n")
    with pytest.raises(ConfigError, match=want):
        load_config(staged, ["stages.two.data.root=/other"])
    cfg = load_config(staged, ["stages.two.data.train_shards=/other/a/*.tar", "data.root=/cli"])
    assert cfg.data.train_shards == ["/cli/a/*.tar"]
    assert stage_config(cfg, 1, check_paths=False).data.train_shards == ["/other/a/*.tar"]


def test_a_command_line_data_source_replaces_the_stages_sources_too(tmp_path):
    """As for the recipe (README: a command-line source replaces the recipe's), ``data.train_shards=X`` drops
    a stage's own synthetic set / mixture, and ``stages.<s>.data.train_shards=X`` switches the recipe's synthetic
    set off in that stage; before, those stages trained on X mixed with the synthetic set."""
    base = tmp_path / "base.yaml"
    base.write_text(TINY_ARCH)   # data.synthetic.num_samples: 8
    staged = tmp_path / "staged.yaml"
    staged.write_text("extends: base.yaml\nstages:\n  - {name: one, overrides: {}}\n"
                      "  - {name: two, overrides: {data: {synthetic: {num_samples: 16}}}}\n")
    cfg = load_config(staged, ["data.train_shards=/x/*.tar"])
    for i in (0, 1):
        st = stage_config(cfg, i, check_paths=False)
        assert (st.data.train_shards, st.data.synthetic.num_samples) == (["/x/*.tar"], 0), i
    cfg = load_config(staged, ["stages.one.data.train_shards=/x/*.tar"])
    one, two = (stage_config(cfg, i, check_paths=False) for i in (0, 1))
    assert (one.data.train_shards, one.data.synthetic.num_samples) == (["/x/*.tar"], 0)
    assert (two.data.train_shards, two.data.synthetic.num_samples) == ([], 16)
    # a data.synthetic.* key beside it keeps the synthetic set, as on the recipe's command line
    cfg = load_config(staged, ["stages.one.data.train_shards=/x/*.tar", "stages.one.data.synthetic.seed=5"])
    assert stage_config(cfg, 0, check_paths=False).data.synthetic.num_samples == 8


def test_a_key_set_twice_in_a_recipe_is_named(tmp_path):
    """A second ``train:`` section (appended at the end of a recipe) names the key and its line, instead of
    "is not valid YAML (line 6, column 1): ConstructorError"."""
    r = tmp_path / "dup.yaml"
    r.write_text(TINY_ARCH + "train:\n  max_steps: 7\n  grad_accum: 2\ntrain:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml sets the key 'train' twice in one mapping \(line \d+, column 1\)"):
        load_config(r)


def test_a_wrong_type_in_a_parent_recipe_names_that_file(recipe, tmp_path):
    """In an ``extends`` chain a value of the wrong type names the file that holds it (was: the key only)."""
    (tmp_path / "base.yaml").write_text(TINY_ARCH + "train: {grad_accum: abc}\n")
    with pytest.raises(ConfigError, match=r"^recipe .*base\.yaml: config key 'train\.grad_accum': .*expected an "
                                          r"integer"):
        load_config(recipe)


@pytest.mark.parametrize("text, override, outcome", [
    ("train:\n#  max_steps: 5\neval:\n", None, None),   # every key of a section commented out: sets nothing
    ("", "train=5", r"^override: config key 'train' is 5; it is a section: give its keys \(max_steps, "),
    ("data:\n  synthetic: [1]\n", None, r"recipe .*sec\.yaml: config key 'data\.synthetic' is a list; it is a "
                                         r"section"),
    ("", "stages=[{name: a, overrides: {train: 5}}]", r"stages\[0\] \(a\).*config key 'train' is 5; it is a section"),
])
def test_a_section_given_a_value_or_left_empty(recipe, tmp_path, text, override, outcome):
    """A scalar or list given for a whole section is refused naming the section and its keys (was: "Merge error:
    int is not a subclass of TrainConfig"); an empty section (its keys commented out) is accepted as setting
    nothing (was: "field 'train' is not Optional")."""
    r = tmp_path / "sec.yaml"
    r.write_text(f"extends: {recipe.name}\n{text}")
    if outcome is None:
        assert load_config(r).train.max_steps == 9
        return
    with pytest.raises(ConfigError, match=outcome):
        load_config(r, [override] if override else [])


def test_print_config_shows_a_recipe_whose_weights_are_elsewhere(capsys):
    """``rynnscale train base/qwen3_vl_8b.yaml --print-config`` off-cluster prints the resolved config, then says
    on stderr why this machine cannot train it (exit 2); before, it printed only the missing ``model.init_from``."""
    import yaml

    from rynnscale.cli import main
    assert main(["train", str(REPO / "recipes" / "base" / "qwen3_vl_8b.yaml"), "--print-config",
                 "train.max_steps=7"]) == 2
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    assert printed["train"]["max_steps"] == 7 and printed["model"]["preset"] == "qwen3-vl-8b"
    assert "'model.init_from' = 'checkpoints/hf/Qwen3-VL-8B-Instruct': no config.json there" in err


def test_the_stages_of_a_chain_get_run_names_of_their_own(tmp_path):
    """Both stages of a chain (SFT, then GRPO) logged to wandb under the recipe's one ``run.name``: two runs of one
    name, each counting steps from 1, that a comparison could not tell apart. Each stage is ``<run.name>/<stage>``
    now, unless the stage names itself."""
    base = tmp_path / "base.yaml"
    base.write_text(TINY_ARCH)
    staged = tmp_path / "staged.yaml"
    staged.write_text("extends: base.yaml\nrun: {name: chain, output_dir: " + str(tmp_path / "out") + "}\n"
                      "stages:\n  - {name: sft, overrides: {}}\n  - {name: grpo, overrides: {}}\n"
                      "  - {name: extra, overrides: {run: {name: mine}}}\n")
    names = [stage_config(load_config(staged), i, check_paths=False).run.name for i in range(3)]
    assert names == ["chain/sft", "chain/grpo", "mine"]
    cfg = load_config(staged, ["run.name=''"])   # no name: the chain's folder names it
    assert stage_config(cfg, 0, check_paths=False).run.name == "out/sft"
