"""The reference pass: log π_ref(y_w|x) and log π_ref(y_l|x) of every pair, once per sDPO step.

The reference is frozen during a step, so its log-probs are a function of (weights, token
ids, precision): one no-grad pass, sharded over the ranks, cached on disk under a hash of
exactly those, so a repeated or resumed run reuses them and a changed model, dataset,
tokenizer or truncation setting never reads a stale file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdpo import distributed as D
from sdpo.logprobs import concatenated_forward
from sdpo.packing import collate
from sdpo.run import Run, free_memory, load_for_training, log, to_device


@torch.no_grad()
def pair_logps(model, pairs, *, pad_id: int, batch_size: int, device=None, autocast_dtype=None,
               rank: int = 0, world_size: int = 1, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (chosen [N], rejected [N], float32 CPU) of TokenizedPairs, in order.

    With world_size W > 1, rank r scores pairs r, r+W, r+2W, ... and the results are gathered;
    every rank runs the same number of forwards (FSDP all-gathers are collective), padding
    its last batch with a repeat of pair 0."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    mine = list(range(rank, len(pairs), world_size))
    per_rank = -(-len(pairs) // world_size)
    padded = mine + [0] * (per_rank - len(mine))
    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    for s in range(0, len(padded), batch_size):
        batch = to_device(collate([pairs[i] for i in padded[s:s + batch_size]], pad_id=pad_id), device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            c, r = concatenated_forward(model, batch)
        chosen.append(c.logps.float())  # kept on the device: a .cpu() here would sync every batch
        rejected.append(r.logps.float())
        if progress is not None:
            progress.update(len(batch["input_ids"]) // 2)
    model.train(was_training)
    D.reshard_root(model)  # no backward follows to free the root's gathered params (FSDP)
    chosen, rejected = torch.cat(chosen)[: len(mine)].cpu(), torch.cat(rejected)[: len(mine)].cpu()
    full_c, full_r = torch.empty(len(pairs)), torch.empty(len(pairs))
    for r, (c, rj) in enumerate(D.all_gather_objects((chosen, rejected))):
        full_c[r::world_size], full_r[r::world_size] = c, rj
    return full_c, full_r


def run_pair_logps(run: Run, model, pairs, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pair_logps with this run's tokenizer, device, precision and ranks."""
    return pair_logps(model, pairs, pad_id=run.tokenizer.pad_id, batch_size=batch_size, device=run.info.device,
                      autocast_dtype=run.autocast_dtype, rank=run.info.rank, world_size=run.info.world_size)


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 over config.json and every safetensors file (content, not mtime)."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for f in sorted(list(root.glob("*.safetensors")) + [root / "config.json"]):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def pairs_fingerprint(pairs) -> str:
    """sha256 of the token ids: covers the data, the tokenizer, the chat template and truncation."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()


def cache_key(run: Run, model_dir: str | Path, pairs) -> str:
    # FSDP's bf16 parameters (world size > 1 on GPU) give other numbers than float32 weights
    # under bf16 autocast, so they key differently.
    params = "fsdp-bf16" if run.info.distributed and run.autocast_dtype is not None else "fp32"
    return hashlib.sha256("|".join([weights_fingerprint(model_dir), pairs_fingerprint(pairs), str(run.autocast_dtype),
                                    params, run.info.device.type]).encode()).hexdigest()[:24]


def reference_logps(run: Run, model_dir: str | Path, pairs, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_ref(y_w|x), log π_ref(y_l|x) for every pair ([N] each), from the cache when the key matches."""
    cfg = run.cfg
    key = cache_key(run, model_dir, pairs)
    cache_dir = Path(cfg.train.ref_cache_dir or run.out / "ref_cache")
    path = cache_dir / f"{key}.safetensors"
    if path.is_file():
        try:
            t = load_file(path)
            if t["chosen"].shape == t["rejected"].shape == (len(pairs),):
                log(run, f"{label}: reference log-probs from cache {path}")
                return t["chosen"], t["rejected"]
        except (OSError, SafetensorError, KeyError) as e:  # damaged on disk: the cache is only a cache
            log(run, f"{label}: ignoring the unreadable cache file {path} ({e}); computing the log-probs again")
    t0 = time.perf_counter()
    model = load_for_training(run, model_dir)
    chosen, rejected = run_pair_logps(run, model, pairs, cfg.train.ref_batch_size or cfg.train.micro_batch_size)
    del model
    free_memory()
    if run.info.is_main:
        # Temp name + rename: a kill leaves the old file or none (sdpo.state.recover removes the temp).
        tmp = cache_dir / f".{key}.tmp{os.getpid()}"
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, tmp,
                      metadata={"model_dir": str(model_dir), "pairs": str(len(pairs))})
            os.replace(tmp, path)
        except (OSError, SafetensorError) as e:  # disk full, read-only: the run goes on without the cache
            tmp.unlink(missing_ok=True)
            log(run, f"{label}: warning: cannot write the reference cache {path} ({e}); continuing without it")
    D.barrier()
    log(run, f"{label}: reference log-probs of {len(pairs)} pairs in {time.perf_counter() - t0:.1f}s -> {path}")
    return chosen, rejected
