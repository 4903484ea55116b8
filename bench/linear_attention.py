"""The gated delta rule on the CPU: chunked (sdpo.models.linear_attention.chunk_gated_delta_rule) against
the token-by-token recurrence, time and peak memory per sequence length.

    python bench/linear_attention.py [--lengths 512 1024 2048 4096] [--heads 4] [--dim 128] [--chunk 64]
    python bench/linear_attention.py --plan    # sdpo.runtime.memory's plan vs a measured Qwen3.5 DPO step
    python bench/linear_attention.py --device cuda --heads 32 --lengths 512 1024 2048 4096 8192

One value head block of Qwen3.5's size (d_k = d_v = 128; the 9B model has 32 such heads per layer,
--heads sets how many run here), batch 1, float32, one thread. Each (mode, T, pass) runs in a fresh
process: "forward" without gradients, "train" forward + backward with an upstream gradient. Peak is
VmHWM over the process's RSS once the inputs exist (glibc's mmap threshold lowered so freed blocks
leave the resident set); time is the best of --repeat runs after one warm-up (the recurrence: one run).
With --device (bench/gpu.sh: cuda; cpu is its --dry-run stand-in) everything runs in this process on that
device, timed with synchronisation, the peak from torch.cuda.max_memory_allocated above the inputs, and the
recurrence (a Python loop over tokens) only up to --recurrent-max tokens.
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
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from sdpo.models.linear_attention import chunk_gated_delta_rule, l2_normalize, recurrent_gated_delta_rule

    a = json.loads(sys.argv[1])
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
    peak = lambda: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))) * 1024
    g = torch.Generator().manual_seed(0)
    T, H, d = a["T"], a["heads"], a["dim"]
    train = a["pass"] == "train"
    q = (l2_normalize(torch.randn(1, T, H, d, generator=g)) * d ** -0.5).requires_grad_(train)
    k = l2_normalize(torch.randn(1, T, H, d, generator=g)).requires_grad_(train)
    v = torch.randn(1, T, H, d, generator=g).requires_grad_(train)
    decay = (-torch.rand(1, T, H, generator=g)).requires_grad_(train)
    beta = torch.rand(1, T, H, generator=g).requires_grad_(train)
    up = torch.randn(1, T, H, d, generator=g)
    if a["mode"] == "chunked":
        fn = lambda: chunk_gated_delta_rule(q, k, v, decay, beta, chunk_size=a["chunk"])
    else:
        fn = lambda: recurrent_gated_delta_rule(q, k, v, decay, beta)

    def run():
        with torch.set_grad_enabled(train):
            o, s = fn()
            if train:
                torch.autograd.backward([o, s], [up, torch.ones_like(s)])
                for x in (q, k, v, decay, beta):
                    x.grad = None

    base = rss()
    times = []
    for i in range(a["repeat"] + (a["mode"] == "chunked")):  # the chunked form: one warm-up run
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    best = min(times[1:] if a["mode"] == "chunked" else times)
    print(json.dumps({"time_s": best, "peak_mb": (peak() - base) / 2**20}))
""")


PLAN_WORKER = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from sdpo.logprobs import concatenated_forward
    from sdpo.models.model import ModelConfig, Transformer

    a = json.loads(sys.argv[1])
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
    peak = lambda: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))) * 1024
    g = torch.Generator().manual_seed(0)
    B, T = a["pairs"], a["seq"]
    ids = torch.randint(0, a["config"]["vocab_size"], (2 * B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 2] = -100
    batch = {"input_ids": ids, "labels": labels}
    base = rss()
    model = Transformer(ModelConfig(**a["config"]))
    model.init_weights(seed=0)
    model.gradient_checkpointing = a["checkpoint"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for step in range(2):
        c, r = concatenated_forward(model, batch)
        (-(torch.nn.functional.logsigmoid(0.1 * (c.logps - r.logps))).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps({"peak_over_base": peak() - base}))
""")
PLAN_CONFIG = dict(model_type="qwen3_5_text", vocab_size=8000, hidden_size=256, intermediate_size=688,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   partial_rotary_factor=0.25, layer_types=["linear_attention"] * 3 + ["full_attention"],
                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64)


def check_plan(pairs: int = 4, seq: int = 256) -> None:
    """sdpo.runtime.memory's plan against the measured peak of two DPO steps of a small Qwen3.5 (float32)."""
    sys.path.insert(0, str(ROOT))
    from sdpo.models.model import ModelConfig, checkpoint_every
    from sdpo.runtime.memory import Setup, plan

    print(f"\nmemory plan: Qwen3.5 H=256, 3 linear + 1 full layers, V=8000, {pairs} pairs x 2 rows x {seq} tokens, "
          "float32, fused logits, CPU")
    print("| checkpointing | planned MB | measured MB | planned / measured |")
    print("| --- | ---: | ---: | ---: |")
    for ckpt in ("none", "full"):
        s = Setup(world_size=1, micro_batch_size=pairs, max_length=seq, max_prompt_length=seq // 2, bf16=False,
                  checkpoint=checkpoint_every(ckpt), device="cpu")
        p = plan(ModelConfig(**PLAN_CONFIG), s)["total"]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", PLAN_WORKER, json.dumps(dict(config=PLAN_CONFIG, pairs=pairs, seq=seq,
                                                                                 checkpoint=ckpt))],
                             capture_output=True, text=True, env=env, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])["peak_over_base"]
        print(f"| {ckpt} | {p / 1e6:.1f} | {m / 1e6:.1f} | {p / m:.3f} |", flush=True)


def measure(args: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(args)], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_on(device: str, a: dict) -> dict:
    """WORKER's measurement in this process on `device` (warm-up for both forms; peak NaN off CUDA)."""
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from sdpo.models.linear_attention import chunk_gated_delta_rule, l2_normalize, recurrent_gated_delta_rule

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    T, H, d = a["T"], a["heads"], a["dim"]
    train = a["pass"] == "train"
    r = lambda *s: torch.randn(*s, generator=g, device=dev)  # noqa: E731
    q = (l2_normalize(r(1, T, H, d)) * d ** -0.5).requires_grad_(train)
    k = l2_normalize(r(1, T, H, d)).requires_grad_(train)
    v = r(1, T, H, d).requires_grad_(train)
    decay = (-torch.rand(1, T, H, generator=g, device=dev)).requires_grad_(train)
    beta = torch.rand(1, T, H, generator=g, device=dev).requires_grad_(train)
    up = r(1, T, H, d)
    fn = (lambda: chunk_gated_delta_rule(q, k, v, decay, beta, chunk_size=a["chunk"])) if a["mode"] == "chunked" \
        else (lambda: recurrent_gated_delta_rule(q, k, v, decay, beta))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run():
        with torch.set_grad_enabled(train):
            o, s = fn()
            if train:
                torch.autograd.backward([o, s], [up, torch.ones_like(s)])
                for x in (q, k, v, decay, beta):
                    x.grad = None

    run()  # warm-up
    times = []
    for _ in range(a["repeat"]):
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else float("nan")
    return {"time_s": min(times), "peak_mb": peak}


def main_on(args) -> None:
    import torch

    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu stand-in"
    print(f"gated delta rule on {where}, batch 1, {args.heads} heads x d_k = d_v = {args.dim}, float32, chunk "
          f"{args.chunk}; the recurrence up to T = {args.recurrent_max}; best of {args.repeat} after a warm-up; "
          "peak = max allocated above the inputs")
    print("| T | pass | chunked ms | recurrent ms | speed-up | chunked Mtokens/s | chunked peak MB | recurrent peak MB |")
    print("|---|------|-----------:|-------------:|---------:|------------------:|----------------:|------------------:|")
    for T in args.lengths:
        for pas in ("forward", "train"):
            a = dict(T=T, heads=args.heads, dim=args.dim, chunk=args.chunk, repeat=args.repeat, **{"pass": pas})
            c = measure_on(args.device, dict(a, mode="chunked"))
            rec = measure_on(args.device, dict(a, mode="recurrent")) if T <= args.recurrent_max else None
            rt, rp, sp = ("—", "—", "—") if rec is None else (
                f"{rec['time_s'] * 1e3:.1f}", f"{rec['peak_mb']:.0f}", f"{rec['time_s'] / c['time_s']:.1f}x")
            print(f"| {T} | {pas} | {c['time_s'] * 1e3:.1f} | {rt} | {sp} | {T / c['time_s'] / 1e6:.2f} | "
                  f"{c['peak_mb']:.0f} | {rp} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--plan", action="store_true", help="only the memory plan against a measured DPO step")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="run in this process on this device (bench/gpu.sh: cuda; cpu is its --dry-run stand-in)")
    ap.add_argument("--recurrent-max", type=int, default=2048, help="with --device: the longest T the recurrence runs")
    args = ap.parse_args()
    if args.device:
        main_on(args)
        return
    if args.plan:
        check_plan()
        return
    print(f"gated delta rule, batch 1, {args.heads} heads x d_k = d_v = {args.dim}, float32, 1 thread, "
          f"chunk {args.chunk}; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at start")
    print("| T | pass | chunked s | recurrent s | speed-up | chunked peak MB | recurrent peak MB |")
    print("|---|------|-----------|-------------|----------|-----------------|-------------------|")
    for T in args.lengths:
        for pas in ("forward", "train"):
            r = {mode: measure(dict(mode=mode, T=T, heads=args.heads, dim=args.dim, chunk=args.chunk, repeat=args.repeat,
                                    **{"pass": pas})) for mode in ("chunked", "recurrent")}
            c, rec = r["chunked"], r["recurrent"]
            print(f"| {T} | {pas} | {c['time_s']:.3f} | {rec['time_s']:.3f} | {rec['time_s'] / c['time_s']:.1f}x | "
                  f"{c['peak_mb']:.0f} | {rec['peak_mb']:.0f} |", flush=True)
    print(f"load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
