"""kernels.linear_token_logprobs: the fused lm_head + log-prob against a float64 ground truth
(values, grad of hidden, grad of weight), odd shapes, per-row upstream gradients, ignored rows,
tied embeddings, autocast, chunk-sized allocations; Triton per chunk under TRITON_INTERPRET=1."""

import pytest
import torch

import kernels
from kernels.reference import naive_token_logprobs
from probes import FreshAllocations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
_triton_runs = kernels.triton_available() and (torch.cuda.is_available() or kernels._triton_impl.INTERPRET)
needs_triton = pytest.mark.skipif(not _triton_runs, reason="triton missing, or no GPU and no TRITON_INTERPRET=1")
IMPLS = ["reference", pytest.param("triton", marks=needs_triton)]

# (R, H, V, chunk rows): none a multiple of the chunk or of the 128/1024/4096 kernel blocks.
SHAPES = [(3, 5, 123, 2), (47, 16, 1000, 7), (29, 24, 4099, None)]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def make_case(R, H, V, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(R, H, generator=gen) * 2).to(dtype)
    w = (torch.randn(V, H, generator=gen) / H ** 0.5).to(dtype)
    t = torch.randint(0, V, (R,), generator=gen)
    t[R - 1] = IGNORE                                  # an ignored row: 0 out, 0 gradient
    if R > 4:
        t[R // 2] = IGNORE
    g = torch.randn(R, generator=gen) * 2              # DPO weighs every sequence differently
    return h.to(DEVICE), w.to(DEVICE), t.to(DEVICE), g.to(DEVICE)


def fused(h, w, t, g, **kw):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = kernels.linear_token_logprobs(h, w, t, IGNORE, **kw)
    gh, gw = torch.autograd.grad(out, (h, w), g)
    return out.detach(), gh, gw


def truth(h, w, t, g):
    """The unfused formula in float64: logits = h Wᵀ, log_softmax, gather."""
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    out = naive_token_logprobs(h64 @ w64.t(), t, IGNORE)
    gh, gw = torch.autograd.grad(out, (h64, w64), g.double())
    return out.detach(), gh, gw


def unfused_same_dtype(h, w, t, g):
    """Today's path in the inputs' dtype: lm_head then token_logprobs."""
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = kernels.token_logprobs(h @ w.t(), t, IGNORE, impl="reference")
    gh, gw = torch.autograd.grad(out, (h, w), g)
    return out.detach(), gh, gw


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_truth(impl, dtype, shape):
    R, H, V, chunk = shape
    h, w, t, g = make_case(R, H, V, dtype)
    out, gh, gw = fused(h, w, t, g, chunk_size=chunk, impl=impl)
    o64, gh64, gw64 = truth(h, w, t, g)
    assert out.dtype == torch.float32 and out.shape == (R,)
    assert gh.dtype == dtype and gh.shape == (R, H) and gw.dtype == dtype and gw.shape == (V, H)
    ignored = t == IGNORE
    assert (out[ignored] == 0).all() and (gh[ignored] == 0).all()
    torch.testing.assert_close(out.double(), o64, **TOL[dtype])
    torch.testing.assert_close(gh.double(), gh64, **TOL[dtype])
    torch.testing.assert_close(gw.double(), gw64, **TOL[dtype])
    # No worse than the unfused path in the same dtype, plus a few ulps of the result's scale
    # (Cut-Cross-Entropy's criterion): chunking and recomputation must not cost accuracy.
    uo, ugh, ugw = unfused_same_dtype(h, w, t, g)
    eps = torch.finfo(dtype).eps
    for mine, theirs, exact in ((out, uo, o64), (gh, ugh, gh64), (gw, ugw, gw64)):
        assert err(mine, exact) <= err(theirs, exact) + 4 * eps * exact.abs().max().item()


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_backward_in_many_vocab_blocks(impl, monkeypatch):
    """16-bit weights: backward walks W in vocab blocks (float32 accumulators of [Vb, H] only);
    blocks of 96 rows, the last one partial, targets in every block."""
    from kernels import fused_linear
    monkeypatch.setattr(fused_linear, "VOCAB_BLOCK", 96)
    monkeypatch.setattr(fused_linear, "CUDA_VOCAB_BLOCK", 96)
    h, w, t, g = make_case(47, 16, 1000, torch.bfloat16, seed=7)
    out, gh, gw = fused(h, w, t, g, chunk_size=10, impl=impl)
    o64, gh64, gw64 = truth(h, w, t, g)
    uo, ugh, ugw = unfused_same_dtype(h, w, t, g)
    eps = torch.finfo(torch.bfloat16).eps
    for mine, theirs, exact in ((out, uo, o64), (gh, ugh, gh64), (gw, ugw, gw64)):
        assert err(mine, exact) <= err(theirs, exact) + 4 * eps * exact.abs().max().item()


def test_gradcheck_float64_several_chunks():
    h, w, t, _ = make_case(11, 6, 37, torch.float64)
    h, w = h.requires_grad_(True), w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kernels.linear_token_logprobs(a, b, t, IGNORE, chunk_size=3),
                                    (h, w))


def test_chunk_size_does_not_change_the_result():
    h, w, t, g = make_case(47, 16, 1000, torch.float32, seed=2)
    a = fused(h, w, t, g, chunk_size=1, impl="reference")
    b = fused(h, w, t, g, chunk_size=47, impl="reference")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_only_hidden_or_only_weight_needs_grad():
    h, w, t, g = make_case(9, 8, 50, torch.float32, seed=3)
    out, gh, gw = fused(h, w, t, g)
    hh = h.clone().requires_grad_(True)
    (only_h,) = torch.autograd.grad(kernels.linear_token_logprobs(hh, w, t), hh, g)
    ww = w.clone().requires_grad_(True)
    (only_w,) = torch.autograd.grad(kernels.linear_token_logprobs(h, ww, t), ww, g)
    torch.testing.assert_close(only_h, gh)
    torch.testing.assert_close(only_w, gw)
    with torch.no_grad():   # inference: nothing saved, same values
        torch.testing.assert_close(kernels.linear_token_logprobs(h, w, t), out)


def test_tied_embeddings_gradient_sums_both_uses():
    """With a tied lm_head the weight's gradient is the embedding's plus the lm_head's: the fused
    path must add into the same Parameter exactly as the unfused one does."""
    torch.manual_seed(0)
    V, H = 53, 12
    emb = torch.nn.Embedding(V, H)
    ids = torch.randint(0, V, (2, 9))
    t = torch.randint(0, V, (18,))
    t[4] = IGNORE
    g = torch.randn(18)

    def grad_of(fn):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids)).reshape(-1, H)   # the embedding is used on the way in...
        (fn(hidden, emb.weight) * g).sum().backward()  # ...and as the lm_head weight on the way out
        return emb.weight.grad.clone()

    fused_grad = grad_of(lambda h, w: kernels.linear_token_logprobs(h, w, t, chunk_size=4))
    unfused_grad = grad_of(lambda h, w: kernels.token_logprobs(h @ w.t(), t))
    torch.testing.assert_close(fused_grad, unfused_grad, rtol=1e-5, atol=1e-6)


def test_autocast_bf16_gives_fp32_param_grads_like_f_linear():
    h, w, t, g = make_case(21, 16, 300, torch.float32, seed=4)
    results = []
    for fn in (lambda a, b: kernels.linear_token_logprobs(a, b, t, chunk_size=5),
               lambda a, b: kernels.token_logprobs(torch.nn.functional.linear(a, b), t)):
        a, b = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = fn(a, b)
        ga, gb = torch.autograd.grad(out, (a, b), g)
        assert out.dtype == torch.float32 and ga.dtype == torch.float32 and gb.dtype == torch.float32
        results.append((out, ga, gb))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("bad, message", [
    (dict(targets=torch.zeros(4, dtype=torch.long)), "must be \\(3,\\)"),
    (dict(targets=torch.tensor([0, 11, 2])), "outside \\[0, 11\\)"),
    (dict(weight=torch.randn(11, 5)), "hidden must be \\[R, H\\] and weight \\[V, H\\]"),
    (dict(weight=torch.randn(11, 4, dtype=torch.float64)), "share one float dtype"),
    (dict(ignore_index=3), "ignore_index=3 is a valid token id"),
    (dict(chunk_size=0), "chunk_size must be >= 1"),
    (dict(impl="gpu"), "impl must be one of"),
])
def test_bad_inputs_raise_clear_errors(bad, message):
    kwargs = dict(hidden=torch.randn(3, 4), weight=torch.randn(11, 4), targets=torch.tensor([0, 1, 2]))
    kwargs.update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        kernels.linear_token_logprobs(**kwargs)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_allocation_of_rv_size(impl):
    """Forward + backward allocate nothing bigger than the [V, H] weight gradient and one
    [chunk, V] logits chunk; the control (unfused) allocates the [R, V] logits."""
    R, H, V, chunk = 512, 8, 2048, 32
    h, w, t, g = make_case(R, H, V, torch.float32, seed=5)
    h, w = h.requires_grad_(True), w.requires_grad_(True)
    rv_bytes = R * V * 4
    with FreshAllocations() as rec:
        torch.autograd.grad(kernels.linear_token_logprobs(h, w, t, chunk_size=chunk, impl=impl), (h, w), g)
    assert max(rec.sizes) <= max(chunk * V * 4, V * H * 4) < rv_bytes / 8, (max(rec.sizes), rv_bytes)
    with FreshAllocations() as rec:
        torch.autograd.grad(kernels.token_logprobs(h @ w.t(), t, impl=impl), (h, w), g)
    assert max(rec.sizes) >= rv_bytes


# ---- final-logit soft-capping (softcap=c: log softmax(c·tanh(h Wᵀ / c))) ----

def truth_softcap(h, w, t, g, cap):
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    out = naive_token_logprobs(torch.tanh((h64 @ w64.t()) / cap) * cap, t, IGNORE)
    gh, gw = torch.autograd.grad(out, (h64, w64), g.double())
    return out.detach(), gh, gw


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_softcap_matches_float64_truth(impl, dtype, shape):
    R, H, V, chunk = shape
    cap = 2.0                                          # logits ~ N(0, 4): well into the tanh's knee
    h, w, t, g = make_case(R, H, V, dtype)
    out, gh, gw = fused(h, w, t, g, chunk_size=chunk, impl=impl, softcap=cap)
    o64, gh64, gw64 = truth_softcap(h, w, t, g, cap)
    assert out.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    ignored = t == IGNORE
    assert (out[ignored] == 0).all() and (gh[ignored] == 0).all()
    torch.testing.assert_close(out.double(), o64, **TOL[dtype])
    torch.testing.assert_close(gh.double(), gh64, **TOL[dtype])
    torch.testing.assert_close(gw.double(), gw64, **TOL[dtype])
    # No worse than the unfused path in the same dtype (capped logits, then token_logprobs).
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    uo = kernels.token_logprobs(hh @ ww.t(), t, IGNORE, impl="reference", softcap=cap)
    ugh, ugw = torch.autograd.grad(uo, (hh, ww), g)
    eps = torch.finfo(dtype).eps
    for mine, theirs, exact in ((out, uo.detach(), o64), (gh, ugh, gh64), (gw, ugw, gw64)):
        assert err(mine, exact) <= err(theirs, exact) + 4 * eps * exact.abs().max().item()
    assert err(out, fused(h, w, t, g, chunk_size=chunk, impl=impl)[0]) > 0.1   # the cap bites


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_bf16_many_vocab_blocks(impl, monkeypatch):
    from kernels import fused_linear
    monkeypatch.setattr(fused_linear, "VOCAB_BLOCK", 96)
    monkeypatch.setattr(fused_linear, "CUDA_VOCAB_BLOCK", 96)
    h, w, t, g = make_case(47, 16, 1000, torch.bfloat16, seed=7)
    out, gh, gw = fused(h, w, t, g, chunk_size=10, impl=impl, softcap=3.0)
    o64, gh64, gw64 = truth_softcap(h, w, t, g, 3.0)
    for mine, exact in ((out, o64), (gh, gh64), (gw, gw64)):
        torch.testing.assert_close(mine.double(), exact, **TOL[torch.bfloat16])


def test_softcap_gradcheck_float64():
    h, w, t, _ = make_case(11, 6, 37, torch.float64)
    h, w = (h * 3).requires_grad_(True), w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: kernels.linear_token_logprobs(a, b, t, IGNORE, chunk_size=3, softcap=1.5), (h, w))


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_no_allocation_of_rv_size(impl):
    R, H, V, chunk = 512, 8, 2048, 32
    h, w, t, g = make_case(R, H, V, torch.float32, seed=5)
    h, w = h.requires_grad_(True), w.requires_grad_(True)
    with FreshAllocations() as rec:
        torch.autograd.grad(kernels.linear_token_logprobs(h, w, t, chunk_size=chunk, impl=impl, softcap=30.0),
                            (h, w), g)
    assert max(rec.sizes) <= max(chunk * V * 4, V * H * 4) < R * V * 4 / 8, max(rec.sizes)
