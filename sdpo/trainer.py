"""The sDPO driver: optional SFT stage, then for t = 1..T

    reference M_{t-1} --one no-grad pass over D_t (cached on disk)--> ref log-probs
    policy    M_{t-1} (or S with train.init = "base") --DPO on D_t--> M_t (HF export)

(Kim et al. 2024, "sDPO: Don't Use Your Data All at Once", Sec. 2.2; M_0 = S.)
Plain DPO is the same run with data.split = "all" (one step over all the data).

Everything is a plain function; `train(cfg)` reads top to bottom and `optimize` is
the one training loop, shared by the SFT and DPO stages (they differ in the loss of a
micro-batch only). Under torchrun the model is sharded with FSDP2 (sdpo.distributed);
each rank reads its disjoint share of every global batch.

Output directory layout:
    config.toml       the resolved config
    metrics.jsonl     one JSON line per logging step (+ gamma_ref/mean at each step start)
    sft/              S, when built by the SFT stage
    M1/ .. MT/        the aligned models, HF format; M_t is step t+1's reference
    ref_cache/        reference log-probs, one file per (weights, data, tokenization) key
    state/            resumable state (DCP) of the stage in progress
    progress.json     the stages finished so far
    summary.json      the end-of-run table (eval.summary = true)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdpo import distributed as D
from sdpo.config import Config, ConfigError, config_to_dict, save_config
from sdpo.data import batch_schedule, collate, read_preferences, split_steps, tokenize_pairs
from sdpo.logprobs import concatenated_forward, sequence_logps
from sdpo.loss import preference_loss

STATE = "state"
PROGRESS = "progress.json"
# Keys that may change between a run and its --resume without changing the result.
RESUME_MAY_CHANGE = {("train", "resume"), ("train", "stop_after"), ("train", "log_every"), ("train", "save_every"),
                     ("eval", "summary"), ("eval", "batch_size"), ("train", "ref_batch_size")}


class TrainingError(RuntimeError):
    pass


class StopRequested(Exception):
    """train.stop_after reached (fault injection: the process exits as a kill would)."""


@dataclasses.dataclass
class Run:
    """What every stage needs; a record, not a class to subclass."""
    cfg: Config
    info: D.DistInfo
    mesh: object
    out: Path
    tokenizer: object
    tokenizer_dir: str
    autocast_dtype: torch.dtype | None     # bf16 on GPU by default; None = float32 everywhere
    num_steps: int = 0                     # T, the number of sDPO steps
    global_step: int = 0                   # optimizer steps over all stages
    resume_state: dict | None = None       # meta of the state/ checkpoint to continue from


# --------------------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------------------

def check_setup(cfg: Config, world_size: int) -> None:
    """Paths and batch arithmetic; raises ConfigError naming the key."""
    problems = []
    for key, paths in (("data.datasets", cfg.data.datasets), ("data.test_datasets", cfg.data.test_datasets),
                       ("sft.datasets", cfg.sft.datasets if cfg.sft.enabled else [])):
        for i, p in enumerate(paths):
            if not Path(p).exists():
                problems.append(f"{key}[{i}]: {p} does not exist")
    if cfg.model.path is not None and not (Path(cfg.model.path) / "config.json").is_file():
        problems.append(f"model.path: {cfg.model.path} is not a model directory (no config.json)")
    tok = cfg.model.tokenizer or cfg.model.path
    if tok is not None and not Path(tok).is_dir():
        problems.append(f"model.tokenizer: {tok} is not a directory")
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        problems.append(f"train.output_dir: {out} exists and is not a directory")
    for sec in ("train", "sft"):
        s = getattr(cfg, sec)
        if sec == "sft" and not s.enabled:
            continue
        if s.global_batch_size % (world_size * s.micro_batch_size):
            problems.append(f"{sec}.global_batch_size ({s.global_batch_size}) must be divisible by world size "
                            f"({world_size}) x {sec}.micro_batch_size ({s.micro_batch_size})")
    if problems:
        raise ConfigError("cannot start:\n  " + "\n  ".join(problems))


def load_steps(cfg: Config, tokenizer):
    """Read the datasets (each one a list of examples); returns (datasets, test sets tokenized,
    the SFT examples when sft.datasets is set, else None)."""
    d = cfg.data
    datasets = [read_preferences([p], schema=d.schema, on_error=d.on_error)[0] for p in d.datasets]
    tests = []
    for p in d.test_datasets:
        ex = read_preferences([p], schema=d.schema, on_error=d.on_error)[0][: d.max_test_examples]
        tests.append(tokenize(cfg, ex, tokenizer, f"test set {p}"))
    sft = None
    if cfg.sft.enabled and cfg.sft.datasets:
        sft = read_preferences(cfg.sft.datasets, schema=d.schema, on_error=d.on_error)[0]
    return datasets, tests, sft


def tokenize(cfg: Config, examples, tokenizer, what: str):
    pairs, stats = tokenize_pairs(examples, tokenizer, max_length=cfg.data.max_length,
                                  max_prompt_length=cfg.data.max_prompt_length, truncation=cfg.data.truncation)
    if not pairs:
        raise TrainingError(f"{what}: no pairs left after tokenization ({stats})")
    return pairs


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

def load_for_training(run: Run, model_dir: str | Path):
    """float32 master weights on this rank's device; FSDP2-sharded under torchrun."""
    from sdpo.checkpoint import load_config, load_model
    from sdpo.tokenizer import check_vocab

    check_vocab(run.tokenizer, load_config(model_dir))  # before any weights are read
    if run.info.distributed:
        # Each rank reads only its own FSDP shard rows: never a full float32 copy per rank.
        mp = D.default_mp_policy(run.info.device, run.cfg.train.precision)
        return D.load_sharded(model_dir, run.mesh, mp_policy=mp,
                              reshard_after_forward=run.cfg.train.reshard_after_forward,
                              activation_checkpointing=run.cfg.model.activation_checkpointing, device=run.info.device)
    model = load_model(model_dir, dtype=torch.float32, device=run.info.device)
    model.gradient_checkpointing = run.cfg.model.activation_checkpointing
    return model

def random_base(run: Run):
    """The tiny default's starting point: a random-init Llama sized by [model], vocab from the tokenizer."""
    from sdpo.model import ModelConfig, Transformer

    m, tok = run.cfg.model, run.tokenizer
    config = ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, torch_dtype="float32")
    model = Transformer(config)
    model.init_weights(seed=run.cfg.train.seed, std=m.init_std)
    return model


def export(run: Run, model, path: Path, dtype: str | None) -> None:
    """M_t as an HF directory (gathered to rank 0, written atomically by sdpo.checkpoint)."""
    from sdpo.checkpoint import save_state_dict

    state = D.full_state_dict(model)
    if run.info.is_main:
        save_state_dict(state, model.config, path, tokenizer_dir=run.tokenizer_dir, dtype=dtype)
    D.barrier()


def free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def autocast(run: Run):
    if run.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(run.info.device.type, dtype=run.autocast_dtype)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --------------------------------------------------------------------------------------
# Reference log-probs: one no-grad pass, sharded over ranks, cached on disk
# --------------------------------------------------------------------------------------

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


@torch.no_grad()
def pair_logps(run: Run, model, pairs, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (chosen [N], rejected [N], float32 CPU) of `pairs`.

    Rank r scores pairs r, r+W, r+2W, ...; every rank runs the same number of forwards
    (FSDP all-gathers are collective), padding its last batch with a repeat of pair 0."""
    W, r = run.info.world_size, run.info.rank
    mine = list(range(r, len(pairs), W))
    per_rank = -(-len(pairs) // W)
    padded = mine + [0] * (per_rank - len(mine))
    chosen, rejected = [], []
    model.eval()
    for s in range(0, len(padded), batch_size):
        batch = collate([pairs[i] for i in padded[s:s + batch_size]], pad_id=run.tokenizer.pad_id)
        with autocast(run):
            c, rj = concatenated_forward(model, to_device(batch, run.info.device))
        chosen.append(c.logps.float())  # kept on the device: a .cpu() here would sync every batch
        rejected.append(rj.logps.float())
    model.train()
    chosen, rejected = torch.cat(chosen)[: len(mine)].cpu(), torch.cat(rejected)[: len(mine)].cpu()
    full_c, full_r = torch.empty(len(pairs)), torch.empty(len(pairs))
    for rank, (c, rj) in enumerate(D.all_gather_objects((chosen, rejected))):
        full_c[rank::W], full_r[rank::W] = c, rj
    return full_c, full_r


def reference_logps(run: Run, model_dir: str | Path, pairs, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_ref(y_w|x), log π_ref(y_l|x) for every pair ([N] each), from the cache when the key matches.

    The key hashes the reference's weights, the token ids and the forward's precision, so
    a changed model, dataset, tokenizer or truncation setting never reuses a stale file."""
    cfg = run.cfg
    # FSDP's bf16 parameters (world size > 1 on GPU) give other numbers than float32 weights
    # under bf16 autocast, so they key differently.
    params = "fsdp-bf16" if run.info.distributed and run.autocast_dtype is not None else "fp32"
    key = hashlib.sha256("|".join([weights_fingerprint(model_dir), pairs_fingerprint(pairs), str(run.autocast_dtype),
                                   params, run.info.device.type]).encode()).hexdigest()[:24]
    cache_dir = Path(cfg.train.ref_cache_dir or run.out / "ref_cache")
    path = cache_dir / f"{key}.safetensors"
    if path.is_file():
        t = load_file(path)
        if t["chosen"].shape == (len(pairs),):
            log(run, f"{label}: reference log-probs from cache {path}")
            return t["chosen"], t["rejected"]
    t0 = time.perf_counter()
    model = load_for_training(run, model_dir)
    chosen, rejected = pair_logps(run, model, pairs, cfg.train.ref_batch_size or cfg.train.micro_batch_size)
    free(model)
    if run.info.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".{key}.tmp{os.getpid()}"
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, tmp,
                  metadata={"model_dir": str(model_dir), "pairs": str(len(pairs))})
        os.replace(tmp, path)
    D.barrier()
    log(run, f"{label}: reference log-probs of {len(pairs)} pairs in {time.perf_counter() - t0:.1f}s -> {path}")
    return chosen, rejected


# --------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------

def make_optimizer(model, name: str, lr: float, weight_decay: float, cfg: Config):
    # Decay matrices only; norms (and biases) are not decayed.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    o = cfg.optim
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps)
    return torch.optim.RMSprop(groups, lr=lr, alpha=o.alpha, eps=o.eps)


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    """Linear warmup over `warmup` steps, then constant / linear / cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * (1.0 - progress)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak


# --------------------------------------------------------------------------------------
# Micro-batch losses. Each returns (loss to backward, stats [K] summed over the micro-batch)
# --------------------------------------------------------------------------------------

DPO_STATS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected"]


def dpo_micro_loss(run: Run, model, batch, ref_chosen, ref_rejected, scale: float):
    """DPO eq. (7): -log σ(β[(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]), via sdpo.loss.

    ref_chosen, ref_rejected: [N] float32 on the batch's device (optimize moves them once per stage)."""
    lo = run.cfg.loss
    idx = batch["index"]  # [B] long, on the device
    policy_chosen, policy_rejected = concatenated_forward(model, batch)
    needs_nll = "sft" in lo.types or lo.rpo_alpha is not None
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen.logps, policy_rejected.logps, ref_chosen[idx], ref_rejected[idx],
        loss_type=lo.types, beta=lo.beta, label_smoothing=lo.label_smoothing, loss_weights=lo.weights,
        reference_free=lo.reference_free, rpo_alpha=lo.rpo_alpha,
        policy_chosen_nll=-policy_chosen.mean_logps if needs_nll else None,  # [B] NLL per token
        chosen_lengths=policy_chosen.counts if lo.length_normalize else None,
        rejected_lengths=policy_rejected.counts if lo.length_normalize else None)
    stats = torch.stack([losses.sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                         (chosen_rewards > rejected_rewards).float().sum(),
                         (chosen_rewards - rejected_rewards).sum(),
                         policy_chosen.logps.sum(), policy_rejected.logps.sum()]).detach().float()
    # scale = W / global batch: FSDP averages gradients over ranks, so the gradient is the
    # global-batch mean whatever the world size and accumulation.
    return losses.sum() * scale, stats


def sft_micro_loss(run: Run, model, batch, scale: float):
    """NLL of the chosen responses (rows 0..B-1 of the collated batch), per token over the global batch."""
    B = batch["input_ids"].shape[0] // 2
    out = sequence_logps(model, batch["input_ids"][:B], batch["labels"][:B],
                         batch["attention_mask"][:B], batch["position_ids"][:B])
    nll = -out.logps.sum()
    return nll * scale, torch.stack([nll.detach().float(), out.counts.sum().float()])


# --------------------------------------------------------------------------------------
# Resumable state (torch.distributed.checkpoint), written atomically
# --------------------------------------------------------------------------------------

def save_state(run: Run, model, optimizer, meta: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp, old = run.out / STATE, run.out / f".{STATE}.tmp", run.out / f".{STATE}.old"
    if run.info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    D.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.save({"model": model_sd, "optim": optim_sd, "rng": rng}, checkpoint_id=str(tmp))
    D.barrier()
    if run.info.is_main:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        # A kill between these renames leaves .state.old, which load_state_meta falls back to.
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    D.barrier()


def load_state_meta(out: Path) -> dict | None:
    final, old = out / STATE, out / f".{STATE}.old"
    if not (final / "meta.json").is_file() and (old / "meta.json").is_file():
        os.rename(old, final)
    if (final / "meta.json").is_file():
        return json.loads((final / "meta.json").read_text())
    return None


def load_state(run: Run, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    state = {"model": model_sd, "optim": optim_sd, "rng": rng}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, checkpoint_id=str(run.out / STATE))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])


# --------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------

def log(run: Run, msg: str) -> None:
    if run.info.is_main:
        print(msg, file=sys.stderr, flush=True)


def write_metrics(run: Run, row: dict) -> None:
    if run.info.is_main:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def peak_mem_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# --------------------------------------------------------------------------------------
# The training loop (SFT and DPO stages)
# --------------------------------------------------------------------------------------

def optimize(run: Run, model, pairs, *, stage: str, sdpo_step: int, hp, lr: float, warmup_ratio: float,
             schedule: str, weight_decay: float, ref=None) -> None:
    """Train `model` in place on `pairs`: one optimizer step per global batch.

    stage "sft" minimises the chosen-response NLL; "dpo" the preference loss against
    `ref` = (ref_chosen [N], ref_rejected [N]). hp has global_batch_size,
    micro_batch_size, epochs, max_steps. The learning-rate schedule restarts here."""
    cfg, info = run.cfg, run.info
    W, G, m = info.world_size, hp.global_batch_size, hp.micro_batch_size
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]

    def schedule_for(epoch):
        # Seeded per (stage, epoch): the order is a function of the step, so a resumed
        # run sees exactly the batches an uninterrupted one would.
        return batch_schedule(len(pairs), G, seed=cfg.train.seed + sdpo_step, epoch=epoch, rank=info.rank,
                              world_size=W, lengths=lengths, group_by_length=cfg.data.group_by_length)

    per_epoch = len(schedule_for(0))
    if per_epoch == 0:
        raise TrainingError(f"{stage} (sDPO step {sdpo_step}): {len(pairs)} pairs make no full global batch of {G}")
    total = per_epoch * hp.epochs if hp.max_steps is None else min(per_epoch * hp.epochs, hp.max_steps)
    warmup = math.ceil(warmup_ratio * total)
    optimizer = make_optimizer(model, cfg.optim.name if stage == "dpo" else "adamw", lr, weight_decay, cfg)
    name = "SFT" if stage == "sft" else f"sDPO step {sdpo_step}/{run.num_steps}"

    start = 0
    if run.resume_state is not None and run.resume_state["stage"] == [stage, sdpo_step]:
        load_state(run, model, optimizer)
        start = run.resume_state["step"]
        run.global_step = run.resume_state["global_step"]
        log(run, f"{name}: resumed at optimizer step {start}/{total} from {run.out / STATE}")
    run.resume_state = None

    if ref is not None:
        # [N] float32 each, moved once: indexed by each micro-batch's device-side "index" (positions in pairs).
        ref = (ref[0].to(info.device, torch.float32), ref[1].to(info.device, torch.float32))
    model.train()
    epoch_cache = {}
    t_start, t_prev = time.perf_counter(), time.perf_counter()
    # Logged values are means over the optimizer steps since the last log line (as other DPO
    # trainers log them), not a snapshot of the last step.
    tokens, window_steps, window_loss, window_grad_norm, window_stats = 0, 0, 0.0, 0.0, 0
    for k in range(start, total):
        epoch, j = divmod(k, per_epoch)
        if epoch not in epoch_cache:
            epoch_cache = {epoch: schedule_for(epoch)}
        indices = epoch_cache[epoch][j]
        cur_lr = lr_at(k, total, warmup, lr, schedule)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr

        if stage == "sft":
            # Per-token mean over the global batch needs its token count before backward.
            n_tok = D.all_reduce(torch.tensor([float(sum(len(pairs[i].chosen_ids) for i in indices))]))
            scale = W / n_tok.item()
        else:
            scale = W / G
        stats = None
        for s in range(0, len(indices), m):
            batch = collate([pairs[i] for i in indices[s:s + m]], pad_id=run.tokenizer.pad_id)
            # Positions in `pairs`, as the reference log-probs are laid out. TokenizedPair.index is
            # the example's position before tokenization dropped any pair, so it can differ.
            batch["index"] = torch.tensor(indices[s:s + m])
            # Counted on the CPU copy: int() of a device tensor would sync every micro-batch.
            mask = batch["attention_mask"]
            tokens += int(mask.sum() if stage == "dpo" else mask[: mask.shape[0] // 2].sum())
            batch = to_device(batch, info.device)
            with autocast(run):
                if stage == "sft":
                    loss, st = sft_micro_loss(run, model, batch, scale)
                else:
                    loss, st = dpo_micro_loss(run, model, batch, ref[0], ref[1], scale)
            loss.backward()
            stats = st if stats is None else stats + st
        stats = D.all_reduce(stats).cpu()  # the step's one sync: the loss check below needs it

        max_norm = cfg.optim.max_grad_norm if stage == "dpo" else 1.0
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        loss_value = float(stats[0] / (G if stage == "dpo" else stats[1]))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise TrainingError(
                f"{name}: non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} at optimizer "
                f"step {k + 1}/{total} (global step {run.global_step + 1}): loss={loss_value}, grad_norm={grad_norm}. "
                f"Weights were not updated; the last good checkpoint is in {run.out}. Lower the learning rate "
                f"(optim.lr) or set optim.max_grad_norm.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.global_step += 1
        done = k + 1
        window_steps, window_loss, window_grad_norm = window_steps + 1, window_loss + loss_value, window_grad_norm + grad_norm
        window_stats = window_stats + stats

        if done % cfg.train.log_every == 0 or done == total:
            now = time.perf_counter()
            row = {"step": run.global_step, "sdpo_step": sdpo_step, "stage": stage, "epoch": epoch,
                   "lr": cur_lr, "loss": window_loss / window_steps, "grad_norm": window_grad_norm / window_steps}
            if stage == "dpo":
                row.update({name_: float(window_stats[i] / (G * window_steps))
                            for i, name_ in enumerate(DPO_STATS) if i > 0})
            all_tokens = D.all_reduce(torch.tensor([float(tokens)])).item()
            row["tokens_per_s"] = all_tokens / max(now - t_prev, 1e-9)
            row["peak_mem_gb"] = peak_mem_gb(info.device)
            write_metrics(run, row)
            eta = (now - t_start) / (done - start) * (total - done)
            extra = f" acc {row['rewards/accuracies']:.3f} margin {row['rewards/margins']:.3f}" if stage == "dpo" else ""
            log(run, f"{name} | {done}/{total} | loss {row['loss']:.4f}{extra} | lr {cur_lr:.2e} | "
                     f"gnorm {row['grad_norm']:.3f} | {row['tokens_per_s']:.0f} tok/s | ETA {fmt_time(eta)}")
            t_prev, tokens, window_steps, window_loss, window_grad_norm, window_stats = now, 0, 0, 0.0, 0.0, 0

        if cfg.train.save_every and done % cfg.train.save_every == 0 and done < total:
            save_state(run, model, optimizer, {"stage": [stage, sdpo_step], "step": done,
                                               "global_step": run.global_step})
        if cfg.train.stop_after is not None and run.global_step >= cfg.train.stop_after:
            raise StopRequested(f"stopped after {run.global_step} optimizer steps (train.stop_after)")
    free(optimizer)


# --------------------------------------------------------------------------------------
# The sDPO driver
# --------------------------------------------------------------------------------------

def read_progress(out: Path) -> dict:
    p = out / PROGRESS
    return json.loads(p.read_text()) if p.is_file() else {"done": [], "global_step": 0}


def write_progress(run: Run, progress: dict) -> None:
    if run.info.is_main:
        tmp = run.out / f".{PROGRESS}.tmp"
        tmp.write_text(json.dumps(progress, indent=1))
        os.replace(tmp, run.out / PROGRESS)
        shutil.rmtree(run.out / STATE, ignore_errors=True)  # the finished stage's state is stale
    D.barrier()


def prepare_output(run: Run) -> dict:
    """Fresh run: clear our earlier outputs (not the reference cache). --resume: check the
    config matches the saved one and return the progress so far."""
    cfg, out = run.cfg, run.out
    saved = out / "config.toml"
    if cfg.train.resume:
        if not saved.is_file():
            raise ConfigError(f"--resume: {out} has no config.toml; nothing to resume")
        from sdpo.config import load_config

        before, now = config_to_dict(load_config(saved, validate=False)), config_to_dict(cfg)
        diffs = [f"{s}.{k}: {before[s][k]!r} -> {now[s][k]!r}" for s in now for k in now[s]
                 if (s, k) not in RESUME_MAY_CHANGE and before[s][k] != now[s][k]]
        if diffs:
            raise ConfigError(f"--resume: the config differs from the run in {out}:\n  " + "\n  ".join(diffs))
        progress = read_progress(out)
        run.resume_state = load_state_meta(out)
        run.global_step = progress["global_step"]
        # Drop metric lines the resumed run will write again.
        step = run.resume_state["global_step"] if run.resume_state else progress["global_step"]
        mpath = out / "metrics.jsonl"
        # A step's gamma_ref/mean line is written again unless the run resumes inside that step.
        inside = run.resume_state["stage"][1] if run.resume_state and run.resume_state["stage"][0] == "dpo" else None

        def kept(row):
            if "gamma_ref/mean" in row and f"M{row['sdpo_step']}" not in progress["done"]:
                return row["sdpo_step"] == inside
            return row.get("step", 0) <= step

        if run.info.is_main and mpath.is_file():
            keep = [ln for ln in mpath.read_text().splitlines() if kept(json.loads(ln))]
            mpath.write_text("".join(ln + "\n" for ln in keep))
        return progress
    if run.info.is_main:
        if out.is_dir() and any(out.iterdir()):
            log(run, f"note: {out} exists; starting over (pass --resume to continue the run in it)")
        for p in [STATE, f".{STATE}.tmp", f".{STATE}.old", PROGRESS, "metrics.jsonl", "summary.json", "sft"]:
            q = out / p
            shutil.rmtree(q, ignore_errors=True) if q.is_dir() else q.unlink(missing_ok=True)
        for q in out.glob("M[0-9]*"):
            shutil.rmtree(q, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        save_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=False, stop_after=None)),
                    out / "config.toml")
    D.barrier()
    return {"done": [], "global_step": 0}


def train(cfg: Config) -> dict:
    """Run the whole recipe; returns {"base": dir, "models": [M_1 dir, ...], "summary": {...} or None}."""
    from sdpo.tokenizer import load_tokenizer

    info = D.init_distributed(cfg.train.device)
    check_setup(cfg, info.world_size)
    torch.manual_seed(cfg.train.seed)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and info.device.type == "cuda")
    tok_dir = cfg.model.tokenizer or cfg.model.path
    run = Run(cfg=cfg, info=info, mesh=D.build_mesh(info), out=Path(cfg.train.output_dir),
              tokenizer=load_tokenizer(tok_dir, cfg.model.chat_template), tokenizer_dir=tok_dir,
              autocast_dtype=torch.bfloat16 if bf16 else None)

    # Everything that can fail on bad input fails here, before any model work.
    datasets, tests, sft_examples = load_steps(cfg, run.tokenizer)
    if cfg.data.split != "easy_to_hard":
        steps = split_steps(datasets, cfg.data.split, fractions=cfg.data.fractions, seed=cfg.train.seed)
        steps = [tokenize(cfg, d[: cfg.data.max_examples], run.tokenizer, f"sDPO step {t + 1}")
                 for t, d in enumerate(steps)]
        run.num_steps = len(steps)
    else:
        run.num_steps = len(cfg.data.fractions)
    progress = prepare_output(run)
    log(run, f"sdpo: world size {info.world_size}, device {info.device}, "
             f"{'bf16 autocast' if bf16 else 'float32'}, output {run.out}")

    # Stage 0: the base S, given or made by SFT on the chosen responses.
    base = cfg.model.path
    base_dtype = None
    if cfg.sft.enabled:
        base = str(run.out / "sft")
        if "sft" not in progress["done"]:
            if cfg.model.path is None:
                model = random_base(run)
                if info.distributed:
                    model = _shard_random(run, model)
                else:
                    model.to(info.device)
            else:
                model = load_for_training(run, cfg.model.path)
            pool = tokenize(cfg, sft_examples or [ex for d in datasets for ex in d], run.tokenizer, "SFT data")
            optimize(run, model, pool, stage="sft", sdpo_step=0, hp=cfg.sft, lr=cfg.sft.lr,
                     warmup_ratio=cfg.sft.warmup_ratio, schedule=cfg.sft.schedule,
                     weight_decay=cfg.sft.weight_decay)
            export(run, model, Path(base), cfg.model.export_dtype)
            free(model)
            progress = {"done": progress["done"] + ["sft"], "global_step": run.global_step}
            write_progress(run, progress)
            log(run, f"SFT: base S saved to {base}")
    from sdpo.checkpoint import load_config as load_model_config

    base_dtype = cfg.model.export_dtype or load_model_config(base).torch_dtype

    if cfg.data.split == "easy_to_hard":
        # The paper's open question (Sec. 4): order by the base's γ, easiest (highest) first.
        pool = [ex for d in datasets for ex in d]
        pool_pairs, stats = tokenize_pairs(pool, run.tokenizer, max_length=cfg.data.max_length,
                                           max_prompt_length=cfg.data.max_prompt_length,
                                           truncation=cfg.data.truncation)
        c, r = reference_logps(run, base, pool_pairs, "easy_to_hard scores (S)")
        scores = [0.0] * len(pool)  # pairs dropped by tokenization get a neutral score (and are dropped again)
        for p, g in zip(pool_pairs, (c - r).tolist()):
            scores[p.index] = g
        steps = split_steps(datasets, "easy_to_hard", fractions=cfg.data.fractions, seed=cfg.train.seed,
                            scores=scores)
        steps = [tokenize(cfg, d[: cfg.data.max_examples], run.tokenizer, f"sDPO step {t + 1}")
                 for t, d in enumerate(steps)]

    # Steps 1..T: reference M_{t-1}, policy M_{t-1} (or S), DPO on D_t, export M_t.
    models = []
    prev = base
    for t, pairs in enumerate(steps, start=1):
        out_t = run.out / f"M{t}"
        models.append(str(out_t))
        if f"M{t}" in progress["done"]:
            prev = str(out_t)
            continue
        ref = reference_logps(run, prev, pairs, f"sDPO step {t}/{len(steps)}")
        gamma = float((ref[0] - ref[1]).mean())
        if not (run.resume_state and run.resume_state["stage"] == ["dpo", t]):  # else already written
            write_metrics(run, {"step": run.global_step, "sdpo_step": t, "gamma_ref/mean": gamma,
                                "reference": str(prev), "pairs": len(pairs)})
        log(run, f"sDPO step {t}/{len(steps)}: {len(pairs)} pairs, reference {prev}, gamma_ref/mean {gamma:.3f}")
        model = load_for_training(run, prev if cfg.train.init == "previous" else base)
        optimize(run, model, pairs, stage="dpo", sdpo_step=t, hp=cfg.train, lr=cfg.optim.lr,
                 warmup_ratio=cfg.optim.warmup_ratio, schedule=cfg.optim.schedule,
                 weight_decay=cfg.optim.weight_decay, ref=ref)
        export(run, model, out_t, base_dtype)
        free(model)
        progress = {"done": progress["done"] + [f"M{t}"], "global_step": run.global_step}
        write_progress(run, progress)
        log(run, f"sDPO step {t}/{len(steps)}: M{t} saved to {out_t}")
        prev = str(out_t)

    summary = None
    if cfg.eval.summary:
        summary = summarize(run, [("S", base)] + [(f"M{t}", d) for t, d in enumerate(models, start=1)], tests)
    return {"base": base, "models": models, "summary": summary}


def _shard_random(run: Run, model):
    mp = D.default_mp_policy(run.info.device, run.cfg.train.precision)
    return D.apply_fsdp(model, run.mesh, mp_policy=mp, reshard_after_forward=run.cfg.train.reshard_after_forward,
                        activation_checkpointing=run.cfg.model.activation_checkpointing)


# --------------------------------------------------------------------------------------
# End-of-run summary: preference accuracy and mean γ of S, M_1..M_T on the held-out sets
# --------------------------------------------------------------------------------------

def summarize(run: Run, named_dirs: list[tuple[str, str]], tests) -> dict:
    """Per model and held-out set:
    accuracy     P[log π(y_w|x) > log π(y_l|x)]: does the model itself rank the pair right;
    gamma_mean   mean γ = log π(y_w|x) - log π(y_l|x), the paper's Figure 2 statistic;
    reward_accuracy_vs_S  DPO's implicit-reward accuracy with S as reference (DPO eq. 5):
                 P[(log π - log π_S)(y_w) > (log π - log π_S)(y_l)] (not defined for S itself)."""
    table, base_logps = {}, None
    for name, d in named_dirs:
        model = load_for_training(run, d)
        row, logps = {}, []
        for j, pairs in enumerate(tests, start=1):
            c, r = pair_logps(run, model, pairs, run.cfg.eval.batch_size)
            c, r = c.double(), r.double()
            logps.append((c, r))
            row[f"D{j}"] = {"accuracy": float((c > r).double().mean()), "gamma_mean": float((c - r).mean()),
                            "n": len(pairs)}
            if base_logps is not None:
                bc, br = base_logps[j - 1]
                row[f"D{j}"]["reward_accuracy_vs_S"] = float(((c - bc) > (r - br)).double().mean())
        base_logps = base_logps or logps
        table[name] = row
        free(model)
    if run.info.is_main:
        (run.out / "summary.json").write_text(json.dumps(table, indent=1))
        print("\n" + format_summary(table), flush=True)
    return table


def format_summary(table: dict) -> str:
    sets = list(next(iter(table.values())))
    headers = (["model"] + [f"acc {s}" for s in sets] + [f"mean γ {s}" for s in sets]
               + [f"reward acc {s} vs S" for s in sets])
    rows = []
    for name, row in table.items():
        rows.append([name] + [f"{row[s]['accuracy']:.3f}" for s in sets] + [f"{row[s]['gamma_mean']:.2f}" for s in sets]
                    + [f"{row[s]['reward_accuracy_vs_S']:.3f}" if "reward_accuracy_vs_S" in row[s] else "-"
                       for s in sets])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    n = ", ".join(f"{s} test: {row0[s]['n']} pairs" for row0 in [next(iter(table.values()))] for s in sets)
    return "\n".join([f"Held-out pairs ({n}); acc = P[log π(y_w|x) > log π(y_l|x)], "
                      "γ = log π(y_w|x) - log π(y_l|x):",
                      line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])
