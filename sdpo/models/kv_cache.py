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
    (transformers does the same)."""

    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        self.max_len, self.length = max_len, 0
        self.windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        empty = (batch_size, config.num_key_value_heads, 0, config.head_dim)
        self.k = [torch.zeros(shape if w is None else empty, device=device, dtype=dtype) for w in self.windows]
        self.v = [torch.zeros(shape if w is None else empty, device=device, dtype=dtype) for w in self.windows]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [B, n_kv, T, d] of the new tokens -> the keys and values the new queries may need:
        all so far on a global layer, the last window - 1 cached plus the new ones on a sliding one."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} tokens exceed its max_len={self.max_len}")
        w = self.windows[layer]
        if w is None:
            self.k[layer][:, :, self.length:end] = k
            self.v[layer][:, :, self.length:end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        k_all, v_all = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        keep = max(w - 1, 0)
        self.k[layer], self.v[layer] = k_all[:, :, k_all.shape[2] - keep:], v_all[:, :, v_all.shape[2] - keep:]
        return k_all, v_all
