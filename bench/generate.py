"""Decoding speed: sdpo.models.generate (KV cache) against recomputing the whole prefix every token.

    python bench/generate.py [--batch 1,8] [--prompt-len 64] [--new 64] [--threads 1] [--device cpu]

A random Llama-shaped model (hidden 256, 4 layers, vocab 2000); prompts of mixed lengths
(prompt-len down to half of it, so batches are left-padded); greedy, no EOS. Prints tokens/s
(generated tokens over wall time) and checks both paths produce the same tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdpo.eval.report import format_table  # noqa: E402
from sdpo.models.generate import generate, left_pad  # noqa: E402
from sdpo.models.model import ModelConfig, Transformer  # noqa: E402


@torch.no_grad()
def generate_no_cache(model, prompts, max_new_tokens, pad_id=0):
    """The whole left-padded prefix through the model for every new token: O(T^2) per step."""
    ids, mask = left_pad(prompts, pad_id, next(model.parameters()).device)
    out = []
    for _ in range(max_new_tokens):
        nxt = model.lm_head(model.hidden_states(ids, mask)[:, -1]).argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
    return torch.stack(out, 1).tolist()


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return r, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    model = Transformer(cfg).eval()
    model.init_weights(0, std=0.05)
    model.to(args.device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for B in (int(b) for b in args.batch.split(",")):
        lens = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (B,), generator=g).tolist()
        prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
        generate(model, prompts, max_new_tokens=2, eos_id=None)  # warm-up
        cached, t_cache = timed(lambda: generate(model, prompts, max_new_tokens=args.new, eos_id=None))
        full, t_full = timed(lambda: generate_no_cache(model, prompts, args.new))
        n = B * args.new
        rows.append([B, args.prompt_len, args.new, f"{n / t_full:.0f}", f"{n / t_cache:.0f}",
                     f"{t_full / t_cache:.1f}x", "yes" if cached == full else "NO"])
    print(f"device {args.device}, threads {args.threads}, model hidden 256 x 4 layers, vocab 2000, float32")
    print(format_table(["batch", "prompt len (max)", "new tokens", "no cache tok/s", "KV cache tok/s",
                        "speed-up", "same tokens"], rows))


if __name__ == "__main__":
    main()
