"""Mixture-of-experts and Qwen3.5 on a GPU: the checks the CPU suite cannot make, as tables on stdout.

    python bench/gpu_models.py moe            # on a CUDA machine (bench/gpu.sh runs both)
    python bench/gpu_models.py qwen35
    python bench/gpu_models.py moe --device cpu   # bench/gpu.sh --dry-run's CPU stand-in

moe (tests/fixtures/moe: Mixtral top-2 and Qwen3-MoE top-2 / top-3 of 4 experts; tests/fixtures/qwen35_moe:
the Qwen3.5-MoE hybrid with a shared expert; all made by transformers):
  1. bf16 on the device, grouped (torch._grouped_mm) and the per-expert loop: logits and the gradients of a
     weighted log-prob sum + the load-balancing loss, against each other and against float32 on the CPU
     (itself within 1e-4 of transformers, tests/test_moe.py), in units of bf16 on the CPU's own error;
     the logits against transformers' bf16 logits; which path "auto" takes on the device.
  2. host syncs in one forward + backward: Tensor.item / tolist / cpu / bool ... calls (tests/test_moe.py's
     spy) and, on CUDA, the synchronizing CUDA calls torch.cuda.set_sync_debug_mode reports. The grouped
     path must make none; the loop makes one per sparse layer (its offsets.cpu()).
qwen35 (tests/fixtures/qwen35/text):
  3. the chunked gated delta rule on the device, float64 and float32, against the float64 token-by-token
     recurrence on the device: outputs, final state, gradients; float32 inputs under bf16 autocast unchanged.
  4. the fixture's logits on the device in float32 (within 1e-4 of transformers': unpadded, padded, 150
     tokens) and in bf16 (mean |difference| in units of bf16's own rounding, as tests/test_qwen35.py).
  5. one DPO step on packed shared-prompt rows (FlexAttention on CUDA) against separate padded rows,
     float32 and bf16: chosen / rejected log-probs, loss and gradients; the fixture pair's log-probs
     against transformers' own logits.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gpu_checks import table  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sdpo.data.packing import collate, pack  # noqa: E402
from sdpo.logprobs import concatenated_forward, pack_options, packed_forward  # noqa: E402
from sdpo.loss import preference_loss  # noqa: E402
from sdpo.models.checkpoint import load_model  # noqa: E402
from sdpo.models.linear_attention import chunk_gated_delta_rule, l2_normalize, recurrent_gated_delta_rule  # noqa: E402
from sdpo.models.moe import Experts, load_balancing_loss  # noqa: E402

MOE = ROOT / "tests" / "fixtures" / "moe"
MOE_FIXTURES = {name: MOE / name for name in ("mixtral", "qwen3_moe", "qwen3_moe_plain")}
MOE_FIXTURES["qwen35_moe"] = ROOT / "tests" / "fixtures" / "qwen35_moe" / "text"  # hybrid + shared expert
QWEN35 = ROOT / "tests" / "fixtures" / "qwen35" / "text"


def to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def rel(a, b) -> float:
    """||a - b|| / ||b|| over one tensor or a list of them (float64)."""
    a, b = (a, b) if isinstance(a, (list, tuple)) else ([a], [b])
    num = sum((x.double().cpu() - y.double().cpu()).square().sum() for x, y in zip(a, b))
    den = sum(y.double().cpu().square().sum() for y in b)
    return math.sqrt(num / den)


def check(failures: list, ok: bool, what: str) -> str:
    if not ok:
        failures.append(what)
    return "ok" if ok else "FAIL"


# ---------------------------------------------------------------------------------------------
# mixture of experts


def set_impl(model, impl: str) -> None:
    for m in model.modules():
        if isinstance(m, Experts):
            m.impl = impl


def moe_step(model, ids):
    """Logits and the gradients of Σ w · log p(next token) + 0.5 · aux loss (w not all ones)."""
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    w = torch.linspace(-1, 2, logp.numel(), device=logp.device).view_as(logp)
    ((logp * w).sum() + 0.5 * load_balancing_loss(model.router_stats)).backward()
    return logits.detach(), [p.grad for p in model.parameters()]  # on the device: no host read inside


def on_cpu(step):
    logits, grads = step
    return logits.float().cpu(), [g.float().cpu() for g in grads]


class HostSyncs:
    """Counts Tensor methods that read a tensor on the host and, on CUDA, synchronizing CUDA calls."""
    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu")

    def __init__(self, device):
        self.device, self.calls, self.cuda = device, [], 0

    def __enter__(self):
        self.saved = {m: getattr(torch.Tensor, m) for m in self.METHODS}
        for m, orig in self.saved.items():
            setattr(torch.Tensor, m, lambda t, *a, _o=orig, _m=m, **k: self.calls.append(_m) or _o(t, *a, **k))
        if self.device.type == "cuda":
            self.caught = warnings.catch_warnings(record=True)
            self.log = self.caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        for m, orig in self.saved.items():
            setattr(torch.Tensor, m, orig)
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")  # before anything that syncs on purpose
            self.caught.__exit__(*exc)
            synced = [w for w in self.log if "synchroniz" in str(w.message)]
            self.cuda = len(synced)
            self.where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in synced})
        return False


def check_moe(device) -> list:
    failures = []
    rows, sync_rows = [], []
    for name, path in MOE_FIXTURES.items():
        ref = load_file(str(path / "reference.safetensors"))
        ids = ref["input_ids"]
        truth_logits, truth_grads = on_cpu(moe_step(load_model(path).train(), ids))  # float32, CPU
        cpu_bf16 = load_model(path, dtype=torch.bfloat16).train()
        set_impl(cpu_bf16, "loop")
        base_logits, base_grads = on_cpu(moe_step(cpu_bf16, ids))
        base = (rel(base_logits, truth_logits), rel(base_grads, truth_grads))
        model = load_model(path, dtype=torch.bfloat16, device=device).train()
        sparse = [m for m in model.modules() if isinstance(m, Experts)]
        x = torch.zeros(4, model.config.hidden_size, dtype=torch.bfloat16, device=device)
        auto = "grouped" if sparse[0].use_grouped(x) else "loop"
        dev_ids = ids.to(device)
        out = {}
        for impl in ("grouped", "loop"):
            set_impl(model, impl)
            out[impl] = on_cpu(moe_step(model, dev_ids))  # also the warm-up (kernels, allocator)
            with HostSyncs(device) as hs:
                moe_step(model, dev_ids)
            calls = f"{len(hs.calls)} ({', '.join(sorted(set(hs.calls)))})" if hs.calls else "0"
            cuda = str(hs.cuda) + (f" at {', '.join(hs.where[:3])}" if hs.cuda else "") if device.type == "cuda" else "n/a (cpu)"
            want0 = impl == "grouped"
            ok = (not hs.calls and hs.cuda == 0) if want0 else (len(hs.calls) >= 1)
            sync_rows.append([name, impl, len(sparse), calls, cuda,
                              check(failures, ok, f"{name} {impl}: host syncs {hs.calls} / {hs.cuda} CUDA")])
            logits, grads = out[impl]
            e_logits, e_grads = rel(logits, truth_logits), rel(grads, truth_grads)
            rounding = (ref["logits_bf16"].float() - ref["logits"]).abs().mean().item()
            vs_hf = (logits - ref["logits_bf16"].float()).abs().mean().item() / rounding
            # bf16 on the device is no worse than bf16 on the CPU (the loop) against float32, plus a margin
            ok = e_logits <= 2 * base[0] + 5e-3 and e_grads <= 2 * base[1] + 2e-2 and vs_hf <= 2.0
            rows.append([name, impl + (" (auto)" if impl == auto else ""), f"{e_logits:.2e}", f"{e_grads:.2e}",
                         f"{base[0]:.2e} / {base[1]:.2e}", f"{vs_hf:.2f}", check(failures, ok, f"{name} {impl} vs fp32")])
        g_l = (rel(out["grouped"][0], out["loop"][0]), rel(out["grouped"][1], out["loop"][1]))
        ok = g_l[0] <= 2 * base[0] + 5e-3 and g_l[1] <= 2 * base[1] + 2e-2  # a flipped route shows as bf16 does
        rows.append([name, "grouped vs loop", f"{g_l[0]:.2e}", f"{g_l[1]:.2e}", "", "",
                     check(failures, ok, f"{name} grouped vs loop {g_l}")])
    print(f"MoE fixtures in bf16 on {device.type}: ||Δ|| / ||float32 CPU||, fwd (logits) and bwd (all gradients; "
          "objective Σ w·log p + 0.5·aux)")
    print(table(["fixture", "experts", "logits", "grads", "CPU bf16 loop: logits / grads",
                 "mean |Δ| vs HF bf16 (rounding units)", "check"], rows))
    print(f"\nhost syncs in one forward + backward (bf16, {device.type}); the loop reads its offsets once per sparse layer:")
    print(table(["fixture", "experts", "sparse layers", "Tensor host reads", "synchronizing CUDA calls", "check"],
                sync_rows))
    return failures


# ---------------------------------------------------------------------------------------------
# Qwen3.5


def delta_inputs(device, B=2, T=300, H=4, d=128, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float64)  # noqa: E731
    q = l2_normalize(r(B, T, H, d)) * d ** -0.5
    k = l2_normalize(r(B, T, H, d))
    decay = -torch.rand(B, T, H, generator=g, device=device, dtype=torch.float64) * 2
    beta = torch.rand(B, T, H, generator=g, device=device, dtype=torch.float64)
    return [q, k, r(B, T, H, d), decay, beta, r(B, H, d, d)]


def check_delta_rule(device, failures) -> None:
    # the GPU: Qwen3.5's head size, 300 tokens (5 chunks, the last partial); the CPU stand-in: smaller
    inputs = delta_inputs(device) if device.type == "cuda" else delta_inputs(device, T=150, H=2, d=32)
    up = torch.randn_like(inputs[2])

    def run(fn, dtype):
        xs = [x.to(dtype).requires_grad_() for x in inputs]
        o, s = fn(*xs)
        grads = torch.autograd.grad((o * up.to(o.dtype)).sum() + s.square().sum(), xs)
        return [o.detach(), s.detach()], list(grads), o.dtype

    truth_out, truth_grads, _ = run(recurrent_gated_delta_rule, torch.float64)
    rows = []
    for dtype, bound in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        sync(device)
        t0 = time.perf_counter()
        out, grads, odt = run(chunk_gated_delta_rule, dtype)
        sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        e_o, e_s, e_g = rel(out[0], truth_out[0]), rel(out[1], truth_out[1]), rel(grads, truth_grads)
        ok = odt == dtype and max(e_o, e_s, e_g) <= bound
        rows.append([str(dtype).replace("torch.", ""), f"{e_o:.1e}", f"{e_s:.1e}", f"{e_g:.1e}", f"{ms:.0f}",
                     check(failures, ok, f"delta rule {dtype}: {e_o:.1e} {e_s:.1e} {e_g:.1e}")])
    xs = [x.float() for x in inputs]
    want = chunk_gated_delta_rule(*xs)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = chunk_gated_delta_rule(*xs)
    same = all(torch.equal(a, b) for a, b in zip(got, want)) and got[0].dtype == got[1].dtype == torch.float32
    rows.append(["float32 under bf16 autocast", "", "", "", "", check(failures, same, "delta rule under autocast")])
    B, T, H, d = inputs[2].shape
    print(f"\nchunked gated delta rule (C = 64) vs the float64 recurrence, both on {device.type} (B={B}, T={T}, "
          f"H={H}, d_k = d_v = {d}, with an initial state): ||Δ|| / ||truth||")
    print(table(["dtype", "output", "final state", "gradients (all 6 inputs)", "chunked fwd+bwd ms", "check"], rows))


def check_qwen35_logits(device, failures) -> None:
    ref = load_file(str(QWEN35 / "reference.safetensors"))
    rows = []
    model = load_model(QWEN35, device=device).eval()
    mask = ref["padded_attention_mask"]
    with torch.no_grad():
        cases = [("unpadded", model(ref["input_ids"].to(device)), ref["logits"], None),
                 ("padded rows", model(ref["padded_input_ids"].to(device), mask.to(device)), ref["padded_logits"],
                  mask.bool()),
                 ("150 tokens", model(ref["long_input_ids"].to(device)), ref["long_logits"], None)]
    for what, ours, theirs, where in cases:
        d = (ours.float().cpu() - theirs).abs()
        d = d[where] if where is not None else d
        rows.append(["float32", what, f"{d.max().item():.1e}", "", check(failures, d.max().item() < 1e-4,
                                                                         f"qwen35 float32 {what}")])
    model = load_model(QWEN35, dtype=torch.bfloat16, device=device).eval()
    for what, key in (("11 tokens", "logits"), ("150 tokens", "long_logits")):
        with torch.no_grad():
            ours = model(ref[key.replace("logits", "input_ids")].to(device)).float().cpu()
        rounding = (ref[f"{key}_bf16"].float() - ref[key]).abs().mean()
        vs_hf = ((ours - ref[f"{key}_bf16"].float()).abs().mean() / rounding).item()
        vs_fp32 = ((ours - ref[key]).abs().mean() / rounding).item()
        rows.append(["bfloat16", what, f"{vs_hf:.2f}", f"{vs_fp32:.2f}",
                     check(failures, vs_hf <= 1.0 and vs_fp32 <= 2.0, f"qwen35 bf16 {what}: {vs_hf:.2f}")])
    print(f"\nQwen3.5 fixture logits on {device.type} vs transformers' (float32: max |Δ|, bound 1e-4; bfloat16: mean |Δ| "
          "in units of bf16's own rounding, vs HF bf16 (CPU bound 0.6, here 1.0) and vs float32 (bound 2.0))")
    print(table(["dtype", "input", "vs transformers", "vs float32", "check"], rows))


def check_qwen35_packed_step(device, failures) -> None:
    from test_qwen35 import hf_response_logps, pairs_for

    ref = load_file(str(QWEN35 / "reference.safetensors"))
    pairs = pairs_for(ref)
    options = pack_options(packing=True, share_prompt=True, device=device)
    rows = []
    for dtype, bounds in ((torch.float32, (1e-4, 1e-4)), (torch.bfloat16, (3e-2, 5e-2))):
        model = load_model(QWEN35, dtype=dtype, device=device).train()
        res = {}
        for how, batch, fwd in (("packed", pack(pairs, pad_id=0, **options), packed_forward),
                                ("separate", collate(pairs, pad_id=0), concatenated_forward)):
            batch = to(batch, device)
            with torch.no_grad():
                rc, rr = fwd(model, batch)  # the reference = the policy at a step's start
            model.zero_grad(set_to_none=True)
            c, r = fwd(model, batch)
            losses, _, _ = preference_loss(c.logps, r.logps, rc.logps, rr.logps, beta=0.1)
            (losses.mean() + 0.01 * (c.logps - 0.5 * r.logps).sum()).backward()  # + a term whose gradient ≠ 0
            res[how] = (torch.cat([c.logps, r.logps]).detach().float().cpu(), losses.detach().float().cpu(),
                        [p.grad.float().cpu() for p in model.parameters()])
        (lp, loss, g), (lp0, loss0, g0) = res["packed"], res["separate"]
        e_lp = ((lp - lp0).abs() / lp0.abs().clamp(min=1)).max().item()
        e_g = rel(g, g0)
        hf = abs(lp[0].item() - hf_response_logps(ref, "chosen")) + abs(lp[len(pairs)].item() -
                                                                        hf_response_logps(ref, "rejected"))
        ok = e_lp <= bounds[0] and e_g <= bounds[1] and (dtype != torch.float32 or hf < 2e-3)
        rows.append([str(dtype).replace("torch.", ""), f"{e_lp:.1e}", f"{(loss - loss0).abs().max().item():.1e}",
                     f"{e_g:.1e}", f"{hf:.1e}", check(failures, ok, f"qwen35 packed step {dtype}")])
    print(f"\nQwen3.5 DPO step, {len(pairs)} pairs on shared-prompt packed rows ({options['rows']} row(s); "
          f"{'FlexAttention' if device.type == 'cuda' else 'per-document SDPA'}) vs separate padded rows, {device.type}:")
    print(table(["dtype", "max rel |Δ log p|", "max |Δ loss|", "||Δ grads|| / ||grads||",
                 "|Δ log p| vs HF, fixture pair", "check"], rows))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=("moe", "qwen35"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the stand-in run of bench/gpu.sh --dry-run (the same checks on the CPU)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_models: no CUDA device here; nothing to measure (run on a GPU machine: bench/gpu.sh)")
        return 0
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu stand-in"
    print(f"device: {where}, torch {torch.__version__}")
    failures = []
    if args.family == "moe":
        failures += check_moe(device)
    else:
        for part in (check_delta_rule, check_qwen35_logits, check_qwen35_packed_step):
            t0 = time.perf_counter()
            part(device, failures)
            print(f"({time.perf_counter() - t0:.1f} s)")
    print(f"\n{len(failures)} check(s) failed" + (": " + "; ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
