"""Grouped GEMM for mixture-of-experts: one matmul per expert over its contiguous block of rows.

``grouped_mm(x_sorted_tk [T, K], w_enk [E, N, K], offsets_e int32 [E]) -> y_tn [T, N]`` with
``y[t] = x[t] @ w[e].T`` for ``offsets[e-1] <= t < offsets[e]`` (``offsets`` are cumulative END
offsets, so expert ``e`` has ``offsets[e] - offsets[e-1]`` rows; zero rows is fine).

Backends (same function, autograd through both):
- ``grouped_mm``: ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` on older torch): one kernel,
  no host sync (offsets stay on the device). Needs fp32/bf16/fp16 (bf16/fp16 on CUDA), 16-byte
  aligned strides and data pointers, and N, K whose rows are 16-byte multiples (bf16: multiples of 8).
- ``loop``: one ``x_e @ w_e.T`` per expert; the reference and the fallback for other dtypes / layouts
  (reads the offsets on the host, i.e. one device sync).
``auto`` picks ``grouped_mm`` when it is usable for the inputs and ``loop`` otherwise. Under
``torch.autocast`` both operands are cast to the autocast dtype first (as autocast does for mm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "grouped_mm", "loop")

_torch_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    The grouped_mm kernel rejects stride-0 (expanded) gradients, e.g. from ``y.sum().backward()``."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g.contiguous()


def _aligned(t: torch.Tensor) -> bool:
    """16-byte aligned strides and (in eager mode) data pointer. Under ``torch.compile`` the pointer is not
    known at trace time; the operands there are fresh allocations (the dispatch's index_select) or
    parameters (FSDP2 copies each unsharded parameter out into its own allocation), both aligned."""
    size = t.element_size()
    strides_ok = all((s * size) % 16 == 0 for s, n in zip(t.stride(), t.shape) if n > 1 and s != 1)
    if torch.compiler.is_compiling():
        return strides_ok
    return strides_ok and t.data_ptr() % 16 == 0


def grouped_mm_usable(x_sorted_tk: torch.Tensor, w_enk: torch.Tensor) -> bool:
    """Whether the fused kernel accepts these operands (dtype, alignment, device capability)."""
    if _torch_grouped_mm is None or x_sorted_tk.dtype != w_enk.dtype or w_enk.dtype not in _KERNEL_DTYPES:
        return False
    if x_sorted_tk.shape[0] == 0:
        return False  # the kernel's backward rejects an empty operand
    if torch.compiler.is_compiling() and w_enk.dtype != torch.bfloat16:
        return False  # the op's meta (tracing) function accepts bf16 only, though the CPU kernel takes fp32
    if w_enk.device.type == "cuda":
        if torch.cuda.get_device_capability(w_enk.device) < (8, 0) or w_enk.dtype == torch.float32:
            return False  # CUDA kernels are bf16/fp16 (SM80+)
    elif w_enk.device.type != "cpu":
        return False
    # the kernel also allocates y [T, N] and gradients: N and K rows must be 16-byte multiples too
    size = w_enk.element_size()
    dims_ok = (w_enk.shape[1] * size) % 16 == 0 and (w_enk.shape[2] * size) % 16 == 0
    return dims_ok and _aligned(x_sorted_tk) and _aligned(w_enk)


def _check(x_sorted_tk: torch.Tensor, w_enk: torch.Tensor, offsets_e: torch.Tensor) -> None:
    if x_sorted_tk.dim() != 2 or w_enk.dim() != 3 or x_sorted_tk.shape[1] != w_enk.shape[2]:
        raise ValueError(f"grouped_mm: expected x [T, K] and w [E, N, K], got x {tuple(x_sorted_tk.shape)} "
                         f"and w {tuple(w_enk.shape)}")
    if offsets_e.shape != (w_enk.shape[0],):
        raise ValueError(f"grouped_mm: offsets must have shape [E]=({w_enk.shape[0]},), got {tuple(offsets_e.shape)}")


@torch.compiler.disable  # data-dependent Python loop: run it eagerly inside compiled blocks (no graph break resume)
def grouped_mm_loop(x_sorted_tk: torch.Tensor, w_enk: torch.Tensor, offsets_e: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert (host sync on the offsets). Rows past ``offsets[-1]`` are zero."""
    _check(x_sorted_tk, w_enk, offsets_e)
    T, N = x_sorted_tk.shape[0], w_enk.shape[1]
    ends = offsets_e.tolist()
    starts = [0] + ends[:-1]
    parts = [x_sorted_tk[s:e] @ w_enk[i].t() for i, (s, e) in enumerate(zip(starts, ends))]
    tail = T - (ends[-1] if ends else 0)
    if tail:
        parts.append(x_sorted_tk.new_zeros(tail, N))
    if not parts:
        return x_sorted_tk.new_zeros(T, N)
    return torch.cat(parts, dim=0)


def grouped_mm(
    x_sorted_tk: torch.Tensor, w_enk: torch.Tensor, offsets_e: torch.Tensor, backend: str = "auto",
) -> torch.Tensor:
    """y [T, N] = per-expert ``x_e @ w_e.T`` over rows grouped by ``offsets_e`` (int32 cumulative ends, [E]).

    ``offsets_e[-1]`` must equal T on the ``grouped_mm`` backend (rows past it are left unwritten by
    the kernel); the MoE layer always routes every row."""
    if backend not in BACKENDS:
        raise ValueError(f"grouped_mm backend {backend!r} is not one of {BACKENDS}")
    _check(x_sorted_tk, w_enk, offsets_e)
    device_type = x_sorted_tk.device.type
    if torch.is_autocast_enabled(device_type):
        # the kernel is not autocast-aware: cast like autocast casts a matmul (else fp32 params
        # under bf16 autocast would miss the kernel, or mismatch in dtype)
        dt = torch.get_autocast_dtype(device_type)
        x_sorted_tk, w_enk = x_sorted_tk.to(dt), w_enk.to(dt)
    if backend == "auto":
        backend = "grouped_mm" if grouped_mm_usable(x_sorted_tk, w_enk) else "loop"
    if backend == "loop":
        return grouped_mm_loop(x_sorted_tk, w_enk, offsets_e)
    if _torch_grouped_mm is None:
        raise RuntimeError("grouped_mm backend 'grouped_mm' needs torch.nn.functional.grouped_mm or torch._grouped_mm")
    if x_sorted_tk.shape[0] == 0:  # keep autograd connected; all gradients are zero
        return x_sorted_tk @ w_enk.sum(0).t()
    offs = offsets_e if offsets_e.dtype == torch.int32 else offsets_e.to(torch.int32)
    y_tn = _torch_grouped_mm(x_sorted_tk, w_enk.transpose(-2, -1), offs=offs)
    return _ContiguousGrad.apply(y_tn)
