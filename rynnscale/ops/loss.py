"""Fused lm_head + cross-entropy that never materialises the full [L, V] fp32 logits.

``linear_cross_entropy(hidden_ld, weight_vh, labels_l, chunk_tokens)`` returns the SUM over tokens of
``-log softmax(hidden @ weight.T)[label]`` (labels already shifted; ``-100`` = ignored). The caller
divides by its own token count (e.g. across micro-batches and ranks), which is why this is a sum.

How: only labelled rows are kept (one host sync to count them), then rows are processed in chunks of
``chunk_tokens``: logits [chunk, V] in the input dtype, upcast to fp32, logsumexp, and -- when a
gradient is needed -- the gradients w.r.t. hidden and weight right away (``softmax - onehot``), as
Liger's fused linear cross-entropy does. Backward then only scales those by the incoming scalar
gradient, so the vocabulary matmul runs 3 times per chunk instead of 4 (no recompute) and peak extra
memory is one chunk of logits plus one fp32 [V, H] weight-gradient accumulator.

``linear_log_probs(hidden_ld, weight_vh, targets_l, chunk_tokens, temperature)`` returns the per-token
``log softmax(hidden @ weight.T / temperature)[target]`` [L] (0 at ignored rows) for policy-gradient losses,
chunked the same way; since the incoming gradient differs per token, its backward recomputes each chunk's
logits (4 vocabulary matmuls per chunk instead of 3) and keeps only the log-sum-exp per token in between.

Backends (``backend``; the ``model.kernels`` choice): ``torch`` = the chunked PyTorch code above (CPU
path and reference); ``liger`` = liger-kernel's ``LigerFusedLinearCrossEntropyFunction`` (CUDA; its
Triton cross-entropy works on the chunk's logits in place in their own dtype, no fp32 copy), with
fp32 gradient accumulation and ``reduction="sum"`` so both return the same sum; used for training where the
hidden states need a gradient (it computes no gradient at all otherwise, not even the weight's).
"""

from __future__ import annotations

import torch

from rynnscale.batch import IGNORE_INDEX
from rynnscale.ops import fused


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ld, weight_vh, labels_l, chunk_tokens: int, ignore_index: int, grad_enabled: bool):
        L, H = hidden_ld.shape
        acc = _acc_dtype(hidden_ld.dtype)
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        rows_n = (labels_l != ignore_index).nonzero().squeeze(1)  # host sync: the labelled row count
        h_nh = hidden_ld.index_select(0, rows_n)
        y_n = labels_l.index_select(0, rows_n)
        loss = torch.zeros((), dtype=acc, device=hidden_ld.device)
        grad_h_nh = torch.empty_like(h_nh) if need_h else None
        grad_w_vh = torch.zeros(weight_vh.shape, dtype=acc, device=weight_vh.device) if need_w else None
        for s in range(0, h_nh.shape[0], chunk_tokens):
            h_ch = h_nh[s:s + chunk_tokens]
            y_c = y_n[s:s + chunk_tokens]
            logits_cv = (h_ch @ weight_vh.t()).to(acc)
            target_c = logits_cv.gather(1, y_c[:, None]).squeeze(1)
            max_c1 = logits_cv.amax(dim=-1, keepdim=True)
            # one exp pass over the chunk, in place: exp(logits - max); its row sums give the log-sum-exp and,
            # scaled by their reciprocals, the softmax (torch.logsumexp followed by exp(logits - lse) took two)
            exp_cv = logits_cv.sub_(max_c1).exp_()
            sum_c = exp_cv.sum(dim=-1)
            lse_c = sum_c.log() + max_c1.squeeze(1)
            loss = loss + (lse_c - target_c).sum()
            if need_h or need_w:
                # d loss_sum / d logits = softmax - onehot, computed in place on the chunk's logits
                dlogits_cv = exp_cv.mul_(sum_c.reciprocal()[:, None])
                dlogits_cv.scatter_add_(1, y_c[:, None], dlogits_cv.new_full((y_c.shape[0], 1), -1.0))
                d_cv = dlogits_cv.to(hidden_ld.dtype)
                if need_h:
                    grad_h_nh[s:s + chunk_tokens] = d_cv @ weight_vh
                if need_w:
                    grad_w_vh += (d_cv.t() @ h_ch).to(acc)
        ctx.save_for_backward(rows_n, grad_h_nh if need_h else None, grad_w_vh if need_w else None)
        ctx.shape_ld, ctx.h_dtype, ctx.w_dtype = (L, H), hidden_ld.dtype, weight_vh.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        rows_n, grad_h_nh, grad_w_vh = ctx.saved_tensors
        grad_h = grad_w = None
        if grad_h_nh is not None:
            grad_h = grad_h_nh.new_zeros(ctx.shape_ld)
            grad_h.index_copy_(0, rows_n, grad_h_nh * grad_loss.to(grad_h_nh.dtype))
        if grad_w_vh is not None:
            grad_w = (grad_w_vh * grad_loss).to(ctx.w_dtype)
        return grad_h, grad_w, None, None, None, None


def _liger_linear_cross_entropy(hidden_ld, weight_vh, labels_l, ignore_index: int) -> torch.Tensor:
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    out = LigerFusedLinearCrossEntropyFunction.apply(
        hidden_ld, weight_vh, labels_l, None, None, ignore_index, 0.0, 0.0, "sum", None, False, torch.float32)
    loss = out[0] if isinstance(out, tuple) else out
    return loss.float()


def linear_cross_entropy(
    hidden_ld: torch.Tensor,
    weight_vh: torch.Tensor,
    labels_l: torch.Tensor,
    chunk_tokens: int = 4096,
    ignore_index: int = IGNORE_INDEX,
    kernels: str = "torch",
) -> torch.Tensor:
    """Sum over labelled tokens of the cross-entropy of ``hidden_ld [L, H] @ weight_vh[V, H].T``.

    ``labels_l`` [L] are the already-shifted targets (``ignore_index`` = no loss). Returns a 0-dim
    fp32 tensor (fp64 for fp64 inputs); 0 with zero gradients if no token is labelled. ``kernels``:
    ``rynnscale.ops.fused`` choice (auto / torch / liger)."""
    if hidden_ld.dim() != 2 or weight_vh.dim() != 2 or hidden_ld.shape[1] != weight_vh.shape[1]:
        raise ValueError(f"linear_cross_entropy: expected hidden [L, H] and weight [V, H], got "
                         f"{tuple(hidden_ld.shape)} and {tuple(weight_vh.shape)}")
    if labels_l.shape != hidden_ld.shape[:1]:
        raise ValueError(f"linear_cross_entropy: labels shape {tuple(labels_l.shape)} != ({hidden_ld.shape[0]},)")
    if chunk_tokens <= 0:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be positive, got {chunk_tokens}")
    # liger computes the gradients inside its forward: use it for training only, and only where the hidden
    # states need a gradient (liger computes none otherwise, not the weight's either: a frozen trunk under a
    # trainable lm_head would get no head gradient)
    if (torch.is_grad_enabled() and hidden_ld.requires_grad and labels_l.numel()
            and fused.pick(kernels, hidden_ld, params=(weight_vh,)) == "liger"):
        return _liger_linear_cross_entropy(hidden_ld, weight_vh, labels_l, ignore_index)
    # inside Function.forward grad mode is off, so decide here whether gradients are wanted (eval: no)
    return _LinearCrossEntropy.apply(hidden_ld, weight_vh, labels_l, int(chunk_tokens), int(ignore_index),
                                     torch.is_grad_enabled())


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ld, weight_vh, targets_l, chunk_tokens: int, ignore_index: int, inv_temp: float):
        acc = _acc_dtype(hidden_ld.dtype)
        rows_n = (targets_l != ignore_index).nonzero().squeeze(1)  # host sync: the labelled row count
        h_nh = hidden_ld.index_select(0, rows_n)
        y_n = targets_l.index_select(0, rows_n)
        logp_n = torch.empty(h_nh.shape[0], dtype=acc, device=hidden_ld.device)
        lse_n = torch.empty_like(logp_n)
        for s in range(0, h_nh.shape[0], chunk_tokens):
            logits_cv = (h_nh[s:s + chunk_tokens] @ weight_vh.t()).to(acc) * inv_temp
            lse_n[s:s + chunk_tokens] = torch.logsumexp(logits_cv, dim=-1)
            logp_n[s:s + chunk_tokens] = logits_cv.gather(1, y_n[s:s + chunk_tokens, None]).squeeze(1)
        logp_n -= lse_n
        ctx.save_for_backward(rows_n, h_nh, weight_vh, y_n, lse_n)
        ctx.chunk_tokens, ctx.inv_temp, ctx.length = chunk_tokens, inv_temp, hidden_ld.shape[0]
        dev = hidden_ld.device.type   # backward recomputes the logits under the forward's autocast (same lse)
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return logp_n.new_zeros(hidden_ld.shape[0]).index_copy_(0, rows_n, logp_n)

    @staticmethod
    def backward(ctx, grad_l):
        rows_n, h_nh, weight_vh, y_n, lse_n = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_n = grad_l.index_select(0, rows_n).to(lse_n.dtype)
        grad_h_nh = torch.empty_like(h_nh) if need_h else None
        grad_w_vh = torch.zeros(weight_vh.shape, dtype=lse_n.dtype, device=weight_vh.device) if need_w else None
        c = ctx.chunk_tokens
        dev, enabled, dtype = ctx.autocast
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            for s in range(0, h_nh.shape[0], c):
                h_ch = h_nh[s:s + c]
                logits_cv = (h_ch @ weight_vh.t()).to(lse_n.dtype) * ctx.inv_temp
                # d logp / d logits = onehot - softmax, times the token's incoming gradient, times 1/T (chain rule)
                d_cv = logits_cv.sub_(lse_n[s:s + c, None]).exp_().mul_(-g_n[s:s + c, None])
                d_cv.scatter_add_(1, y_n[s:s + c, None], g_n[s:s + c, None])
                d_cv = (d_cv * ctx.inv_temp).to(h_nh.dtype)
                if need_h:
                    grad_h_nh[s:s + c] = d_cv @ weight_vh
                if need_w:
                    grad_w_vh += (d_cv.t() @ h_ch).to(lse_n.dtype)
        grad_h = grad_w = None
        if need_h:
            grad_h = grad_h_nh.new_zeros(ctx.length, h_nh.shape[1]).index_copy_(0, rows_n, grad_h_nh)
        if need_w:
            grad_w = grad_w_vh.to(weight_vh.dtype)
        return grad_h, grad_w, None, None, None, None


def linear_log_probs(
    hidden_ld: torch.Tensor,
    weight_vh: torch.Tensor,
    targets_l: torch.Tensor,
    chunk_tokens: int = 4096,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-token log-probability [L] of ``targets_l`` under ``softmax(hidden_ld @ weight_vh.T / temperature)``:
    fp32 (fp64 for fp64 inputs), 0 (and no gradient) where the target is ``ignore_index``. Never holds more
    than one chunk of logits (module docstring)."""
    if hidden_ld.dim() != 2 or weight_vh.dim() != 2 or hidden_ld.shape[1] != weight_vh.shape[1]:
        raise ValueError(f"linear_log_probs: expected hidden [L, H] and weight [V, H], got "
                         f"{tuple(hidden_ld.shape)} and {tuple(weight_vh.shape)}")
    if targets_l.shape != hidden_ld.shape[:1]:
        raise ValueError(f"linear_log_probs: targets shape {tuple(targets_l.shape)} != ({hidden_ld.shape[0]},)")
    if chunk_tokens <= 0 or not temperature > 0:
        raise ValueError(f"linear_log_probs: chunk_tokens={chunk_tokens} and temperature={temperature} must be > 0")
    return _LinearLogProbs.apply(hidden_ld, weight_vh, targets_l, int(chunk_tokens), int(ignore_index),
                                 1.0 / float(temperature))
