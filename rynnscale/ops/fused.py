"""Element-wise hot spots of a decoder layer with two implementations of the same function.

``rms_norm``, ``rotary_qk``, ``silu_mul`` and ``silu_mul_packed`` each run either
- ``torch``: plain PyTorch ops (the CPU path and the reference; what ``torch.compile`` fuses), or
- ``liger``: liger-kernel's Triton kernels (CUDA only), which fuse each op into one kernel and keep
  fewer activations for backward.

``kernels`` (the ``model.kernels`` recipe key) is ``auto`` (liger where it applies, else torch; on CUDA
the fallback is logged once per reason), ``torch`` or ``liger`` (fails with a clear error where liger cannot
run). ``pick`` resolves it per call from the op's activations and its weights / cos / sin (``params``), all on
CUDA: the activations in ONE dtype, the params in that dtype -- or in fp32 beside activations in the active
autocast dtype. The latter is one-GPU training (fp32 parameters, bf16 autocast, no FSDP mixed precision):
autocast does not reach liger's Triton kernels, but they take such operands as they are (as liger's own
transformers patches hand them under AMP) -- RMSNorm ("llama" casting) computes rstd in fp32 and multiplies
by the fp32 weight in fp32, RoPE rotates in cos / sin's fp32; both store in the activations' dtype, the one
the attention casts to anyway -- and the fused loss is ``custom_fwd``, so its matmuls run in the autocast
dtype. Outside autocast such a pair stays on the torch path: there liger's RMSNorm would return bf16 where
the torch path (and transformers) promotes to the weight's fp32.

In-place hazard: liger's RoPE writes into contiguous q/k. That is only safe when nothing saved
q/k for backward, i.e. when they come from liger's RMSNorm (which saves its input, not its output);
callers therefore pick ONE backend for the q/k norms and the rotary together (see
``rynnscale.models.qwen3_vl.text.Attention``).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

KERNELS = ("auto", "torch", "liger")


@functools.lru_cache(maxsize=1)
def liger_import_error() -> str | None:
    """None when liger-kernel's ops import, else why not (one line)."""
    try:
        import liger_kernel.ops.rms_norm  # noqa: F401
        import liger_kernel.ops.rope  # noqa: F401
        import liger_kernel.ops.swiglu  # noqa: F401
    except Exception as e:  # ImportError, or triton failing to find a GPU driver
        return f"{type(e).__name__}: {e}"
    return None


def check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise ValueError(f"model.kernels={kernels!r} is not one of {KERNELS}")
    return kernels


def liger_runs_on(device: torch.device) -> bool:
    """Whether liger's Triton kernels can take tensors on ``device`` (CUDA; the CPU tests stand it in)."""
    return device.type == "cuda"


def require_liger(device: torch.device) -> None:
    """Raise, naming ``model.kernels``, unless liger-kernel can run on ``device`` (CUDA, and it imports)."""
    if not liger_runs_on(device):
        raise ValueError(f"model.kernels=liger needs a CUDA device, this run uses {device}; "
                         "use model.kernels=auto or torch")
    err = liger_import_error()
    if err is not None:
        raise ValueError(f"model.kernels=liger but liger-kernel does not import ({err}); "
                         "pip install -e '.[gpu]' or use model.kernels=auto")


LIGER_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes matmuls in on ``device``'s type, None where it is off."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _operand_dtype_error(activations: tuple[torch.Tensor, ...], params: tuple[torch.Tensor, ...]) -> str | None:
    """Why liger cannot take these operands (module docstring), None where it can."""
    act = {t.dtype for t in activations}
    if len(act) != 1 or not act <= set(LIGER_DTYPES):
        return f"activations of one floating dtype, got {sorted(map(str, act))}"
    (dtype,) = act
    allowed = {dtype, torch.float32} if dtype == autocast_dtype(activations[0].device) else {dtype}
    bad = {t.dtype for t in params} - allowed
    if bad:
        return (f"weights in the activations' dtype {dtype} (or fp32 under autocast to it), got "
                f"{sorted(map(str, bad))}")
    return None


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logging.getLogger(__name__).warning(message)


def pick(kernels: str, *activations: torch.Tensor, params: tuple[torch.Tensor, ...] = ()) -> str:
    """``"liger"`` or ``"torch"`` for an op over ``activations`` and its weights / cos / sin ``params`` (module
    docstring). ``auto`` logs once per reason where it takes the torch path on a device liger runs on."""
    check_kernels(kernels)
    if kernels == "torch":
        return "torch"
    tensors = (*activations, *params)
    off_device = next((t.device for t in tensors if not liger_runs_on(t.device)), None)
    if kernels == "auto":
        if off_device is not None:   # the CPU path: nothing to report
            return "torch"
        err = liger_import_error()
        if err is not None:
            _warn_once(f"model.kernels=auto: liger-kernel does not import ({err}); the plain PyTorch RMSNorm / "
                       "RoPE / SwiGLU / loss run. pip install -e '.[gpu]' for its kernels")
            return "torch"
        why = _operand_dtype_error(activations, params)
        if why is not None:
            _warn_once(f"model.kernels=auto: the plain PyTorch op runs where liger needs {why}")
            return "torch"
        return "liger"
    require_liger(off_device or tensors[0].device)
    why = _operand_dtype_error(activations, params)
    if why is not None:
        raise ValueError(f"model.kernels=liger needs {why}; use model.kernels=auto to fall back to the torch path")
    return "liger"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "torch") -> torch.Tensor:
    """``weight * (x / rms(x))`` with the normalisation in fp32, cast back to x's dtype before the
    weight (transformers' Qwen3 RMSNorm). ``backend`` as returned by ``pick``."""
    if backend == "liger":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        # casting_mode "llama" = the fp32 rms then cast-back above; in_place=False keeps dY intact
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)
    # F.rms_norm upcasts bf16/fp16 internally and rounds once, i.e. equals rms_norm(x.float()).to(x.dtype)
    # (tests/ops/test_fused.py checks it bitwise), without an fp32 copy of x kept for backward
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(x_lhd: torch.Tensor, cos_ld: torch.Tensor, sin_ld: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of one [L, heads, D] tensor by per-row angles (cos/sin [L, D])."""
    return x_lhd * cos_ld[:, None] + rotate_half(x_lhd) * sin_ld[:, None]


def rotary_qk(q_lhd: torch.Tensor, k_lhd: torch.Tensor, cos_ld: torch.Tensor, sin_ld: torch.Tensor,
              backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q [L, Hq, D] and k [L, Hkv, D] (GQA: head counts may differ) in one call.

    ``liger`` rotates q and k IN PLACE when they are contiguous (one kernel for both); only pass
    tensors nothing else has saved for backward."""
    if backend == "liger":
        from liger_kernel.ops.rope import LigerRopeFunction

        # liger wants (B, heads, L, D) views of (B, L, heads, D) storage: exactly our [L, heads, D]
        q_o, k_o = LigerRopeFunction.apply(q_lhd.unsqueeze(0).transpose(1, 2), k_lhd.unsqueeze(0).transpose(1, 2),
                                           cos_ld.unsqueeze(0), sin_ld.unsqueeze(0))
        return q_o.transpose(1, 2).squeeze(0), k_o.transpose(1, 2).squeeze(0)
    return rotary(q_lhd, cos_ld, sin_ld), rotary(k_lhd, cos_ld, sin_ld)


def _silu_mul_grads(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d/dgate and d/dup of ``silu(gate) * up`` (math in fp32 for half inputs, cast back)."""
    g, u, dy = (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t for t in (gate, up, grad))
    sig = torch.sigmoid(g)
    d_up = dy * g * sig
    d_gate = dy * u * sig * (1 + g * (1 - sig))
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


class _SiLUMul(torch.autograd.Function):
    """``silu(gate) * up`` that keeps only gate and up for backward (autograd would also keep
    ``silu(gate)``, one more [.., I] tensor per MLP); backward recomputes the sigmoid."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return _silu_mul_grads(gate, up, grad)


class _SiLUMulPacked(torch.autograd.Function):
    """The same over one [.., 2I] gate|up tensor: keeps only that tensor, returns its gradient whole."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.cat(_silu_mul_grads(gate, up, grad), dim=-1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up``."""
    if backend == "liger":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply(gate, up)
    return _SiLUMul.apply(gate, up)


def silu_mul_packed(gate_up: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """``silu(gate) * up`` for one [..., 2I] tensor holding gate then up on the last dim (the fused
    expert projection's layout) -> [..., I], without materialising the two halves."""
    if backend == "liger":
        from liger_kernel.ops import swiglu

        fused = getattr(swiglu, "LigerFusedGateUpSiLUMulFunction", None)  # liger >= 0.8
        if fused is not None:
            return fused.apply(gate_up, False)
        gate, up = gate_up.chunk(2, dim=-1)
        return swiglu.LigerSiLUMulFunction.apply(gate.contiguous(), up.contiguous())
    return _SiLUMulPacked.apply(gate_up)
