"""Evaluation during training.

- grounding_scores: hand-computed point errors, box IoUs, frame-matched trajectory errors, format validity,
  recall and exact match;
- Evaluator on a tiny model and a synthetic held-out set: eval loss equals transformers' loss (the oracle:
  the exported weights, each held-out sample alone, labels -> HF's mean CE, weighted by token counts) over
  every held-out sample once; the grounding metrics equal those of transformers' greedy ``generate`` from
  the same prompts; the model comes back in train mode without gradients;
- eval.* config validation names the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from rynnscale.checkpoint.hf import export_model
from rynnscale.config import ConfigError, load_config
from rynnscale.data.reader import expand_shard_patterns, iter_tar_samples
from rynnscale.train.build import build_model
from rynnscale.train.data_files import eval_data_dir, generate_eval_synthetic
from rynnscale.train.evaluate import (
    Evaluator,
    box_iou,
    eval_shard_patterns,
    grounding_scores,
    split_prompt,
    summarize_grounding,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
IMG, VID, IM_END = 151655, 151656, 151645


def metrics(gen: str, ref: str) -> dict:
    return summarize_grounding(grounding_scores(gen, ref))


def test_grounding_metrics_by_hand() -> None:
    ref = "The cup. <object> <frame 1>: (100, 100), (300, 300) </object> grasp <affordance> (500, 500) </affordance>"
    m = metrics(ref, ref)
    assert m["grounding_box_iou"] == 1.0 and m["grounding_point_error"] == 0.0
    assert m["grounding_exact_match"] == m["grounding_format_valid"] == m["grounding_tag_recall"] == 1.0
    assert m["grounding_traj_error"] is None  # no trajectory anywhere
    # box shifted by 100 in x: intersection 100x200, union 2*200*200 - 100*200 -> 1/3; point off by (30, 40) -> 50
    gen = "cup <object> <frame 1>: (200, 100), (400, 300) </object> <affordance> (530, 540) </affordance>"
    m = metrics(gen, ref)
    assert m["grounding_box_iou"] == pytest.approx(1 / 3) and m["grounding_point_error"] == pytest.approx(50.0)
    assert m["grounding_exact_match"] == 0.0 and m["grounding_format_valid"] == 1.0
    # trajectories are compared on common frames: generated starts one frame later
    ref_t = "<traj> <frame 0>: (0, 0), (10, 0), (20, 0) </traj>"
    gen_t = "<traj> <frame 1>: (10, 30), (20, 40), (90, 90) </traj>"   # frames 1, 2 match; frame 3 has no reference
    m = metrics(gen_t, ref_t)
    assert m["grounding_traj_error"] == pytest.approx((30 + 40) / 2)
    # malformed / missing tags: lenient parse still scores what it can; strict format fails; recall counts
    m = metrics("<traj> <frame 0>: (0, 0), (10, 0) <object>(1,2)</object>", ref_t)
    assert m["grounding_format_valid"] == 0.0 and m["grounding_tag_recall"] == 0.0
    m = metrics("no tags at all", ref)
    assert m["grounding_format_valid"] == 0.0 and m["grounding_tag_recall"] == 0.0 and m["grounding_box_iou"] is None
    m = metrics("<OBJECT> <frame 1>: (200, 200) </OBJECT>", ref)  # a point for a box: centre distance, 0 here
    assert m["grounding_point_error"] == 0.0 and m["grounding_format_valid"] == 0.0  # upper case is not the format
    # the right place on another frame is a miss, as the GRPO reward scores it: box IoU 0, the point not a distance
    m = metrics("<object> <frame 3>: (100, 100), (300, 300) </object> <affordance> <frame 2>: (500, 500) "
                "</affordance>", ref)
    assert m["grounding_box_iou"] == 0.0 and m["grounding_point_error"] is None
    assert m["grounding_tag_recall"] == 1.0 and m["grounding_frame_match"] == 0.0
    assert metrics(ref, ref)["grounding_frame_match"] == 1.0
    assert metrics("<traj> <frame 7>: (0, 0) </traj>", ref_t)["grounding_frame_match"] == 0.0   # no common frame
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 1.0 and box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    # totals of several samples are token-free sums: two samples -> means over both
    t = {k: grounding_scores(gen, ref)[k] + grounding_scores(ref, ref)[k] for k in grounding_scores(ref, ref)}
    s = summarize_grounding(t)
    assert s["grounding_samples"] == 2 and s["grounding_box_iou"] == pytest.approx((1 + 1 / 3) / 2)


def tiny_cfg(tmp_path: Path, *extra: str):
    return load_config(RECIPES / "demo_tiny.yaml", [
        f"run.output_dir={tmp_path / 'run'}", "data.synthetic.num_samples=2", "eval.synthetic_samples=5",
        "eval.grounding_samples=2", "eval.max_new_tokens=6", "eval.every_steps=1", "train.micro_batch_tokens=256",
        "model.attn_backend=loop", "model.arch.text_config.num_hidden_layers=2", *extra])


def hf_inputs(s) -> dict:
    ids = s.input_ids_l[None]
    tt = torch.zeros_like(ids)
    tt[ids == IMG] = 1
    tt[ids == VID] = 2
    kw = {k: getattr(s, k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
          if getattr(s, k) is not None}
    return dict(input_ids=ids, mm_token_type_ids=tt, **kw)


def test_evaluator_matches_transformers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path)
    generate_eval_synthetic(cfg)
    patterns = eval_shard_patterns(cfg)
    args, model = build_model(cfg.model, torch.device("cpu"), seed=0)
    model.train()
    ev = Evaluator(cfg, args, rank=0, world_size=1)
    out = ev.evaluate(model)
    assert model.training and all(p.grad is None for p in model.parameters())

    # oracle: transformers on the exported weights, every held-out sample alone
    export_model(model, args, tmp_path / "hf")
    hf = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    samples = [ev.encoder.encode(r.key, r.members) for p in expand_shard_patterns(patterns) for r in iter_tar_samples(p)]
    assert len(samples) == 5
    loss_sum, n_tok = 0.0, 0
    grounding = []
    with torch.no_grad():
        for s in samples:
            n = int((s.labels_l[1:] != -100).sum())
            loss_sum += float(hf(**hf_inputs(s), labels=s.labels_l[None], use_cache=False).loss) * n
            n_tok += n
        for s in samples[:2]:
            prompt, ref_ids = split_prompt(s, ev.encoder.ids, ev.encoder.spec.merge_size)
            kw = hf_inputs(prompt)
            gen = hf.generate(**kw, attention_mask=torch.ones_like(kw["input_ids"]), do_sample=False,
                              max_new_tokens=6, eos_token_id=[IM_END], pad_token_id=IM_END)
            new = gen[0, kw["input_ids"].shape[1]:].tolist()
            grounding.append(grounding_scores(ev._decode(new), ev._decode(ref_ids)) | {"truncated": float(IM_END not in new)})
    assert out["eval_tokens"] == n_tok
    assert out["eval_loss"] == pytest.approx(loss_sum / n_tok, rel=1e-5)
    assert math.isfinite(out["eval_loss"]) and out["eval_loss"] > 5  # random init on a 152k vocabulary
    want = summarize_grounding({k: sum(g[k] for g in grounding) for k in grounding[0]})
    got = {k: v for k, v in out.items() if k.startswith("grounding_")}
    assert got == pytest.approx(want) and got["grounding_samples"] == 2

    # max_batches caps the held-out batches; a second evaluation gives the same numbers (fresh loader)
    assert ev.evaluate(model) == pytest.approx(out)
    capped = Evaluator(tiny_cfg(tmp_path, "eval.max_batches=1", "eval.grounding_samples=0"), args).evaluate(model)
    assert 0 < capped["eval_tokens"] < n_tok and "grounding_box_iou" not in capped


def test_eval_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens"):
        tiny_cfg(tmp_path, "eval.max_new_tokens=0")
    with pytest.raises(ConfigError, match=r"eval.every_steps"):
        tiny_cfg(tmp_path, "eval.every_steps=-1")
    with pytest.raises(ConfigError, match=r"eval.every_steps.*no held-out data"):
        tiny_cfg(tmp_path, "eval.synthetic_samples=0")
    with pytest.raises(ConfigError, match=r"unknown config key 'eval.bogus'"):
        tiny_cfg(tmp_path, "eval.bogus=1")
    cfg = tiny_cfg(tmp_path, "eval.shards=[/nowhere/*.tar]")
    with pytest.raises(ValueError, match=r"/nowhere"):
        Evaluator(cfg, None)


def test_synthetic_question_types_reach_both_sets(tmp_path: Path) -> None:
    """``data.synthetic.questions`` narrows the held-out set like the training set; an unknown type is a
    ConfigError naming the key before anything is written."""
    with pytest.raises(ConfigError, match=r"data.synthetic.questions.*'pointing'"):
        generate_eval_synthetic(tiny_cfg(tmp_path, "data.synthetic.questions=[pointing]", "eval.synthetic_samples=4"))
    cfg = tiny_cfg(tmp_path, "data.synthetic.questions=[affordance]", "eval.synthetic_samples=4")
    generate_eval_synthetic(cfg)
    (shard,) = expand_shard_patterns([str(eval_data_dir(cfg) / "*.tar")])
    answers = [json.loads(s.members["conv.json"])["conversation"][-1]["content"][0]["text"]
               for s in iter_tar_samples(shard)]
    assert len(answers) == 4 and all("<affordance>" in a for a in answers), answers


def test_split_prompt_keeps_only_the_prompts_media() -> None:
    """A two-turn sample with an image (and a video) in each user turn: the prompt (up to the first answer) carries
    the first turn's image and video only, equal to the prompt of that turn alone -- not every grid of the sample,
    which the prefill rejects (pad tokens vs grid)."""
    import io

    import numpy as np
    from PIL import Image

    from rynnscale.data.encode import EncoderConfig, SampleEncoder
    from rynnscale.data.tokenizer import load_tokenizer
    from rynnscale.data.vision_preprocess import VisionSpec
    from rynnscale.data_pipelines.synthetic import encode_video_frames

    def png(seed: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, 96, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    video, video_name = encode_video_frames(np.random.default_rng(2).integers(0, 255, (4, 64, 64, 3), np.uint8), 2.0)
    turn = lambda media, q, a: [  # noqa: E731
        {"role": "user", "content": [*media, {"type": "text", "text": q}]},
        {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    first = turn([{"type": "image", "image": "a.png"}, {"type": "video", "video": video_name}], "Point to the cup.",
                 "<affordance> (10, 20) </affordance>")
    second = turn([{"type": "image", "image": "b.png"}], "And here?", "<affordance> (30, 40) </affordance>")
    members = {"a.png": png(0, 64), "b.png": png(1, 128), video_name: video, "meta.json": b'{"video": {"fps": 2.0}}'}
    enc = SampleEncoder(load_tokenizer(None), EncoderConfig(max_tokens=4096, vision=VisionSpec(
        image_min_pixels=1024, image_max_pixels=96 * 128)))

    def encode(conv: list) -> object:
        return enc.encode("mt", {**members, "conv.json": json.dumps({"conversation": conv}).encode()})

    both, alone = encode(first + second), encode(first)
    assert both.image_grid_thw.shape[0] == 2   # the sample has both images
    (p_both, ref_both), (p_alone, ref_alone) = (split_prompt(s, enc.ids, enc.spec.merge_size) for s in (both, alone))
    assert ref_both == ref_alone
    for name in ("input_ids_l", "position_ids_3l", "pixel_values", "image_grid_thw", "pixel_values_videos",
                 "video_grid_thw"):
        assert torch.equal(getattr(p_both, name), getattr(p_alone, name)), name
    # a text-only first turn: no media at all in its prompt
    p_text, _ = split_prompt(encode(turn([], "Hello?", "Hi.") + second), enc.ids, enc.spec.merge_size)
    assert p_text.pixel_values is None and p_text.image_grid_thw is None and p_text.pixel_values_videos is None


def test_bad_held_out_samples_are_counted_and_the_loss_is_over_the_rest(tmp_path: Path, caplog) -> None:
    """A held-out sample that fails to decode was skipped without a word: the eval loss silently covered fewer
    samples. It is now counted (``eval_skipped``, summed over ranks) and logged by reason; the loss equals the
    evaluation of the good samples alone."""
    import io
    import tarfile

    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, "eval.grounding_samples=0")
    generate_eval_synthetic(cfg)
    samples = [r for p in expand_shard_patterns(eval_shard_patterns(cfg)) for r in iter_tar_samples(p)]

    def write(path: Path, rows) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tf:
            for key, members in rows:
                for name, data in sorted(members.items()):
                    ti = tarfile.TarInfo(f"{key}.{name}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))

    rows = [(r.key, dict(r.members)) for r in samples]
    bad = dict(rows[1][1], **{"conv.json": b"{not json"})
    write(tmp_path / "with_bad" / "eval-000000.tar", [rows[0], (rows[1][0], bad), *rows[2:]])
    write(tmp_path / "good_only" / "eval-000000.tar", [rows[0], *rows[2:]])
    args, model = build_model(cfg.model, torch.device("cpu"), seed=0)

    def evaluate(d: str) -> dict:
        c = tiny_cfg(tmp_path, "eval.grounding_samples=0", f"eval.shards=[{tmp_path / d / '*.tar'}]")
        return Evaluator(c, args).evaluate(model)

    with caplog.at_level("WARNING", logger="rynnscale.train.evaluate"):
        got = evaluate("with_bad")
    want = evaluate("good_only")
    assert got["eval_skipped"] == 1 and want["eval_skipped"] == 0
    assert "1 held-out samples skipped on rank 0 (bad_json=1" in caplog.text
    assert got["eval_tokens"] == want["eval_tokens"] > 0
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)


def test_every_evaluation_reaches_the_metrics_file_whatever_log_every_says(tmp_path: Path) -> None:
    """eval.every_steps=1 with train.log_every=2: the evaluation of step 1 ran but its line was not written, so its
    results were lost (they are computed only then). Every evaluated step now has its line with ``eval_loss``."""
    from rynnscale.train.trainer import run_training

    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path, "train.max_steps=3", "train.log_every=2", "eval.grounding_samples=0",
                   "eval.synthetic_samples=4", "data.num_workers=0", "logging.progress=false", "logging.plot=false",
                   "logging.wandb.mode=disabled")
    run_training(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(math.isfinite(r["eval_loss"]) and r["eval_tokens"] > 0 for r in lines)


def test_filler_prompts_do_not_hold_up_a_ranks_generation(tmp_path: Path) -> None:
    """A rank with fewer prompt groups than its peers decodes a filler prompt in lockstep. Before, a filler never
    stopped, so such a rank (and through the all-reduce, every rank) decoded all ``eval.max_new_tokens`` steps
    whatever the real answers did; now decoding ends when the real prompts have stopped."""
    from rynnscale.models.generate import SamplingParams, generate
    from rynnscale.train.evaluate import _text_prompt

    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, "eval.grounding_samples=3")   # eval.max_new_tokens=6
    generate_eval_synthetic(cfg)
    args, model = build_model(cfg.model, torch.device("cpu"), seed=0)
    model.eval()
    ev = Evaluator(cfg, args, rank=1, world_size=2)          # rank 1 of 2, 3 samples: 1 real prompt
    mine = ev.grounding_samples()
    assert len(mine) == 1 and ev._num_found == 3
    first = generate(model, [mine[0][0]], SamplingParams(1))[0]
    ev.eos_ids = first                                       # the real answer stops at its first token
    assert generate(model, [_text_prompt(first * 2)], SamplingParams(1))[0] != first   # the filler would not
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    # the all-reduce as rank 1 sees it: rank 0 has two prompt groups (the per-rank group counts are the one
    # 2-element vector), and is done whenever rank 1 is; so rank 1 decodes its prompt, then a filler
    peers = lambda v: [2.0, *v[1:]] if len(v) == 2 else list(v)  # noqa: E731
    out = ev._grounding(model, torch.device("cpu"), peers, lockstep=True)
    assert len(forwards) == 2, f"{len(forwards)} forwards: decoding waited for the filler (2 = the two prefills)"
    assert out["grounding_samples"] == 1


def test_generations_cut_by_max_new_tokens_are_counted_and_warned(tmp_path: Path, caplog) -> None:
    """An answer longer than ``eval.max_new_tokens`` is cut and scores as a miss (no closing tag, no exact match)
    however right it is, and nothing said so: with the default of 96 tokens, long trajectories lost their tags
    silently. Now ``grounding_truncated`` is the share of generations that ran out of tokens without the stop
    token, and a warning names the references that cannot fit in ``eval.max_new_tokens``."""
    from rynnscale.models.generate import SamplingParams, generate

    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path)   # eval.max_new_tokens=6, eval.grounding_samples=2
    generate_eval_synthetic(cfg)
    args, model = build_model(cfg.model, torch.device("cpu"), seed=0)
    ev = Evaluator(cfg, args)
    mine = ev.grounding_samples()
    ref_lens = [len(ref) for _, ref in mine]
    assert len(mine) == 2 and min(ref_lens) > 6   # every reference needs more than 6 tokens
    with caplog.at_level("WARNING", logger="rynnscale.train.evaluate"):
        out = ev.evaluate(model)
    assert f"2 of 2 grounding references are longer than eval.max_new_tokens=6 (longest {max(ref_lens)} tokens" \
        in caplog.text
    # the oracle: the same greedy generations, one prompt at a time, checked for the stop token by hand
    model.eval()
    gens = [generate(model, [p], SamplingParams(6, stop_ids=(IM_END,)))[0] for p, _ in mine]
    want = sum(IM_END not in g for g in gens) / 2
    assert want == 1.0 and out["grounding_truncated"] == want

    # answers that stop (the stop token set to each answer's first token) are not truncated
    ev.eos_ids = [g[0] for g in gens]
    assert ev.evaluate(model)["grounding_truncated"] == 0.0


def test_the_held_out_set_is_streamed_not_held_in_memory(tmp_path: Path) -> None:
    """The eval loss read EVERY held-out micro-batch into a list before the first forward (to know how many forwards
    the busiest rank runs), so host memory grew with the held-out set: ~10 MB of pixels per video sample, thousands
    of samples per rank. Batches are now evaluated as they are read (the ranks agree on one more forward by an
    all-reduce each): at most the current batch and the first (the filler of a rank that runs out) are alive."""
    import weakref

    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, "eval.grounding_samples=0", "eval.synthetic_samples=8")
    generate_eval_synthetic(cfg)
    args, model = build_model(cfg.model, torch.device("cpu"), seed=0)
    ev = Evaluator(cfg, args)
    want = ev.evaluate(model)
    read, alive = [], []

    class Tracked:
        """The real loader, remembering (weakly) every batch it yields."""

        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            for b in self.inner:
                read.append(weakref.ref(b))
                yield b

        def __getattr__(self, name):
            return getattr(self.inner, name)

    real_loader = ev.loader
    ev.loader = lambda: Tracked(real_loader())
    model.register_forward_pre_hook(lambda *_: alive.append(sum(r() is not None for r in read)))
    got = ev.evaluate(model)
    assert len(read) >= 4 and len(alive) == len(read)   # one forward per held-out batch
    assert max(alive) <= 2, f"{max(alive)} of {len(read)} held-out batches alive at once"
    assert got == want


def test_the_sample_level_split_warning_names_the_held_out_set(tmp_path: Path, caplog) -> None:
    """A one-shard held-out set (the synthetic one by default) on several ranks is split by sample, with a warning
    that said ``train_shards has 1 shards for 2 readers`` at every evaluation: the user was sent to re-shard the
    TRAINING data, which was fine. It names the held-out set (``eval.shards`` when given)."""
    cfg = tiny_cfg(tmp_path, "eval.grounding_samples=0")
    generate_eval_synthetic(cfg)
    args, _ = build_model(cfg.model, meta=True)
    (shard,) = expand_shard_patterns(eval_shard_patterns(cfg))
    for c, name in ((cfg, "the synthetic eval set"),
                    (tiny_cfg(tmp_path, "eval.grounding_samples=0", f"eval.shards=[{shard}]"), "eval.shards")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="rynnscale.data.loader"):
            Evaluator(c, args, rank=0, world_size=2).loader()
        assert f"{name} has 1 shards for 2 readers" in caplog.text and "train_shards" not in caplog.text, caplog.text


def test_grounding_prefill_rows_keep_to_the_micro_batch_budget(tmp_path: Path) -> None:
    """The grounding prompts were prefilled 16 to a row whatever their length: 16 video prompts of a few thousand
    tokens made one forward many times the ``train.micro_batch_tokens`` the run's memory was planned for (an
    out-of-memory in the middle of training, at its first evaluation). A prefill row now holds prompts up to that
    budget (a longer prompt alone); the answers are those of each prompt decoded alone."""
    from rynnscale.models.generate import SamplingParams, generate

    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, "eval.grounding_samples=4", "train.micro_batch_tokens=100", "eval.max_new_tokens=3")
    generate_eval_synthetic(cfg)
    args, model = build_model(cfg.model, torch.device("cpu"), seed=0)
    ev = Evaluator(cfg, args)
    mine = ev.grounding_samples()
    lens = [int(p.input_ids_l.numel()) for p, _ in mine]
    assert len(mine) == 4 and max(lens) <= 100 < sum(lens)   # each fits the budget, all four together do not
    rows: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, a: rows.append(int(a[0].input_ids_l.numel())))
    got = ev._grounding(model.eval(), torch.device("cpu"), lambda v: list(v))
    hook.remove()
    prefills = [n for n in rows if n > len(mine)]   # the decode rows hold one token per sequence
    assert prefills and max(prefills) <= 100, rows
    alone = [generate(model, [p], SamplingParams(3, stop_ids=(IM_END,)))[0] for p, _ in mine]
    want = [grounding_scores(ev._decode(g), ev._decode(ref)) | {"truncated": float(IM_END not in g)}
            for g, (_, ref) in zip(alone, mine)]
    assert got == pytest.approx(summarize_grounding({k: sum(w[k] for w in want) for k in want[0]}))
