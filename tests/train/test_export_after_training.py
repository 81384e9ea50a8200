"""HF checkpoint -> rynnscale -> a few training steps on real encoded samples -> export -> transformers.

The exported directory must load with AutoModelForImageTextToText.from_pretrained and give the logits
of rynnscale's own forward (fp32, CPU): the oracle is transformers run on each sample alone, ours runs
the samples packed in one row."""

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from tiny_hf import hf_logits, tiny_hf_config

from rynnscale.checkpoint.hf import export_model
from rynnscale.config.schema import ModelConfig, OptimConfig
from rynnscale.data.encode import EncoderConfig, SampleEncoder
from rynnscale.data.packing import build_packed_batch
from rynnscale.data.tokenizer import default_tokenizer_dir, load_tokenizer
from rynnscale.data_pipelines.synthetic import synthetic_sample
from rynnscale.train.build import build_model
from rynnscale.train.optim import build_optimizer
from rynnscale.train.step import train_step


@pytest.fixture(scope="module")
def encoded_samples():
    enc = SampleEncoder(load_tokenizer(None), EncoderConfig(max_tokens=4096))
    return [enc.encode(*synthetic_sample(i, seed=7)) for i in range(3)]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_export_after_training_matches_transformers(tmp_path, encoded_samples, moe):
    torch.manual_seed(0)
    src = tmp_path / "init"
    hf = transformers.AutoModelForImageTextToText.from_config(tiny_hf_config(moe))
    hf.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(Path(default_tokenizer_dir()) / f, src / f)

    args, model = build_model(ModelConfig(init_from=str(src), attn_backend="loop"), torch.device("cpu"), seed=0)
    batch = build_packed_batch(encoded_samples)
    assert batch.video_grid_thw is not None and batch.num_samples == 3
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    losses = [train_step(model, opt, [batch], device=torch.device("cpu"), compute_dtype=torch.float32,
                         loss_chunk_tokens=64, max_grad_norm=1.0).loss for _ in range(3)]
    assert losses[-1] < losses[0]  # it trained (the weights moved away from the init)

    out_dir = tmp_path / "export"
    export_model(model, args, out_dir, copy_from=src)
    assert (out_dir / "tokenizer.json").is_file()
    exported = transformers.AutoModelForImageTextToText.from_pretrained(out_dir, dtype=torch.float32)
    exported.eval()
    model.eval()
    with torch.no_grad():
        ours_ld = model.logits(model(batch).hidden_ld)
        cu = batch.cu_seqlens.tolist()
        for i, s in enumerate(encoded_samples):
            ref = hf_logits(exported, s)
            got = ours_ld[cu[i]:cu[i + 1]]
            err = (got - ref).abs().max() / ref.abs().max()
            assert err < 1e-5, f"sample {i}: max rel error {err:.2e}"
