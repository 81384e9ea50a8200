"""A LoRA fine-tune end to end through the CLI: the demo recipe on top of a transformers Qwen3-VL-MoE
directory, adapters on attention, dense MLP and every expert. The loss falls, only adapters train, and
the run writes both exports: ``hf`` (merged) and ``adapter`` (PEFT format), which agree with each other
through transformers + peft (logits rel 1e-5)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]


def tiny_moe_dir(root: Path) -> Path:
    from rynnscale.data.tokenizer import default_tokenizer_dir

    text = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                mlp_only_layers=[1], rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [1, 1, 2], "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    torch.manual_seed(0)
    hf = transformers.Qwen3VLMoeForConditionalGeneration(
        transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=True))
    out = root / "base"
    hf.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(Path(default_tokenizer_dir()) / f, out / f)
    return out


@pytest.mark.slow
def test_lora_finetune_trains_and_exports_merged_and_adapter(tmp_path):
    base = tiny_moe_dir(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rynnscale", "train", str(REPO / "recipes" / "demo_tiny.yaml"),
           f"model.init_from={base}", "model.lora.rank=8", "model.lora.alpha=16", "model.lora.experts=true",
           "checkpoint.export_hf=true", f"run.output_dir={out}", "train.max_steps=30", "optim.lr=2e-2",
           "data.synthetic.num_samples=200", "data.synthetic.samples_per_shard=100", "logging.progress=false",
           "logging.plot=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    # frozen random base (its 151,936-way head can't move): measured 11.92 -> 11.70 over 30 steps
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses

    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert any(m.endswith("self_attn.q_proj") for m in cfg["target_modules"])

    ids = torch.tensor([[151644, 872, 198, 3838, 374, 389, 279, 1965, 30, 151645]])
    merged = transformers.AutoModelForImageTextToText.from_pretrained(out / "hf", dtype=torch.float32).eval()
    plain = transformers.AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = plain(input_ids=ids, use_cache=False).logits
        adapted = peft.PeftModel.from_pretrained(plain, str(out / "adapter")).eval()(input_ids=ids, use_cache=False).logits
        got = merged(input_ids=ids, use_cache=False).logits
    assert float((got - adapted).abs().max() / adapted.abs().max()) < 1e-5   # merged == base + adapter
    assert float((adapted - ref).abs().max() / ref.abs().max()) > 1e-4       # training moved the adapters


class _Crash(RuntimeError):
    pass


class CrashAfter:
    """Hook: the process 'dies' after step ``n`` (after that step's checkpoint was written)."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, step, ctx):
        if step == self.n:
            raise _Crash(f"killed after step {step}")


def _run(base: Path, out: Path, steps: int, *extra: str, hooks=()) -> list[float]:
    from rynnscale.config import load_config
    from rynnscale.train.trainer import run_training

    cfg = load_config(REPO / "recipes" / "demo_tiny.yaml", [
        f"model.init_from={base}", "model.lora.rank=4", "model.lora.alpha=8", "model.lora.experts=true",
        f"run.output_dir={out}", f"train.max_steps={steps}", "optim.lr=2e-2", "optim.warmup_steps=1",
        "checkpoint.every_steps=3", "data.synthetic.num_samples=60", "data.synthetic.samples_per_shard=30",
        "data.num_workers=0", "logging.progress=false", "logging.plot=false", "logging.wandb.mode=disabled", *extra])
    run_training(cfg, hooks=hooks)
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_checkpoint_holds_adapters_only_resumes_exactly_and_pins_its_base(tmp_path):
    from rynnscale.checkpoint.dcp import CheckpointError
    from rynnscale.checkpoint.export import _model_tensors_md
    from rynnscale.models.lora import is_adapter_param

    base = tiny_moe_dir(tmp_path)
    straight = _run(base, tmp_path / "straight", 6)
    with pytest.raises(_Crash):
        _run(base, tmp_path / "resumed", 6, hooks=[CrashAfter(4)])   # last checkpoint: step 3
    resumed = _run(base, tmp_path / "resumed", 6)            # checkpoint.resume=auto: continues from step 3
    assert resumed == straight, (resumed, straight)           # bitwise on CPU

    ckpt = tmp_path / "resumed" / "checkpoints" / "step_000006"
    stored = _model_tensors_md(ckpt)
    assert stored and all(is_adapter_param(n) for n in stored), sorted(stored)[:5]
    adapter_bytes = sum(p.stat().st_size for p in (ckpt / "dcp").iterdir())
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert adapter_bytes < 0.2 * base_bytes, (adapter_bytes, base_bytes)

    # the merged export streams the frozen base from model.init_from and folds the adapters in
    from rynnscale.checkpoint.export import export_checkpoint_adapter, export_checkpoint_hf
    export_checkpoint_hf(ckpt, tmp_path / "merged")
    export_checkpoint_adapter(ckpt, tmp_path / "adapter")
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 389, 279, 1965, 30, 151645]])
    with torch.no_grad():
        merged = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        plain = transformers.AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
        want = peft.PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).eval()(input_ids=ids).logits
        got = merged.eval()(input_ids=ids).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5

    # another base under the same path: resuming the adapters on it is refused, naming both hashes
    f = next(base.glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="trained on the base"):
        _run(base, tmp_path / "resumed", 8)
    # and merging them into it on export is refused too (it would write a wrong model silently)
    with pytest.raises(CheckpointError, match="were trained on the base"):
        export_checkpoint_hf(ckpt, tmp_path / "merged_elsewhere")
    # the adapter export may not replace the run it comes from
    with pytest.raises(CheckpointError, match="would delete it"):
        export_checkpoint_adapter(ckpt, tmp_path / "resumed", overwrite=True)


@pytest.mark.slow
def test_lora_on_a_random_base_pins_its_seed_and_export_says_there_is_no_base(tmp_path):
    """Without ``model.init_from`` the frozen base is ``init_weights(run.seed)``: a resume under another seed
    would put the adapters on another random base (refused, naming both); export-hf has no base to merge into
    (a clear error, not "the base is not on this machine")."""
    from rynnscale.checkpoint.dcp import CheckpointError
    from rynnscale.checkpoint.export import export_checkpoint_hf
    from rynnscale.config import load_config
    from rynnscale.train.trainer import run_training

    out = tmp_path / "run"

    def run(steps: int, seed: int) -> None:
        run_training(load_config(REPO / "recipes" / "demo_tiny.yaml", [
            "model.lora.rank=4", "model.lora.alpha=8", f"run.output_dir={out}", f"train.max_steps={steps}",
            f"run.seed={seed}", "checkpoint.every_steps=2", "data.synthetic.num_samples=40",
            "data.synthetic.samples_per_shard=20", "data.num_workers=0", "logging.progress=false",
            "logging.plot=false", "logging.wandb.mode=disabled"]))

    run(2, seed=5)
    with pytest.raises(CheckpointError, match=r"trained on a random base drawn with run.seed=5, but run.seed=6"):
        run(3, seed=6)
    run(3, seed=5)    # the same seed resumes
    with pytest.raises(CheckpointError, match="randomly initialised base .* no base model to merge them into"):
        export_checkpoint_hf(out / "checkpoints" / "step_000002", tmp_path / "merged")


@pytest.mark.slow
def test_export_adapter_of_a_run_with_trainable_base_tensors_is_refused_before_writing(tmp_path, capsys):
    """``ckpt export-hf CKPT OUT --adapter DIR`` of a run with ``model.lora.trainable``: a PEFT directory cannot
    carry the fully trained tensors. That was found only after the merged model had been written (minutes for a
    30B model), then the command failed with exit 2, half done; now it is refused before anything is written."""
    from rynnscale.cli import main as cli_main

    base = tiny_moe_dir(tmp_path)
    _run(base, tmp_path / "run", 1, "model.lora.trainable=[model.language_model.norm.weight]",
         "checkpoint.every_steps=1")
    out, adapter = tmp_path / "merged", tmp_path / "adapter"
    rc = cli_main(["ckpt", "export-hf", str(tmp_path / "run" / "checkpoints" / "step_000001"), str(out),
                   "--adapter", str(adapter)])
    err = capsys.readouterr().err
    assert rc == 2 and "--adapter: model.lora.trainable=['model.language_model.norm.weight'] trains whole base" in err
    assert not out.exists() and not adapter.exists()
