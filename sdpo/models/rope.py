"""Rotary position embeddings (RoPE, Su et al. 2021) and the frequency schedules checkpoints use.

A layer rotates the first `rotary_dim` channels of every query and key head (all of them unless a
partial_rotary_factor < 1, Phi-3/4) by angle pos·θ_i, θ_i = theta^(-2i/rotary_dim) (RoFormer eq. 15),
in HF's half-split layout: channel i pairs with channel i + rotary_dim/2. A rope dict says which
schedule rescales θ (the "rope_type" of HF's rope_parameters / rope_scaling):

    default   θ as above
    linear    θ / factor                                   (position interpolation)
    dynamic   theta stretched once the batch outgrows max_position_embeddings (NTK-aware)
    llama3    Llama-3.1: long wavelengths / factor, short kept, smooth in between
    yarn      YaRN (Peng et al. 2023): per-band mix of θ and θ / factor, cos and sin × attention_factor
    longrope  Phi-3: θ / short_factor_i, or / long_factor_i past original_max_position_embeddings;
              cos and sin × attention_factor

Every schedule is computed on the positions' device from tensors, so a forward never reads a
position to the host: "dynamic" and "longrope", which depend on the longest position in the
batch, select with torch.where (sdpo issue 29, finding 7b).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def rope_type(rope: dict | None) -> str:
    rope = rope or {}
    return rope.get("rope_type", rope.get("type", "default"))  # older configs spell it "type"


def _theta_powers(rotary_dim: int, device) -> Tensor:
    """2i / rotary_dim for i < rotary_dim / 2, float32 (HF: arange(0, d, 2, int64).float() / d)."""
    return torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim


def yarn_attention_factor(rope: dict) -> float:
    """YaRN's scale of cos and sin: 0.1·ln(factor) + 1 (eq. 22), or the ratio of two such terms with
    mscale / mscale_all_dim (DeepSeek's spelling; 1.0 when both are 1), unless given outright."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = rope["factor"]
    if rope.get("mscale") and rope.get("mscale_all_dim"):
        return mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
    return mscale(factor)


def longrope_attention_factor(rope: dict, max_position_embeddings: int) -> float:
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    orig = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_position_embeddings / orig
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))


def inv_freq_and_scale(theta: float, rope: dict | None, rotary_dim: int, max_position_embeddings: int,
                       seq_len: Tensor | int | None = None, device=None) -> tuple[Tensor, float]:
    """-> (θ_i float32 [rotary_dim/2], the factor cos and sin are multiplied by).

    seq_len: longest position + 1 in the batch (a tensor: never read to the host); only "dynamic"
    and "longrope" use it."""
    rope, kind = rope or {}, rope_type(rope)
    powers = _theta_powers(rotary_dim, device)
    if kind == "dynamic" and seq_len is not None:
        # Dynamic NTK: stretch the base once the batch outgrows the trained context, in float32 on the
        # device as transformers does. Stateless, unlike transformers, which keeps the largest base it
        # has seen until seq_len drops back to the trained context.
        seq = torch.as_tensor(seq_len, device=device).float()
        factor, trained = rope["factor"], max_position_embeddings
        stretched = theta * (factor * seq / trained - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        base = torch.where(seq > trained, stretched, torch.full_like(stretched, theta))
        return 1.0 / base ** powers, 1.0
    inv_freq = 1.0 / (theta ** powers)
    if kind == "linear":
        return inv_freq / rope["factor"], 1.0  # position interpolation: positions divided by factor
    if kind == "llama3":
        # Llama-3.1: keep short wavelengths (< old_ctx / high_freq_factor), divide long ones
        # (> old_ctx / low_freq_factor) by factor, interpolate smoothly in between.
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_ctx = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(theta, rope, rotary_dim, device), yarn_attention_factor(rope)
    if kind == "longrope":
        orig = rope["original_max_position_embeddings"]
        short = torch.tensor(rope["short_factor"], dtype=torch.float32, device=device)
        long = torch.tensor(rope["long_factor"], dtype=torch.float32, device=device)
        base = theta ** powers
        short_freq, long_freq = 1.0 / (short * base), 1.0 / (long * base)
        if seq_len is not None:  # the long factors once the batch is longer than the trained context
            short_freq = torch.where(torch.as_tensor(seq_len, device=device) > orig, long_freq, short_freq)
        return short_freq, longrope_attention_factor(rope, max_position_embeddings)
    return inv_freq, 1.0


def _yarn_inv_freq(theta: float, rope: dict, d: int, device) -> Tensor:
    """YaRN's "NTK-by-parts" (Peng et al. 2023, sec. 3.2): bands that turn fewer than beta_slow times over
    the trained context are interpolated (θ / factor), bands that turn more than beta_fast times are
    kept (θ), with a linear ramp in between over the band index."""
    factor, orig = rope["factor"], rope["original_max_position_embeddings"]
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def band(rotations):  # the band index that turns `rotations` times over the trained context
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = band(beta_fast), band(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    keep = 1 - ramp  # 1: extrapolate (keep θ), 0: interpolate (θ / factor)
    pos_freqs = theta ** _theta_powers(d, device)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_cos_sin(theta: float, rope: dict | None, rotary_dim: int, max_position_embeddings: int,
                 position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, T, rotary_dim], computed in float32 and cast to `dtype` (the activation dtype
    for most families, as transformers does; float32 for OLMo 2/3, whose transformers code keeps it)."""
    seq_len = None
    if rope_type(rope) in ("dynamic", "longrope"):
        seq_len = position_ids.max() + 1  # stays on the device
    inv_freq, scale = inv_freq_and_scale(theta, rope, rotary_dim, max_position_embeddings, seq_len,
                                         position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, rotary_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, rotary_dim]: the two halves rotate together
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, n_heads, T, d]; cos, sin [B, T, r], r <= d. Pairs (x_i, x_{i+r/2}), i < r/2, rotate by
    pos·θ_i; channels past r pass through (partial rotary). The result has x's dtype: under autocast
    a float32 cos would otherwise promote q and k to float32 while v stays bf16 (issue 29, finding 1)."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = (x_rot * cos[:, None] + rotated * sin[:, None]).to(x.dtype)
    return out if r == x.shape[-1] else torch.cat((out, x_pass), dim=-1)
