"""The DPO loss family as pure functions of per-sequence log-probs.

Notation used throughout (all tensors are [B], one entry per preference pair):

    ρ_w = log π_θ(y_w|x) - log π_ref(y_w|x)      chosen log-ratio
    ρ_l = log π_θ(y_l|x) - log π_ref(y_l|x)      rejected log-ratio
    h   = ρ_w - ρ_l                               the DPO "logits"

Every per-type function below takes (ρ_w, ρ_l, β, ε) and returns per-pair losses
[B]; `preference_loss` validates inputs, builds ρ_w/ρ_l, combines types and adds
the optional NLL term. The loss knows nothing of models: log-probs come from
sdpo.logprobs.

Numerics: only F.logsigmoid / torch.sigmoid / relu / squares of the inputs are
used, so h = ±1e4 gives finite losses and gradients (log(sigmoid(x)) would give
log(0) = -inf at x = -1e4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """DPO (ε = 0) and conservative DPO (ε > 0)."""
    h = chosen_logratios - rejected_logratios
    # DPO, Rafailov et al. 2023, Eq. 7: -log σ(β h).
    # cDPO, Mitchell 2023 ("A note on DPO with noisy preferences"): the label is
    # flipped with probability ε, so the target is the ε-smoothed BCE
    # -(1-ε) log σ(βh) - ε log σ(-βh); ε = 0 is exactly DPO.
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def robust_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """rDPO: an unbiased estimate of the clean-label DPO loss under flip rate ε."""
    h = chosen_logratios - rejected_logratios
    # Chowdhury et al. 2024, "Provably Robust DPO", the rDPO loss (§3):
    # [(1-ε)·ℓ(βh) - ε·ℓ(-βh)] / (1-2ε) with ℓ(z) = -log σ(z). Unlike cDPO the
    # ε-term enters with a minus sign, so the loss can go below 0; needs ε < 1/2.
    return ((1 - label_smoothing) * -F.logsigmoid(beta * h) - label_smoothing * -F.logsigmoid(-beta * h)) / (
        1 - 2 * label_smoothing
    )


def ipo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """IPO; minimum 0 at h = 1/(2β). Pass length-normalised log-ratios for the usual practice."""
    h = chosen_logratios - rejected_logratios
    # Azar et al. 2023, "A General Theoretical Paradigm ...", Eq. 17 with τ = β:
    # (h - 1/(2τ))². The paper states it for sequence log-probs; Zephyr/TRL apply it to
    # per-token means (see `chosen_lengths` in preference_loss).
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """SLiC-HF calibration loss on reference log-ratios."""
    h = chosen_logratios - rejected_logratios
    # Zhao et al. 2023, "SLiC-HF", rank-calibration loss max(0, δ - log π(y_w) + log π(y_l)).
    # Here (as in TRL) on log-ratios and scaled: relu(1 - βh) = β·max(0, 1/β - h), i.e.
    # δ = 1/β; with reference_free=True it is the paper's loss with δ = 1/β, times β.
    return torch.relu(1 - beta * h)


def exo_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """EXO for pairs: reverse KL from the policy's pair distribution to the smoothed labels."""
    h = chosen_logratios - rejected_logratios
    # Ji et al. 2024, "Towards Efficient Exact Optimization of LM Alignment" (EXO, §4, pairwise
    # case K = 2): KL(p_θ || p_label) with p_θ = (σ(βh), σ(-βh)) the softmax of β·ρ over the
    # pair and p_label = (1-ε, ε). log ε must be finite, so ε = 0 is replaced by 1e-3 (the
    # value TRL uses; documented in preference_loss).
    eps = label_smoothing if label_smoothing > 0 else 1e-3
    p_w, p_l = torch.sigmoid(beta * h), torch.sigmoid(-beta * h)
    return p_w * (F.logsigmoid(beta * h) - math.log(1 - eps)) + p_l * (F.logsigmoid(-beta * h) - math.log(eps))


def nca_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """NCA for pairs: absolute (not relative) rewards, so the chosen likelihood cannot fall freely."""
    r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
    # Chen et al. 2024, "Noise Contrastive Alignment of LMs with Explicit Rewards", NCA with
    # binary preference data (K = 2): -log σ(r_w) - ½·Σ_{y ∈ {y_w, y_l}} log σ(-r_y).
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """SPPO with hard win probabilities P(y_w ≻ π) = 1, P(y_l ≻ π) = 0."""
    # Wu et al. 2024, "Self-Play Preference Optimization", the SPPO objective
    # (log π_θ/π_t(y) - η(P̂(y ≻ π_t) - ½))² summed over the pair. With hard labels the
    # targets are ±η/2. The paper's η is its own step size; following TRL we set η = 1/β
    # so β keeps its "inverse KL strength" meaning across types.
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def apo_zero_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """APO-zero: push chosen likelihood up and rejected likelihood down (for chosen better than the model)."""
    # D'Oosterlinck et al. 2024, "Anchored Preference Optimization" (§4), APO-zero:
    # -σ(βρ_w) + σ(βρ_l). Range (-1, 1); TRL writes it as 1 - σ(βρ_w) + σ(βρ_l), a
    # constant +1 that changes no gradient. We keep the paper's form.
    return -torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """APO-down: push both likelihoods down, the rejected one more (for outputs worse than the model)."""
    # D'Oosterlinck et al. 2024 (§4), APO-down: σ(βρ_w) - σ(β(ρ_w - ρ_l)). Range (-1, 1);
    # TRL adds the same constant +1 as for APO-zero.
    return torch.sigmoid(beta * chosen_logratios) - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))


def bco_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """BCO for pairs: a binary classifier of chosen (1) vs rejected (0) on the implicit rewards."""
    r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
    # Jung et al. 2024, "Binary Classifier Optimization for LLM Alignment", Eq. 8 with the reward
    # shift δ: -log σ(r_w - δ) - log σ(-(r_l - δ)). The paper keeps δ as a moving average of the
    # rewards; as a pure function we use this batch's mean reward (detached), which is the
    # average TRL's running estimate tracks.
    delta = torch.cat([r_w, r_l]).mean().detach()
    return -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))


def aot_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """AOT-pair: first-order stochastic dominance of the chosen log-ratios over the rejected ones."""
    # Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    # the paired-data objective (Eq. 9, logistic loss): the 1-D optimal transport between the two
    # empirical distributions matches them sorted, so Δ_(i) = ρ_w,(i) - ρ_l,(i) over the batch's
    # order statistics, then the smoothed logistic loss of βΔ. Entries are per rank, not per pair;
    # only their sum (the batch loss) is meaningful, and it is a statistic of the micro-batch.
    delta = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def aot_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """AOT (unpaired form): the policy's margins dominate the reference's, in distribution."""
    # Melnyk et al. 2024, Eq. 8 (logistic loss): sort the policy margins log π(y_w) - log π(y_l)
    # and the reference margins separately, Δ_(i) = their difference by rank; as AOT-pair, only
    # the batch sum is meaningful.
    delta = (torch.sort(policy_chosen_logps - policy_rejected_logps).values
             - torch.sort(ref_chosen_logps - ref_rejected_logps).values)
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def discopop_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, tau: float) -> Tensor:
    """DiscoPOP: the logistic loss blended into an exponential one as the margin grows."""
    rho = beta * (chosen_logratios - rejected_logratios)
    # Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for LLMs", the
    # log-ratio modulated loss (LRML, Eq. 7): (1 - σ(ρ/τ))·(-log σ(ρ)) + σ(ρ/τ)·exp(-ρ), τ = 0.05.
    # Written as σ(-ρ/τ)·softplus(-ρ) + exp(log σ(ρ/τ) - ρ): the product σ(ρ/τ)·exp(-ρ) is
    # 0·inf = NaN at ρ = -1e4 in the plain form; in log space it is exp(≈19ρ) → 0.
    return torch.sigmoid(-rho / tau) * F.softplus(-rho) + torch.exp(F.logsigmoid(rho / tau) - rho)


def simpo_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, beta: float, label_smoothing: float,
               gamma: float) -> Tensor:
    """SimPO: reference-free, length-normalised, with a target reward margin γ."""
    # Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    # Eq. 6: -log σ(β/|y_w|·log π(y_w|x) - β/|y_l|·log π(y_l|x) - γ); ε-smoothed as cDPO.
    z = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def cpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """CPO's preference term: DPO with a uniform reference (the NLL term is added by the caller)."""
    # Xu et al. 2024, "Contrastive Preference Optimization", Eq. 6: L_prefer =
    # -log σ(β log π(y_w|x) - β log π(y_l|x)); L_CPO = L_prefer + L_NLL (Eq. 7).
    z = beta * (policy_chosen_logps - policy_rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends (Mächler 2012, "Accurately computing log(1 - exp(-|a|))")."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, beta: float) -> Tensor:
    """ORPO's odds-ratio term, weighted by λ = β (the NLL term is added by the caller)."""
    # Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    # Eqs. 4-7: odds(y|x) = P(y|x) / (1 - P(y|x)) with P the per-token mean likelihood
    # exp(mean log p); L_OR = -log σ(log odds(y_w|x) - log odds(y_l|x)); L = L_SFT + λ·L_OR.
    # A mean log-prob of exactly 0 (P = 1) has infinite odds: clamp to -1e-6 nats per token.
    w, lo = chosen_mean_logps.clamp(max=-1e-6), rejected_mean_logps.clamp(max=-1e-6)
    log_odds = (w - _log1mexp(w)) - (lo - _log1mexp(lo))
    return -beta * F.logsigmoid(log_odds)


_PAIR_LOSSES = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "bco_pair": bco_pair_loss,
    "aot_pair": aot_pair_loss,
}
# Types with their own inputs (dispatched in preference_loss): the raw log-probs (aot, cpo),
# per-token means (simpo, orpo), an extra constant (discopop's τ, simpo's γ).
_OTHER_LOSSES = ("aot", "discopop", "simpo", "cpo", "orpo")
# "sft" is the chosen-response NLL alone (the caller's `policy_chosen_nll`), for mixing with
# a preference term, e.g. loss_type=("sigmoid", "sft") as in MPO-style recipes.
LOSS_TYPES: tuple[str, ...] = (*_PAIR_LOSSES, *_OTHER_LOSSES, "sft")
USES_LABEL_SMOOTHING = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_pair", "simpo", "cpo"})
# SimPO, CPO and ORPO need no reference model: the trainer skips the reference pass for them.
REFERENCE_FREE_TYPES = frozenset({"simpo", "cpo", "orpo"})
NEEDS_NLL = frozenset({"sft", "cpo", "orpo"})       # policy_chosen_nll
NEEDS_LENGTHS = frozenset({"simpo", "orpo"})        # chosen_lengths / rejected_lengths
# Types whose pair losses read other pairs of the batch (a sort over the batch, its mean reward): the
# loss is not a sum of per-pair terms, so it cannot be taken one pair at a time (sdpo.logprobs.packed_pair_loss).
BATCH_COUPLED = frozenset({"aot", "aot_pair", "bco_pair"})
# How check_loss_options names each option: preference_loss's arguments by default; the run
# config passes its own keys (loss.type, loss.weights, ...).
ARG_NAMES = {"type": "loss_type", "weights": "loss_weights", "beta": "beta", "label_smoothing": "label_smoothing"}


def check_loss_options(types: Sequence[str], weights: Sequence[float] | None, beta: float, label_smoothing: float,
                       *, names: dict[str, str] = ARG_NAMES) -> list[str]:
    """Problems with a choice of loss types and their options, one message each ([] when valid).

    The one place these rules live: preference_loss raises on them, sdpo.runtime.config reports them
    with the other config problems. The types are shown joined by "+" (the config's notation)."""
    T, W, B, E = names["type"], names["weights"], names["beta"], names["label_smoothing"]
    shown = "+".join(types)
    problems = []
    if not types:
        problems.append(f"{T} is empty; expected one or more of {list(LOSS_TYPES)}")
    bad = [t for t in types if t not in LOSS_TYPES]
    if bad:
        problems.append(f"unknown {T} {shown!r}: unknown {bad}; expected one of {list(LOSS_TYPES)}, or several of them")
    if len(set(types)) != len(types):
        problems.append(f"{T} {shown!r} names a type twice; use {W} instead")
    if weights is not None and len(weights) != len(types):
        problems.append(f"{W} has {len(weights)} entries but {T} {shown!r} has {len(types)}")
    if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
        problems.append(f"{B} must be > 0 and finite, got {beta!r}")
    if not (0.0 <= label_smoothing < 0.5):
        problems.append(f"{E} must be in [0, 0.5), got {label_smoothing!r}")
    elif label_smoothing > 0 and not USES_LABEL_SMOOTHING.intersection(types):
        problems.append(f"{E} has no effect on {T} {shown!r} ({E} = {label_smoothing}); "
                        f"it is used by {sorted(USES_LABEL_SMOOTHING)}")
    return problems


def _check_logps(name: str, x: Tensor | None, shape: torch.Size | None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"sdpo/loss.py: {name} must be a Tensor of shape [B], got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"sdpo/loss.py: {name} must have shape [B] (one value per pair), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"sdpo/loss.py: {name} must be a floating tensor, got {x.dtype}")
    if shape is not None and x.shape != shape:
        raise ValueError(
            f"sdpo/loss.py: {name} has shape {tuple(x.shape)} but policy_chosen_logps has {tuple(shape)}"
        )


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    reference_free: bool = False,
    policy_chosen_nll: Tensor | None = None,
    rpo_alpha: float | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    cpo_alpha: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and implicit rewards.

    Args (B = number of pairs):
        policy_chosen_logps, policy_rejected_logps: [B] summed log π_θ(y|x) over response tokens.
        ref_chosen_logps, ref_rejected_logps: [B] the same for π_ref; may be None when
            reference_free=True (the reference log-probs are then taken as 0 everywhere).
        loss_type: one name from LOSS_TYPES, or a sequence of names whose losses are summed
            with `loss_weights` (default weight 1 each).
        beta: β > 0, the inverse strength of the KL anchor.
        label_smoothing: ε ∈ [0, 0.5), the assumed label-flip rate. Used by "sigmoid" (cDPO),
            "robust" (rDPO) and "exo_pair" (smoothed target; ε = 0 means 1e-3 there). Passing
            ε > 0 when none of the chosen types uses it is an error rather than a silent no-op.
        policy_chosen_nll: [B] mean per-token NLL of the chosen response under π_θ (grad flows);
            needed by "sft" and by rpo_alpha.
        rpo_alpha: α; adds α·policy_chosen_nll to every pair's loss (RPO, Pang et al. 2024,
            "Iterative Reasoning Preference Optimization", L_DPO + α·L_NLL with the NLL
            normalised by length).
        chosen_lengths, rejected_lengths: [B] response token counts. When given, the "ipo"
            term uses per-token mean log-ratios ρ/|y| (length-normalised IPO, as in the Zephyr
            recipe and TRL); when absent, IPO uses the summed log-probs as in Azar et al. They
            must be passed together; "simpo" and "orpo" need them (per-token mean log-probs).
        simpo_gamma: SimPO's target margin γ (the paper's recipes use 0.5-1.6 with β = 2-10).
        discopop_tau: DiscoPOP's temperature τ of the modulating sigmoid (the paper's 0.05).
        cpo_alpha: weight of CPO's NLL term (the paper's 1). ORPO's NLL has weight 1 and its
            odds-ratio term weight λ = beta (the paper's λ = 0.1).
        "simpo", "cpo" and "orpo" use no reference: for them ref_* may be None.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each [B]. losses is not reduced. The
        rewards are β·(policy - reference) on the summed log-probs as passed (whatever the
        loss type, so metrics compare across types), detached.
    """
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    given_weights = None if loss_weights is None else tuple(float(w) for w in loss_weights)
    problems = check_loss_options(types, given_weights, beta, label_smoothing)
    if problems:
        raise ValueError("sdpo/loss.py: " + "; ".join(problems))
    weights = (1.0,) * len(types) if given_weights is None else given_weights

    _check_logps("policy_chosen_logps", policy_chosen_logps, None)
    shape = policy_chosen_logps.shape
    _check_logps("policy_rejected_logps", policy_rejected_logps, shape)
    if reference_free or REFERENCE_FREE_TYPES.issuperset(types):
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(
                "sdpo/loss.py: ref_chosen_logps/ref_rejected_logps are None; pass them or set reference_free=True"
            )
        _check_logps("ref_chosen_logps", ref_chosen_logps, shape)
        _check_logps("ref_rejected_logps", ref_rejected_logps, shape)

    needs_nll = bool(NEEDS_NLL.intersection(types)) or rpo_alpha is not None
    if needs_nll:
        if policy_chosen_nll is None:
            nll_types = sorted(NEEDS_NLL.intersection(types))
            why = f"loss_type {nll_types[0]!r}" if nll_types else f"rpo_alpha={rpo_alpha}"
            raise ValueError(f"sdpo/loss.py: {why} needs policy_chosen_nll ([B] mean NLL of the chosen response)")
        _check_logps("policy_chosen_nll", policy_chosen_nll, shape)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("sdpo/loss.py: pass both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is None and NEEDS_LENGTHS.intersection(types):
        raise ValueError(f"sdpo/loss.py: loss_type {sorted(NEEDS_LENGTHS.intersection(types))} needs "
                         "chosen_lengths and rejected_lengths (per-token mean log-probs)")
    if chosen_lengths is not None:
        for name, n in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            if not isinstance(n, Tensor) or n.shape != shape:
                got = tuple(n.shape) if isinstance(n, Tensor) else type(n).__name__
                raise ValueError(f"sdpo/loss.py: {name} must be a Tensor of shape {tuple(shape)}, got {got}")
            # Checked on host tensors only: on a GPU the check would sync every micro-batch, and the
            # trainer's counts come from tokenize_pairs, which never keeps an empty response.
            if n.device.type == "cpu" and bool((n <= 0).any()):
                raise ValueError(f"sdpo/loss.py: {name} must be > 0 (a response with no tokens has no log-prob)")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # ρ_w [B]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # ρ_l [B]

    if chosen_lengths is not None:  # per-token means, [B]
        chosen_mean = policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)
        rejected_mean = policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype)
    losses = torch.zeros_like(chosen_logratios)
    for t, w in zip(types, weights):
        if t == "sft":
            term = policy_chosen_nll
        elif t == "aot":
            term = aot_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                            beta, label_smoothing)
        elif t == "discopop":
            term = discopop_loss(chosen_logratios, rejected_logratios, beta, discopop_tau)
        elif t == "simpo":
            term = simpo_loss(chosen_mean, rejected_mean, beta, label_smoothing, simpo_gamma)
        elif t == "cpo":
            term = cpo_loss(policy_chosen_logps, policy_rejected_logps, beta, label_smoothing) + cpo_alpha * policy_chosen_nll
        elif t == "orpo":
            term = policy_chosen_nll + orpo_loss(chosen_mean, rejected_mean, beta)
        elif t == "ipo" and chosen_lengths is not None:
            term = ipo_loss(
                chosen_logratios / chosen_lengths.to(chosen_logratios.dtype),
                rejected_logratios / rejected_lengths.to(rejected_logratios.dtype),
                beta,
                label_smoothing,
            )
        else:
            term = _PAIR_LOSSES[t](chosen_logratios, rejected_logratios, beta, label_smoothing)
        losses = losses + w * term
    if rpo_alpha is not None:
        losses = losses + rpo_alpha * policy_chosen_nll  # RPO, Pang et al. 2024: L_DPO + α·L_NLL

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
