"""sdpo.logprobs: the label shift, masking, fused forward, response-only logits."""

import math

import pytest
import torch
from torch import nn

from sdpo.data.packing import collate
from sdpo.data.pairs import TokenizedPair
from sdpo.logprobs import SequenceLogps, concatenated_forward, sequence_logps
from sdpo.models.model import ModelConfig, Transformer

IGN = -100


class BigramLM(nn.Module):
    """Logits at position t depend only on x_t: z_t = log P[x_t, :], P row-stochastic.

    V = 4, P[a, (a+1) % 4] = 1/2 and 1/6 elsewhere. Since each row of P sums to 1,
    log softmax(log P[a]) = log P[a] exactly, so log p(x_{t+1} | x_t) is log(1/2) for a
    "successor" step and log(1/6) otherwise: sums are known by construction.
    """

    def __init__(self):
        super().__init__()
        V = 4
        P = torch.full((V, V), 1 / 6, dtype=torch.float64)
        for a in range(V):
            P[a, (a + 1) % V] = 0.5
        self.embed = nn.Embedding(V, V)
        self.lm_head = nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(V))  # h_t = one-hot(x_t)
            self.lm_head.weight.copy_(P.log().T)  # lm_head(e_a) = W[:, a] = log P[a, :]

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None):
        return self.embed(input_ids)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.lm_head(self.hidden_states(input_ids))


def test_known_sums_bigram():
    """Row 0: ids 0 1 2 3 0, labels [-, -, 2, 3, 0] -> targets at t = 1, 2, 3: 1->2, 2->3, 3->0, all
    successor steps: 3·log(1/2), count 3.
    Row 1: ids 0 2 2 1 9(pad->0), labels [-, -, 2, 1, -] -> t = 1: 2|2 (1/6), t = 2: 1|2 (1/6):
    2·log(1/6), count 2. The prompt step 0->1 / 0->2 (t = 0) is not counted."""
    m = BigramLM()
    ids = torch.tensor([[0, 1, 2, 3, 0], [0, 2, 2, 1, 0]])
    labels = torch.tensor([[IGN, IGN, 2, 3, 0], [IGN, IGN, 2, 1, IGN]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    for ro in (True, False):
        out = sequence_logps(m, ids, labels, mask, response_only=ro)
        assert out.logps.tolist() == pytest.approx([3 * math.log(0.5), 2 * math.log(1 / 6)], abs=1e-6)
        assert out.counts.tolist() == [3, 2]
        assert out.mean_logps.tolist() == pytest.approx([math.log(0.5), math.log(1 / 6)], abs=1e-6)
        assert out.logps.requires_grad


def test_masked_positions_get_exactly_zero_gradient():
    """Token 3 appears only at prompt/pad positions (no target there), so lm_head's column for
    input 3 (W[:, 3]) and embedding row 3 must get exactly 0 gradient; scored inputs get non-zero."""
    for ro in (True, False):
        m = BigramLM()
        ids = torch.tensor([[3, 0, 1, 2, 3]])
        labels = torch.tensor([[IGN, IGN, 1, 2, IGN]])  # targets at t = 1 (input 0), t = 2 (input 1)
        out = sequence_logps(m, ids, labels, response_only=ro)
        out.logps.sum().backward()
        g = m.lm_head.weight.grad  # [V_out, H]; column a receives gradient only from inputs a
        assert torch.equal(g[:, 3], torch.zeros(4)) and torch.equal(g[:, 2], torch.zeros(4))
        assert g[:, 0].abs().sum() > 0 and g[:, 1].abs().sum() > 0
        assert torch.equal(m.embed.weight.grad[3], torch.zeros(4))


def test_logit_gradient_zero_at_unscored_positions_full_path():
    """Full-logits path: ∂logps/∂z_t is exactly 0 where labels[t+1] is ignored (and at t = T-1)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)

    class Fixed(nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return logits

    labels = torch.tensor([[IGN, IGN, 4, 5, IGN, IGN], [IGN, 1, 2, 3, 4, 10]])
    out = sequence_logps(Fixed(), torch.zeros(2, 6, dtype=torch.long), labels, response_only=False)
    (out.logps * torch.tensor([0.7, -1.3])).sum().backward()
    scored = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(logits.grad[~scored], torch.zeros_like(logits.grad[~scored]))
    assert (logits.grad[scored].abs().sum(-1) > 0).all()
    # And the value is eq. (1) written out: Σ log_softmax(z_t)[labels[t+1]].
    lp = torch.log_softmax(logits.detach().double(), -1)
    want0 = lp[0, 1, 4] + lp[0, 2, 5]
    want1 = lp[1, 0, 1] + lp[1, 1, 2] + lp[1, 2, 3] + lp[1, 3, 4] + lp[1, 4, 10]
    assert out.logps.tolist() == pytest.approx([want0.item(), want1.item()], abs=1e-5)


# ---- the real Transformer -------------------------------------------------------------------

def _tiny_model(seed=0):
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    m = Transformer(cfg)
    m.init_weights(seed=seed, std=0.2)  # larger than default so log-probs differ visibly across tokens
    return m


PAD = 0


def _collate(pairs, extra_pad=0, left=False):
    """pairs: [(prompt, chosen, rejected)] id lists -> [2B, T] batch, chosen rows first."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    T = max(len(p) + len(r) for p, r in rows) + extra_pad
    ids, labels, mask = [], [], []
    for p, r in rows:
        seq = p + r
        lab = [IGN] * len(p) + r
        pad = T - len(seq)
        if left:
            ids.append([PAD] * pad + seq); labels.append([IGN] * pad + lab); mask.append([0] * pad + [1] * len(seq))
        else:
            ids.append(seq + [PAD] * pad); labels.append(lab + [IGN] * pad); mask.append([1] * len(seq) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def _pairs(seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(1, 97, (n,), generator=g).tolist()  # noqa: E731
    return [(rnd(5 + 3 * i), rnd(4 + i), rnd(7 - 2 * i)) for i in range(B)]


def test_fused_equals_two_separate_forwards():
    """Tolerance 1e-6 relative (+1e-6 absolute): sums here are ~10-40 nats, where one float32 ulp is
    2e-6-4e-6, and the two paths pad to different T (different matmul blocking), so bitwise
    equality is not expected; a row swap or a wrong shift is off by whole nats."""
    m = _tiny_model()
    pairs = _pairs()
    with torch.no_grad():
        chosen, rejected = concatenated_forward(m, _collate(pairs))
        # Separately: chosen rows alone, rejected rows alone, each padded only to its own max.
        c_batch = _collate([(p, c, c) for p, c, _ in pairs])
        r_batch = _collate([(p, r, r) for p, _, r in pairs])
        B = len(pairs)
        c_sep = sequence_logps(m, c_batch["input_ids"][:B], c_batch["labels"][:B], c_batch["attention_mask"][:B])
        r_sep = sequence_logps(m, r_batch["input_ids"][:B], r_batch["labels"][:B], r_batch["attention_mask"][:B])
    for fused, sep in ((chosen, c_sep), (rejected, r_sep)):
        assert fused.logps.shape == (B,)
        assert torch.allclose(fused.logps, sep.logps, atol=1e-6, rtol=1e-6), (fused.logps, sep.logps)
        assert torch.equal(fused.counts, sep.counts)
    assert chosen.counts.tolist() == [len(c) for _, c, _ in pairs]
    assert rejected.counts.tolist() == [len(r) for _, _, r in pairs]
    # A wrong half (e.g. swapped) would differ: the responses differ, so the sums do.
    assert not torch.allclose(chosen.logps, rejected.logps, atol=1e-3)


@pytest.mark.parametrize("left", [False, True])
def test_extra_padding_changes_nothing(left):
    m = _tiny_model(seed=1)
    pairs = _pairs(seed=2)
    with torch.no_grad():
        base = concatenated_forward(m, _collate(pairs))
        padded = concatenated_forward(m, _collate(pairs, extra_pad=5, left=left))
    for a, b in zip(base, padded):
        assert torch.allclose(a.logps, b.logps, atol=1e-6, rtol=1e-6), (a.logps, b.logps)  # see above
        assert torch.equal(a.counts, b.counts)


@pytest.mark.parametrize("fused", [True, False, "model attribute"])
def test_response_only_equals_full_logits_values_and_gradients(fused):
    """The response-only path, fused (kernels.linear_token_logprobs) or not (lm_head, then the
    in-place-backward kernel), gives the full path's values and parameter gradients."""
    pairs = _pairs(seed=3)
    batch = _collate(pairs)
    results = []
    for ro in (True, False):
        m = _tiny_model(seed=4)
        kwargs = {}
        if fused == "model attribute":  # how run.py passes model.fused_logprobs
            m.fused_logprobs = False
        elif ro:
            kwargs["fused"] = fused
        c, r = concatenated_forward(m, batch, response_only=ro, **kwargs)
        loss = (c.logps * 0.3 - r.logps * 1.7).sum()  # an upstream gradient that is not all ones
        loss.backward()
        results.append((c, r, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (c1, r1, g1), (c2, r2, g2) = results
    for a, b in ((c1, c2), (r1, r2)):
        assert torch.allclose(a.logps, b.logps, atol=1e-5, rtol=1e-6)
        assert torch.equal(a.counts, b.counts)
    for n in g1:
        assert g1[n].abs().sum() > 0, n
        assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=1e-5), n


def test_fused_path_builds_no_rv_logits(monkeypatch):
    """fused=True never calls lm_head (so no [R, V] logits); fused=False does."""
    m = _tiny_model(seed=4)
    calls = []
    monkeypatch.setattr(m.lm_head, "forward", lambda x: calls.append(x.shape) or torch.nn.functional.linear(
        x, m.lm_head.weight))
    batch = _collate(_pairs(seed=3))
    concatenated_forward(m, batch)
    assert calls == []
    concatenated_forward(m, batch, fused=False)
    assert len(calls) == 1


def test_inplace_backward_is_safe_with_tied_embeddings():
    """Tied lm_head/embedding: the weight gets gradient from both uses; still equal to the full path."""
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, tie_word_embeddings=True)
    batch = _collate(_pairs(seed=5, B=2))
    grads = []
    for ro, fused in ((True, True), (True, False), (False, None)):
        m = Transformer(cfg)
        m.init_weights(seed=6, std=0.2)
        c, r = concatenated_forward(m, batch, response_only=ro, fused=fused)
        (c.logps - r.logps).sum().backward()
        grads.append(m.embed_tokens.weight.grad.clone())
    assert torch.allclose(grads[0], grads[2], atol=1e-6, rtol=1e-5)
    assert torch.allclose(grads[1], grads[2], atol=1e-6, rtol=1e-5)


def test_errors():
    m = BigramLM()
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels has shape"):
        sequence_logps(m, ids, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be a \[N, T\]"):
        sequence_logps(m, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="expected 2B"):
        odd = torch.zeros(3, 4, dtype=torch.long)
        concatenated_forward(m, {"input_ids": odd, "labels": odd})
    with pytest.raises(KeyError, match="labels"):
        concatenated_forward(m, {"input_ids": ids})
    with pytest.raises(TypeError, match="response_only=False"):
        sequence_logps(nn.Linear(2, 2), ids, ids)


def test_no_response_tokens_gives_zero():
    m = BigramLM()
    ids = torch.tensor([[0, 1, 2]])
    out = sequence_logps(m, ids, torch.full((1, 3), IGN))
    assert out.logps.tolist() == [0.0] and out.counts.tolist() == [0]
    assert isinstance(out, SequenceLogps)


def test_with_data_collate_batch():
    """sdpo.data.packing.collate's batch (with position_ids and an `index` key) goes straight in, and
    pad_to_multiple_of (more padding) changes nothing."""
    pairs = [TokenizedPair(p, c, r, index=i) for i, (p, c, r) in enumerate(_pairs(seed=7))]
    m = _tiny_model(seed=8)
    with torch.no_grad():
        a = concatenated_forward(m, collate(pairs, pad_id=PAD))
        b = concatenated_forward(m, collate(pairs, pad_id=PAD, pad_to_multiple_of=32))
        mine = concatenated_forward(m, _collate([(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]))
    for x, y, z in zip(a, b, mine):
        assert torch.allclose(x.logps, y.logps, atol=1e-6, rtol=1e-6)
        assert torch.allclose(x.logps, z.logps, atol=1e-6, rtol=1e-6)
        assert torch.equal(x.counts, z.counts)


def test_gradient_checkpointing_gives_same_gradients():
    """Activation checkpointing recomputes the blocks in backward; the response-only path (whose
    logits buffer is overwritten in backward) must still give the same gradients."""
    batch = _collate(_pairs(seed=9, B=2))
    grads = []
    for ckpt in (False, True):
        m = _tiny_model(seed=10)
        m.gradient_checkpointing = ckpt
        c, r = concatenated_forward(m, batch)
        (c.logps - 0.5 * r.logps).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
