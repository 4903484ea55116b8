"""The key/value cache of incremental decoding (sdpo/models/generate.py)."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Rotated keys and values of the tokens seen so far, for incremental decoding, per layer
    [B, n_kv_heads, n, head_dim] (stored before the GQA repeat). A global layer keeps every token
    in a buffer of max_len; a sliding layer keeps only the last window - 1 tokens, all a later
    query can see. hidden_states(..., kv_cache=c) appends the new tokens and advances c.length.

    With "dynamic" or "longrope" RoPE the cached keys keep the frequencies they were rotated with
    (transformers does the same).

    A linear-attention layer (Qwen3.5's Gated DeltaNet) keeps no keys: per row, its convolution
    window [B, K-1, C] and recurrent state [B, n_v, d_k, d_v] (float32), replaced at every step."""

    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        """dtype: the buffers' dtype, unless the first keys come in another one (bf16 under autocast
        on a float32 model): the buffers then take the keys' dtype, so attention sees q, k and v alike."""
        self.max_len, self.length = max_len, 0
        self.windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
        linear = [config.layer_type(i) == "linear_attention" for i in range(config.num_hidden_layers)]
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        empty = (batch_size, config.num_key_value_heads, 0, config.head_dim)
        self.k = [torch.zeros(empty if w is not None or lin else shape, device=device, dtype=dtype)
                  for w, lin in zip(self.windows, linear)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.recurrent: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * config.num_hidden_layers

    def reset(self) -> None:
        """Forget every token (the buffers are reused)."""
        self.length = 0
        self.recurrent = [None] * len(self.recurrent)
        self.k = [k if w is None else k[:, :, :0] for k, w in zip(self.k, self.windows)]
        self.v = [v if w is None else v[:, :, :0] for v, w in zip(self.v, self.windows)]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [B, n_kv, T, d] of the new tokens -> the keys and values the new queries may need:
        all so far on a global layer, the last window - 1 cached plus the new ones on a sliding one."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} tokens exceed its max_len={self.max_len}")
        w = self.windows[layer]
        if self.length == 0 and self.k[layer].dtype != k.dtype:
            self.k[layer], self.v[layer] = self.k[layer].to(k.dtype), self.v[layer].to(v.dtype)
        if w is None:
            self.k[layer][:, :, self.length:end] = k
            self.v[layer][:, :, self.length:end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        k_all, v_all = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        start = max(k_all.shape[2] - (w - 1), 0)  # keep the last window - 1 (fewer while the sequence is shorter)
        self.k[layer], self.v[layer] = k_all[:, :, start:], v_all[:, :, start:]
        return k_all, v_all

    def linear_state(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(conv window, recurrent state) of a linear-attention layer; (None, None) before the first token."""
        return self.recurrent[layer] or (None, None)

    def set_linear_state(self, layer: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        self.recurrent[layer] = (conv, state)
