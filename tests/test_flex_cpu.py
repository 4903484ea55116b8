"""Compiled FlexAttention on CPU (issue 29): the packed path CUDA runs — rows padded to the
128-token block and then to a row-length bucket, the tile-span BlockMask, a sliding window, GQA —
compiled with torch.compile as on CUDA, against the dense SDPA mask, with the number of compiles
asserted (one per bucket and grad mode, none for a second batch in the same bucket).

This torch's compiled FlexAttention has no backward on CPU ("does not support backward on CPU"),
so the grad-mode pass runs with parameters that do not require grad: it still takes the
grad-enabled guard (a separate compile), but the backward kernels are proven only on a GPU
(bench/gpu.sh)."""

import random

import pytest
import torch

from sdpo.data.packing import pack
from sdpo.data.pairs import TokenizedPair
from sdpo.logprobs import packed_sequence_logps
from sdpo.models import attention as A
from sdpo.models.model import ModelConfig, Transformer

pytestmark = pytest.mark.slow   # ~2-4 min on 2 cores: inductor compiles four CPU kernels


def _pairs(seed, sizes):
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, 96) for _ in range(n)]  # noqa: E731
    return [TokenizedPair(ids(p), ids(c), ids(r), i) for i, (p, c, r) in enumerate(sizes)]


def test_compiled_flex_on_cpu_matches_the_dense_mask_with_one_compile_per_bucket_and_mode(monkeypatch):
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch._dynamo.utils import counters

    monkeypatch.setattr(A, "FLEX_COMPILED_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(A, "_compiled_flex", None)
    torch._dynamo.reset()
    counters.clear()

    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=160)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model.requires_grad_(False)          # see the module docstring: no compiled backward on CPU
    # Three batches: rows of 2176 and 2304 tokens share the bucket 2304 (no second compile); 1152.
    batches = [pack(_pairs(s, sizes), pad_id=0, rows="one", pad_to_multiple_of=A.FLEX_BLOCK)
               for s, sizes in ((0, [(600, 400, 350), (300, 200, 150), (50, 40, 30)]),
                                (1, [(700, 500, 400), (200, 150, 140), (60, 50, 40)]),
                                (2, [(400, 150, 180), (200, 120, 100)]))]
    lengths = [b["input_ids"].shape[1] for b in batches]
    buckets = [A.flex_row_length(T) for T in lengths]
    assert lengths == [2176, 2304, 1152] and buckets == [2304, 2304, 1152]

    try:
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                for b in batches:
                    flex = packed_sequence_logps(model, b, backend="flex")
                    dense = packed_sequence_logps(model, b, backend="dense")
                    torch.testing.assert_close(flex.logps, dense.logps, rtol=1e-5, atol=2e-4)
    except Exception as e:   # inductor unavailable (no C++ compiler) or no CPU FlexAttention in this torch
        if "FlexAttention" in str(e) or "compiler" in str(e).lower() or "inductor" in str(e).lower():
            pytest.skip(f"compiled FlexAttention unavailable on CPU here: {type(e).__name__}: {str(e)[:200]}")
        raise
    compiles = counters["stats"]["unique_graphs"]
    want = len(set(buckets)) * 2         # buckets x {no-grad, grad}
    assert compiles == want, (compiles, want, lengths, buckets)
    assert A.raise_recompile_limit() >= A.FLEX_BUCKETS * A.FLEX_VARIANTS > want
