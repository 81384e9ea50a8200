"""DCP checkpoint -> Hugging Face directory (``rynnscale ckpt export-hf``) and ``rynnscale ckpt inspect``.

Oracle: transformers' ``from_pretrained`` of the exported directory gives the logits of the rynnscale model
that was checkpointed (fp32 CPU, max error relative to the largest logit < 1e-5, as in the other export
tests). Memory: a subprocess exports a 16-layer model with 200+ tensors; its peak RSS growth (ru_maxrss
delta) must stay below 2x the largest tensor + 20 MiB, while the model itself is larger than that bound.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import ckpt_worker as w
import pytest
import torch

from rynnscale.checkpoint.dcp import CheckpointManager
from rynnscale.checkpoint.hf import HFCheckpointError
from rynnscale.cli import main as cli_main

transformers = pytest.importorskip("transformers")


def text_logits_ours(model, ids_2l: torch.Tensor) -> torch.Tensor:
    from rynnscale.batch import PackedBatch

    n = ids_2l.shape[1]
    pos = torch.arange(n).repeat(2)
    batch = PackedBatch(input_ids_l=ids_2l.flatten(), labels_l=torch.full((2 * n,), -100),
                        position_ids_3l=pos.expand(3, -1).clone(),
                        cu_seqlens=torch.tensor([0, n, 2 * n], dtype=torch.int32), max_seqlen=n)
    with torch.no_grad():
        return model.logits(model(batch).hidden_ld).view(2, n, -1)


@pytest.mark.parametrize("moe,tie", [(True, False), (False, True)], ids=["moe", "dense_tied"])
def test_export_loads_in_transformers_with_our_logits(tmp_path, moe, tie, capsys):
    torch.manual_seed(0)
    w.seed_rank(0)
    cfg = w.tiny_hf_config(num_experts=4 if moe else 0, tie=tie)
    model = w.build_model(cfg)
    opt, sched = w.build_optim(model, 3)
    for _ in range(2):
        w.train_step(model, opt, sched)   # weights move away from the init
    init = tmp_path / "init"
    init.mkdir()
    (init / "tokenizer_config.json").write_text("{}")
    ckpt = CheckpointManager(tmp_path / "run").save(2, model, opt, sched, tokens_seen=64, model_config=cfg,
                                                    config={"model": {"init_from": str(init)}})
    out = tmp_path / "hf"
    assert cli_main(["ckpt", "export-hf", str(ckpt), str(out), "--copy-from", str(init)]) == 0
    assert (out / "tokenizer_config.json").is_file() and (out / "model.safetensors").is_file()
    assert cli_main(["ckpt", "inspect", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "step:       2" in text and "tokens:     64" in text and "model.language_model.embed_tokens.weight" in text

    hf = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    model.eval()
    ids = torch.randint(0, w.VOCAB - 8, (2, 9))
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    got = text_logits_ours(model, ids)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err
    # and the weights are the checkpointed ones, bit for bit
    ours = model.state_dict()
    theirs = hf.state_dict()
    bad = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not bad, bad[:5]


def test_export_refuses_a_mismatched_architecture(tmp_path):
    cfg = w.tiny_hf_config()
    model = w.build_model(cfg)
    opt, sched = w.build_optim(model, 1)
    wrong = w.tiny_hf_config(layers=3)
    ckpt = CheckpointManager(tmp_path / "run").save(1, model, opt, sched, model_config=wrong)
    with pytest.raises(HFCheckpointError, match="layers.2"):
        from rynnscale.checkpoint.export import export_checkpoint_hf
        export_checkpoint_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


MEM_SCRIPT = r"""
import json, resource, sys
import torch
from rynnscale.checkpoint.export import _model_tensors_md, export_checkpoint_hf
_model_tensors_md(sys.argv[1])          # imports and metadata reading happen before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = export_checkpoint_hf(sys.argv[1], sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"delta": (peak - base) * 1024, "largest": r.largest_tensor_bytes, "total": r.total_bytes,
                  "num": r.num_tensors, "files": r.files}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_export_peak_memory_is_bounded_by_largest_tensor(tmp_path):
    cfg = w.tiny_hf_config(num_experts=0, layers=16, hidden=256, vocab=16384, inter=768)
    model = w.build_model(cfg)
    ckpt = CheckpointManager(tmp_path / "run").save(1, model, torch.optim.SGD(model.parameters(), lr=0.0),
                                                    model_config=cfg)
    del model
    res = subprocess.run([sys.executable, "-c", MEM_SCRIPT, str(ckpt), str(tmp_path / "hf")], capture_output=True,
                         text=True, timeout=300, cwd=str(w.REPO))
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    bound = 2 * r["largest"] + 20 * 2**20
    assert r["num"] > 200 and r["files"][0] == "model.safetensors"   # one 5 GiB-budget shard: no help from sharding
    assert r["total"] > bound, "model too small for the test to tell streaming from loading everything"
    assert r["delta"] < bound, f"peak RSS grew {r['delta'] / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB"
    from safetensors import safe_open
    with safe_open(str(tmp_path / "hf/model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.language_model.norm.weight"), torch.ones(256))
    shutil.rmtree(tmp_path / "run")


def test_cli_export_gets_the_runs_tokenizer_and_processor_files(tmp_path, capsys):
    """Issue 28, item 2: ``ckpt export-hf CKPT OUT`` without ``--copy-from`` wrote no tokenizer, and
    ``AutoTokenizer.from_pretrained(OUT)`` silently became a one-token tokenizer mapping text to []. The export
    now gets what the ``checkpoint.export_hf`` hook gets (``export_side_files``): the run's init model's processor
    files, the tokenizer the run read its data with; ``--copy-from`` overrides both."""
    from rynnscale.data.tokenizer import default_tokenizer_dir, load_tokenizer

    cfg = w.tiny_hf_config(num_experts=0)
    model = w.build_model(cfg)
    opt, sched = w.build_optim(model, 1)
    text = "Where is the red cup? <traj> (500, 400) </traj>"
    want = load_tokenizer(None).encode(text).ids

    # a run with an inline architecture and no tokenizer settings read its data with the bundled Qwen3 tokenizer
    ckpt = CheckpointManager(tmp_path / "arch").save(1, model, opt, sched, model_config=cfg,
                                                     config={"model": {"arch": cfg}, "data": {"tokenizer": None}})
    assert cli_main(["ckpt", "export-hf", str(ckpt), str(tmp_path / "out_arch")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out_arch")
    assert tok(text)["input_ids"] == want and len(want) > 5
    assert f"tokenizer from {default_tokenizer_dir()}" in capsys.readouterr().out

    # init model with processor files; data.tokenizer names the tokenizer the run used instead of init_from's
    init, data_tok = tmp_path / "init", tmp_path / "data_tok"
    shutil.copytree(default_tokenizer_dir(), init)
    shutil.copytree(default_tokenizer_dir(), data_tok)
    (init / "preprocessor_config.json").write_text('{"patch_size": 16}')
    (init / "generation_config.json").write_text('{"do_sample": false}')
    (init / "chat_template.jinja").write_text("{{ messages }}")
    (data_tok / "tokenizer_config.json").write_text(json.dumps({
        **json.loads((init / "tokenizer_config.json").read_text()), "model_max_length": 4321}))
    run_cfg = {"model": {"init_from": str(init)}, "data": {"tokenizer": str(data_tok)}}
    ckpt = CheckpointManager(tmp_path / "init_run").save(1, model, opt, sched, model_config=cfg, config=run_cfg)
    from rynnscale.checkpoint.export import export_side_files

    got = export_side_files(ckpt)
    assert got["tokenizer_config.json"] == data_tok / "tokenizer_config.json"
    assert got["tokenizer.json"] == data_tok / "tokenizer.json"
    assert {got[n] for n in ("preprocessor_config.json", "generation_config.json", "chat_template.jinja")} == {
        init / "preprocessor_config.json", init / "generation_config.json", init / "chat_template.jinja"}
    assert cli_main(["ckpt", "export-hf", str(ckpt), str(tmp_path / "out_init")]) == 0
    out = tmp_path / "out_init"
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 4321
    assert (out / "preprocessor_config.json").read_text() == '{"patch_size": 16}'
    # --copy-from replaces all of them
    assert cli_main(["ckpt", "export-hf", str(ckpt), str(tmp_path / "out_copy"), "--copy-from", str(init)]) == 0
    assert (tmp_path / "out_copy" / "tokenizer_config.json").read_bytes() == (init / "tokenizer_config.json").read_bytes()
    # exporting over the init model is refused (it would delete it), as is a run whose init model is gone
    capsys.readouterr()
    assert cli_main(["ckpt", "export-hf", str(ckpt), str(init), "--overwrite"]) == 2
    assert "the directory the tokenizer / processor files come from" in capsys.readouterr().err
    assert (init / "tokenizer.json").is_file()
    shutil.rmtree(init)
    assert cli_main(["ckpt", "export-hf", str(ckpt), str(tmp_path / "out_gone")]) == 2
    assert f"the run's model.init_from={init} does not exist on this machine" in capsys.readouterr().err
    assert cli_main(["ckpt", "export-hf", str(ckpt), str(tmp_path / "out_gone"), "--copy-from", str(data_tok)]) == 0


def test_both_exports_record_the_dtype_holding_most_bytes(tmp_path):
    """bf16 matrices beside more (small) fp32 norms and biases: the export from a checkpoint recorded the dtype of the
    most tensors (float32) and ``export_hf`` of the live model the one of the most bytes (bfloat16), so the same
    weights came out as two different models under ``dtype="auto"``. Both record the bytes' choice now."""
    from rynnscale.checkpoint.export import export_checkpoint_hf
    from rynnscale.checkpoint.hf import export_hf

    torch.manual_seed(0)
    cfg = w.tiny_hf_config(num_experts=0, tie=False)
    model = w.build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.numel() > 512:     # the matrices; norms, biases, k/v of 512 stay fp32
                p.data = p.data.to(torch.bfloat16)
    dts = [p.dtype for p in model.parameters()]
    assert dts.count(torch.float32) > dts.count(torch.bfloat16)                     # more fp32 tensors ...
    size = {dt: sum(p.numel() for p in model.parameters() if p.dtype == dt) for dt in set(dts)}
    assert 2 * size[torch.bfloat16] > 4 * size[torch.float32]                      # ... but more bf16 bytes
    opt, sched = w.build_optim(model, 3)
    ckpt = CheckpointManager(tmp_path / "run").save(1, model, opt, sched, model_config=cfg)
    export_checkpoint_hf(ckpt, tmp_path / "from_ckpt")
    export_hf(model.state_dict().items(), model.args, tmp_path / "live")
    for d in ("from_ckpt", "live"):
        assert json.loads((tmp_path / d / "config.json").read_text())["dtype"] == "bfloat16", d


def test_cli_export_into_a_non_empty_directory_names_the_flag(tmp_path, capsys):
    """The refusal told a command-line user to 'pass overwrite=True' (the Python keyword), not the flag."""
    cfg = w.tiny_hf_config(num_experts=0)
    model = w.build_model(cfg)
    opt, sched = w.build_optim(model, 1)
    ckpt = CheckpointManager(tmp_path / "run").save(1, model, opt, sched, model_config=cfg,
                                                    config={"model": {"arch": cfg}, "data": {"tokenizer": None}})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert cli_main(["ckpt", "export-hf", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not empty; pass --overwrite" in err, err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
