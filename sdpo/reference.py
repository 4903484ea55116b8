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
from sdpo.logprobs import pair_forward
from sdpo.packing import collate, micro_batches, pack, pack_options, pair_cost
from sdpo.run import Run, free_memory, load_for_training, log, to_device


@torch.no_grad()
def pair_logps(model, pairs, *, pad_id: int, batch_size: int, device=None, autocast_dtype=None,
               rank: int = 0, world_size: int = 1, progress=None, packing: bool = True, share_prompt: bool = True,
               max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (chosen [N], rejected [N], float32 CPU) of TokenizedPairs, in order.

    Forwards of at most batch_size pairs and max_tokens packed tokens, packed as data.packing /
    data.share_prompt say (both False: padded rows). With world_size W > 1, rank r scores pairs
    r, r+W, r+2W, ... and the results are gathered; every rank runs the same number of forwards
    (FSDP all-gathers are collective), padding its share with repeats of pair 0 and cutting its
    share into as many forwards as the rank that needs most."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    opts = pack_options(packing=packing, share_prompt=share_prompt, device=device)
    costs = [pair_cost(p, opts is not None and opts["share_prompt"]) for p in pairs]
    per_rank = -(-len(pairs) // world_size)
    shares = [list(range(r, len(pairs), world_size)) for r in range(world_size)]
    shares = [ids + [0] * (per_rank - len(ids)) for ids in shares]
    cut = lambda ids, n=0: micro_batches(ids, costs, max_pairs=batch_size, max_tokens=max_tokens, min_count=n)  # noqa: E731
    plan = cut(shares[rank], max(len(cut(ids)) for ids in shares)) if pairs else []
    mine = len(range(rank, len(pairs), world_size))
    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    for chunk in plan:
        chunk_pairs = [pairs[i] for i in chunk]
        batch = collate(chunk_pairs, pad_id=pad_id) if opts is None else pack(chunk_pairs, pad_id=pad_id, **opts)
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            c, r = pair_forward(model, batch)
        chosen.append(c.logps.float())  # kept on the device: a .cpu() here would sync every batch
        rejected.append(r.logps.float())
        if progress is not None:
            progress.update(len(chunk))
    model.train(was_training)
    D.reshard_root(model)  # no backward follows to free the root's gathered params (FSDP)
    chosen, rejected = torch.cat(chosen)[:mine].cpu(), torch.cat(rejected)[:mine].cpu()
    full_c, full_r = torch.empty(len(pairs)), torch.empty(len(pairs))
    for r, (c, rj) in enumerate(D.all_gather_objects((chosen, rejected))):
        full_c[r::world_size], full_r[r::world_size] = c, rj
    return full_c, full_r


def run_pair_logps(run: Run, model, pairs, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pair_logps with this run's tokenizer, device, precision and ranks."""
    d, t = run.cfg.data, run.cfg.train
    return pair_logps(model, pairs, pad_id=run.tokenizer.pad_id, batch_size=batch_size, device=run.info.device,
                      autocast_dtype=run.autocast_dtype, rank=run.info.rank, world_size=run.info.world_size,
                      packing=d.packing, share_prompt=d.share_prompt,
                      max_tokens=t.ref_tokens_per_batch or t.tokens_per_micro_batch)


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
    # Packed rows sum in another order than padded ones (equal to float32 rounding, not bit for bit).
    rows = f"packing={run.cfg.data.packing},share_prompt={run.cfg.data.share_prompt}"
    return hashlib.sha256("|".join([weights_fingerprint(model_dir), pairs_fingerprint(pairs), str(run.autocast_dtype),
                                    params, run.info.device.type, rows]).encode()).hexdigest()[:24]


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
