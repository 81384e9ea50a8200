"""Newcomer paths through the config (issue 15): one string where a list of paths is expected, wrong types
answered with what to write, and a command-line data source replacing the recipe's."""

from __future__ import annotations

from pathlib import Path

import pytest

from rynnscale.config.load import load_config
from rynnscale.config.schema import ConfigError

DEMO = Path(__file__).resolve().parents[2] / "recipes" / "demo_tiny.yaml"


@pytest.mark.parametrize("key, value", [
    ("data.train_shards", "/data/x/*.tar"), ("eval.shards", "/data/held/{000..003}.tar"),
    ("model.freeze", "model.visual.*"), ("model.lora.targets", "*.q_proj"), ("model.lora.trainable", "lm_head.*"),
])
def test_one_string_is_a_one_element_list_on_the_command_line(key: str, value: str) -> None:
    cfg = load_config(DEMO, [f"{key}={value}", "data.synthetic.num_samples=0"] +
                      (["data.train_shards=a.tar"] if key != "data.train_shards" else []) +
                      (["model.lora.rank=4"] if key.startswith("model.lora.") else []), check_paths=False)
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == [value]


def test_one_string_in_a_recipe_and_in_a_mixture_source(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {DEMO}\ndata:\n  synthetic: {{num_samples: 0}}\n  mixture:\n"
                      "    - {name: a, shards: /data/a/*.tar}\n    - {name: b, shards: [/data/b.tar], weight: 2}\n"
                      "model:\n  freeze: model.visual.*\n")
    cfg = load_config(recipe, check_paths=False)
    assert [m.shards for m in cfg.data.mixture] == [["/data/a/*.tar"], ["/data/b.tar"]]
    assert cfg.model.freeze == ["model.visual.*"]


def test_interpolated_string_stays_an_interpolation(tmp_path: Path) -> None:
    cfg = load_config(DEMO, ["data.root=/srv/d", "data.train_shards=${data.root}/s-*.tar",
                             "data.synthetic.num_samples=0"], check_paths=False)
    assert cfg.data.train_shards == ["/srv/d/s-*.tar"]


@pytest.mark.parametrize("override, expect", [
    ("data.mixture=abc", r"config key 'data.mixture'.*list of mappings.*e\.g\..*name:.*shards:"),
    ("train.max_steps=abc", r"config key 'train.max_steps'.*expected an integer.*e\.g\. train\.max_steps=100"),
    ("optim.lr=fast", r"config key 'optim.lr'.*expected a number.*e\.g\. optim\.lr="),
    ("model.compile=maybe", r"config key 'model.compile'.*expected true or false"),
    ("data.train_shards={a: 1}", r"config key 'data.train_shards'.*list of strings.*e\.g\. data\.train_shards="),
])
def test_wrong_type_says_what_to_write(override: str, expect: str) -> None:
    with pytest.raises(ConfigError, match=expect):
        load_config(DEMO, [override], check_paths=False)


# ----------------------------------------------------------------------------- command-line data replaces the recipe's


def test_command_line_train_shards_replace_the_recipes_synthetic_set(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="rynnscale.config.load"):
        cfg = load_config(DEMO, ["data.train_shards=/data/x"], check_paths=False)
    assert cfg.data.train_shards == ["/data/x"] and cfg.data.synthetic.num_samples == 0
    lines = [r.getMessage() for r in caplog.records if "replaces the recipe" in r.getMessage()]
    assert len(lines) == 1 and "data.synthetic.num_samples" in lines[0] and "2000" in lines[0], lines


def test_command_line_synthetic_keys_keep_the_synthetic_set() -> None:
    cfg = load_config(DEMO, ["data.train_shards=/data/x", "data.synthetic.frames=2"], check_paths=False)
    assert cfg.data.synthetic.num_samples == 2000 and cfg.data.synthetic.frames == 2
    cfg = load_config(DEMO, ["data.train_shards=/data/x", "data.synthetic.num_samples=10"], check_paths=False)
    assert cfg.data.synthetic.num_samples == 10


def test_recipe_data_without_command_line_data_is_kept() -> None:
    assert load_config(DEMO, ["train.max_steps=3"], check_paths=False).data.synthetic.num_samples == 2000


def test_command_line_mixture_replaces_recipe_train_shards_and_back(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {DEMO}\ndata:\n  train_shards: [/data/recipe.tar]\n")
    cfg = load_config(recipe, ["data.mixture=[{name: a, shards: /data/a}]"], check_paths=False)
    assert cfg.data.train_shards == [] and cfg.data.synthetic.num_samples == 0
    assert [m.shards for m in cfg.data.mixture] == [["/data/a"]]
    recipe.write_text(f"extends: {DEMO}\ndata:\n  mixture: [{{name: r, shards: [/data/r]}}]\n")
    cfg = load_config(recipe, ["data.train_shards=/data/x"], check_paths=False)
    assert cfg.data.mixture == [] and cfg.data.train_shards == ["/data/x"]


def test_a_mixture_with_the_synthetic_set_is_refused_naming_both_keys() -> None:
    """A mixture draws from its sources only: the synthetic set beside it would be generated and then refused by
    the loader with a traceback."""
    with pytest.raises(ConfigError, match=r"'data\.mixture' or the synthetic set \('data\.synthetic\.num_samples' = "
                                          r"20\).*rynnscale data synth"):
        load_config(DEMO, ["data.mixture=[{name: a, shards: /data/a}]", "data.synthetic.num_samples=20"],
                    check_paths=False)


@pytest.mark.parametrize("override, match", [
    ("data.train_shards=['']", r"'data\.train_shards' = \[''\] has an empty pattern"),
    ("data.mixture=[{name: a, shards: ['']}]", r"'data\.mixture\[0\]\.shards' = .* \(none of them empty\)"),
    ("rl.prompts=['', a.tar]", r"'rl\.prompts' = \['', 'a\.tar'\] has an empty pattern"),
    ("eval.shards=['']", r"'eval\.shards' = \[''\] has an empty pattern"),
])
def test_an_empty_shard_pattern_is_refused_everywhere(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(DEMO, [override], check_paths=False)


# ----------------------------------------------------------------------------- recipe files


def test_yaml_python_tag_is_refused_naming_the_file(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"run:\n  name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"recipe .*evil\.yaml uses the YAML tag 'tag:yaml.org,2002:python/object"
                                          r"/apply:os.system' \(line 2, column 9\): tags are not allowed"):
        load_config(recipe, check_paths=False)
    assert not marker.exists()
    with pytest.raises(ConfigError, match=r"override .run\.name=!!python.*ConstructorError"):
        load_config(DEMO, [f"run.name=!!python/object/apply:os.system ['touch {marker}']"], check_paths=False)
    assert not marker.exists()


def test_missing_parent_names_the_recipe_that_extends_it(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("extends: parents/base.yaml\nrun: {name: x}\n")
    with pytest.raises(ConfigError, match=r"recipe .*parents/base\.yaml \(named by 'extends:' in .*child\.yaml\) "
                                          r"does not exist; 'extends:' paths are relative"):
        load_config(child, check_paths=False)
