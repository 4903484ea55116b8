"""The decoder's layers: attention (grouped-query; Phi-3's fused qkv; Qwen3.5's output-gated) and the
blocks that place the norms around attention and the MLP (pre-norm, Gemma's sandwich, OLMo's post-norm,
Qwen3.5's hybrid of Gated DeltaNet and attention, the mixture-of-experts block). Which family uses which
is one row of sdpo.models.model.FAMILIES; a block is built from that row (`family`) and the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sdpo.models.attention import attend
from sdpo.models.kv_cache import KVCache
from sdpo.models.linear_attention import GatedDeltaNet
from sdpo.models.moe import SparseMoE
from sdpo.models.rope import apply_rope

if TYPE_CHECKING:
    from sdpo.models.model import Family, ModelConfig, Rope

# F.scaled_dot_product_attention(..., enable_gqa=True): K/V with fewer heads than Q (torch >= 2.5).
SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
FULL, SLIDING, LINEAR = "full_attention", "sliding_attention", "linear_attention"  # HF's layer_types


class Attention(nn.Module):
    """Grouped-query attention: q, k, v projections, the family's q/k norm, RoPE (unless a NoPE
    layer), softmax(q kᵀ · scale) v with the layer's window and the config's score soft-cap."""

    def __init__(self, config: ModelConfig, layer_idx: int, family: Family):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.make_projections(config, family)
        # "head": one norm over each head's d channels (Qwen3, Gemma 3); "projection": over the whole
        # q and k projections, before they are split into heads (OLMo 2/3).
        self.qk_norm = family.qk_norm
        if family.qk_norm is not None:
            per_head = family.qk_norm == "head"
            self.q_norm = family.norm(self.head_dim if per_head else self.n_heads * self.head_dim, config.rms_norm_eps)
            self.k_norm = family.norm(self.head_dim if per_head else self.n_kv_heads * self.head_dim, config.rms_norm_eps)
        self.window = config.layer_window(layer_idx)
        self.scale = config.query_pre_attn_scalar ** -0.5 if config.query_pre_attn_scalar else None  # None: d^-1/2
        self.softcap = config.attn_logit_softcapping

    def make_projections(self, config: ModelConfig, family: Family) -> None:
        H, d, bias = config.hidden_size, self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(H, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, H, bias=bias and family.o_proj_bias)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: Tensor, rope: Rope | None, mask, cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)  # (B, T, n_heads·d), (B, T, n_kv·d) twice
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, n_heads, T, d), (B, n_kv, T, d)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
            if rope.q_scale is not None:
                q = q * rope.q_scale.to(q.dtype)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, kept + T, d)
            if isinstance(mask, Tensor):
                mask = mask[..., mask.shape[-1] - k.shape[2]:]  # a sliding layer's cache keeps the window only
        # GQA (Ainslie et al. 2023): query head h reads kv head h // (n_heads / n_kv_heads). SDPA
        # does that itself since torch 2.5 (enable_gqa): no [B, n_heads, T, d] copies of K and V.
        rep = self.n_heads // self.n_kv_heads
        if rep > 1 and not SDPA_GQA:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = attend(q, k, v, mask, scale=self.scale, softcap=self.softcap)  # sdpo/models/attention.py
        return self.output(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def output(self, y: Tensor) -> Tensor:
        return self.o_proj(y)


class FusedQKVAttention(Attention):
    """Phi-3's: q, k and v in one [(n_heads + 2·n_kv)·d, H] matrix, in that order (HF's qkv_proj)."""

    def make_projections(self, config: ModelConfig, family: Family) -> None:
        d = self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, config.hidden_size, bias=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d = self.head_dim
        return self.qkv_proj(x).split([self.n_heads * d, self.n_kv_heads * d, self.n_kv_heads * d], dim=-1)


class GatedAttention(Attention):
    """Qwen3.5's full-attention layers: q_proj gives each head its query and an output gate
    ([n_heads, 2·d], query first); the attention output is × sigmoid(gate) before o_proj."""

    def make_projections(self, config: ModelConfig, family: Family) -> None:
        super().make_projections(config, family)
        self.q_proj = nn.Linear(config.hidden_size, 2 * self.n_heads * self.head_dim, bias=config.attention_bias)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q, gate = self.q_proj(x).view(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
        self._gate = gate.reshape(B, T, -1)  # read by output() later in the same forward
        return q.reshape(B, T, -1), self.k_proj(x), self.v_proj(x)

    def output(self, y: Tensor) -> Tensor:
        gate, self._gate = self._gate, None
        return self.o_proj(y * torch.sigmoid(gate))


# ---------------------------------------------------------------------------------------------
# blocks: where the norms sit around attention and the MLP


class PreNormBlock(nn.Module):
    """Llama: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int, family: Family):
        super().__init__()
        self.input_layernorm = family.norm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = family.attention(config, layer_idx, family)
        self.post_attention_layernorm = family.norm(config.hidden_size, config.rms_norm_eps)
        self.mlp = family.mlp(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: Tensor, rope: Rope | None, mask, cache: KVCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class SandwichBlock(nn.Module):
    """Gemma 2/3: a norm before and after both attention and the MLP, x + norm(attn(norm(x)))."""

    def __init__(self, config: ModelConfig, layer_idx: int, family: Family):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = family.norm(H, eps)
        self.self_attn = family.attention(config, layer_idx, family)
        self.post_attention_layernorm = family.norm(H, eps)
        self.pre_feedforward_layernorm = family.norm(H, eps)
        self.mlp = family.mlp(H, config.intermediate_size, config.hidden_act)
        self.post_feedforward_layernorm = family.norm(H, eps)

    def forward(self, x: Tensor, rope: Rope | None, mask, cache: KVCache | None = None) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class PostNormBlock(nn.Module):
    """OLMo 2/3: the norms after attention and after the MLP, before the residual add: x + norm(attn(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int, family: Family):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = family.attention(config, layer_idx, family)
        self.post_attention_layernorm = family.norm(H, eps)
        self.mlp = family.mlp(H, config.intermediate_size, config.hidden_act)
        self.post_feedforward_layernorm = family.norm(H, eps)

    def forward(self, x: Tensor, rope: Rope | None, mask, cache: KVCache | None = None) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(x, rope, mask, cache))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class HybridBlock(nn.Module):
    """Qwen3.5: Llama's pre-norm block whose mixer is Gated DeltaNet (`linear_attn`) on the
    "linear_attention" layers and the family's attention (`self_attn`) on the others."""

    def __init__(self, config: ModelConfig, layer_idx: int, family: Family):
        super().__init__()
        self.input_layernorm = family.norm(config.hidden_size, config.rms_norm_eps)
        self.linear = config.layer_type(layer_idx) == LINEAR
        if self.linear:
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = family.attention(config, layer_idx, family)
        self.post_attention_layernorm = family.norm(config.hidden_size, config.rms_norm_eps)
        # Qwen3.5-MoE: a mixture of experts with a shared expert on every layer; its forward then returns
        # (x, RouterStats) as MoEBlock's does
        self.sparse = config.is_sparse(layer_idx)
        if self.sparse:
            self.mlp = sparse_moe(config, family)
        else:
            self.mlp = family.mlp(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: Tensor, rope: Rope | None, mask, cache: KVCache | None = None):
        mixer = self.linear_attn if self.linear else self.self_attn  # mask: a SequenceLayout for linear_attn
        x = x + mixer(self.input_layernorm(x), rope, mask, cache)
        if not self.sparse:
            return x + self.mlp(self.post_attention_layernorm(x))
        y, stats = self.mlp(self.post_attention_layernorm(x))
        return x + y, stats


def sparse_moe(config: ModelConfig, family: Family) -> SparseMoE:
    return SparseMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                     config.moe_intermediate_size or config.intermediate_size, config.hidden_act,
                     normalize=config.norm_topk_prob, weights_in_float32=family.router_weights_in_float32,
                     shared_intermediate=config.shared_expert_intermediate_size)


class MoEBlock(PreNormBlock):
    """Mixtral, Qwen3-MoE: Llama's block with a mixture of experts for the MLP on sparse layers
    (config.is_sparse). forward -> (x, the layer's RouterStats, or None on a dense layer): the stats
    leave the block as an output, so activation checkpointing recomputes them without adding them twice."""

    def __init__(self, config: ModelConfig, layer_idx: int, family: Family):
        super().__init__(config, layer_idx, family)
        self.sparse = config.is_sparse(layer_idx)
        if self.sparse:
            self.mlp = sparse_moe(config, family)

    def forward(self, x: Tensor, rope: Rope | None, mask, cache: KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        if not self.sparse:
            return x + self.mlp(self.post_attention_layernorm(x)), None
        y, stats = self.mlp(self.post_attention_layernorm(x))
        return x + y, stats
