"""Variable-length (packed) attention: one interface, several backends computing the same function.

``varlen_attention(q_thd, k_thd, v_thd, cu_seqlens, max_seqlen, causal)`` attends within each
document ``cu_seqlens[i]:cu_seqlens[i+1]`` of a packed row and never across documents.
Shapes: q [T, Hq, D], k/v [T, Hkv, D] with Hq % Hkv == 0 (GQA), output [T, Hq, D].

Backends
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash kernel inside torch, CUDA only; float16 /
  bfloat16, head dim a multiple of 8 up to 256: ``auto`` takes ``loop`` for anything else, e.g. fp32 on a GPU).
- ``sdpa_mask``: one SDPA call over the whole row with a block-diagonal (causal) mask.
- ``loop``: one SDPA call per document; the plain reference and the CPU default (memory
  O(max s^2) instead of O(T^2)).

Under ``torch.autocast`` q / k / v are cast to the autocast dtype first, whatever the backend (as autocast
casts SDPA; the flash varlen kernel is not autocast-aware, and a norm with fp32 weights hands it fp32 q / k
next to a bf16 v).

``cached_attention`` is the decoding step of generation: one query per sequence over a padded KV cache
(``rynnscale.models.kv_cache``).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "varlen", "sdpa_mask", "loop")


@functools.lru_cache(maxsize=1)
def _varlen_params() -> frozenset[str]:
    """Keyword names of this torch's ``varlen_attn`` (empty where it does not exist)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_takes_gqa() -> bool:
    """Whether the flash varlen kernel takes GQA k/v as they are (else ``varlen`` expands them)."""
    return "enable_gqa" in _varlen_params()


def _varlen_available(device: torch.device) -> bool:
    return device.type == "cuda" and bool(_varlen_params())


FLASH_DTYPES = (torch.float16, torch.bfloat16)


def varlen_unsupported(dtype: torch.dtype, head_dim: int | None = None) -> str | None:
    """Why the flash varlen kernel cannot take q / k / v of ``dtype`` and ``head_dim`` (None: it can)."""
    if dtype not in FLASH_DTYPES:
        return f"{dtype} inputs (the flash kernel takes float16 / bfloat16; train.dtype=auto or bfloat16 on a GPU)"
    if head_dim is not None and (head_dim % 8 or head_dim > 256):
        return f"head dim {head_dim} (the flash kernel takes multiples of 8 up to 256)"
    return None


def require_varlen(device: torch.device, dtype: torch.dtype | None = None, head_dim: int | None = None) -> None:
    """Raise, naming ``model.attn_backend``, unless the flash varlen kernel runs on ``device`` (CUDA, and this
    torch has ``torch.nn.attention.varlen``) for inputs of ``dtype`` / ``head_dim`` when given: an explicit
    ``varlen`` elsewhere would fail in the first forward with the dispatcher's wall of text."""
    if not _varlen_available(device):
        raise ValueError(f"model.attn_backend=varlen needs a CUDA device and a torch with "
                         f"torch.nn.attention.varlen (this run uses {device}, torch {torch.__version__}); "
                         "use model.attn_backend=auto, sdpa_mask or loop")
    why = None if dtype is None else varlen_unsupported(dtype, head_dim)
    if why is not None:
        raise ValueError(f"model.attn_backend=varlen cannot take {why}; use model.attn_backend=auto, sdpa_mask "
                         "or loop")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None,
                    head_dim: int | None = None) -> str:
    """The backend that runs: ``auto`` -> ``varlen`` where the flash kernel takes the inputs (``dtype`` /
    ``head_dim`` when given), else ``loop``; an explicit one is checked (``require_varlen``)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        usable = _varlen_available(device) and (dtype is None or varlen_unsupported(dtype, head_dim) is None)
        return "varlen" if usable else "loop"
    if backend == "varlen":
        require_varlen(device, dtype, head_dim)
    return backend


def _expand_kv(x_thd: torch.Tensor, groups: int) -> torch.Tensor:
    return x_thd if groups == 1 else x_thd.repeat_interleave(groups, dim=1)


def varlen_attention(
    q_thd: torch.Tensor,
    k_thd: torch.Tensor,
    v_thd: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    device_type = q_thd.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):   # as autocast casts SDPA
        dt = torch.get_autocast_dtype(device_type)
        q_thd, k_thd, v_thd = q_thd.to(dt), k_thd.to(dt), v_thd.to(dt)
    if not q_thd.dtype == k_thd.dtype == v_thd.dtype:   # no flash kernel: SDPA says what it makes of them
        if backend == "varlen":
            raise ValueError(f"model.attn_backend=varlen needs q, k and v of one dtype, got {q_thd.dtype}, "
                             f"{k_thd.dtype} and {v_thd.dtype}")
        backend = "loop" if backend == "auto" else backend
    backend = resolve_backend(backend, q_thd.device, q_thd.dtype, q_thd.shape[-1])
    groups = q_thd.shape[1] // k_thd.shape[1]
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        params = _varlen_params()
        kwargs = {"scale": scale} if scale is not None else {}
        if groups > 1 and varlen_takes_gqa():
            kwargs["enable_gqa"] = True
        else:  # releases without the GQA switch: expand k/v heads
            k_thd, v_thd = _expand_kv(k_thd, groups), _expand_kv(v_thd, groups)
        if causal:  # torch 2.10 spelled it is_causal; later releases take a (left, right) window
            kwargs.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
        cu = cu_seqlens.to(device=q_thd.device, dtype=torch.int32)
        return varlen_attn(q_thd, k_thd, v_thd, cu, cu, max_seqlen, max_seqlen, **kwargs)
    if backend == "sdpa_mask":
        T = q_thd.shape[0]
        doc_t = torch.repeat_interleave(
            torch.arange(cu_seqlens.numel() - 1, device=q_thd.device),
            (cu_seqlens[1:] - cu_seqlens[:-1]).to(q_thd.device).long(), output_size=T)
        mask_tt = doc_t[:, None] == doc_t[None, :]
        if causal:
            mask_tt &= torch.ones(T, T, dtype=torch.bool, device=q_thd.device).tril()
        out_htd = F.scaled_dot_product_attention(
            q_thd.transpose(0, 1), _expand_kv(k_thd, groups).transpose(0, 1),
            _expand_kv(v_thd, groups).transpose(0, 1), attn_mask=mask_tt, scale=scale)
        return out_htd.transpose(0, 1)
    return _loop_attention(q_thd, k_thd, v_thd, cu_seqlens, causal, scale, groups)


@torch.compiler.disable  # data-dependent Python loop: run it eagerly inside compiled blocks
def _loop_attention(q_thd, k_thd, v_thd, cu_seqlens, causal: bool, scale: float | None, groups: int) -> torch.Tensor:
    """The reference backend: one SDPA call per document."""
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # 4-D [1, heads, s, D] (torch's fused CPU kernel needs a batch dim; 3-D inputs take the math path,
        # which keeps the [heads, s, s] probabilities for backward) and GQA without expanding k/v
        q = q_thd[start:end].transpose(0, 1)[None]
        k = k_thd[start:end].transpose(0, 1)[None]
        v = v_thd[start:end].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=groups > 1)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else q_thd.new_empty(q_thd.shape)


def cached_attention(q_bhd: torch.Tensor, k_bhcd: torch.Tensor, v_bhcd: torch.Tensor, lengths_b: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """One decoding step over a padded KV cache: query b (one token, [B, Hq, D]) attends keys
    ``0 .. lengths_b[b]-1`` of its cache row (``k`` / ``v`` [B, Hkv, C, D], C >= max length; slots past a
    row's length are masked out). GQA without expanding k / v. -> [B, Hq, D]."""
    B, _, C, _ = k_bhcd.shape
    if q_bhd.shape[0] != B or lengths_b.shape != (B,):
        raise ValueError(f"cached_attention: q {tuple(q_bhd.shape)}, cache {tuple(k_bhcd.shape)} and lengths "
                         f"{tuple(lengths_b.shape)} disagree on the batch size")
    mask_b11c = (torch.arange(C, device=q_bhd.device)[None, :] < lengths_b.to(q_bhd.device)[:, None])[:, None, None]
    out_bh1d = F.scaled_dot_product_attention(q_bhd[:, :, None], k_bhcd, v_bhcd, attn_mask=mask_b11c, scale=scale,
                                              enable_gqa=q_bhd.shape[1] != k_bhcd.shape[1])
    return out_bh1d[:, :, 0]
