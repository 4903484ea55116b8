"""Fused lm_head + log-prob + loss: the lm_head's gradient taken while each group's logits are at hand.

kernels/fused_linear.py keeps only the row statistics in forward and recomputes every chunk's logits in
backward, because the upstream gradient g of a token's log-prob is unknown until the whole batch's loss
is. Most preference losses are sums over pairs, and a pair's loss reads only its own two sequences:

    L = Σ_k L_k(lp[rows of group k]),   lp_i = log softmax(W h_i)[t_i]                      (1)

so once group k's logits z = h W^T are computed, L_k and g = dL_k / d lp are known, and the gradient
(eq. (3)-(4) of fused_linear) can be taken right away:

    D_i = g_i (onehot(t_i) - softmax(z_i)),   grad h_i = D_i W,   grad W += D_iᵀ h_i          (2)

Three GEMMs per row instead of four, and two sweeps over [c, V] instead of two in forward plus two in
backward. Forward returns L (and the log-probs, for metrics); backward hands back the stored gradients
times its incoming gradient over the `grad_scale` they were taken with (exactly 1 when it is that).

Rows are walked in chunks of whole groups of at most `rows` rows. A group longer than that is a chunk of
its own, cut into pieces whose last is `rows` long: every piece's log-probs first, then the last piece's
gradient from the logits still in the buffer, then the earlier pieces' logits again (fused_linear's
recompute, for the rows beyond one buffer only) once g is known. Within a chunk
the elementwise work runs in row blocks of about 2^20 logits (4 MiB in float32, in cache): max, z - m,
Σ exp and the target's entry in one sweep; exp(z - m - log Σ) · -g and + g at the target in the other.
The arithmetic per element is fused_linear's own (same ops, same order), so lp and D are the same
numbers; only grad W's sum over chunks is cut at other rows.

CPU and float32 here (the caller checks): grad W is a [V, H] float32 buffer from forward to backward,
which on a GPU with 16-bit weights would be a float32 copy the size of two bf16 weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# Logits per row block of the elementwise sweeps: 4 MiB in float32, inside this CPU's 8 MiB L3.
BLOCK_ELEMENTS = 1 << 20


def chunks_of_groups(bounds: Sequence[int], rows: int) -> list[tuple[int, int]]:
    """Group boundaries [0, b_1, ..., R] -> (first group, end group) runs of whole groups of at most
    `rows` rows each; a group longer than `rows` is a run of its own."""
    runs, k, n = [], 0, len(bounds) - 1
    while k < n:
        j = k + 1
        while j < n and bounds[j + 1] - bounds[k] <= rows:
            j += 1
        runs.append((k, j))
        k = j
    return runs


class FusedLinearGroupLoss(torch.autograd.Function):
    """(1)-(2) over hidden [R, H], weight [V, H] (float32), targets [R], groups [bounds[k], bounds[k+1])."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bounds: list[int], group_loss: Callable, ignore_index: int,
                rows: int, grad_scale: float):
        R, V = hidden.shape[0], weight.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        dev, dt = hidden.device, hidden.dtype
        lp = torch.empty(R, dtype=dt, device=dev)                      # log p(target), eq. (1)
        g = torch.zeros(R, dtype=dt, device=dev)                       # dL/d lp · grad_scale
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        losses = []
        buf = torch.empty(min(rows, R) * V, dtype=dt, device=dev)      # one [c, V] chunk, reused
        blk = max(1, BLOCK_ELEMENTS // V)
        tmp = torch.empty(blk * V, dtype=dt, device=dev)               # exp of one row block

        def take_loss(k0, k1):   # the chunk's groups: L_k, and g on their rows
            for k in range(k0, k1):
                a, b = bounds[k], bounds[k + 1]
                with torch.enable_grad():
                    x = lp[a:b].detach().requires_grad_()
                    loss = group_loss(k, x)
                    (gk,) = torch.autograd.grad(loss, x, torch.full_like(loss, grad_scale))
                losses.append(loss.detach())
                g[a:b] = torch.where(valid[a:b], gk, 0.0)

        def apply_grads(s, e, d):   # (2)'s GEMMs for rows s:e, d = D of those rows
            if want_h:
                torch.mm(d, weight, out=grad_h[s:e])
            if want_w:
                grad_w.addmm_(d.t(), hidden[s:e])

        def logits(a, b):   # z = h W^T of rows a:b, in the chunk buffer
            return torch.mm(hidden[a:b], weight.t(), out=buf[:(b - a) * V].view(b - a, V))

        def row_stats(z, a):   # sweep 1 over rows a: of logits z: lp, and (m, log Σ exp(z - m)); z becomes z - m
            n = z.shape[0]
            m, logsum = torch.empty(n, dtype=dt, device=dev), torch.empty(n, dtype=dt, device=dev)
            for i in range(0, n, blk):
                x, r = z[i:i + blk], slice(a + i, a + i + min(blk, n - i))
                mi = x.amax(dim=-1)
                m[i:i + blk] = torch.where(mi == float("-inf"), 0.0, mi)
                x.sub_(m[i:i + blk, None])
                picked = x.gather(1, safe[r, None]).squeeze(1)
                ls = torch.exp(x, out=tmp[:x.numel()].view(x.shape)).sum(dim=-1).log_()
                logsum[i:i + blk] = ls
                lp[r] = torch.where(valid[r], picked - ls, 0.0)
            return m, logsum

        def take_grads(z, a, logsum, m=None):   # sweep 2: z - m (or, with m, z) -> D in place; then (2)
            n = z.shape[0]
            gs = g[a:a + n]
            hit = torch.where(valid[a:a + n], gs, 0.0)
            for i in range(0, n, blk):
                x = z[i:i + blk]
                if m is not None:
                    x.sub_(m[i:i + blk, None])
                x.sub_(logsum[i:i + blk, None]).exp_().mul_(-gs[i:i + blk, None])
                x.scatter_add_(1, safe[a + i:a + i + x.shape[0], None], hit[i:i + blk, None])
            apply_grads(a, a + n, z)

        for k0, k1 in chunks_of_groups(bounds, rows):
            s, e = bounds[k0], bounds[k1]
            # A group longer than `rows` is cut so that its last piece is `rows` long: that piece's
            # logits stay in the buffer from its row statistics to its gradient, the pieces before
            # it are computed again once g is known (fused_linear's recompute, for them only).
            first = (e - s) % rows if e - s > rows else 0
            starts = ([s] if first else []) + (list(range(s + first, e, rows)) or [s])
            pieces = list(zip(starts, starts[1:] + [e]))
            stats = [row_stats(logits(a, b), a) for a, b in pieces]
            take_loss(k0, k1)
            if not (want_h or want_w):
                continue
            (a, b), (_, logsum) = pieces[-1], stats[-1]
            take_grads(buf[:(b - a) * V].view(b - a, V), a, logsum)
            for (a, b), (m, logsum) in zip(pieces[:-1], stats[:-1]):
                take_grads(logits(a, b), a, logsum, m)
        ctx.grads, ctx.grad_scale = (grad_h, grad_w), grad_scale
        total = torch.stack(losses).sum() if losses else hidden.new_zeros(())
        ctx.mark_non_differentiable(lp)
        return total, lp

    @staticmethod
    def backward(ctx, grad_total, _grad_lp):
        grad_h, grad_w = ctx.grads
        ctx.grads = None   # autograd may take the buffers over instead of copying them
        # x · (s / s) is x exactly, so the expected grad_scale changes nothing; as a tensor, no host read.
        factor = grad_total / ctx.grad_scale if ctx.grad_scale else torch.zeros_like(grad_total)
        for grad in (grad_h, grad_w):
            if grad is not None:
                grad.mul_(factor)
        return grad_h, grad_w, None, None, None, None, None, None
