"""Process-group setup from the torchrun environment and the step's global quantities.

- ``init_distributed``: NCCL on GPU, gloo on CPU, chosen from the device; a timeout on every collective
  (``parallel.timeout_s``), so a rank that dies or diverges makes the others fail instead of hanging. Under
  torchrun's agent store (the default) the process group's keys live under a prefix of this restart round:
  the agent keeps ONE store across restarts and torch's env:// path reuses it unprefixed, so a restarted rank
  could read a dead rank's gloo address from the previous round ("connectFullMesh ... Connection refused" on
  every restart of a loaded machine, where the ranks of a round start seconds apart).
- ``report_failures``: an exception on any rank is logged once with that rank (and host) before the process
  exits non-zero; torchrun then tears the other ranks down.
- ``DistContext``: what the training step needs from the world: sums over all ranks (target-token count
  before backward, metrics), the load-balancing counts reducer, and the global gradient norm.

Global gradient norm. Dense parameters are FSDP-sharded over ``dp_shard``; expert parameters over
``edp_shard`` and split by expert over ``ep``. Within one replica (``dp_replicate`` copies are identical)
every rank of the ``dp_shard`` group (= ``edp_shard x ep``) holds a distinct piece of every parameter, so
the squared norm of the whole model is ONE all-reduce (sum) over ``dp_shard`` of each rank's local sum of
squares over all its shards, dense and expert alike (DTensors on different meshes need no special case).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rynnscale.parallel.mesh import Meshes

log = logging.getLogger(__name__)


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) from torchrun's environment, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"])


def init_distributed(device: torch.device, timeout_s: float) -> tuple[int, int, int, torch.device]:
    """Initialise the default process group when launched by torchrun with WORLD_SIZE > 1.

    Returns ``(rank, local_rank, world_size, device)``; on GPU the device becomes ``cuda:<local_rank>``.
    Outside torchrun (or with one rank) nothing is initialised and ``(0, 0, 1, device)`` comes back."""
    env = torchrun_env()
    if env is None or env[2] == 1:
        return 0, 0, 1, device
    rank, local_rank, world_size = env
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank}: LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs "
                               "are visible; lower --nproc-per-node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = dict(device_id=device) if device.type == "cuda" else {}
        store = _round_store(world_size, timeout)
        if store is None:   # not under torchrun's agent store: env:// (rank 0 hosts the store)
            dist.init_process_group(backend, timeout=timeout, **kw)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kw)
    return rank, local_rank, world_size, device


def _round_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """torchrun's agent store under a prefix of this restart round (restart count and world size: an elastic
    membership change without a failure keeps the count but changes the size), or None outside it. The agent's
    store outlives the workers; without the prefix a restarted rank reads the previous round's keys."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"rynnscale/round_{attempt}_world_{world_size}", store)


@contextlib.contextmanager
def report_failures(rank: int, world_size: int, brief: tuple[type[BaseException], ...] = ()):
    """Log any exception once, with this rank's identity, then re-raise: the process exits non-zero and
    torchrun stops the other ranks. ``brief`` types (errors whose message says it all: a bad setting, bad
    data) are logged without the traceback. ``reported(e)`` then tells the caller (the command line) not
    to print it again. On success, destroy the process group cleanly."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - logged with the rank, then re-raised
        if not isinstance(e, (KeyboardInterrupt, SystemExit)) and not reported(e):
            msg = f"rynnscale: rank {rank}/{world_size} on {socket.gethostname()} failed with {type(e).__name__}: {e}"
            log.error("%s", msg if isinstance(e, brief) else f"{msg}\n{traceback.format_exc()}")
            with contextlib.suppress(AttributeError):   # (an exception without attributes is reported again)
                e._rynnscale_reported = True  # type: ignore[union-attr]
        raise
    else:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def reported(e: BaseException) -> bool:
    """Whether ``report_failures`` logged ``e`` already."""
    return bool(getattr(e, "_rynnscale_reported", False))


@dataclass
class DistContext:
    """One rank's view of the world for the training step. ``meshes`` is None for a single process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    meshes: Meshes | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def cp_size(self) -> int:
        """Ranks of this rank's context-parallel group (they hold the same samples); 1 without CP."""
        return 1 if self.meshes is None else self.meshes.layout.cp

    @property
    def cp_rank(self) -> int:
        return 0 if self.meshes is None else self.meshes.cp_rank

    @property
    def data_world_size(self) -> int:
        """Distinct sample streams (the loader's world): all ranks except that a CP group is one stream."""
        return self.world_size // self.cp_size

    @property
    def data_rank(self) -> int:
        """This rank's sample stream (the loader's rank): equal on the ranks of one CP group."""
        return self.rank // self.cp_size

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks (= ``data_world_size``: EP ranks see different data, CP ranks the same)."""
        return self.data_world_size

    def sum_data(self, values: Iterable[float]) -> list[float]:
        """Element-wise sum over the sample streams of quantities every rank of a CP group holds alike
        (per-batch token / sample counts): each CP group counts once. Same single all-reduce as ``sum``."""
        values = list(values)
        if self.cp_size > 1 and self.cp_rank != 0:
            values = [0.0] * len(values)
        return self.sum(values)

    def gather_data(self, obj: Any) -> list[Any]:
        """Every sample stream's ``obj`` (picklable), in data-rank order, on every rank: one per CP group (its
        first rank's). For rare facts of variable shape (names of bad samples); counts go through ``sum_data``."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj if self.cp_rank == 0 else None)
        return out[::self.cp_size]

    def sum(self, values: Iterable[float]) -> list[float]:
        """Element-wise float64 sum over all ranks (identity for one process)."""
        values = list(values)
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) a tensor over all ranks; returns it (identity for one process)."""
        if self.distributed:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t

    def counts_reducer(self, counts_le: torch.Tensor) -> torch.Tensor:
        """Load-balancing counts [n_moe_layers, E] summed over all ranks (global-batch balance); under CP
        each rank counts only the tokens of its shard, so the sum counts every token once."""
        return self.sum_tensor(counts_le.clone())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def norm_group(self) -> dist.ProcessGroup | None:
        """The group whose ranks hold disjoint pieces of every parameter (see the module docstring)."""
        return None if self.meshes is None else self.meshes.dp_shard.get_group()


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t._local_tensor if isinstance(t, DTensor) else t


@torch.no_grad()
def global_grad_norm(params: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None) -> torch.Tensor:
    """L2 norm of all gradients of the model (all shards, all expert groups) as a 0-dim tensor: fp32, or fp64
    when a gradient is fp64 (as torch's clip_grad_norm_ keeps it), on the parameters' device."""
    params = list(params)
    grads = [_local(p.grad) for p in params if p.grad is not None]
    # from the parameters, not this rank's gradients: every rank must all-reduce the same dtype
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    if grads:
        sq = torch.stack([g.to(dtype).pow(2).sum() for g in grads]).sum()
    else:   # this rank holds no gradient: its share is zero, on the device the collective runs on (NCCL: CUDA)
        sq = torch.zeros((), dtype=dtype, device=_local(params[0]).device if params else None)
    if group is not None:
        dist.all_reduce(sq, group=group)
    return sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float,
                    group: dist.ProcessGroup | None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole sharded model: the norm is global (all ranks),
    the scaling is applied to each rank's local shards. ``max_norm <= 0`` only measures. Returns the
    total norm before clipping."""
    params = list(params)
    total = global_grad_norm(params, group)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in (p for p in params if p.grad is not None):
            g = _local(p.grad)
            g.mul_(coef.to(g.device, g.dtype))
    return total
