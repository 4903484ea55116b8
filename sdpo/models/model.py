"""The decoder: one transformer, many families, each a choice of small pieces made once.

Llama is the base: pre-norm RMSNorm blocks, rotary position embeddings (RoPE), grouped-query
attention, a SwiGLU MLP. A family is what it changes, stated in one row of FAMILIES at the bottom
of this file: Gemma 2 = a (1 + w) norm, sandwich blocks, embeddings × √H and a GeGLU MLP, plus
what its config.json sets (soft-caps, the query scale, the sliding/global layer pattern); OLMo 2 =
post-norm blocks and a norm over the whole q and k projections; Phi-3 = fused qkv and gate/up
projections. Per-layer differences (a sliding window, the RoPE of the layer's type, no RoPE at
all) are read from the config once per layer when the model is built: no forward tests a family.
The pieces are in sdpo/models/blocks.py (attention, blocks), sdpo/models/layers.py (norms, MLPs,
embedding, head) and sdpo/models/rope.py.

Parameter names are Hugging Face's without the leading "model." (sdpo/models/checkpoint.py
maps them), and every op is done in the same order and dtype as transformers' implementation, so the
same weights give the same logits (tests/test_checkpoint.py, tests/test_families.py).

Masking convention (one rule for unpadded, padded and packed batches):
attention_mask [B, T] holds 0 at padding and a positive segment id elsewhere; a token
attends to earlier-or-equal positions of its own segment (and, on a sliding layer, to the
window - 1 before it). position_ids default to 0, 1, 2, ... counted from each segment's first
token, so left padding and packing need nothing special. With a KVCache (incremental decoding,
sdpo/models/generate.py) the mask covers the cached tokens and the new ones, [B, past + T].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdpo.models.blocks import (FULL, LINEAR, SLIDING, Attention, FusedQKVAttention, GatedAttention, HybridBlock,
                                MoEBlock, PostNormBlock, PreNormBlock, SandwichBlock)
from sdpo.models.kv_cache import KVCache
from sdpo.models.layers import (FusedGatedMLP, GatedMLP, OffsetRMSNorm, RMSNorm, ScaledEmbedding,
                                ScaleThenCastRMSNorm, SoftcappedHead)
from sdpo.models.linear_attention import SequenceLayout
from sdpo.models.rope import ROPE_TYPES, rope_cos_sin, rope_type



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
    rope_scaling: dict | None = None  # {"rope_type": one of rope.ROPE_TYPES, "factor": ..., ...}; full-attention layers
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias; o_proj too where the family says so (FAMILIES)
    sliding_window: int | None = None  # a query sees itself and the sliding_window - 1 keys before it
    model_type: str = "llama"  # a key of FAMILIES
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None  # Llama-3.1 lists several
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    hidden_act: str = "silu"  # the MLP's gate activation; "gelu_pytorch_tanh" for Gemma
    # Per layer: "full_attention" | "sliding_attention". None: every layer sliding when sliding_window
    # is set (Mistral, Phi-3), else every layer full.
    layer_types: list[str] | None = None
    sliding_rope_theta: float | None = None  # sliding layers' RoPE (Gemma 3, OLMo 3); None: as full layers
    sliding_rope_scaling: dict | None = None
    no_rope_layers: list[int] | None = None  # SmolLM3: 0 marks a layer without RoPE (NoPE)
    partial_rotary_factor: float = 1.0  # Phi-3/4: RoPE on the first head_dim · factor channels only
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by this^-1/2 (None: head_dim^-1/2)
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> c·tanh(scores / c)
    final_logit_softcapping: float | None = None  # Gemma 2: logits -> c·tanh(logits / c)
    # Mixture of experts (Mixtral, Qwen3-MoE; sdpo/models/moe.py). num_experts 0: every layer dense.
    num_experts: int = 0
    num_experts_per_tok: int = 2  # top-k
    moe_intermediate_size: int | None = None  # each expert's I; None -> intermediate_size (Mixtral)
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum 1 (Mixtral always)
    decoder_sparse_step: int = 1  # Qwen3-MoE: layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] | None = None  # ... and i is not listed here (those use the dense MLP)
    router_aux_loss_coef: float = 0.001  # the checkpoint's load-balancing coefficient (loss.router_aux_coef)
    shared_expert_intermediate_size: int = 0  # Qwen3.5-MoE: a sigmoid-gated shared expert beside the routed ones
    # Qwen3.5's Gated DeltaNet layers (layer_types "linear_attention", sdpo/models/linear_attention.py)
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_conv_kernel_dim: int = 4

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type not in FAMILIES:
            raise ValueError(f"unknown model_type {self.model_type!r}; supported: {', '.join(FAMILIES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2 or self.rotary_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (rotary part {self.rotary_dim}) must be even for rotary embeddings")
        for rope in (self.rope_scaling, self.sliding_rope_scaling):
            if rope is not None and rope_type(rope) not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rope_type(rope)!r} is not supported; expected one of {ROPE_TYPES}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None")
        for name in ("layer_types", "no_rope_layers"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(value)} entries for {self.num_hidden_layers} layers")
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts and self.decoder_sparse_step > 0):
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts="
                             f"{self.num_experts}, and decoder_sparse_step={self.decoder_sparse_step} >= 1")
        if self.layer_types is not None and set(self.layer_types) - {FULL, SLIDING, LINEAR}:
            raise ValueError(f"layer_types: {sorted(set(self.layer_types) - {FULL, SLIDING, LINEAR})} are not "
                             f"supported; expected {FULL!r}, {SLIDING!r} or {LINEAR!r}")
        if self.has_linear_layers:
            sizes = (self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                     self.linear_value_head_dim)
            if any(not isinstance(n, int) or n < 1 for n in sizes) or sizes[1] % sizes[0]:
                raise ValueError(f"linear_attention layers need linear_num_key_heads, linear_num_value_heads (a "
                                 f"multiple of it), linear_key_head_dim, linear_value_head_dim >= 1; got {sizes}")

    def is_sparse(self, i: int) -> bool:
        """Layer i's MLP is a mixture of experts (HF's Qwen2MoeDecoderLayer rule; Mixtral: every layer)."""
        return (self.num_experts > 0 and i not in (self.mlp_only_layers or [])
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_type(self, i: int) -> str:
        if self.layer_types is None:
            return SLIDING if self.sliding_window is not None else FULL
        return self.layer_types[i]

    @property
    def has_linear_layers(self) -> bool:
        return self.layer_types is not None and LINEAR in self.layer_types

    def mask_key(self, i: int):
        """What layer i reads from hidden_states' masks: its window's mask, or the SequenceLayout (LINEAR)."""
        return LINEAR if self.layer_type(i) == LINEAR else self.layer_window(i)

    def layer_window(self, i: int) -> int | None:
        """Layer i's sliding window, None for global attention."""
        return self.sliding_window if self.layer_type(i) == SLIDING else None

    def layer_rope(self, i: int) -> str | None:
        """The key of layer i's RoPE table: its layer type, or None for a NoPE layer (SmolLM3)."""
        if self.no_rope_layers is not None and not self.no_rope_layers[i]:
            return None
        return self.layer_type(i) if self.layer_type(i) == SLIDING and self.sliding_rope_theta is not None else FULL

    def rope(self, key: str) -> tuple[float, dict | None]:
        """(theta, scaling) of a RoPE table key from layer_rope."""
        if key == SLIDING:
            return self.sliding_rope_theta, self.sliding_rope_scaling
        return self.rope_theta, self.rope_scaling

    def attention_windows(self) -> list[int | None]:
        """The distinct windows over the layers (None = global): one mask is built for each."""
        attention = [i for i in range(self.num_hidden_layers) if self.layer_type(i) != LINEAR]
        return sorted({self.layer_window(i) for i in attention}, key=lambda w: w or 0)


class Rope(NamedTuple):
    """One RoPE table for a forward: cos, sin [B, T, rotary_dim]; q_scale [B, 1, T, 1] or None."""
    cos: Tensor
    sin: Tensor
    q_scale: Tensor | None = None


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


# ---------------------------------------------------------------------------------------------
# attention variants


# ---------------------------------------------------------------------------------------------
# the families


@dataclass(frozen=True)
class Family:
    """What a family changes relative to Llama (the defaults). Options that vary between checkpoints
    of one family (windows, layer types, soft-caps, RoPE) are ModelConfig fields read from config.json."""
    architecture: str  # the transformers class config.json names
    norm: type = RMSNorm
    block: type = PreNormBlock
    attention: type = Attention
    mlp: type = GatedMLP
    embedding: type = nn.Embedding
    qk_norm: str | None = None  # "head" | "projection" | None (Attention)
    o_proj_bias: bool = True  # attention_bias also gives o_proj a bias (Llama yes, Qwen2 no)
    rope_in_float32: bool = False  # cos/sin stay float32 (OLMo 2/3) instead of the activation dtype
    query_position_scale: bool = False  # Ministral 3: q × (1 + β·ln(1 + ⌊pos / original_max⌋)) after RoPE
    router_weights_in_float32: bool = True  # MoE: top-k weights stay float32 (Mixtral) or take the logits' dtype


_OLMO2 = dict(norm=ScaleThenCastRMSNorm, block=PostNormBlock, qk_norm="projection", rope_in_float32=True)
_GEMMA = dict(norm=OffsetRMSNorm, block=SandwichBlock, embedding=ScaledEmbedding)
FAMILIES = {
    "llama": Family("LlamaForCausalLM"),  # also SOLAR
    "mistral": Family("MistralForCausalLM"),
    "qwen2": Family("Qwen2ForCausalLM", o_proj_bias=False),
    "qwen3": Family("Qwen3ForCausalLM", qk_norm="head"),
    "gemma2": Family("Gemma2ForCausalLM", **_GEMMA),
    "gemma3_text": Family("Gemma3ForCausalLM", **_GEMMA, qk_norm="head"),
    "olmo2": Family("Olmo2ForCausalLM", **_OLMO2),
    "olmo3": Family("Olmo3ForCausalLM", **_OLMO2),
    "phi3": Family("Phi3ForCausalLM", attention=FusedQKVAttention, mlp=FusedGatedMLP),  # also Phi-4-mini
    "smollm3": Family("SmolLM3ForCausalLM"),  # its NoPE layers: ModelConfig.no_rope_layers
    "ministral3": Family("Ministral3ForCausalLM", query_position_scale=True),
    "mixtral": Family("MixtralForCausalLM", block=MoEBlock),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", block=MoEBlock, qk_norm="head", router_weights_in_float32=False),
    # Gated DeltaNet on layer_types' "linear_attention" layers, gated attention on the others
    "qwen3_5_text": Family("Qwen3_5ForCausalLM", norm=OffsetRMSNorm, block=HybridBlock, attention=GatedAttention,
                           qk_norm="head"),
    # Qwen3.5 with a mixture of experts (top-k renormalised, weights in the logits' dtype) and a shared expert
    "qwen3_5_moe_text": Family("Qwen3_5MoeForCausalLM", norm=OffsetRMSNorm, block=HybridBlock,
                               attention=GatedAttention, qk_norm="head", router_weights_in_float32=False),
}


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.family = family = FAMILIES[config.model_type]
        self.embed_tokens = family.embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(family.block(config, i, family) for i in range(config.num_hidden_layers))
        self.norm = family.norm(config.hidden_size, config.rms_norm_eps)
        if config.final_logit_softcapping:
            self.lm_head = SoftcappedHead(config.hidden_size, config.vocab_size, config.final_logit_softcapping)
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # or "full", "every:K", K (checkpoint_every)
        # MoE: the last forward's RouterStats summed over its sparse layers (None for a dense model). The
        # step reads it right after the policy's forward (sdpo.models.moe.load_balancing_loss).
        self.router_stats = None
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share one [V, H] matrix between input embedding and output projection when the config says so.
        Call again after anything that replaces parameters (load_state_dict(assign=True), to_empty)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope_tables(self, position_ids: Tensor, dtype: torch.dtype) -> dict[str, Rope]:
        """One Rope per RoPE key the layers use (layer types with their own RoPE), [B, T, rotary_dim]."""
        c = self.config
        dtype = torch.float32 if self.family.rope_in_float32 else dtype
        tables = {}
        for key in {c.layer_rope(i) for i in range(c.num_hidden_layers)} - {None}:
            theta, scaling = c.rope(key)
            cos, sin = rope_cos_sin(theta, scaling, c.rotary_dim, c.max_position_embeddings, position_ids, dtype)
            q_scale = None
            if self.family.query_position_scale:  # Llama-4-style attention temperature by position
                beta, orig = scaling["llama_4_scaling_beta"], scaling["original_max_position_embeddings"]
                q_scale = (1 + beta * torch.log(1 + torch.floor(position_ids / orig)))[:, None, :, None]
            tables[key] = Rope(cos, sin, q_scale)
        return tables

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
        With kv_cache, input_ids are the tokens after the cached ones and attention_mask spans both.
        attn_mask: precomputed masks (sdpo.models.attention.packed_mask: shared-prompt rows, which
        segment ids cannot express), {window: mask} over config.attention_windows(), or one mask
        when the model has one window; they replace the ones built from attention_mask."""
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
        ropes = self.rope_tables(position_ids, x.dtype)  # {rope key: (B, T, rotary_dim) tables}
        masks = self._masks(attn_mask, attention_mask, T, input_ids.device, past)  # {window: mask}
        if self.config.has_linear_layers:  # + {LINEAR: where each recurrent sequence starts, or None}
            masks = {**masks, LINEAR: self._sequence_layout(attn_mask, attention_mask, past)}
        every = checkpoint_every(self.gradient_checkpointing)  # 0 none, 1 all blocks, k: 0, k, 2k, ...
        router = None
        for i, layer in enumerate(self.layers):
            rope, mask = ropes.get(self.config.layer_rope(i)), masks[self.config.mask_key(i)]
            if kv_cache is not None:
                x = layer(x, rope, mask, kv_cache)
            elif every and i % every == 0 and torch.is_grad_enabled():
                # Keep only the block inputs; recompute the block's activations in backward.
                x = checkpoint(layer, x, rope, mask, use_reentrant=False)
            else:
                x = layer(x, rope, mask)
            if isinstance(x, tuple):  # MoEBlock: (x, this layer's RouterStats or None)
                x, stats = x
                router = router if stats is None else stats + router
        self.router_stats = router
        if kv_cache is not None:
            kv_cache.length = past + T
        return self.norm(x)

    def _masks(self, attn_mask, attention_mask, T: int, device, past: int) -> dict:
        windows = self.config.attention_windows()
        if attn_mask is None:
            return {w: build_attention_mask(attention_mask, T, w, device, past) for w in windows}
        if isinstance(attn_mask, dict):
            missing = [w for w in windows if w not in attn_mask]
            if missing:
                raise ValueError(f"attn_mask has no mask for the windows {missing} ({self.config.model_type})")
            return attn_mask
        if len(windows) > 1:
            raise ValueError(f"{self.config.model_type}: layers with windows {windows} need one attn_mask per "
                             "window ({window: mask}), not one mask for all")
        return {windows[0]: attn_mask}

    @staticmethod
    def _sequence_layout(attn_mask, attention_mask, past: int) -> SequenceLayout | None:
        """Recurrent layers: packed rows name their documents and segments in attn_mask["documents"]
        (sdpo.logprobs.packed_sequence_logps), padded ones in attention_mask's segment ids; after a
        cached prefix every row continues its one sequence (None)."""
        if isinstance(attn_mask, dict) and "documents" in attn_mask:
            return SequenceLayout.build(*attn_mask["documents"])
        if attn_mask is not None:
            raise ValueError("linear_attention layers need attn_mask['documents'] = (doc_ids, segments) "
                             "with precomputed masks (sdpo.logprobs.packed_sequence_logps passes them)")
        if attention_mask is None or past:
            return None
        return SequenceLayout.build(attention_mask)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
        *, attn_mask=None,
    ) -> Tensor:
        """input_ids [B, T] -> logits [B, T, V] in the model's dtype."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, attn_mask=attn_mask))

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random init, reproducible across devices: weights ~ N(0, std²) drawn on the CPU in parameter
        order, biases 0, norm weights at their identity (1, or 0 for a (1 + w) norm)."""
        g = torch.Generator().manual_seed(seed)
        norms = {id(m.weight): m.identity for m in self.modules() if isinstance(m, RMSNorm)}
        for name, p in self.named_parameters():  # a tied lm_head appears once, as embed_tokens.weight
            if p.is_meta:
                raise RuntimeError(f"init_weights: {name} is on the meta device; call model.to_empty(device=...) first")
            if id(p) in norms:
                p.fill_(norms[id(p)])
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
