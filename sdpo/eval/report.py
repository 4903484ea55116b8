"""What a person reads: progress lines, tables, the γ figure, and the end-of-run summary."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence


from sdpo.metrics import gamma, preference_accuracy, reward_accuracy
from sdpo.models.generate import generate
from sdpo.reference import run_pair_logps
from sdpo.runtime.run import Run, autocast, free_memory, load_for_training


class Progress:
    """Progress on stderr: one line rewritten in place on a terminal (at most every 0.5 s);
    in a log file, a line every 30 s and at the end, so logs stay short."""

    def __init__(self, label: str, total: int, *, stream=None, interval: float | None = None):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 30.0)
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            line = f"{self.label}: {self.done}/{self.total} ({rate:.1f}/s, {now - self.start:.0f} s)"
            self.stream.write("\r" + line if self.tty else line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-markdown table, columns padded to line up in a terminal."""
    text_rows = [[_fmt(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text_rows]) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in text_rows)])


def _fmt(v: object) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


# --------------------------------------------------------------------------------------
# The γ histogram (the paper's Figure 2)
# --------------------------------------------------------------------------------------

def plot_gamma_histogram(hist: dict, means: dict[str, float], path: str | Path, *,
                         title: str = "γ = log π(y_w|x) − log π(y_l|x)") -> bool:
    """Overlaid histograms as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    edges = hist["edges"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, counts in hist["counts"].items():
        ax.stairs(counts, edges, fill=True, alpha=0.4, label=f"{name} (mean {means[name]:.2f})")
        ax.axvline(means[name], linestyle="--", linewidth=1)
    ax.set_xlabel("γ"), ax.set_ylabel("pairs"), ax.set_title(title), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_histogram_csv(hist: dict, path: str | Path) -> None:
    """bin_lo, bin_hi, then one count column per model."""
    names = list(hist["counts"])
    lines = [",".join(["bin_lo", "bin_hi", *names])]
    edges = hist["edges"]
    for i in range(len(edges) - 1):
        lines.append(",".join([f"{edges[i]:.6g}", f"{edges[i + 1]:.6g}",
                               *(str(hist["counts"][n][i]) for n in names)]))
    Path(path).write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------
# End-of-run summary: preference accuracy, mean γ and greedy exact match of S, M_1..M_T
# on the held-out sets
# --------------------------------------------------------------------------------------

def exact_match(model, pairs, tokenizer, *, batch_size: int, max_positions: int | None = None) -> list[bool]:
    """Per pair: does the greedy completion of its prompt decode to the chosen response's text?
    The task metric of tasks with one right answer (the demo's): unlike γ or reward accuracy, it
    is not what DPO optimises, so it shows whether the preferences taught the task.
    A batch decodes len(longest chosen) + 1 tokens: enough to tell a completion that matches
    (it stops there) from one that runs on; max_positions caps prompt + completion."""
    eos = tokenizer.eos_id
    strip_eos = lambda ids: ids[:-1] if ids and ids[-1] == eos else ids  # noqa: E731
    hits = []
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i: i + batch_size]
        answers = [strip_eos(list(p.chosen_ids)) for p in batch]
        n_new = max(len(a) for a in answers) + 1
        if max_positions is not None:
            n_new = max(1, min(n_new, max_positions - max(len(p.prompt_ids) for p in batch)))
        out = generate(model, [list(p.prompt_ids) for p in batch], max_new_tokens=n_new, eos_id=eos,
                       pad_id=tokenizer.pad_id or 0)
        # text, not ids: a completion spelled with other tokens is still the right answer
        hits += [tokenizer.decode(o).strip() == tokenizer.decode(a).strip() for o, a in zip(out, answers)]
    return hits


def summarize(run: Run, named_dirs: list[tuple[str, str]], tests) -> dict:
    """Per model and held-out set:
    accuracy     P[log π(y_w|x) > log π(y_l|x)]: does the model itself rank the pair right;
    gamma_mean   mean γ = log π(y_w|x) - log π(y_l|x), the paper's Figure 2 statistic;
    reward_accuracy_vs_S  DPO's implicit-reward accuracy with S as reference (DPO eq. 5):
                 P[(log π - log π_S)(y_w) > (log π - log π_S)(y_l)] (not defined for S itself);
    exact_match  share of prompts whose greedy completion is the chosen response (exact_match()).
    Every rank decodes every prompt (an FSDP model needs all ranks in each forward)."""
    table, base_logps = {}, None
    for name, d in named_dirs:
        model = load_for_training(run, d)
        row, logps = {}, []
        for j, pairs in enumerate(tests, start=1):
            c, r = run_pair_logps(run, model, pairs, run.cfg.eval.batch_size)
            logps.append((c, r))
            with autocast(run):
                hits = exact_match(model, pairs, run.tokenizer, batch_size=run.cfg.eval.batch_size,
                                   max_positions=model.config.max_position_embeddings)
            row[f"D{j}"] = {"accuracy": preference_accuracy(c, r), "gamma_mean": float(gamma(c, r).mean()),
                            "exact_match": sum(hits) / len(hits), "n": len(pairs)}
            if base_logps is not None:
                bc, br = base_logps[j - 1]
                row[f"D{j}"]["reward_accuracy_vs_S"] = reward_accuracy(c, r, bc, br)
        base_logps = base_logps or logps
        table[name] = row
        del model
        free_memory()
    if run.info.is_main:
        (run.out / "summary.json").write_text(json.dumps(table, indent=1))
        print("\n" + format_summary(table), flush=True)
    return table


def format_summary(table: dict) -> str:
    sets = list(next(iter(table.values())))
    headers = (["model"] + [f"EM {s}" for s in sets] + [f"acc {s}" for s in sets] + [f"mean γ {s}" for s in sets]
               + [f"reward acc {s} vs S" for s in sets])
    rows = []
    for name, row in table.items():
        rows.append([name] + [f"{row[s]['exact_match']:.3f}" for s in sets]
                    + [f"{row[s]['accuracy']:.3f}" for s in sets] + [f"{row[s]['gamma_mean']:.2f}" for s in sets]
                    + [f"{row[s]['reward_accuracy_vs_S']:.3f}" if "reward_accuracy_vs_S" in row[s] else "-"
                       for s in sets])
    first = next(iter(table.values()))
    n = ", ".join(f"{s} test: {first[s]['n']} pairs" for s in sets)
    return (f"Held-out pairs ({n}); EM = greedy completion == chosen, acc = P[log π(y_w|x) > log π(y_l|x)], "
            f"γ = log π(y_w|x) - log π(y_l|x):\n"
            + format_table(headers, rows))
