"""Every command in a ```bash block of README.md runs here exactly as written (issue 28), so a README command
cannot break unnoticed.

The README's commands run in README order from a fresh working directory that looks like the repository root
(``recipes/`` linked in, ``../shared/data`` next to it): later commands read what earlier ones wrote, as a
newcomer's would. ``rynnscale`` is the package's console entry point (``rynnscale.cli:main``): a training run is
a fresh ``python -m rynnscale`` process (its output is a pipe, not a terminal, as in a batch job), every other
command calls ``main`` with the README's arguments; ``torchrun`` is ``python -m torch.distributed.run`` (only
its default port comes from the environment, ``PET_MASTER_PORT``, so parallel jobs on a machine do not
collide). Only the documented placeholders ``/path/to/...`` are replaced, by the fixtures named in
``PLACEHOLDERS``; ``pip install`` and ``bash .ci/run`` are CI's own steps (``.ci/run``). A command with no runner
or an unknown placeholder fails ``test_every_readme_command_has_a_runner``.

What the README claims next to a command is checked against what the command did: an exit status (``exit N``
in its comment, else 0), a planner figure (``55.5 GiB`` in the comment = the plan's memory needed per GPU), the
metrics every step logs (the README's list), the quick start's loss and files, a rollback's losses, the
parameter count ``ckpt inspect`` reports, and that an export loads in transformers with a working tokenizer.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from shared_data import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI = REPO / ".ci" / "run"
RUNNERS = ("rynnscale", "torchrun")
CI_STEPS = ("pip", "bash")   # pip install (CI's install line) and bash .ci/run (CI itself)
PLACEHOLDERS = ("/path/to/Qwen3-VL-MoE-dir", "/path/to/convs.jsonl", "/path/to/media")
SHELL = re.compile(r"[|;<>`]|\$\(|^&$")


@dataclass
class Command:
    line: int            # README line where it starts
    text: str            # as written (continuations joined)
    argv: list[str]
    comment: str


def _split_comment(text: str) -> tuple[str, str]:
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip(), text[i + 1:].strip()
    return text.rstrip(), ""


def readme_blocks(path: Path = README) -> list[list[Command]]:
    """The commands of every ```bash block, in order (``a && b`` is two commands)."""
    blocks, cur, pending, start = [], None, "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if cur is None:
            if raw.strip() == "```bash":
                cur = []
            continue
        if raw.strip() == "```":
            blocks.append(cur)
            cur = None
            continue
        if not pending:
            start = n
        pending += raw.strip() if pending else raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        code, comment = _split_comment(pending)
        pending = ""
        if not code:
            continue
        argv: list[str] = []
        for tok in shlex.split(code) + ["&&"]:
            if tok != "&&":
                argv.append(tok)
                continue
            cur.append(Command(start, code, argv, comment))
            argv = []
    return blocks


def needs_shared_data(block: list[Command]) -> bool:
    return any("../shared/data" in c.text for c in block)


def _ci_install_args() -> list[str]:
    """The arguments of CI's ``pip install`` (``.ci/run``), without ``-q``."""
    for ln in CI.read_text().splitlines():
        toks = shlex.split(ln, comments=True)
        if "pip" in toks and "install" in toks:
            return [t for t in toks[toks.index("pip") + 1:] if t != "-q"]
    raise AssertionError(f"{CI} has no pip install line")


def test_every_readme_command_has_a_runner() -> None:
    """Each README command is run by a test below, or is one of CI's own steps, and uses known placeholders."""
    cmds = [c for b in readme_blocks() for c in b]
    assert len(cmds) >= 20, f"only {len(cmds)} commands parsed from {README}"
    problems = []
    for c in cmds:
        if any(SHELL.search(t) for t in c.argv):
            problems.append(f"README.md:{c.line}: shell syntax the test cannot run as written: {c.text}")
        unknown = {m for m in re.findall(r"/path/to/[\w.\-]+", c.text) if m not in PLACEHOLDERS}
        if unknown:
            problems.append(f"README.md:{c.line}: placeholders without a fixture in tests/test_readme.py: {unknown}")
        if c.argv[0] == "pip":
            if c.argv[1:] != _ci_install_args():
                problems.append(f"README.md:{c.line}: `{' '.join(c.argv)}` differs from CI's install line in {CI}")
        elif c.argv == ["bash", ".ci/run"]:
            if not CI.is_file():
                problems.append(f"README.md:{c.line}: {CI} does not exist")
        elif c.argv[0] not in RUNNERS:
            problems.append(f"README.md:{c.line}: no runner for `{c.argv[0]}` (tests/test_readme.py runs "
                            f"{RUNNERS}): {c.text}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------ running them
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    rc: int
    out: str


class Workspace:
    """A directory that looks like a fresh checkout's root, where README commands run."""

    def __init__(self, root: Path, placeholders: dict[str, Path]):
        self.dir = root / "rynnscale"
        self.dir.mkdir(parents=True)
        (self.dir / "recipes").symlink_to(REPO / "recipes")
        if SHARED_DATA.is_dir():
            (root / "shared").mkdir()
            (root / "shared" / "data").symlink_to(SHARED_DATA)
        self.placeholders = {k: str(v) for k, v in placeholders.items()}
        self.logged_params: dict[Path, str] = {}   # run dir -> "10.59": the parameter count (M) its run logged

    def argv(self, c: Command) -> list[str]:
        out = []
        for tok in c.argv:
            for k, v in self.placeholders.items():
                tok = tok.replace(k, v)
            out.append(tok)
        return out

    def run(self, c: Command) -> Result:
        argv = self.argv(c)
        if argv[0] in CI_STEPS:
            return Result(0, "")   # CI's own steps (test_every_readme_command_has_a_runner checks them)
        env = dict(os.environ, PYTHONPATH=str(REPO), PET_MASTER_PORT=str(_free_port()))
        if argv[0] == "torchrun" or (argv[1] == "train" and "--print-config" not in argv):
            exe = ["-m", "torch.distributed.run"] if argv[0] == "torchrun" else ["-m", "rynnscale"]
            p = subprocess.run([sys.executable, *exe, *argv[1:]], cwd=self.dir, env=env, capture_output=True,
                               text=True, timeout=2400)
            return Result(p.returncode, p.stdout + p.stderr)
        from rynnscale.cli import main

        buf, cwd = io.StringIO(), os.getcwd()
        try:
            os.chdir(self.dir)
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                rc = main(argv[1:])
        finally:
            os.chdir(cwd)
        return Result(rc, buf.getvalue())


def _expected_rc(c: Command) -> int:
    m = re.search(r"\bexit (\d+)", c.comment)
    return int(m.group(1)) if m else 0


def _train_run(ws: Workspace, argv: list[str]):
    """(resolved config, output dir) of a ``rynnscale train`` / ``torchrun ... rynnscale train`` command."""
    from rynnscale.config import load_config

    i = argv.index("train")
    cfg = load_config(ws.dir / argv[i + 1], [a for a in argv[i + 2:] if "=" in a and not a.startswith("-")],
                      check_paths=False)
    return cfg, ws.dir / cfg.run.output_dir


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def readme_metric_keys() -> list[str]:
    """The keys the README says every ``metrics.jsonl`` line holds."""
    text = " ".join(README.read_text().split())
    m = re.search(r"Each step appends to `metrics\.jsonl`: (.*?) wandb runs", text)
    assert m, "README no longer lists the metrics keys ('Each step appends to `metrics.jsonl`: ...')"
    return re.findall(r"`(\w+)`", m.group(1))


def check_train(ws: Workspace, c: Command, res: Result, before: dict[int, float] | None) -> None:
    cfg, out = _train_run(ws, ws.argv(c))
    records = _metrics(out)
    assert [r["step"] for r in records] == list(range(1, cfg.train.max_steps + 1)), c.text
    keys = readme_metric_keys()
    missing = {k for r in records for k in keys if k not in r}
    assert not missing, f"{c.text}: metrics.jsonl lines lack {missing} (README lists them for every step)"
    assert all(isinstance(r["skipped_samples"], int) for r in records)
    if cfg.logging.progress and c.argv[0] == "rynnscale":   # output redirected: plain lines, no bar redraws
        assert "\r" not in res.out and f"step {cfg.train.max_steps}/{cfg.train.max_steps} (100%)" in res.out, \
            res.out[-2000:]
    m = re.search(r"model: \w+, ([\d.]+)M parameters", res.out)
    if m and cfg.model.lora.rank == 0:
        ws.logged_params[out] = m.group(1)
    if before:   # a rollback (checkpoint.resume=PATH) logs the losses of the steps it runs again, bit for bit
        again = {r["step"]: r["loss"] for r in records if r["step"] in before}
        assert again and again == {s: before[s] for s in again}, (again, before)


def check_quick_start(ws: Workspace) -> None:
    """The README's quick-start claims: loss from 11.9 (ln 151,936) to about 0.9, and the files it lists."""
    out = ws.dir / "runs/demo_tiny"
    records = _metrics(out)
    losses = [r["loss"] for r in records]
    assert records[0]["lr"] < records[9]["lr"]   # warmup
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["expert_load_max_over_mean"] >= 1.0 for r in records)
    assert all(r["model_tflops_per_s"] > 0 and r["mfu"] is None for r in records)   # no peak rate known for a CPU
    assert abs(losses[0] - math.log(151936)) < 0.1, losses[:3]
    tail = sum(losses[-20:]) / 20
    assert 0.6 < tail < 1.2, f"mean loss of the last 20 steps {tail:.3f}, README says about 0.9"
    for name in ("metrics.jsonl", "config.yaml", "synthetic_data/manifest.json", "checkpoints/step_000200/COMPLETE"):
        assert (out / name).is_file(), name
    assert (out / "training.png").stat().st_size > 10_000
    assert any((out / "wandb").glob("offline-run-*")), "wandb should log offline by default"


def check_plan(c: Command, res: Result) -> None:
    m = re.search(r"([\d.]+) GiB", c.comment)
    if m:
        needed = float(re.search(r"= needed\s+([\d.]+) GiB", res.out).group(1))
        decimals = len(m.group(1).split(".")[1]) if "." in m.group(1) else 0
        assert f"{needed:.{decimals}f}" == m.group(1), f"README says {m.group(1)} GiB, the plan {needed} GiB: {c.text}"


def check_inspect(ws: Workspace, argv: list[str], res: Result) -> None:
    """Complete, and the parameters its run logged at start (a tied head counted once)."""
    assert "complete:   yes" in res.out
    params = int(re.search(r"model:\s+\d+ tensors, ([\d,]+) parameters", res.out).group(1).replace(",", ""))
    logged = ws.logged_params[(ws.dir / argv[3]).parents[1]]
    assert f"{params / 1e6:.2f}" == logged, (params, logged)


def check_export(ws: Workspace, argv: list[str]) -> None:
    import transformers

    from rynnscale.data.tokenizer import load_tokenizer

    out = ws.dir / argv[4]   # rynnscale ckpt export-hf CKPT OUT
    text = "Where is the red cup? <traj> (500, 400) </traj>"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(text)["input_ids"] == load_tokenizer(None).encode(text).ids
    hf = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert sum(p.numel() for p in hf.parameters()) > 0
    if "--adapter" in argv:
        adapter = json.loads((ws.dir / argv[argv.index("--adapter") + 1] / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == ws.placeholders["/path/to/Qwen3-VL-MoE-dir"]


def run_blocks(ws: Workspace, blocks: list[list[Command]]) -> int:
    """Run the commands of ``blocks`` in order and check each; returns how many ran."""
    n = 0
    for c in (c for b in blocks for c in b):
        argv = ws.argv(c)
        before = None
        m = re.search(r"checkpoint\.resume=(\S+)/checkpoints/step_(\d+)", " ".join(argv))
        if m and argv[0] in RUNNERS:
            before = {r["step"]: r["loss"] for r in _metrics(ws.dir / m.group(1)) if r["step"] > int(m.group(2))}
        res = ws.run(c)
        n += 1
        assert res.rc == _expected_rc(c), f"README.md:{c.line}: `{c.text}` exited {res.rc}:\n{res.out[-4000:]}"
        if argv[0] in CI_STEPS:
            continue
        sub = argv[argv.index("rynnscale") + 1 if "rynnscale" in argv else 1]
        if sub == "train" and "--print-config" not in argv:
            check_train(ws, c, res, before)
            if argv == ["rynnscale", "train", "recipes/demo_tiny.yaml"]:
                check_quick_start(ws)
        elif sub == "plan":
            check_plan(c, res)
        elif argv[1:3] == ["ckpt", "inspect"]:
            check_inspect(ws, argv, res)
        elif argv[1:3] == ["ckpt", "export-hf"]:
            check_export(ws, argv)
    return n


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """A local transformers Qwen3-VL-MoE checkpoint with its tokenizer: ``/path/to/Qwen3-VL-MoE-dir``."""
    import torch
    import transformers
    from tiny_hf import tiny_hf_config

    from rynnscale.data.tokenizer import default_tokenizer_dir

    d = tmp_path_factory.mktemp("readme_fixtures") / "Qwen3-VL-MoE-dir"
    torch.manual_seed(0)
    transformers.AutoModelForImageTextToText.from_config(tiny_hf_config(moe=True)).save_pretrained(d)
    for f in default_tokenizer_dir().iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.mark.slow
def test_readme_training_commands_run_as_written(tmp_path, tiny_moe_dir) -> None:
    """Quick start, recipes, LoRA, context parallelism, planning, resuming, inspecting, exporting."""
    ws = Workspace(tmp_path, {"/path/to/Qwen3-VL-MoE-dir": tiny_moe_dir})
    blocks = [b for b in readme_blocks() if not needs_shared_data(b)]
    assert run_blocks(ws, blocks) == sum(map(len, blocks))
    assert ws.dir / "runs/demo_tiny" in ws.logged_params, "the quick start did not run"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA} "
                                                     "(set RYNNSCALE_SHARED_DATA)")
def test_readme_data_commands_run_as_written(tmp_path) -> None:
    """Synthesising, converting (LeRobot, jsonl, frames), inspecting, and training on the converted clips."""
    media = tmp_path / "media"
    (media / "frames").mkdir(parents=True)
    nav = SHARED_DATA / "rynnbrain_frames" / "navigation"
    for i in range(4):
        shutil.copy(nav / f"{i:03d}.jpg", media / "frames" / f"{i:03d}.jpg")
    turn = lambda user, answer: {"conversation": [  # noqa: E731
        {"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
    convs = tmp_path / "convs.jsonl"
    convs.write_text("\n".join(json.dumps(x) for x in (
        turn([{"type": "image", "image": "frames/000.jpg"}, {"type": "text", "text": "Where is the door?"}],
             "Here: <object> (400, 200), (600, 700) </object>"),
        {**turn([{"type": "video", "video": [f"frames/{i:03d}.jpg" for i in range(4)]},
                 {"type": "text", "text": "Where should I walk?"}], "Forward. <traj> <frame 0>: (500, 900), (520, 500) </traj>"),
         "fps": 1})) + "\n")
    ws = Workspace(tmp_path / "ws", {"/path/to/convs.jsonl": convs, "/path/to/media": media})
    blocks = [b for b in readme_blocks() if needs_shared_data(b)]
    assert run_blocks(ws, blocks) == sum(map(len, blocks)) > 0
    for name, n in (("data/synth", 200), ("data/convs", 2)):
        assert json.loads((ws.dir / name / "manifest.json").read_text())["total_samples"] == n, name
    assert all(r["skipped_samples"] == 0 for r in _metrics(ws.dir / "runs/g1"))
