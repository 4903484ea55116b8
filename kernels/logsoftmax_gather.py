"""Triton log-softmax-gather: per-token log p(target) without the N×V log-softmax.

Three layers: the @triton.jit kernels, plain-Python launchers that choose the
block size and warps and allocate outputs, and an autograd Function over the
launchers; the pure-PyTorch reference (the CPU path and the test oracle) is in
reference.py and the dispatching entry point in __init__.py. Shapes: logits [N, V]
with unit column stride, targets [N] int64, out and the per-row statistics [N] float32.

Memory traffic per row is the floor for this op: forward reads the row once,
backward reads it once and writes its gradient once (3·V elements), and with
inplace_backward the gradient goes into the logits' own buffer.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# @triton.jit reads TRITON_INTERPRET when it decorates, i.e. when this module is
# imported; CPU tensors only work if it was "1" then.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_MAX_BLOCK = 4096


@triton.jit
def softcap_fn(z, cap):
    # (7) Final-logit soft-capping (Gemma 2's final_logit_softcapping): y = c·tanh(z/c), and
    #     dy/dz = 1 - tanh²(z/c) = sech²(z/c). With e = exp(-2|u|), u = z/c (no overflow:
    #     e <= 1):  tanh|u| = (1 - e)/(1 + e)  and  sech² u = 4e/(1 + e)², the latter without
    #     the cancellation of 1 - tanh² where tanh -> ±1. tanh's absolute error is ~1 ulp(1),
    #     so y's is ~c·eps, the size of ulp(y) near the cap. z = ±inf gives y = ±c, dy/dz = 0.
    u = z / cap
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(u < 0, -t, t)
    return cap * t, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def logprobs_fwd_kernel(
    logits_ptr,      # [N, V] fp32/bf16/fp16, row stride `stride_row`, column stride 1
    targets_ptr,     # [N] int64
    out_ptr,         # [N] fp32: log p(target), 0 for ignored rows
    max_ptr,         # [N] fp32: row max m            } saved for backward:
    logsum_ptr,      # [N] fp32: log sum exp(x - m)   } lse = m + logsum
    stride_row,
    V,
    ignore_index,
    softcap,         # fp32 c of (7); read only when HAS_SOFTCAP
    BLOCK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    # int64 row offset: N·V passes 2^31 at N=16384, V=128256.
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        # Ignored rows (prompt, padding) skip the V-long pass entirely.
        tl.store(out_ptr + row, 0.0)
        tl.store(max_ptr + row, 0.0)
        tl.store(logsum_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)

    # (1) log p(t) = x_t - lse,   lse = log sum_v exp(x_v).
    # (2) Online log-sum-exp over blocks B_1, B_2, ... of the row: keep the
    #     running max m_k = max(m_{k-1}, max B_k) and the running sum rescaled to
    #     it, d_k = sum_{v in B_1..B_k} exp(x_v - m_k). Then
    #         d_k = d_{k-1} · exp(m_{k-1} - m_k) + sum_{v in B_k} exp(x_v - m_k),
    #     every exponent is <= 0 (no overflow, ±1e4 logits are fine), and after
    #     the last block lse = m + log d. Accumulation is fp32 for every dtype.
    # (3) While m is still -inf (all entries so far -inf) exp(-inf - -inf) is
    #     NaN; subtracting 0 instead keeps d = 0 and exp(m - 0) = 0, which is
    #     the correct value of the rescaled empty sum.
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK):
        idx = start + cols
        x = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:   # (7); the padding columns past V stay -inf (capped they would be -c)
            x = tl.where(idx < V, softcap_fn(x, softcap)[0], float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    # (4) m and log d are kept apart and log p(t) = (x_t - m) - log d: forming
    #     lse = m + log d first would round it to ulp(m) (2e-6 at m = 25), an
    #     error that exp() passes on to every probability near 1 in backward.
    #     x_t - m is exact when x_t is near the max; log d <= log V is small.
    logsum = tl.log(d)
    x_t = tl.load(row_ptr + target).to(tl.float32)
    if HAS_SOFTCAP:
        x_t = softcap_fn(x_t, softcap)[0]
    tl.store(out_ptr + row, (x_t - m) - logsum)
    tl.store(max_ptr + row, m)
    tl.store(logsum_ptr + row, logsum)


@triton.jit
def logprobs_bwd_kernel(
    logits_ptr,      # [N, V] as in forward
    grad_ptr,        # [N, V] same dtype; may be logits_ptr itself (in-place backward)
    targets_ptr,     # [N] int64
    max_ptr,         # [N] fp32 row max m, from forward
    logsum_ptr,      # [N] fp32 log sum exp(x - m), from forward
    grad_out_ptr,    # [N] fp32 upstream gradient g (differs per row in DPO)
    stride_row,
    stride_grad_row,
    V,
    ignore_index,
    softcap,         # fp32 c of (7); read only when HAS_SOFTCAP
    BLOCK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * stride_grad_row
    cols = tl.arange(0, BLOCK)
    if target == ignore_index:
        # out = 0 does not depend on x: zero gradient. Written explicitly since
        # the buffer is uninitialised, or still holds the logits when in place.
        for start in range(0, V, BLOCK):
            idx = start + cols
            tl.store(grad_row_ptr + idx, tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty), mask=idx < V)
        return

    # (5) d(x_t - lse)/d x_v = 1[v = t] - exp(x_v - lse) = onehot_t(v) - softmax(x)_v,
    #     so with upstream g:   grad_v = g · (onehot_t(v) - exp((x_v - m) - log d)), see (4).
    # (6) One streaming pass: each element is read, then overwritten by the same
    #     program, so grad_ptr == logits_ptr (in place) is safe.
    g = tl.load(grad_out_ptr + row).to(tl.float32)
    m = tl.load(max_ptr + row)
    logsum = tl.load(logsum_ptr + row)
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        x = tl.load(row_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            # (7) the chain rule through y = c·tanh(z/c): grad_z = grad_y · sech²(z/c).
            y, dy = softcap_fn(x, softcap)
            grad = g * (tl.where(idx == target, 1.0, 0.0) - tl.exp((y - m) - logsum)) * dy
        else:
            p = tl.exp((x - m) - logsum)
            grad = g * (tl.where(idx == target, 1.0, 0.0) - p)
        tl.store(grad_row_ptr + idx, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a vocabulary of `vocab`.

    BLOCK covers small vocabularies in one step and caps at 4096 so a program's
    working set stays in registers (16 warps -> 8 elements per thread: one
    128-bit load for 16-bit logits, two for fp32).
    """
    block = min(triton.next_power_of_2(vocab), _MAX_BLOCK)
    num_warps = min(16, max(4, block // 256))
    return block, num_warps


def check_device(logits: torch.Tensor) -> None:
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"kernels.token_logprobs(impl='triton'): logits dtype must be float32/bfloat16/"
                        f"float16, got {logits.dtype}; use impl='reference'")
    if not logits.is_cuda and not INTERPRET:
        raise RuntimeError("kernels.token_logprobs(impl='triton'): logits are on "
                           f"{logits.device}; the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
                           "set in the environment before triton is first imported (CPU interpreter)")


def logprobs_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap: float | None = None):
    """logits [N, V], targets [N] int64 -> (out, row max, log sum exp(x - max)), each [N] fp32.
    softcap c: the statistics are those of the capped logits c·tanh(x/c), see (7)."""
    n, v = logits.shape
    assert logits.stride(1) == 1 and targets.is_contiguous()
    out, row_max, logsum = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3))
    if n:
        block, num_warps = launch_config(v)
        logprobs_fwd_kernel[(n,)](logits, targets, out, row_max, logsum, logits.stride(0), v, ignore_index,
                                  float(softcap or 0.0), BLOCK=block, HAS_SOFTCAP=softcap is not None,
                                  num_warps=num_warps)
    return out, row_max, logsum


def logprobs_backward(logits: torch.Tensor, targets: torch.Tensor, row_max: torch.Tensor,
                      logsum: torch.Tensor, grad_out: torch.Tensor, ignore_index: int, inplace: bool,
                      softcap: float | None = None) -> torch.Tensor:
    """g [N] -> gradient [N, V] in the logits' dtype; written into `logits` if inplace."""
    n, v = logits.shape
    grad = logits if inplace else torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    grad_out = grad_out.to(torch.float32).contiguous()   # sum()'s backward sends a stride-0 expand
    if n:
        block, num_warps = launch_config(v)
        logprobs_bwd_kernel[(n,)](logits, grad, targets, row_max, logsum, grad_out, logits.stride(0),
                                  grad.stride(0), v, ignore_index, float(softcap or 0.0), BLOCK=block,
                                  HAS_SOFTCAP=softcap is not None, num_warps=num_warps)
    return grad


class TritonLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, inplace_backward: bool, softcap: float | None):
        out, row_max, logsum = logprobs_forward(logits, targets, ignore_index, softcap)
        ctx.save_for_backward(logits, targets, row_max, logsum)
        ctx.ignore_index, ctx.softcap = ignore_index, softcap
        ctx.inplace_backward = inplace_backward
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, row_max, logsum = ctx.saved_tensors
        grad = logprobs_backward(logits, targets, row_max, logsum, grad_out, ctx.ignore_index, ctx.inplace_backward,
                                 ctx.softcap)
        if ctx.inplace_backward:
            # A raw kernel write does not bump the version counter: do it, so that any other
            # autograd user of these logits fails loudly instead of reading the gradient.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None


def triton_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                          inplace_backward: bool = False, softcap: float | None = None) -> torch.Tensor:
    """logits [N, V] (column stride 1), targets [N] int64 -> float32 [N]; softcap c: of c·tanh(logits/c)."""
    return TritonLogprobs.apply(logits, targets.contiguous(), ignore_index, inplace_backward, softcap)
