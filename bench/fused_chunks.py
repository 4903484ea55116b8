"""CPU A/B for issue 29 finding 4: do the fused lm_head's CUDA chunk sizes (kernels.fused_linear:
2^27 logits per chunk, >= 1024 rows, 16384-row vocab blocks) or a float32 weight-gradient GEMM
pay on CPU too?

    python bench/fused_chunks.py [--rows 2048] [--hidden 256] [--vocab 32000] [--repeats 3] [--threads 1]

A: kernels.linear_token_logprobs forward + backward (per-row upstream gradient) with the CPU sizes
   vs the CUDA sizes, float32 and bfloat16, interleaved A B A B, median seconds.
B: the 16-bit weight-gradient accumulation acc[Vb, H] += dzᵀ[Vb, c] h[c, H] on CPU (no
   float32-output GEMM there): a bf16 product added to float32 (the kernel before issue 29) vs
   float32 copies of both operands and addmm_ (the kernel now); median ms and max error against float64.
Prints markdown tables; say what else ran on the machine next to the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from kernels import fused_linear  # noqa: E402


def run_fused(h, w, t, up, chunk, vocab_block):
    fused_linear.VOCAB_BLOCK = vocab_block
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    t0 = time.perf_counter()
    out = kernels.linear_token_logprobs(hh, ww, t, chunk_size=chunk, impl="reference")
    torch.autograd.grad(out, (hh, ww), up)
    return time.perf_counter() - t0


def ab_chunks(R, H, V, repeats):
    rows = []
    cpu_c = fused_linear.rows_per_chunk(R, V, None, "cpu")
    cuda_c = min(R, max(fused_linear.CUDA_MIN_ROWS, fused_linear.CUDA_CHUNK_ELEMENTS // V))
    block0 = fused_linear.VOCAB_BLOCK
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(R, H, generator=g).to(dtype)
        w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
        t = torch.randint(0, V, (R,), generator=g)
        up = torch.randn(R, generator=g)
        times = {"cpu": [], "cuda": []}
        run_fused(h[:64], w, t[:64], up[:64], None, block0)          # warm-up
        for _ in range(repeats):
            times["cpu"].append(run_fused(h, w, t, up, cpu_c, block0))
            times["cuda"].append(run_fused(h, w, t, up, cuda_c, fused_linear.CUDA_VOCAB_BLOCK))
        fused_linear.VOCAB_BLOCK = block0
        a, b = statistics.median(times["cpu"]), statistics.median(times["cuda"])
        rows.append([str(dtype).replace("torch.", ""), f"{cpu_c} / {block0}", f"{a:.2f}",
                     f"{cuda_c} / {fused_linear.CUDA_VOCAB_BLOCK}", f"{b:.2f}", f"{b / a:.2f}"])
    return rows


def ab_accumulate(Vb, c, H, repeats):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(Vb, c, generator=g).to(torch.bfloat16)
    b = torch.randn(c, H, generator=g).to(torch.bfloat16)
    exact = a.double() @ b.double()
    out = []
    for name, fn in (("acc.add_(a @ b)  [bf16 product]", lambda acc: acc.add_(a @ b)),
                     ("acc.addmm_(a.float(), b.float())", lambda acc: acc.addmm_(a.float(), b.float()))):
        ts = []
        for _ in range(repeats + 1):
            acc = torch.zeros(Vb, H)
            t0 = time.perf_counter()
            fn(acc)
            ts.append(time.perf_counter() - t0)
        err = (acc.double() - exact).abs().max().item()
        out.append([name, f"{statistics.median(ts[1:]) * 1e3:.1f}", f"{err:.2e}"])
    return out


def table(headers, rows):
    print("| " + " | ".join(headers) + " |")
    print("|" + " --- |" * len(headers))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); R={args.rows}, H={args.hidden}, V={args.vocab}\n")
    print("A: fused lm_head + log-prob, forward + backward, seconds (median)")
    table(["dtype", "CPU rows / vocab block", "s", "CUDA rows / vocab block", "s", "CUDA / CPU"],
          ab_chunks(args.rows, args.hidden, args.vocab, args.repeats))
    print(f"\nB: 16-bit weight-gradient accumulation [4096, {fused_linear.MIN_ROWS}] x [{fused_linear.MIN_ROWS}, "
          f"{args.hidden * 4}] into float32")
    table(["how", "ms (median)", "max |err| vs float64"], ab_accumulate(4096, fused_linear.MIN_ROWS, args.hidden * 4,
                                                                         args.repeats))


if __name__ == "__main__":
    main()
