"""A RynnScale-style media item carrying its path under "text" (as RynnScale's own README writes it) is answered
with the fix, not only "media path must be a non-empty string, got None" (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rynnscale.data_pipelines.jsonl import convert_jsonl


@pytest.mark.parametrize("typ", ["image", "video"])
def test_media_path_under_text_gets_a_did_you_mean_hint(tmp_path: Path, typ: str) -> None:
    line = {"conversation": [
        {"role": "user", "content": [{"type": typ, "text": f"media/a.{'jpg' if typ == 'image' else 'mp4'}"},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cup."}]}]}
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(line) + "\n")
    (tmp_path / "media").mkdir()
    rep = convert_jsonl(src, tmp_path / "out", media_root=tmp_path, max_bad_fraction=1.0, progress=False)
    (bad,) = rep["bad_items"]
    text = json.dumps(bad)
    assert f"did you mean '{typ}'" in text and f'\\"{typ}\\": \\"media/a.' in text, text
