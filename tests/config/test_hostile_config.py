"""Recipes under hostile input (issue 17): non-finite / out-of-range numbers, ``extends`` of a non-recipe
file, omegaconf resolver interpolations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rynnscale.config import ConfigError, load_config
from rynnscale.config.schema import RootConfig

REPO = Path(__file__).resolve().parents[2]
TINY = """
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
    p = tmp_path / "r.yaml"
    p.write_text(TINY)
    return p


# ---------------------------------------------------------------------------------------- 6. numbers
def _float_keys(cls=RootConfig, prefix=""):
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            yield from _float_keys(f.default_factory, f"{prefix}{f.name}.")
        elif f.type in ("float", float):
            yield f"{prefix}{f.name}"


FLOAT_KEYS = sorted(_float_keys())


def test_schema_has_float_keys():
    assert "optim.lr" in FLOAT_KEYS and "parallel.timeout_s" in FLOAT_KEYS and len(FLOAT_KEYS) > 15


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
def test_every_float_key_must_be_finite(recipe, key, bad):
    with pytest.raises(ConfigError, match=rf"'{key}' = .* must be a finite number"):
        load_config(recipe, [f"{key}={bad}"], check_paths=False)


@pytest.mark.parametrize("override,match", [
    ("optim.beta2=1.5", "'optim.beta2' = 1.5 must be in"),
    ("data.shuffle_buffer=-3", "'data.shuffle_buffer' = -3 must be >= 0"),
    ("data.num_workers=-1", "'data.num_workers' = -1 must be >= 0"),
    ("data.video_fps=0", "'data.video_fps' = 0.0 must be > 0"),
    ("data.video_max_frames=0", "'data.video_max_frames' = 0 must be >= 1"),
    ("data.image_min_pixels=99999999", "'data.image_min_pixels' = 99999999 must be <="),
    ("train.max_nonfinite_steps=0", "'train.max_nonfinite_steps' = 0 must be >= 1"),
    ("train.max_steps=99999999999999999999", "out of range"),
    ("optim.weight_decay=-0.1", "'optim.weight_decay' = -0.1 must be >= 0"),
])
def test_numbers_out_of_range(recipe, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, [override], check_paths=False)


def test_list_sections_are_checked(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(TINY.replace("data:\n  synthetic: {num_samples: 8}",
                              "data:\n  mixture: [{name: a, shards: [x.tar], weight: .inf}]"))
    with pytest.raises(ConfigError, match=r"'data.mixture\[0\].weight' = inf must be a finite number"):
        load_config(p, check_paths=False)


def test_shipped_recipes_still_validate():
    recipes = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if not p.name.startswith("_"))
    assert recipes
    for r in recipes:
        load_config(r, check_paths=False)


# ---------------------------------------------------------------------------------------- 9. extends / resolvers
SECRET = "root:x:0:0:TOPSECRET-CONTENT:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


@pytest.mark.parametrize("content", [SECRET, "- TOPSECRET-CONTENT\n- b\n", "TOPSECRET-CONTENT: [unclosed\n",
                                     "a: b: TOPSECRET-CONTENT\n", "TOPSECRET-CONTENT\n"])
def test_extends_of_a_non_recipe_file_names_it_without_echoing(tmp_path, content):
    secret = tmp_path / "passwd"
    secret.write_text(content)
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {secret}\n" + TINY)
    with pytest.raises(ConfigError) as ei:
        load_config(child, check_paths=False)
    msg = str(ei.value)
    assert str(secret) in msg and "not a valid recipe mapping" in msg, msg
    assert "TOPSECRET" not in msg and "root:x" not in msg, msg


def test_extends_etc_passwd(tmp_path):
    if not Path("/etc/passwd").is_file():
        pytest.skip("no /etc/passwd")
    child = tmp_path / "child.yaml"
    child.write_text("extends: /etc/passwd\n" + TINY)
    with pytest.raises(ConfigError) as ei:
        load_config(child, check_paths=False)
    assert "/etc/passwd" in str(ei.value) and "/bin/" not in str(ei.value) and "nologin" not in str(ei.value)


@pytest.mark.parametrize("expr", ["${oc.env:HOME}", "${oc.env:HOME,x}", "${ oc.decode:'1'}", "a/${oc.env:PATH}/b",
                                  "${oc.create:{a: 1}}", "${my_custom:1}"])
def test_resolver_interpolations_are_refused_naming_the_key(tmp_path, monkeypatch, expr):
    monkeypatch.setenv("HOME", "/home/SECRET-HOME")
    p = tmp_path / "r.yaml"
    p.write_text(TINY + f"run:\n  name: \"{expr}\"\n")
    with pytest.raises(ConfigError, match=r"config key 'run.name' uses the interpolation resolver"):
        load_config(p, check_paths=False)
    p.write_text(TINY)
    with pytest.raises(ConfigError, match=r"override: config key 'run.output_dir.*uses the interpolation resolver"):
        load_config(p, [f"run.output_dir={expr}"], check_paths=False)


def test_resolver_in_a_list_is_refused(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(TINY.replace("data:\n  synthetic: {num_samples: 8}",
                              "data:\n  train_shards: [a.tar, '${oc.env:HOME}/b.tar']"))
    with pytest.raises(ConfigError, match=r"'data.train_shards\[1\]' uses the interpolation resolver 'oc.env'"):
        load_config(p, check_paths=False)


def test_plain_references_still_work(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(TINY.replace("data:\n  synthetic: {num_samples: 8}",
                              "data:\n  root: /data\n  train_shards: ['${data.root}/a-{0..1}.tar']") +
                 "run:\n  name: run-${train.max_steps}\n")
    cfg = load_config(p, check_paths=False)
    assert cfg.data.train_shards == ["/data/a-{0..1}.tar"] and cfg.run.name == "run-100"


# ------------------------------------------------------------------------------ structure (not TypeError)
@pytest.mark.parametrize("override, match", [
    ("model.arch=[1]", r"config key 'model\.arch' is a list; expected a mapping"),
    ("rl.reward.weights=[1]", r"config key 'rl\.reward\.weights' is a list; expected a mapping"),
    ("rl.reward.functions=3", r"config key 'rl\.reward\.functions' is 3; expected a mapping"),
    ("stages=[{name: a, overrides: [1]}]", r"config key 'stages\[0\]\.overrides' is a list; expected a mapping"),
    ("stages=[{name: a, overrides: {model: {arch: [1]}}}]", r"stages\[0\]\.overrides.*'model\.arch' is a list"),
])
def test_a_list_or_scalar_for_a_mapping_names_the_key(recipe, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, [override])


@pytest.mark.parametrize("extends", ["5", "{x: base.yaml}", "[base.yaml, 3]", "[]"])
def test_extends_must_be_a_path_or_a_list_of_paths(tmp_path, extends):
    (tmp_path / "base.yaml").write_text(TINY)
    (tmp_path / "child.yaml").write_text(f"extends: {extends}\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: 'extends:' must be a recipe path or a list of them"):
        load_config(tmp_path / "child.yaml")


def test_a_list_for_a_mapping_in_a_recipe_file_names_the_key(tmp_path):
    (tmp_path / "base.yaml").write_text(TINY)
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmodel: {arch: [1]}\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: config key 'model\.arch' is a list"):
        load_config(tmp_path / "child.yaml")


@pytest.mark.parametrize("override, key", [("model.compile=2", "model.compile"),
                                           ("checkpoint.export_hf=-1", "checkpoint.export_hf"),
                                           ("logging.progress=0", "logging.progress")])
def test_a_number_for_a_boolean_is_refused(recipe, tmp_path, override, key):
    """omegaconf reads 2 as true and 0 as false: a number given for a boolean is refused, naming the key."""
    with pytest.raises(ConfigError, match=rf"'{key}' = -?\d is a number; expected true or false"):
        load_config(recipe, [override])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {recipe}\nlogging: {{progress: 1}}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: config key 'logging\.progress' = 1 is a number"):
        load_config(bad)


def test_keep_last_0_keeps_every_checkpoint(recipe):
    assert load_config(recipe, ["checkpoint.keep_last=0"]).checkpoint.keep_last == 0
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last' = -1 must be >= 0"):
        load_config(recipe, ["checkpoint.keep_last=-1"])
