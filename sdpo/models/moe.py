"""Mixture-of-experts MLPs (Mixtral, Qwen3-MoE, Qwen3.5-MoE): a top-k router, stacked experts, grouped compute,
and the router statistics the load-balancing loss is made of.

A sparse layer replaces the dense MLP by E experts, each a SwiGLU MLP of its own, and a router
(HF's "gate", a [E, H] matrix) that sends every token to k of them (Shazeer et al. 2017; Mixtral,
Jiang et al. 2024):

    p = softmax(W_r x)  (float32)            [N, E]
    (w, i) = top-k(p)                        [N, k]  w / Σw when the family renormalises
    y = Σ_j w_j · expert_{i_j}(x)            every token through its k experts, none dropped
    y += sigmoid(w_s · x) · shared(x)        Qwen3.5-MoE: a shared expert every token takes, gated per token

The experts of a layer are three stacked parameters, gate_proj / up_proj [E, I, H] and down_proj
[E, H, I] (HF's per-expert w1 / w3 / w2, or gate_proj / up_proj / down_proj, one row block each;
sdpo/models/checkpoint.py reads and writes the hub's per-expert tensors), so FSDP2 shards a layer's
experts as three large parameters along E. Compute: the N·k (token, expert) assignments are sorted
by expert and each projection is one grouped matmul over the sorted rows (`torch._grouped_mm` where
the build has it; an exact per-expert loop elsewhere): k rows per token, never [N, E, H].

The load-balancing loss (Switch Transformer, Fedus et al. 2021, eq. 4-6, as transformers computes it
over all sparse layers together) is E · Σ_i f_i · P_i with f_i the share of assignments that went to
expert i and P_i the mean router probability of expert i, both over real (non-pad) tokens and all
sparse layers. A forward cannot tell pads from tokens in a packed row, so each sparse layer hands
back per-token sums over the layers, [N, E] (counts and probabilities), and the step applies its pad
mask afterwards (load_balancing_loss). The router z-loss (ST-MoE, Zoph et al. 2022, eq. 5) is the
mean over tokens and layers of logsumexp(W_r x)².
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdpo.models.layers import ACTIVATIONS, GatedMLP

# torch._grouped_mm: [M, K] @ [G, K, N] with row offsets -> [M, N]. On CPU it runs float32 and bf16,
# forward and backward (torch 2.14: equal to the per-expert loop bit for bit, tests/test_moe.py);
# every stride must be a multiple of 16 bytes. On CUDA: used for bf16 on sm80+ (transformers 5.24 uses it
# there with torch >= 2.9); not tried on a GPU here.
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class RouterStats(NamedTuple):
    """Per-token sums over the sparse layers of one forward; N = B·T tokens, layers = how many were summed.

    probs [N, E]: router probabilities (differentiable); counts [N, E]: 1 where the expert was picked
    (no gradient); z [N]: logsumexp(router logits)² (differentiable)."""
    probs: Tensor
    counts: Tensor
    z: Tensor
    layers: int

    def __add__(self, other: "RouterStats | None") -> "RouterStats":  # the layer loop's sum; None is 0
        if other is None:
            return self
        return RouterStats(self.probs + other.probs, self.counts + other.counts, self.z + other.z,
                           self.layers + other.layers)

    __radd__ = __add__


def load_balancing_loss(stats: RouterStats, token_mask: Tensor | None = None) -> Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4): E · Σ_i f_i · P_i, unscaled.

    f_i = assignments to expert i / (rows), P_i = Σ router prob of i / (rows), rows = real tokens ×
    sparse layers; token_mask [B, T] (or [N]) is nonzero at real tokens (None: all). Equals
    transformers' MixtralForCausalLM(..., output_router_logits=True).aux_loss with a 0/1 mask.
    Scalar float32."""
    E = stats.probs.shape[-1]
    probs, counts = stats.probs.reshape(-1, E), stats.counts.reshape(-1, E)
    if token_mask is None:
        f, P, rows = counts.sum(0), probs.sum(0), probs.shape[0] * stats.layers
    else:
        m = (token_mask.reshape(-1) != 0).to(probs.dtype)  # [N]
        f, P, rows = (counts * m[:, None]).sum(0), (probs * m[:, None]).sum(0), m.sum() * stats.layers
    return E * torch.sum((f / rows) * (P / rows))


def router_z_loss(stats: RouterStats, token_mask: Tensor | None = None) -> Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): mean over real tokens and sparse layers of
    logsumexp(router logits)². Scalar float32."""
    z = stats.z.reshape(-1)
    if token_mask is None:
        return z.sum() / (z.shape[0] * stats.layers)
    m = (token_mask.reshape(-1) != 0).to(z.dtype)
    return (z * m).sum() / (m.sum() * stats.layers)


# ---------------------------------------------------------------------------------------------
# experts


def _segments(x: Tensor, offsets: Tensor) -> list[Tensor]:
    """Rows of x cut at the (host) offsets: one slice per expert."""
    starts = [0] + offsets[:-1].tolist()
    return [x[s:t] for s, t in zip(starts, offsets.tolist())]


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor, grouped: bool) -> Tensor:
    """Rows of x [M, in] sorted by expert, expert e's rows ending at offsets[e] (int32 [E], cumulative)
    -> x_rows @ weight[e]ᵀ, [M, out]; weight [E, out, in]. grouped: one torch._grouped_mm; else a loop
    over the experts (one host sync for the offsets), the same products."""
    if grouped:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    return torch.cat([F.linear(rows, weight[e]) for e, rows in enumerate(_segments(x, offsets))])


class Experts(nn.Module):
    """E SwiGLU experts as three stacked parameters (HF's per-expert w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))  # [E, I, H]
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))  # [E, I, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))  # [E, H, I]
        self.act = ACTIVATIONS[act]
        self.impl = "auto"  # "auto" | "grouped" | "loop" (bench/moe.py and the tests pick one)

    def use_grouped(self, x: Tensor) -> bool:
        if self.impl != "auto":
            return self.impl == "grouped"
        if not HAS_GROUPED_MM or x.dtype not in (torch.float32, torch.bfloat16):
            return False
        if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
            return False  # its compiled (meta) form takes bf16 only (torch 2.14)
        if x.device.type == "cuda":
            if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
                return False
        elif x.device.type != "cpu":
            return False
        align = 16 // x.element_size()  # every stride a multiple of 16 bytes
        return self.gate_proj.shape[1] % align == 0 and self.gate_proj.shape[2] % align == 0

    def forward(self, x: Tensor, top_w: Tensor, top_i: Tensor) -> Tensor:
        """x [N, H], top_w / top_i [N, k] -> Σ_j top_w[:, j] · expert_{top_i[:, j]}(x), [N, H]."""
        N, k = top_i.shape
        flat = top_i.reshape(-1)  # [N·k] expert of each (token, slot)
        order = flat.argsort(stable=True)  # assignments sorted by expert; ties keep token order
        # tokens per expert, cumulated: [E] (a scatter, not bincount, whose output size would sync on CUDA)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        offsets = counts.cumsum(0).to(torch.int32)
        xs = x[order // k]  # [N·k, H], each token once per expert it visits
        grouped = self.use_grouped(xs)
        if not grouped:
            offsets = offsets.cpu()  # the loop slices on the host: one sync per layer
        h = self.act(grouped_linear(xs, self.gate_proj, offsets, grouped)) * grouped_linear(
            xs, self.up_proj, offsets, grouped)  # [N·k, I]
        y = grouped_linear(h, self.down_proj, offsets, grouped)  # [N·k, H]
        # Weight in the router's dtype (float32 for Mixtral), put back in (token, slot) order by the inverse
        # permutation, sum each token's k outputs and only then cast back, as transformers' grouped experts
        # do (a dense sum over k: index_add_'s atomics would add in a different order each run on CUDA).
        y = y * top_w.reshape(-1)[order, None]
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return y[inverse].view(N, k, -1).sum(dim=1).to(x.dtype)


class SparseMoE(nn.Module):
    """Router + experts (+ a gated shared expert when shared_intermediate > 0).
    forward(x [B, T, H]) -> (y [B, T, H], RouterStats of this layer)."""

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, act: str,
                 normalize: bool, weights_in_float32: bool, shared_intermediate: int = 0):
        super().__init__()
        self.top_k, self.normalize, self.weights_in_float32 = top_k, normalize, weights_in_float32
        self.gate = nn.Linear(hidden, num_experts, bias=False)  # HF's router "gate": [E, H]
        self.experts = Experts(num_experts, hidden, intermediate, act)
        self.shared_expert = None
        if shared_intermediate:  # Qwen3.5-MoE (as Qwen2-MoE): one SwiGLU MLP for every token, its own sigmoid gate
            self.shared_expert = GatedMLP(hidden, shared_intermediate, act)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)  # [1, H]

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [N, H] -> logits [N, E], probs [N, E] float32, top-k weights and expert ids [N, k]."""
        logits = self.gate(x)  # [N, E]
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)  # ties: as torch.topk, as transformers
        if self.normalize:  # Mixtral always, Qwen3-MoE with norm_topk_prob
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        if not self.weights_in_float32:  # Qwen3-MoE casts the weights back to the logits' dtype
            top_w = top_w.to(logits.dtype)
        return logits, probs, top_w, top_i

    def forward(self, x: Tensor) -> tuple[Tensor, RouterStats]:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        logits, probs, top_w, top_i = self.route(flat)
        y = self.experts(flat, top_w, top_i)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)  # [N, 1] · [N, H]
        y = y.view(B, T, H)
        with torch.no_grad():
            counts = torch.zeros_like(probs).scatter_(1, top_i, 1.0)  # [N, E]
        z = torch.logsumexp(logits.float(), dim=-1).square()  # [N]
        return y, RouterStats(probs, counts, z, 1)
