"""The Llama-family decoder: Llama-2, Llama-3/3.1, Mistral, SOLAR and Qwen2 in one file.

All five share one block: pre-norm RMSNorm, rotary position embeddings (RoPE),
grouped-query attention, a SwiGLU MLP. They differ only in small switches in the
config: q/k/v biases (Qwen2), a sliding attention window (Mistral), the RoPE
frequency schedule (Llama-3.1's "llama3" scaling) and tied embeddings.

Parameter names are Hugging Face's without the leading "model." (sdpo/models/checkpoint.py
maps them), and every op is done in the same order and dtype as transformers'
implementation, so the same weights give the same logits (see tests/test_checkpoint.py).

Masking convention (one rule for unpadded, padded and packed batches):
attention_mask [B, T] holds 0 at padding and a positive segment id elsewhere; a token
attends to earlier-or-equal positions of its own segment. position_ids default to
0, 1, 2, ... counted from each segment's first token, so left padding and packing
need nothing special. With a KVCache (incremental decoding, sdpo/models/generate.py) the mask
covers the cached tokens and the new ones, [B, past + T], as in transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdpo.models.attention import attend

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# F.scaled_dot_product_attention(..., enable_gqa=True): K/V with fewer heads than Q (torch >= 2.5).
SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None -> num_attention_heads (no GQA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear" | "dynamic", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2); Llama's flag also adds an o_proj bias
    sliding_window: int | None = None  # Mistral: a query sees itself and the sliding_window - 1 keys before it
    model_type: str = "llama"  # llama | mistral | qwen2
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None  # Llama-3.1 lists several
    pad_token_id: int | None = None
    torch_dtype: str = "float32"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None and rope_type(self) not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type(self)!r} is not supported; expected one of {ROPE_TYPES}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None")


def rope_type(config: ModelConfig) -> str:
    rs = config.rope_scaling or {}
    return rs.get("rope_type", rs.get("type", "default"))  # older configs spell it "type"


def rope_inv_freq(config: ModelConfig, seq_len: int | None = None, device=None) -> Tensor:
    """Inverse frequencies θ_i = theta^(-2i/d), i < d/2 (RoFormer, Su et al. 2021, eq. 15), float32 [d/2].

    seq_len is the longest position + 1 in the batch; only "dynamic" scaling uses it.
    """
    d, base = config.head_dim, config.rope_theta
    rs, kind = config.rope_scaling or {}, rope_type(config)
    if kind == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        # Dynamic NTK: stretch the base once the batch outgrows the trained context. Stateless,
        # unlike transformers, which keeps the largest base it has seen until seq_len drops back.
        factor = rs["factor"]
        base = base * (factor * seq_len / config.max_position_embeddings - (factor - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if kind == "linear":
        inv_freq = inv_freq / rs["factor"]  # position interpolation: positions divided by factor
    elif kind == "llama3":
        # Llama-3.1: keep short wavelengths (< old_ctx / high_freq_factor), divide long ones
        # (> old_ctx / low_freq_factor) by factor, interpolate smoothly in between.
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(config: ModelConfig, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, T, head_dim], computed in float32 then cast to the activation dtype (as transformers does)."""
    seq_len = int(position_ids.max()) + 1 if rope_type(config) == "dynamic" else None
    inv_freq = rope_inv_freq(config, seq_len, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, d]: the two halves rotate together (rotate_half layout)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, n_heads, T, d]. Pairs (x_i, x_{i+d/2}) rotate by angle pos·θ_i (HF's half-split layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def default_position_ids(attention_mask: Tensor) -> Tensor:
    """[B, T] segment ids (0 = pad) -> positions counted from each segment's first token; pads get 0."""
    seg = attention_mask.long()
    T = seg.shape[1]
    idx = torch.arange(T, device=seg.device).expand_as(seg)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # index of the segment's start
    return torch.where(seg > 0, idx - first, torch.zeros_like(idx))


def is_right_padded(attention_mask: Tensor) -> bool:
    """True when every row is one segment from position 0 followed by padding (1…1 0…0).

    Then plain causal attention is exact for every real token (its keys are all earlier
    real tokens; the pads come after it), so no mask is needed and SDPA can take its
    flash / fused-causal kernels. Pad queries see earlier tokens instead of only
    themselves: finite, and never scored. One host sync per forward."""
    m = attention_mask
    return bool(((m.min() >= 0) & (m.max() <= 1) & (m[:, 1:] <= m[:, :-1]).all()).item())


def build_attention_mask(
    attention_mask: Tensor | None, T: int, sliding_window: int | None, device, past: int = 0
) -> Tensor | None:
    """Boolean [B or 1, 1, T, past + T], True = may attend; None means plain causal (SDPA's fast
    is_causal path), used whenever it is exact: nothing cached, no mask or a right-padded one, and
    no sliding window shorter than T. past > 0 (a KVCache) needs the mask: SDPA's is_causal aligns
    queries to the first keys, not the last.

    Key j is visible to query i (both counted over past + T) when j <= i, both are in the same
    non-pad segment and, with a sliding window w, i - j < w (transformers: kv_idx > q_idx - w).
    A pad query sees only itself, so its softmax row is never empty (no NaN).
    """
    window_bites = sliding_window is not None and sliding_window < past + T  # else the window hides nothing
    if past == 0 and not window_bites and (attention_mask is None or is_right_padded(attention_mask)):
        return None
    q, k = torch.arange(past, past + T, device=device), torch.arange(past + T, device=device)
    allowed = k[None, :] <= q[:, None]  # [T_q, T_k]
    if sliding_window is not None:
        allowed = allowed & (q[:, None] - k[None, :] < sliding_window)
    allowed = allowed[None]  # [1, T_q, T_k]
    if attention_mask is not None:
        seg = attention_mask.long()  # [B, T_k]
        same = (seg[:, past:, None] == seg[:, None, :]) & (seg[:, None, :] > 0)  # [B, T_q, T_k]
        allowed = (allowed & same) | (k[None, :] == q[:, None])[None]
    return allowed[:, None]


class KVCache:
    """Rotated keys and values of every token seen so far, for incremental decoding: each layer's
    slice is [B, n_kv_heads, max_len, head_dim] (stored before the GQA repeat), filled up to .length.
    hidden_states(..., kv_cache=c) appends the new tokens' keys and values and advances c.length.

    With "dynamic" RoPE the cached keys keep the base they were rotated with (transformers does the
    same); a full recompute past max_position_embeddings would re-rotate them."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [B, n_kv, T, d] of the new tokens -> all keys and values so far, [B, n_kv, length + T, d]."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KVCache: {end} tokens exceed its max_len={self.k.shape[3]}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def checkpoint_every(value) -> int:
    """model.activation_checkpointing -> k: 0 none, 1 every block ("full"), k every k-th block
    (blocks 0, k, 2k, ...: "every:k" or the int k). Old configs' true / false mean full / none.

    A checkpointed block keeps only its input [B, T, H] and recomputes its activations in
    backward (one extra block forward); every k-th trades 1/k of that compute for 1/k of the
    memory saving, so the cheapest k that fits is the one to use (python -m sdpo.runtime.memory)."""
    v = value.strip().lower() if isinstance(value, str) else value
    if v is True or v in ("full", "true", "all"):
        return 1
    if v is False or v in ("none", "false", "", None):
        return 0
    if isinstance(v, str) and v.startswith("every:"):
        v = v[len("every:"):]
    try:
        k = int(v)
    except (TypeError, ValueError):
        k = -1
    if k < 0 or isinstance(value, float):
        raise ValueError(f"activation_checkpointing must be 'none', 'full' or 'every:K' (K >= 1), got {value!r}")
    return k


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps) (Zhang & Sennrich 2019). Normalise in float32, cast back, then
    scale by w — the exact order transformers uses, so bf16 results match bit for bit."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        # Qwen2 has q/k/v biases only; Llama's attention_bias flag covers o_proj as well.
        o_bias = bias and config.model_type != "qwen2"
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, past + T, d)
        # GQA (Ainslie et al. 2023): query head h reads kv head h // (n_heads / n_kv_heads). SDPA
        # does that itself since torch 2.5 (enable_gqa): no [B, n_heads, T, d] copies of K and V.
        rep = self.n_heads // self.n_kv_heads
        if rep > 1 and not SDPA_GQA:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        # softmax(q kᵀ / sqrt(d)) v, with the default scale 1/sqrt(head_dim)
        y = attend(q, k, v, mask)  # SDPA; FlexAttention for packed rows on CUDA (sdpo/models/attention.py)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # or "full", "every:K", K (checkpoint_every)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share one [V, H] matrix between input embedding and output projection when the config says so.
        Call again after anything that replaces parameters (load_state_dict(assign=True), to_empty)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        attn_mask=None,
    ) -> Tensor:
        """input_ids [B, T] -> final-norm hidden states [B, T, H] in the model's dtype.
        With kv_cache, input_ids are the tokens after the cached ones and attention_mask spans both."""
        B, T = input_ids.shape
        past = 0 if kv_cache is None else kv_cache.length
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                want = (B, past + T)  # (batch, cached + new tokens)
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {want}")
            if attention_mask.dtype == torch.bool:
                attention_mask = attention_mask.long()
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
            else:
                position_ids = default_position_ids(attention_mask)[:, past:]
        x = self.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)  # (B, T, head_dim) each
        # attn_mask: a precomputed mask (sdpo.models.attention.packed_mask: shared-prompt rows, which
        # segment ids cannot express) replaces the one built from attention_mask.
        mask = attn_mask if attn_mask is not None else build_attention_mask(
            attention_mask, T, self.config.sliding_window, input_ids.device, past)
        every = checkpoint_every(self.gradient_checkpointing)  # 0 none, 1 all blocks, k: 0, k, 2k, ...
        for i, layer in enumerate(self.layers):
            if kv_cache is not None:
                x = layer(x, cos, sin, mask, kv_cache)
            elif every and i % every == 0 and torch.is_grad_enabled():
                # Keep only the block inputs; recompute the block's activations in backward.
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        if kv_cache is not None:
            kv_cache.length = past + T
        return self.norm(x)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
        *, attn_mask=None,
    ) -> Tensor:
        """input_ids [B, T] -> logits [B, T, V] in the model's dtype."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, attn_mask=attn_mask))

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random init, reproducible across devices: weights ~ N(0, std²) drawn on the CPU in parameter
        order, biases 0, norm weights 1."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():  # a tied lm_head appears once, as embed_tokens.weight
            if p.is_meta:
                raise RuntimeError(f"init_weights: {name} is on the meta device; call model.to_empty(device=...) first")
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
