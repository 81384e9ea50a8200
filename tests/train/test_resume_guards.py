"""Resume through the real trainer (issue 27), in process on the shortened demo recipe: a checkpoint resumed onto
another architecture or LoRA structure is refused before any weight is read (the report: a 4-layer checkpoint
resumed with 2 layers logged "resumed exactly"); settings that are not architecture (attention backend, kernels,
the balancing loss weight, LoRA dropout) may change. A LoRA run with dropout draws random numbers after the resume,
so its resumed losses equal the straight run's bit for bit only if the RNG states are restored. ``optim.lr=0`` runs
(one warning) and leaves every weight as initialised."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from rynnscale.checkpoint.dcp import CheckpointError
from rynnscale.config import load_config
from rynnscale.train.trainer import run_training

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("guard_data")


def _cfg(out: Path, data: Path, steps: int, *extra: str):
    return load_config(REPO / "recipes" / "demo_tiny.yaml", [
        f"run.output_dir={out}", f"train.max_steps={steps}", "checkpoint.every_steps=2",
        "data.synthetic.num_samples=32", "data.synthetic.samples_per_shard=16", f"data.synthetic.output_dir={data}",
        "train.micro_batch_tokens=384", "data.num_workers=0", "logging.progress=false", "logging.plot=false",
        "logging.wandb.mode=disabled", *extra])


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


class _Crash(RuntimeError):
    pass


class CrashAfter:
    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, step, ctx):
        if step == self.n:
            raise _Crash(f"killed after step {step}")


@pytest.fixture(scope="module")
def four_layer_run(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("arch") / "run"
    run_training(_cfg(out, data_dir, 2))
    return out


@pytest.mark.parametrize("override, field", [
    ("model.arch.text_config.num_hidden_layers=2", "text_config.num_hidden_layers: 4 -> 2"),
    ("model.arch.text_config.rope_theta=20000.0", "text_config.rope_parameters.rope_theta: 10000.0 -> 20000.0"),
    ("model.arch.text_config.num_experts_per_tok=1", "text_config.num_experts_per_tok: 2 -> 1"),
])
def test_resume_onto_another_architecture_is_refused(four_layer_run, data_dir, override, field):
    with pytest.raises(CheckpointError, match="another model architecture") as e:
        run_training(_cfg(four_layer_run, data_dir, 3, override))
    assert field in str(e.value)
    assert len(_losses(four_layer_run)) == 2   # refused before any step


def test_resume_with_another_data_order_setting_is_a_one_line_config_error(four_layer_run, data_dir):
    """A resume with another ``data.shuffle_buffer`` (or shard list, mixture) cannot continue the data order: it
    was a ``LoaderStateError`` traceback naming the loader's field, not the recipe key, nor a way on. Now a
    ConfigError (reported in one line) naming the key and what to do; nothing is trained."""
    from rynnscale.config import ConfigError

    with pytest.raises(ConfigError, match=r"saved with shuffle_buffer=128, this loader has 7 \(recipe: "
                                          r"data.shuffle_buffer\).*Set it back to continue this run.*model.init_from"):
        run_training(_cfg(four_layer_run, data_dir, 3, "data.shuffle_buffer=7"))
    assert len(_losses(four_layer_run)) == 2


def test_settings_that_are_not_architecture_may_change_on_resume(tmp_path, data_dir, caplog):
    out = tmp_path / "run"
    run_training(_cfg(out, data_dir, 2))
    with caplog.at_level(logging.INFO, logger="rynnscale"):
        run_training(_cfg(out, data_dir, 3, "model.attn_backend=sdpa_mask", "model.kernels=torch",
                          "model.arch.text_config.router_aux_loss_coef=0.01", "model.activation_checkpointing=full"))
    assert any("resumed exactly" in r.getMessage() for r in caplog.records)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_follows_the_recipes_learning_rate_and_max_steps(tmp_path, data_dir):
    """A run resumed with a new ``optim.lr`` and a longer ``train.max_steps`` continues the schedule of the NEW
    recipe from the resumed step (reference: torch's own LinearLR over the new settings). Before, the checkpoint's
    base lr was kept for the rest of the run and the first resumed step ran with the old schedule's lr (0 here,
    the end of its linear decay)."""
    out = tmp_path / "run"
    sched = ("optim.schedule=linear", "optim.warmup_steps=0", "optim.min_lr_ratio=0")
    run_training(_cfg(out, data_dir, 1, "optim.lr=1e-3", *sched))
    run_training(_cfg(out, data_dir, 3, "optim.lr=5e-4", *sched))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    ref = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=3)
    expected = []
    for _ in range(3):
        expected.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(1e-3, rel=1e-12)
    assert lrs[1:] == pytest.approx(expected[1:], rel=1e-12)


LORA = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.dropout=0.3", "optim.lr=2e-2")


def test_lora_dropout_resume_is_bitwise_and_lora_structure_is_pinned(tmp_path, data_dir, caplog):
    """Dropout draws from torch's generator after the resume: without the RNG restore the masks, hence the
    losses of steps 3-4, differ from the straight run. The refused resume is reported in one line (it was logged
    with a 20-frame traceback, like a crash, although the message says what to do)."""
    straight = tmp_path / "straight"
    run_training(_cfg(straight, data_dir, 4, *LORA))
    out = tmp_path / "resumed"
    with pytest.raises(_Crash):
        run_training(_cfg(out, data_dir, 4, *LORA), hooks=[CrashAfter(3)])   # last checkpoint: step 2
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="rynnscale.parallel.distributed"), \
            pytest.raises(CheckpointError, match=r"another LoRA structure .*model\.lora\.alpha: 8\.0 -> 16\.0"):
        run_training(_cfg(out, data_dir, 4, *LORA, "model.lora.alpha=16"))
    [report] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "another LoRA structure" in report and "Traceback" not in report, report
    run_training(_cfg(out, data_dir, 4, *LORA))
    assert _losses(out) == _losses(straight), (_losses(out), _losses(straight))


def test_resume_that_freezes_trained_adapters_is_refused(tmp_path, data_dir):
    """A LoRA checkpoint holds only what trained; a resume whose ``model.freeze`` now covers some trained adapters
    (here layer 0's experts: a warning at build, the option keeps its other layers) left them out of the load: they
    went back to ``B = 0`` and the next checkpoint and export no longer had them, silently. Refused, naming them."""
    out = tmp_path / "run"
    lora = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.experts=true", "optim.lr=2e-2")
    run_training(_cfg(out, data_dir, 2, *lora))
    with pytest.raises(CheckpointError, match=r"holds 4 trained tensor\(s\) that this run freezes \(model.language_model"
                                              r".layers.0.mlp.experts.down_proj_lora_A, .*reset them to their initial"):
        run_training(_cfg(out, data_dir, 4, *lora, "model.freeze=[model.language_model.layers.0.mlp.experts.*]"))
    assert len(_losses(out)) == 2


def test_lora_structure_check_ignores_unused_settings_and_fields_a_checkpoint_predates(tmp_path: Path) -> None:
    """Both runs full fine-tunes: a differing unused ``model.lora.alpha`` is no reason to refuse; a checkpoint
    written before a ``LoRAConfig`` field existed compares as that field's default; a real change is refused."""
    import dataclasses

    from rynnscale.config.schema import LoRAConfig
    from rynnscale.train.setup import check_same_adapters

    off = dataclasses.asdict(LoRAConfig())
    check_same_adapters({**off, "alpha": 32.0}, LoRAConfig(), tmp_path)
    lora = LoRAConfig(rank=4)
    older = {k: v for k, v in dataclasses.asdict(lora).items() if k != "vision"}
    check_same_adapters(older, lora, tmp_path)
    with pytest.raises(CheckpointError, match="model.lora.alpha"):
        check_same_adapters({**dataclasses.asdict(lora), "alpha": 32.0}, lora, tmp_path)
    # the same target patterns in another order (a reformatted recipe) adapt the same modules: no reason to refuse
    reordered = LoRAConfig(rank=4, targets=list(reversed(lora.targets)))
    check_same_adapters(dataclasses.asdict(lora), reordered, tmp_path)
    with pytest.raises(CheckpointError, match="model.lora.targets"):
        check_same_adapters(dataclasses.asdict(lora), LoRAConfig(rank=4, targets=lora.targets[:-1]), tmp_path)
