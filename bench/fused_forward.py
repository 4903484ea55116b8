"""Fused chosen/rejected forward vs two forwards, response-only vs full logits (CPU).

    python bench/fused_forward.py [--pairs 2] [--vocab 32000] [--hidden 128] [--layers 2] [--reps 3]

Memory: each configuration runs one warm-up step and one measured step in its own
subprocess, and we read getrusage(RUSAGE_SELF).ru_maxrss (the process's peak resident set
size); the table gives the peak minus the RSS just before the first step (model and batch
already built): the extra memory one DPO step (forward + backward) needs.
Time: all configurations live in one process and run in interleaved rounds (the order
rotates each round) so that load from other processes on a shared machine hits them
alike; the table gives the minimum and the median over --reps rounds after one warm-up
round (on a shared machine contention only adds time, so the minimum is the better
estimate of the cost itself).

A step = policy log-probs for chosen and rejected, the sigmoid DPO loss against fixed
reference log-probs, backward. "two forwards" collates chosen and rejected separately
(each padded to its own longest row) and backpropagates once through both graphs, as a
non-concatenated trainer does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    # name: (fused, response_only)
    "fused + response-only": (True, True),
    "fused + full logits": (True, False),
    "two forwards + response-only": (False, True),
    "two forwards + full logits": (False, False),
}
IGN = -100


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _make_pairs(n_pairs: int, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    # Prompt ≈ 60% of a row's tokens: prompts 130-160, responses 80-120 tokens.
    return [(ids(rand(130, 160)), ids(rand(80, 120)), ids(rand(80, 120))) for _ in range(n_pairs)]


def _collate(rows):
    import torch

    T = max(len(p) + len(r) for p, r in rows)
    ids = [p + r + [0] * (T - len(p) - len(r)) for p, r in rows]
    labels = [[IGN] * len(p) + r + [IGN] * (T - len(p) - len(r)) for p, r in rows]
    mask = [[1] * (len(p) + len(r)) + [0] * (T - len(p) - len(r)) for p, r in rows]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def _setup(args):
    import torch

    from sdpo.models.model import ModelConfig, Transformer

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=4)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    pairs = _make_pairs(args.pairs, args.vocab, seed=0)
    batches = {
        "both": _collate([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]),
        "chosen": _collate([(p, c) for p, c, _ in pairs]),
        "rejected": _collate([(p, r) for p, _, r in pairs]),
    }
    return model, batches


def _step_fns(name, model, batches, n_pairs):
    import torch

    from sdpo.logprobs import concatenated_forward, sequence_logps
    from sdpo.loss import preference_loss

    fused, response_only = CONFIGS[name]
    ref = torch.zeros(n_pairs)

    def logps():
        if fused:
            return concatenated_forward(model, batches["both"], response_only=response_only)
        c, r = (
            sequence_logps(model, b["input_ids"], b["labels"], b["attention_mask"], response_only=response_only)
            for b in (batches["chosen"], batches["rejected"])
        )
        return c, r

    def step():
        c, r = logps()
        losses, _, _ = preference_loss(c.logps, r.logps, ref, ref, beta=0.1)
        losses.mean().backward()
        model.zero_grad(set_to_none=True)
        return float(c.logps.detach().sum() + r.logps.detach().sum())

    def forward_no_grad():
        with torch.no_grad():
            logps()

    return step, forward_no_grad


def measure_memory(name: str, args) -> dict:
    model, batches = _setup(args)
    step, _ = _step_fns(name, model, batches, args.pairs)
    rss0 = _rss_mb()
    step()
    checksum = step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"name": name, "peak_extra_mb": peak - rss0, "checksum": checksum}


def measure_time(args) -> tuple[dict, dict]:
    model, batches = _setup(args)
    fns = {name: _step_fns(name, model, batches, args.pairs) for name in CONFIGS}
    names = list(CONFIGS)
    step_t = {n: [] for n in names}
    fwd_t = {n: [] for n in names}
    for rnd in range(args.reps + 1):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for n in order:
            step, fwd = fns[n]
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            fwd()
            t2 = time.perf_counter()
            if rnd:  # round 0 is the warm-up
                step_t[n].append(t1 - t0)
                fwd_t[n].append(t2 - t1)
    both = batches["both"]
    info = {
        "rows": both["input_ids"].shape[0],
        "padded_T": both["input_ids"].shape[1],
        "tokens": int(both["attention_mask"].sum()),
        "response_tokens": int((both["labels"] != IGN).sum()),
        "padded_T_two": (batches["chosen"]["input_ids"].shape[1], batches["rejected"]["input_ids"].shape[1]),
    }
    med = {n: [1000 * f(t[n]) for t in (step_t, fwd_t) for f in (min, statistics.median)] for n in names}
    return med, info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_memory(args.one, args)))
        return

    mem = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--one", name] + [
            f"--{k}={getattr(args, k)}" for k in ("pairs", "vocab", "hidden", "layers", "reps", "threads")
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mem[name] = r
    med, info = measure_time(args)
    print(f"model: V={args.vocab} H={args.hidden} layers={args.layers}; {args.pairs} pairs -> fused {info['rows']} rows x "
          f"T={info['padded_T']} (two forwards: {args.pairs} x T={info['padded_T_two'][0]}, {args.pairs} x "
          f"T={info['padded_T_two'][1]}); {info['tokens']} real tokens, {info['response_tokens']} response tokens "
          f"(prompt {100 * (1 - info['response_tokens'] / info['tokens']):.0f}% of real tokens); "
          f"torch threads={args.threads}, {args.reps} timed rounds")
    print()
    # Size of the float32 logits tensor each configuration builds (analytic).
    B, V = args.pairs, args.vocab
    logits_mb = {
        "fused + response-only": info["response_tokens"] * V * 4 / 2**20,
        "fused + full logits": info["rows"] * info["padded_T"] * V * 4 / 2**20,
        "two forwards + response-only": info["response_tokens"] * V * 4 / 2**20,
        "two forwards + full logits": B * sum(info["padded_T_two"]) * V * 4 / 2**20,
    }
    print("| configuration | fwd+bwd step, ms (min / median) | fwd no-grad, ms (min / median) "
          "| peak extra RSS, step (MB) | logits tensor (MB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in CONFIGS:
        s_min, s_med, f_min, f_med = med[name]
        print(f"| {name} | {s_min:.0f} / {s_med:.0f} | {f_min:.0f} / {f_med:.0f} "
              f"| {mem[name]['peak_extra_mb']:.0f} | {logits_mb[name]:.0f} |")
    print()
    sums = ", ".join(f"{mem[n]['checksum']:.3f}" for n in CONFIGS)
    print(f"sum of all sequence log-probs per configuration (must agree): {sums}")


if __name__ == "__main__":
    main()
