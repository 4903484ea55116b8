"""Mixture-of-experts MLP on the CPU: grouped matmuls vs the per-expert loop vs every expert on every token.

    python bench/moe.py                       # E = 8, top-2, H = 512, I = 1024, 1024 tokens, float32
    python bench/moe.py --tokens 4096 --dtype bfloat16 --threads 2
    python bench/moe.py --device cuda --dtype bfloat16 --experts 8 --hidden 4096 --intermediate 14336 --tokens 8192

One sparse layer (sdpo.models.moe.SparseMoE: router + 8 stacked SwiGLU experts), a forward and a
backward of a weighted sum of its output plus the load-balancing loss, three ways:

  grouped  tokens sorted by expert, one torch._grouped_mm per projection (the default where it runs)
  loop     the same sorted rows, one F.linear per expert per projection (the fallback; one host sync)
  dense    every expert on every token, [E, N, I] and [E, N, H] intermediates, the outputs weighted by
           the router's top-k weights (zero elsewhere): what "no shortcut" rules out, as the baseline

Reported: median ms per fwd+bwd over --repeat runs after a warm-up; the bytes saved for backward
(every tensor autograd keeps, counted once per storage through saved_tensors_hooks: the activation
memory the step holds between forward and backward); the peak resident set of one step above the
resident set before it (Linux VmHWM, reset first; each variant in a fresh process with glibc's mmap
threshold fixed at 128 KiB, so freed tensors leave the resident set); and the max |difference| of the
output from the first variant's. With --device cuda (bench/gpu.sh): the time is synchronised, and the
peak is torch.cuda.max_memory_allocated during the measured step above the memory allocated before it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdpo.models.moe import SparseMoE, load_balancing_loss  # noqa: E402


def dense_forward(moe: SparseMoE, x):
    """Every expert on every token (the baseline, never used by the model)."""
    B, T, H = x.shape
    flat = x.reshape(-1, H)
    _, probs, top_w, top_i = moe.route(flat)
    weights = torch.zeros_like(probs).scatter(1, top_i, top_w.float())  # [N, E]
    e = moe.experts
    gate = torch.einsum("nh,eih->eni", flat, e.gate_proj)  # [E, N, I]
    up = torch.einsum("nh,eih->eni", flat, e.up_proj)
    y = torch.einsum("eni,ehi->enh", e.act(gate) * up, e.down_proj)  # [E, N, H]
    out = torch.einsum("enh,ne->nh", y, weights.to(y.dtype))
    counts = torch.zeros_like(probs).scatter_(1, top_i, 1.0)
    from sdpo.models.moe import RouterStats

    return out.view(B, T, H), RouterStats(probs, counts, torch.zeros(flat.shape[0]), 1)


def rss_peak_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cuda_peak_mb(moe, x, w, how) -> float:
    """torch.cuda.max_memory_allocated during one step, above what was allocated before it (MB)."""
    moe.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(moe, x, w, how)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def step(moe, x, w, how):
    moe.zero_grad(set_to_none=True)
    if how == "dense":
        y, stats = dense_forward(moe, x)
    else:
        moe.experts.impl = how
        y, stats = moe(x)
    ((y * w).sum() + 0.01 * load_balancing_loss(stats)).backward()
    return y.detach()


def saved_bytes(moe, x, w, how) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(moe, x, w, how)
    return sum(seen.values())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: peak from torch.cuda.max_memory_allocated instead of the resident set")
    ap.add_argument("--peak-rss-of", choices=["grouped", "loop", "dense"], help=argparse.SUPPRESS)  # the worker
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    torch.manual_seed(0)
    with device:  # built where it runs: a Mixtral layer is 5.6 GB in float32
        moe = SparseMoE(args.experts, args.top_k, args.hidden, args.intermediate, "silu", normalize=True,
                        weights_in_float32=True).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, device=device) / p.shape[-1] ** 0.5)
    x = torch.randn(1, args.tokens, args.hidden, dtype=dtype, device=device)
    w = torch.randn_like(x)
    if args.peak_rss_of:  # a fresh process: one warm-up step, then the measured one
        step(moe, x, w, args.peak_rss_of)
        moe.zero_grad(set_to_none=True)
        base = rss_kb()
        reset_peak()
        step(moe, x, w, args.peak_rss_of)
        print((rss_peak_kb() - base) / 1024)
        return
    ways = ["grouped", "loop", "dense"] if hasattr(torch, "_grouped_mm") else ["loop", "dense"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"E={args.experts} top-{args.top_k} H={args.hidden} I={args.intermediate} tokens={args.tokens} "
          f"{args.dtype}, {where}, torch {torch.__version__}")
    peak_name = "peak CUDA allocated above start MB" if device.type == "cuda" else "peak RSS above start MB"
    print(f"| compute | ms per fwd+bwd (median) | saved for backward MB | {peak_name} | max abs diff vs first |")
    print("| --- | ---: | ---: | ---: | ---: |")
    first = None
    for how in ways:
        step(moe, x, w, how)  # warm-up
        times = []
        for _ in range(args.repeat):
            sync(device)
            t0 = time.perf_counter()
            y = step(moe, x, w, how)
            sync(device)
            times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = cuda_peak_mb(moe, x, w, how)
        else:
            worker = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--peak-rss-of", how]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            peak = float(subprocess.run(worker, env=env, capture_output=True, text=True, check=True).stdout.split()[-1])
        saved = saved_bytes(moe, x, w, how) / 1e6
        first = y if first is None else first
        diff = (y.float() - first.float()).abs().max().item()
        print(f"| {how} | {1000 * statistics.median(times):.1f} | {saved:.1f} | {peak:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
