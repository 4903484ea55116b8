"""Per-rank peak RSS of a short sDPO run under torchrun --nproc_per_node {1,2,4} (gloo, CPU).

    python bench/memory_torchrun.py [--nprocs 1,2,4] [--hidden 512] [--layers 4]

The run is train.py on the tiny recipe with a bigger random-init model (SFT 2 steps, then 2
sDPO steps of 2 optimizer steps each): every stage loads, shards (FSDP2 for W > 1), trains
and frees a model, so a leaked model shows up as memory that does not fall with W. Each rank
reports ru_maxrss minus its RSS after imports ("above baseline"); the table gives the mean
and max over ranks. Large blocks are mmapped (MALLOC_MMAP_THRESHOLD_) so RSS follows live
memory. On a shared 2-core machine keep the model small: W = 4 runs 4 processes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(argv: list[str]) -> None:
    import resource

    sys.path.insert(0, str(ROOT))
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096  # noqa: E731
    import torch  # noqa: F401

    from sdpo.runtime.config import load_config
    from sdpo.stepwise import train

    base = rss()
    train(load_config(ROOT / "configs" / "tiny.toml", argv))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RSS " + json.dumps({"rank": int(os.environ.get("RANK", 0)), "base": base, "above": peak - base}),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nprocs", default="1,2,4")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    H = a.hidden
    args = [f"--model.hidden_size={H}", f"--model.intermediate_size={int(H * 2.6875)}",
            f"--model.num_hidden_layers={a.layers}", "--model.num_attention_heads=8",
            "--model.num_key_value_heads=4", "--data.max_examples=32", "--data.max_test_examples=8",
            "--sft.max_steps=2", "--sft.global_batch_size=8", "--sft.micro_batch_size=2",
            "--train.global_batch_size=8", "--train.micro_batch_size=2", "--train.max_steps=2",
            "--train.epochs=1", "--eval.summary=false", "--train.device=cpu", "--train.log_every=1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    env.pop("TRITON_INTERPRET", None)
    print(f"model H={H} L={a.layers} (random init, tiny tokenizer vocab), float32 CPU, gloo; "
          "SFT 2 steps + 2 sDPO steps x 2 optimizer steps")
    print("| W | ranks | mean above baseline MB | max above baseline MB | x W (mean) | wall s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    import time
    for W in map(int, a.nprocs.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(W),
                   __file__, "--worker", *args, f"--train.output_dir={tmp}/run"]
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
            if out.returncode:
                raise RuntimeError(out.stderr[-4000:])
            rows = [json.loads(line.split("RSS ", 1)[1]) for line in out.stdout.splitlines() if "RSS {" in line]
            above = [r["above"] for r in rows]
            mean = sum(above) / len(above)
            print(f"| {W} | {len(rows)} | {mean / 1e6:.1f} | {max(above) / 1e6:.1f} | {mean * W / 1e6:.1f} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
