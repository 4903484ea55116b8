"""The small pieces a family is built from: norms, MLPs, the embedding and the output head.

Each does its arithmetic in the order and dtype of transformers' class of the same role, so the
same weights give the same logits in float32 and round alike in bf16 (tests/test_checkpoint.py,
tests/test_families.py). sdpo.models.model.FAMILIES says which family uses which; sdpo/models/blocks.py holds attention and the blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _normalize(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x²) + eps) over the last dim, in float32 (Zhang & Sennrich 2019)."""
    h = x.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """Llama's: y = w · x / rms(x). Normalise in float32, cast back, then scale by w."""

    identity = 1.0  # the weight value that makes the norm a pure normalisation (init_weights)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), self.identity))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * _normalize(x, self.eps).to(x.dtype)


class ScaleThenCastRMSNorm(RMSNorm):
    """OLMo 2/3's: scale by w in float32, then cast back (Llama casts first)."""

    def forward(self, x: Tensor) -> Tensor:
        return (self.weight * _normalize(x, self.eps)).to(x.dtype)


class OffsetRMSNorm(RMSNorm):
    """Gemma's: y = (1 + w) · x / rms(x), all in float32, then cast back. The stored weight is w,
    so a freshly initialised norm holds zeros."""

    identity = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return (_normalize(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # Gemma's GeGLU
}


class GatedMLP(nn.Module):
    """down(act(gate(x)) · up(x)): SwiGLU (Shazeer 2020) with silu, GeGLU with tanh-gelu (Gemma)."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class FusedGatedMLP(nn.Module):
    """Phi-3's SwiGLU with gate and up in one [2·I, H] matrix, gate rows first (HF's gate_up_proj)."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class ScaledEmbedding(nn.Embedding):
    """Gemma's: embeddings × √hidden, the factor rounded to the weight's dtype first (as transformers)."""

    def forward(self, input_ids: Tensor) -> Tensor:
        # √H rounded to the weight's dtype on the host (bf16: √3584 -> 60.0), a Python float: no device tensor
        scale = float(torch.tensor(self.embedding_dim ** 0.5).to(self.weight.dtype))
        return super().forward(input_ids) * scale


class SoftcappedHead(nn.Linear):
    """The output projection followed by Gemma 2's final logit soft-cap, z -> c·tanh(z / c).

    The cap lives in lm_head itself, so every caller of model.lm_head (generation, H4 scoring, the
    unfused log-prob path) gets capped logits; the fused lm_head + log-prob reads `.softcap` and
    passes it to the kernel (sdpo/logprobs.py)."""

    def __init__(self, in_features: int, out_features: int, softcap: float):
        super().__init__(in_features, out_features, bias=False)
        self.softcap = softcap

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(super().forward(x) / self.softcap) * self.softcap

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, softcap={self.softcap:g}"
