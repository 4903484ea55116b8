"""Fused lm_head + per-token log-prob: hidden states and the lm_head weight in, log p(target) out,
without ever holding the [R, V] logits.

For hidden rows h_i [H], weight W [V, H] and targets t_i:

    z_i = W h_i                                   [V], the logits of row i            (1)
    out_i = z_i[t_i] - lse(z_i)                   (0 where t_i == ignore_index)       (2)
    d out_i / d z_i = onehot(t_i) - softmax(z_i)  =: D_i                              (3)
    grad h_i = g_i D_i W,     grad W = Σ_i g_i D_iᵀ h_iᵀ                              (4)

Forward walks the rows in chunks of c: one [c, V] logits buffer is filled by a matmul,
(2) is taken from it, and only the row max m and log Σ exp(z - m) ([R] each) are kept.
Backward walks the chunks again, recomputes (1) into the same kind of buffer, turns it into
g·D in place (3), and accumulates (4). So at most one [c, V] chunk (plus the [V, H] weight
gradient that any lm_head backward produces) exists at a time, for one extra matmul
(4 instead of 3) — Liger-Kernel's fused linear losses and Cut-Cross-Entropy (Wijmans et
al. 2024) trade the same way.

(2) and (3) per chunk are the Triton log-softmax-gather kernels on CUDA (kernels/
logsoftmax_gather.py, in-place backward) and a chunk-sized PyTorch version on CPU.
The upstream gradient g differs per row (DPO weights each sequence by its own σ), which is
why (4) cannot be precomputed in forward.
"""

from __future__ import annotations

import torch

# Rows per chunk so one [c, V] float32 chunk holds about this many elements (2^22 = 16 MiB):
# R = 4096, V = 32000 -> c = 131, 3% of the [R, V] bytes; V = 128256 -> c = 32. Smaller
# chunks cost matmul efficiency (a [c, H] x [H, V] GEMM with few rows), larger ones memory.
CHUNK_ELEMENTS = 1 << 22


def rows_per_chunk(n_rows: int, vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(n_rows, chunk_size))
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(vocab, 1)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# (2) and (3) on one chunk: PyTorch (CPU, float64) and Triton (CUDA)
# --------------------------------------------------------------------------------------

def _chunk_forward_torch(z, targets, valid):
    """z [c, V] logits (overwritten), targets [c] (0 where ignored) -> (out, m, logsum) [c] each."""
    acc = _acc_dtype(z.dtype)
    x = z if z.dtype == acc else z.to(acc)
    m = x.amax(dim=-1)
    m = torch.where(m == float("-inf"), 0.0, m)                 # all -inf row: keep exp() finite
    x.sub_(m[:, None])                                          # z - m
    picked = x.gather(1, targets[:, None]).squeeze(1)           # z_t - m, exact near the max
    logsum = x.exp_().sum(dim=-1).log_()                        # log Σ exp(z - m)
    # (2) as (z_t - m) - logsum, never via lse = m + logsum (rounded to ulp(m)).
    return torch.where(valid, picked - logsum, 0.0), m, logsum


def _chunk_backward_torch(z, targets, m, logsum, g):
    """z [c, V] recomputed logits -> g·D [c, V] in z's dtype (in z's buffer when it is the acc dtype)."""
    acc = _acc_dtype(z.dtype)
    x = z if z.dtype == acc else z.to(acc)
    x.sub_(m[:, None]).sub_(logsum[:, None]).exp_().mul_(-g[:, None])   # -g·softmax(z)
    x.scatter_add_(1, targets[:, None], g[:, None])                      # + g·onehot(t)
    return x if x.dtype == z.dtype else z.copy_(x)


def _chunk_forward_triton(z, targets_raw, ignore_index):
    from . import logsoftmax_gather as lg
    return lg.logprobs_forward(z, targets_raw, ignore_index)


def _chunk_backward_triton(z, targets_raw, m, logsum, g, ignore_index):
    from . import logsoftmax_gather as lg
    return lg.logprobs_backward(z, targets_raw, m, logsum, g, ignore_index, inplace=True)


def _add_weight_grad(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """acc [V, H] += dzᵀ h. acc is float32 for 16-bit weights: one rounding at the end, as the
    unfused path's single [R, V]ᵀ x [R, H] GEMM has, not one per chunk."""
    if acc.dtype == dz.dtype:
        acc.addmm_(dz.t(), h)
    elif acc.is_cuda:
        torch.addmm(acc, dz.t(), h, out_dtype=acc.dtype, out=acc)   # bf16 GEMM, fp32 accumulate
    else:
        acc.add_(dz.t() @ h)


class FusedLinearLogprobs(torch.autograd.Function):
    """(1)-(4) over hidden [R, H] and weight [V, H], chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_size: int | None, use_triton: bool):
        R, V = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden.dtype)
        out, row_max, logsum = (torch.empty(R, dtype=acc, device=hidden.device) for _ in range(3))
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        c = rows_per_chunk(R, V, chunk_size)
        buf = torch.empty(c, V, dtype=hidden.dtype, device=hidden.device)   # reused by every chunk
        for s in range(0, R, c):
            e = min(s + c, R)
            z = torch.mm(hidden[s:e], weight.t(), out=buf[:e - s])          # (1) [c, V]
            if use_triton:
                o, mm_, ls = _chunk_forward_triton(z, targets[s:e], ignore_index)
            else:
                o, mm_, ls = _chunk_forward_torch(z, safe[s:e], valid[s:e])
            out[s:e], row_max[s:e], logsum[s:e] = o, mm_, ls
        ctx.save_for_backward(hidden, weight, targets, safe, valid, row_max, logsum)
        ctx.ignore_index, ctx.chunk_size, ctx.use_triton = ignore_index, chunk_size, use_triton
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, safe, valid, row_max, logsum = ctx.saved_tensors
        R, V = hidden.shape[0], weight.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = _acc_dtype(hidden.dtype)
        g = torch.where(valid, grad_out.to(acc), 0.0).contiguous()          # [R]; 0 on ignored rows
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype), device=weight.device) if want_w else None
        c = rows_per_chunk(R, V, ctx.chunk_size)
        buf = torch.empty(c, V, dtype=hidden.dtype, device=hidden.device)
        for s in range(0, R, c):
            e = min(s + c, R)
            z = torch.mm(hidden[s:e], weight.t(), out=buf[:e - s])          # (1) recomputed
            if ctx.use_triton:
                dz = _chunk_backward_triton(z, targets[s:e], row_max[s:e], logsum[s:e], g[s:e], ctx.ignore_index)
            else:
                dz = _chunk_backward_torch(z, safe[s:e], row_max[s:e], logsum[s:e], g[s:e])   # (3) · g
            if want_h:
                torch.mm(dz, weight, out=grad_h[s:e])                       # (4) [c, H]
            if want_w:
                _add_weight_grad(grad_w, dz, hidden[s:e])                   # (4) [V, H]
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None
