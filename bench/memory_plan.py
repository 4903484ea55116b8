"""The memory plan (sdpo.runtime.memory) against measured peak memory of DPO steps on the CPU.

    python bench/memory_plan.py [--hidden 256] [--layers 4] [--vocab 8000] [--pairs 4] [--seq 256]

Each setting runs in a fresh process: a float32 model, two optimizer steps of AdamW on one
micro-batch of `pairs` pairs (prompt = response = seq / 2 tokens, no padding), peak RSS over
the process's RSS just before the model is built. Step 2 is the one the plan describes (the
optimizer state exists while the activations do). glibc's mmap threshold is lowered so freed
large blocks leave the resident set (RSS then follows live memory, not heap slack).
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
sys.path.insert(0, str(ROOT))

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from sdpo.logprobs import concatenated_forward
    from sdpo.models.model import ModelConfig, Transformer

    a = json.loads(sys.argv[1])
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a worker started by a big
    # parent (a pytest process that built GB-sized tensors) would report the parent's peak.
    peak = lambda: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))) * 1024
    cfg = ModelConfig(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["inter"],
                      num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
                      num_key_value_heads=a["kv_heads"])
    g = torch.Generator().manual_seed(0)
    B, T = a["pairs"], a["seq"]
    ids = torch.randint(0, a["vocab"], (2 * B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 2] = -100                                  # prompt half unscored
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    base = rss()
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model.gradient_checkpointing = a["checkpoint"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for step in range(2):
        c, r = concatenated_forward(model, batch, fused=a["fused"])
        (-(torch.nn.functional.logsigmoid(0.1 * (c.logps - r.logps))).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps({"peak_over_base": peak() - base}))
""")


def measure(args: dict) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(args)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_over_base"]


def planned(args: dict) -> int:
    from sdpo.models.model import ModelConfig, checkpoint_every
    from sdpo.runtime.memory import Setup, plan

    cfg = ModelConfig(vocab_size=args["vocab"], hidden_size=args["hidden"], intermediate_size=args["inter"],
                      num_hidden_layers=args["layers"], num_attention_heads=args["heads"],
                      num_key_value_heads=args["kv_heads"])
    s = Setup(world_size=1, micro_batch_size=args["pairs"], max_length=args["seq"], max_prompt_length=args["seq"] // 2,
              bf16=False, checkpoint=checkpoint_every(args["checkpoint"]), fused=args["fused"],
              device="cpu")
    return plan(cfg, s)["total"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    a = ap.parse_args()
    base = dict(hidden=a.hidden, inter=int(a.hidden * 2.6875), layers=a.layers, heads=4, kv_heads=2,
                vocab=a.vocab, pairs=a.pairs, seq=a.seq)
    print(f"model H={a.hidden} L={a.layers} V={a.vocab}, {a.pairs} pairs x 2 rows x {a.seq} tokens, float32 CPU")
    print("| checkpointing | logits | planned MB | measured MB | planned / measured |")
    print("| --- | --- | ---: | ---: | ---: |")
    for ckpt in ("none", "every:2", "full"):
        for fused in (True, False):
            args = {**base, "checkpoint": ckpt, "fused": fused}
            p, m = planned(args), measure(args)
            print(f"| {ckpt} | {'fused' if fused else 'unfused'} | {p / 1e6:.1f} | {m / 1e6:.1f} | {p / m:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
