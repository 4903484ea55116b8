"""The CPU performance paths (issue 28) give what the reference paths give.

DocumentMask (attention per document over one unpadded row) against the dense [T, T] mask of (A):
values and gradients, with pads, sliding windows, soft-capped scores, GQA, a shared prompt or not."""

import pytest
import torch

from sdpo.data.packing import pack
from sdpo.data.pairs import TokenizedPair
from sdpo.logprobs import pack_options, packed_sequence_logps
from sdpo.models.attention import DocumentMask, attend, dense_packed_mask, document_mask
from sdpo.models.model import ModelConfig, Transformer

# (prompt, chosen, rejected) lengths: an empty prompt, an empty chosen, an empty rejected, a long prompt
SPECS = [(30, 20, 25), (4, 1, 3), (0, 5, 7), (12, 30, 0), (70, 10, 5), (1, 0, 4)]


def _pairs():
    g = torch.Generator().manual_seed(0)
    return [TokenizedPair(*(torch.randint(3, 64, (n,), generator=g).tolist() for n in spec), i)
            for i, spec in enumerate(SPECS)]


def test_cpu_packing_is_one_unpadded_row():
    assert pack_options(packing=True, share_prompt=True, device="cpu") == {
        "share_prompt": True, "rows": "one", "pad_to_multiple_of": None}
    b = pack(_pairs(), pad_id=0, **pack_options(packing=True, share_prompt=True, device="cpu"))
    assert b["input_ids"].shape == (1, sum(sum(s) for s in SPECS)) and bool((b["doc_ids"] > 0).all())
    assert isinstance(document_mask(b["doc_ids"], b["segments"], b["position_ids"]), DocumentMask)
    # pack's host-side doc_spans give the pieces read off the tensors, pads included
    for rows in ("one", "each"):
        b = pack(_pairs(), pad_id=0, rows=rows, pad_to_multiple_of=8)
        args = (b["doc_ids"], b["segments"], b["position_ids"], 16)
        read, given = document_mask(*args), document_mask(*args, spans=b["doc_spans"])
        assert [[p[:5] for p in row] for row in given.rows] == [[p[:5] for p in row] for row in read.rows]


@pytest.mark.parametrize("window", [None, 3])
def test_attend_over_documents_equals_the_dense_mask(window):
    """Random q, k, v on rows with pads and a segment order pack never makes (dense fallback)."""
    b = pack(_pairs(), pad_id=0, row_tokens=120, pad_to_multiple_of=16)
    doc, seg, pos = b["doc_ids"], b["segments"].clone(), b["position_ids"]
    seg[0, 3] = 2  # a rejected token inside the first prompt: that document takes the dense fallback
    B, T = doc.shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, 4, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, 2, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    up = torch.randn(B, 4, T, 8, generator=g, dtype=torch.float64)
    outs = []
    for mask in (dense_packed_mask(doc, seg, pos, window), document_mask(doc, seg, pos, window)):
        y = attend(q, k, v, mask)
        outs.append((y.detach(), *torch.autograd.grad((y * up).sum(), (q, k, v))))
    assert any(p[0] == "dense" for p in document_mask(doc, seg, pos, window).rows[0])
    for a, d in zip(*outs):
        torch.testing.assert_close(d, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("extra,rows,share", [
    ({}, "one", True),
    ({"sliding_window": 16}, "one", False),
    ({"model_type": "gemma2", "attn_logit_softcapping": 5.0, "hidden_act": "gelu_pytorch_tanh"}, "each", True),
], ids=["llama-one-row", "window-no-shared-prompt", "softcap-padded-rows"])
def test_packed_logps_documents_equal_dense(extra, rows, share):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **extra)
    model = Transformer(cfg).double()
    model.init_weights(seed=0, std=0.3)
    b = pack(_pairs(), pad_id=0, rows=rows, share_prompt=share, pad_to_multiple_of=8 if rows == "each" else None)
    got = []
    for backend in ("dense", "documents"):
        model.zero_grad()
        out = packed_sequence_logps(model, b, backend=backend)
        (out.logps * torch.linspace(0.5, 1.5, out.logps.shape[0], dtype=torch.float64)).sum().backward()
        got.append((out.logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (dense, dg), (docs, gg) = got
    # The soft-capped attention takes its softmax in float32 (transformers' order): float32 rounding there.
    tol = 1e-6 if "attn_logit_softcapping" in extra else 1e-10
    torch.testing.assert_close(docs, dense, rtol=tol, atol=tol)
    for n in dg:
        torch.testing.assert_close(gg[n], dg[n], rtol=10 * tol, atol=tol, msg=lambda m: f"{n}: {m}")
