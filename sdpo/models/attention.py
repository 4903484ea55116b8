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

Backends: on CUDA a FlexAttention BlockMask, whose block sparsity skips the masked tiles, so
packing many pairs into one long row costs no T² work across pairs. On CPU a DocumentMask: (A)
as SDPA calls per document, read off the host copy of doc and seg (no [T, T] mask; one row holds
every document with no padding, so every linear layer sees exactly the real tokens). Elsewhere,
and for tests, a dense boolean [B, 1, T, T] mask for SDPA.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PROMPT, CHOSEN, REJECTED = 0, 1, 2
FLEX_BLOCK = 128  # FlexAttention's tile; CUDA rows are padded to a multiple of it (one compile per bucket)


def dense_packed_mask(doc: Tensor, seg: Tensor, pos: Tensor, sliding_window: int | None = None) -> Tensor:
    """(A) as a boolean [B, 1, T, T] mask (True = may attend) for SDPA; doc, seg, pos [B, T]."""
    T = doc.shape[1]
    sliding_window = window_that_bites(sliding_window, T)
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
                backend: str = "auto", spans: list | None = None):
    """The mask of (A) for `attend`. backend "auto": a FlexAttention BlockMask on CUDA, a DocumentMask
    on CPU (per-document SDPA; spans: see document_mask), else the dense SDPA mask; or "flex",
    "documents", "dense" outright. Built on the tensors' device, so no host copy of [T, T]."""
    if backend == "auto":
        backend = "flex" if flex_available(doc.device) else "documents" if doc.device.type == "cpu" else "dense"
    if backend == "flex":
        return flex_block_mask(doc, seg, pos, sliding_window)
    if backend == "documents":
        return document_mask(doc, seg, pos, sliding_window, spans)
    return dense_packed_mask(doc, seg, pos, sliding_window)


@dataclass(frozen=True)
class DocumentMask:
    """(A) as attention per document: rows[b] lists row b's pieces in token order, covering it.

      ("pad", a, e)                pads: a pad query sees only itself, so its output is its own v
      ("doc", a, P, C, R, m1, m2)  a document prompt | chosen | rejected (C, R may be 0) at a:
                                   prompt | chosen is causal among itself (m1 None: SDPA is_causal, else
                                   the window's [P+C, P+C] mask); rejected queries see the prompt and
                                   the earlier rejected tokens, keys prompt | rejected, m2 [R, P+R]
      ("dense", a, e, m)           any other layout: the document's own (A) mask [e-a, e-a]

    Exact: every query gets the keys (A) gives it, in one softmax; only the work changes (no key of
    another document, no pad, no chosen key for a rejected query is ever multiplied)."""
    rows: tuple


def _causal_window(qpos: Tensor, kpos: Tensor, offset: int, window: int | None) -> Tensor:
    """[Tq, Tk] bool: key j visible to query i when j <= i + offset (row order), and pos_q - pos_k < window."""
    Tq, Tk = qpos.shape[0], kpos.shape[0]
    m = torch.ones(Tq, Tk, dtype=torch.bool, device=qpos.device).tril(offset)
    if window is not None:
        m = m & (qpos[:, None] - kpos[None, :] < window)
    return m


def document_mask(doc: Tensor, seg: Tensor, pos: Tensor, sliding_window: int | None = None,
                  spans: list | None = None) -> DocumentMask:
    """(A) for packed rows (doc, seg, pos [B, T]) as a DocumentMask. spans: per row, (start, prompt,
    chosen, rejected) lengths of its documents, from the CPU batch (sdpo.data.packing.pack's
    "doc_spans"; the rest of the row is padding): then nothing is read from the device. Without them
    doc and seg are read on the host (no sync on CPU), and a document laid out otherwise than
    prompt | chosen | rejected gets its own dense mask."""
    B, T = doc.shape
    window = window_that_bites(sliding_window, T)

    def piece(b: int, a: int, P: int, C: int, R: int) -> tuple:
        p = pos[b, a:a + P + C + R]
        m1 = m2 = None
        if window is not None and window_that_bites(window, P + C) is not None:
            m1 = _causal_window(p[:P + C], p[:P + C], 0, window)
        if R and (P or window is not None):
            m2 = _causal_window(p[P + C:], torch.cat([p[:P], p[P + C:]]), P, window)
        return ("doc", a, P, C, R, m1, m2)

    rows = []
    if spans is not None:
        for b, row in enumerate(spans):
            pieces = [piece(b, *span) for span in row]
            end = row[-1][0] + sum(row[-1][1:]) if row else 0
            if end < T:
                pieces.append(("pad", end, T))
            rows.append(tuple(pieces))
        return DocumentMask(tuple(rows))
    docs, segs = doc.cpu().tolist(), seg.cpu().tolist()
    for b in range(B):
        d, sg, pieces, a = docs[b], segs[b], [], 0
        while a < T:
            e = a + 1
            while e < T and d[e] == d[a]:
                e += 1
            run = sg[a:e]
            P = next((i for i, s in enumerate(run) if s != PROMPT), len(run))
            C = next((i for i, s in enumerate(run[P:]) if s != CHOSEN), len(run) - P)
            if d[a] <= 0:
                pieces.append(("pad", a, e))
            elif any(s != REJECTED for s in run[P + C:]):
                m = dense_packed_mask(doc[b:b + 1, a:e], seg[b:b + 1, a:e], pos[b:b + 1, a:e], window)[0, 0]
                pieces.append(("dense", a, e, m))
            else:
                pieces.append(piece(b, a, P, C, len(run) - P - C))
            a = e
        rows.append(tuple(pieces))
    return DocumentMask(tuple(rows))


def window_that_bites(sliding_window: int | None, T: int) -> int | None:
    """None when no two tokens of a T-long row can be sliding_window apart (T <= w: a document's
    positions span at most T - 1), so no mask term is built for a window that hides nothing."""
    return sliding_window if sliding_window is not None and sliding_window < T else None


def _block_stats(x: Tensor, valid: Tensor, nb: int, fill_min, fill_max) -> tuple[Tensor, Tensor]:
    """Per FLEX_BLOCK tile of a [B, T] tensor: (min, max) over the valid tokens -> [B, nb] each."""
    B, T = x.shape
    pad = nb * FLEX_BLOCK - T
    lo = F.pad(torch.where(valid, x, fill_min), (0, pad), value=fill_min).view(B, nb, FLEX_BLOCK)
    hi = F.pad(torch.where(valid, x, fill_max), (0, pad), value=fill_max).view(B, nb, FLEX_BLOCK)
    return lo.amin(-1), hi.amax(-1)


def flex_block_mask(doc: Tensor, seg: Tensor, pos: Tensor, sliding_window: int | None = None):
    """(A) as a FlexAttention BlockMask built from per-tile spans, never from [T, T].

    create_block_mask evaluates mask_mod on every (q, k) pair (eagerly, [B, T, T] intermediates);
    here the tile pairs come from [B, T / 128] statistics of the tiles (document, segment and
    position ranges), O(B (T/128)²) work on the device, no host sync. A tile pair (q tile i, k tile j)
    is kept when j == i (causal, and a pad sees itself) or j < i and their document ranges overlap
    (and, with a window, min pos_q - max pos_k < w); it is full (mask_mod skipped) when both tiles
    hold one and the same document and no pad, every k may be seen by every q (all k in the prompt,
    all q and k in one segment, or all q chosen and k prompt then chosen) and max pos_q - min pos_k < w. Kept-but-not-full tiles are
    partial: FlexAttention applies mask_mod to them, so a kept tile that is in fact empty costs
    time, never correctness; a full tile is full by construction."""
    from torch.nn.attention.flex_attention import BlockMask

    B, T = doc.shape
    sliding_window = window_that_bites(sliding_window, T)
    nb = -(-T // FLEX_BLOCK)
    big = 1 << 40                                                    # above any id or position, no overflow
    real = doc > 0
    dmin, dmax = _block_stats(doc, real, nb, big, -1)               # [B, nb]; an all-pad tile: (big, -1)
    smin, smax = _block_stats(seg, real, nb, big, -1)
    pmin, pmax = _block_stats(pos, real, nb, big, -big)
    no_pad = F.pad(real, (0, nb * FLEX_BLOCK - T), value=False).view(B, nb, FLEX_BLOCK).all(-1)   # [B, nb]
    qi = torch.arange(nb, device=doc.device)
    below = (qi[None, :] < qi[:, None])[None]                        # [1, nb_q, nb_k]: j < i
    q_, k_ = (slice(None), slice(None), None), (slice(None), None, slice(None))
    kept = below & (torch.maximum(dmin[q_], dmin[k_]) <= torch.minimum(dmax[q_], dmax[k_]))
    one_doc = no_pad & (dmin == dmax)
    full = below & one_doc[q_] & one_doc[k_] & (dmin[q_] == dmin[k_])
    one_seg_q = smin[q_] == smax[q_]
    same_seg = one_seg_q & (smin[k_] == smax[k_]) & (smin[k_] == smin[q_])                  # k and q: one segment
    prompt_then_chosen = one_seg_q & (smin[q_] == CHOSEN) & (smin[k_] == PROMPT) & (smax[k_] == CHOSEN)
    full = full & ((smax[k_] == PROMPT) | same_seg | prompt_then_chosen)
    if sliding_window is not None:
        kept = kept & (pmin[q_] - pmax[k_] < sliding_window)
        full = full & (pmax[q_] - pmin[k_] < sliding_window)
    kept = kept | torch.eye(nb, dtype=torch.bool, device=doc.device)[None]
    partial = kept & ~full

    def as_indices(m: Tensor) -> tuple[Tensor, Tensor]:
        # [B, nb, nb] bool -> (count [B, 1, nb], indices [B, 1, nb, nb]: the kept tiles first) int32
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
        return m.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    kv_num, kv_idx = as_indices(partial)
    full_num, full_idx = as_indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=_mask_mod(doc, seg, pos, sliding_window), seq_lengths=(T, T))


_compiled_flex = None
FLEX_COMPILED_DEVICES = {"cuda"}  # device types attend runs compiled FlexAttention on (tests add "cpu")


def flex_row_length(T: int) -> int:
    """The bucket a FlexAttention row of T tokens is padded to: multiples of FLEX_BLOCK up to 1024,
    then 8 lengths per octave (step 2^floor(log2 T) / 8). Each length is one compile (dynamic=False),
    so a run meets a few dozen at most (56 up to 65536), and a row gains < 12.5% pad tokens (a pad
    query attends to itself only: its cost is the projections and MLPs, not attention)."""
    if T <= 1024:
        return max(FLEX_BLOCK, -(-T // FLEX_BLOCK) * FLEX_BLOCK)
    step = (1 << (T - 1).bit_length() - 1) // 8
    return -(-T // step) * step


# Row lengths a run may meet on the FlexAttention path (flex_row_length up to 65536), and the
# compiled variants per length (grad / no-grad, x dtypes, window / soft-cap variants a model mixes):
# the recompile limit covers their product, so no call falls back to eager FlexAttention ([B, H, T, T]
# scores) mid-run.
FLEX_BUCKETS, FLEX_VARIANTS = 56, 8


def raise_recompile_limit(buckets: int = FLEX_BUCKETS, variants: int = FLEX_VARIANTS) -> int:
    """Dynamo's per-function recompile limit (8 by default) raised to buckets x variants; -> the limit."""
    import torch._dynamo.config as dynamo

    need = buckets * variants
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"   # torch < 2.6
    setattr(dynamo, name, max(getattr(dynamo, name), need))
    if hasattr(dynamo, "accumulated_recompile_limit"):
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 2 * need)
    return getattr(dynamo, name)


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
    a DocumentMask (packed rows on CPU) or a FlexAttention BlockMask (packed rows on CUDA).
    softcap: Gemma 2's score soft-cap."""
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if gqa and isinstance(mask, Tensor) and q.is_cuda:
        # A dense mask rules out flash and GQA the memory-efficient kernel: SDPA would take its
        # math backend ([B, H, T, T] in float32). Repeated K/V cost n_heads/n_kv x their size only.
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), {}
    if isinstance(mask, DocumentMask):
        return _attend_documents(q, k, v, mask, scale, softcap, gqa)
    if mask is None or isinstance(mask, Tensor):
        if softcap is not None:
            return softcapped_attention(q, k, v, mask, scale, softcap)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, **gqa)
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.is_autocast_enabled(q.device.type):
        # FlexAttention is no autocast op: it rejects mixed dtypes (a float32 model's RoPE'd q, k next to
        # a bf16 v) and runs float32 kernels on float32 inputs. Give it what SDPA's autocast entry would.
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    extra = {"score_mod": _softcap_score_mod(softcap)} if softcap is not None else {}
    if q.device.type not in FLEX_COMPILED_DEVICES:  # eager FlexAttention (tests): materialises [T, T], but exact
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(q, k, v, block_mask=mask, scale=scale, **extra, **gqa)
    if _compiled_flex is None:
        # Compiled once; dynamic=False specialises per shape, and rows padded to FLEX_BLOCK
        # multiples (sdpo.data.packing) keep the number of shapes, hence of compiles, small.
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
        raise_recompile_limit()
    return _compiled_flex(q, k, v, block_mask=mask, scale=scale, **extra, **gqa)


@torch.compiler.disable
def _attend_documents(q: Tensor, k: Tensor, v: Tensor, mask: DocumentMask, scale, softcap, gqa) -> Tensor:
    """attend over a DocumentMask: one or two SDPA calls per document, outputs concatenated in row order.
    q, k, v are split into the pieces once (torch.split: its backward is one concatenation, where a
    slice per piece would scatter into a zero [T]-long gradient each). Left out of torch.compile
    (train.compile): the pieces differ in every batch, and a compiled block would recompile for each."""

    def sdpa(qq, kk, vv, m):  # m None: causal over equal lengths
        if softcap is not None:
            return softcapped_attention(qq, kk, vv, m, scale, softcap)
        return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=m, is_causal=m is None, scale=scale, **gqa)

    rep = q.shape[1] // k.shape[1]
    rows = []
    for b, pieces in enumerate(mask.rows):
        sizes = []  # piece lengths in row order: a document is prompt | chosen, then rejected
        for piece in pieces:
            if piece[0] == "doc":
                sizes += [n for n in (piece[2] + piece[3], piece[4]) if n]
            else:
                sizes.append(piece[2] - piece[1])
        qs, ks, vs = (x[b:b + 1].split(sizes, dim=2) if len(mask.rows) > 1 else x.split(sizes, dim=2)
                      for x in (q, k, v))  # (1, heads, piece, d) each
        out, j = [], 0
        for piece in pieces:
            kind = piece[0]
            if kind == "pad":  # a pad sees only itself
                out.append(vs[j].repeat_interleave(rep, dim=1) if rep > 1 else vs[j])
                j += 1
            elif kind == "dense":
                out.append(sdpa(qs[j], ks[j], vs[j], piece[3]))
                j += 1
            else:
                _, a, P, C, R, m1, m2 = piece
                if P + C:
                    out.append(sdpa(qs[j], ks[j], vs[j], m1))
                    j += 1
                if R:
                    kr, vr = ks[j], vs[j]
                    if P:  # keys: the prompt (the first P of the piece before), then the rejected tokens
                        kr = torch.cat([ks[j - 1][:, :, :P], kr], dim=2)
                        vr = torch.cat([vs[j - 1][:, :, :P], vr], dim=2)
                    out.append(sdpa(qs[j], kr, vr, m2))
                    j += 1
        rows.append(out[0] if len(out) == 1 else torch.cat(out, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
