"""Preemption: SIGTERM (SLURM, Kubernetes) sets a flag; the loop finishes its step, saves and exits 0.
Every rank learns of a signal any rank got (one all-reduce per step)."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class PreemptionFlag:
    """Set by the signal handler; the trainer checks it once per step (``preemption_requested``)."""
    requested: bool = False
    signum: int | None = None
    previous: dict[int, Any] = field(default_factory=dict)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


def install_preemption_handler(signals: tuple[int, ...] = (signal.SIGTERM,)) -> PreemptionFlag:
    """Install a handler that only records the signal (call from the main thread). The trainer then saves
    a checkpoint at the end of the current step and exits, instead of dying mid-step."""
    flag = PreemptionFlag()

    def handler(signum, frame):
        flag.requested = True
        flag.signum = signum
        log.warning("received signal %d: will save a checkpoint after this step and exit", signum)

    for sig in signals:
        flag.previous[sig] = signal.signal(sig, handler)
    return flag


def preemption_requested(flag: PreemptionFlag, process_group=None) -> bool:
    """True on every rank if any rank got the signal (an all-reduce: call it on all ranks at the same step)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(process_group) == 1:
        return flag.requested
    backend = dist.get_backend(process_group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag.requested else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=process_group)
    return bool(t.item())
