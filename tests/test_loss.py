"""Closed-form checks of sdpo.loss. Expected values are worked by hand (math module only)."""

import math

import pytest
import torch

from sdpo.loss import LOSS_TYPES, NEEDS_LENGTHS, NEEDS_NLL, REFERENCE_FREE_TYPES, preference_loss

# Types that are functions of (ρ_w, ρ_l) alone; the others have their own tests below.
PAIR_TYPES = [t for t in LOSS_TYPES if t not in NEEDS_NLL | NEEDS_LENGTHS | {"aot"}]


def _t(*xs, dtype=torch.float32, grad=False):
    return torch.tensor(xs, dtype=dtype, requires_grad=grad)


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_loss_types_listed():
    assert set(LOSS_TYPES) == {
        "sigmoid", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down", "sft",
        "bco_pair", "aot", "aot_pair", "discopop", "simpo", "cpo", "orpo",
    }
    assert REFERENCE_FREE_TYPES == {"simpo", "cpo", "orpo"}


def test_sigmoid_policy_equals_reference_is_ln2_with_gradient_minus_beta_over_2():
    """π = π_ref ⇒ h = 0 ⇒ L = -log σ(0) = ln 2.
    ∂L/∂π_c = -β σ(-βh) = -β/2 at h = 0; ∂L/∂π_r = +β/2."""
    beta = 0.3
    pc, pr = _t(-12.0, -3.5, grad=True), _t(-20.0, -7.25, grad=True)
    losses, cr, rr = preference_loss(pc, pr, pc.detach().clone(), pr.detach().clone(), beta=beta)
    assert torch.allclose(losses, torch.full((2,), math.log(2)), atol=1e-7)
    losses.sum().backward()
    assert torch.allclose(pc.grad, torch.full((2,), -beta / 2), atol=1e-7)
    assert torch.allclose(pr.grad, torch.full((2,), beta / 2), atol=1e-7)
    assert torch.equal(cr, torch.zeros(2)) and torch.equal(rr, torch.zeros(2))


# (loss_type, β, ρ_w, ρ_l, ε, expected) with ρ = policy - reference log-prob, h = ρ_w - ρ_l.
CLOSED_FORM = [
    # DPO: -log σ(βh). βh = 0.5·2 = 1 -> log(1 + e^-1); βh = -1 -> log(1 + e).
    ("sigmoid", 0.5, 1.0, -1.0, 0.0, math.log1p(math.exp(-1))),
    ("sigmoid", 0.5, -1.0, 1.0, 0.0, math.log1p(math.e)),
    ("sigmoid", 0.1, 3.0, 3.0, 0.0, math.log(2)),
    # cDPO, ε = 0.1, βh = 1: 0.9·log(1+e^-1) + 0.1·log(1+e).
    ("sigmoid", 0.5, 1.0, -1.0, 0.1, 0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.e)),
    # rDPO, ε = 0.1, βh = 1: (0.9·log(1+e^-1) - 0.1·log(1+e)) / 0.8.
    ("robust", 0.5, 1.0, -1.0, 0.1, (0.9 * math.log1p(math.exp(-1)) - 0.1 * math.log1p(math.e)) / 0.8),
    # rDPO at h = 0: (0.9 - 0.1)·ln2 / 0.8 = ln 2 (any ε).
    ("robust", 0.5, 2.0, 2.0, 0.3, math.log(2)),
    ("robust", 0.5, -1.0, 1.0, 0.0, math.log1p(math.e)),
    # IPO: (h - 1/(2β))². β = 0.5 -> target 1. h = 1 -> 0; h = 3 -> 4; h = -1 -> 4.
    ("ipo", 0.5, 0.5, -0.5, 0.0, 0.0),
    ("ipo", 0.5, 2.0, -1.0, 0.0, 4.0),
    ("ipo", 0.5, -1.0, 0.0, 0.0, 4.0),
    # hinge: relu(1 - βh). βh = 0.25 -> 0.75; βh = 2 -> 0; βh = -1 -> 2.
    ("hinge", 0.25, 1.0, 0.0, 0.0, 0.75),
    ("hinge", 0.5, 3.0, -1.0, 0.0, 0.0),
    ("hinge", 0.5, -1.0, 1.0, 0.0, 2.0),
    # EXO pair: σ(βh)(log σ(βh) - log(1-ε)) + σ(-βh)(log σ(-βh) - log ε).
    # h = 0: ½(-ln2 - ln(1-ε)) + ½(-ln2 - ln ε); ε = 0 means ε = 1e-3.
    ("exo_pair", 0.5, 1.0, 1.0, 0.0, 0.5 * (-math.log(2) - math.log(0.999)) + 0.5 * (-math.log(2) - math.log(1e-3))),
    ("exo_pair", 0.5, 1.0, -1.0, 0.2,
     _sig(1) * (_logsig(1) - math.log(0.8)) + _sig(-1) * (_logsig(-1) - math.log(0.2))),
    # NCA pair: -log σ(βρ_w) - ½ log σ(-βρ_w) - ½ log σ(-βρ_l). All zero -> ln2 + ½ln2 + ½ln2 = 2 ln 2.
    ("nca_pair", 0.5, 0.0, 0.0, 0.0, 2 * math.log(2)),
    # βρ_w = 1, βρ_l = -1: log(1+e^-1) + ½ log(1+e) + ½ log(1+e^-1).
    ("nca_pair", 0.5, 2.0, -2.0, 0.0, 1.5 * math.log1p(math.exp(-1)) + 0.5 * math.log1p(math.e)),
    # SPPO hard: (ρ_w - 1/(2β))² + (ρ_l + 1/(2β))². β = 0.5: targets ±1.
    ("sppo_hard", 0.5, 1.0, -1.0, 0.0, 0.0),
    ("sppo_hard", 0.5, 0.0, 0.0, 0.0, 2.0),
    ("sppo_hard", 0.25, 3.0, 1.0, 0.0, 1.0 + 9.0),
    # APO-zero: -σ(βρ_w) + σ(βρ_l). 0,0 -> 0; βρ_w = 1, βρ_l = -1 -> -σ(1) + σ(-1).
    ("apo_zero", 0.5, 0.0, 0.0, 0.0, 0.0),
    ("apo_zero", 0.5, 2.0, -2.0, 0.0, -_sig(1) + _sig(-1)),
    # APO-down: σ(βρ_w) - σ(β(ρ_w - ρ_l)). 0,0 -> 0; βρ_w = 1, βρ_l = -1 -> σ(1) - σ(2).
    ("apo_down", 0.5, 0.0, 0.0, 0.0, 0.0),
    ("apo_down", 0.5, 2.0, -2.0, 0.0, _sig(1) - _sig(2)),
    # BCO pair, one pair: δ = mean(βρ_w, βρ_l); -log σ(βρ_w - δ) - log σ(δ - βρ_l).
    # βρ_w = 0.5, βρ_l = -0.5 -> δ = 0 -> 2·log(1 + e^-0.5); βρ_w = 1.5, βρ_l = 0.5 -> δ = 1, the same.
    ("bco_pair", 0.5, 1.0, -1.0, 0.0, 2 * math.log1p(math.exp(-0.5))),
    ("bco_pair", 0.5, 3.0, 1.0, 0.0, 2 * math.log1p(math.exp(-0.5))),
    # AOT pair, one pair: the sorted difference is h itself -> the cDPO loss of βh.
    ("aot_pair", 0.5, 1.0, -1.0, 0.1, 0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.e)),
    # DiscoPOP (τ = 0.05): ρ = βh. ρ = 0 -> ½·ln 2 + ½·e^0 = ½ ln 2 + ½.
    ("discopop", 0.5, 1.0, 1.0, 0.0, 0.5 * math.log(2) + 0.5),
    # ρ = 1: σ(-20)·log(1 + e^-1) + σ(20)·e^-1.
    ("discopop", 0.5, 1.0, -1.0, 0.0, _sig(-20) * math.log1p(math.exp(-1)) + _sig(20) * math.exp(-1)),
    # ρ = -2: σ(40)·log(1 + e^2) + σ(-40)·e^2.
    ("discopop", 1.0, -1.0, 1.0, 0.0, _sig(40) * math.log1p(math.exp(2)) + _sig(-40) * math.exp(2)),
]


@pytest.mark.parametrize("loss_type,beta,rho_w,rho_l,eps,expected", CLOSED_FORM)
def test_closed_form_values(loss_type, beta, rho_w, rho_l, eps, expected):
    # Same log-ratios reached through non-trivial reference values.
    ref_c, ref_r = _t(-7.0, dtype=torch.float64), _t(-11.0, dtype=torch.float64)
    pc, pr = ref_c + rho_w, ref_r + rho_l
    losses, cr, rr = preference_loss(pc, pr, ref_c, ref_r, loss_type=loss_type, beta=beta, label_smoothing=eps)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    assert cr.item() == pytest.approx(beta * rho_w) and rr.item() == pytest.approx(beta * rho_l)


def test_ipo_minimum_is_at_half_inverse_beta():
    """L(h) = (h - 1/(2β))² has its only zero and zero gradient at h = 1/(2β) = 2.5 for β = 0.2."""
    beta = 0.2
    hs = torch.linspace(0.0, 5.0, 501, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros_like(hs)
    losses, _, _ = preference_loss(hs, zeros, zeros, zeros, loss_type="ipo", beta=beta)
    i = int(losses.argmin())
    assert hs[i].item() == pytest.approx(2.5, abs=1e-12)
    assert losses[i].item() == pytest.approx(0.0, abs=1e-20)
    losses.sum().backward()
    assert hs.grad[i].item() == pytest.approx(0.0, abs=1e-12)
    assert (hs.grad[:i] < 0).all() and (hs.grad[i + 1 :] > 0).all()


def test_label_smoothing_zero_is_plain_dpo_and_robust_matches_at_zero():
    """cDPO and rDPO both reduce to -log σ(βh) at ε = 0."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    h = (pc - rc) - (pr - rr)
    dpo = torch.tensor([-_logsig(0.1 * x) for x in h.tolist()], dtype=torch.float64)
    for lt in ("sigmoid", "robust"):
        losses, _, _ = preference_loss(pc, pr, rc, rr, loss_type=lt, beta=0.1, label_smoothing=0.0)
        assert torch.allclose(losses, dpo, atol=1e-12, rtol=0)


def test_cdpo_and_robust_formulas_at_eps_0_1():
    """ε = 0.1, β = 0.1, ℓ(z) = -log σ(z):
    cDPO = 0.9·ℓ(βh) + 0.1·ℓ(-βh); rDPO = (0.9·ℓ(βh) - 0.1·ℓ(-βh))/0.8."""
    h = [-30.0, -2.0, 0.0, 1.5, 40.0]
    zeros = torch.zeros(5, dtype=torch.float64)
    pc = torch.tensor(h, dtype=torch.float64)
    ell = lambda z: -_logsig(z)  # noqa: E731
    cdpo = [0.9 * ell(0.1 * x) + 0.1 * ell(-0.1 * x) for x in h]
    rdpo = [(0.9 * ell(0.1 * x) - 0.1 * ell(-0.1 * x)) / 0.8 for x in h]
    got_c, _, _ = preference_loss(pc, zeros, zeros, zeros, loss_type="sigmoid", label_smoothing=0.1)
    got_r, _, _ = preference_loss(pc, zeros, zeros, zeros, loss_type="robust", label_smoothing=0.1)
    assert got_c.tolist() == pytest.approx(cdpo, abs=1e-12)
    assert got_r.tolist() == pytest.approx(rdpo, abs=1e-12)


# bco_pair's shift δ is a detached batch statistic (a constant to the gradient, as the paper's
# moving average is), so finite differences disagree by design: its gradient is tested by hand.
GRADCHECK_CASES = [(t, 0.0) for t in [t for t in PAIR_TYPES if t != "bco_pair"] + [("sigmoid", "sft"), "sft"]] + [
    (t, 0.15) for t in ("sigmoid", "robust", "exo_pair", ("sigmoid", "sft"))  # the types that use ε
]


@pytest.mark.parametrize("loss_type,eps", GRADCHECK_CASES)
def test_gradcheck_float64(loss_type, eps):
    g = torch.Generator().manual_seed(1)
    # Away from hinge's kink at βh = 1 (relu is not differentiable there).
    args = [(torch.randn(4, generator=g, dtype=torch.float64) * 3).requires_grad_() for _ in range(5)]

    def f(pc, pr, rc, rr, nll):
        return preference_loss(
            pc, pr, rc, rr, loss_type=loss_type, beta=0.7, label_smoothing=eps, policy_chosen_nll=nll,
            loss_weights=None if isinstance(loss_type, str) else (1.0, 0.5),
        )[0]

    assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("loss_type", PAIR_TYPES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_margins_stay_finite(loss_type, sign):
    """Log-ratios of ±1e4 in float32: log(sigmoid(-1e4)) would be log(0) = -inf."""
    eps = 0.1 if loss_type in ("sigmoid", "robust", "exo_pair") else 0.0
    pc = torch.tensor([sign * 1e4, sign * 5e3], requires_grad=True)
    pr = torch.tensor([-sign * 1e4, 0.0], requires_grad=True)
    zeros = torch.zeros(2)
    losses, _, _ = preference_loss(pc, pr, zeros, zeros, loss_type=loss_type, beta=1.0, label_smoothing=eps)
    losses.sum().backward()
    assert torch.isfinite(losses).all(), losses
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_extreme_sigmoid_values():
    """βh = -2e4 -> -log σ(-2e4) = 2e4 exactly in float32; βh = +2e4 -> 0; grad -β·σ(-βh) = -1, 0."""
    pc = torch.tensor([-1e4, 1e4], requires_grad=True)
    pr = torch.tensor([1e4, -1e4])
    z = torch.zeros(2)
    losses, _, _ = preference_loss(pc, pr, z, z, beta=1.0)
    assert losses.tolist() == [2e4, 0.0]
    losses.sum().backward()
    assert pc.grad.tolist() == [-1.0, 0.0]


def test_reference_free_takes_reference_as_zero():
    pc, pr = _t(-3.0, -1.0), _t(-5.0, -0.5)
    z = torch.zeros(2)
    for lt in PAIR_TYPES:
        a = preference_loss(pc, pr, None, None, loss_type=lt, reference_free=True)
        b = preference_loss(pc, pr, z, z, loss_type=lt)
        # Passing real reference values is ignored in reference-free mode.
        c = preference_loss(pc, pr, pc + 1, pr - 2, loss_type=lt, reference_free=True)
        for x, y, w in zip(a, b, c):
            assert torch.equal(x, y) and torch.equal(x, w)
    # β·ρ with ρ = π: -0.3, -0.1.
    _, cr, _ = preference_loss(pc, pr, None, None, reference_free=True, beta=0.1)
    assert cr.tolist() == pytest.approx([-0.3, -0.1])


def test_rpo_adds_alpha_times_nll():
    """RPO: L = -log σ(βh) + α·NLL. h = 0 ⇒ ln 2 + 0.5·2.0 = ln 2 + 1."""
    z = torch.zeros(1)
    nll = torch.tensor([2.0], requires_grad=True)
    losses, _, _ = preference_loss(z, z, z, z, policy_chosen_nll=nll, rpo_alpha=0.5)
    assert losses.item() == pytest.approx(math.log(2) + 1.0)
    losses.sum().backward()
    assert nll.grad.item() == pytest.approx(0.5)


def test_sft_and_combined_types_are_weighted_sums():
    """("sigmoid", "ipo") with weights (2, 0.5) at β = 0.5, h = 1: 2·log(1+e^-0.5) + 0.5·(1-1)² ; sft = NLL."""
    pc, pr, z = _t(1.0), _t(0.0), torch.zeros(1)
    nll = _t(3.0)
    got, _, _ = preference_loss(pc, pr, z, z, loss_type=("sigmoid", "ipo"), loss_weights=(2.0, 0.5), beta=0.5)
    assert got.item() == pytest.approx(2 * math.log1p(math.exp(-0.5)), abs=1e-6)
    got, _, _ = preference_loss(pc, pr, z, z, loss_type="sft", policy_chosen_nll=nll)
    assert got.item() == 3.0
    got, _, _ = preference_loss(pc, pr, z, z, loss_type=["hinge", "sft"], policy_chosen_nll=nll, beta=0.5)
    assert got.item() == pytest.approx(0.5 + 3.0)


def test_ipo_length_normalised():
    """β = 0.5 (target 1). ρ_w = 6 over 3 tokens = 2, ρ_l = -2 over 2 tokens = -1 ⇒ h = 3 ⇒ (3-1)² = 4.
    Summed: h = 8 ⇒ 49. Rewards stay on sums: β·6 = 3, β·(-2) = -1."""
    pc, pr, z = _t(6.0), _t(-2.0), torch.zeros(1)
    got, cr, rr = preference_loss(pc, pr, z, z, loss_type="ipo", beta=0.5,
                                  chosen_lengths=torch.tensor([3]), rejected_lengths=torch.tensor([2]))
    assert got.item() == pytest.approx(4.0)
    assert cr.item() == 3.0 and rr.item() == -1.0
    got, _, _ = preference_loss(pc, pr, z, z, loss_type="ipo", beta=0.5)
    assert got.item() == pytest.approx(49.0)
    # Lengths do not touch the other types.
    a, _, _ = preference_loss(pc, pr, z, z, chosen_lengths=torch.tensor([3]), rejected_lengths=torch.tensor([2]))
    b, _, _ = preference_loss(pc, pr, z, z)
    assert torch.equal(a, b)


def test_rewards_are_detached():
    pc, pr = _t(-1.0, grad=True), _t(-2.0, grad=True)
    rc, rr = _t(-1.5), _t(-1.0)
    losses, cr, rrw = preference_loss(pc, pr, rc, rr, beta=0.25)
    assert not cr.requires_grad and not rrw.requires_grad and losses.requires_grad
    assert cr.item() == pytest.approx(0.125) and rrw.item() == pytest.approx(-0.25)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="dpo"), r"unknown loss_type 'dpo'.*'sigmoid'.*'apo_down'"),
        (dict(loss_type=()), "empty"),
        (dict(loss_type=("sigmoid", "sigmoid")), "twice"),
        (dict(beta=0.0), "beta must be"),
        (dict(beta=-1.0), "beta must be"),
        (dict(beta=float("inf")), "beta must be"),
        (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
        (dict(label_smoothing=-0.1), r"label_smoothing must be in"),
        (dict(loss_type="ipo", label_smoothing=0.1), "no effect"),
        (dict(loss_type="sft"), "needs policy_chosen_nll"),
        (dict(rpo_alpha=1.0), "needs policy_chosen_nll"),
        (dict(loss_type=("sigmoid", "ipo"), loss_weights=(1.0,)), "loss_weights has 1"),
        (dict(chosen_lengths=torch.ones(3)), "both"),
        (dict(chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(2)), "rejected_lengths must be"),
        (dict(chosen_lengths=torch.tensor([1, 0, 2]), rejected_lengths=torch.ones(3)), "chosen_lengths must be > 0"),
    ],
)
def test_errors(kwargs, match):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=match):
        preference_loss(x, x, x, x, **kwargs)


def test_shape_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"ref_rejected_logps has shape \(4,\)"):
        preference_loss(x, x, x, torch.zeros(4))
    with pytest.raises(ValueError, match=r"policy_chosen_logps must have shape \[B\]"):
        preference_loss(torch.zeros(3, 2), x, x, x)
    with pytest.raises(ValueError, match="reference_free=True"):
        preference_loss(x, x, None, None)
    with pytest.raises(TypeError, match="floating"):
        preference_loss(torch.zeros(3, dtype=torch.long), x, x, x)


def test_aot_losses_match_sorted_differences():
    """AOT-pair: sort ρ_w and ρ_l separately. ρ_w = [3, -1], ρ_l = [0, 2] -> sorted [-1, 3] and
    [0, 2] -> Δ = [-1, 1] -> log(1 + e) + log(1 + e^-1) at β = 1 (vs DPO's pairing: Δ = [3, -3]).
    AOT: sort the policy margins [2, -1] -> [-1, 2] and the reference margins [1, -3] -> [-3, 1]
    -> Δ = [2, 1] -> log(1 + e^-2) + log(1 + e^-1)."""
    z = torch.zeros(2, dtype=torch.float64)
    pc, pr = _t(3.0, -1.0, dtype=torch.float64), _t(0.0, 2.0, dtype=torch.float64)
    got, _, _ = preference_loss(pc, pr, z, z, loss_type="aot_pair", beta=1.0)
    assert got.sum().item() == pytest.approx(math.log1p(math.e) + math.log1p(math.exp(-1)), abs=1e-12)
    pc, pr = _t(-1.0, -4.0, dtype=torch.float64), _t(-3.0, -3.0, dtype=torch.float64)
    rc, rr = _t(-2.0, -6.0, dtype=torch.float64), _t(-3.0, -3.0, dtype=torch.float64)
    got, _, _ = preference_loss(pc, pr, rc, rr, loss_type="aot", beta=1.0)
    assert got.sum().item() == pytest.approx(math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)), abs=1e-12)


def test_bco_pair_shift_is_the_batch_mean_reward():
    """Two pairs at β = 1: rewards r_w = [2, 0], r_l = [0, -2] -> δ = 0 ->
    Σ -log σ(r_w) - log σ(-r_l) = [log(1+e^-2) + log 2, log 2 + log(1+e^-2)]."""
    z = torch.zeros(2, dtype=torch.float64)
    got, _, _ = preference_loss(_t(2.0, 0.0, dtype=torch.float64), _t(0.0, -2.0, dtype=torch.float64), z, z,
                                loss_type="bco_pair", beta=1.0)
    assert got.tolist() == pytest.approx([math.log1p(math.exp(-2)) + math.log(2)] * 2, abs=1e-12)


def test_bco_pair_gradient_holds_the_shift_constant():
    """∂L/∂π_w,i = -β σ(-(βρ_w,i - δ)), ∂L/∂π_l,i = +β σ(βρ_l,i - δ), δ = 0 here (rewards [2, 0, 0, -2])."""
    pc, pr = _t(2.0, 0.0, dtype=torch.float64, grad=True), _t(0.0, -2.0, dtype=torch.float64, grad=True)
    z = torch.zeros(2, dtype=torch.float64)
    preference_loss(pc, pr, z, z, loss_type="bco_pair", beta=1.0)[0].sum().backward()
    assert pc.grad.tolist() == pytest.approx([-_sig(-2.0), -_sig(0.0)], abs=1e-12)
    assert pr.grad.tolist() == pytest.approx([_sig(0.0), _sig(-2.0)], abs=1e-12)


LENGTHS = dict(chosen_lengths=torch.tensor([3]), rejected_lengths=torch.tensor([2]))


def test_simpo_cpo_orpo_closed_forms_ignore_the_reference():
    """SimPO (β = 2, γ = 1): means -6/3 = -2 and -8/2 = -4 -> z = 2·2 - 1 = 3 -> log(1 + e^-3).
    CPO (β = 0.5, α = 1): z = 0.5·(-2 - (-4)) = 1 -> log(1 + e^-1) + NLL.
    ORPO (λ = β = 0.5): means log ½ and log ¼ -> log odds 0 and log(1/3) -> their difference ln 3
    -> NLL - λ·log σ(ln 3) = NLL + λ·log(4/3)."""
    nll = _t(1.25, dtype=torch.float64)
    pc, pr = _t(-6.0, dtype=torch.float64), _t(-8.0, dtype=torch.float64)
    simpo, _, _ = preference_loss(pc, pr, None, None, loss_type="simpo", beta=2.0, simpo_gamma=1.0, **LENGTHS)
    assert simpo.item() == pytest.approx(math.log1p(math.exp(-3)), abs=1e-12)
    cpo, _, _ = preference_loss(_t(-2.0, dtype=torch.float64), _t(-4.0, dtype=torch.float64), None, None,
                                loss_type="cpo", beta=0.5, policy_chosen_nll=nll)
    assert cpo.item() == pytest.approx(math.log1p(math.exp(-1)) + 1.25, abs=1e-12)
    mw, ml = math.log(0.5), math.log(0.25)
    orpo, _, _ = preference_loss(_t(3 * mw, dtype=torch.float64), _t(2 * ml, dtype=torch.float64), None, None,
                                 loss_type="orpo", beta=0.5, policy_chosen_nll=nll, **LENGTHS)
    assert orpo.item() == pytest.approx(1.25 + 0.5 * math.log(4 / 3), abs=1e-12)
    # a reference, when passed, changes nothing for these types
    again, _, _ = preference_loss(pc, pr, pc + 3, pr - 1, loss_type="simpo", beta=2.0, simpo_gamma=1.0, **LENGTHS)
    assert torch.equal(again, simpo)


@pytest.mark.parametrize("loss_type", ["aot", "aot_pair", "discopop", "simpo", "cpo", "orpo"])
def test_gradcheck_new_types_float64(loss_type):
    g = torch.Generator().manual_seed(2)
    # log-probs < 0 (ORPO's odds need P < 1), distinct (the sorts of AOT have no ties)
    args = [(-torch.rand(4, generator=g, dtype=torch.float64) * 3 - 0.5).requires_grad_() for _ in range(5)]
    lengths = dict(chosen_lengths=torch.tensor([1, 2, 3, 4]), rejected_lengths=torch.tensor([2, 2, 1, 5]))

    def f(pc, pr, rc, rr, nll):
        return preference_loss(pc, pr, rc, rr, loss_type=loss_type, beta=0.7, policy_chosen_nll=nll, **lengths)[0]

    assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("loss_type", ["bco_pair", "aot", "aot_pair", "discopop", "simpo", "cpo", "orpo"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_new_types_extreme_margins_stay_finite(loss_type, sign):
    pc = torch.tensor([sign * 1e4 - 2e4, -5e3], requires_grad=True)
    pr = torch.tensor([-sign * 1e4 - 2e4, -1e-9], requires_grad=True)
    z, nll = torch.zeros(2), torch.ones(2)
    losses, _, _ = preference_loss(pc, pr, z, z, loss_type=loss_type, beta=1.0, policy_chosen_nll=nll,
                                   chosen_lengths=torch.tensor([1, 1]), rejected_lengths=torch.tensor([1, 1]))
    losses.sum().backward()
    assert torch.isfinite(losses).all(), losses
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_length_and_nll_needs_are_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"\['simpo'\] needs chosen_lengths"):
        preference_loss(x, x, None, None, loss_type="simpo")
    with pytest.raises(ValueError, match="loss_type 'cpo' needs policy_chosen_nll"):
        preference_loss(x, x, None, None, loss_type="cpo")
    with pytest.raises(ValueError, match="reference_free=True"):
        preference_loss(x, x, None, None, loss_type=("simpo", "sigmoid"), **dict(
            chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(3)))
