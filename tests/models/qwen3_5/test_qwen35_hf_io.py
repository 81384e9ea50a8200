"""Qwen3.5 checkpoints in and out of Hugging Face format (issue 24.2).

- ``load_hf_weights`` of transformers' ``save_pretrained`` directories: the MoE's experts stored per expert
  (what transformers writes, and the released checkpoints' layout) and in transformers 5's fused layout, tied
  and untied, vision-language and text-only: every tensor bit for bit; the released checkpoints' ``mtp.*`` head
  skipped with a note; a missing expert refused naming it;
- our export loaded back by transformers: every tensor bit for bit, same logits;
- through the trainer (``rynnscale train`` on the demo recipe with ``model.init_from`` = a tiny transformers
  Qwen3.5-MoE directory): one step at ``optim.lr=0`` exports a directory whose every tensor equals the init
  model's; a vision token id of the config that the tokenizer does not have is refused naming both ids.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from qwen35_helpers import hf_model, make_samples, pack, tiny_config, tiny_moe_dir
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rynnscale.checkpoint.hf import HFCheckpointError, export_model, load_hf_weights
from rynnscale.models import args_from_hf_config
from rynnscale.models.qwen3_5.model import new_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.qwen3_5")
REPO = Path(__file__).resolve().parents[3]

def _ours_from(path: Path, cfg: dict):
    args = args_from_hf_config(cfg)
    with torch.device("meta"):
        model = new_model(args, attn_backend="loop")
    model.to_empty(device="cpu")
    return model, load_hf_weights(model, path)


def _assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k


@pytest.mark.parametrize("moe,text_only,tie", [(True, False, False), (True, True, True), (False, False, True),
                                               (False, True, False)],
                         ids=["moe-vl", "moe-text-tied", "dense-vl-tied", "dense-text"])
def test_load_a_transformers_save_pretrained_directory(tmp_path: Path, moe: bool, text_only: bool, tie: bool) -> None:
    cfg = tiny_config(moe, tie, text_only)
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    if moe:   # transformers writes the experts one by one
        assert any(".mlp.experts.0.gate_proj.weight" in k for k in stored)
    model, report = _ours_from(tmp_path, cfg)
    _assert_same_tensors(model.state_dict(), hf.state_dict())
    assert report.expert_layout == ({"per_expert": 2 * 4} if moe else {})   # gate_up + down of 4 MoE layers
    assert report.tied == (["lm_head.weight"] if tie else [])


@pytest.mark.parametrize("moe,tie", [(True, False), (False, True)], ids=["moe-untied", "dense-tied"])
def test_load_a_bf16_save_sharded_with_an_index(tmp_path: Path, moe: bool, tie: bool) -> None:
    """A bf16 ``save_pretrained`` in many shards + ``model.safetensors.index.json`` (as the released checkpoints):
    every tensor equals transformers' bf16 value (into our fp32 parameters, exactly), the tie honoured."""
    cfg = tiny_config(moe, tie)
    hf = hf_model(cfg).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 5
    model, report = _ours_from(tmp_path, cfg)
    _assert_same_tensors({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, hf.state_dict())
    assert report.tied == (["lm_head.weight"] if tie else [])


def test_fused_layout_and_mtp_head_and_a_missing_expert(tmp_path: Path) -> None:
    cfg = tiny_config(True)
    hf = hf_model(cfg)
    fused = {k: v.contiguous() for k, v in hf.state_dict().items()}
    fused["mtp.fc.weight"] = torch.zeros(4, 4)                 # the released checkpoints' MTP head
    (tmp_path / "fused").mkdir()
    save_file(fused, tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "fused" / "config.json").write_text(json.dumps({**cfg, "transformers_version": "5.25.0"}))
    model, report = _ours_from(tmp_path / "fused", cfg)
    _assert_same_tensors(model.state_dict(), hf.state_dict())
    assert report.expert_layout == {"v5": 8} and any("mtp.fc.weight" in n for n in report.notes)
    # per-expert with one expert's up projection missing: refused naming it, before anything is written
    hf.save_pretrained(tmp_path / "broken")
    stored = load_file(tmp_path / "broken" / "model.safetensors")
    del stored["model.language_model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(stored, tmp_path / "broken" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError, match=r"layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        _ours_from(tmp_path / "broken", cfg)


@pytest.mark.parametrize("moe,text_only", [(True, False), (False, True)], ids=["moe-vl", "dense-text"])
def test_our_export_loads_in_transformers_bit_for_bit(tmp_path: Path, moe: bool, text_only: bool) -> None:
    cfg = tiny_config(moe, tie=not moe, text_only=text_only)
    args = args_from_hf_config(cfg)
    model = new_model(args, attn_backend="loop")
    model.init_weights(seed=5)
    with torch.no_grad():   # init leaves norms at 0 / 1: perturb so every tensor is distinct
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_model(model, args, tmp_path / "hf")
    auto = transformers.AutoModelForCausalLM if text_only else transformers.AutoModelForImageTextToText
    hf = auto.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Qwen3_5ForCausalLM" if text_only else "Qwen3_5MoeForConditionalGeneration")
    _assert_same_tensors(hf.state_dict(), model.state_dict())
    samples = make_samples(torch.Generator().manual_seed(0), multimodal=False)
    with torch.no_grad():
        ours = model.logits(model(pack(samples[:1])).hidden_ld)
        theirs = hf(input_ids=samples[0]["ids"][None], use_cache=False).logits[0]
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def _train(tmp_path: Path, init: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rynnscale", "train", str(REPO / "recipes" / "demo_tiny.yaml"),
           f"model.init_from={init}", f"run.output_dir={tmp_path / out}", "data.synthetic.num_samples=48",
           f"data.synthetic.output_dir={tmp_path / 'data'}", "data.synthetic.samples_per_shard=24",
           "train.micro_batch_tokens=384", "logging.progress=false", "logging.plot=false",
           "logging.wandb.mode=disabled", "checkpoint.every_steps=0", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)


@pytest.mark.slow
def test_train_from_a_transformers_directory_at_lr_0_exports_it_unchanged(tmp_path: Path, qwen35_moe_init) -> None:
    init = qwen35_moe_init
    proc = _train(tmp_path, init, "run", "train.max_steps=1", "optim.lr=0", "checkpoint.export_hf=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "hf", dtype=torch.float32)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(init, dtype=torch.float32)
    _assert_same_tensors(hf.state_dict(), ref.state_dict())
    assert (tmp_path / "run" / "hf" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_config_vision_ids_that_the_tokenizer_lacks_are_refused(tmp_path: Path) -> None:
    init = tiny_moe_dir(tmp_path / "init", image_token_id=151654)
    proc = _train(tmp_path, init, "run", "train.max_steps=1")
    assert proc.returncode != 0
    assert "image_pad: config 151654 vs tokenizer 151655" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_demo_recipe_trains_a_transformers_qwen35_moe_and_its_loss_falls(tmp_path: Path, qwen35_moe_init) -> None:
    """``rynnscale train recipes/demo_tiny.yaml model.init_from=<tiny Qwen3.5-MoE directory>``: the command line's
    init_from replaces the recipe's inline architecture; the model trains on the demo's synthetic clips."""
    init = qwen35_moe_init
    proc = _train(tmp_path, init, "run", "train.max_steps=14", "optim.warmup_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 14 and all(r["model_tflops_per_s"] > 0 and r["aux_loss"] > 0 for r in records)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 11 and last < first - 1.5, losses       # from ~ln(151936)


@pytest.mark.parametrize("text_only", [True, False], ids=["text", "vl"])
@pytest.mark.parametrize("flat", [{"rope_theta": 1e6}, {"partial_rotary_factor": 0.5},
                                  {"rope_scaling": {"rope_type": "default", "rope_theta": 7e5,
                                                    "partial_rotary_factor": 0.5}}],
                         ids=["flat_theta", "flat_factor", "rope_scaling"])
def test_rope_keys_resolve_as_in_transformers(text_only: bool, flat: dict) -> None:
    """A config holding rope_theta / partial_rotary_factor both flat (or in 4.x rope_scaling) and in rope_parameters:
    ours takes the value transformers uses."""
    cfg = tiny_config(False, text_only=text_only, **flat)
    hf = transformers.AutoConfig.for_model(**cfg)
    hf_rope = (hf if text_only else hf.text_config).rope_parameters
    ours = args_from_hf_config(cfg).text
    assert (ours.rope_theta, ours.partial_rotary_factor) == (hf_rope["rope_theta"], hf_rope["partial_rotary_factor"])


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_text_only_config_over_vision_language_weights(tmp_path: Path, moe: bool) -> None:
    """A qwen3_5(_moe)_text config.json over a vision-language save (``model.language_model.*`` + ``model.visual.*``):
    transformers maps the decoder prefix and ignores the tower; so do we, with the tower named in a note."""
    vl = hf_model(tiny_config(moe))
    vl.save_pretrained(tmp_path)
    text_cfg = {**json.loads((tmp_path / "config.json").read_text())["text_config"],
                "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text"}
    (tmp_path / "config.json").write_text(json.dumps(text_cfg))
    model, report = _ours_from(tmp_path, text_cfg)
    want = {k.replace("model.language_model.", "model."): v for k, v in vl.state_dict().items()
            if not k.startswith("model.visual.")}
    _assert_same_tensors(model.state_dict(), want)
    assert any("model.visual." in n for n in report.notes)


def _stored(d: Path) -> dict[str, tuple[list[int], str]]:
    """Every tensor a directory's safetensors files store -> (shape, dtype), from their headers."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out |= {k: (st.get_slice(k).get_shape(), st.get_slice(k).get_dtype()) for k in st.keys()}
    return out


@pytest.mark.parametrize("text_only", [False, True], ids=["vl", "text"])
def test_moe_exports_store_the_tensors_transformers_save_pretrained_stores(tmp_path: Path, text_only: bool) -> None:
    """Both exports (a model, a DCP checkpoint) of a Qwen3.5-MoE hold the tensor names, shapes and dtypes that
    transformers' own ``save_pretrained`` writes for that class (experts one by one, as the released checkpoints
    and their other readers have them), sharded with an index, and transformers loads them bit for bit."""
    from rynnscale.checkpoint.dcp import CheckpointManager
    from rynnscale.checkpoint.export import export_checkpoint_hf

    cfg = tiny_config(True, text_only=text_only)
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "theirs")
    model, _ = _ours_from(tmp_path / "theirs", cfg)
    export_model(model, args_from_hf_config(cfg), tmp_path / "ours", max_shard_bytes=64 << 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ckpt = CheckpointManager(tmp_path / "run").save(1, model, opt, model_config=cfg)
    export_checkpoint_hf(ckpt, tmp_path / "ours_ckpt", max_shard_bytes=64 << 10)
    want = _stored(tmp_path / "theirs")
    auto = transformers.AutoModelForCausalLM if text_only else transformers.AutoModelForImageTextToText
    for out in ("ours", "ours_ckpt"):
        assert _stored(tmp_path / out) == want, out
        index = json.loads((tmp_path / out / "model.safetensors.index.json").read_text())["weight_map"]
        assert sorted(index) == sorted(want)
        _assert_same_tensors(auto.from_pretrained(tmp_path / out, dtype=torch.float32).state_dict(), hf.state_dict())
        back, report = _ours_from(tmp_path / out, cfg)   # and we read it back
        _assert_same_tensors(back.state_dict(), hf.state_dict())
        assert report.expert_layout == {"per_expert": 2 * 4}
    v5 = export_model(model, args_from_hf_config(cfg), tmp_path / "v5", expert_layout="v5")   # on request
    assert v5.expert_layout == "v5" and any(k.endswith("mlp.experts.gate_up_proj") for k in _stored(tmp_path / "v5"))


def test_hub_expert_layout_export_is_refused(tmp_path: Path) -> None:
    """The transposed "hub" expert layout is Qwen3-VL-MoE's; transformers does not transpose Qwen3.5-MoE experts,
    so such an export would not load (non-square) or load transposed (square): refused before anything is written."""
    cfg = tiny_config(True, text_only=True)
    args = args_from_hf_config(cfg)
    model = new_model(args, attn_backend="loop")
    model.init_weights(seed=0)
    with pytest.raises(HFCheckpointError, match=r"expert_layout='hub' is not a layout transformers reads for"):
        export_model(model, args, tmp_path / "hub", expert_layout="hub")
    assert not (tmp_path / "hub").exists()


@pytest.mark.parametrize("text_only", [True, False], ids=["text", "vl"])
def test_moe_config_without_a_key_whose_defaults_differ_is_refused(tmp_path: Path, text_only: bool) -> None:
    """Qwen3.5-MoE's transformers defaults (hidden 2048, 40 layers, 2 kv heads) differ from ours: a checkpoint's
    config.json that omits one would load as another model, so reading it fails naming the key."""
    from rynnscale.models import read_hf_config

    cfg = tiny_config(True, text_only=text_only)
    (cfg if text_only else cfg["text_config"]).pop("num_key_value_heads")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    key = "num_key_value_heads" if text_only else "text_config.num_key_value_heads"
    with pytest.raises(HFCheckpointError, match=rf"lacks \['{key}'\]"):
        read_hf_config(tmp_path)
