"""sdpo's steady DPO optimizer step against this machine's matmul floor for the same work.

    python bench/floor.py [--mix uniform,spread] [--vocab 32000,128256] [--steps 8] [--threads 2]

The work (issue 28): a random-init float32 Llama, 4 layers, hidden 256, 8 heads / 4 KV heads,
intermediate 688; 8 pairs per optimizer step; plain sigmoid DPO against precomputed reference
log-probs, AdamW. Mixes:
  uniform  prompt 120, chosen 70, rejected 70 tokens (each ±10%, seeded)
  spread   prompt ~ lognormal(median 150, σ 0.9), responses ~ lognormal(median 250, σ 0.6),
           cut to max_prompt_length 512 (keep the end) and max_length 1024 (responses cut to fit)

The floor is the minimal work at the machine's best float32 GEMM rate, measured in the same run
with the same threads:
  blocks   each prompt once and each response once through the layers: per token 2·(linear
           parameters per layer) FLOPs, plus attention 4·d·c for a token that sees c keys
           (QKᵀ and AV over its own causal context: its prompt and its response's prefix)
  lm_head  response tokens only: 2·H·V FLOPs each
  ×3       forward + backward (the backward is two GEMMs per forward GEMM)
The step is sdpo.loop.optimize's own (packing, the fused lm_head + log-prob, the loss, AdamW),
timed per optimizer step from its metrics (step_time_s with train.log_every = 1); "steady" is
the median over the steps after the first two.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def sdpo_steps(pairs: list[TokenizedPair], vocab: int, steps: int, out: Path) -> list[float]:
    """Per-step wall seconds of `steps` optimizer steps of sdpo.loop.optimize on `pairs`."""
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
    info = D.init_distributed("cpu")
    run = Run(cfg=cfg, info=info, mesh=None, out=out, tokenizer=SimpleNamespace(pad_id=0), tokenizer_dir="",
              autocast_dtype=None)
    out.mkdir(parents=True, exist_ok=True)
    ref = (torch.full((len(pairs),), -100.0), torch.full((len(pairs),), -100.0))
    optimize(run, model, pairs, dpo_stage(cfg, 1, 1, ref, torch.device("cpu")))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows if r.get("stage") == "dpo"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mix", default="uniform,spread")
    ap.add_argument("--vocab", default="32000,128256")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; {LAYERS} layers, hidden {HIDDEN}, "
          f"{HEADS}/{KV_HEADS} heads, intermediate {INTER}; {PAIRS_PER_STEP} pairs per optimizer step")
    print("| mix | V | real tokens/step | response tokens/step | floor GFLOP | GEMM GFLOP/s | floor s "
          "| sdpo steady s (median) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mix in args.mix.split(","):
        for vocab in (int(v) for v in args.vocab.split(",")):
            pairs = make_pairs(mix, PAIRS_PER_STEP * args.steps, vocab)
            blocks, head = floor_flops(pairs, vocab)
            per_step = (blocks + head) / args.steps
            tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / args.steps
            responses = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / args.steps
            with tempfile.TemporaryDirectory() as d:
                times = sdpo_steps(pairs, vocab, args.steps, Path(d) / "run")
            # the GEMM rate right after the steps, at the work's own shapes and a square one
            R = int(responses)
            rate = gemm_rate(args.threads, [(1024, 1024, 1024), (int(tokens), HIDDEN, INTER),
                                            (R, HIDDEN, vocab), (R, vocab, HIDDEN)])
            steady = statistics.median(times[2:]) if len(times) > 2 else statistics.median(times)
            floor_s = per_step / rate
            print(f"| {mix} | {vocab} | {tokens:.0f} | {responses:.0f} | {per_step / 1e9:.1f} | {rate / 1e9:.0f} "
                  f"| {floor_s:.3f} | {steady:.3f} | {steady / floor_s:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
