"""Test-suite root: makes ``tests/`` importable so test modules share helpers such as
``shared_data.SHARED_DATA`` (pytest puts a rootdir conftest's folder on sys.path), and skips tests
marked ``gpu`` where no CUDA device is present (``pytest -m gpu`` selects them on a GPU machine:
bench/gpu_check.sh runs exactly that set)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)
