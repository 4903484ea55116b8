import math

import pytest
import torch
import torch.nn.functional as F

from sdpo.models.blocks import Attention
from sdpo.models.layers import RMSNorm
from sdpo.models.model import (
    FAMILIES,
    ModelConfig,
    Rope,
    Transformer,
    build_attention_mask,
    checkpoint_every,
    is_right_padded,
    default_position_ids,
)
from sdpo.models import rope as rope_mod
from sdpo.models.rope import apply_rope


def rope_inv_freq(cfg, seq_len=None):
    return rope_mod.inv_freq_and_scale(cfg.rope_theta, cfg.rope_scaling, cfg.rotary_dim, cfg.max_position_embeddings,
                                       seq_len)[0]


def rope_cos_sin(cfg, position_ids, dtype):
    return rope_mod.rope_cos_sin(cfg.rope_theta, cfg.rope_scaling, cfg.rotary_dim, cfg.max_position_embeddings,
                                 position_ids, dtype)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    return ModelConfig(**{**base, **kw})


def make_model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny(**kw)).eval()
    model.init_weights(seed, std=0.3)  # large enough that logits vary by O(1) across positions
    return model


CONFIGS = {
    "llama": {},
    "qwen2": dict(model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", sliding_window=3),
    "llama3": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=8)),
}


def ids(B, T, seed=1, vocab=50):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("masked", [False, True])
def test_causality(name, masked):
    model = make_model(**CONFIGS[name])
    x = ids(2, 12)
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 50
    mask = torch.ones_like(x) if masked else None
    with torch.no_grad():
        a, b = model(x, mask), model(y, mask)
    close(a[:, :7], b[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-2  # the change is visible from position 7 on


@pytest.mark.parametrize("name", CONFIGS)
def test_padding_invariance_left_and_right(name):
    model = make_model(**CONFIGS[name])
    seq = ids(1, 9)
    with torch.no_grad():
        alone = model(seq)[0]
        # row 0: 3 left pads, row 1: 3 right pads; pad ids deliberately differ per row
        batch = torch.cat([torch.cat([torch.full((1, 3), 7), seq], 1), torch.cat([seq, torch.full((1, 3), 11)], 1)])
        mask = torch.tensor([[0] * 3 + [1] * 9, [1] * 9 + [0] * 3])
        out = model(batch, mask)
    assert torch.isfinite(out).all()  # pad query rows attend to themselves, never an empty softmax
    close(out[0, 3:], alone)
    close(out[1, :9], alone)


def test_mask_free_causal_path_only_when_exact():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert is_right_padded(right) and build_attention_mask(right, 4, None, "cpu") is None
    assert build_attention_mask(right, 4, 4, "cpu") is None  # a window >= T hides nothing
    assert build_attention_mask(right, 4, 3, "cpu") is not None
    for m in ([[0, 1, 1, 1]], [[1, 1, 2, 2]], [[1, 0, 1, 0]]):  # left pad, packed, hole
        m = torch.tensor(m)
        assert not is_right_padded(m) and build_attention_mask(m, 4, None, "cpu") is not None


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama3", "mistral_wide"])
def test_right_padded_batch_takes_causal_path_and_matches_unpadded(name):
    """Rows 1…1 0…0 run through SDPA's is_causal path (no [B, 1, T, T] mask); the real tokens
    must still equal each sequence run alone, and the pad rows stay finite."""
    cfg = dict(model_type="mistral", sliding_window=16) if name == "mistral_wide" else CONFIGS[name]
    model = make_model(**cfg)
    a, b = ids(1, 9, seed=4), ids(1, 6, seed=5)
    batch = torch.cat([a, torch.cat([b, torch.full((1, 3), 13)], 1)])
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    assert build_attention_mask(mask, 9, model.config.sliding_window, "cpu") is None
    with torch.no_grad():
        out = model(batch, mask)
        alone_a, alone_b = model(a)[0], model(b)[0]
    assert torch.isfinite(out).all()
    close(out[0], alone_a)
    close(out[1, :6], alone_b)


@pytest.mark.parametrize("name", CONFIGS)
def test_packing_invariance(name):
    model = make_model(**CONFIGS[name])
    a, b = ids(1, 5, seed=2), ids(1, 6, seed=3)
    packed = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], 1)  # [1, 13]
    segments = torch.tensor([[1] * 5 + [2] * 6 + [0] * 2])
    with torch.no_grad():
        out = model(packed, segments)
        explicit = model(packed, segments, torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 0]]))
        alone_a, alone_b = model(a)[0], model(b)[0]
    close(out[0, :5], alone_a)
    close(out[0, 5:11], alone_b)
    assert torch.equal(out, explicit)
    assert torch.isfinite(out).all()


def test_default_position_ids():
    mask = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0, 0, 0], [3, 3, 1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0, 0, 0], [0, 1, 0, 1, 2, 3, 4, 5]])
    assert torch.equal(default_position_ids(mask), expected)


def test_bool_mask_equals_int_mask():
    model = make_model()
    x = ids(2, 6)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        assert torch.equal(model(x, mask), model(x, mask.bool()))


def test_fully_padded_row_is_finite():
    model = make_model()
    with torch.no_grad():
        out = model(ids(2, 5), torch.tensor([[0] * 5, [1] * 5]))
    assert torch.isfinite(out).all()


def test_rope_hand_computed():
    # head_dim 4, theta 10000: θ = [10000^0, 10000^(-2/4)] = [1, 0.01]. Pairs are (x0, x2) and
    # (x1, x3) (half-split layout), each rotated by position · θ_i.
    cfg = tiny(hidden_size=8, num_attention_heads=2, num_key_value_heads=2)  # head_dim 4
    assert cfg.head_dim == 4
    torch.testing.assert_close(rope_inv_freq(cfg), torch.tensor([1.0, 0.01]))
    cos, sin = rope_cos_sin(cfg, torch.tensor([[3]]), torch.float64)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 4)
    out = apply_rope(x, cos, sin).flatten()
    a, b = 3 * 1.0, 3 * 0.01
    expected = torch.tensor([
        1 * math.cos(a) - 3 * math.sin(a),
        2 * math.cos(b) - 4 * math.sin(b),
        3 * math.cos(a) + 1 * math.sin(a),
        4 * math.cos(b) + 2 * math.sin(b),
    ], dtype=torch.float64)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    cfg = tiny()
    q, k = torch.randn(1, 1, 1, cfg.head_dim), torch.randn(1, 1, 1, cfg.head_dim)

    def score(pq, pk):
        cq, sq = rope_cos_sin(cfg, torch.tensor([[pq]]), torch.float32)
        ck, sk = rope_cos_sin(cfg, torch.tensor([[pk]]), torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10), atol=1e-5, rtol=0)
    assert (score(5, 2) - score(5, 4)).abs() > 1e-3


def test_llama3_scaling_hand_computed():
    # head_dim 8, theta 10000: θ = [1, 0.1, 0.01, 0.001], wavelengths 2π/θ = [6.28, 62.8, 628.3, 6283].
    # old context 1024, low 1, high 4 -> keep wavelengths < 256, divide those > 1024 by 8,
    # interpolate 628.3 with s = (1024/628.3 - 1)/(4 - 1): θ' = (1 - s)·θ/8 + s·θ.
    cfg = tiny(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=1024))
    s = (1024 / (2 * math.pi / 0.01) - 1) / 3
    expected = torch.tensor([1.0, 0.1, (1 - s) * 0.01 / 8 + s * 0.01, 0.001 / 8])
    torch.testing.assert_close(rope_inv_freq(cfg), expected, rtol=1e-6, atol=0)


def test_linear_and_dynamic_scaling_hand_computed():
    lin = tiny(hidden_size=16, num_attention_heads=2, rope_scaling=dict(rope_type="linear", factor=4.0))
    torch.testing.assert_close(rope_inv_freq(lin), torch.tensor([1.0, 0.1, 0.01, 0.001]) / 4)
    # dynamic NTK: base' = base·(f·L/M − (f − 1))^(d/(d−2)) once L > M; unchanged below
    dyn = tiny(hidden_size=16, num_attention_heads=2, max_position_embeddings=16,
               rope_scaling=dict(type="dynamic", factor=2.0))
    torch.testing.assert_close(rope_inv_freq(dyn, seq_len=16), torch.tensor([1.0, 0.1, 0.01, 0.001]))
    base = 10000 * (2 * 32 / 16 - 1) ** (8 / 6)
    expected = torch.tensor([base ** (-i / 8) for i in (0, 2, 4, 6)])
    torch.testing.assert_close(rope_inv_freq(dyn, seq_len=32), expected, rtol=1e-5, atol=0)


def test_gqa_equals_repeated_kv():
    cfg = tiny(num_attention_heads=6, num_key_value_heads=2, hidden_size=24)  # 3 query heads per kv head
    torch.manual_seed(0)
    attn = Attention(cfg, 0, FAMILIES[cfg.model_type])
    B, T, d = 2, 5, cfg.head_dim
    x = torch.randn(B, T, cfg.hidden_size)
    cos, sin = torch.ones(B, T, d), torch.zeros(B, T, d)  # position 0 everywhere: RoPE is the identity
    out = attn(x, Rope(cos, sin), None)

    q = (x @ attn.q_proj.weight.T).view(B, T, 6, d)
    k = (x @ attn.k_proj.weight.T).view(B, T, 2, d)
    v = (x @ attn.v_proj.weight.T).view(B, T, 2, d)
    causal = torch.ones(T, T).tril().bool()
    heads = []
    for h in range(6):
        g = h // 3  # query heads 0-2 read kv head 0, 3-5 read kv head 1
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(d)  # [B, T, T]
        scores = scores.masked_fill(~causal, float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, :, g])  # [B, T, d]
    expected = torch.cat(heads, -1) @ attn.o_proj.weight.T
    close(out, expected)


@pytest.mark.parametrize("masked", [False, True])
def test_gqa_without_copies_equals_repeat_interleave_fallback(monkeypatch, masked):
    """enable_gqa (no K/V copies) gives exactly the repeat_interleave path's outputs and gradients."""
    import sdpo.models.blocks as blocks

    if not blocks.SDPA_GQA:
        pytest.skip("torch < 2.5: only the repeat_interleave path exists")
    x = ids(2, 7)
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5]) if masked else None
    results = []
    for gqa in (True, False):
        monkeypatch.setattr(blocks, "SDPA_GQA", gqa)
        model = make_model(num_attention_heads=6, num_key_value_heads=2, hidden_size=24).train()
        out = model(x, mask)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (o1, g1), (o0, g0) = results
    torch.testing.assert_close(o1, o0, atol=1e-6, rtol=1e-6)
    for n in g0:  # K/V gradients are summed over the query heads in another order: fp32 ulps apart
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6 * g0[n].abs().max().item(), rtol=1e-6, msg=n)


def test_gqa_passes_unrepeated_kv_to_sdpa(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[1], k.shape[1], kw.get("enable_gqa", False)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    make_model(num_attention_heads=6, num_key_value_heads=2, hidden_size=24)(ids(1, 5))
    import sdpo.models.blocks as blocks
    assert seen and all(s == ((6, 2, True) if blocks.SDPA_GQA else (6, 6, False)) for s in seen), seen


def test_sliding_window_mask_exact():
    got = build_attention_mask(None, 6, 3, "cpu")[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ]).bool()
    assert torch.equal(got, expected)


def test_sliding_window_receptive_field():
    # One layer, window 3: a change at position 2 reaches exactly positions 2, 3, 4.
    model = make_model(model_type="mistral", sliding_window=3, num_hidden_layers=1)
    x = ids(1, 10)
    y = x.clone()
    y[0, 2] = (y[0, 2] + 1) % 50
    with torch.no_grad():
        changed = (model(x) - model(y)).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [False, False, True, True, True, False, False, False, False, False]


def test_segment_and_pad_mask_exact():
    got = build_attention_mask(torch.tensor([[0, 1, 1, 2, 2]]), 5, None, "cpu")[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0],  # pad query: itself only
        [0, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]).bool()
    assert torch.equal(got, expected)


def test_hidden_states_then_lm_head_is_forward():
    model = make_model(**CONFIGS["qwen2"])
    x = ids(2, 7)
    with torch.no_grad():
        h = model.hidden_states(x)
        assert h.shape == (2, 7, 32)
        assert torch.equal(model.lm_head(h), model(x))
    assert model.lm_head.weight is model.embed_tokens.weight


def test_rmsnorm_matches_formula_and_keeps_dtype():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = norm.weight.double() * x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x.float()).double(), expected, atol=1e-6, rtol=1e-5)
    xb = x.to(torch.bfloat16)
    normb = RMSNorm(8).to(torch.bfloat16)
    assert normb(xb).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["llama", "mistral"])
@pytest.mark.parametrize("setting", [True, 2, 3])
def test_gradient_checkpointing_same_gradients(name, setting):
    """Every block (True) or every k-th block (2, 3 of 3 layers): same loss, same gradients."""
    model = make_model(num_hidden_layers=3, **CONFIGS[name]).train()
    x = ids(2, 8)
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])

    def grads(flag):
        model.zero_grad()
        model.gradient_checkpointing = flag
        loss = F.cross_entropy(model(x, mask).flatten(0, 1), ids(2, 8, seed=9).flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss0, g0 = grads(False)
    loss1, g1 = grads(setting)
    assert torch.equal(loss0, loss1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)
    assert any(g.abs().sum() > 0 for g in g0.values())


def test_every_kth_block_is_checkpointed(monkeypatch):
    import sdpo.models.model as model_mod

    calls = []
    real = model_mod.checkpoint
    monkeypatch.setattr(model_mod, "checkpoint", lambda layer, *a, **k: calls.append(layer) or real(layer, *a, **k))
    model = make_model(num_hidden_layers=5).train()
    for setting, expected in ((False, []), (True, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3])):
        calls.clear()
        model.gradient_checkpointing = setting
        model(ids(1, 4)).sum().backward()
        assert [list(model.layers).index(layer) for layer in calls] == expected, setting
    with torch.no_grad():  # no graph, nothing to recompute
        calls.clear()
        model(ids(1, 4))
        assert calls == []


@pytest.mark.parametrize("value, k", [("none", 0), ("full", 1), (True, 1), (False, 0), ("true", 1),
                                      ("every:2", 2), ("every:1", 1), (4, 4), ("3", 3), (0, 0)])
def test_checkpoint_every_parses(value, k):
    assert checkpoint_every(value) == k


@pytest.mark.parametrize("value", ["sometimes", "every:x", "every:-1", -2, 1.5])
def test_checkpoint_every_rejects(value):
    with pytest.raises(ValueError, match="'none', 'full' or 'every:K'"):
        checkpoint_every(value)


def test_init_weights_deterministic():
    a, b, c = Transformer(tiny()), Transformer(tiny()), Transformer(tiny())
    a.init_weights(3, 0.02)
    b.init_weights(3, 0.02)
    c.init_weights(4, 0.02)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if "norm" in n:
            assert torch.equal(pa, torch.ones_like(pa))
        else:
            assert not torch.equal(pa, pc), n
            assert abs(pa.std().item() - 0.02) < 0.01, n


def test_bad_config_errors():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        tiny(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="'ntk' is not supported"):  # yarn and longrope are supported now
        tiny(rope_scaling={"rope_type": "ntk", "factor": 2.0})
    with pytest.raises(ValueError, match="unknown model_type 'gpt2'; supported: llama, mistral, qwen2, qwen3, gemma2"):
        tiny(model_type="gpt2")
    with pytest.raises(ValueError, match="attention_mask shape"):
        make_model()(ids(2, 5), torch.ones(2, 4, dtype=torch.long))
