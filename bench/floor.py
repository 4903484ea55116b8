"""sdpo's steady DPO optimizer step against this machine's matmul floor for the same work.

    python bench/floor.py [--mix uniform,spread] [--vocab 32000,128256] [--steps 8] [--threads 2]

The work (issue 28): a random-init float32 Llama, 4 layers, hidden 256, 8 heads / 4 KV heads,
intermediate 688; 8 pairs per optimizer step; plain sigmoid DPO against precomputed reference
log-probs, AdamW. Mixes:
  uniform  prompt 120, chosen 70, rejected 70 tokens (each ±10%, seeded)
  spread   prompt ~ lognormal(median 150, σ 0.9), responses ~ lognormal(median 250, σ 0.6),
           cut to max_prompt_length 512 (keep the end) and max_length 1024 (responses cut to fit)

The floor is the minimal work at the machine's best float32 GEMM rate, measured in the same run
with the same threads (before and after the steps; the better of the two):
  blocks   each prompt once and each response once through the layers: per token 2·(linear
           parameters per layer) FLOPs, plus attention 4·d·c for a token that sees c keys
           (QKᵀ and AV over its own causal context: its prompt and its response's prefix)
  lm_head  response tokens only: 2·H·V FLOPs each
  ×3       forward + backward (the backward is two GEMMs per forward GEMM)
The step is sdpo.loop.optimize's own (packing, the fused lm_head + log-prob, the loss, AdamW),
timed per optimizer step from its metrics (step_time_s with train.log_every = 1). Each step's floor
is that of its own pairs, in the order optimize takes them (its seeded batch schedule, reproduced
here): on the spread mix one step's work differs from the next by up to ±25%. "Steady" is the
steps after the first two: their mean time, their mean floor and the ratio of the two.

Memory: the peak RSS of the run (VmHWM, reset before each table row) against its floor: the
process before the model is built (torch imported) + float32 parameters, gradients and both Adam
moments (4 x 4 bytes per parameter) + one [chunk, V] float32 logits buffer of the fused lm_head.

    python bench/floor.py --ab BASE_TREE [--rounds 2]   # A/B: BASE_TREE's sdpo against this one

--ab runs each (mix, V) row in a fresh process per tree, alternating A (BASE_TREE, e.g. an older
commit unpacked with `git archive`) and B (this tree), and prints each run, the medians and B/A.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(os.environ.get("SDPO_TREE") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))

from sdpo.data.packing import batch_schedule  # noqa: E402
from sdpo.data.pairs import TokenizedPair  # noqa: E402
from sdpo.loop import dpo_stage, optimize  # noqa: E402
from sdpo.models.model import ModelConfig, Transformer  # noqa: E402
from sdpo.runtime import distributed as D  # noqa: E402
from sdpo.runtime.config import Config  # noqa: E402
from sdpo.runtime.run import Run  # noqa: E402

LAYERS, HIDDEN, HEADS, KV_HEADS, INTER = 4, 256, 8, 4, 688
PAIRS_PER_STEP = 8


def make_pairs(mix: str, n: int, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(3, vocab, size=int(k)).tolist()  # noqa: E731
    pairs = []
    for i in range(n):
        if mix == "uniform":
            p, c, r = (round(x * rng.uniform(0.9, 1.1)) for x in (120, 70, 70))
        else:
            p = min(512, max(1, round(rng.lognormal(math.log(150), 0.9))))
            c, r = (max(1, round(rng.lognormal(math.log(250), 0.6))) for _ in range(2))
            c, r = min(c, 1024 - p), min(r, 1024 - p)
        pairs.append(TokenizedPair(ids(p), ids(c), ids(r), i))
    return pairs


def floor_flops(pairs: list[TokenizedPair], vocab: int) -> tuple[float, float]:
    """(block FLOPs, lm_head FLOPs) of one forward + backward over `pairs` (see the module doc)."""
    head_dim, kv = HIDDEN // HEADS, KV_HEADS * (HIDDEN // HEADS)
    linear = HIDDEN * HIDDEN + 2 * HIDDEN * kv + HIDDEN * HIDDEN + 3 * HIDDEN * INTER  # q, k, v, o, gate/up/down
    blocks = head = 0.0
    for p in pairs:
        P, responses = len(p.prompt_ids), (len(p.chosen_ids), len(p.rejected_ids))
        tokens = P + sum(responses)
        # keys seen: prompt token i sees i+1; response token j sees P + j + 1
        keys = P * (P + 1) / 2 + sum(R * P + R * (R + 1) / 2 for R in responses)
        blocks += LAYERS * (2 * linear * tokens + 4 * HEADS * head_dim * keys)
        head += 2 * HIDDEN * vocab * sum(responses)
    return 3 * blocks, 3 * head


def gemm_rate(threads: int, shapes: list[tuple[int, int, int]], repeats: int = 5) -> float:
    """Best float32 GEMM FLOP/s over `shapes` (m, k, n) on this machine, now."""
    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t))
    return best


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def sdpo_steps(pairs: list[TokenizedPair], vocab: int, steps: int, out: Path,
               compile: bool = False, baseline: int | None = None) -> tuple[list[float], list, dict]:
    """Per-step wall seconds of `steps` optimizer steps of sdpo.loop.optimize on `pairs`, the pair
    indices of each step (optimize's schedule), and memory (bytes): baseline (RSS before the model, or
    the one given: taken before anything else ran), params (count), peak (VmHWM over the run)."""
    try:  # reset VmHWM to the current RSS (Linux >= 4.0), so the peak is this run's
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    baseline = rss_kib("VmRSS") * 1024 if baseline is None else baseline
    cfg = Config()
    cfg.train.global_batch_size = PAIRS_PER_STEP
    cfg.train.micro_batch_size = PAIRS_PER_STEP
    cfg.train.max_steps, cfg.train.epochs, cfg.train.log_every = steps, 1, 1
    cfg.train.save_every, cfg.eval.every = 0, 0
    cfg.train.output_dir = str(out)
    cfg.loss.type, cfg.optim.name, cfg.optim.lr = "sigmoid", "adamw", 1e-5
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTER,
                                    num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    num_key_value_heads=KV_HEADS, max_position_embeddings=2048))
    model = D.compile_blocks(model, compile)  # train.compile
    info = D.init_distributed("cpu")
    run = Run(cfg=cfg, info=info, mesh=None, out=out, tokenizer=SimpleNamespace(pad_id=0), tokenizer_dir="",
              autocast_dtype=None)
    out.mkdir(parents=True, exist_ok=True)
    ref = (torch.full((len(pairs),), -100.0), torch.full((len(pairs),), -100.0))
    stage = dpo_stage(cfg, 1, 1, ref, torch.device("cpu"))
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    schedule = batch_schedule(len(pairs), PAIRS_PER_STEP, seed=stage.seed, lengths=lengths,
                              group_by_length=stage.group_by_length)
    optimize(run, model, pairs, stage)
    mem = {"baseline": baseline, "params": sum(p.numel() for p in model.parameters()), "peak": rss_kib("VmHWM") * 1024}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows if r.get("stage") == "dpo"], schedule, mem


def chunk_rows(responses: int, vocab: int) -> int:
    """Rows of the fused lm_head's [chunk, V] buffer on CPU (kernels.fused_linear.rows_per_chunk)."""
    try:
        from kernels.fused_linear import rows_per_chunk
        return rows_per_chunk(responses, vocab, None, "cpu")
    except ImportError:
        return min(responses, max(192, (1 << 22) // vocab))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mix", default="uniform,spread")
    ap.add_argument("--vocab", default="32000,128256")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ab", metavar="BASE_TREE", help="A/B against the sdpo of BASE_TREE (see the module doc)")
    ap.add_argument("--rounds", type=int, default=2, help="--ab: A, B alternations per row")
    ap.add_argument("--compile", action="store_true", help="train.compile: torch.compile each block (inductor)")
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # one JSON line per row (--ab's workers)
    args = ap.parse_args()
    if args.ab:
        return ab(args)
    torch.set_num_threads(args.threads)
    if not args.raw:
        print(f"torch {torch.__version__}, {args.threads} threads; {LAYERS} layers, hidden {HIDDEN}, "
              f"{HEADS}/{KV_HEADS} heads, intermediate {INTER}; {PAIRS_PER_STEP} pairs per optimizer step; "
              f"load average {os.getloadavg()[0]:.1f}")
        print("| mix | V | real tokens/step | response tokens/step | floor GFLOP | GEMM GFLOP/s | floor s "
              "| sdpo steady s (mean) | ratio | per-step ratios | peak RSS MB | memory floor MB | ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mix in args.mix.split(","):
        for vocab in (int(v) for v in args.vocab.split(",")):
            pairs = make_pairs(mix, PAIRS_PER_STEP * args.steps, vocab)
            tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / args.steps
            responses = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / args.steps
            # the GEMM rate at the work's own shapes and a square one, right before and right after the steps
            # (the better of the two: this shared machine's speed drifts by tens of percent within minutes)
            R = int(responses)
            shapes = [(1024, 1024, 1024), (int(tokens), HIDDEN, INTER), (R, HIDDEN, vocab), (R, vocab, HIDDEN)]
            baseline = rss_kib("VmRSS") * 1024   # before the probe: whatever it leaves behind counts as peak
            before = gemm_rate(args.threads, shapes)
            with tempfile.TemporaryDirectory() as d:
                times, schedule, mem = sdpo_steps(pairs, vocab, args.steps, Path(d) / "run", args.compile, baseline)
            rate = max(before, gemm_rate(args.threads, shapes))
            flops = [sum(floor_flops([pairs[i] for i in ids], vocab)) for ids in schedule[:len(times)]]
            k = 2 if len(times) > 2 else 0   # steady: the steps after the first two
            per_step = statistics.mean(flops[k:])
            steady, floor_s = statistics.mean(times[k:]), per_step / rate
            # the largest micro-batch's response rows set the chunk (R >= c here: chunk rows, not R)
            mem_floor = mem["baseline"] + 16 * mem["params"] + 4 * chunk_rows(R, vocab) * vocab
            if args.raw:
                print(json.dumps({"mix": mix, "V": vocab, "tokens": tokens, "responses": responses, "gflop": per_step / 1e9,
                                  "rate": rate / 1e9, "floor_s": floor_s, "steady": steady, "times": times,
                                  "step_floor_s": [f / rate for f in flops],
                                  "peak_mb": mem["peak"] / 1e6, "mem_floor_mb": mem_floor / 1e6}), flush=True)
                continue
            print(f"| {mix} | {vocab} | {tokens:.0f} | {responses:.0f} | {per_step / 1e9:.1f} | {rate / 1e9:.0f} "
                  f"| {floor_s:.3f} | {steady:.3f} | {steady / floor_s:.2f}× "
                  f"| {', '.join(f'{t * rate / f:.2f}' for t, f in zip(times[k:], flops[k:]))} | {mem['peak'] / 1e6:.0f} "
                  f"| {mem_floor / 1e6:.0f} | {mem['peak'] / mem_floor:.2f}× |", flush=True)
    return 0


def ab(args) -> int:
    """Each (mix, V) row: A (args.ab's tree), B (this tree), alternating args.rounds times, one process each."""
    trees = {"A": Path(args.ab).resolve(), "B": Path(__file__).resolve().parents[1]}
    print(f"A = {trees['A']}, B = {trees['B']}; {args.threads} threads, --steps {args.steps}, {args.rounds} rounds; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print("| mix | V | tree | steady s: median (runs) | GEMM GFLOP/s (runs) | ratio to floor: median (runs) "
          "| peak RSS MB | memory floor MB | peak / floor | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mix in args.mix.split(","):
        for vocab in args.vocab.split(","):
            got = {"A": [], "B": []}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    cmd = [sys.executable, __file__, "--raw", "--mix", mix, "--vocab", vocab, "--steps", str(args.steps),
                           "--threads", str(args.threads)]
                    res = subprocess.run(cmd, env={**os.environ, "SDPO_TREE": str(tree)}, capture_output=True, text=True)
                    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
                    if res.returncode or not lines:
                        print(f"{name} failed: {res.stderr[-2000:]}", file=sys.stderr)
                        return 1
                    got[name].append({**json.loads(lines[-1]), "load": os.getloadavg()[0]})
            med = {}
            join = lambda runs, key, fmt: ", ".join(format(r[key], fmt) for r in runs)  # noqa: E731
            for name, runs in got.items():
                ratios = [r["steady"] / r["floor_s"] for r in runs]
                med[name] = statistics.median(r["steady"] for r in runs)
                peak = max(r["peak_mb"] for r in runs)
                floor_mb = runs[0]["mem_floor_mb"]
                print(f"| {mix} | {vocab} | {name} | {med[name]:.3f} ({join(runs, 'steady', '.2f')}) "
                      f"| {join(runs, 'rate', '.0f')} | {statistics.median(ratios):.2f}× "
                      f"({', '.join(f'{x:.2f}' for x in ratios)}) | {peak:.0f} | {floor_mb:.0f} "
                      f"| {peak / floor_mb:.2f}× | {join(runs, 'load', '.1f')} |", flush=True)
            print(f"| {mix} | {vocab} | B/A | {med['B'] / med['A']:.2f} | | | | | | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
