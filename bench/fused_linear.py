"""Fused lm_head + log-prob (kernels.linear_token_logprobs) vs lm_head then token_logprobs, on CPU.

    python bench/fused_linear.py [--rows 4096] [--hidden 256] [--vocab 32000,128256] [--repeats 2] [--threads 1]

Each (V, path) runs in a fresh process: hidden [R, H] and weight [V, H] float32 with
requires_grad, forward + backward with a per-row upstream gradient (the DPO case), median
time of `repeats` runs after one warm-up at R / 8. "peak beyond inputs" = peak RSS minus the
RSS once the inputs, targets and upstream gradient exist; it includes the gradients of the
hidden states [R, H] and of the weight [V, H], which both paths produce, so "extra" subtracts
them: what each path needs beyond its own inputs and outputs, against one [R, V] float32.
Large blocks are mmapped (MALLOC_MMAP_THRESHOLD_) so RSS follows live memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    import kernels
    R, H, V, path, repeats, threads = json.loads(sys.argv[1])
    torch.set_num_threads(threads)
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(R, H, generator=g)).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_(True)
    targets = torch.randint(0, V, (R,), generator=g)
    up = torch.randn(R, generator=g)

    def step(rows):
        h = hidden[:rows]
        if path == "fused":
            out = kernels.linear_token_logprobs(h, weight, targets[:rows])
        else:
            out = kernels.token_logprobs(h @ weight.t(), targets[:rows], inplace_backward=True)
        gh, gw = torch.autograd.grad(out, (hidden, weight), up[:rows])
        return gh, gw

    step(max(1, R // 8))                                         # warm-up: code paged in, pools made
    base = rss()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gh, gw = step(R)
        times.append(time.perf_counter() - t0)
        del gh, gw
    times.sort()
    print(json.dumps({"ms": 1000 * times[len(times) // 2], "peak": peak() - base}))
""")


def run(R, H, V, path, repeats, threads):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_="65536")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps([R, H, V, path, repeats, threads])],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", default="32000,128256")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    R, H = a.rows, a.hidden
    print(f"R={R} H={H} float32, CPU, {a.threads} thread(s), median of {a.repeats}")
    print("| V | path | fwd+bwd ms | peak beyond inputs MB | extra beyond grads MB | extra / [R, V] fp32 | time / unfused |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for V in map(int, a.vocab.split(",")):
        rv = R * V * 4
        grads = (R * H + V * H) * 4
        res = {p: run(R, H, V, p, a.repeats, a.threads) for p in ("unfused", "fused")}
        for p in ("unfused", "fused"):
            r = res[p]
            extra = max(0, r["peak"] - grads)
            print(f"| {V} | {p} | {r['ms']:.0f} | {r['peak'] / 1e6:.1f} | {extra / 1e6:.1f} | {extra / rv:.3f} | "
                  f"{r['ms'] / res['unfused']['ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
