"""The model seam, end to end: a family that only a test registers (``tests/families/qwen3_text``, transformers'
``Qwen3ForCausalLM`` as its oracle) builds, matches transformers, trains through the real trainer on text shards,
checkpoints, resumes exactly and exports a directory transformers loads -- with no line of rynnscale changed
for it. Tolerances: fp32 logits rel 1e-5 of their norm; resumed losses bitwise equal on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from families.qwen3_text import Qwen3TextArgs, register_family

from rynnscale.batch import IGNORE_INDEX, EncodedSample
from rynnscale.checkpoint.hf import export_model
from rynnscale.config import load_config
from rynnscale.config.schema import ModelConfig
from rynnscale.data.packing import build_packed_batch
from rynnscale.data_pipelines.shards import ShardWriter
from rynnscale.models import family, unregister
from rynnscale.models.mrope import text_position_ids
from rynnscale.train.build import build_model
from rynnscale.train.trainer import run_training


@pytest.fixture(autouse=True)
def family_registered():
    register_family()
    yield
    unregister("qwen3_text")


def arch(vocab: int = 151936, tied: bool = True) -> dict:
    return {"model_type": "qwen3", "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": tied}


def test_the_registry_finds_it_and_only_while_registered() -> None:
    assert family("qwen3").name == "qwen3_text"
    unregister("qwen3_text")
    with pytest.raises(ValueError, match="model_type='qwen3' is not supported"):
        family("qwen3")


@pytest.mark.parametrize("tied", [True, False])
def test_packed_logits_and_loss_match_transformers(tmp_path: Path, tied: bool) -> None:
    args, model = build_model(ModelConfig(arch=arch(512, tied), attn_backend="loop"), seed=3)
    assert isinstance(args, Qwen3TextArgs)
    model.eval()
    export_model(model, args, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 512, (n,), generator=g) for n in (7, 13, 5)]
    samples = [EncodedSample(f"d{i}", ids, torch.cat([torch.tensor([IGNORE_INDEX]), ids[1:]]),
                             text_position_ids(len(ids))) for i, ids in enumerate(docs)]
    batch = build_packed_batch(samples)
    with torch.no_grad():
        out = model(batch)
        ours = model.logits(out.hidden_ld)
        loss_sum = float(model.loss_sum(batch, out))
        start, hf_loss_sum = 0, 0.0
        for ids in docs:
            ref = hf(ids[None], labels=ids[None])
            theirs = ref.logits[0]
            err = (ours[start:start + len(ids)] - theirs).norm() / theirs.norm()
            assert err < 1e-5, f"doc of {len(ids)} tokens: rel err {err:.2e}"
            hf_loss_sum += float(ref.loss) * (len(ids) - 1)
            start += len(ids)
    assert loss_sum == pytest.approx(hf_loss_sum, rel=1e-5)


def test_kv_cache_generation_matches_transformers(tmp_path: Path) -> None:
    """Generation goes through the seam for this family too: greedy KV-cache continuations of a batch of
    prompts of different lengths equal transformers' ``generate`` (its own cache) prompt by prompt."""
    from rynnscale.models.generate import SamplingParams, generate

    cfg = dict(arch(512, tied=False), initializer_range=0.3)   # wide logits: no near-ties to flip
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    _, model = build_model(ModelConfig(init_from=str(tmp_path / "hf"), attn_backend="loop"), seed=0)
    model.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [EncodedSample(f"p{n}", ids, torch.full_like(ids, IGNORE_INDEX), text_position_ids(n))
               for n in (9, 3, 14) for ids in [torch.randint(0, 512, (n,), generator=g)]]
    got = generate(model, prompts, SamplingParams(10))
    for p, ours in zip(prompts, got):
        want = hf.generate(p.input_ids_l[None], attention_mask=torch.ones_like(p.input_ids_l)[None], do_sample=False,
                           max_new_tokens=10, pad_token_id=0)[0, p.input_ids_l.numel():].tolist()
        assert ours == want and len(set(want)) > 1


def _text_shards(out: Path, n: int = 48) -> None:
    with ShardWriter(out, max_samples=16) as w:
        for i in range(n):
            a, b = i % 7, (i * 3) % 11
            conv = {"conversation": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            w.write(f"s{i:03d}", {"conv.json": json.dumps(conv).encode(), "meta.json": b"{}"})


def _run(tmp_path: Path, out: str, *overrides: str) -> list[dict]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"arch": arch()},
                                  "train": {"max_steps": 8, "micro_batch_tokens": 256, "loss_chunk_tokens": 256},
                                  "optim": {"lr": 3e-3, "warmup_steps": 2},
                                  "checkpoint": {"every_steps": 4, "keep_last": 3},
                                  "logging": {"wandb": {"mode": "disabled"}, "plot": False}}))
    cfg = load_config(str(recipe), [f"data.train_shards={tmp_path / 'shards'}", f"run.output_dir={tmp_path / out}",
                                    *overrides])
    run_dir = run_training(cfg)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trains_resumes_and_exports_through_the_real_trainer(tmp_path: Path) -> None:
    _text_shards(tmp_path / "shards")
    straight = _run(tmp_path, "straight", "checkpoint.export_hf=true", "logging.peak_tflops=0.5")
    losses = [r["loss"] for r in straight]
    assert all(r["mfu"] == pytest.approx(r["model_tflops_per_s"] / 0.5) and r["mfu"] > 0 for r in straight)
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]) - 0.5, losses
    # a new run resumed from the straight run's step-4 checkpoint trains steps 5-8 with the same losses, bit for bit
    resumed = _run(tmp_path, "resumed", f"checkpoint.resume={tmp_path / 'straight' / 'checkpoints' / 'step_000004'}")
    assert [r["loss"] for r in resumed if r["step"] > 4] == losses[4:]
    # the export is a Qwen3ForCausalLM directory that transformers loads, computing our trained model's logits
    hf_dir = tmp_path / "straight" / "hf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    args, model = build_model(ModelConfig(init_from=str(hf_dir), attn_backend="loop"))
    ids = torch.tensor([151644, 872, 198, 3838, 374, 220, 17, 5519])
    batch = build_packed_batch([EncodedSample("x", ids, torch.full_like(ids, IGNORE_INDEX), text_position_ids(8))])
    with torch.no_grad():
        ours, theirs = model.logits(model(batch).hidden_ld), hf(ids[None]).logits[0]
    assert (ours - theirs).norm() / theirs.norm() < 1e-5
