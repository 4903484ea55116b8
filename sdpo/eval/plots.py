"""Training curves of a run directory: loss, reward margins, reward accuracy and γ per sDPO step.

Reads `metrics.jsonl` (sdpo.runtime.state) only; matplotlib is optional and imported when drawing.
"""

from __future__ import annotations

import json
from pathlib import Path

CURVES = [("loss", "DPO loss"), ("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy")]


class PlotError(ValueError):
    pass


def run_series(run_dir: str | Path) -> dict:
    """{"steps": {t: {metric: [(global step, value), ...]}}, "gamma_ref": {t: γ_ref mean},
    "eval": {t: {metric: [(global step, value)]}}} from a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no such file (expected a run directory written by train.py)")
    steps: dict[int, dict[str, list]] = {}
    evals: dict[int, dict[str, list]] = {}
    gamma: dict[int, float] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        t = row.get("sdpo_step")
        if "gamma_ref/mean" in row:
            gamma[t] = row["gamma_ref/mean"]
        if row.get("stage") == "dpo":
            for key, _ in CURVES:
                if key in row:
                    steps.setdefault(t, {}).setdefault(key, []).append((row["step"], row[key]))
        for key, _ in CURVES:  # held-out rows, under TRL's eval_ names
            if f"eval_{key}" in row:
                evals.setdefault(t, {}).setdefault(key, []).append((row["step"], row[f"eval_{key}"]))
    if not steps:
        raise PlotError(f"{path}: no DPO metric rows (has the run reached its first sDPO step?)")
    return {"steps": steps, "gamma_ref": gamma, "eval": evals}


def plot_run(run_dir: str | Path, out: str | Path) -> Path:
    """A PNG with one panel per curve (one colour per sDPO step) and γ_ref per step."""
    series = run_series(run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib (pip install matplotlib); the curves are in "
                        f"{Path(run_dir) / 'metrics.jsonl'}") from None
    fig, axes = plt.subplots(1, len(CURVES) + 1, figsize=(4 * (len(CURVES) + 1), 3.5))
    for ax, (key, title) in zip(axes, CURVES):
        for t, curves in sorted(series["steps"].items()):
            if key in curves:
                x, y = zip(*curves[key])
                ax.plot(x, y, marker=".", label=f"step {t}")
            if key in series["eval"].get(t, {}):
                x, y = zip(*series["eval"][t][key])
                ax.plot(x, y, "o--", label=f"step {t} held-out")
        ax.set_title(title), ax.set_xlabel("optimizer step"), ax.legend(fontsize=7)
    ax = axes[-1]
    ts = sorted(series["gamma_ref"])
    ax.bar([str(t) for t in ts], [series["gamma_ref"][t] for t in ts])
    ax.set_title("mean γ of the step's reference"), ax.set_xlabel("sDPO step")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
