"""The reference: log π_ref(y_w|x) and log π_ref(y_l|x) of every pair, and which model π_ref is.

Cached (the default): the reference is frozen during a step, so its log-probs are a function
of (weights, token ids, precision): one no-grad pass, sharded over the ranks, cached on disk
under a hash of exactly those, so a repeated or resumed run reuses them and a changed model,
dataset, tokenizer or truncation setting never reads a stale file.

The [reference] section (`References`): the model is M_{t-1} (sDPO) or reference.path at every
step (the paper's Table 1). An external reference with its own tokenizer scores its own
tokenization of the same texts (the same prompt rendering, the same responses); a pair either
tokenizer drops is dropped from the step. reference.mode = "live" keeps the model in memory
and scores each micro-batch the policy sees; reference.sync_every = τ adds TR-DPO's update
(Gorbatovski et al. 2024) every τ optimizer steps. The loss asks any of them `logps(batch)`.
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

from sdpo.data.packing import collate, micro_batches, pack, pair_cost
from sdpo.data.pairs import tokenize_pairs
from sdpo.data.tokenizer import load_tokenizer
from sdpo.logprobs import pack_options, pair_forward
from sdpo.metrics import gamma
from sdpo.models.checkpoint import files_signature, hash_weights, read_manifest
from sdpo.runtime import distributed as D
from sdpo.runtime.config import ConfigError
from sdpo.runtime.run import Run, TrainingError, free_memory, load_for_training, log, to_device


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


def run_pair_logps(run: Run, model, pairs, batch_size: int, *, tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """pair_logps with this run's tokenizer (or the given one), device, precision and ranks."""
    d, t = run.cfg.data, run.cfg.train
    pad_id = (tokenizer or run.tokenizer).pad_id
    return pair_logps(model, pairs, pad_id=pad_id, batch_size=batch_size, device=run.info.device,
                      autocast_dtype=run.autocast_dtype, rank=run.info.rank, world_size=run.info.world_size,
                      packing=d.packing, share_prompt=d.share_prompt,
                      max_tokens=t.ref_tokens_per_batch or t.tokens_per_micro_batch)


FINGERPRINTS = "fingerprints.json"  # in the reference cache dir: {resolved path: {"files": ..., "sha256": ...}}


def weights_fingerprint(model_dir: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 over config.json and every safetensors file (content, not mtime; sdpo.models.checkpoint.hash_weights).

    Rank 0 alone asks (reference_logps broadcasts its decision). An M_t this run exported carries
    the hash in its manifest, written once by the exporter: read, not recomputed. A foreign
    directory (S, reference.path) is hashed once; the result is kept in cache_dir/fingerprints.json
    under its path and its files' sizes and mtimes, so a later step or a resumed run reads it back."""
    fingerprint = read_manifest(model_dir)
    if fingerprint is not None:
        return fingerprint
    sig = {"path": str(Path(model_dir).resolve()), "files": files_signature(model_dir)}
    known = Path(cache_dir) / FINGERPRINTS if cache_dir is not None else None
    table = {}
    if known is not None and known.is_file():
        try:
            table = json.loads(known.read_text())
            hit = table.get(sig["path"])
            if isinstance(hit, dict) and hit.get("files") == sig["files"] and isinstance(hit.get("sha256"), str):
                return hit["sha256"]
        except (OSError, ValueError, AttributeError):  # a damaged table is only a cache: hash again
            table = {}
    fingerprint = hash_weights(model_dir)
    if known is not None:
        try:  # temp name + rename, as the cache files
            known.parent.mkdir(parents=True, exist_ok=True)
            table[sig["path"]] = {"files": sig["files"], "sha256": fingerprint}
            tmp = known.with_name(f".{FINGERPRINTS}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(table, indent=1) + "\n")
            os.replace(tmp, known)
        except OSError:
            pass
    return fingerprint


def pairs_fingerprint(pairs) -> str:
    """sha256 of the token ids: covers the data, the tokenizer, the chat template and truncation."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()


def cache_key(run: Run, model_dir: str | Path, pairs, cache_dir: str | Path | None = None) -> str:
    # FSDP's bf16 parameters (world size > 1 on GPU) give other numbers than float32 weights
    # under bf16 autocast, so they key differently.
    params = "fsdp-bf16" if run.info.distributed and run.autocast_dtype is not None else "fp32"
    # Packed rows sum in another order than padded ones (equal to float32 rounding, not bit for bit).
    rows = f"packing={run.cfg.data.packing},share_prompt={run.cfg.data.share_prompt}"
    return hashlib.sha256("|".join([weights_fingerprint(model_dir, cache_dir), pairs_fingerprint(pairs), str(run.autocast_dtype),
                                    params, run.info.device.type, rows]).encode()).hexdigest()[:24]


def reference_logps(run: Run, model_dir: str | Path, pairs, label: str, *,
                    tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_ref(y_w|x), log π_ref(y_l|x) for every pair ([N] each), from the cache when the key matches.

    tokenizer: the one `pairs` were made with, when not the run's (an external reference's own);
    the key covers its token ids through pairs_fingerprint."""
    cfg = run.cfg
    cache_dir = Path(cfg.train.ref_cache_dir or run.out / "ref_cache")
    # Rank 0 alone hashes, looks and reads; every rank takes its answer (ranks deciding on their own
    # could disagree, e.g. a cache on a node-local disk, and the ones that miss would wait forever
    # in the reference pass's collectives for the ones that hit).
    key, cached = D.broadcast_object(_look_up(run, model_dir, pairs, cache_dir, label) if run.info.is_main else None)
    path = cache_dir / f"{key}.safetensors"
    if cached is not None:
        log(run, f"{label}: reference log-probs from cache {path}")
        return cached
    t0 = time.perf_counter()
    # The run's own tokenizer: the plain call (tests wrap load_for_training as (run, dir)).
    model = load_for_training(run, model_dir) if tokenizer in (None, run.tokenizer) else \
        load_for_training(run, model_dir, tokenizer=tokenizer)
    chosen, rejected = run_pair_logps(run, model, pairs, cfg.train.ref_batch_size or cfg.train.micro_batch_size,
                                      tokenizer=tokenizer)
    del model
    free_memory()
    if run.info.is_main:
        # Temp name + rename: a kill leaves the old file or none (sdpo.runtime.state.recover removes the temp).
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


def _look_up(run: Run, model_dir, pairs, cache_dir: Path, label: str):
    """(cache key, (chosen, rejected) from the cache file or None): rank 0's decision."""
    key = cache_key(run, model_dir, pairs, cache_dir)
    path = cache_dir / f"{key}.safetensors"
    if path.is_file():
        try:
            t = load_file(path)
            if t["chosen"].shape == t["rejected"].shape == (len(pairs),):
                return key, (t["chosen"], t["rejected"])
        except (OSError, SafetensorError, KeyError) as e:  # damaged on disk: the cache is only a cache
            log(run, f"{label}: ignoring the unreadable cache file {path} ({e}); computing the log-probs again")
    return key, None


# --------------------------------------------------------------------------------------
# Which model is the reference, and how a micro-batch gets its log-probs
# --------------------------------------------------------------------------------------

class CachedReference:
    """A step's reference log-probs ([N] each, from reference_logps), looked up per micro-batch."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor, device=None):
        # Moved once: indexed by each micro-batch's device-side "index" (positions in the step's pairs).
        self.chosen, self.rejected = chosen.to(device, torch.float32), rejected.to(device, torch.float32)

    @property
    def gamma_mean(self) -> float:
        """Mean γ_πref of the step's pairs: the paper's Figure 2 statistic (one host sync)."""
        return float(gamma(self.chosen, self.rejected).mean())

    def logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        idx = batch["index"]  # [B] long, on the device
        return self.chosen[idx], self.rejected[idx]

    def after_step(self, policy, done: int) -> None:
        pass


class LiveReference:
    """The reference model in memory (eval mode, no grad, no optimizer state), scoring the same
    packed micro-batch the policy sees; with sync_every = τ, TR-DPO's update every τ steps."""

    gamma_mean = None  # no pass over the whole step up front

    def __init__(self, model, sync_every: int | None = None, sync_alpha: float = 1.0):
        self.model, self.sync_every, self.sync_alpha = model, sync_every, sync_alpha
        model.eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        c, r = pair_forward(self.model, batch)  # under the loop's autocast, as the cached pass runs
        return c.logps.float(), r.logps.float()

    def after_step(self, policy, done: int) -> None:
        """Called after optimizer step `done` (1-based, within the stage)."""
        # Frees what no-grad forwards left gathered (no backward reshards them), and makes
        # parameters() the sharded ones again before a sync writes them.
        for m in self.model.modules():
            D.reshard_root(m)
        if self.sync_every and done % self.sync_every == 0:
            mix_into(self.model, policy, self.sync_alpha)


@torch.no_grad()
def mix_into(ref, policy, alpha: float) -> None:
    """TR-DPO's soft update (Gorbatovski et al. 2024, Sec. 3): θ_ref ← α·θ + (1 − α)·θ_ref, per
    parameter; α = 1 is the hard update θ_ref ← θ. Sharded, both models have the same FSDP2 layout
    (the same loader, the same mesh), so each rank mixes its own local shards: no gather."""
    refs, pols = dict(ref.named_parameters()), dict(policy.named_parameters())
    if refs.keys() != pols.keys():
        raise TrainingError(f"reference.sync_every: the reference and the policy have different parameters "
                            f"({sorted(set(refs) ^ set(pols))[:4]} ...); TR-DPO needs one architecture")
    local = lambda x: x.to_local() if hasattr(x, "to_local") else x  # noqa: E731  (DTensor -> this rank's shard)
    for name, r in refs.items():
        r, p = local(r), local(pols[name])
        if r.shape != p.shape:
            raise TrainingError(f"reference.sync_every: {name} is {tuple(r.shape)} in the reference but "
                                f"{tuple(p.shape)} in the policy; TR-DPO needs one architecture")
        if alpha == 1.0:
            r.copy_(p)
        else:
            r.lerp_(p.to(r.dtype), alpha)  # r + α (p − r)


class References:
    """The [reference] section: each step's reference model, its tokenization, cached or live."""

    def __init__(self, run: Run):
        r = self.section = run.cfg.reference
        self.run, self.tokenizer, self.live = run, run.tokenizer, None
        if r.path is not None:
            tok_dir = r.tokenizer or r.path
            # The same prompt text unless told otherwise: the policy's template, rendered by the
            # reference's tokenizer (with its own special tokens).
            template = r.chat_template or run.tokenizer.chat_template
            if not (tok_dir == run.tokenizer_dir and template == run.tokenizer.chat_template):
                self.tokenizer = load_tokenizer(tok_dir, template, run.tokenizer.template_kwargs)

    def model_dir(self, prev: str) -> str:
        return self.section.path or prev

    def for_step(self, prev: str, pairs, examples, label: str):
        """(the step's pairs, its reference): prev = M_{t-1}; examples = the step's examples that
        `pairs` were tokenized from. The pairs are those both tokenizers keep."""
        run, r = self.run, self.section
        ref_pairs = pairs
        if self.tokenizer is not run.tokenizer:
            cfg = run.cfg.data
            ref_pairs, _ = tokenize_pairs(examples, self.tokenizer, max_length=cfg.max_length,
                                          max_prompt_length=cfg.prompt_length, truncation=cfg.truncation)
            pairs, ref_pairs = keep_common(pairs, ref_pairs)
            if not pairs:
                raise TrainingError(f"{label}: no pair is kept by both the policy's and the reference's tokenizer")
            log(run, f"{label}: the reference ({self.tokenizer.path}) scores its own tokenization; "
                     f"{len(pairs)} pairs kept by both tokenizers")
        if r.mode == "cached":
            c, rj = reference_logps(run, self.model_dir(prev), ref_pairs, label, tokenizer=self.tokenizer)
            return pairs, CachedReference(c, rj, run.info.device)
        for i, (a, b) in enumerate(zip(pairs, ref_pairs)):
            if (a.prompt_ids, a.chosen_ids, a.rejected_ids) != (b.prompt_ids, b.chosen_ids, b.rejected_ids):
                raise ConfigError(f"reference.mode = \"live\" scores the policy's own batches, but the reference's "
                                  f"tokenizer {self.tokenizer.path} tokenizes example {a.index} of {label} "
                                  f"differently; use reference.mode = \"cached\"")
        if self.live is not None:  # TR-DPO: the synced reference carries over to the next step
            return pairs, self.live
        if r.sync_every and run.resume_state is not None:
            log(run, f"{label}: warning: resuming a TR-DPO run: the reference restarts from "
                     f"{self.model_dir(prev)} (the synced weights are not in the saved state)")
        live = LiveReference(self.load(self.model_dir(prev)), r.sync_every, r.sync_alpha)
        log(run, f"{label}: live reference {self.model_dir(prev)}"
                 + (f", TR-DPO sync every {r.sync_every} steps, alpha {r.sync_alpha}" if r.sync_every else ""))
        if r.sync_every:
            self.live = live
        return pairs, live

    def load(self, model_dir: str):
        """The policy's loader: FSDP2 shards under torchrun (the layout mix_into relies on), bf16
        compute on GPU (FSDP's param dtype / autocast) as in the cached pass. The stored weights stay
        float32, so a soft sync's small α·(θ − θ_ref) is not rounded away."""
        run = self.run
        if self.tokenizer is run.tokenizer:
            return load_for_training(run, model_dir)
        return load_for_training(run, model_dir, tokenizer=self.tokenizer)


def keep_common(pairs, ref_pairs):
    """The pairs (by example index) that both tokenizations kept, in the policy's order."""
    by_index = {p.index: p for p in ref_pairs}
    kept = [p for p in pairs if p.index in by_index]
    return kept, [by_index[p.index] for p in kept]
