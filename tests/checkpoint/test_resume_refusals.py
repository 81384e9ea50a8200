"""What a resume must refuse (issue 27): another architecture (every differing field named, old -> new; fields
that are not architecture may change), tensors whose saved shape does not fit the model (named, both shapes), and
a ``trainer_state.json`` / rank file with a field of the wrong type or range (file and field named). Single
process, tiny model (``ckpt_worker``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import ckpt_worker as w
import pytest
import torch

from rynnscale.checkpoint.dcp import CheckpointError, config_changes, load_checkpoint
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A 4-layer tiny MoE checkpoint after 2 steps; its trainer_state records the raw config it was built from."""
    out = tmp_path_factory.mktemp("arch")
    torch.manual_seed(0)
    w.run(out, 2, save_at=(2,), hf_config=w.tiny_hf_config(layers=4))
    return out / "checkpoints" / "step_000002"


def _normalize(d: dict) -> dict:
    return Qwen3VLArgs.from_hf_config(d).to_hf_config()   # what the trainer passes


def _load(ckpt: Path, hf_config: dict, **kw):
    model = w.build_model(hf_config)
    opt, sched = w.build_optim(model, 4)
    return load_checkpoint(ckpt, model, opt, sched, model_config=_normalize(hf_config),
                           normalize_model_config=_normalize, **kw)


def _edit(change) -> dict:
    cfg = copy.deepcopy(w.tiny_hf_config(layers=4))
    change(cfg)
    return cfg


ARCH_CHANGES = {
    "fewer layers": (lambda c: c["text_config"].update(num_hidden_layers=2), "text_config.num_hidden_layers: 4 -> 2"),
    "rope_theta": (lambda c: c["text_config"]["rope_parameters"].update(rope_theta=20000.0),
                   "text_config.rope_parameters.rope_theta: 10000.0 -> 20000.0"),
    "top-k": (lambda c: c["text_config"].update(num_experts_per_tok=1), "text_config.num_experts_per_tok: 2 -> 1"),
    "mrope sections": (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[2, 1, 1]),
                       "text_config.rope_parameters.mrope_section: [1, 1, 2] -> [2, 1, 1]"),
    "rms eps": (lambda c: c["text_config"].update(rms_norm_eps=1e-5), "text_config.rms_norm_eps: 1e-06 -> 1e-05"),
    "tied head": (lambda c: c.update(tie_word_embeddings=True), "tie_word_embeddings: false -> true"),
    "vision depth": (lambda c: c["vision_config"].update(depth=2, deepstack_visual_indexes=[1]),
                     "vision_config.depth: 1 -> 2"),
    "token id": (lambda c: c.update(image_token_id=w.VOCAB - 7), f"image_token_id: {w.VOCAB - 6} -> {w.VOCAB - 7}"),
}


@pytest.mark.parametrize("name", list(ARCH_CHANGES))
def test_resume_onto_another_architecture_is_refused_naming_the_field(saved, name):
    change, message = ARCH_CHANGES[name]
    with pytest.raises(CheckpointError, match="another model architecture") as e:
        _load(saved, _edit(change))
    assert message in str(e.value) and str(saved) in str(e.value)


def test_every_differing_field_is_named_at_once(saved):
    def change(c):
        c["text_config"].update(num_hidden_layers=2, num_experts_per_tok=1)
        c["text_config"]["rope_parameters"].update(rope_theta=1e6)
    with pytest.raises(CheckpointError, match=r"\(3 field\(s\)") as e:
        _load(saved, _edit(change))
    for field in ("num_hidden_layers: 4 -> 2", "num_experts_per_tok: 2 -> 1", "rope_theta: 10000.0 -> 1000000.0"):
        assert field in str(e.value)


def test_non_architectural_fields_and_defaults_may_differ(saved):
    """A loss weight and HF bookkeeping may change; a key the checkpoint left at its default is no change."""
    def change(c):
        c["text_config"].update(router_aux_loss_coef=0.05, hidden_act="silu", attention_bias=False)
        c.update(transformers_version="9.9.9", dtype="bfloat16")
    rs = _load(saved, _edit(change))
    assert rs.step == 2 and rs.exact


def test_config_changes_is_generic_over_nested_configs():
    old = {"model_type": "qwen3_5", "text_config": {"layer_types": ["linear", "full"], "linear_num_heads": 16,
                                                    "transformers_version": "1"}, "flag": True}
    new = {"model_type": "qwen3_5", "text_config": {"layer_types": ["full", "full"], "linear_num_heads": 16.0,
                                                    "transformers_version": "2", "gate": 1}, "flag": 1}
    assert config_changes(old, new) == ['flag: true -> 1', 'text_config.gate: (absent) -> 1',
                                        'text_config.layer_types: ["linear", "full"] -> ["full", "full"]']


def test_shape_mismatch_names_the_tensor_and_both_shapes(saved):
    """Without a model config to compare (a caller that passes none), a tensor that does not fit is still named."""
    model = w.build_model(w.tiny_hf_config(layers=4, inter=96))
    with pytest.raises(CheckpointError, match=r"model\.model\.language_model\.layers\.0\.mlp\.gate_proj\.weight is "
                                              r"\[64, 32\] in the checkpoint but \[96, 32\] in the model"):
        load_checkpoint(saved, model)


# ------------------------------------------------------------------------------------------ trainer_state.json
def _corrupt(saved: Path, tmp_path: Path, name: str, edit) -> Path:
    import shutil

    ckpt = tmp_path / "step_000002"
    shutil.copytree(saved, ckpt)
    f = ckpt / name
    data = json.loads(f.read_text())
    edit(data)
    f.write_text(json.dumps(data))
    return ckpt


BAD_STATE = {
    "negative step": (lambda d: d.update(step=-5), "'step' = -5"),
    "string step": (lambda d: d.update(step="abc"), "'step' = 'abc'"),
    "float step": (lambda d: d.update(step=2.5), "'step' = 2.5"),
    "bool step": (lambda d: d.update(step=True), "'step' = True"),
    "missing step": (lambda d: d.pop("step"), "'step' is missing"),
    "negative tokens": (lambda d: d.update(tokens_seen=-1), "'tokens_seen' = -1"),
    "zero world": (lambda d: d.update(world_size=0), "'world_size' = 0"),
    "layout list": (lambda d: d.update(layout=[1]), "'layout' = [1]"),
    "extra null": (lambda d: d.update(extra=None), "'extra' = None"),
    "scheduler string": (lambda d: d.update(scheduler="cosine"), "'scheduler' = 'cosine'"),
    "model_config list": (lambda d: d.update(model_config=[]), "'model_config' = []"),
    "saved_at string": (lambda d: d.update(saved_at="yesterday"), "'saved_at' = 'yesterday'"),
    "format string": (lambda d: d.update(format_version="1"), "'format_version' = '1'"),
}


@pytest.mark.parametrize("name", list(BAD_STATE))
def test_invalid_trainer_state_field_is_refused_naming_file_and_field(saved, tmp_path, name):
    edit, message = BAD_STATE[name]
    ckpt = _corrupt(saved, tmp_path, "trainer_state.json", edit)
    with pytest.raises(CheckpointError) as e:
        _load(ckpt, w.tiny_hf_config(layers=4))
    assert str(ckpt / "trainer_state.json") in str(e.value) and message in str(e.value), str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(step=1), "'step' = 1 but"),
    (lambda d: d.update(rank=3), "'rank' = 3 but"),
    (lambda d: d.update(state=[]), "'state' = '[]' must be a JSON object"),
])
def test_invalid_rank_file_is_refused_naming_file_and_field(saved, tmp_path, edit, message):
    ckpt = _corrupt(saved, tmp_path, "rank_00000.json", edit)
    with pytest.raises(CheckpointError) as e:
        _load(ckpt, w.tiny_hf_config(layers=4))
    assert str(ckpt / "rank_00000.json") in str(e.value) and message in str(e.value), str(e.value)
