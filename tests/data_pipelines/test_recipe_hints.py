"""Cost hints made for the run that trains on them: ``rynnscale data convert ... --recipe RECIPE.yaml [key=value]``
makes the manifest's hints with the encoder the trainer builds from that recipe (its data settings, token budget,
tokenizer and model family's chat template), and the loader under that recipe uses them."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from rynnscale.cli import main

ROOT = Path(__file__).resolve().parents[2]
# Qwen3.5 (its chat template adds a reasoning block), 8 frames at most; the image bounds raised above the
# defaults (a sample grows: default hints would be refused), the video ones lowered
OVERRIDES = ["train.micro_batch_tokens=2048", "data.image_min_pixels=131072", "data.image_max_pixels=262144",
             "data.video_max_frames=4"]


def _jsonl(tmp_path: Path) -> tuple[Path, Path]:
    """Six lines: images of three sizes, and a 10-frame video (a frame list)."""
    media = tmp_path / "media"
    media.mkdir()
    for i in range(10):
        Image.new("RGB", (48, 32), (10 * i, 80, 40)).save(media / f"f{i}.jpg")
    lines = []
    for i, (w, h) in enumerate([(64, 64), (200, 120), (40, 90), (64, 64), (300, 300)]):
        Image.new("RGB", (w, h), (30 * i, 100, 50)).save(media / f"{i}.jpg")
        lines.append({"conversation": [
            {"role": "user", "content": [{"type": "image", "image": f"{i}.jpg"}, {"type": "text", "text": "Where?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"<object> ({i}, 20) </object>"}]}]})
    lines.append({"conversation": [
        {"role": "user", "content": [{"type": "video", "video": [f"f{i}.jpg" for i in range(10)]},
                                     {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "  The robot waits.  "}]}]})
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({**line, "licence": "CC0-1.0"}) + "\n" for line in lines))
    return src, media


def _recipe(tmp_path: Path, out: Path) -> Path:
    """The tiny Qwen3.5 recipe training on ``out``'s shards."""
    r = tmp_path / "recipe.yaml"
    r.write_text(f"extends: {ROOT / 'recipes/tiny/base/qwen3_5_9b.yaml'}\n"
                 f"data:\n  mixture: []\n  train_shards: ['{out}/*.tar']\n")
    return r


def test_hints_made_with_the_recipe_are_the_runs_sizes_and_used(tmp_path: Path, monkeypatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The hints equal what the run's encoder measures for every sample (exactly: token and patch counts), and
    the loader under the recipe plans on them: no 'cost hints' line, no sample measured again. Before, the
    converters could only take --tokenizer: hints had the default settings and the Qwen3-VL template."""
    from rynnscale.config import load_config
    from rynnscale.config.model_args import resolve_model_args
    from rynnscale.data.balance import CostModel
    from rynnscale.data.encode import SampleEncoder
    from rynnscale.data.loader import LoaderConfig, TrainLoader
    from rynnscale.data.manifest import read_manifest
    from rynnscale.data.pipeline import build_encoder
    from rynnscale.data.reader import iter_tar_samples

    src, media = _jsonl(tmp_path)
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, out)
    assert main(["data", "convert", "jsonl", str(src), str(out), "--media-root", str(media), "--lines-per-shard", "4",
                 "--no-progress", "--recipe", str(recipe), *OVERRIDES]) == 0
    m = read_manifest(out)
    hints = {}
    for s in m.shards:
        for r, t, v in zip(iter_tar_samples(str(out / s.name)), s.sample_costs["num_tokens"],
                           s.sample_costs["vision_patches"], strict=True):
            hints[r.key] = (t, v)
    assert len(hints) == 6
    assert m.info["cost_hints"]["encoder"]["chat_template"] == "qwen3_5"

    cfg = load_config(recipe, OVERRIDES, check_paths=False)
    args = resolve_model_args(cfg.model).args
    enc = build_encoder(cfg, args)   # the trainer's
    assert enc.chat_template == "qwen3_5" and enc.cfg.max_frames == 4
    for s in m.shards:
        for r in iter_tar_samples(str(out / s.name)):
            e = enc.encode(r.key, r.members)
            assert (e.num_tokens, e.num_vision_patches) == hints[r.key], r.key

    measured: list[str] = []
    estimate = SampleEncoder.estimate
    monkeypatch.setattr(SampleEncoder, "estimate", lambda self, key, members: measured.append(key) or
                        estimate(self, key, members))
    loader_cfg = LoaderConfig.from_run_config(cfg, train_shards=[str(out / "*.tar")], cost_model=CostModel.from_args(args))
    loader = TrainLoader(replace(loader_cfg, num_epochs=1, num_workers=0), enc)
    with caplog.at_level(logging.INFO, logger="rynnscale.data"):
        keys = [k for st in loader for b in st.micro_batches if not b.filler for k in b.sample_keys]
    assert sorted(keys) == sorted(hints) and loader.bad_counts == {}
    assert measured == [] and "cost hints" not in caplog.text

    # the default hints (another chat template, smaller images) are not used by this run: its samples are larger
    plain = tmp_path / "plain"
    assert main(["data", "convert", "jsonl", str(src), str(plain), "--media-root", str(media), "--no-progress"]) == 0
    caplog.clear()
    loader = TrainLoader(replace(loader_cfg, train_shards=[str(plain / "*.tar")], num_epochs=1, num_workers=0), enc)
    with caplog.at_level(logging.INFO, logger="rynnscale.data"):
        keys = [k for st in loader for b in st.micro_batches if not b.filler for k in b.sample_keys]
    assert len(keys) == 6 and loader.bad_counts == {}
    assert "chat_template: 'qwen3_vl', this run 'qwen3_5'" in caplog.text and "not used" in caplog.text


def test_default_hints_under_another_chat_template_are_not_used(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Hints made by a converter without a recipe (the Qwen3-VL template; manifests record no template) under a
    Qwen3.5 run of the same pixel settings: its template adds a reasoning block to every answer, so each sample
    is larger than its hint; the hints used to be taken as exact, and packs planned on them overflowed (samples
    skipped)."""
    from rynnscale.config import load_config
    from rynnscale.config.model_args import resolve_model_args
    from rynnscale.data.encode import EncoderConfig, SampleEncoder
    from rynnscale.data.loader import LoaderConfig, TrainLoader
    from rynnscale.data.manifest import read_manifest
    from rynnscale.data.tokenizer import load_tokenizer
    from rynnscale.data_pipelines.jsonl import convert_jsonl
    from rynnscale.models import family_of

    src, media = _jsonl(tmp_path)
    out = tmp_path / "out"
    convert_jsonl(src, out, media_root=media, progress=False)
    hints = sorted(t for s in read_manifest(out).shards for t in s.sample_costs["num_tokens"])
    assert "chat_template" not in read_manifest(out).info["cost_hints"]["encoder"]
    args = resolve_model_args(load_config(ROOT / "recipes/tiny/base/qwen3_5_9b.yaml", check_paths=False).model).args
    # a budget two samples fill by their hints (90 + 107 tokens): 2 of 6 were lost as estimate_overflow
    enc = SampleEncoder(load_tokenizer(), EncoderConfig(max_tokens=197), token_ids=family_of(args).data(args))
    loader = TrainLoader(LoaderConfig(train_shards=[str(out / "*.tar")], micro_batch_tokens=197, pack_window=8,
                                      shuffle_buffer=0, num_epochs=1, max_bad_fraction=1.0), enc)
    with caplog.at_level(logging.INFO, logger="rynnscale.data"):
        sizes = sorted(int(n) for st in loader for b in st.micro_batches if not b.filler for n in b.cu_seqlens.diff())
    assert len(sizes) == 6 and loader.bad_counts == {}
    assert all(a > b for a, b in zip(sizes, hints, strict=True))   # every sample larger than its hint
    assert "chat_template: 'qwen3_vl', this run 'qwen3_5'" in caplog.text and "not used" in caplog.text
    assert "data convert ... --recipe RECIPE.yaml" in caplog.text   # the way to hints that fit (was: encoder_cfg)


@pytest.mark.parametrize("case", ["other_tokenizer", "overrides_without_recipe", "bad_override"])
def test_recipe_conflicts_exit_2(tmp_path: Path, capsys, case: str) -> None:
    """A --tokenizer the recipe does not train with, overrides without a recipe, a bad override: one line, exit 2."""
    src, media = _jsonl(tmp_path)
    out = tmp_path / "out"
    tok = tmp_path / "tok"
    tok.mkdir()
    from rynnscale.data.tokenizer import default_tokenizer_dir

    (tok / "tokenizer.json").write_bytes((default_tokenizer_dir() / "tokenizer.json").read_bytes())
    extra = {"other_tokenizer": ["--recipe", str(_recipe(tmp_path, out)), "--tokenizer", str(tok)],
             "overrides_without_recipe": ["train.micro_batch_tokens=2048"],
             "bad_override": ["--recipe", str(_recipe(tmp_path, out)), "data.video_max_frames=-1"]}[case]
    assert main(["data", "convert", "jsonl", str(src), str(out), "--media-root", str(media), "--no-progress",
                 *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert {"other_tokenizer": "is not the tokenizer the recipe trains with",
            "overrides_without_recipe": "give the recipe with --recipe",
            "bad_override": "data.video_max_frames"}[case] in err
    assert not (out / "manifest.json").exists()


def test_hints_of_truncated_samples_are_not_used_with_a_longer_budget(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A recipe with data.truncate: the hints are the samples cut to its 40-token budget. A run cutting at 80 sees
    two of them larger (45, 46 tokens): planned on the hints, one was skipped as estimate_overflow. Such hints are
    now measured again (warning); the run with the recipe's own budget uses them."""
    from rynnscale.config import load_config
    from rynnscale.config.model_args import resolve_model_args
    from rynnscale.data.balance import CostModel
    from rynnscale.data.loader import LoaderConfig, TrainLoader
    from rynnscale.data.manifest import read_manifest
    from rynnscale.data.pipeline import build_encoder
    from rynnscale.data.reader import iter_tar_samples

    src, media = _jsonl(tmp_path)
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, out)
    assert main(["data", "convert", "jsonl", str(src), str(out), "--media-root", str(media), "--no-progress",
                 "--max-bad-fraction", "1", "--recipe", str(recipe), "data.truncate=true",
                 "train.micro_batch_tokens=40"]) == 0   # (the video line keeps no answer at 40 tokens: bad)

    def run(budget: int) -> tuple[list[int], list[int], dict]:
        """(sizes the loader trained, sizes the run's encoder gives each sample alone, bad counts)."""
        cfg = load_config(recipe, ["data.truncate=true", f"train.micro_batch_tokens={budget}"], check_paths=False)
        args = resolve_model_args(cfg.model).args
        enc = build_encoder(cfg, args)
        lc = LoaderConfig.from_run_config(cfg, train_shards=[str(out / "*.tar")], cost_model=CostModel.from_args(args))
        loader = TrainLoader(replace(lc, num_epochs=1, num_workers=0, pack_window=8, shuffle_buffer=0,
                                     max_bad_fraction=1.0), enc)
        sizes = sorted(int(n) for st in loader for b in st.micro_batches if not b.filler for n in b.cu_seqlens.diff())
        alone = sorted(enc.encode(r.key, r.members).num_tokens for t in sorted(out.glob("*.tar"))
                       for r in iter_tar_samples(str(t)))
        return sizes, alone, loader.bad_counts

    hints = sorted(t for s in read_manifest(out).shards for t in s.sample_costs["num_tokens"])
    with caplog.at_level(logging.INFO, logger="rynnscale.data"):
        sizes, alone, bad = run(80)
    assert sizes == alone and len(sizes) == 5 and bad == {} and max(alone) > max(hints) == 40
    assert "truncate at max_tokens: 40, this run 80" in caplog.text and "not used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rynnscale.data"):
        sizes, alone, bad = run(40)
    assert sizes == alone == hints and bad == {} and "cost hints" not in caplog.text


def test_resume_with_other_recipe_settings_names_the_setting(tmp_path: Path, capsys) -> None:
    """A rerun into the directory with another recipe override is refused naming the encoder setting that differs;
    the message used to show the same first 120 characters of the two settings dicts."""
    src, media = _jsonl(tmp_path)
    out = tmp_path / "out"
    args = ["data", "convert", "jsonl", str(src), str(out), "--media-root", str(media), "--no-progress",
            "--recipe", str(_recipe(tmp_path, out))]
    assert main([*args, *OVERRIDES]) == 0
    capsys.readouterr()
    assert main([*args, *OVERRIDES[:-1], "data.video_max_frames=6"]) == 2
    err = capsys.readouterr().err
    assert "cost_hints.encoder.max_frames: '4' -> '6'" in err


def test_inspect_with_the_recipe_counts_the_runs_tokens(tmp_path: Path, capsys) -> None:
    """``rynnscale data inspect DIR --recipe RECIPE [key=value]``: the token counts are the run's encoder's (here
    Qwen3.5's template and raised image bounds); they used to be the default settings' only."""
    from rynnscale.config import load_config
    from rynnscale.config.model_args import resolve_model_args
    from rynnscale.data.pipeline import build_encoder
    from rynnscale.data.reader import iter_tar_samples

    src, media = _jsonl(tmp_path)
    out = tmp_path / "out"
    assert main(["data", "convert", "jsonl", str(src), str(out), "--media-root", str(media), "--no-progress"]) == 0
    recipe = _recipe(tmp_path, out)
    cfg = load_config(recipe, OVERRIDES, check_paths=False)
    enc = build_encoder(cfg, resolve_model_args(cfg.model).args)
    want = [enc.encode(r.key, r.members).num_tokens for t in sorted(out.glob("*.tar")) for r in iter_tar_samples(str(t))]
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--json", "--recipe", str(recipe), *OVERRIDES]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert (tokens["count"], tokens["sum"], tokens["min"], tokens["max"]) == (6, sum(want), min(want), max(want))
    assert main(["data", "inspect", str(out), "--json", *OVERRIDES]) == 2   # overrides without a recipe
    assert "give the recipe with --recipe" in capsys.readouterr().err
    assert main(["data", "inspect", str(out), "--recipe", str(recipe), "--no-estimate"]) == 2   # was ignored
    assert "--no-estimate counts none" in capsys.readouterr().err
    assert main(["data", "inspect", str(out), "--recipe", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_samples_over_the_recipes_budget_stay_in_the_shards(tmp_path: Path) -> None:
    """A recipe whose budget (170 tokens) three of the six samples (174 tokens) exceed, without data.truncate:
    they used to be left out of the shards as too_long (3 of 6 bad: the conversion failed, and a run with a larger
    budget could never have them). Now they are written with their exact sizes as hints; the run skips them as
    too_long (counted), the others train."""
    from rynnscale.config import load_config
    from rynnscale.config.model_args import resolve_model_args
    from rynnscale.data.balance import CostModel
    from rynnscale.data.loader import LoaderConfig, TrainLoader
    from rynnscale.data.manifest import read_manifest
    from rynnscale.data.pipeline import build_encoder
    from rynnscale.data.reader import iter_tar_samples

    src, media = _jsonl(tmp_path)
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, out)
    overrides = [*OVERRIDES[1:], "train.micro_batch_tokens=170"]
    assert main(["data", "convert", "jsonl", str(src), str(out), "--media-root", str(media), "--no-progress",
                 "--recipe", str(recipe), *overrides]) == 0
    hints = [t for s in read_manifest(out).shards for t in s.sample_costs["num_tokens"]]
    big = load_config(recipe, [*OVERRIDES[1:], "train.micro_batch_tokens=4096"], check_paths=False)
    enc = build_encoder(big, resolve_model_args(big.model).args)
    sizes = [enc.encode(r.key, r.members).num_tokens for t in sorted(out.glob("*.tar")) for r in iter_tar_samples(str(t))]
    assert hints == sizes and len(sizes) == 6 and sum(n > 170 for n in sizes) == 3

    cfg = load_config(recipe, overrides, check_paths=False)
    args = resolve_model_args(cfg.model).args
    lc = LoaderConfig.from_run_config(cfg, train_shards=[str(out / "*.tar")], cost_model=CostModel.from_args(args))
    loader = TrainLoader(replace(lc, num_epochs=1, num_workers=0, max_bad_fraction=1.0), build_encoder(cfg, args))
    trained = sorted(int(n) for st in loader for b in st.micro_batches if not b.filler for n in b.cu_seqlens.diff())
    assert trained == sorted(n for n in sizes if n <= 170) and loader.bad_counts == {"too_long": 3}


def _tokenizer_dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(A: the bundled Qwen3 tokenizer, B: A with "e" and "o" as added tokens: text splits at every e and o, so
    samples are longer under B; C: a copy of A in another directory)."""
    from rynnscale.data.tokenizer import default_tokenizer_dir, load_tokenizer

    a, b, c = tmp_path / "tok_a", tmp_path / "tok_b", tmp_path / "tok_c"
    for d in (a, b, c):
        d.mkdir()
    data = (default_tokenizer_dir() / "tokenizer.json").read_bytes()
    (a / "tokenizer.json").write_bytes(data)
    (c / "tokenizer.json").write_bytes(data)
    tok = load_tokenizer(a)
    tok.add_tokens(["e", "o"])
    tok.save(str(b / "tokenizer.json"))
    return a, b, c


def _run_tokens(out: Path, tokenizer: Path, budget: int, caplog: pytest.LogCaptureFixture, monkeypatch=None):
    """(sizes of the samples trained, bad counts, keys measured by ``estimate``) of one epoch over ``out`` under a
    run reading its data with ``tokenizer`` at the default settings and a ``budget`` token budget."""
    from rynnscale.data.encode import EncoderConfig, SampleEncoder
    from rynnscale.data.loader import LoaderConfig, TrainLoader
    from rynnscale.data.tokenizer import load_tokenizer

    measured: list[str] = []
    if monkeypatch is not None:
        estimate = SampleEncoder.estimate
        monkeypatch.setattr(SampleEncoder, "estimate", lambda self, key, members: measured.append(key) or
                            estimate(self, key, members))
    enc = SampleEncoder(load_tokenizer(tokenizer), EncoderConfig(max_tokens=budget))
    loader = TrainLoader(LoaderConfig(train_shards=[str(out / "*.tar")], micro_batch_tokens=budget, pack_window=8,
                                      shuffle_buffer=0, num_epochs=1, max_bad_fraction=1.0), enc)
    with caplog.at_level(logging.INFO, logger="rynnscale.data"):
        sizes = sorted(int(n) for st in loader for b in st.micro_batches if not b.filler for n in b.cu_seqlens.diff())
    return sizes, loader.bad_counts, measured


@pytest.mark.parametrize("manifest", ["fingerprint", "path_only"])
def test_hints_of_another_tokenizer_are_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 manifest: str) -> None:
    """Hints made with tokenizer A, a run reading with B (A plus two added tokens: every sample longer than its
    hint). Manifests recorded the tokenizer only as a path, which the loader did not compare: packs planned on
    the low hints overflowed the budget and samples were lost as estimate_overflow. Now the manifest records a
    fingerprint of the tokenizer's content; another one leaves the hints unused (every sample measured, one
    warning naming the way to hints that fit). A manifest without the fingerprint (older converters) is judged by
    the tokenizer at its recorded path, where that is on this machine."""
    from rynnscale.data.manifest import MANIFEST_NAME, read_manifest

    src, media = _jsonl(tmp_path)
    tok_a, tok_b, _ = _tokenizer_dirs(tmp_path)
    out = tmp_path / "out"
    assert main(["data", "convert", "jsonl", str(src), str(out), "--media-root", str(media), "--no-progress",
                 "--tokenizer", str(tok_a)]) == 0
    if manifest == "path_only":
        m = json.loads((out / MANIFEST_NAME).read_text())
        m["info"]["cost_hints"].pop("tokenizer_sha256", None)
        (out / MANIFEST_NAME).write_text(json.dumps(m))
    hints = sorted(t for s in read_manifest(out).shards for t in s.sample_costs["num_tokens"])
    budget = hints[-1] + hints[-2]   # the two longest fill a pack by their hints
    sizes, bad, _ = _run_tokens(out, tok_b, budget, caplog)
    assert len(sizes) == 6 and bad == {}, bad   # was {'estimate_overflow': 2}
    assert all(a > b for a, b in zip(sizes, hints, strict=True))   # every sample longer than its hint
    assert f"tokenizer: {str(tok_a)!r} (sha256 " in caplog.text and "not used" in caplog.text
    assert caplog.text.count("cost hints") == 1 and "data convert ... --recipe RECIPE.yaml" in caplog.text


def test_hints_of_the_same_tokenizer_elsewhere_are_used(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch) -> None:
    """The run's tokenizer is a copy of the converter's in another directory: the content decides, not the path
    (the hints are used: no sample measured, no warning). Also for a manifest without the fingerprint whose
    recorded tokenizer path is not on this machine (converted elsewhere): used as before."""
    from rynnscale.data.manifest import MANIFEST_NAME, read_manifest

    src, media = _jsonl(tmp_path)
    tok_a, _, tok_c = _tokenizer_dirs(tmp_path)
    out = tmp_path / "out"
    assert main(["data", "convert", "jsonl", str(src), str(out), "--media-root", str(media), "--no-progress",
                 "--tokenizer", str(tok_a)]) == 0
    assert len(read_manifest(out).info["cost_hints"]["tokenizer_sha256"]) == 64
    hints = sorted(t for s in read_manifest(out).shards for t in s.sample_costs["num_tokens"])
    sizes, bad, measured = _run_tokens(out, tok_c, 4096, caplog, monkeypatch)
    assert sizes == hints and bad == {} and measured == [] and "cost hints" not in caplog.text

    m = json.loads((out / MANIFEST_NAME).read_text())
    del m["info"]["cost_hints"]["tokenizer_sha256"]
    m["info"]["cost_hints"]["tokenizer"] = str(tmp_path / "elsewhere")
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    caplog.clear()
    sizes, bad, measured = _run_tokens(out, tok_c, 4096, caplog, monkeypatch)
    assert sizes == hints and bad == {} and measured == [] and "cost hints" not in caplog.text


def test_a_conversion_from_before_the_fingerprint_resumes(tmp_path: Path, capsys) -> None:
    """A directory whose manifest has no tokenizer fingerprint (converted before it was recorded) resumes with the
    same tokenizer path (the new fingerprint is not 'another setting'); another path is still refused."""
    from rynnscale.data.manifest import MANIFEST_NAME, read_manifest

    src, media = _jsonl(tmp_path)
    tok_a, _, tok_c = _tokenizer_dirs(tmp_path)
    out = tmp_path / "out"
    args = ["data", "convert", "jsonl", str(src), str(out), "--media-root", str(media), "--no-progress"]
    assert main([*args, "--tokenizer", str(tok_a)]) == 0
    m = json.loads((out / MANIFEST_NAME).read_text())
    sha = m["info"]["cost_hints"].pop("tokenizer_sha256")
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    capsys.readouterr()
    assert main([*args, "--tokenizer", str(tok_a)]) == 0, capsys.readouterr().err
    assert read_manifest(out).info["cost_hints"]["tokenizer_sha256"] == sha
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    assert main([*args, "--tokenizer", str(tok_c)]) == 2
    assert "cost_hints.tokenizer:" in capsys.readouterr().err
