"""LoRA (``rynnscale.models.lora``, ``rynnscale.checkpoint.adapter``) against peft on transformers.

- our model with adapters == ``peft.PeftModel.from_pretrained(transformers model, exported adapter)``:
  logits rel 1e-5 (fp32, CPU) per sample of a packed row of text + video samples; dense and MoE, expert
  adapters on and off;
- merged export == adapter applied (rel 1e-5); fresh adapters leave the output bitwise unchanged;
- adapter gradients == a float64 reference, max|diff| < 1e-5 x max|grad| (dense Linear and per-expert
  fused tensors, one expert without rows); frozen base weights get no gradient.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from lora_helpers import randomize_adapters
from tiny_hf import hf_logits, tiny_hf_config

from rynnscale.checkpoint.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_adapter
from rynnscale.checkpoint.hf import export_model
from rynnscale.config.schema import LoRAConfig, ModelConfig
from rynnscale.data.encode import EncoderConfig, SampleEncoder
from rynnscale.data.packing import build_packed_batch
from rynnscale.data.tokenizer import default_tokenizer_dir, load_tokenizer
from rynnscale.data_pipelines.synthetic import synthetic_sample
from rynnscale.models.lora import LoRALinear, LoRASpec, add_expert_lora, is_adapter_param
from rynnscale.parallel.fqn import clean_fqn
from rynnscale.train.build import build_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def samples():
    enc = SampleEncoder(load_tokenizer(None), EncoderConfig(max_tokens=4096))
    return [enc.encode(*synthetic_sample(i, seed=11)) for i in range(3)]


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def init_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("lora_init") / ("moe" if request.param else "dense")
    hf = transformers.AutoModelForImageTextToText.from_config(tiny_hf_config(request.param))
    with torch.no_grad():  # biases / norms away from their init values, so every tensor is exercised
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(Path(default_tokenizer_dir()) / f, src / f)
    return src, request.param


def lora_model(src: Path, experts: bool, vision: bool = False):
    lc = LoRAConfig(rank=RANK, alpha=ALPHA, experts=experts, vision=vision)
    return build_model(ModelConfig(init_from=str(src), attn_backend="loop", lora=lc), torch.device("cpu"), seed=0)


def max_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def _case_ids(moe: bool) -> list[bool]:
    return [False, True] if moe else [False]


def test_fresh_adapters_leave_the_model_bitwise_unchanged(init_dir, samples):
    src, moe = init_dir
    batch = build_packed_batch(samples)
    _, base = build_model(ModelConfig(init_from=str(src), attn_backend="loop"), torch.device("cpu"), seed=0)
    _, ours = lora_model(src, experts=moe, vision=True)
    with torch.no_grad():
        assert torch.equal(ours.logits(ours(batch).hidden_ld), base.logits(base(batch).hidden_ld))
    trainable = {clean_fqn(n) for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_param(n) for n in trainable)
    assert any("visual.blocks.0.attn.qkv.lora_A" in n for n in trainable)
    assert any("experts.gate_up_proj_lora_A" in n for n in trainable) == moe


@pytest.mark.parametrize("experts", [False, True], ids=["attn_mlp", "with_experts"])
def test_matches_peft_on_transformers_and_merged_export(init_dir, samples, tmp_path, experts):
    src, moe = init_dir
    if experts and not moe:
        pytest.skip("a dense model has no experts")
    args, ours = lora_model(src, experts=experts)
    adapters = {clean_fqn(n): t for n, t in randomize_adapters(ours, seed=3, std=0.05).items()}
    spec = ours.lora_spec
    out = export_adapter(adapters, spec, tmp_path / "adapter", base_model_name_or_path=str(src))
    assert (out / ADAPTER_CONFIG).is_file() and (out / ADAPTER_WEIGHTS).is_file()

    hf = transformers.AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, str(out))
    pm.eval()
    ours.eval()
    merged_dir = tmp_path / "merged"
    export_model(ours, args, merged_dir, copy_from=src)
    merged = transformers.AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32)
    merged.eval()
    batch = build_packed_batch(samples)
    assert batch.video_grid_thw is not None
    with torch.no_grad():
        ours_ld = ours.logits(ours(batch).hidden_ld)
        cu = batch.cu_seqlens.tolist()
        for i, s in enumerate(samples):
            ref = hf_logits(pm, s)
            assert max_rel(ours_ld[cu[i]:cu[i + 1]], ref) < 1e-5, f"sample {i}: ours vs peft"
            assert max_rel(hf_logits(merged, s), ref) < 1e-5, f"sample {i}: merged export vs peft"
        base = hf_logits(transformers.AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32), samples[0])
        assert max_rel(ours_ld[: cu[1]], base) > 1e-3  # the adapters really changed the model


def test_adapter_gradients_match_float64_and_base_gets_none():
    torch.manual_seed(0)
    spec = LoRASpec(rank=3, alpha=6.0)
    lin = LoRALinear.from_linear(torch.nn.Linear(5, 7), spec)
    for p in (lin.lora_A, lin.lora_B):
        torch.nn.init.normal_(p)
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    x = torch.randn(6, 5)
    w_out = torch.randn(6, 7)
    (lin(x) * w_out).sum().backward()
    A, B = lin.lora_A.detach().double().requires_grad_(), lin.lora_B.detach().double().requires_grad_()
    y = x.double() @ lin.weight.double().T + lin.bias.double() + 2.0 * (x.double() @ A.T) @ B.T
    (y * w_out.double()).sum().backward()
    for got, want in ((lin.lora_A.grad, A.grad), (lin.lora_B.grad, B.grad)):
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5  # fp32 vs float64
    assert lin.weight.grad is None and lin.bias.grad is None

    from rynnscale.models.qwen3_vl.args import TextArgs
    from rynnscale.models.qwen3_vl.moe import GroupedExperts
    targs = TextArgs(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=4, mrope_section=[1, 0, 1], num_experts=3, num_experts_per_tok=1, moe_intermediate_size=4)
    ex = GroupedExperts(targs, gemm_backend="loop")
    add_expert_lora(ex, spec)
    for n, p in ex.named_parameters():
        torch.nn.init.normal_(p, std=0.3)
        p.requires_grad_(is_adapter_param(n))
    x = torch.randn(7, 8)
    offsets = torch.tensor([2, 2, 7], dtype=torch.int32)   # expert 1 gets no rows
    (ex(x, offsets) ** 2).sum().backward()
    ref = {n: p.detach().double().requires_grad_() for n, p in ex.named_parameters()}
    ys = []
    for e, (lo, hi) in enumerate(((0, 2), (2, 2), (2, 7))):
        xe = x[lo:hi].double()
        gu = xe @ ref["gate_up_proj"][e].T + 2.0 * (xe @ ref["gate_up_proj_lora_A"][e].T) @ ref["gate_up_proj_lora_B"][e].T
        g, u = gu.chunk(2, dim=-1)
        h = torch.nn.functional.silu(g) * u
        ys.append(h @ ref["down_proj"][e].T + 2.0 * (h @ ref["down_proj_lora_A"][e].T) @ ref["down_proj_lora_B"][e].T)
    (torch.cat(ys) ** 2).sum().backward()
    for n, p in ex.named_parameters():
        if is_adapter_param(n):
            err = float((p.grad.double() - ref[n].grad).abs().max() / ref[n].grad.abs().max())
            assert err < 1e-5, f"{n}: max|diff| = {err:.1e} x max|grad|"  # fp32 vs float64
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("tie", [True, False])
def test_trainable_patterns_match_a_tied_head_and_refuse_typos(tie: bool) -> None:
    """``model.lora.trainable: ['lm_head.*']`` trains the head also when it is the tied embedding (the parameter
    has two names; it used to be matched under the embedding's only, and stayed frozen); a pattern matching no
    parameter is an error naming it."""
    cfg = tiny_hf_config(moe=False)
    cfg.tie_word_embeddings = tie
    mc = ModelConfig(arch=cfg.to_dict(), lora=LoRAConfig(rank=2, trainable=["lm_head.*"]))
    _, model = build_model(mc, seed=0)
    assert model.lm_head.weight.requires_grad
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tie
    with pytest.raises(ValueError, match=r"\['lm_haed\.\*'\] match\(es\) no parameter"):
        build_model(ModelConfig(arch=cfg.to_dict(), lora=LoRAConfig(rank=2, trainable=["lm_haed.*"])), seed=0)


def test_target_patterns_that_adapt_nothing_are_named(caplog) -> None:
    """A ``model.lora.targets`` pattern used to be dropped silently when it adapted nothing while another one
    matched (``lm_head``, ``*.mlp.experts``, a vision block without ``model.lora.vision``, a typo): the run trained
    fewer adapters than asked. One that matches modules LoRA cannot adapt is an error saying what to use; one that
    matches no module is warned of (a recipe may list the dense and the MoE layouts' projections together)."""
    import logging

    cfg = tiny_hf_config(moe=True).to_dict()

    def build(*targets: str, vision: bool = False):
        lc = LoRAConfig(rank=2, targets=["*.self_attn.q_proj", *targets], vision=vision)
        return build_model(ModelConfig(arch=cfg, lora=lc), seed=0)[1]

    with pytest.raises(ValueError, match=r"'lm_head' matches lm_head \(LMHead\): LoRA adapts nn.Linear modules only"
                                         r".*model.lora.trainable"):
        build("lm_head")
    with pytest.raises(ValueError, match=r"'\*.mlp.experts' matches .*mlp.experts \(GroupedExperts\).*"
                                         r"model.lora.experts: true"):
        build("*.mlp.experts")
    with pytest.raises(ValueError, match=r"matches vision modules \(model.visual.blocks.0.attn.qkv, ...\).*"
                                         r"model.lora.vision: true"):
        build("model.visual.blocks.*.attn.qkv")
    assert isinstance(build("model.visual.blocks.*.attn.qkv", vision=True).model.visual.blocks[0].attn.qkv, LoRALinear)
    with caplog.at_level(logging.WARNING, logger="rynnscale.models.lora"):
        model = build("*.self_attn.v_prj")
    assert "pattern '*.self_attn.v_prj' matches no module of this model" in caplog.text
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, LoRALinear)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rynnscale.models.lora"):
        build_model(ModelConfig(arch=cfg, lora=LoRAConfig(rank=2)), seed=0)   # defaults: dense MLP names on a MoE
    assert "matches no module" not in caplog.text


def test_freeze_patterns_that_undo_a_lora_option_are_refused(caplog) -> None:
    """``model.freeze`` applies after LoRA; a pattern freezing both factors of adapters leaves them at ``B = 0`` for
    good: ``recipes/finetune/planning_lora.yaml model.lora.vision=true`` (the fine-tune's freeze of
    ``model.visual.blocks.*``) trained no vision adapter and said nothing. A freeze that leaves a ``model.lora``
    option (vision, experts, a targets pattern) nothing to train is an error naming the freeze pattern; one that
    freezes some of an option's adapters is warned of; freezing one factor only (``*.lora_A``, LoRA-FA) is fine. A
    ``model.lora.trainable`` pattern that ``model.freeze`` freezes entirely is refused the same way."""
    import logging

    from rynnscale.config.schema import ConfigError

    cfg = tiny_hf_config(moe=True).to_dict()
    vision_freeze = ["model.visual.blocks.*", "model.visual.patch_embed.*"]
    with pytest.raises(ConfigError, match=r"'model.freeze' pattern\(s\) \['model.visual.blocks.\*'\] freeze every LoRA "
                                          r"adapter of model.lora.vision \(model.visual.blocks.0.attn.qkv, \.\.\.\)"):
        build_model(ModelConfig(arch=cfg, freeze=vision_freeze, lora=LoRAConfig(rank=2, vision=True)), seed=0)
    with pytest.raises(ConfigError, match=r"\['\*.mlp.experts.\*'\] freeze every LoRA adapter of model.lora.experts "):
        build_model(ModelConfig(arch=cfg, freeze=["*.mlp.experts.*"], lora=LoRAConfig(rank=2, experts=True)), seed=0)
    with pytest.raises(ConfigError, match=r"\['\*.q_proj.\*'\] freeze every LoRA adapter of model.lora.targets "
                                          r"pattern '\*.self_attn.q_proj'"):
        build_model(ModelConfig(arch=cfg, freeze=["*.q_proj.*"], lora=LoRAConfig(rank=2)), seed=0)
    # one layer's expert adapters frozen: the option still trains the others (said, not refused)
    with caplog.at_level(logging.WARNING, logger="rynnscale.train.build"):
        _, model = build_model(ModelConfig(arch=cfg, freeze=["model.language_model.layers.0.mlp.experts.*"],
                                           lora=LoRAConfig(rank=2, experts=True)), seed=0)
    assert "freeze 2 LoRA adapter(s) (model.language_model.layers.0.mlp.experts.gate_up_proj, ...)" in caplog.text
    assert model.model.language_model.layers[2].mlp.experts.down_proj_lora_B.requires_grad
    # the same freeze without vision adapters, and a freeze of the A factors only, build
    _, model = build_model(ModelConfig(arch=cfg, freeze=vision_freeze, lora=LoRAConfig(rank=2)), seed=0)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.visual."))
    _, model = build_model(ModelConfig(arch=cfg, freeze=["*lora_A"], lora=LoRAConfig(rank=2, experts=True)), seed=0)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains and all(n.endswith("lora_B") for n in trains)
    assert any("experts.gate_up_proj_lora_B" in n for n in trains)
    # likewise a model.lora.trainable pattern whose every parameter model.freeze freezes
    with pytest.raises(ConfigError, match=r"'model.lora.trainable' pattern 'lm_head.weight' asks to train "
                                          r"lm_head.weight, but 'model.freeze' pattern\(s\) \['lm_head.\*'\] freeze it"):
        build_model(ModelConfig(arch=cfg, freeze=["lm_head.*"], lora=LoRAConfig(rank=2, trainable=["lm_head.weight"])),
                    seed=0)


def test_options_with_nothing_to_act_on_are_warned_of(caplog) -> None:
    """``model.lora.experts: true`` on a dense model and ``model.lora.dropout`` with only expert adapters (which
    take no dropout) used to be accepted and ignored without a word."""
    import logging

    dense, moe = tiny_hf_config(moe=False).to_dict(), tiny_hf_config(moe=True).to_dict()
    with caplog.at_level(logging.WARNING, logger="rynnscale.models.lora"):
        build_model(ModelConfig(arch=dense, lora=LoRAConfig(rank=2, experts=True)), seed=0)
    assert "model.lora.experts: true, but this model has no MoE experts" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rynnscale.models.lora"):
        build_model(ModelConfig(arch=moe, lora=LoRAConfig(rank=2, experts=True, targets=[], dropout=0.1)), seed=0)
    assert "model.lora.dropout=0.1 has no effect" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rynnscale.models.lora"):   # both options act here
        build_model(ModelConfig(arch=moe, lora=LoRAConfig(rank=2, experts=True, dropout=0.1)), seed=0)
    assert "has no effect" not in caplog.text and "no MoE experts" not in caplog.text
