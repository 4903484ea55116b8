"""Time and peak memory of per-token log-probs, forward + backward.

    python bench/logprobs.py                                   # CPU: N 1024,4096  V 32000  fp32
    python bench/logprobs.py --n 4096,16384 --v 32000,128256 --dtype bfloat16   # GPU

Rows: naive = log_softmax(logits.float()).gather (the formula other trainers
use), reference = kernels' chunked PyTorch path, triton = the kernels (CUDA
only), each with and without inplace_backward. "peak beyond logits" is the
highest memory in use during forward + backward minus what the logits, targets
and upstream gradient already held, also as a multiple of one N×V float32 tensor.
CPU: each row runs in a fresh subprocess and reads its peak RSS (ru_maxrss)
with large blocks mmapped (MALLOC_MMAP_THRESHOLD_) so RSS follows live memory.
GPU: torch.cuda.max_memory_allocated; the floor is 3·N·V·bytes ÷ the measured
copy bandwidth (forward reads the logits once, backward reads and writes them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ["naive", "reference", "reference+inplace", "triton", "triton+inplace"]


def _fwd_bwd(impl, logits, targets, g):
    import torch

    import kernels

    x = logits.detach().requires_grad_(True)
    if impl == "naive":
        out = kernels.naive_token_logprobs(x, targets, dtype=torch.float32)
    else:
        name, _, inplace = impl.partition("+")
        out = kernels.token_logprobs(x, targets, inplace_backward=bool(inplace), impl=name)
    (grad,) = torch.autograd.grad(out, x, g)
    return grad


def run_one(impl: str, n: int, v: int, dtype: str, device: str, repeats: int, threads: int | None) -> dict:
    """One row, measured in this process (a fresh one on CPU)."""
    import resource

    import torch

    if threads:
        torch.set_num_threads(threads)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    # Warm-up on small tensors first (compiles kernels, pages in code), so its
    # temporaries are below the high-water mark the full-size tensors set.
    w = max(1, n // 16)
    _fwd_bwd(impl, torch.randn(w, v, device=device).to(getattr(torch, dtype)),
             torch.randint(0, v, (w,), device=device), torch.randn(w, device=device))
    sync()
    logits = torch.randn(n, v, device=device).to(getattr(torch, dtype))
    targets = torch.randint(0, v, (n,), device=device)
    g = torch.randn(n, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grad = _fwd_bwd(impl, logits, targets, g)
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # Current RSS now (not the high-water mark, which earlier frees may hold above it).
        with open("/proc/self/statm") as f:
            base = int(f.read().split()[1]) * resource.getpagesize()
        grad = _fwd_bwd(impl, logits, targets, g)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    del grad
    times = []
    for _ in range(repeats):
        # In place overwrites the logits with their gradient; the values stay
        # finite and the work is the same, so timing reuses them.
        sync()
        t0 = time.perf_counter()
        _fwd_bwd(impl, logits, targets, g)
        sync()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "N": n, "V": v, "dtype": dtype, "ms": 1e3 * statistics.median(times),
            "peak_bytes": peak, "nv_f32_bytes": n * v * 4}


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write), for the floor."""
    import torch

    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="1024,4096", help="comma-separated row counts N")
    ap.add_argument("--v", default="32000", help="comma-separated vocabulary sizes V")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 CPU, bf16 GPU)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU intra-op threads (default: torch's). On a shared CPU, 1 avoids OpenMP "
                         "barrier stalls that make timings swing 10x with the other processes' load")
    ap.add_argument("--impls", default=None, help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)   # internal: run one CPU row
    args = ap.parse_args()
    if args._one:
        print(json.dumps(run_one(**json.loads(args._one))))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    impls = args.impls.split(",") if args.impls else [i for i in IMPLS if device == "cuda" or "triton" not in i]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        ap.error(f"--impls: unknown {bad}; choose from {IMPLS}")
    if device == "cpu" and any("triton" in i for i in impls):
        ap.error("--impls: triton rows need a CUDA device (the CPU interpreter is not a benchmark)")
    bandwidth = copy_bandwidth() if device == "cuda" else None
    if device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU"
    threads = args.threads or torch.get_num_threads()
    print(f"# {machine}, torch {torch.__version__}, {dtype}, {threads} intra-op thread(s), median of {args.repeats}")
    print("# command: python bench/logprobs.py " + " ".join(sys.argv[1:]))
    cols = "| N | V | impl | fwd+bwd ms | peak beyond logits (MB) | × N·V fp32 |"
    if bandwidth:
        cols += " 3-pass floor ms | ms ÷ floor |"
    print(cols)
    print("|" + " --- |" * (cols.count("|") - 1))
    for n in map(int, args.n.split(",")):
        for v in map(int, args.v.split(",")):
            for impl in impls:
                spec = dict(impl=impl, n=n, v=v, dtype=dtype, device=device, repeats=args.repeats,
                            threads=args.threads)
                if device == "cpu":
                    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
                               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
                    res = subprocess.run([sys.executable, __file__, "--_one", json.dumps(spec)], env=env,
                                         capture_output=True, text=True)
                    if res.returncode:
                        sys.exit(f"{impl} N={n} V={v} failed:\n{res.stderr}")
                    row = json.loads(res.stdout.strip().splitlines()[-1])
                else:
                    row = run_one(**spec)
                    torch.cuda.empty_cache()
                line = (f"| {n} | {v} | {impl} | {row['ms']:.1f} | {row['peak_bytes'] / 2**20:.0f} | "
                        f"{row['peak_bytes'] / row['nv_f32_bytes']:.2f} |")
                if bandwidth:
                    floor = 3 * n * v * torch.finfo(getattr(torch, dtype)).bits / 8 / bandwidth * 1e3
                    line += f" {floor:.2f} | {row['ms'] / floor:.2f} |"
                print(line, flush=True)


if __name__ == "__main__":
    main()
