"""Training-step numerics: accumulation equals one big batch; schedule shape; checkpointing is exact."""

import copy
import math

import pytest
import torch

from rynnscale.batch import PackedBatch, filler_batch
from rynnscale.config.schema import OptimConfig
from rynnscale.models.qwen3_vl.args import Qwen3VLArgs
from rynnscale.models.qwen3_vl.model import Qwen3VLForConditionalGeneration
from rynnscale.parallel.activation_checkpoint import apply_activation_checkpointing
from rynnscale.train.optim import build_optimizer, build_scheduler, lr_factor, warmup_steps, warmup_warning
from rynnscale.train.step import train_step

VOCAB = 151936


def tiny_args(num_experts: int, aux_coef: float = 0.0) -> Qwen3VLArgs:
    return Qwen3VLArgs.from_hf_config({
        "model_type": "qwen3_vl_moe" if num_experts else "qwen3_vl",
        "text_config": {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "mrope_section": [1, 1, 2],
                        "num_experts": num_experts, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                        "router_aux_loss_coef": aux_coef},
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                          "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
    }, strict=False)


def text_sample(gen: torch.Generator, length: int) -> dict:
    ids = torch.randint(0, 5000, (length,), generator=gen)
    labels = ids.clone()
    labels[: length // 3] = -100  # a "prompt" without loss
    labels[0] = -100
    pos = torch.arange(length).expand(3, length)
    return {"ids": ids, "labels": labels, "pos": pos}


def pack(samples: list[dict]) -> PackedBatch:
    lens = [s["ids"].numel() for s in samples]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    return PackedBatch(
        input_ids_l=torch.cat([s["ids"] for s in samples]), labels_l=torch.cat([s["labels"] for s in samples]),
        position_ids_3l=torch.cat([s["pos"] for s in samples], dim=1), cu_seqlens=cu, max_seqlen=max(lens))


def make_model(args, seed=0):
    model = Qwen3VLForConditionalGeneration(args, attn_backend="loop")
    model.init_weights(seed)
    return model


STEP_KW = dict(device=torch.device("cpu"), compute_dtype=torch.float32, loss_chunk_tokens=16, max_grad_norm=1.0)


def twin_models(args):
    """Two identical models with SGD each. SGD: parameter differences are then exactly lr x gradient
    differences (Adam's first step is ~lr*sign(g) and would amplify fp32 rounding of near-zero gradients)."""
    m1 = make_model(args)
    m2 = copy.deepcopy(m1)
    m2.tie_weights()
    return m1, m2, torch.optim.SGD(m1.parameters(), lr=0.1), torch.optim.SGD(m2.parameters(), lr=0.1)


@pytest.mark.parametrize("num_experts", [0, 4])
def test_grad_accum_equals_one_big_batch(num_experts):
    """Loss = mean over all target tokens of the step, so 2 micro-batches == 1 row with both (no aux loss)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    samples = [text_sample(gen, n) for n in (17, 29, 11, 23)]
    m1, m2, o1, o2 = twin_models(tiny_args(num_experts))
    s1 = train_step(m1, o1, [pack(samples[:2]), pack(samples[2:])], **STEP_KW)
    s2 = train_step(m2, o2, [pack(samples)], **STEP_KW)
    assert s1.target_tokens == s2.target_tokens > 0
    assert math.isclose(s1.loss, s2.loss, rel_tol=1e-6)
    assert math.isclose(s1.grad_norm, s2.grad_norm, rel_tol=1e-5)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=n)
    if num_experts:
        assert torch.equal(s1.expert_counts, s2.expert_counts)
        assert s1.expert_counts.sum() == 2 * 2 * sum(s["ids"].numel() for s in samples)  # layers * top-k * tokens


@pytest.mark.parametrize("num_experts", [0, 4])
def test_filler_micro_batch_trains_nothing(num_experts):
    """[batch, filler] == [batch]: same loss, MoE balancing loss, token / sample / expert counts and updated
    weights; the filler still runs forward and backward (it keeps a rank's collectives in step with its peers).
    The balancing loss is a mean over the REAL forwards: counting the filler's halved it (and its gradient)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    real = pack([text_sample(gen, n) for n in (19, 13)])
    m1, m2, o1, o2 = twin_models(tiny_args(num_experts, aux_coef=0.01))
    fill = filler_batch(7)
    assert fill.filler and fill.num_target_tokens == 1 and not real.filler
    calls = []
    hook = m1.lm_head.register_forward_hook(lambda *_: calls.append(1))
    s1 = train_step(m1, o1, [real, fill], **STEP_KW)
    hook.remove()
    s2 = train_step(m2, o2, [real], **STEP_KW)
    assert len(calls) == 2                       # the filler ran
    assert (s1.loss, s1.tokens, s1.samples, s1.target_tokens) == (s2.loss, s2.tokens, s2.samples, s2.target_tokens)
    assert s1.grad_norm == pytest.approx(s2.grad_norm, rel=1e-6)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7, msg=n)
    if num_experts:
        assert torch.equal(s1.expert_counts, s2.expert_counts)
        assert s2.aux_loss > 0 and s1.aux_loss == pytest.approx(s2.aux_loss, rel=1e-12)


def test_step_of_fillers_only_leaves_weights_alone():
    """After a real AdamW step (momentum set), a step of fillers only does not move the weights (Adam would
    move them by its momentum on zero gradients); the next real step proceeds normally."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    m = make_model(tiny_args(0))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    kw = STEP_KW
    train_step(m, opt, [pack([text_sample(gen, 21)])], **kw)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    s = train_step(m, opt, [filler_batch(), filler_batch(5)], **kw)
    assert s.target_tokens == 0 and s.tokens == 0 and s.samples == 0 and s.loss == 0.0 and s.finite
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n
    train_step(m, opt, [pack([text_sample(gen, 21)])], **kw)
    assert any(not torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_loss_is_token_mean_cross_entropy():
    """Our step loss equals a plain float64 cross-entropy mean over shifted targets, per sample."""
    gen = torch.Generator().manual_seed(2)
    samples = [text_sample(gen, n) for n in (13, 21)]
    model = make_model(tiny_args(0)).double()
    batch = pack(samples)
    with torch.no_grad():
        out = model(batch)
        ours = model.loss_sum(batch, out, chunk_tokens=7) / batch.num_target_tokens
        logits = model.logits(out.hidden_ld)
        total, count = 0.0, 0
        cu = batch.cu_seqlens.tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            t = batch.labels_l[a + 1:b]
            keep = t != -100
            total += torch.nn.functional.cross_entropy(logits[a:b - 1][keep], t[keep], reduction="sum").item()
            count += int(keep.sum())
    assert count == batch.num_target_tokens
    assert math.isclose(ours.item(), total / count, rel_tol=1e-10)


@pytest.mark.parametrize("mode,every", [("full", 1), ("every_k", 2)])
def test_activation_checkpointing_is_exact(mode, every):
    gen = torch.Generator().manual_seed(3)
    batch = pack([text_sample(gen, n) for n in (19, 14)])
    args = tiny_args(4, aux_coef=0.01)
    ref = make_model(args)
    ckpt = copy.deepcopy(ref)
    ckpt.tie_weights()
    apply_activation_checkpointing(ckpt, mode, every=every)
    kw = dict(device=torch.device("cpu"), compute_dtype=torch.float32, loss_chunk_tokens=16, max_grad_norm=0.0)
    opt_cfg = OptimConfig(lr=1e-3)
    s_ref = train_step(ref, build_optimizer(ref, opt_cfg), [batch], **kw)
    s_ck = train_step(ckpt, build_optimizer(ckpt, opt_cfg), [batch], **kw)
    assert s_ref.loss == s_ck.loss and s_ref.aux_loss == s_ck.aux_loss
    ref_params = dict(ref.named_parameters())
    for n, p in ckpt.named_parameters():
        torch.testing.assert_close(p, ref_params[n.replace("._checkpoint_wrapped_module", "")], rtol=0, atol=0, msg=n)


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, cfg, 110) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warmup
    assert f[60] == pytest.approx(0.55)                  # half way: mid point of [0.1, 1]
    assert f[110] == pytest.approx(0.1)
    lin = OptimConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(50, lin, 100) == pytest.approx(0.5)
    assert lr_factor(7, OptimConfig(lr=1.0, schedule="constant"), 100) == 1.0


def test_resumed_optimizer_takes_the_recipes_settings_and_keeps_its_moments():
    """What a resume does (optimiser state, then scheduler state, loaded into objects built from the NEW recipe):
    weight decay, betas, eps and lr are the new recipe's -- equal to a fresh build of it at that step -- while
    Adam's moments and step counts are the checkpoint's. Before, the saved groups' settings came back and a changed
    ``optim.weight_decay`` (or lr) was silently ignored."""
    gen = torch.Generator().manual_seed(4)
    model = make_model(tiny_args(0))
    old_cfg = OptimConfig(lr=1e-2, weight_decay=0.1, beta2=0.95, warmup_steps=2)
    opt = build_optimizer(model, old_cfg)
    sched = build_scheduler(opt, old_cfg, 10)
    train_step(model, opt, [pack([text_sample(gen, 21)])], **STEP_KW)
    sched.step()
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    new_cfg = OptimConfig(lr=3e-3, weight_decay=0.0, beta2=0.99, eps=1e-6, warmup_steps=0, schedule="linear")
    resumed = build_optimizer(model, new_cfg)
    resumed_sched = build_scheduler(resumed, new_cfg, 20)
    resumed.load_state_dict(saved_opt)
    resumed_sched.load_state_dict(saved_sched)
    fresh = build_optimizer(model, new_cfg)
    fresh_sched = build_scheduler(fresh, new_cfg, 20)
    fresh.step()
    fresh_sched.step()   # a fresh run of the new recipe, one step in
    keys = ("weight_decay", "betas", "eps", "lr", "initial_lr")
    assert [{k: g[k] for k in keys} for g in resumed.param_groups] == \
        [{k: g[k] for k in keys} for g in fresh.param_groups]
    assert resumed_sched.get_last_lr() == fresh_sched.get_last_lr()
    trained = [p for p in model.parameters() if p in opt.state]   # (the vision tower saw no image)
    assert trained and all(p in resumed.state for p in trained)
    for p in trained:
        assert torch.equal(resumed.state[p]["exp_avg"], opt.state[p]["exp_avg"])
        assert int(resumed.state[p]["step"]) == 1


def test_warmup_ratio_is_the_ceiling_of_the_exact_fraction():
    """warmup_ratio=0.07 of 100 steps is 7 warmup steps (exact decimal arithmetic as the reference); the float
    product 7.000000000000001 rounded up to 8."""
    from fractions import Fraction

    for ratio, steps in ((0.1, 30), (0.07, 100), (0.3, 10), (0.15, 7), (0.01, 50), (0.25, 8)):
        want = math.ceil(Fraction(str(ratio)) * steps)
        assert warmup_steps(OptimConfig(warmup_ratio=ratio), steps) == want, (ratio, steps)
    assert warmup_steps(OptimConfig(warmup_ratio=0.07), 100) == 7


def test_warmup_covering_the_run_is_warned_about_naming_both_keys():
    """optim.warmup_steps >= train.max_steps: a warning (a resumed run may raise max_steps), saying whether the
    lr ever reaches optim.lr."""
    assert warmup_warning(OptimConfig(lr=3e-3, warmup_steps=3), 4) is None
    msg = warmup_warning(OptimConfig(lr=3e-3, warmup_steps=100), 4)
    assert "optim.warmup_steps=100" in msg and "train.max_steps=4" in msg
    assert "never reaches optim.lr=0.003" in msg and "peaks at 0.04 x optim.lr" in msg
    assert "only at the last step" in warmup_warning(OptimConfig(lr=1.0, warmup_steps=4), 4)
    assert "optim.warmup_ratio=0.99" in warmup_warning(OptimConfig(warmup_ratio=0.99), 10)


class _WeightedSamples:
    """A test objective plugged in through the objective seam (no edit of train/step.py): cross-entropy where
    sample i of each row counts ``weights[i]`` times, averaged over the weighted target count, plus a logged
    extra metric. Checked against a float64 reference computed here from full logits."""

    name = "weighted"
    per_count = ("loss",)

    def __init__(self, weights):
        self.weights = weights

    def _token_weights(self, batch):
        cu = batch.cu_seqlens.tolist()
        w = torch.zeros(batch.num_tokens, dtype=torch.float32)
        for i in range(len(cu) - 1):
            w[cu[i]:cu[i + 1]] = self.weights[i]
        targets = torch.cat([batch.labels_l[1:], batch.labels_l.new_full((1,), -100)])
        return w * (targets != -100), targets

    def normalizer(self, micro_batches, ctx):
        from rynnscale.train.objectives import StepNormalizer

        total = sum(float(self._token_weights(b)[0].sum()) for b in micro_batches if not b.filler)
        return StepNormalizer(count=int(ctx.sum_data([total])[0]), forwards=len(micro_batches) * ctx.dp_size)

    def loss(self, model, batch, norm, ctx):
        from rynnscale.train.objectives import MicroBatchLoss

        w, targets = self._token_weights(batch)
        logits = model.logits(model(batch).hidden_ld)
        ce = torch.nn.functional.cross_entropy(logits.float(), targets.clamp(min=0), reduction="none")
        s = (ce * w).sum()
        return MicroBatchLoss(s / max(norm.count, 1), {"loss": s.detach(), "weighted_tokens": w.sum()})


def test_a_new_objective_plugs_in_without_editing_the_step():
    gen = torch.Generator().manual_seed(4)
    samples = [text_sample(gen, n) for n in (17, 23)]
    m, ref, opt, _ = twin_models(tiny_args(0))
    batch = pack(samples)
    s = train_step(m, opt, [batch], objective=_WeightedSamples([1, 2]), **STEP_KW)
    # reference in float64: weighted mean of per-token cross-entropy, gradient by autograd
    ref = ref.double()
    logits = ref.logits(ref(batch).hidden_ld)
    w, targets = _WeightedSamples([1, 2])._token_weights(batch)
    ce = torch.nn.functional.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    want = (ce * w.double()).sum() / w.sum()
    assert s.loss == pytest.approx(float(want.detach()), rel=1e-5)
    assert s.metrics["weighted_tokens"] == float(w.sum()) and s.target_tokens == int((targets != -100).sum())
    want.backward()
    grad_ref = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ref.parameters() if p.grad is not None))
    assert s.grad_norm == pytest.approx(grad_ref, rel=1e-4)


def test_one_process_says_it_ignores_the_parallel_sizes(caplog):
    """parallel.ep / cp / dp_replicate > 1 in a single process: named in a warning (they were ignored silently)."""
    import logging
    from pathlib import Path

    from rynnscale.config import load_config
    from rynnscale.parallel.distributed import DistContext
    from rynnscale.train.build import resolve_run

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "demo_tiny.yaml"
    with caplog.at_level(logging.WARNING, logger="rynnscale.train.build"):
        resolve_run(load_config(recipe, ["parallel.ep=2"]), DistContext())
    assert "one process: parallel.ep=2 ignored" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rynnscale.train.build"):
        resolve_run(load_config(recipe), DistContext())
    assert "ignored" not in caplog.text
