"""sdpo.models.attention: the shared-prompt / packed mask (A), its FlexAttention twin, and the model's attn_mask."""

import pytest
import torch

from sdpo.data.packing import pack
from sdpo.data.pairs import TokenizedPair
from sdpo.models.attention import CHOSEN, PROMPT, REJECTED, _mask_mod, attend, dense_packed_mask
from sdpo.models.model import ModelConfig, Transformer


def _row():
    # pair 1: prompt 2, chosen 2, rejected 3; pair 2: prompt 1, chosen 1, rejected 1; 2 pads
    b = pack([TokenizedPair([5, 6], [7, 8], [9, 10, 11], 0), TokenizedPair([12], [13], [14], 1)], pad_id=0,
             pad_to_multiple_of=4)
    return b["doc_ids"], b["segments"], b["position_ids"]


def test_mask_by_hand():
    doc, seg, pos = _row()
    assert doc.tolist() == [[1] * 7 + [2] * 3 + [0] * 2]
    assert seg.tolist() == [[PROMPT, PROMPT, CHOSEN, CHOSEN, REJECTED, REJECTED, REJECTED, PROMPT, CHOSEN, REJECTED,
                             PROMPT, PROMPT]]
    assert pos.tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1, 1, 0, 0]]
    m = dense_packed_mask(doc, seg, pos)[0, 0].int().tolist()
    want = [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # prompt: causal among itself
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # chosen: prompt + earlier chosen
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],  # rejected: prompt + earlier rejected, never chosen
        [1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],  # the next pair sees nothing of the first
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],  # pads see only themselves
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    ]
    assert m == want


def test_sliding_window_counts_positions_not_row_offsets():
    doc, seg, pos = _row()
    m = dense_packed_mask(doc, seg, pos, sliding_window=2)[0, 0]
    # rejected token at row 4 has position 2: with w = 2 it sees position 1 (row 1), not position 0
    assert m[4].nonzero().flatten().tolist() == [1, 4]
    assert m[6].nonzero().flatten().tolist() == [5, 6]


@pytest.mark.parametrize("window", [None, 3])
def test_flex_mask_mod_equals_the_dense_mask(window):
    g = torch.Generator().manual_seed(0)
    pairs = [TokenizedPair(torch.randint(1, 50, (n,), generator=g).tolist(), [1] * c, [2] * r, i)
             for i, (n, c, r) in enumerate([(3, 2, 5), (1, 1, 1), (4, 6, 2), (0, 3, 3)])]
    b = pack(pairs, pad_id=0, row_tokens=20, pad_to_multiple_of=8)
    doc, seg, pos = b["doc_ids"], b["segments"], b["position_ids"]
    B, T = doc.shape
    mod = _mask_mod(doc, seg, pos, window)
    bb, qq, kk = torch.meshgrid(torch.arange(B), torch.arange(T), torch.arange(T), indexing="ij")
    assert torch.equal(mod(bb, None, qq, kk), dense_packed_mask(doc, seg, pos, window)[:, 0])


def test_eager_flex_attention_matches_sdpa_on_the_packed_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import create_block_mask

    doc, seg, pos = _row()
    doc, seg, pos = (torch.nn.functional.pad(x, (0, 116)) for x in (doc, seg, pos))  # T = 128, one block
    T = doc.shape[1]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, T, 8, generator=g) for _ in range(3))
    block = create_block_mask(_mask_mod(doc, seg, pos, None), 1, None, T, T, device="cpu", _compile=False)
    try:
        flex = attend(q, k, v, block)
    except Exception as e:  # eager FlexAttention on CPU varies between torch versions
        pytest.skip(f"eager flex_attention unavailable on CPU: {type(e).__name__}: {e}")
    dense = attend(q, k, v, dense_packed_mask(doc, seg, pos))
    real = doc[0] > 0
    torch.testing.assert_close(flex[:, :, real], dense[:, :, real], rtol=1e-5, atol=1e-5)


def test_model_attn_mask_replaces_the_segment_mask():
    """A precomputed mask equal to the one segment ids give -> the same hidden states; a mask that
    differs (rejected sees chosen) -> different ones: attn_mask reaches every layer."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2))
    m.init_weights(seed=0, std=0.3)
    ids = torch.randint(1, 50, (2, 9))
    seg_ids = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 0, 0], [1] * 9])
    want = m.hidden_states(ids, seg_ids)
    doc = seg_ids
    seg = torch.zeros_like(doc)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 0], list(range(9))])
    got = m.hidden_states(ids, None, pos, attn_mask=dense_packed_mask(doc, seg, pos))
    real = seg_ids > 0
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    assert not torch.allclose(m.hidden_states(ids, None, pos, attn_mask=causal)[0, 4:7], want[0, 4:7], atol=1e-4)
    torch.testing.assert_close(m(ids, None, pos, attn_mask=causal), m.lm_head(m.hidden_states(ids, None, pos,
                                                                                             attn_mask=causal)))
