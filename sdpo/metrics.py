"""The paper's statistics of a model on preference pairs, one function each.

Inputs are summed response log-probs per pair, [N] each: log π(y_w|x) (chosen) and
log π(y_l|x) (rejected), of the model and, where it applies, of a reference. Every caller
(the end-of-run summary, `eval.py preference`, `eval.py gamma`) uses these; everything is
computed in float64.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def gamma(chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
    """γ = log π(y_w|x) − log π(y_l|x) per pair, [N] float64 (the paper's Sec. 2.2 / Figure 2)."""
    return chosen_logps.double() - rejected_logps.double()


def preference_accuracy(chosen_logps: Tensor, rejected_logps: Tensor) -> float:
    """P[γ > 0]: the share of pairs the model itself ranks right (ties count as wrong)."""
    return float((gamma(chosen_logps, rejected_logps) > 0).double().mean())


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward r(x, y) = β · (log π(y|x) − log π_ref(y|x)) (DPO eq. 5), [N] float64."""
    return beta * (policy_logps.double() - ref_logps.double())


def reward_accuracy(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    ref_chosen_logps: Tensor, ref_rejected_logps: Tensor) -> float:
    """P[r(x, y_w) > r(x, y_l)], the implicit-reward accuracy (any β > 0 gives the same sign)."""
    chosen = policy_chosen_logps.double() - ref_chosen_logps.double()
    rejected = policy_rejected_logps.double() - ref_rejected_logps.double()
    return float((chosen > rejected).double().mean())


def reward_margins(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                   ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float) -> Tensor:
    """r(x, y_w) − r(x, y_l) per pair, [N] float64."""
    return (implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta)
            - implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta))


def preference_metrics(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                       ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
                       beta: float = 0.1, losses: Tensor | None = None) -> dict[str, float]:
    """Means over pairs under the names other DPO trainers log. `losses` ([N]) adds "loss"."""
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    out = {
        "rewards/chosen": implicit_rewards(pc, rc, beta).mean().item(),
        "rewards/rejected": implicit_rewards(pr, rr, beta).mean().item(),
        "rewards/accuracies": reward_accuracy(pc, pr, rc, rr),
        "rewards/margins": reward_margins(pc, pr, rc, rr, beta).mean().item(),
        "logps/chosen": pc.double().mean().item(),
        "logps/rejected": pr.double().mean().item(),
        "ref_logps/chosen": rc.double().mean().item(),
        "ref_logps/rejected": rr.double().mean().item(),
        "n": int(pc.numel()),
    }
    if losses is not None:
        out["loss"] = losses.double().mean().item()
    return out


def gamma_stats(gammas: Sequence[float] | Tensor) -> dict[str, float]:
    """mean, std (population), min, quartiles (linear interpolation) and max of γ."""
    g = torch.as_tensor(gammas, dtype=torch.float64).flatten()
    if g.numel() == 0:
        raise ValueError("gamma_stats: no values")
    q = torch.quantile(g, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"n": int(g.numel()), "mean": g.mean().item(), "std": g.std(unbiased=False).item(),
            "min": g.min().item(), "q1": q[0].item(), "median": q[1].item(), "q3": q[2].item(),
            "max": g.max().item()}


def histogram(values: dict[str, Sequence[float]], bins: int = 40) -> dict:
    """Counts per name over shared, equal-width bins spanning all values: {"edges": [bins+1], "counts": {name: [bins]}}."""
    all_values = torch.cat([torch.as_tensor(v, dtype=torch.float64).flatten() for v in values.values()])
    lo, hi = all_values.min().item(), all_values.max().item()
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    counts = {name: torch.histc(torch.as_tensor(v, dtype=torch.float64), bins=bins, min=lo, max=hi)
              .long().tolist() for name, v in values.items()}
    return {"edges": edges.tolist(), "counts": counts}
