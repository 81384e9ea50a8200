"""bench/gpu_check.sh, the one-call GPU check, kept from rotting before a GPU comes: its dry run executes every
section on the CPU at tiny shapes (with ``$OUT`` set, as on the device machine) and each must succeed and
leave its JSON, its log in the archive and its line in the summary table printed last, within the device
tool's return limits. Its bench sections are also the smoke test of bench/train_step.py on every tiny case
(``check_bench_case``). Also: a section past its cap is killed with its whole process group, and sections past
the deadline are skipped and reported rather than run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.bench.bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
NAME_OK = re.compile(r"[A-Za-z0-9._-]+")


def _load_driver():
    return load_bench_script("gpu_check")


driver = _load_driver()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    return env | dict(PYTHON=sys.executable) | extra


@pytest.mark.slow  # spawns torchrun (twice) and a dozen Python processes: ~2 min on 2 cores
def test_dry_run_runs_every_section_and_reports_it(tmp_path):
    out = tmp_path / "OUT"
    out.mkdir()
    t0 = time.time()
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=tmp_path, env=_clean_env(OUT=str(out)),
                          capture_output=True, text=True, timeout=720)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]

    # what comes back from the device machine: at most 8 files of at most 16 MiB, plain names, <= 2 folders down
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["gpu_check.log", "gpu_check.tgz", "summary.json"]
    for p in files:
        rel = p.relative_to(out)
        assert all(NAME_OK.fullmatch(part) for part in rel.parts) and len(rel.parts) <= 3
        assert p.stat().st_size < 16 * 2 ** 20
    assert not any(tmp_path.glob("runs")), "with $OUT set nothing is written elsewhere in the tree"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry"] is True and summary["elapsed_s"] <= summary["deadline_s"]
    sections = {s["name"]: s for s in summary["sections"]}
    assert list(sections) == [s.name for s in driver.SECTIONS]
    for name, s in sections.items():
        assert s["status"] == "ok", (name, s.get("key"))
        assert s["seconds"] > 0 and s["key"], name
    res = {name: s["result"] for name, s in sections.items()}

    env = res["env"]
    assert env["device"] == "cpu" and env["matmul_tflops"] > 0 and env["versions"]["torch"]
    assert env["imports"]["tokenizer"] == "ok" and env["imports"]["omegaconf"] == "ok"

    # every GPU-marked test is collected, and skipped without a GPU
    gt = res["gpu_tests"]
    names = {t["name"].rsplit("::", 1)[-1].split("[")[0] for t in gt["tests"]}
    for want in ("test_varlen_backend_on_cuda", "test_varlen_backend_gradients_match_loop_on_cuda",
                 "test_liger_rms_norm_matches_torch", "test_model_with_liger_kernels_matches_torch_kernels",
                 "test_compiled_blocks_match_eager_on_cuda_bf16",
                 "test_cuda_bf16_kernel_matches_float64_at_a3b_expert_widths"):
        assert want in names, (want, sorted(names))
    assert gt["skipped"] == len(gt["tests"]) >= 10 and gt["passed"] == gt["failed"] == 0

    # the trainer through torchrun on gloo: 4 steps, a resume from step 2 equal to the bit, the export loads in
    # transformers and its loss equals ours from the same export
    tr = res["trainer"]
    assert tr["device"] == "cpu" and tr["straight"]["logged_steps"] == 4
    assert tr["resume"]["from_step"] == 2 and tr["resume"]["compared_steps"] == 2
    assert tr["resume"]["max_rel"] == 0.0 and tr["resume"]["exact_log"]
    assert "config.json" in tr["export"]["files"]
    el = tr["export_loss"]
    assert el["ok"] and el["samples"] == 4 and el["rel"] <= 1e-5 and el["targets"] == el["ours_targets"] > 0

    par = res["parity"]
    assert [c["case"] for c in par["cases"]] == ["packed", "video"] and par["ok"] and not par["partial"]
    for c in par["cases"]:
        assert c["steps"] == 3 and len(c["loss_rel"]) == 3 and max(c["loss_rel"]) <= 1e-2
        assert set(c["logits_rel_ours_vs_hf"]) == {"p50", "p90", "p99", "max"}
        assert c["logits_rel_hf_vs_fp32"]["p50"] > 0  # bf16 against fp32: a real, non-zero error

    for name in ("bench_a3b", "bench_packed", "bench_video", "bench_dense8b", "bench_lora_compile"):
        b = res[name]
        assert b["loss_ok"] and not b["partial"] and b["tiny"], name
        variants = {(r["variant"], r["ckpt"]) for r in b["rows"] if "losses" in r}
        assert ("hf", "none") in variants, (name, variants)
    assert {r["ckpt"] for r in res["bench_a3b"]["rows"] if r["variant"] == "ours"} == {"none", "full"}
    assert {r["variant"] for r in res["bench_lora_compile"]["rows"]} == {"hf", "ours-lora", "ours-torch"}

    # the archive holds every section's log and JSON
    with tarfile.open(out / "gpu_check.tgz") as tar:
        members = set(tar.getnames())
        logs = {m: tar.extractfile(m).read().decode() for m in members if m.startswith("logs/bench_")}
    for case in ("a3b", "dense8b", "video", "packed"):
        [log] = [text for m, text in logs.items() if m.startswith(f"logs/bench_{case}")]
        check_bench_case(res[f"bench_{case}"], case, log)
    for name in sections:
        assert any(m.startswith(f"logs/{name}") and m.endswith(".log") for m in members), name
        assert any(m.startswith(f"results/{name}") for m in members), name

    # the summary table is printed last, one line per section, and the log file holds the console
    lines = proc.stdout.rstrip().splitlines()
    table = lines[-(len(sections) + 2):]
    assert table[0].startswith("section") and table[-1].startswith("total")
    assert [ln.split()[0] for ln in table[1:-1]] == list(sections)
    assert all(ln.split()[1] == "ok" for ln in table[1:-1])
    assert (out / "gpu_check.log").read_text().rstrip().endswith(table[-1])
    print(f"dry run: {elapsed:.0f} s wall; per section: "
          + ", ".join(f"{n} {s['seconds']:.0f}s/{s.get('cpu_s', 0):.0f}s cpu" for n, s in sections.items()))


def check_bench_case(data: dict, case: str, text: str) -> None:
    """bench/train_step.py's result for one tiny case (``data``: its JSON, ``text``: its console): transformers'
    and rynnscale's first-step losses agree (rel 1e-5, fp32), the table and the step-time breakdown print, and the
    breakdown sees the case's parts."""
    assert "tok/s" in text and "MFU" in text and "step-time breakdown" in text
    assert data["loss_ok"] and data["loss_rtol"] == 1e-5 and data["matmul_tflops"] > 0
    got = {r["variant"]: r for r in data["rows"] if r["case"] == case and r["ckpt"] == "none"}
    assert set(got) == {"hf", "liger", "ours"}, (case, set(got))
    hf, ours = got["hf"], got["ours"]
    assert "error" not in hf and "error" not in ours, (hf.get("error"), ours.get("error"))
    assert abs(ours["losses"][0] - hf["losses"][0]) <= 1e-5 * abs(hf["losses"][0])
    assert ours["loss_ok"] and ours["tokens_per_s"] > 0 and ours["x_hf"] > 0
    assert f"{case:8} {'ours':12} {'none':9}" in text
    if "na" in got["liger"]:
        assert f"{case:8} {'liger':12} {'none':9} n/a" in text
    b = ours["breakdown"]
    assert b["attention"] > 0 and b["loss"] > 0 and b["optimiser"] > 0
    expected = {"a3b": ("experts", "router/permute"), "packed": ("experts", "router/permute"),
                "dense8b": ("mlp",), "video": ("vision", "mlp")}[case]
    for part in expected:
        assert b[part] > 0, (case, part, b)
    if case != "video":
        assert b["vision"] == 0.0
    assert data["flops"][case]["total"] > 0
    assert (data["flops"][case]["vision"] > 0) == (case == "video")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_section_past_its_cap_is_killed_with_its_children(tmp_path):
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print('grandchild', p.pid, flush=True)\n"
            "time.sleep(120)\n")
    log = tmp_path / "hung.log"
    t0 = time.monotonic()
    o = driver.run_capped([sys.executable, "-c", code], log, cap_s=3.0, env=dict(os.environ))
    assert o.status == "timeout" and o.rc is None and time.monotonic() - t0 < 3.0 + driver.KILL_GRACE_S + 5
    pid = int(re.search(r"grandchild (\d+)", log.read_text()).group(1))
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the grandchild outlived its section's cap"
    assert "killed after its cap" in log.read_text()
    ok = driver.run_capped([sys.executable, "-c", "print('hi')"], tmp_path / "ok.log", cap_s=60, env=dict(os.environ))
    bad = driver.run_capped([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.log", 60, dict(os.environ))
    assert (ok.status, ok.rc, bad.status, bad.rc) == ("ok", 0, "fail", 3)


def test_sections_past_the_deadline_are_skipped_and_reported(tmp_path, capsys):
    rc = driver.main([str(tmp_path / "res"), "--dry-run", "--deadline", "1", "--sections", "env,trainer"])
    assert rc == 0
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["sections"]] == [("env", "skipped"), ("trainer", "skipped")]
    assert tarfile.is_tarfile(tmp_path / "res" / "gpu_check.tgz")
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("total")


def test_results_go_to_out_when_set_else_the_folder_given():
    assert driver.resolve_dirs("x", {"OUT": "/o"}) == (Path("/o"), None)   # scratch then goes to a temp folder
    assert driver.resolve_dirs("x", {}) == (Path("x"), Path("x") / "work")
    assert driver.resolve_dirs(None, {}) == (ROOT / "runs" / "gpu_check", ROOT / "runs" / "gpu_check" / "work")
