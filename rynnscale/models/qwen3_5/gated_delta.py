"""The Gated DeltaNet token mixer's two sequence operations, over a packed row of documents (``cu_seqlens``):
the causal depthwise convolution and the gated delta rule. Both restart at every document boundary, so a
packed row computes exactly what its documents compute alone.

Gated delta rule (per value head h; state S [dk, dv]; q, k l2-normalised, q scaled by dk^-1/2):
    S_t = exp(g_t) * S_{t-1} + k_t (beta_t * (v_t - S'_t^T k_t))^T,   S'_t = exp(g_t) S_{t-1}
    o_t = S_t^T q_t
(transformers' ``torch_recurrent_gated_delta_rule``). Implementations computing that function:
- ``chunk_gated_delta_rule``: the chunked (UT-transform) form in plain PyTorch, varlen: every document is cut
  into chunks of ``chunk`` tokens (the last one padded with tokens that change nothing: k = v = 0, g = 0,
  beta = 0); the intra-chunk part runs for all chunks of the row at once, then one scan over the chunks
  carries the state, which restarts (at ``initial_state`` or 0) at each document's first chunk. The CPU path
  and the reference of the GPU kernels; autograd gives its backward.
- ``recurrent_gated_delta_rule_ref``: one token at a time, per document (float64 tests' reference);
- ``recurrent_gated_delta_step``: one token of each of B sequences from their cached states (generation's
  decoding step, ``cache.py``).
- ``fla``: flash-linear-attention's Triton ``chunk_gated_delta_rule`` with ``cu_seqlens`` (GPU, optional).

Causal convolution (depthwise, kernel K, no bias, SiLU after): ``y_t = silu(sum_j w[:, K-1-j] * x_{t-j})`` over
the taps inside the token's document only (``causal_conv1d``; GPU: ``causal-conv1d``'s kernel with ``seq_idx``).

Shapes: T tokens of the row, Hk key heads of dk, Hv value heads of dv (Hv a multiple of Hk: each key head serves
Hv/Hk consecutive value heads), N documents, C channels. Arithmetic in fp32 (float64 stays float64), also under
autocast (a bf16 step): the rule turns it off, as ring attention does (bf16 matmuls tripled its error).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

CHUNK = 64
BACKENDS = ("auto", "torch", "fla")


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum x^2 + eps)`` over the last dim (transformers' / fla's q/k normalisation)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _doc_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    return [int(b) for b in cu_seqlens.detach().to("cpu").tolist()]


def position_in_doc(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """[T] index of every token inside its document."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]
    starts_t = torch.repeat_interleave(cu[:-1], lens, output_size=total)
    return torch.arange(total, device=device) - starts_t


def causal_conv1d(x_tc: torch.Tensor, weight_ck: torch.Tensor, cu_seqlens: torch.Tensor,
                  initial_ntc: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU of the causal depthwise convolution of ``x_tc`` [T, C] with ``weight_ck`` [C, K], within documents.

    ``initial_ntc`` [N, K-1, C] (context parallelism): the K-1 tokens that precede each of the N documents (the
    end of the same document on other ranks; zeros for a document that starts here). Computed in the weight's
    dtype (as transformers), returned in x's."""
    T, K = x_tc.shape[0], weight_ck.shape[1]
    x = x_tc.to(weight_ck.dtype)
    if initial_ntc is not None:   # put each document's context before it, convolve, keep the real rows
        n = cu_seqlens.numel() - 1
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        lens = cu[1:] - cu[:-1]
        doc_t = torch.repeat_interleave(torch.arange(n, device=x.device), lens, output_size=T)
        real_rows = torch.arange(T, device=x.device) + (K - 1) * (doc_t + 1)       # rows of x in the layout
        ctx_rows = (cu[:-1] + (K - 1) * torch.arange(n, device=x.device))[:, None] + torch.arange(K - 1, device=x.device)
        ext = x.new_zeros(T + n * (K - 1), x.shape[1])
        ext = ext.index_copy(0, real_rows, x).index_copy(0, ctx_rows.reshape(-1),
                                                         initial_ntc.to(x.dtype).reshape(-1, x.shape[1]))
        cu_ext = cu + (K - 1) * torch.arange(n + 1, device=x.device)
        return causal_conv1d(ext, weight_ck, cu_ext).index_select(0, real_rows).to(x_tc.dtype)
    pos_t = position_in_doc(cu_seqlens, T, x.device)
    y_tc = x * weight_ck[:, K - 1]
    for j in range(1, K):
        shifted = F.pad(x, (0, 0, j, 0))[:T]              # x_{t-j} (zeros before the row)
        keep_t = (pos_t >= j).to(x.dtype)[:, None]
        y_tc = y_tc + shifted * keep_t * weight_ck[:, K - 1 - j]
    return F.silu(y_tc).to(x_tc.dtype)


def _prepare(q_thd, k_thd, v_thd, g_th, beta_th, use_qk_l2norm: bool):
    """Common front of the torch implementations: heads expanded to Hv, compute dtype, l2norm, q scaling."""
    dtype = torch.promote_types(v_thd.dtype, torch.float32)
    rep = v_thd.shape[1] // k_thd.shape[1]
    if rep > 1:
        q_thd = q_thd.repeat_interleave(rep, dim=1)
        k_thd = k_thd.repeat_interleave(rep, dim=1)
    q, k, v, g, beta = (x.to(dtype) for x in (q_thd, k_thd, v_thd, g_th, beta_th))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return q * (q.shape[-1] ** -0.5), k, v, g, beta


def no_autocast(fn):
    """``fn(x, ...)`` with autocast off on x's device: its arithmetic in the dtypes it chooses (module docstring)."""
    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)
    return wrapper


@torch.compiler.disable  # data-dependent chunk layout and scan: runs eagerly inside compiled blocks
@no_autocast
def chunk_gated_delta_rule(
    q_thd: torch.Tensor, k_thd: torch.Tensor, v_thd: torch.Tensor, g_th: torch.Tensor, beta_th: torch.Tensor,
    cu_seqlens: torch.Tensor, *, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    use_qk_l2norm: bool = True, chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over the documents of a packed row, chunked (module docstring).

    q/k [T, Hk, dk], v [T, Hv, dv], g (log decay, <= 0) and beta [T, Hv]. ``initial_state`` [N, Hv, dk, dv]: each
    document's starting state (None: zeros). Returns (o [T, Hv, dv] in v's dtype, final states [N, Hv, dk, dv] in
    the compute dtype or None)."""
    T, Hv, dv = v_thd.shape
    q, k, v, g, beta = _prepare(q_thd, k_thd, v_thd, g_th, beta_th, use_qk_l2norm)
    dk = q.shape[-1]
    bounds = _doc_bounds(cu_seqlens)
    n_docs = len(bounds) - 1
    if T == 0 or n_docs == 0:
        states = None if not output_final_state else q.new_zeros(n_docs, Hv, dk, dv)
        return v_thd.new_zeros(T, Hv, dv), states
    # --- lay every document out in whole chunks: padded slot -> source token (T = a zero token)
    src, first_chunk, last_chunk = [], [], []
    n_all = 0
    for n in range(n_docs):
        a, b = bounds[n], bounds[n + 1]
        n_chunks = max(1, math.ceil((b - a) / chunk))   # an empty document still gets (an all-padding) chunk
        src += [torch.arange(a, b), torch.full((n_chunks * chunk - (b - a),), T)]
        first_chunk.append(n_all)
        n_all += n_chunks
        last_chunk.append(n_all - 1)
    src_p = torch.cat(src).to(q.device)

    def lay(x: torch.Tensor) -> torch.Tensor:  # [T, Hv, ...] -> [n_all, Hv, chunk, ...]
        x = torch.cat([x, x.new_zeros((1, *x.shape[1:]))]).index_select(0, src_p)
        x = x.view(n_all, chunk, *x.shape[1:])
        return x.transpose(1, 2)

    q_nhcd, k_nhcd, v_nhcd = lay(q), lay(k), lay(v)
    g_nhc, beta_nhc = lay(g), lay(beta)
    # --- intra-chunk, all chunks at once
    cum_nhc = g_nhc.cumsum(-1)
    causal_cc = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay_nhcc = (cum_nhc[..., :, None] - cum_nhc[..., None, :]).masked_fill(~causal_cc, float("-inf")).exp()
    k_beta = k_nhcd * beta_nhc[..., None]
    v_beta = v_nhcd * beta_nhc[..., None]
    # (I + strictly-lower(beta K K^T * decay)) U = [V_beta | K_beta * exp(cum)]
    ut_nhcc = (k_beta @ k_nhcd.transpose(-1, -2)) * decay_nhcc
    rhs = torch.cat([v_beta, k_beta * cum_nhc.exp()[..., None]], dim=-1)
    sol = torch.linalg.solve_triangular(ut_nhcc, rhs, upper=False, unitriangular=True)
    u_nhcv, w_nhck = sol[..., :dv], sol[..., dv:]
    intra_nhcc = (q_nhcd @ k_nhcd.transpose(-1, -2)) * decay_nhcc
    q_dec = q_nhcd * cum_nhc.exp()[..., None]
    k_dec = k_nhcd * (cum_nhc[..., -1:] - cum_nhc).exp()[..., None]
    chunk_decay_nh = cum_nhc[..., -1].exp()[..., None, None]
    # --- the scan over chunks; the state restarts at every document's first chunk
    outs, finals = [], []
    doc_of_first = {c: n for n, c in enumerate(first_chunk)}
    last = set(last_chunk)
    state = q.new_zeros(Hv, dk, dv)
    for i in range(n_all):
        if i in doc_of_first:
            n = doc_of_first[i]
            state = initial_state[n].to(q.dtype) if initial_state is not None else q.new_zeros(Hv, dk, dv)
        v_new = u_nhcv[i] - w_nhck[i] @ state
        outs.append(q_dec[i] @ state + intra_nhcc[i] @ v_new)
        state = state * chunk_decay_nh[i] + k_dec[i].transpose(-1, -2) @ v_new
        if output_final_state and i in last:
            finals.append(state)
    o_nhcv = torch.stack(outs)
    o_pv = o_nhcv.transpose(1, 2).reshape(n_all * chunk, Hv, dv)
    keep = (src_p < T).nonzero().squeeze(1)
    o_thv = o_pv.index_select(0, keep)
    return o_thv.to(v_thd.dtype), (torch.stack(finals) if output_final_state else None)


def recurrent_gated_delta_rule_ref(
    q_thd: torch.Tensor, k_thd: torch.Tensor, v_thd: torch.Tensor, g_th: torch.Tensor, beta_th: torch.Tensor,
    cu_seqlens: torch.Tensor, *, initial_state: torch.Tensor | None = None, use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function one token at a time per document (the definition; tests run it in float64).
    Returns (o [T, Hv, dv], final states [N, Hv, dk, dv])."""
    q, k, v, g, beta = _prepare(q_thd, k_thd, v_thd, g_th, beta_th, use_qk_l2norm)
    T, Hv, dv = v.shape
    bounds = _doc_bounds(cu_seqlens)
    outs, finals = [], []
    for n in range(len(bounds) - 1):
        state = initial_state[n].to(q.dtype) if initial_state is not None else q.new_zeros(Hv, q.shape[-1], dv)
        for t in range(bounds[n], bounds[n + 1]):
            state = state * g[t].exp()[:, None, None]
            kv_mem = (state * k[t][:, :, None]).sum(dim=-2)                  # S^T k   [Hv, dv]
            delta = (v[t] - kv_mem) * beta[t][:, None]
            state = state + k[t][:, :, None] * delta[:, None, :]
            outs.append((state * q[t][:, :, None]).sum(dim=-2))
        finals.append(state)
    o = torch.stack(outs) if outs else v.new_zeros(0, Hv, dv)
    return o.to(v_thd.dtype), torch.stack(finals)


def recurrent_gated_delta_step(
    q_bhd: torch.Tensor, k_bhd: torch.Tensor, v_bhd: torch.Tensor, g_bh: torch.Tensor, beta_bh: torch.Tensor,
    state_bhkv: torch.Tensor | None, *, use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each of B sequences from their states (the decoding step of generation): the definition's
    update (``recurrent_gated_delta_rule_ref``, transformers' ``torch_recurrent_gated_delta_rule``), batched.

    q/k [B, Hk, dk], v [B, Hv, dv], g / beta [B, Hv], ``state_bhkv`` [B, Hv, dk, dv] (None: zeros). Returns (o [B, Hv,
    dv] in v's dtype, the new states [B, Hv, dk, dv] in the compute dtype)."""
    q, k, v, g, beta = _prepare(q_bhd, k_bhd, v_bhd, g_bh, beta_bh, use_qk_l2norm)
    B, Hv, dv = v.shape
    state = q.new_zeros(B, Hv, q.shape[-1], dv) if state_bhkv is None else state_bhkv.to(q.dtype)
    state = state * g.exp()[..., None, None]
    kv_mem = (state * k[..., None]).sum(dim=-2)                               # S^T k   [B, Hv, dv]
    delta = (v - kv_mem) * beta[..., None]
    state = state + k[..., None] * delta[..., None, :]
    o = (state * q[..., None]).sum(dim=-2)
    return o.to(v_bhd.dtype), state


# ---------------------------------------------------------------------------------------------- GPU kernels
# flash-linear-attention (``fla-core``, pure Python + Triton): ``chunk_gated_delta_rule`` with ``cu_seqlens`` (the
# state restarts per document; q / k l2-normalised in the kernel; GVA: Hv a multiple of Hk) and its varlen
# ``causal_conv1d`` (backend "cuda" = the ``causal-conv1d`` package's kernel when that is installed, else Triton).
@functools.lru_cache(maxsize=1)
def fla_import_error() -> str | None:
    """None when flash-linear-attention's ``chunk_gated_delta_rule`` imports, else why not (one line)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _  # noqa: F401
    except Exception as e:  # ImportError, or triton failing without a GPU driver
        return f"{type(e).__name__}: {e}"
    return None


@functools.lru_cache(maxsize=1)
def causal_conv1d_import_error() -> str | None:
    """None when the ``causal-conv1d`` package's kernel imports, else why not (one line)."""
    try:
        from causal_conv1d import causal_conv1d_fn as _  # noqa: F401
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def pick_backend(kernels: str, x: torch.Tensor) -> str:
    """``torch`` or ``fla`` for a DeltaNet layer's sequence operations: ``model.kernels`` ``auto`` / ``liger`` use fla
    on CUDA when it imports (liger has no DeltaNet kernel), ``torch`` always the plain PyTorch path."""
    if kernels == "torch" or x.device.type != "cuda":
        return "torch"
    if fla_import_error() is None:
        return "fla"
    _warn_no_fla()
    return "torch"


@functools.lru_cache(maxsize=1)
def _warn_no_fla() -> None:
    import logging

    logging.getLogger(__name__).warning(
        "Gated DeltaNet layers run the plain PyTorch chunked path on CUDA (flash-linear-attention does not import: "
        "%s); pip install fla-core for its Triton kernels", fla_import_error())


@torch.compiler.disable  # Triton kernels behind autograd Functions: eager inside compiled blocks
def fla_causal_conv1d(x_tc: torch.Tensor, weight_ck: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``causal_conv1d`` (SiLU, restart per document) through fla's varlen kernel."""
    from fla.modules.causal_conv1d import causal_conv1d as fla_conv

    backend = "cuda" if causal_conv1d_import_error() is None else "triton"
    y_1tc, _ = fla_conv(x_tc[None], weight_ck.to(x_tc.dtype), activation="silu", backend=backend,
                        cu_seqlens=cu_seqlens.to(device=x_tc.device, dtype=torch.long))
    return y_1tc[0]


@torch.compiler.disable
def fla_gated_delta_rule(q_thd: torch.Tensor, k_thd: torch.Tensor, v_thd: torch.Tensor, g_th: torch.Tensor,
                         beta_th: torch.Tensor, cu_seqlens: torch.Tensor, *, initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunk_gated_delta_rule`` through fla's kernel (same arguments and results; q / k l2-normalised in it)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    o_1thv, state = fla_chunk(q_thd[None], k_thd[None], v_thd[None], g_th[None].float(), beta_th[None],
                              initial_state=initial_state, output_final_state=output_final_state,
                              use_qk_l2norm_in_kernel=True,
                              cu_seqlens=cu_seqlens.to(device=q_thd.device, dtype=torch.long))
    return o_1thv[0].to(v_thd.dtype), state
