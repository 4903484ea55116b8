"""The loss taken pair by pair inside the fused lm_head (kernels/fused_loss.py, sdpo.logprobs.packed_pair_loss)
against plain autograd over full logits, and against the unfused packed path it replaces."""

from __future__ import annotations

import pytest
import torch

from kernels.fused_loss import FusedLinearGroupLoss, chunks_of_groups
from sdpo.data.packing import pack
from sdpo.data.pairs import TokenizedPair
from sdpo.logprobs import packed_forward, packed_pair_loss, pair_loss_fusable
from sdpo.loss import preference_loss
from sdpo.models.model import ModelConfig, Transformer


def test_chunks_of_groups():
    assert chunks_of_groups([0, 3, 5, 9, 20, 22], 6) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert chunks_of_groups([0, 3, 5, 9, 20, 22], 100) == [(0, 5)]
    assert chunks_of_groups([0, 7, 8], 6) == [(0, 1), (1, 2)]   # a group over the budget alone
    assert chunks_of_groups([0], 6) == []


def _group_loss_reference(hidden, weight, targets, bounds, loss_of, ignore_index=-100):
    logp = torch.log_softmax(hidden @ weight.t(), dim=-1)
    valid = targets != ignore_index
    lp = torch.where(valid, logp.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1), 0.0)
    return sum(loss_of(k, lp[bounds[k]:bounds[k + 1]]) for k in range(len(bounds) - 1)), lp


def _loss_of(k, lp):   # a nonlinear loss of each group's sums, different per group
    return torch.nn.functional.softplus(-(0.3 + 0.1 * k) * (lp[: len(lp) // 2].sum() - lp[len(lp) // 2:].sum()))


@pytest.mark.parametrize("rows", [4, 9, 64])   # groups over the budget (the recompute), mixed, all in one chunk
def test_group_loss_equals_autograd(rows):
    torch.manual_seed(0)
    V, H = 37, 8
    bounds = [0, 5, 6, 14, 17, 29]
    R = bounds[-1]
    hidden = torch.randn(R, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (R,))
    targets[[2, 15]] = -100   # ignored rows: no log-prob, no gradient
    want, want_lp = _group_loss_reference(hidden, weight, targets, bounds, _loss_of)
    gh, gw = torch.autograd.grad(want * 0.7, (hidden, weight))
    got, lp = FusedLinearGroupLoss.apply(hidden, weight, targets, bounds, _loss_of, -100, rows, 0.7)
    assert not lp.requires_grad
    torch.testing.assert_close(lp, want_lp.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-12)
    (got * 0.7).backward()   # the grad_scale it was taken with
    torch.testing.assert_close(hidden.grad, gh, rtol=0, atol=1e-12)
    torch.testing.assert_close(weight.grad, gw, rtol=0, atol=1e-12)
    assert hidden.grad[[2, 15]].abs().max() == 0 and hidden.grad.abs().min(dim=1).values.max() > 0



def test_long_group_recomputes_only_rows_beyond_one_buffer():
    """A 12-row group over a 9-row buffer: pieces of 3 then 9 rows; the 9-row piece's logits stay in the
    buffer, so only 3 rows' logits are computed twice (15 rows of logits GEMM, not 24)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LogitRows(TorchDispatchMode):   # rows of every [n, V] product (the logits GEMM's output)
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.mm.out and out.shape[-1] == V:
                self.rows += out.shape[0]
            return out

    torch.manual_seed(2)
    V, H, R = 37, 8, 12
    hidden = torch.randn(R, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (R,))
    want, _ = _group_loss_reference(hidden, weight, targets, [0, R], _loss_of)
    gh, gw = torch.autograd.grad(want, (hidden, weight))
    with LogitRows() as counted:
        got, _ = FusedLinearGroupLoss.apply(hidden, weight, targets, [0, R], _loss_of, -100, 9, 1.0)
        got.backward()
    assert counted.rows == R + 3
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(hidden.grad, gh, rtol=0, atol=1e-12)
    torch.testing.assert_close(weight.grad, gw, rtol=0, atol=1e-12)

def test_group_loss_other_incoming_gradient_and_frozen_weight():
    torch.manual_seed(1)
    V, H, bounds = 23, 6, [0, 4, 10, 13]
    hidden = torch.randn(13, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64)   # frozen (LoRA's lm_head)
    targets = torch.randint(0, V, (13,))
    want, _ = _group_loss_reference(hidden, weight, targets, bounds, _loss_of)
    (gh,) = torch.autograd.grad(want * 2.5, (hidden,))
    got, _ = FusedLinearGroupLoss.apply(hidden, weight, targets, bounds, _loss_of, -100, 8, 0.5)
    (got * 2.5).backward()   # not the grad_scale: the stored gradients are rescaled
    torch.testing.assert_close(hidden.grad, gh, rtol=1e-12, atol=1e-12)


def _tiny_model(V=300):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))


def _pairs(V, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, V, (k,), generator=g).tolist()  # noqa: E731
    sizes = [(7, 9, 4), (3, 12, 11), (10, 5, 6), (1, 8, 8), (6, 3, 14)][:n]
    return [TokenizedPair(ids(p), ids(c), ids(r), i) for i, (p, c, r) in enumerate(sizes)]


CASES = [("sigmoid", {}), ("ipo", {"lengths": True}), ("sigmoid", {"rpo_alpha": 0.5}), ("simpo", {"lengths": True})]


@pytest.mark.parametrize("share_prompt", [True, False])   # pairs contiguous in [R], or gathered pair by pair
@pytest.mark.parametrize("loss_type,opts", CASES)
def test_packed_pair_loss_equals_unfused(share_prompt, loss_type, opts, monkeypatch):
    V = 300
    model, pairs = _tiny_model(V), _pairs(V)
    batch = pack(pairs, pad_id=0, share_prompt=share_prompt, rows="one")
    B = len(pairs)
    ref_c, ref_r = -40 + torch.randn(B), -40 + torch.randn(B)
    scale = 0.37

    def losses_of(c, r, rc, rr):
        lengths = opts.get("lengths")
        return preference_loss(c.logps, r.logps, rc, rr, loss_type=loss_type, beta=0.1,
                               rpo_alpha=opts.get("rpo_alpha"),
                               policy_chosen_nll=-c.mean_logps if opts.get("rpo_alpha") else None,
                               chosen_lengths=c.counts if lengths else None,
                               rejected_lengths=r.counts if lengths else None)[0]

    c0, r0 = packed_forward(model, batch)
    (losses_of(c0, r0, ref_c, ref_r).sum() * scale).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # small chunks: some pairs alone, one over the budget (the recompute branch)
    monkeypatch.setattr("sdpo.logprobs.rows_per_chunk", lambda R, V, c, d: 20)
    loss, c1, r1 = packed_pair_loss(model, batch, lambda i, c, r: losses_of(c, r, ref_c[i:i + 1], ref_r[i:i + 1]),
                                    scale)
    (loss * scale).backward()
    assert torch.equal(c1.logps, c0.logps.detach()) and torch.equal(r1.logps, r0.logps.detach())
    torch.testing.assert_close(loss, losses_of(c0, r0, ref_c, ref_r).sum().detach(), rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=n)


def test_fusable_only_where_it_applies():
    model, pairs = _tiny_model(), _pairs(300, 3)
    packed = pack(pairs, pad_id=0, rows="one")
    assert pair_loss_fusable(model, packed)
    with torch.no_grad():
        assert not pair_loss_fusable(model, packed)   # evaluation: no gradient to take
    model.fused_loss = False
    assert not pair_loss_fusable(model, packed)
    model.fused_loss = True
    assert not pair_loss_fusable(model, {k: v for k, v in packed.items() if k != "doc_ids"})   # padded rows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not pair_loss_fusable(model, packed)
    model.to(torch.float64)
    assert not pair_loss_fusable(model, packed)


@pytest.mark.parametrize("loss_type,fused", [("sigmoid", True), ("ipo", True), ("bco_pair", False), ("aot", False)])
def test_dpo_micro_loss_takes_the_fused_path_where_it_applies(loss_type, fused, monkeypatch):
    """The training step's loss: the same stats and (to float32 rounding) gradients with model.fused_loss on and
    off; the fused path taken for pair-separable types only (bco_pair's mean reward and aot's sort read the batch)."""
    import sdpo.loop as loop
    from sdpo.runtime.config import Config

    cfg = Config()
    cfg.loss.type = loss_type
    V = 300
    model, pairs = _tiny_model(V), _pairs(V)
    batch = pack(pairs, pad_id=0, rows="one")
    batch["loss_scale"] = 0.25
    ref = (-40 + torch.randn(len(pairs)), -40 + torch.randn(len(pairs)))
    calls = []
    real = loop.packed_pair_loss
    monkeypatch.setattr(loop, "packed_pair_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = {}
    for on in (False, True):
        model.fused_loss = on
        model.zero_grad()
        loss, stats = loop.dpo_micro_loss(cfg, model, batch, *ref)
        (loss * 0.25).backward()
        out[on] = stats, {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(calls) == (1 if fused else 0)
    assert torch.equal(out[True][0], out[False][0])   # loss sum, rewards, accuracies, margins, log-probs
    for n, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], g, rtol=1e-5, atol=1e-7, msg=n)
