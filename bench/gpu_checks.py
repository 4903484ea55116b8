"""GPU-only checks and timings that the CPU test suite cannot make, as tables on stdout.

    python bench/gpu_checks.py            # on a CUDA machine (bench/gpu.sh runs it)

1. Packed + shared-prompt rows through FlexAttention (the CUDA path) vs padded rows through SDPA:
   per-pair chosen/rejected log-probs, bf16 and float32.
2. The fused lm_head + log-prob (kernels.linear_token_logprobs, Triton per chunk) vs the unfused
   lm_head + kernel: max error against float64, time per fwd+bwd, peak memory beyond the inputs.
3. A float32 model under bf16 autocast on packed rows (what one GPU without FSDP runs): q, k and v
   must reach attention in one dtype (FlexAttention rejects mixed ones), log-probs near float32's.
On a machine without CUDA it says so and exits 0 (nothing to measure), unless --device cpu: then
every check runs on CPU stand-ins (tiny shapes, the same entry points, FlexAttention compiled on
CPU where this torch can, no-grad only there) so that a GPU run can fail only for GPU reasons.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from sdpo.data.packing import collate, pack  # noqa: E402
from sdpo.data.pairs import TokenizedPair  # noqa: E402
from sdpo.logprobs import pack_options, packed_forward, pair_forward  # noqa: E402
from sdpo.models import attention as A  # noqa: E402
from sdpo.models import blocks as M  # noqa: E402  (its attend: the spy below)
from sdpo.models.model import ModelConfig, Transformer  # noqa: E402

# The CUDA row layout (one row padded to FlexAttention's block), also for the CPU stand-in.
CUDA_PACKING = pack_options(packing=True, share_prompt=True, device=torch.device("cuda"))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_pairs(n: int, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(5, 300))]
        shared = rng.randrange(3, vocab)  # chosen and rejected often share a first token
        chosen = [shared] + [rng.randrange(3, vocab) for _ in range(rng.randint(0, 400))] + [2]
        rejected = [shared] + [rng.randrange(3, vocab) for _ in range(rng.randint(0, 400))] + [2]
        pairs.append(TokenizedPair(prompt, chosen, rejected, i))
    return pairs


def table(headers, rows) -> str:
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(x) for c, x in zip(cells, w)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (x + 2) for x in w) + "|", *(line(r) for r in rows)])


@torch.no_grad()
def check_flex(device, tiny: bool) -> None:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        if tiny:
            cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
        else:
            cfg = ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
        model = Transformer(cfg)
        model.init_weights(seed=0)
        model = model.to(device, dtype).eval()
        pairs = random_pairs(4 if tiny else 16, cfg.vocab_size)
        packed = {k: v.to(device) if torch.is_tensor(v) else v for k, v in pack(pairs, pad_id=0, **CUDA_PACKING).items()}
        padded = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(pairs, pad_id=0).items()}
        times = {}
        for name, batch in (("packed+flex", packed), ("padded+sdpa", padded)):
            fwd = (lambda b: packed_forward(model, b, backend="flex")) if "doc_ids" in batch else \
                (lambda b: pair_forward(model, b))
            fwd(batch)  # compile / warm up
            sync(device)
            t0 = time.perf_counter()
            out = fwd(batch)
            sync(device)
            times[name] = (time.perf_counter() - t0, out)
        (tp, (pc, pr)), (tu, (uc, ur)) = times["packed+flex"], times["padded+sdpa"]
        rel = max(((pc.logps - uc.logps).abs() / uc.logps.abs().clamp(min=1)).max().item(),
                  ((pr.logps - ur.logps).abs() / ur.logps.abs().clamp(min=1)).max().item())
        tokens_packed = int((packed["doc_ids"] > 0).sum()) if "doc_ids" in packed else -1
        rows.append([str(dtype).replace("torch.", ""), f"{rel:.2e}", f"{tp * 1e3:.1f}", f"{tu * 1e3:.1f}",
                     tokens_packed, int(padded["attention_mask"].numel())])
        if rel > (2e-2 if dtype == torch.bfloat16 else 1e-4):
            raise AssertionError(f"packed FlexAttention rows differ from padded SDPA rows by {rel:.2e} ({dtype})")
    print(f"FlexAttention packed rows vs padded SDPA rows ({len(pairs)} pairs, {cfg.num_hidden_layers} layers, "
          f"H={cfg.hidden_size}, V={cfg.vocab_size}, {device.type}):")
    print(table(["dtype", "max rel |Δ log p| per pair", "packed ms", "padded ms", "packed tokens", "padded tokens"],
                rows))


def check_autocast_dtypes(device, tiny: bool) -> None:
    """Issue 29 finding 1: a float32 model (one GPU, no FSDP) under bf16 autocast on packed rows. q, k, v
    must reach attend in one dtype; the packed FlexAttention log-probs stay near the float32 ones."""
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if tiny else \
        dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4)
    cfg = ModelConfig(vocab_size=512 if tiny else 32000, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, **size)
    model = Transformer(cfg)
    model.init_weights(seed=1)
    model = model.to(device).eval()
    pairs = random_pairs(4 if tiny else 16, cfg.vocab_size, seed=1)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in pack(pairs, pad_id=0, **CUDA_PACKING).items()}
    seen = []
    real_attend = M.attend

    def spy(q, k, v, mask, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real_attend(q, k, v, mask, **kw)

    M.attend = spy
    try:
        with torch.no_grad():
            want, _ = packed_forward(model, batch, backend="flex")
            with torch.autocast(device.type, dtype=torch.bfloat16):
                got, _ = packed_forward(model, batch, backend="flex")
    finally:
        M.attend = real_attend
    mixed = sorted({str(d) for d in seen[len(seen) // 2:] if len(set(d)) > 1})
    rel = ((got.logps - want.logps).abs() / want.logps.abs().clamp(min=1)).max().item()
    print(f"\nfloat32 model under bf16 autocast, packed rows through FlexAttention ({device.type}):")
    print(table(["q, k, v dtypes at attend", "mixed", "max rel |Δ log p| vs float32"],
                [[", ".join(str(x).replace("torch.", "") for x in seen[-1]), "yes: " + mixed[0] if mixed else "no",
                  f"{rel:.2e}"]]))
    if mixed or rel > 2e-2:
        raise AssertionError(f"autocast: q, k, v reach attend as {mixed or seen[-1]}; rel err {rel:.2e}")


def peak_beyond(fn, device) -> tuple[float, float]:
    if device.type != "cuda":   # CPU stand-in: time only
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, (torch.cuda.max_memory_allocated(device) - base) / 2**20


def check_fused(device, rows_n: int, tiny: bool) -> None:
    rows = []
    for V in ((1000, 4099) if tiny else (32000, 128256)):
        H = 64 if tiny else 4096
        g = torch.Generator(device=device).manual_seed(0)
        h = (torch.randn(rows_n, H, device=device, generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
        w = (torch.randn(V, H, device=device, generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
        t = torch.randint(0, V, (rows_n,), device=device, generator=g)
        up = torch.randn(rows_n, device=device, generator=g)
        with torch.no_grad():
            truth = torch.log_softmax(h.double() @ w.double().T, -1).gather(1, t[:, None])[:, 0]

        def fused():
            out = kernels.linear_token_logprobs(h, w, t)
            (out * up).sum().backward()
            return out

        def unfused():
            out = kernels.token_logprobs(h @ w.T, t, inplace_backward=True)
            (out * up).sum().backward()
            return out

        for name, fn in (("fused", fused), ("unfused", unfused)):
            fn()  # warm up (Triton compile)
            h.grad = w.grad = None
            secs, mb = peak_beyond(fn, device)
            with torch.no_grad():
                err = (kernels.linear_token_logprobs(h, w, t) if name == "fused"
                       else kernels.token_logprobs(h @ w.T, t)).double().sub(truth).abs().max().item()
            rows.append([V, name, f"{secs * 1e3:.1f}", f"{mb:.0f}", f"{rows_n * V * 2 / 2**20:.0f}", f"{err:.2e}"])
            h.grad = w.grad = None
    print(f"\nFused lm_head + log-prob vs unfused (R={rows_n}, H={H}, bf16, fwd+bwd, {device.type}):")
    print(table(["V", "path", "ms", "peak MB beyond inputs", "[R, V] bf16 MB", "max |err| vs fp64"], rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="R for the fused lm_head check (8192; 256 on CPU)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the stand-in run of bench/gpu.sh --dry-run (tiny shapes)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_checks: no CUDA device here; nothing to measure (run on a GPU machine: bench/gpu.sh)")
        return 0
    device = torch.device(args.device)
    tiny = device.type == "cpu"
    if tiny:
        A.FLEX_COMPILED_DEVICES.add("cpu")   # compiled FlexAttention on CPU: forward only in this torch
        print(f"device: cpu stand-in, torch {torch.__version__}")
    else:
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    check_flex(device, tiny)
    check_autocast_dtypes(device, tiny)
    check_fused(device, args.rows or (256 if tiny else 8192), tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
