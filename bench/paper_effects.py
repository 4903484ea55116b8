"""The sDPO paper's comparisons on the built-in demo, paired over seeds on the same S.

    python bench/paper_effects.py --seeds 5 [--jobs 2] [--out runs/paper_effects]

Per seed s (train.seed = s), the default run `python train.py --train.seed=s` makes S by SFT
and runs sDPO with the natural split (D1 = orca-style pairs, D2 = UltraFeedback-style pairs).
Then, from that same S (model.path = its sft/, SFT off), three variants:
  dpo        DPO on all the data at once (data.split = "all"), with train.max_steps = the
             sDPO run's total optimizer steps (the paper's Table 2 baseline)
  init_base  sDPO with train.init = "base": the step-2 policy starts from S, not M1 (Figure 3)
  random     sDPO on a random split with D1/D2's sizes (fractions 600/2100, 1500/2100)
With --online (issue 24), from the same S per seed, instead:
  online           on-policy sDPO (configs/tiny-online.toml: M_{t-1} samples D_t's prompts, exact-match
                   judge, best vs worst pairs; reference M_{t-1})
  online_fixed_ref the same with one fixed reference, S, at every step (reference.path = S), as
                   online DPO trainers with a frozen reference do
and per step the pairs kept and the sampling + judging time next to the other metrics.
Each run is a subprocess of train.py (OMP_NUM_THREADS=1 each, --jobs at a time) whose output
directory is kept: a rerun skips the runs that already have a summary.json.

Per seed and variant the final model M_T's held-out greedy exact match (EM), implicit-reward
accuracy vs S, mean γ on D2, and the initial step-2 DPO loss (Figure 3): the sigmoid loss of the
step-2 starting policy against the step-2 reference M1 over all of D2. It is ln 2 = 0.693 by
construction when the policy starts from its reference (sdpo, random); for init_base it is S
against M1, computed here. (The logged loss would add RPO's NLL term, loss.rpo_alpha.) Then the
paired mean difference from sDPO over seeds with a 95% t-interval.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TINY = REPO / "configs" / "tiny.toml"
TINY_ONLINE = REPO / "configs" / "tiny-online.toml"
VARIANTS = ("sdpo", "dpo", "init_base", "random")
ONLINE_VARIANTS = ("sdpo", "online", "online_fixed_ref")
# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (no scipy dependency)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def run_train(out: Path, overrides: list[str], extra: list[str], config: Path = TINY) -> float:
    """One train.py subprocess (skipped when out/summary.json exists); returns its wall seconds.
    Its wall and CPU seconds and the machine's load averages before and after go to OUT.load.json."""
    if (out / "summary.json").is_file():
        return 0.0
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(config), f"--train.output_dir={out}",
           "--train.log_every=1", "--eval.summary=true", *overrides, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out.mkdir(parents=True, exist_ok=True)
    t0, load0, cpu0 = time.perf_counter(), os.getloadavg(), os.times()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {out.parent / (out.name + '.log')}")
    wall, cpu1 = time.perf_counter() - t0, os.times()
    # children's CPU: exact when runs go one at a time (--jobs 1), a sum over the finished ones otherwise
    cpu = (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
    (out.parent / f"{out.name}.load.json").write_text(json.dumps(
        {"wall_s": wall, "cpu_s": cpu, "load_before": load0, "load_after": os.getloadavg()}))
    return wall


def dpo_lines(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == "dpo" and "loss" in r]


def seed_runs(seed: int, root: Path, jobs: int, extra: list[str]) -> dict[str, dict]:
    d = root / f"seed{seed}"
    run_train(d / "sdpo", [f"--train.seed={seed}"], extra)  # the default run: SFT makes S, then sDPO
    steps = len(dpo_lines(d / "sdpo"))  # log_every = 1: one line per optimizer step
    from_s = [f"--train.seed={seed}", f"--model.path={d / 'sdpo' / 'sft'}", "--sft.enabled=false"]
    variants = {
        "dpo": from_s + ["--data.split=all", f"--train.max_steps={steps}"],
        "init_base": from_s + ["--train.init=base"],
        "random": from_s + ["--data.split=random", f"--data.fractions=[{600 / 2100!r}, {1500 / 2100!r}]"],
    }
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda kv: run_train(d / kv[0], kv[1], extra), variants.items()))
    res = {v: measure(d / v) for v in VARIANTS}
    res["init_base"]["step-2 loss₀"] = initial_dpo_loss(d / "sdpo" / "sft", d / "init_base" / "M1", extra)
    return res


def online_seed_runs(seed: int, root: Path, jobs: int, extra: list[str]) -> dict[str, dict]:
    """--online: the default run (S and offline sDPO), then on-policy sDPO from that S with the
    reference M_{t-1} (sDPO's) or S at every step."""
    d = root / f"seed{seed}"
    run_train(d / "sdpo", [f"--train.seed={seed}"], extra)
    s_dir = d / "sdpo" / "sft"
    from_s = [f"--train.seed={seed}", f"--model.path={s_dir}", "--sft.enabled=false"]
    variants = {"online": from_s, "online_fixed_ref": from_s + [f"--reference.path={s_dir}"]}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda kv: run_train(d / kv[0], kv[1], extra, TINY_ONLINE), variants.items()))
    res = {v: measure(d / v) for v in ONLINE_VARIANTS}
    for v in ONLINE_VARIANTS:
        rows = [json.loads(line) for line in (d / v / "metrics.jsonl").read_text().splitlines()]
        starts = {r["sdpo_step"]: r for r in rows if "sdpo_step" in r and "gamma_ref/mean" in r}
        for t in (1, 2):
            res[v][f"pairs {t}"] = starts[t].get("pairs")
            res[v][f"sample s {t}"] = starts[t].get("online/sample_time_s")
        load = d / f"{v}.load.json"
        if load.is_file():  # written by this script's run_train (not by runs made before it recorded loads)
            x = json.loads(load.read_text())
            res[v].update({"wall s": x["wall_s"], "cpu s": x["cpu_s"],
                           "load": f"{x['load_before'][0]:.1f}-{x['load_after'][0]:.1f}"})
    return res


ONLINE_METRICS = ["EM D1", "EM D2", "γ D2", "rew acc D2", "pairs 1", "pairs 2", "sample s 1", "sample s 2",
                  "wall s", "cpu s", "load"]


def online_tables(results: dict[int, dict[str, dict]]) -> str:
    from sdpo.eval.report import format_table

    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    per_seed = [[seed, v, fmt(r[v]["S EM D1"]), fmt(r[v]["S EM D2"]), *(fmt(r[v].get(k)) for k in ONLINE_METRICS)]
                for seed, r in results.items() for v in ONLINE_VARIANTS]
    out = ["Per seed (M2 vs S on the held-out prompts; pairs t = D_t's pairs; sample s t = sampling + judging "
           "seconds of step t; wall s, cpu s = the whole train.py run, one thread, on a shared machine; load = "
           "the 1-minute load average before-after the run):",
           format_table(["seed", "variant", "S EM D1", "S EM D2", *ONLINE_METRICS], per_seed), ""]
    seeds = list(results)
    paired = []
    for a, b in (("online", "sdpo"), ("online_fixed_ref", "online")):
        cells = [interval([results[s][a][k] - results[s][b][k] for s in seeds]) for k in ONLINE_METRICS[:4]]
        paired.append([f"{a} − {b}", *cells])
    for v in ONLINE_VARIANTS:  # M2 against its own S (the demo's claim), exact match only
        paired.append([f"{v} − S", *(interval([results[s][v][k] - results[s][v][f"S {k}"] for s in seeds])
                                     for k in ("EM D1", "EM D2")), "-", "-"])
    means = [[f"{v} (mean)", *(fmt(statistics.fmean(results[s][v][k] for s in seeds)) for k in ONLINE_METRICS[:4])]
             for v in ONLINE_VARIANTS]
    out += [f"Paired differences over {len(seeds)} seeds: mean ± 95% t-interval half-width:",
            format_table(["", *ONLINE_METRICS[:4]], means + paired)]
    return "\n".join(out)


def initial_dpo_loss(policy_dir: Path, ref_dir: Path, extra: list[str]) -> float:
    """mean over D2 of -log σ(β·[(log π - log π_ref)(y_w) - (log π - log π_ref)(y_l)]) (DPO eq. 7)."""
    import torch
    import torch.nn.functional as F

    from sdpo.data.tokenizer import load_tokenizer
    from sdpo.models.checkpoint import load_model
    from sdpo.reference import pair_logps
    from sdpo.runtime.config import load_config
    from sdpo.stepwise import load_steps, tokenize

    cfg = load_config(TINY, extra)
    tok = load_tokenizer(REPO / cfg.model.tokenizer)
    datasets, _, _ = load_steps(cfg, tok)
    pairs = tokenize(cfg, datasets[1][: cfg.data.max_examples], tok, "D2")
    c, r = {}, {}
    for name, d in (("policy", policy_dir), ("ref", ref_dir)):
        c[name], r[name] = pair_logps(load_model(d, dtype=torch.float32), pairs, pad_id=tok.pad_id, batch_size=64)
    h = (c["policy"] - c["ref"]) - (r["policy"] - r["ref"])
    return float(-F.logsigmoid(cfg.loss.beta * h).mean())


def measure(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    final = list(summary)[-1]  # M2 (sDPO) or M1 (DPO on all the data)
    m, s = summary[final], summary["S"]
    lines = dpo_lines(out)
    step2 = any(r["sdpo_step"] == 2 for r in lines)
    return {
        "final": final, "steps": len(lines),
        "EM D1": m["D1"]["exact_match"], "EM D2": m["D2"]["exact_match"],
        "S EM D1": s["D1"]["exact_match"], "S EM D2": s["D2"]["exact_match"],
        "rew acc D1": m["D1"]["reward_accuracy_vs_S"], "rew acc D2": m["D2"]["reward_accuracy_vs_S"],
        "γ D2": m["D2"]["gamma_mean"],
        "γ(M1)-γ(S) D2": summary["M1"]["D2"]["gamma_mean"] - s["D2"]["gamma_mean"],
        "step-2 loss₀": math.log(2) if step2 else None,  # policy = reference; init_base's is computed
    }


METRICS = ["EM D1", "EM D2", "rew acc D1", "rew acc D2", "γ D2", "step-2 loss₀"]


def interval(xs: list[float]) -> str:
    """mean ± half-width of the 95% t-interval (n ≥ 2)."""
    n, mean = len(xs), statistics.fmean(xs)
    if n < 2:
        return f"{mean:+.3f}"
    half = T975[min(n - 1, len(T975)) - 1] * statistics.stdev(xs) / math.sqrt(n)
    return f"{mean:+.3f} ± {half:.3f}"


def tables(results: dict[int, dict[str, dict]]) -> str:
    from sdpo.eval.report import format_table

    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    per_seed = [[seed, v, r[v]["final"], r[v]["steps"], *(fmt(r[v][k]) for k in METRICS)]
                for seed, r in results.items() for v in VARIANTS]
    out = ["Per seed (final model M_T vs S; EM = greedy exact match on the held-out prompts):",
           format_table(["seed", "variant", "M_T", "steps", *METRICS], per_seed), ""]
    seeds = list(results)
    s_rows = [[seed, fmt(r["sdpo"]["S EM D1"]), fmt(r["sdpo"]["EM D1"]), fmt(r["sdpo"]["S EM D2"]),
               fmt(r["sdpo"]["EM D2"]), fmt(r["sdpo"]["γ(M1)-γ(S) D2"])] for seed, r in results.items()]
    out += ["sDPO on the default run, S -> M2:",
            format_table(["seed", "S EM D1", "M2 EM D1", "S EM D2", "M2 EM D2", "γ(M1)-γ(S) D2"], s_rows), ""]
    paired = []
    for v in VARIANTS[1:]:
        cells = []
        for k in METRICS:
            diffs = [results[s][v][k] - results[s]["sdpo"][k] for s in seeds
                     if results[s][v][k] is not None and results[s]["sdpo"][k] is not None]
            cells.append(interval(diffs) if diffs else "-")
        paired.append([f"{v} − sdpo", *cells])
    means = [["sdpo (mean)", *(fmt(statistics.fmean(results[s]["sdpo"][k] for s in seeds)) for k in METRICS)]]
    out += [f"Paired differences from sDPO over {len(seeds)} seeds: mean ± 95% t-interval half-width:",
            format_table(["", *METRICS], means + paired)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="train.seed = 1 .. N")
    ap.add_argument("--jobs", type=int, default=2, help="train.py processes at a time (each 1 thread)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "paper_effects")
    ap.add_argument("--online", action="store_true", help="offline sDPO vs on-policy sDPO vs on-policy with reference S")
    ap.add_argument("overrides", nargs="*", help="extra --section.key=value for every run")
    args = ap.parse_args()
    if args.online and args.out == ap.get_default("out"):
        args.out = REPO / "runs" / "online_effects"  # its own runs; the default run per seed is made again there
    t0 = time.perf_counter()
    seeds = list(range(1, args.seeds + 1))
    # Seeds' S runs are independent: run up to --jobs seeds side by side; each then runs its variants.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        res = list(pool.map(lambda s: (online_seed_runs if args.online else seed_runs)(s, args.out, 1, args.overrides),
                            seeds))
    print((online_tables if args.online else tables)(dict(zip(seeds, res))))
    print(f"\n{len(seeds)} seeds, {time.perf_counter() - t0:.0f} s wall; runs in {args.out}")


if __name__ == "__main__":
    main()
