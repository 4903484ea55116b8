"""Peak host memory (RSS) of a few DPO optimizer steps: full fine-tuning vs LoRA, on the CPU.

Each setting runs in its own process (ru_maxrss is a per-process high-water mark). The model is
a random-init Llama (default 4 layers, H = 512, vocab 32000: ~45M parameters); pairs are random
tokens; the step is the real one (sdpo.loop.dpo_micro_loss, make_optimizer: AdamW). Reported:
trainable parameters, the bytes of their gradients + AdamW moments (4 + 8 bytes each, float32),
RSS after building the model, and peak RSS over the steps.

    python bench/lora_memory.py [--layers 4] [--hidden 512] [--vocab 32000] [--steps 3] [--rank 16]
                                [--dropout 0.05] [--pairs 2] [--tokens 128] [--ckpt none]

Activations are small here on purpose (2 pairs of 128 tokens): at 7B scale the weights and their
gradient and optimizer state dominate, which is what LoRA removes. With many tokens per step
the activations dominate instead, and LoRA's dropout copies of each projection's input
(lora.dropout > 0) can make its peak the larger one; see bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(args) -> dict:
    import torch

    from sdpo.data.packing import collate
    from sdpo.data.pairs import TokenizedPair
    from sdpo.loop import dpo_micro_loss, dpo_stage, make_optimizer
    from sdpo.models import lora as L
    from sdpo.models.model import ModelConfig, Transformer
    from sdpo.runtime.config import Config

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                                    num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64))
    model.init_weights(seed=0)
    cfg = Config()
    cfg.model.activation_checkpointing = args.ckpt
    model.gradient_checkpointing = args.ckpt
    if args.mode == "lora":
        cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = args.rank, 2.0 * args.rank, args.dropout
        L.apply_lora(model, cfg.lora)
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(1, args.vocab, (n,), generator=g).tolist()  # noqa: E731
    pairs = [TokenizedPair(ids(args.tokens // 2), ids(args.tokens // 2), ids(args.tokens // 2), i)
             for i in range(args.pairs)]
    ref = (torch.full((args.pairs,), -1000.0), torch.full((args.pairs,), -1000.0))
    stage = dpo_stage(cfg, 1, 1, ref, torch.device("cpu"))
    opt = make_optimizer(model, stage, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    built = rss_mb()
    batch = collate(pairs, pad_id=0)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss, _ = dpo_micro_loss(cfg, model, batch, *ref)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"mode": args.mode, "params": total, "trainable": trainable, "grad_optim_mb": trainable * 12 / 2**20,
            "rss_built_mb": built, "rss_peak_mb": rss_mb(), "s_per_step": (time.perf_counter() - t0) / args.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05, help="lora.dropout (it saves a copy of each input)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=2, help="pairs per step (one micro-batch)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per sequence (prompt + response)")
    ap.add_argument("--ckpt", default="none", help="model.activation_checkpointing")
    ap.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(one(args)))
        return
    rows = []
    for mode in ("full", "lora"):
        cmd = [sys.executable, __file__, "--mode", mode] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"model: {args.layers} layers, H = {args.hidden}, vocab {args.vocab}, {rows[0]['params'] / 1e6:.1f}M params; "
          f"{args.pairs} pairs x {args.tokens} tokens per step, {args.steps} steps, LoRA rank {args.rank} (dropout "
          f"{args.dropout:g}) on all 7 projections, activation_checkpointing={args.ckpt}")
    print("| mode | trainable params | grads + AdamW state (MB) | RSS after build (MB) | peak RSS (MB) | s/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable'] / 1e6:.2f}M | {r['grad_optim_mb']:.0f} | {r['rss_built_mb']:.0f} | "
              f"{r['rss_peak_mb']:.0f} | {r['s_per_step']:.2f} |")
    full, lo = rows
    print(f"peak RSS: LoRA {lo['rss_peak_mb']:.0f} MB vs full {full['rss_peak_mb']:.0f} MB "
          f"({full['rss_peak_mb'] - lo['rss_peak_mb']:.0f} MB less; grads + AdamW state "
          f"{full['grad_optim_mb'] - lo['grad_optim_mb']:.0f} MB less)")


if __name__ == "__main__":
    main()
