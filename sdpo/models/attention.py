"""Attention masks for packed rows with a shared prompt per pair, and the attention call itself.

A packed row (sdpo.data.packing.pack) holds several documents side by side. Every token carries

    doc [B, T]  long: 0 = padding, k > 0 = the document (one pair with a shared prompt)
    seg [B, T]  long: PROMPT 0 | CHOSEN 1 | REJECTED 2
    pos [B, T]  long: position in the document's virtual unpadded sequence (RoPE positions)

and key j is visible to query i when

    j <= i,  doc[j] == doc[i] > 0,  seg[j] ∈ {PROMPT, seg[i]}   (and pos[i] - pos[j] < w, window w)   (A)

so documents never see each other (document masking), the prompt is causal among itself,
chosen tokens see the prompt and earlier chosen tokens, and rejected tokens see the prompt
and earlier rejected tokens, never chosen ones (prefix sharing, Wang et al. 2024, arXiv
2410.20305). Position ids of the rejected segment restart at len(prompt), so every rejected
token has the keys and positions it would have in its own `prompt | rejected` row: (A) gives
the unpacked path's attention exactly. The sliding window compares positions, not row
offsets (a rejected token is further from its prompt in the row than in its own sequence).
A pad query sees only itself, so no softmax row is empty (no NaN); pads are never scored.

Backends: on CPU (and wherever FlexAttention is unavailable) a dense boolean [B, 1, T, T]
mask for SDPA; on CUDA a FlexAttention BlockMask, whose block sparsity skips the masked
tiles, so packing many pairs into one long row costs no T² work across pairs.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

PROMPT, CHOSEN, REJECTED = 0, 1, 2
FLEX_BLOCK = 128  # FlexAttention's tile; CUDA rows are padded to a multiple of it (one compile per bucket)


def dense_packed_mask(doc: Tensor, seg: Tensor, pos: Tensor, sliding_window: int | None = None) -> Tensor:
    """(A) as a boolean [B, 1, T, T] mask (True = may attend) for SDPA; doc, seg, pos [B, T]."""
    T = doc.shape[1]
    i = torch.arange(T, device=doc.device)
    allowed = (i[None, :] <= i[:, None])[None]  # [1, T_q, T_k]
    allowed = allowed & (doc[:, :, None] == doc[:, None, :]) & (doc[:, None, :] > 0)  # [B, T_q, T_k]
    allowed = allowed & ((seg[:, None, :] == PROMPT) | (seg[:, None, :] == seg[:, :, None]))
    if sliding_window is not None:
        allowed = allowed & (pos[:, :, None] - pos[:, None, :] < sliding_window)
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=doc.device)[None]
    return allowed[:, None]


def _mask_mod(doc: Tensor, seg: Tensor, pos: Tensor, sliding_window: int | None):
    """(A) as FlexAttention's mask_mod(b, h, q_idx, kv_idx) -> bool (h unused: every head masks alike)."""

    def mask_mod(b, h, q, k):
        ok = (k <= q) & (doc[b, q] == doc[b, k]) & (doc[b, k] > 0)
        ok = ok & ((seg[b, k] == PROMPT) | (seg[b, k] == seg[b, q]))
        if sliding_window is not None:
            ok = ok & (pos[b, q] - pos[b, k] < sliding_window)
        return ok | (q == k)

    return mask_mod


def flex_available(device) -> bool:
    if torch.device(device).type != "cuda":
        return False
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None  # torch >= 2.5


def packed_mask(doc: Tensor, seg: Tensor, pos: Tensor, sliding_window: int | None = None, *,
                backend: str = "auto"):
    """The mask of (A) for `attend`: a FlexAttention BlockMask on CUDA (backend "auto" or "flex"),
    else the dense SDPA mask. Built on the tensors' device, so no host copy of [T, T]."""
    use_flex = backend == "flex" or (backend == "auto" and flex_available(doc.device))
    if not use_flex:
        return dense_packed_mask(doc, seg, pos, sliding_window)
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = doc.shape
    return create_block_mask(_mask_mod(doc, seg, pos, sliding_window), B, None, T, T, device=doc.device)


_compiled_flex = None


def softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None,
                         softcap: float) -> Tensor:
    """Gemma 2's attention, written out (SDPA cannot soft-cap): s = q kᵀ · scale, s -> c·tanh(s / c),
    masked, softmax in float32, cast back, times v — transformers' eager order, so it is exact.
    mask None: plain causal over equal T_q = T_k. Builds [B, n_heads, T_q, T_k] scores: the CPU
    and dense-mask path; on CUDA packed rows take FlexAttention with a score_mod instead."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


@functools.lru_cache(maxsize=None)
def _softcap_score_mod(softcap: float):
    """FlexAttention score_mod for s -> c·tanh(s / c); one function object per cap (no recompiles)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return score_mod


def attend(q: Tensor, k: Tensor, v: Tensor, mask, *, scale: float | None = None,
           softcap: float | None = None) -> Tensor:
    """softmax(q kᵀ · scale) v, scale default 1/sqrt(d); q [B, n_heads, T, d], k, v [B, n_kv, T, d]
    (n_kv < n_heads: GQA, enable_gqa; sdpo.models.model repeats K/V itself on torch < 2.5). mask: None
    (plain causal: SDPA's fused causal kernels), a boolean [B or 1, 1, T_q, T_k] tensor (SDPA),
    or a FlexAttention BlockMask (packed rows on CUDA). softcap: Gemma 2's score soft-cap."""
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if mask is None or isinstance(mask, Tensor):
        if softcap is not None:
            return softcapped_attention(q, k, v, mask, scale, softcap)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, **gqa)
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    extra = {"score_mod": _softcap_score_mod(softcap)} if softcap is not None else {}
    if q.device.type != "cuda":  # eager FlexAttention (tests): materialises [T, T], but exact
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(q, k, v, block_mask=mask, scale=scale, **extra, **gqa)
    if _compiled_flex is None:
        # Compiled once; dynamic=False specialises per shape, and rows padded to FLEX_BLOCK
        # multiples (sdpo.data.packing) keep the number of shapes, hence of compiles, small.
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=mask, scale=scale, **extra, **gqa)
