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
g·D in place (3), and accumulates (4). With 16-bit weights it does so one vocab block of W at
a time, so the float32 accumulator of grad W is [Vb, H], not [V, H]. At most one chunk of
logits exists at a time, for one extra matmul (4 instead of 3) — Liger-Kernel's fused
linear losses and Cut-Cross-Entropy (Wijmans et al. 2024) trade the same way.

(2) and (3) per chunk are the Triton log-softmax-gather kernels on CUDA (kernels/
logsoftmax_gather.py, in-place backward) and a chunk-sized PyTorch version on CPU.
The upstream gradient g differs per row (DPO weights each sequence by its own σ), which is
why (4) cannot be precomputed in forward.

softcap c (Gemma 2's final_logit_softcapping): (2) and (3) are taken of y = c·tanh(z/c) instead
of z, and D_i gains the factor dy/dz = 1 - tanh²(z/c) elementwise, per chunk like the rest.
"""

from __future__ import annotations

import torch

# Rows per chunk. CPU: enough that one [c, V] chunk holds about 2^25 elements (128 MiB in float32),
# and at least MIN_ROWS: the GEMMs with c rows lose throughput when c is small, the logits GEMM
# [c, H] x [H, V] most (AVX2, H = 256, V = 32000: ~45 GFLOP/s at c = 192, ~60 at 768 and up, 67 for
# a square GEMM; bench/RESULTS.md, issue 28). R = 4096: V = 32000 -> c = 1048, V = 128256 -> 261.
# Whole pairs of up to c rows go through kernels/fused_loss.py in one chunk (most of the
# UltraFeedback-like spread's pairs at V = 32000). The CUDA sizes below do not pay on CPU.
CHUNK_ELEMENTS = 1 << 25
MIN_ROWS = 256
# Rows of W per backward block for 16-bit weights: a [4096, H] float32 gradient accumulator
# (64 MiB at H = 4096) instead of [V, H].
VOCAB_BLOCK = 4096
# CUDA: a GEMM with c rows does ~c flops per byte of W it reads, and an H100 needs ~300 (bf16) to
# be compute-bound, so c = 192 re-reading all of W per chunk is memory-bound at V = 128k. 2^27
# logits per chunk (c = 1046 at V = 128256, 4194 at 32000: 256 MiB in bf16), >= 1024 rows, and
# 16384-row vocab blocks in backward (a 256 MiB float32 accumulator at H = 4096; c = 8192).
CUDA_CHUNK_ELEMENTS = 1 << 27
CUDA_MIN_ROWS = 1024
CUDA_VOCAB_BLOCK = 16384


def chunk_sizes(device) -> tuple[int, int, int]:
    """(logits per chunk, min rows per chunk, vocab block) for a device."""
    if torch.device(device).type == "cuda":
        return CUDA_CHUNK_ELEMENTS, CUDA_MIN_ROWS, CUDA_VOCAB_BLOCK
    return CHUNK_ELEMENTS, MIN_ROWS, VOCAB_BLOCK


def rows_per_chunk(n_rows: int, vocab: int, chunk_size: int | None, device="cpu") -> int:
    if chunk_size is not None:
        return max(1, min(n_rows, chunk_size))
    elements, min_rows, _ = chunk_sizes(device)
    return max(1, min(n_rows, max(min_rows, elements // max(vocab, 1))))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# (2) and (3) on one chunk: PyTorch (CPU, float64) and Triton (CUDA)
# --------------------------------------------------------------------------------------

def _chunk_forward_torch(z, targets, valid, softcap=None):
    """z [c, V] logits (overwritten), targets [c] (0 where ignored) -> (out, m, logsum) [c] each."""
    acc = _acc_dtype(z.dtype)
    x = z if z.dtype == acc else z.to(acc)
    if softcap is not None:
        x.div_(softcap).tanh_().mul_(softcap)                   # y = c·tanh(z/c)
    m = x.amax(dim=-1)
    m = torch.where(m == float("-inf"), 0.0, m)                 # all -inf row: keep exp() finite
    x.sub_(m[:, None])                                          # z - m
    picked = x.gather(1, targets[:, None]).squeeze(1)           # z_t - m, exact near the max
    logsum = x.exp_().sum(dim=-1).log_()                        # log Σ exp(z - m)
    # (2) as (z_t - m) - logsum, never via lse = m + logsum (rounded to ulp(m)).
    return torch.where(valid, picked - logsum, 0.0), m, logsum


def _chunk_backward_torch(z, idx, m, logsum, g, g_hit, softcap=None, dy=None):
    """z [c, Vb] recomputed logits of a vocab block -> g·D [c, Vb] in z's dtype (in z's buffer when
    it is the acc dtype). idx [c]: the target's column in the block; g_hit [c]: g where it is in it.
    softcap: dy, an acc-dtype buffer of z's shape, receives 1 - tanh²(z/c)."""
    acc = _acc_dtype(z.dtype)
    x = z if z.dtype == acc else z.to(acc)
    if softcap is not None:
        t = x.div_(softcap).tanh_()
        d = torch.mul(t, t, out=dy).neg_().add_(1)                           # dy/dz = 1 - tanh²(z/c)
        t.mul_(softcap).sub_(m[:, None]).sub_(logsum[:, None]).exp_().mul_(-g[:, None])
        x.scatter_add_(1, idx[:, None], g_hit[:, None]).mul_(d)
        return x if x.dtype == z.dtype else z.copy_(x)
    x.sub_(m[:, None]).sub_(logsum[:, None]).exp_().mul_(-g[:, None])   # -g·softmax(z)
    x.scatter_add_(1, idx[:, None], g_hit[:, None])                      # + g·onehot(t)
    return x if x.dtype == z.dtype else z.copy_(x)


def _chunk_forward_triton(z, targets_raw, ignore_index, softcap=None):
    from . import logsoftmax_gather as lg
    return lg.logprobs_forward(z, targets_raw, ignore_index, softcap)


def _chunk_backward_triton(z, targets_raw, m, logsum, g, ignore_index, softcap=None):
    from . import logsoftmax_gather as lg
    return lg.logprobs_backward(z, targets_raw, m, logsum, g, ignore_index, inplace=True, softcap=softcap)


def _add_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc float32 for 16-bit a, b: one rounding at the end, as the unfused
    path's single GEMM over all R rows has, not one per chunk."""
    global _ADDMM_OUT_DTYPE, _MM_OUT_DTYPE
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _ADDMM_OUT_DTYPE:
        try:   # 16-bit GEMM accumulating into the float32 acc in place (aten::addmm.dtype_out, CUDA only)
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_OUT_DTYPE = False
    if acc.is_cuda and _MM_OUT_DTYPE:
        try:   # a float32 product, then added: one [rows, cols] float32 temporary per call
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
            return
        except (RuntimeError, TypeError, NotImplementedError):  # older torch: round to 16 bits first
            _MM_OUT_DTYPE = False
    if not acc.is_cuda:
        # CPU has no float32-output 16-bit GEMM: float32 copies of the chunk-sized operands, accumulated in
        # place. Measured (bench/fused_chunks.py, AVX2): 25x faster than a bf16 product then added, and exact
        # to float32 instead of bf16 (2e-5 vs 0.25 max error at [4096, 192] x [192, 512]).
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
        return
    acc.add_(a @ b)   # CUDA on a torch without out_dtype GEMMs: rounded to 16 bits first


_ADDMM_OUT_DTYPE = _MM_OUT_DTYPE = True


class FusedLinearLogprobs(torch.autograd.Function):
    """(1)-(4) over hidden [R, H] and weight [V, H], chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_size: int | None, use_triton: bool,
                softcap: float | None = None):
        R, V = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden.dtype)
        out, row_max, logsum = (torch.empty(R, dtype=acc, device=hidden.device) for _ in range(3))
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        c = rows_per_chunk(R, V, chunk_size, hidden.device)
        buf = torch.empty(c, V, dtype=hidden.dtype, device=hidden.device)   # reused by every chunk
        for s in range(0, R, c):
            e = min(s + c, R)
            z = torch.mm(hidden[s:e], weight.t(), out=buf[:e - s])          # (1) [c, V]
            if use_triton:
                o, mm_, ls = _chunk_forward_triton(z, targets[s:e], ignore_index, softcap)
            else:
                o, mm_, ls = _chunk_forward_torch(z, safe[s:e], valid[s:e], softcap)
            out[s:e], row_max[s:e], logsum[s:e] = o, mm_, ls
        ctx.save_for_backward(hidden, weight, targets, safe, valid, row_max, logsum)
        ctx.ignore_index, ctx.chunk_size, ctx.use_triton = ignore_index, chunk_size, use_triton
        ctx.softcap = softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, safe, valid, row_max, logsum = ctx.saved_tensors
        (R, H), V = hidden.shape, weight.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = _acc_dtype(hidden.dtype)
        dev = hidden.device
        g = torch.where(valid, grad_out.to(acc), 0.0).contiguous()          # [R]; 0 on ignored rows
        # 16-bit weights: (4) is accumulated over the row chunks in float32, one vocab block of Vb
        # rows of W at a time ([Vb, H] float32, not [V, H]: that would be 2x the weight gradient
        # itself); (3) only needs the saved row statistics, so a block's logits are exact alone.
        # float32 weights: one block, accumulated straight into the gradients.
        Vb = V if weight.dtype == acc else min(V, chunk_sizes(dev)[2])
        c = rows_per_chunk(R, Vb, ctx.chunk_size, dev)
        grad_w = torch.empty_like(weight) if want_w else None
        w_acc = torch.empty(Vb, H, dtype=acc, device=dev) if want_w and weight.dtype != acc else None
        grad_h = None
        if want_h:
            grad_h = torch.empty_like(hidden) if Vb == V else torch.zeros(R, H, dtype=acc, device=dev)
        flat = torch.empty(c * Vb, dtype=hidden.dtype, device=dev)           # one [c, Vb] chunk, reused
        softcap = ctx.softcap
        dy_flat = None if softcap is None or ctx.use_triton else torch.empty(c * Vb, dtype=acc, device=dev)
        for v0 in range(0, V, Vb):
            v1 = min(v0 + Vb, V)
            wb = weight[v0:v1]                                               # [vb, H]
            hit = valid & (targets >= v0) & (targets < v1)                  # target inside this block
            idx = torch.where(hit, targets - v0, 0)
            g_hit = torch.where(hit, g, 0.0)
            if ctx.use_triton:   # the kernel's one-hot never matches column v1 - v0 (out of the block)
                t_blk = torch.where(valid, torch.where(hit, targets - v0, v1 - v0), ctx.ignore_index).contiguous()
            gw = None
            if want_w:
                gw = grad_w[v0:v1] if w_acc is None else w_acc[:v1 - v0]
                gw.zero_()
            for s in range(0, R, c):
                e = min(s + c, R)
                z = torch.mm(hidden[s:e], wb.t(), out=flat[:(e - s) * (v1 - v0)].view(e - s, v1 - v0))  # (1)
                if ctx.use_triton:
                    dz = _chunk_backward_triton(z, t_blk[s:e], row_max[s:e], logsum[s:e], g[s:e], ctx.ignore_index,
                                                softcap)
                else:
                    dy = None if dy_flat is None else dy_flat[:z.numel()].view(z.shape)
                    dz = _chunk_backward_torch(z, idx[s:e], row_max[s:e], logsum[s:e], g[s:e], g_hit[s:e],
                                               softcap, dy)                  # (3)·g
                if want_h:
                    if Vb == V:
                        torch.mm(dz, wb, out=grad_h[s:e])                    # (4) [c, H]
                    else:
                        _add_mm(grad_h[s:e], dz, wb)
                if want_w:
                    _add_mm(gw, dz.t(), hidden[s:e])                         # (4) [vb, H]
            if w_acc is not None:
                grad_w[v0:v1].copy_(w_acc[:v1 - v0])                         # the one rounding
        if grad_h is not None and grad_h.dtype != hidden.dtype:
            grad_h = grad_h.to(hidden.dtype)
        return grad_h, grad_w, None, None, None, None, None
