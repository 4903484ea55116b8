"""Runs the tests make: torchrun workers over this checkout, and a short train.py run on a tiny model.

    from runs import torchrun, train_two_dpo_steps
    proc = torchrun(tmp_path / "worker.py", "arg", nproc=2)        # asserts every rank exited 0
    out = train_two_dpo_steps(tmp_path, config_dict, capsys)       # train.py --model.path on it

torchrun gives each rank one OpenMP thread (the tests run on 2 cores) and this checkout on
PYTHONPATH, so a worker written to tmp_path imports sdpo as the tests do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def torchrun(script, *args, nproc: int = 2, cwd=REPO, timeout: int = 300, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node nproc script *args` in cwd -> the finished process.
    check: assert that it exited 0, with the tail of its output; env: extra variables."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(script), *map(str, args)],
                          cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def train_two_dpo_steps(tmp_path: Path, raw_config: dict, capsys, extra: tuple = ()) -> Path:
    """A random model of an HF config (its vocabulary set to data/tokenizer's 308) saved with the demo
    tokenizer, then `train.py --model.path` on 4 demo pairs: two DPO steps. Asserts exit 0 (else shows
    capsys's stderr) and two finite losses -> the run's output directory. extra: more overrides, last."""
    sys.path.insert(0, str(REPO))
    import train
    from sdpo.models.checkpoint import save_model
    from sdpo.models.hf_config import config_from_dict
    from sdpo.models.model import Transformer

    model = Transformer(config_from_dict({**raw_config, "vocab_size": 308}))
    model.init_weights(0, std=0.1)
    save_model(model, tmp_path / "base", tokenizer_dir=REPO / "data" / "tokenizer")
    out = tmp_path / "run"
    rc = train.main([f"--model.path={tmp_path / 'base'}", f'--data.datasets=["{REPO}/data/demo/orca_pairs/train.jsonl"]',
                     f"--train.output_dir={out}", "--model.chat_template=none", "--data.max_examples=4",
                     "--train.global_batch_size=2", "--train.micro_batch_size=2", "--train.max_steps=2",
                     "--train.epochs=1", "--train.device=cpu", "--data.max_length=24", "--optim.lr=1e-3", *extra])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("stage") == "dpo"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    return out
