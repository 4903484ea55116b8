"""Padded rows vs packed rows vs packed rows with a shared prompt: tokens, padding, pairs/s.

    python bench/packing.py [--mix demo|uf|both] [--uf-pairs 48] [--hidden 256] [--layers 4]
                            [--micro 4] [--tokens 4096] [--threads 1]

For each mix and each batching:
  tokens/pair  = tokens the policy forward computes (padding included) per pair
  padding      = padding tokens / computed tokens
  pairs/s      = pairs per second over one DPO epoch: global batches of 8 pairs, micro-batches,
                 forward + sigmoid DPO loss (fixed reference log-probs) + backward + AdamW step

  padded           collate: rows prompt|chosen and prompt|rejected, micro_batch_size pairs
                   per forward, each padded to its longest row (today's default; group_by_length off)
  packed           pack(share_prompt=False): prompt|chosen and prompt|rejected as documents,
                   first-fit into rows as long as the longest document, --tokens per forward
  packed + shared  pack(): one document prompt|chosen|rejected per pair, the same budget

Mixes: (a) the demo data (data/demo, tokenized with data/tokenizer, max_length 64 as the
tiny config), (b) a synthetic UltraFeedback-shaped mix: prompt ~ lognormal(median 150,
σ 0.9) tokens, each response ~ lognormal(median 250, σ 0.6), DPO truncation to
max_prompt_length 512 (keep the end) and max_length 1024 (responses cut to fit).
The model is a random-init Llama (vocab 2000 so that lm_head, which the three batchings
share, does not hide the body's cost; real 7B models spend ~2% of their FLOPs in lm_head).
The same global batches (seeded) go through all three batchings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdpo.data.packing import batch_schedule, collate, micro_batches, pack, pair_cost  # noqa: E402
from sdpo.data.pairs import TokenizedPair  # noqa: E402
from sdpo.logprobs import pair_forward  # noqa: E402
from sdpo.loss import preference_loss  # noqa: E402
from sdpo.models.model import ModelConfig, Transformer  # noqa: E402

MODES = ("padded", "packed", "packed + shared")


def demo_pairs():
    from sdpo.data.pairs import tokenize_pairs
    from sdpo.data.read import read_preferences
    from sdpo.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ROOT / "data" / "tokenizer")
    pairs = []
    for f in ("orca_pairs/train.jsonl", "ultrafeedback/train_prefs.jsonl"):
        ex = read_preferences([ROOT / "data" / "demo" / f])[0]
        pairs += tokenize_pairs(ex, tok, max_length=64, max_prompt_length=48)[0]
    return pairs, tok.vocab_size


def uf_pairs(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        P = int(np.clip(rng.lognormal(np.log(150), 0.9), 8, 512))  # keep_end truncation to 512
        C, R = (int(max(2, rng.lognormal(np.log(250), 0.6))) for _ in range(2))
        C, R = min(C, 1024 - P), min(R, 1024 - P)  # responses cut to max_length
        ids = lambda k: rng.integers(3, vocab, k).tolist()  # noqa: E731
        out.append(TokenizedPair(ids(P), ids(C), ids(R), i))
    return out


def plan(pairs, mode, micro, tokens, G=8, seed=0):
    """[[micro-batch pair indices] per optimizer step] for one epoch, and the batches themselves."""
    steps = batch_schedule(len(pairs), G, seed=seed)
    share = mode == "packed + shared"
    costs = [pair_cost(p, share) for p in pairs]
    out = []
    for step in steps:
        if mode == "padded":
            chunks = [step[s:s + micro] for s in range(0, len(step), micro)]
            out.append([collate([pairs[i] for i in c], pad_id=0) for c in chunks])
        else:
            chunks = micro_batches(step, costs, max_pairs=G, max_tokens=tokens)
            out.append([pack([pairs[i] for i in c], pad_id=0, share_prompt=share, rows="longest") for c in chunks])
        for b, c in zip(out[-1], chunks):
            b["index"] = torch.tensor(c)
    return out


def token_stats(batches):
    computed = sum(b["input_ids"].numel() for step in batches for b in step)
    real = sum(int((b["doc_ids"] > 0).sum()) if "doc_ids" in b else int(b["attention_mask"].sum())
               for step in batches for b in step)
    return computed, 1 - real / computed


def epoch(model, batches, ref_c, ref_r):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    t0 = time.perf_counter()
    for step in batches:
        for b in step:
            c, r = pair_forward(model, b)
            idx = b["index"]
            losses, _, _ = preference_loss(c.logps, r.logps, ref_c[idx], ref_r[idx], beta=0.1)
            losses.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def run_mix(name, pairs, vocab, args):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      max_position_embeddings=4096)
    n = len(pairs) // 8 * 8
    pairs = pairs[:n]
    ref_c = torch.zeros(n) - 50.0
    ref_r = torch.zeros(n) - 50.0
    P = np.mean([len(p.prompt_ids) for p in pairs])
    C = np.mean([len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]) / 2
    print(f"\n### {name}: {n} pairs, mean prompt {P:.0f} tokens, mean response {C:.0f} tokens; model "
          f"hidden {args.hidden}, {args.layers} layers, vocab {vocab}; micro_batch {args.micro} pairs (padded), "
          f"{args.tokens} tokens (packed)\n")
    print("| batching | tokens/pair | vs padded | padding | s/epoch | pairs/s | vs padded |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = None
    for mode in MODES:
        batches = plan(pairs, mode, args.micro, args.tokens)
        computed, pad = token_stats(batches)
        model = Transformer(cfg)
        model.init_weights(seed=0)
        epoch(model, batches[:1], ref_c, ref_r)  # warm-up
        secs = min(epoch(model, batches, ref_c, ref_r) for _ in range(args.repeats))
        tpp, pps = computed / n, n / secs
        base = base or (tpp, pps)
        print(f"| {mode} | {tpp:.0f} | {tpp / base[0]:.2f}x | {100 * pad:.1f}% | {secs:.1f} | {pps:.2f} | "
              f"{pps / base[1]:.2f}x |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mix", default="both", choices=["demo", "uf", "both"])
    ap.add_argument("--uf-pairs", type=int, default=48)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.mix in ("demo", "both"):
        pairs, vocab = demo_pairs()
        run_mix("(a) demo data", pairs, vocab, argparse.Namespace(**{**vars(args), "tokens": min(args.tokens, 512)}))
    if args.mix in ("uf", "both"):
        run_mix("(b) synthetic UltraFeedback-shaped mix", uf_pairs(args.uf_pairs, 2000), 2000, args)


if __name__ == "__main__":
    main()
