"""The scripts under bench/ as modules (bench/ is not a package): one loader for the tests of tests/bench."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench_script(name: str) -> ModuleType:
    """A fresh module of ``bench/<name>.py``, registered as ``bench_<name>`` (its dataclasses look their module up
    while being defined); bench/ is on ``sys.path`` while it loads (bf16_parity imports train_step from beside it)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod
