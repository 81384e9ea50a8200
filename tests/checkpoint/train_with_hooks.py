"""Test-only entry point: ``rynnscale train`` with a fault-injection hook (run by torchrun in the tests).

``python train_with_hooks.py RECIPE [overrides...]``. The hook raises on rank ``RYNNSCALE_TEST_CRASH_RANK``
(default 0) right after step ``RYNNSCALE_TEST_CRASH_AT_STEP`` of the FIRST attempt only
(torchrun's ``TORCHELASTIC_RESTART_COUNT`` == 0), so a restarted job runs to the end. The environment is
read here, at the edge, never inside rynnscale."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rynnscale.config import load_config  # noqa: E402
from rynnscale.train.trainer import run_training  # noqa: E402


class CrashOnce:
    """Raise after step ``step`` on rank ``rank`` (a crashed rank, as far as torchrun can tell)."""

    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def on_step_end(self, step: int, ctx) -> None:
        if step == self.step and ctx.rank == self.rank:
            raise RuntimeError(f"injected crash after step {step} on rank {ctx.rank}")


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    hooks = []
    crash_at = int(os.environ.get("RYNNSCALE_TEST_CRASH_AT_STEP", "0"))
    if crash_at and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        hooks.append(CrashOnce(crash_at, int(os.environ.get("RYNNSCALE_TEST_CRASH_RANK", "0"))))
    run_training(cfg, hooks=hooks)


if __name__ == "__main__":
    main()
