"""samples.jsonl: one sorted line per step; a resume cuts the lines after the resumed step first."""

from __future__ import annotations

import json
from pathlib import Path

from rynnscale.train.metrics import SAMPLES_FILE, SampleLog, max_over_mean
from rynnscale.train.setup import truncate_metrics


def test_sample_log_appends_after_truncation_on_resume(tmp_path: Path) -> None:
    log = SampleLog(tmp_path, enabled=True)
    for k in range(1, 6):
        log.log(k, [f"b.tar:{k}", f"a.tar:{k}"])
    assert truncate_metrics(tmp_path / SAMPLES_FILE, 3) == 2   # resumed at step 3: steps 4, 5 dropped
    SampleLog(tmp_path, enabled=True).log(4, ["c.tar:x"])
    lines = [json.loads(x) for x in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert lines[0]["samples"] == ["a.tar:1", "b.tar:1"]
    SampleLog(tmp_path / "off", enabled=False).log(1, ["x"])
    assert not (tmp_path / "off").exists()
    assert max_over_mean([1.0, 3.0]) == 1.5 and max_over_mean([]) is None
