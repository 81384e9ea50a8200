"""LoRA on Qwen3.5(-MoE) (issue 24.3): adapters on the full-attention and the linear-attention projections, the
dense MLP or the shared expert, and the routed experts (per expert), exported in PEFT format.

- ``peft.PeftModel.from_pretrained(transformers model, our adapter)`` computes our model's logits (rel 1e-5, fp32,
  every sample of a packed row of text / image / video samples);
- our merged export loaded by transformers computes the same (rel 1e-5);
- fresh adapters leave the model bitwise unchanged; only adapters train; every targeted kind got adapters;
- ``rynnscale ckpt export-hf CKPT OUT --adapter DIR`` of a LoRA checkpoint (adapters only) does the same from the
  checkpoint, also run from another directory than the training's when the run named its base relatively.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from lora_helpers import randomize_adapters
from qwen35_helpers import hf_forward, hf_model, make_samples, pack, tiny_config

from rynnscale.checkpoint.adapter import export_adapter
from rynnscale.checkpoint.dcp import CheckpointManager
from rynnscale.checkpoint.export import base_fingerprint
from rynnscale.checkpoint.hf import export_model
from rynnscale.cli import main as cli_main
from rynnscale.config.schema import LoRAConfig, ModelConfig
from rynnscale.parallel.fqn import clean_fqn
from rynnscale.train.build import build_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers.models.qwen3_5")

TARGETS = ["*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.o_proj",
           "*.linear_attn.in_proj_qkv", "*.linear_attn.in_proj_z", "*.linear_attn.in_proj_b",
           "*.linear_attn.in_proj_a", "*.linear_attn.out_proj", "*.mlp.gate_proj", "*.mlp.up_proj",
           "*.mlp.down_proj", "*.mlp.shared_expert.gate_proj", "*.mlp.shared_expert.up_proj",
           "*.mlp.shared_expert.down_proj"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_peft_on_transformers_and_merged_export_equal_ours(tmp_path: Path, moe: bool) -> None:
    src = tmp_path / "init"
    hf_model(tiny_config(moe)).save_pretrained(src)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS, experts=moe)
    args, ours = build_model(ModelConfig(init_from=str(src), attn_backend="loop", lora=lora), torch.device("cpu"))
    _, base = build_model(ModelConfig(init_from=str(src), attn_backend="loop"), torch.device("cpu"))
    samples = make_samples(torch.Generator().manual_seed(0), multimodal=True)
    batch = pack(samples)
    with torch.no_grad():
        assert torch.equal(ours.logits(ours(batch).hidden_ld), base.logits(base(batch).hidden_ld))
    trainable = {clean_fqn(n) for n, p in ours.named_parameters() if p.requires_grad}
    kinds = ["self_attn.q_proj", "linear_attn.in_proj_qkv", "linear_attn.out_proj",
             "shared_expert.down_proj" if moe else "mlp.down_proj"] + (["experts.gate_up_proj_lora_A"] if moe else [])
    assert all(any(k in n for n in trainable) for k in kinds), sorted(trainable)[:8]
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable)

    adapters = {clean_fqn(n): t for n, t in randomize_adapters(ours, seed=3, std=0.05).items()}
    out = export_adapter(adapters, ours.lora_spec, tmp_path / "adapter", base_model_name_or_path=str(src))
    hf = transformers.AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    export_model(ours.eval(), args, tmp_path / "merged", copy_from=src)
    merged = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        base_ld = base.logits(base(batch).hidden_ld)
        for _, rows, ref in _peft_matches_ours_and_merged(ours.logits(ours(batch).hidden_ld), samples, pm, merged):
            assert _rel(base_ld[rows], ref) > 1e-3   # the adapters really change the model



def _peft_matches_ours_and_merged(ours_ld, samples, pm, merged):
    """Per sample of a packed row: peft's logits (``pm``) equal ours and the merged export's (rel 1e-5); yields
    (sample, its rows in ``ours_ld``, peft's logits) for further checks."""
    start = 0
    for s in samples:
        n = s["ids"].numel()
        ref = hf_forward(pm, s).logits[0]
        assert _rel(ours_ld[start:start + n], ref) < 1e-5, f"sample of {n} tokens: ours vs peft"
        assert _rel(hf_forward(merged, s).logits[0], ref) < 1e-5, f"sample of {n} tokens: merged vs peft"
        yield s, slice(start, start + n), ref
        start += n

def test_ckpt_export_of_a_lora_checkpoint_from_another_directory_equals_ours(tmp_path: Path, monkeypatch) -> None:
    """A Qwen3.5-MoE LoRA checkpoint (adapters only, as a LoRA run saves it) of a run that named its base relatively
    (``model.init_from: runs/base``, as the tiny recipes do), exported by ``ckpt export-hf --adapter`` from another
    working directory, where ``runs/base`` is another model: the base is the one the run recorded with its content
    hash (``extra.lora_base``, absolute).
    Before, the export was refused: "the run's model.init_from=runs/base does not exist on this machine". The
    adapter names its base absolutely; peft's model on transformers' and the merged export both compute our logits
    (rel 1e-5, every sample of a packed text / image / video row). ``peft.AutoPeftModel.from_pretrained(adapter)``
    failed ("Cannot infer the auto class from the config"): the adapter now names the base's class as peft does."""
    train_dir, elsewhere = tmp_path / "train", tmp_path / "elsewhere"
    elsewhere.mkdir()
    hf_model(tiny_config(True)).save_pretrained(train_dir / "runs" / "base")
    monkeypatch.chdir(train_dir)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS, experts=True)
    args, ours = build_model(ModelConfig(init_from="runs/base", attn_backend="loop", lora=lora), torch.device("cpu"))
    randomize_adapters(ours, seed=3, std=0.05)
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.0)
    ckpt = CheckpointManager(train_dir / "run", trainable_only=True).save(
        1, ours, opt, config={"model": {"init_from": "runs/base", "lora": dataclasses.asdict(lora)}},
        model_config=args.to_hf_config(), extra_state={"lora_base": base_fingerprint("runs/base")})

    monkeypatch.chdir(elsewhere)
    hf_model(tiny_config(True), seed=1).save_pretrained(elsewhere / "runs" / "base")   # same relative name, not it
    assert cli_main(["ckpt", "export-hf", str(ckpt), str(tmp_path / "merged"), "--adapter",
                     str(tmp_path / "adapter")]) == 0
    base = train_dir / "runs" / "base"
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    hf = transformers.AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    # peft's one-liner builds the base by itself from the adapter's config (auto_mapping, as peft writes it)
    auto = peft.AutoPeftModel.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32).eval()
    merged = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    samples = make_samples(torch.Generator().manual_seed(0), multimodal=True)
    with torch.no_grad():
        ours_ld = ours.eval().logits(ours(pack(samples)).hidden_ld)
        for s, _, ref in _peft_matches_ours_and_merged(ours_ld, samples, pm, merged):
            assert _rel(hf_forward(auto, s).logits[0], ref) < 1e-6, "AutoPeftModel vs peft"


def test_targets_that_leave_decoder_layers_without_adapters_are_warned_of(caplog) -> None:
    """Qwen3.5-MoE under the default targets (Qwen3-VL's attention + dense MLP names) adapted the q/k/v/o of its one
    full-attention layer in four and nothing else, without a word (each pattern matched something, or was a default
    that a MoE model lacks). Decoder layers left without any adapter are now named with their projections; dense
    Qwen3.5 (the MLP adapted in every layer), the recipe's targets and expert adapters leave none out: no warning."""
    import logging

    from rynnscale.models import args_from_hf_config, family_of
    from rynnscale.models.lora import LoRASpec, apply_lora
    from rynnscale.models.qwen3_5.model import new_model

    def adapt(moe: bool, **spec) -> str:
        model = new_model(args_from_hf_config(tiny_config(moe)), attn_backend="loop")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rynnscale.models.lora"):
            apply_lora(model, LoRASpec(rank=2, alpha=4.0, **spec), experts_of=family_of(model).is_experts)
        return caplog.text

    assert "model.lora: 3 of 4 decoder layers get no adapter (model.language_model.layers.0, ...): their projections " \
           "(linear_attn.out_proj, linear_attn.in_proj_qkv" in adapt(True)
    assert "'*.linear_attn.out_proj'" in adapt(True)
    for moe, spec in ((False, {}), (True, {"targets": tuple(TARGETS)}), (True, {"experts": True})):
        assert "decoder layers get no adapter" not in adapt(moe, **spec), (moe, spec)
