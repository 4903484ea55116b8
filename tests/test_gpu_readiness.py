"""Issue 29's CPU-provable parts of the CUDA paths: the FlexAttention BlockMask built from tile
spans (no [T, T]), the window dropped where it cannot bite, row-length buckets, and K/V repeated
for a dense mask with GQA on CUDA (that one runs only where CUDA is)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sdpo.data.packing import pack
from sdpo.data.pairs import TokenizedPair
from sdpo.models import attention as A

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def random_pairs(n, seed, lo=0, hi=300):
    g = torch.Generator().manual_seed(seed)
    r = lambda a, b: int(torch.randint(a, b + 1, (1,), generator=g))  # noqa: E731
    return [TokenizedPair([1] + [5] * r(lo, hi), [6] * r(1, hi), [7] * r(1, hi), i) for i in range(n)]


def packed(pairs, **kw):
    b = pack(pairs, pad_id=0, pad_to_multiple_of=A.FLEX_BLOCK, **kw)
    return b["doc_ids"], b["segments"], b["position_ids"]


def dense_tiles(doc, seg, pos, window):
    """(kept, full) per tile pair from the dense mask (A): the ground truth a BlockMask must cover."""
    m = A.dense_packed_mask(doc, seg, pos, window)[:, 0]                   # [B, T, T]
    B, T = doc.shape
    nb = T // A.FLEX_BLOCK
    t = m.view(B, nb, A.FLEX_BLOCK, nb, A.FLEX_BLOCK)
    return t.any(4).any(2), t.all(4).all(2)


def tiles_of(bm):
    """(kept, full) [B, nb, nb] from a BlockMask's index lists."""
    dense = bm.to_dense()[:, 0].bool()                                      # partial ∪ full
    full = torch.zeros_like(dense)
    n, idx = bm.full_kv_num_blocks[:, 0], bm.full_kv_indices[:, 0]
    for b in range(dense.shape[0]):
        for i in range(dense.shape[1]):
            full[b, i, idx[b, i, :n[b, i]].long()] = True
    return dense, full


@pytest.mark.parametrize("window", [None, 200, 64])
@pytest.mark.parametrize("rows", [dict(rows="one"), dict(row_tokens=900)])
def test_block_mask_from_tile_spans_covers_the_mask_and_claims_no_false_full_tile(window, rows):
    # Small enough (T ~ 2k) that the dense [B, T, T] ground truth stays ~100 MB: a test that raises this
    # process's peak RSS would show in tests/test_memory.py's measurement (a fork inherits it).
    pairs = random_pairs(4, seed=3, lo=100, hi=250) + [TokenizedPair([], [6] * 5, [7] * 3, 99)]   # an empty prompt too
    doc, seg, pos = packed(pairs, **rows)
    bm = A.flex_block_mask(doc, seg, pos, window)
    kept, full = tiles_of(bm)
    want_kept, want_full = dense_tiles(doc, seg, pos, window)
    assert not (want_kept & ~kept).any()          # every tile with an allowed pair is visited
    assert not (full & ~want_full).any()          # a tile called full is full (mask_mod skipped there)
    assert (kept & ~full).any() and full.any() == want_full.any()
    assert full.sum() >= 0.75 * want_full.sum()   # most full tiles are found (mask_mod skipped there)
    # Not needlessly loose: most tiles off the documents are skipped.
    assert kept.sum() <= want_kept.sum() * 1.25 + doc.shape[1] // A.FLEX_BLOCK
    # And the mask it carries is (A) itself.
    B, T = doc.shape
    g = torch.Generator().manual_seed(0)
    bb, qq, kk = (torch.randint(0, n, (200_000,), generator=g) for n in (B, T, T))
    assert torch.equal(bm.mask_mod(bb, None, qq, kk), A.dense_packed_mask(doc, seg, pos, window)[bb, 0, qq, kk])


class _Biggest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


def test_block_mask_builds_nothing_of_size_t_squared():
    doc, seg, pos = packed(random_pairs(40, seed=1, hi=400))
    T = doc.shape[1]
    assert T >= 8192
    with _Biggest() as rec:
        A.flex_block_mask(doc, seg, pos, 4096)
    assert rec.numel < T * T / 64, (rec.numel, T)
    # The control, create_block_mask uncompiled, on a shorter row: at T = 8192 its [T, T] temporaries
    # would leave this process several GB larger (peak RSS tests later in the run would see them).
    doc, seg, pos = packed(random_pairs(3, seed=1, hi=400))
    T = doc.shape[1]
    with _Biggest() as rec:
        flex.create_block_mask(A._mask_mod(doc, seg, pos, 100), 1, None, T, T, device="cpu")
    assert rec.numel >= T * T


def test_window_is_dropped_where_it_cannot_bite():
    assert A.window_that_bites(4096, 4096) is None and A.window_that_bites(4096, 4097) == 4096
    assert A.window_that_bites(None, 10) is None
    doc, seg, pos = packed(random_pairs(3, seed=2, hi=100))
    T = doc.shape[1]
    assert torch.equal(A.dense_packed_mask(doc, seg, pos, T), A.dense_packed_mask(doc, seg, pos))
    with _Biggest() as rec:
        A.dense_packed_mask(doc, seg, pos, 4096)
    with _Biggest() as plain:
        A.dense_packed_mask(doc, seg, pos)
    assert rec.numel == plain.numel               # no extra [B, T, T] position-difference term


def test_row_length_buckets():
    lengths = {A.flex_row_length(t) for t in range(1, 65537)}
    assert len(lengths) == A.FLEX_BUCKETS == 56
    for t in (1, 127, 128, 129, 1000, 1024, 1025, 3000, 4097, 9000, 65536):
        b = A.flex_row_length(t)
        assert b >= t and b % A.FLEX_BLOCK == 0
        assert b - t < A.FLEX_BLOCK if t <= 1024 else (b - t) / t < 0.125
    assert A.raise_recompile_limit() >= A.FLEX_BUCKETS * A.FLEX_VARIANTS


def test_bucket_padding_keeps_the_log_probs():
    """Packed rows padded to the bucket (more pad columns, gather_index moved) give the unpadded
    rows' log-probs: eager FlexAttention on CPU with the tile-span mask vs the dense SDPA mask."""
    from sdpo.logprobs import _pad_to_bucket, packed_sequence_logps
    from sdpo.models.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, sliding_window=300)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(0)
    pairs = [TokenizedPair(torch.randint(3, 64, (a,), generator=g).tolist(), torch.randint(3, 64, (b,), generator=g).tolist(),
                           torch.randint(3, 64, (c,), generator=g).tolist(), i)
             for i, (a, b, c) in enumerate([(300, 200, 250), (40, 9, 30), (0, 5, 7), (120, 300, 10), (700, 100, 50)])]
    batch = pack(pairs, pad_id=0, rows="one", pad_to_multiple_of=A.FLEX_BLOCK)
    T = batch["input_ids"].shape[1]
    padded = _pad_to_bucket(batch)
    assert padded["input_ids"].shape[1] == A.flex_row_length(T) > T
    with torch.no_grad():
        dense = packed_sequence_logps(model, batch, backend="dense")
        try:
            flexed = packed_sequence_logps(model, batch, backend="flex")
        except Exception as e:  # eager FlexAttention on CPU varies between torch versions
            pytest.skip(f"eager flex_attention unavailable on CPU: {type(e).__name__}: {e}")
    torch.testing.assert_close(flexed.logps, dense.logps, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: which SDPA backend runs")
def test_gqa_with_a_dense_mask_avoids_the_math_backend_on_cuda():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(256, 256, dtype=torch.bool, device="cuda").tril()[None, None]
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):   # no math fallback
        out = A.attend(q, k, v, mask)
    want = A.attend(q.float(), k.float(), v.float(), None)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
