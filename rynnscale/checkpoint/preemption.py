"""Preemption: SIGTERM (SLURM, Kubernetes) sets a flag; the loop finishes its step, saves and exits 0.
Every rank learns of a signal any rank got (one all-reduce per step). ``preemption_watch`` holds the handler for a
whole run, its setup and end-of-run work included (a signal there is acted on at the next check, not fatal)."""

from __future__ import annotations

import contextlib
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


_watching: PreemptionFlag | None = None   # the flag of the outermost ``preemption_watch`` of this process


@contextlib.contextmanager
def preemption_watch(signals: tuple[int, ...] = (signal.SIGTERM,)):
    """``install_preemption_handler`` for the ``with`` block, then the previous handlers again. Nested blocks share
    the outermost one's flag: a signal during a run's setup (before its training loop watches) or during one
    stage's end is still seen by the loop that checks next."""
    global _watching
    if _watching is not None:
        yield _watching
        return
    flag = install_preemption_handler(signals)
    _watching = flag
    try:
        yield flag
    finally:
        _watching = None
        flag.uninstall()


def preemption_requested(flag: PreemptionFlag, process_group=None) -> bool:
    """True on every rank if any rank got the signal (an all-reduce: call it on all ranks at the same step)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(process_group) == 1:
        return flag.requested
    backend = dist.get_backend(process_group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag.requested else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=process_group)
    return bool(t.item())
