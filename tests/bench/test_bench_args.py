"""The bench scripts refuse bad arguments with argparse's one-line error (exit status 2) before building
anything, instead of a traceback mid-run (a ZeroDivisionError, an empty median, a CUDA assertion, a shape
error in a spawned rank) or a run that "succeeds" with no timed step."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.bench_scripts import load_bench_script

pytest.importorskip("transformers")
import torch  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    return load_bench_script(name)


BAD = [
    ("train_step", ["--tiny", "--seq-div", "0"], "--seq-div 0: must be >= 1"),
    ("train_step", ["--tiny", "--steps", "0"], "--steps 0: must be >= 1"),
    ("train_step", ["--tiny", "--warmup", "-1"], "--warmup -1: must be >= 0"),
    ("train_step", ["--tiny", "--layers", "0"], "--layers 0: must be >= 1"),
    ("bf16_parity", ["--tiny", "--steps", "0"], "--steps 0: must be >= 1"),
    ("bf16_parity", ["--tiny", "--positions", "0"], "--positions 0: must be >= 1"),
    ("generate", ["--repeats", "0"], "--repeats 0: must be >= 1"),
    ("generate", ["--hidden", "100"], "--hidden 100: must be a multiple of 64"),
    ("cp_memory", ["--tokens", "5000"], "--tokens 5000: must be a positive multiple of the 4096-token document"),
    ("cp_memory", ["--tokens", "8192", "--cp", "3"], "--cp 3: ulysses splits the 32 q heads"),
    ("gpu_check", ["--cap", "bench_a3b=ten"], "--cap 'bench_a3b=ten': SECONDS must be a number"),
    ("gpu_check", ["--deadline", "-5"], "--deadline -5: must be > 0 seconds"),
]
if not torch.cuda.is_available():
    BAD += [("train_step", ["--device", "cuda"], "--device cuda: no CUDA device here"),
            ("bf16_parity", ["--device", "cuda"], "--device cuda: no CUDA device here")]


@pytest.mark.parametrize("script,argv,message", BAD, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD])
def test_bad_argument_is_one_line(script, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _load(script).main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
