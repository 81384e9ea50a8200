"""Hugging Face import / export (rynnscale.checkpoint.hf) against transformers as the oracle.

Tiny random Qwen3-VL (dense) and Qwen3-VL-MoE models with a vision tower, CPU fp32. Sources are
written by transformers' own ``save_pretrained``; exports are read back by transformers'
``from_pretrained``; the target model is transformers' module (same names as ours) and, once
``rynnscale.models.qwen3_vl.model`` exists, also our model.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from shared_data import SHARED_DATA

from rynnscale.checkpoint.hf import (
    INDEX_FILE,
    LAYOUT_METADATA_KEY,
    HFCheckpointError,
    export_hf,
    export_model,
    hf_param_shapes,
    load_hf_weights,
    read_hf_config,
)

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForImageTextToText,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

OUR_MODEL = importlib.util.find_spec("rynnscale.models.qwen3_vl.model") is not None
HIDDEN = 32
EXPERT_NAMES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


# ------------------------------------------------------------------------------------------ helpers
def tiny_config(moe: bool, *, tie: bool = False, moe_inter: int = 24):
    """A transformers config: 3 text layers (MoE: layer 1 dense via mlp_only_layers), 2 vision blocks."""
    text = dict(vocab_size=256, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=moe_inter, mlp_only_layers=[1])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=HIDDEN,
                  num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return cls(text_config=text, vision_config=vision, image_token_id=250, video_token_id=251,
               vision_start_token_id=252, vision_end_token_id=253, tie_word_embeddings=tie)


def hf_model(config, seed: int):
    """transformers model with every tensor perturbed, so no loaded value can equal its init by chance."""
    torch.manual_seed(seed)
    cls = Qwen3VLMoeForConditionalGeneration if config.model_type == "qwen3_vl_moe" else Qwen3VLForConditionalGeneration
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def our_model(config, seed: int):
    from rynnscale.models.qwen3_vl.args import Qwen3VLArgs
    from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration as Ours

    torch.manual_seed(seed)
    return Ours(Qwen3VLArgs.from_hf_config(config.to_dict())).eval()


TARGETS = ["hf", pytest.param("ours", marks=pytest.mark.skipif(
    not OUR_MODEL, reason="rynnscale/models/qwen3_vl/model.py does not exist yet"))]


def make_target(kind: str, config, seed: int = 1):
    return hf_model(config, seed) if kind == "hf" else our_model(config, seed)


def assert_same_state(model, reference: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(reference)
    bad = [k for k in reference if not torch.equal(got[k], reference[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor], config_update: dict | None = None) -> Path:
    """A copy of checkpoint ``src`` with ``tensors`` as its single model.safetensors."""
    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_update or {})
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def to_hub_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.transpose(1, 2) if k.endswith(EXPERT_NAMES) else v) for k, v in sd.items()}


def text_logits(model, seed: int = 3) -> torch.Tensor:
    """Logits [2, 11, V] of two random text sequences: HF batched, ours as one packed row of 2 samples."""
    torch.manual_seed(seed)
    input_ids = torch.randint(0, 240, (2, 11))
    with torch.no_grad():
        if isinstance(model, transformers.PreTrainedModel):
            return model(input_ids=input_ids, use_cache=False).logits
        from rynnscale.batch import PackedBatch

        pos_l = torch.arange(11).repeat(2)  # text-only MRoPE: t = h = w, restarting per sample
        batch = PackedBatch(input_ids_l=input_ids.flatten(), labels_l=torch.full((22,), -100),
                            position_ids_3l=pos_l.expand(3, -1).clone(),
                            cu_seqlens=torch.tensor([0, 11, 22], dtype=torch.int32), max_seqlen=11)
        return model.logits(model(batch).hidden_ld).view(2, 11, -1)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """transformers save_pretrained dirs: name -> (dir, config, state_dict, logits)."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    for name, moe, tie, shard in [("dense", False, False, None), ("dense_tied", False, True, None),
                                  ("moe_sharded", True, False, "60KB")]:
        cfg = tiny_config(moe, tie=tie)
        model = hf_model(cfg, seed=0)
        d = root / name
        model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        out[name] = (d, cfg, snapshot(model), text_logits(model))
    return out


# --------------------------------------------------------------------------------- config + shapes
@pytest.mark.parametrize("moe", [False, True])
def test_hf_param_shapes_match_transformers(moe):
    cfg = tiny_config(moe, tie=True)
    model = hf_model(cfg, seed=0)
    from rynnscale.models.qwen3_vl.args import Qwen3VLArgs
    args = Qwen3VLArgs.from_hf_config(cfg.to_dict())
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert hf_param_shapes(args, include_tied=True) == want
    assert "lm_head.weight" not in hf_param_shapes(args)


def test_read_hf_config(sources, tmp_path):
    d, cfg, _, _ = sources["moe_sharded"]
    args, raw = read_hf_config(d)
    assert args.text.num_experts == 4 and args.text.mlp_only_layers == [1] and args.vision.depth == 2
    assert raw["model_type"] == "qwen3_vl_moe"
    assert read_hf_config(d / "config.json")[0] == args
    with pytest.raises(HFCheckpointError, match="config.json: no such file"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HFCheckpointError, match="model_type='llama' is not supported"):
        read_hf_config(tmp_path)
    quantized = json.loads((d / "config.json").read_text())
    quantized["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "config.json").write_text(json.dumps(quantized))
    with pytest.raises(HFCheckpointError, match="quantized checkpoints are not supported"):
        read_hf_config(tmp_path)


# ---------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", ["dense", "dense_tied", "moe_sharded"])
def test_load_save_pretrained(sources, source, target):
    d, cfg, ref, _ = sources[source]
    if source == "moe_sharded":
        index = json.loads((d / INDEX_FILE).read_text())
        assert len(set(index["weight_map"].values())) >= 3, "fixture should be sharded"
    model = make_target(target, cfg)
    report = load_hf_weights(model, d)
    assert_same_state(model, ref)
    if source == "dense_tied":
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
        assert report.tied == ["lm_head.weight"]
    if source == "moe_sharded":
        assert report.expert_layout == {"v5": 4} and report.transposed == []
    assert report.num_tensors == len(ref) - (source == "dense_tied")


def test_tied_config_over_a_differing_stored_head_is_refused(sources, tmp_path):
    """config.json ties embeddings but the checkpoint stores an lm_head that differs from the embedding (an untied
    fine-tune whose flag was kept): transformers then uses both; we refuse naming both tensors and the difference,
    rather than dropping the head. Equal stored copies load, tied."""
    d, cfg, ref, _ = sources["dense"]   # untied: lm_head differs from embed_tokens
    embed = "model.language_model.embed_tokens.weight"
    bad = rewrite(d, tmp_path / "differ", ref, {"tie_word_embeddings": True})
    tied_cfg = tiny_config(False, tie=True)
    model = hf_model(tied_cfg, seed=1)
    before = snapshot(model)
    with pytest.raises(HFCheckpointError, match=rf"{embed} / lm_head\.weight: max\|lm_head\.weight - {embed}\| = "
                                                r"[0-9.e+-]+ \(max\|"):
        load_hf_weights(model, bad)
    assert_same_state(model, before)
    same = rewrite(d, tmp_path / "same", {**ref, "lm_head.weight": ref[embed].clone()}, {"tie_word_embeddings": True})
    report = load_hf_weights(model, same)
    assert report.tied == ["lm_head.weight"] and model.lm_head.weight is model.model.language_model.embed_tokens.weight


def test_tie_flag_is_read_from_the_top_level_only(sources, tmp_path):
    """A VL config.json with text_config.tie_word_embeddings=true and no top-level key: transformers does not tie
    (top-level default false), so neither do we; a tied model then fails naming what config.json actually says."""
    from rynnscale.models.qwen3_vl.args import Qwen3VLArgs

    d, cfg, ref, _ = sources["dense"]
    raw = json.loads((d / "config.json").read_text())
    raw.pop("tie_word_embeddings", None)
    raw["text_config"]["tie_word_embeddings"] = True
    assert transformers.AutoConfig.for_model(**raw).tie_word_embeddings is False
    assert Qwen3VLArgs.from_hf_config(raw).tie_word_embeddings is False
    src = tmp_path / "textonly_tie"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(raw))
    shutil.copy(d / "model.safetensors", src / "model.safetensors")
    model = hf_model(tiny_config(False, tie=True), seed=1)
    with pytest.raises(HFCheckpointError, match="config.json sets no top-level tie_word_embeddings"):
        load_hf_weights(model, src)


@pytest.mark.parametrize("target", TARGETS)
def test_load_meta_built_model(sources, target):
    d, cfg, ref, _ = sources["dense_tied"]
    with torch.device("meta"):
        model = make_target(target, cfg)
    with pytest.raises(HFCheckpointError, match="meta device"):
        load_hf_weights(model, d)
    model.to_empty(device="cpu")
    if target == "hf":
        # nn.Module.to_empty unties lm_head: the loader must say so, not leave it random
        with pytest.raises(HFCheckpointError, match="re-tie it after to_empty"):
            load_hf_weights(model, d)
        model.tie_weights()
    else:
        # ours re-ties inside to_empty
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    load_hf_weights(model, d)
    assert_same_state(model, ref)


def test_load_bare_base_model_prefix(sources, tmp_path):
    """A Qwen3VLModel save (keys visual.* / language_model.*, transformers' base_model_prefix rule)."""
    _, cfg, ref, _ = sources["dense_tied"]
    src = hf_model(cfg, seed=0)
    src.model.save_pretrained(tmp_path / "bare")
    assert all(not k.startswith("model.") for k in load_file(tmp_path / "bare" / "model.safetensors"))
    model = hf_model(cfg, seed=1)
    report = load_hf_weights(model, tmp_path / "bare")
    assert report.renamed == len(ref) - 1
    assert_same_state(model, ref)


def test_load_dtype_reallocates(sources):
    d, cfg, ref, _ = sources["dense_tied"]
    model = hf_model(cfg, seed=1)
    report = load_hf_weights(model, d, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    got = model.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    assert all(torch.equal(got[k], ref[k].to(torch.bfloat16)) for k in ref)
    assert sum(report.dtype_casts.values()) == report.num_tensors


@pytest.mark.parametrize("target", TARGETS)
def test_load_hub_expert_layout(sources, tmp_path, target):
    """Released Qwen3-VL-MoE layout (experts [E, H, 2I] / [E, I, H], written by transformers 4.57)."""
    d, cfg, ref, _ = sources["moe_sharded"]
    hub = rewrite(d, tmp_path / "hub", to_hub_layout(ref), {"transformers_version": "4.57.1"})
    with safe_open(hub / "model.safetensors", "pt") as f:  # really the hub shapes: E=4, H=32, I=24
        assert f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape() == [4, 32, 48]
    model = make_target(target, cfg)
    report = load_hf_weights(model, hub)
    assert report.expert_layout == {"hub": 4} and len(report.transposed) == 4
    assert_same_state(model, ref)
    # the oracle reads the same file to the same experts
    assert_same_state(AutoModelForImageTextToText.from_pretrained(hub), ref)


def test_square_expert_layout_uses_declaration(tmp_path):
    """H == 2I: gate_up_proj has the same shape in both layouts, only the declaration can decide."""
    cfg = tiny_config(True, moe_inter=HIDDEN // 2)
    src = hf_model(cfg, seed=0)
    src.save_pretrained(tmp_path / "v5")
    ref = snapshot(src)
    gate_up = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert ref[gate_up].shape[1] == ref[gate_up].shape[2]
    hub_sd = to_hub_layout(ref)

    declared = rewrite(tmp_path / "v5", tmp_path / "hub457", hub_sd, {"transformers_version": "4.57.1"})
    model = hf_model(cfg, seed=1)
    load_hf_weights(model, declared)
    assert_same_state(model, ref)

    undeclared = rewrite(tmp_path / "v5", tmp_path / "undeclared", hub_sd, {"transformers_version": None})
    model = hf_model(cfg, seed=1)
    before = snapshot(model)
    with pytest.raises(HFCheckpointError, match="square expert tensors") as e:
        load_hf_weights(model, undeclared)
    assert gate_up in str(e.value) and "down_proj" not in str(e.value)
    assert_same_state(model, before)  # refused before writing anything
    load_hf_weights(model, undeclared, expert_layout="hub")
    assert_same_state(model, ref)

    # declared v5 (transformers 5 writer) but the non-square down_proj says hub: declaration untrusted
    lying = rewrite(tmp_path / "v5", tmp_path / "lying", hub_sd, {"transformers_version": "5.24.0"})
    with pytest.raises(HFCheckpointError, match="contradicts the layout 'v5'"):
        load_hf_weights(hf_model(cfg, seed=1), lying)

    # our export declares its layout in shard metadata and transformers 5 reads it too
    from rynnscale.models.qwen3_vl.args import Qwen3VLArgs
    args = Qwen3VLArgs.from_hf_config(cfg.to_dict())
    export_hf(ref.items(), args, tmp_path / "exported")
    with safe_open(tmp_path / "exported" / "model.safetensors", "pt") as f:
        assert f.metadata()[LAYOUT_METADATA_KEY] == "v5"
    model = hf_model(cfg, seed=1)
    load_hf_weights(model, tmp_path / "exported")
    assert_same_state(model, ref)
    assert_same_state(AutoModelForImageTextToText.from_pretrained(tmp_path / "exported"), ref)
    with pytest.raises(HFCheckpointError, match="expert_layout='hub' with square"):
        export_hf(ref.items(), args, tmp_path / "hub_refused", expert_layout="hub")
    assert not (tmp_path / "hub_refused").exists()


def test_load_errors_list_every_name(sources, tmp_path):
    d, cfg, ref, _ = sources["moe_sharded"]
    sd = dict(ref)
    down = "model.language_model.layers.2.mlp.experts.down_proj"
    qnorm = "model.language_model.layers.0.self_attn.q_norm.weight"
    del sd[down]
    sd["model.language_model.layers.0.mlp.extra.weight"] = torch.zeros(3)
    sd[qnorm] = torch.zeros(7)
    bad = rewrite(d, tmp_path / "bad", sd)
    model = hf_model(cfg, seed=1)
    before = snapshot(model)
    with pytest.raises(HFCheckpointError) as e:
        load_hf_weights(model, bad)
    msg = str(e.value)
    assert f"lacks (1): {down}" in msg
    assert "does not have (1): model.language_model.layers.0.mlp.extra.weight" in msg
    assert f"{qnorm}: checkpoint [7] vs model [8]" in msg
    assert_same_state(model, before)

    # a dense checkpoint into the MoE model: long lists are truncated with a count
    with pytest.raises(HFCheckpointError, match=r"lacks \(6\).*\n.*does not have \(6\)") as e:
        load_hf_weights(model, sources["dense"][0])
    assert "expert" in str(e.value)

    # long lists are cut to 20 names plus a count
    only_norm = {"model.language_model.norm.weight": ref["model.language_model.norm.weight"]}
    n_missing = len(ref) - 1
    with pytest.raises(HFCheckpointError, match=rf"lacks \({n_missing}\): [^\n]*, \.\.\. and {n_missing - 20} more"):
        load_hf_weights(model, rewrite(d, tmp_path / "only_norm", only_norm))

    # per-expert names (not in released checkpoints) get a hint instead of a silent init
    per_expert = {k: v for k, v in ref.items() if not k.endswith(EXPERT_NAMES)}
    per_expert["model.language_model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(24, HIDDEN)
    with pytest.raises(HFCheckpointError, match="per-expert tensors"):
        load_hf_weights(model, rewrite(d, tmp_path / "per_expert", per_expert))


def test_load_index_consistency(sources, tmp_path):
    d, cfg, _, _ = sources["moe_sharded"]
    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    index = json.loads((broken / INDEX_FILE).read_text())
    index["weight_map"]["model.language_model.ghost.weight"] = next(iter(index["weight_map"].values()))
    (broken / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(HFCheckpointError, match="listed in model.safetensors.index.json but absent"):
        load_hf_weights(hf_model(cfg, seed=1), broken)


@pytest.mark.parametrize("target", TARGETS)
def test_load_into_dtensor_model(sources, tmp_path, target):
    """The per-tensor copy step accepts FSDP2 (DTensor) parameters (1-process gloo mesh)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    d, cfg, ref, _ = sources["moe_sharded"]
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = make_target(target, cfg)
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.language_model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert isinstance(model.model.language_model.layers[0].mlp.experts.gate_up_proj, DTensor)
        load_hf_weights(model, d)
        got = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- export
def processor_files(dst: Path) -> list[str]:
    """Real Qwen3 tokenizer files (shared data) plus a small processor config, for copy_from."""
    names = []
    tok = SHARED_DATA / "tokenizers" / "qwen3"
    if tok.is_dir():
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            shutil.copy2(tok / f, dst / f)
            names.append(f)
    (dst / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16, "merge_size": 2}))
    (dst / "chat_template.jinja").write_text("{{ messages }}")
    return names + ["preprocessor_config.json", "chat_template.jinja"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", ["dense_tied", "moe_sharded"])
def test_round_trip_export(sources, tmp_path, source, target):
    d, cfg, ref, ref_logits = sources[source]
    init = tmp_path / "init"
    shutil.copytree(d, init)
    copied = processor_files(init)
    args, _ = read_hf_config(init)
    model = make_target(target, cfg)
    load_hf_weights(model, init)
    if target == "ours":
        torch.testing.assert_close(text_logits(model), ref_logits, rtol=1e-5, atol=1e-5)

    out = tmp_path / "out"
    max_shard = 40_000 if args.text.is_moe else 5 * 2**30
    report = export_model(model, args, out, copy_from=init, max_shard_bytes=max_shard)
    for f in copied + ["generation_config.json"]:
        assert (out / f).read_bytes() == (init / f).read_bytes(), f
    cfg_out = json.loads((out / "config.json").read_text())
    assert cfg_out["dtype"] == "float32" and cfg_out["model_type"] == cfg.model_type

    if args.text.is_moe:  # multi-shard: the index names every tensor's real shard, sizes add up
        index = json.loads((out / INDEX_FILE).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 3 and sorted(index["weight_map"]) == sorted(ref)
        total = 0
        for shard in shards:
            tensors = load_file(out / shard)
            assert sorted(tensors) == sorted(k for k, v in index["weight_map"].items() if v == shard)
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            assert nbytes <= max_shard or len(tensors) == 1
            total += nbytes
        assert index["metadata"]["total_size"] == total == report.total_bytes
        assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    else:
        assert not (out / INDEX_FILE).exists()
        assert "lm_head.weight" not in load_file(out / "model.safetensors")

    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(reloaded).__name__ == type(hf_model(cfg, 0)).__name__
    assert_same_state(reloaded, ref)
    torch.testing.assert_close(text_logits(reloaded), ref_logits, rtol=0, atol=1e-6)
    if args.tie_word_embeddings:
        assert reloaded.lm_head.weight is reloaded.model.language_model.embed_tokens.weight


def test_export_hub_layout_and_dtype(sources, tmp_path):
    d, cfg, ref, _ = sources["moe_sharded"]
    args, _ = read_hf_config(d)
    export_hf(ref.items(), args, tmp_path / "hub", expert_layout="hub", dtype=torch.bfloat16)
    with safe_open(tmp_path / "hub" / "model.safetensors", "pt") as f:
        assert f.metadata()[LAYOUT_METADATA_KEY] == "hub"
        assert f.get_slice("model.language_model.layers.2.mlp.experts.down_proj").get_shape() == [4, 24, 32]
        assert f.get_slice("model.language_model.layers.2.mlp.experts.down_proj").get_dtype() == "BF16"
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["dtype"] == "bfloat16"
    ref16 = {k: v.to(torch.bfloat16) for k, v in ref.items()}
    assert_same_state(AutoModelForImageTextToText.from_pretrained(tmp_path / "hub", dtype=torch.bfloat16), ref16)
    model = hf_model(cfg, seed=1).to(torch.bfloat16)
    assert load_hf_weights(model, tmp_path / "hub").expert_layout == {"hub": 4}
    assert_same_state(model, ref16)


def test_export_is_atomic(sources, tmp_path):
    d, cfg, ref, _ = sources["moe_sharded"]
    args, _ = read_hf_config(d)
    out = tmp_path / "parent" / "out"

    def failing():
        for i, item in enumerate(ref.items()):
            if i == len(ref) // 2:
                raise RuntimeError("disk full")
            yield item
    with pytest.raises(RuntimeError, match="disk full"):
        export_hf(failing(), args, out, max_shard_bytes=10_000)  # several shards were already flushed
    assert not out.exists() and list(out.parent.iterdir()) == []

    wrong = dict(ref)
    wrong["model.visual.extra"] = torch.zeros(2)
    wrong["model.language_model.norm.weight"] = torch.zeros(5)
    del wrong["lm_head.weight"]
    with pytest.raises(HFCheckpointError) as e:
        export_hf(wrong.items(), args, out, max_shard_bytes=10_000)
    for name in ("model.visual.extra", "model.language_model.norm.weight: [5]", "lm_head.weight"):
        assert name in str(e.value)
    assert not out.exists() and list(out.parent.iterdir()) == []

    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_hf(ref.items(), args, out)
    export_hf(ref.items(), args, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


@pytest.mark.parametrize("moe,drop", [(False, "rope_theta"), (True, "num_experts"), (False, "hidden_size")])
def test_config_without_a_key_whose_defaults_differ_is_refused(sources, tmp_path, moe, drop):
    """transformers and we default e.g. Qwen3-VL's rope_theta (5e5 vs 5e6) and Qwen3-VL-MoE's num_experts (60 vs 0)
    differently: a checkpoint's config.json that omits one would load as another model, so reading it fails naming
    the key. (rope_theta inside rope_parameters counts: the fixtures' configs hold it only there.)"""
    d = sources["moe_sharded" if moe else "dense"][0]
    raw = json.loads((d / "config.json").read_text())
    read_hf_config(d)
    assert "rope_theta" not in raw["text_config"]
    for k in (drop, "num_local_experts") if drop == "num_experts" else (drop,):   # transformers 5 writes the latter
        raw["text_config"].pop(k, None)
    raw["text_config"]["rope_parameters"].pop(drop, None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(HFCheckpointError, match=rf"config lacks \['text_config\.{drop}'\]: transformers and rynnscale "
                                                "default these differently"):
        read_hf_config(tmp_path)
