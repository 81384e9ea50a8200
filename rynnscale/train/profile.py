"""Step-time breakdown of a training step by part: attention, experts (grouped GEMM), router/permute,
dense MLP, loss, vision tower, optimiser, data wait, other.

How: module hooks mark where a part starts and ends on ONE timeline, in forward (forward pre/post
hooks) and in backward (an identity autograd node on the part's output fires when its gradient
arrives = backward of the part starts; one on its input fires when the gradient leaves = backward of
the part ends). Every slice of time between two consecutive marks goes to the innermost part open at
that moment, so parts are exclusive (router/permute = the MoE block minus its experts) and everything
else is ``other``. Recomputation under activation checkpointing re-runs forward hooks inside backward
and is counted in its part. Timestamps are CUDA events on a GPU (no host sync per mark; resolved at
the end) and ``time.perf_counter`` on CPU. The hooks add a little host overhead per module call, so
use a profiled step for the shares, not for throughput.

Use::

    prof = StepProfiler(model)            # hooks installed
    with prof.region("data wait"): batch = next(it).to(dev)
    prof.start(); out = model(batch); loss = ...; loss.backward()
    with prof.region("optimiser"): opt.step()
    times = prof.stop()                   # {part: seconds}
    print(format_breakdown(times)); prof.remove()
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn as nn

from rynnscale.models import family_of

PARTS = ("attention", "experts", "router/permute", "mlp", "loss", "vision", "optimiser", "data wait", "other")


class _Mark(torch.autograd.Function):
    """Identity whose backward calls ``callback`` (the moment the gradient passes this point)."""

    @staticmethod
    def forward(ctx, x, callback):
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None


def _grad_tensor(x) -> torch.Tensor | None:
    return x if isinstance(x, torch.Tensor) and x.requires_grad and x.is_floating_point() else None


class StepProfiler:
    """Exclusive wall-clock (CPU) or CUDA-event (GPU) time per part of a training step."""

    def __init__(self, model: nn.Module):
        self.cuda = next(model.parameters()).device.type == "cuda"
        self._handles = []
        self._marks: list[tuple[object, str]] = []   # (timestamp or event, part active AFTER the mark)
        self._open: list[tuple[int, str]] = []       # open intervals, innermost last
        self._next_id = 0
        self._active = False
        parts = {p.module: p for p in family_of(model).profile_parts()}
        for mod in model.modules():
            part = parts.get(type(mod))
            if part is not None:  # a tower whose input needs no gradient: its backward ends at close_on's output
                self._hook(mod, part.part, close_on=getattr(mod, part.close_on) if part.close_on else None)

    # ------------------------------------------------------------------ timeline
    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _mark(self) -> None:
        self._marks.append((self._now(), self._open[-1][1] if self._open else "other"))

    def _push(self, part: str) -> int:
        self._next_id += 1
        self._open.append((self._next_id, part))
        self._mark()
        return self._next_id

    def _pop(self, ident: int) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == ident:
                del self._open[i]
                break
        else:
            return
        self._mark()

    @contextmanager
    def region(self, part: str):
        """Time a block of host code (optimiser step, data wait) as ``part``."""
        if not self._active:
            self.start()
        ident = self._push(part)
        try:
            yield
        finally:
            self._pop(ident)

    # ------------------------------------------------------------------ hooks
    def _hook(self, mod: nn.Module, part: str, close_on: nn.Module | None = None) -> None:
        state: dict = {}

        def pre(_m, args):
            if not self._active:
                return None
            state["fwd"] = self._push(part)
            bwd = {"id": None, "waiting": 0}
            state["bwd"] = bwd

            def close():
                if bwd["id"] is not None:
                    self._pop(bwd["id"])
                    bwd["id"] = None
            state["close"] = close
            if close_on is None and args and _grad_tensor(args[0]) is not None:
                return (_Mark.apply(args[0], close),) + tuple(args[1:])
            return None

        def post(_m, args, output):
            if not self._active or "fwd" not in state:
                return None
            bwd = state["bwd"]
            self._pop(state.pop("fwd"))

            def arrive():
                bwd["waiting"] -= 1
                if bwd["waiting"] == 0 and bwd["id"] is None:
                    bwd["id"] = self._push(part)

            def mark(x):
                if _grad_tensor(x) is None:
                    return x
                bwd["waiting"] += 1
                return _Mark.apply(x, arrive)

            if isinstance(output, torch.Tensor):
                return mark(output)
            if isinstance(output, tuple):
                first, rest = output[0], output[1:]
                if isinstance(first, torch.Tensor):
                    first = mark(first)
                rest = tuple([mark(x) for x in r] if isinstance(r, list) else r for r in rest)
                return (first,) + rest
            return None

        self._handles.append(mod.register_forward_pre_hook(pre))
        self._handles.append(mod.register_forward_hook(post))
        if close_on is not None:
            def close_post(_m, args, output):
                if not self._active or "close" not in state:
                    return None
                return _Mark.apply(output, state["close"]) if _grad_tensor(output) is not None else None
            self._handles.append(close_on.register_forward_hook(close_post))

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        """Begin a profiled step (clears earlier marks)."""
        self._marks, self._open, self._active = [], [], True
        self._mark()

    def stop(self) -> dict[str, float]:
        """End the step -> seconds per part (all of ``PARTS``, zeros included)."""
        self._open = []
        self._mark()
        self._active = False
        if self.cuda:
            torch.cuda.synchronize()
        out = dict.fromkeys(PARTS, 0.0)
        for (t0, part), (t1, _) in zip(self._marks[:-1], self._marks[1:]):
            dt = t0.elapsed_time(t1) / 1e3 if self.cuda else t1 - t0
            out[part] = out.get(part, 0.0) + dt
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def format_breakdown(times: dict[str, float], title: str = "step-time breakdown") -> str:
    """A small table: part, ms, share of the step."""
    total = sum(times.values())
    lines = [f"{title} (total {total * 1e3:.1f} ms)", f"  {'part':16} {'ms':>9} {'share':>7}"]
    for part, t in times.items():
        lines.append(f"  {part:16} {t * 1e3:9.1f} {100 * t / total if total else 0:6.1f}%")
    return "\n".join(lines)
