"""Crash-safe writes keep the umask's file mode (issue 28, item 3): ``mkstemp`` creates its temp file 0600, so
before the fix a shard set's ``manifest.json``, a converter's ``convert_report.json`` and a checkpoint's
``COMPLETE`` / ``latest`` / ``trainer_state.json`` were readable by their owner only, whatever the umask; on a
shared cluster nobody else could read a manifest, resume or export. Every file is compared with what a plain
``open(path, "w")`` creates under the same umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from rynnscale.checkpoint.dcp import CheckpointManager
from rynnscale.data_pipelines.jsonl import convert_jsonl
from rynnscale.data_pipelines.shards import ShardWriter
from rynnscale.fsutil import atomic_write_bytes


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_current_umask_reads_without_changing(umask):
    from rynnscale.fsutil import current_umask

    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_write_gets_the_mode_open_would_give(tmp_path, umask):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    want = 0o666 & ~umask
    assert _mode(plain) == want
    got = atomic_write_bytes(tmp_path / "atomic.json", "{}")
    assert _mode(got) == want, f"{oct(_mode(got))} != {oct(want)}"
    # replacing an existing file takes the umask's mode too (not the old file's)
    got.chmod(0o600)
    assert _mode(atomic_write_bytes(got, "{}")) == want


def test_manifest_report_and_checkpoint_metadata_follow_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    with ShardWriter(tmp_path / "shards", max_samples=1) as wr:
        wr.write("s0", {"conv.json": b'{"conversation": []}', "meta.json": b"{}"})
    lines = tmp_path / "convs.jsonl"
    lines.write_text(json.dumps({"conversation": [
        {"role": "user", "content": [{"type": "text", "text": "Where is the door?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "On the left."}]}]}) + "\n")
    (tmp_path / "media").mkdir()
    convert_jsonl(lines, tmp_path / "converted", media_root=tmp_path / "media", progress=False, cost_hints=False)
    model = torch.nn.Linear(2, 2)
    ckpt = CheckpointManager(tmp_path / "run").save(1, model, torch.optim.SGD(model.parameters(), lr=0.1))
    files = [tmp_path / "shards" / "manifest.json", tmp_path / "converted" / "manifest.json",
             tmp_path / "converted" / "convert_report.json", ckpt / "COMPLETE", ckpt / "trainer_state.json",
             ckpt / "rank_00000.json", ckpt.parent / "latest"]
    wrong = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in files if _mode(p) != want}
    assert not wrong, f"expected {oct(want)}: {wrong}"
