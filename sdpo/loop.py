"""The one optimisation loop, shared by the SFT and DPO stages.

A stage is a `Stage` record: the loss of a micro-batch, the hyperparameters, the names of
the statistics it logs. SFT and DPO differ in that record only (`sft_stage`, `dpo_stage`);
`optimize` knows neither. One optimizer step per global batch of pairs; the gradient is the
global-batch mean whatever the world size and accumulation.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from sdpo.data.packing import batch_schedule, collate, micro_batches, pack, pair_cost
from sdpo.logprobs import (SequenceLogps, pack_options, packed_pair_loss, packed_sequence_logps, pair_forward,
                           pair_loss_fusable, sequence_logps)
from sdpo.loss import BATCH_COUPLED, NEEDS_LENGTHS, NEEDS_NLL, preference_loss
from sdpo.metrics import preference_metrics
from sdpo.models.moe import load_balancing_loss, router_z_loss
from sdpo.reference import CachedReference, run_pair_logps
from sdpo.runtime import distributed as D
from sdpo.runtime import preempt
from sdpo.runtime.config import Config
from sdpo.runtime.run import Preempted, Run, StopRequested, TrainingError, autocast, log, to_device
from sdpo.runtime.state import STATE, load_state, save_state, write_metrics

# micro_loss(model, batch) -> (loss summed over the micro-batch's pairs or tokens, stats [K] summed)
MicroLoss = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Stage:
    name: str                         # "SFT", "sDPO step 1/2": progress lines and errors
    kind: str                         # "sft" | "dpo": metrics rows and the resumable state's key
    sdpo_step: int                    # 0 for SFT
    micro_loss: MicroLoss
    stat_names: list[str]             # names of stats[1:], logged as means per pair
    show: list[tuple[str, str]]       # (stat name, label) shown on the progress line
    per_token: bool                   # loss is a mean over chosen tokens (SFT) rather than pairs (DPO)
    # hyperparameters
    optimizer: str
    lr: float
    weight_decay: float
    warmup_ratio: float
    schedule: str
    max_grad_norm: float | None
    global_batch_size: int
    micro_batch_size: int             # pairs per forward, at most
    tokens_per_micro_batch: int | None  # packed tokens per forward, at most (None: no budget)
    chosen_only: bool                 # batches hold the chosen responses only (SFT)
    epochs: int
    max_steps: int | None
    seed: int
    group_by_length: bool
    evaluate: Callable[[torch.nn.Module], dict] | None = None  # held-out metrics (DPO), or None
    eval_every: int | None = None     # optimizer steps between held-out evaluations (and at the end)
    # after_step(model, done) once optimizer step `done` (1-based) is applied: the TR-DPO sync
    after_step: Callable[[torch.nn.Module, int], None] | None = None
    # names of stats after stat_names that micro_loss returns for some models only (a MoE's aux_loss)
    optional_stats: list[str] = field(default_factory=list)


# Metric fields that depend on the machine and the clock, not on the computation: a resumed
# run must match an uninterrupted one in every other field.
MACHINE_DEPENDENT = ("tokens_per_s", "step_time_s", "peak_mem_gb", "time", "elapsed_s")

DPO_STATS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected"]


def configured_loss(lo, policy_chosen: SequenceLogps, policy_rejected: SequenceLogps, ref_chosen, ref_rejected):
    """sdpo.loss.preference_loss with the [loss] section's options; inputs [B] each."""
    needs_nll = bool(NEEDS_NLL.intersection(lo.types)) or lo.rpo_alpha is not None
    needs_lengths = lo.length_normalize or bool(NEEDS_LENGTHS.intersection(lo.types))
    return preference_loss(
        policy_chosen.logps, policy_rejected.logps, ref_chosen, ref_rejected,
        loss_type=lo.types, beta=lo.beta, label_smoothing=lo.label_smoothing, loss_weights=lo.weights,
        reference_free=lo.reference_free, rpo_alpha=lo.rpo_alpha,
        policy_chosen_nll=-policy_chosen.mean_logps if needs_nll else None,  # [B] NLL per token
        chosen_lengths=policy_chosen.counts if needs_lengths else None,
        rejected_lengths=policy_rejected.counts if needs_lengths else None,
        simpo_gamma=lo.simpo_gamma, discopop_tau=lo.discopop_tau, cpo_alpha=lo.cpo_alpha)


def dpo_micro_loss(cfg: Config, model, batch, ref_chosen, ref_rejected=None):
    """DPO eq. (7): -log σ(β[(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]), via sdpo.loss.

    ref_chosen: the reference, an object with logps(batch) -> (chosen [B], rejected [B]) (sdpo.reference:
    a cached lookup or a live forward); or, with ref_rejected, the [N] float32 log-probs of the step's
    pairs on the batch's device, indexed by the batch's "index"."""
    reference = ref_chosen if ref_rejected is None else CachedReference(ref_chosen, ref_rejected, ref_chosen.device)
    ref_chosen, ref_rejected = reference.logps(batch)  # [B] each
    if pair_loss_fusable(model, batch) and not BATCH_COUPLED.intersection(cfg.loss.types):
        # The loss taken pair by pair inside the fused lm_head, so its gradient needs no second pass over the
        # logits (sdpo.logprobs.packed_pair_loss); the stats below are the same numbers, from detached log-probs.
        def pair_losses(i, chosen, rejected):
            return configured_loss(cfg.loss, chosen, rejected, ref_chosen[i:i + 1], ref_rejected[i:i + 1])[0]

        total, policy_chosen, policy_rejected = packed_pair_loss(model, batch, pair_losses,
                                                                 batch.get("loss_scale", 1.0))
    else:
        total = None
        policy_chosen, policy_rejected = pair_forward(model, batch)  # packed or padded rows
    router = router_losses(cfg.loss, model, batch)  # a MoE policy's, read right after its forward; else None
    losses, chosen_rewards, rejected_rewards = configured_loss(cfg.loss, policy_chosen, policy_rejected,
                                                               ref_chosen, ref_rejected)
    total = losses.sum() if total is None else total
    stats = torch.stack([losses.sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                         (chosen_rewards > rejected_rewards).float().sum(),
                         (chosen_rewards - rejected_rewards).sum(),
                         policy_chosen.logps.sum(), policy_rejected.logps.sum()]).detach().float()
    if router is None:
        return total, stats
    # The micro-batch's router loss once per pair, so the step's mean over its pairs weighs every
    # micro-batch by its pairs, as the DPO loss; aux_loss is logged unscaled (transformers' aux_loss).
    aux, extra = router
    pairs = losses.shape[0]
    return total + extra * pairs, torch.cat([stats, (aux.detach().float() * pairs).reshape(1)])


def router_losses(lo, model, batch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(load-balancing loss, coef · it + z_coef · z-loss) of the policy forward just run, over the batch's
    real tokens; None for a dense model. The router statistics are taken off the model (model.router_stats,
    sdpo/models/moe.py), so a later forward (the reference, an evaluation) never reuses them."""
    stats, model.router_stats = getattr(model, "router_stats", None), None
    if stats is None:
        return None
    mask = batch["doc_ids"] if "doc_ids" in batch else batch["attention_mask"]  # [rows, T], 0 at pads
    rows = mask.shape[0]
    tokens = stats.probs.shape[0] // rows  # the forward's row length (FlexAttention pads rows to a bucket)
    mask = torch.nn.functional.pad(mask, (0, tokens - mask.shape[1]))
    coef = lo.router_aux_coef if lo.router_aux_coef is not None else model.config.router_aux_loss_coef
    aux = load_balancing_loss(stats, mask)
    extra = coef * aux
    if lo.router_z_coef:
        extra = extra + lo.router_z_coef * router_z_loss(stats, mask)
    return aux, extra


def heldout_evaluator(run: Run, pairs, ref: tuple[torch.Tensor, torch.Tensor]) -> Callable[[torch.nn.Module], dict]:
    """The held-out pairs' DPO loss, reward accuracy and margins against the step's reference
    log-probs `ref` ([N] each), under TRL's eval_ names. One no-grad pass, all ranks together."""
    counts = (torch.tensor([len(p.chosen_ids) for p in pairs]), torch.tensor([len(p.rejected_ids) for p in pairs]))

    def evaluate(model) -> dict:
        c, r = run_pair_logps(run, model, pairs, run.cfg.eval.batch_size)  # [N] float32 CPU each
        losses, _, _ = configured_loss(run.cfg.loss, SequenceLogps(c, counts[0]), SequenceLogps(r, counts[1]), *ref)
        m = preference_metrics(c, r, ref[0], ref[1], beta=run.cfg.loss.beta, losses=losses)
        return {f"eval_{k}": v for k, v in m.items() if k != "n"}

    return evaluate


def sft_micro_loss(model, batch):
    """Summed NLL of the chosen responses (a chosen_only packed batch, or rows 0..B-1 of a collated one)."""
    if "doc_ids" in batch:
        out = packed_sequence_logps(model, batch)
    else:
        B = batch["input_ids"].shape[0] // 2
        # The chosen rows' targets are the first chosen_targets of gather_index (host_facts).
        out = sequence_logps(model, batch["input_ids"][:B], batch["labels"][:B],
                             batch["attention_mask"][:B], batch["position_ids"][:B],
                             gather_index=batch["gather_index"][: batch["chosen_targets"]],
                             right_padded=batch["right_padded"], token_range=batch["token_range"])
    nll = -out.logps.sum()
    return nll, nll.detach().float().reshape(1)


def sft_stage(cfg: Config) -> Stage:
    s = cfg.sft
    return Stage(name="SFT", kind="sft", sdpo_step=0, micro_loss=sft_micro_loss, stat_names=[], show=[],
                 per_token=True, optimizer="adamw", lr=s.lr, weight_decay=s.weight_decay,
                 warmup_ratio=s.warmup_ratio, schedule=s.schedule, max_grad_norm=1.0,
                 global_batch_size=s.global_batch_size, micro_batch_size=s.micro_batch_size,
                 tokens_per_micro_batch=None, chosen_only=True, epochs=s.epochs,
                 max_steps=s.max_steps, seed=cfg.train.seed, group_by_length=cfg.data.group_by_length)


def dpo_stage(cfg: Config, t: int, num_steps: int, ref, device=None,
              evaluate: Callable[[torch.nn.Module], dict] | None = None) -> Stage:
    """Step t's DPO against `ref`: a reference object (sdpo.reference: logps(batch), after_step) or the
    log-probs ([N], [N]) of the step's pairs; `evaluate`, the held-out evaluation (heldout_evaluator),
    runs every eval.every steps and at the end."""
    if isinstance(ref, tuple):
        ref = CachedReference(*ref, device)
    o, t_ = cfg.optim, cfg.train
    return Stage(name=f"sDPO step {t}/{num_steps}", kind="dpo", sdpo_step=t,
                 micro_loss=lambda model, batch: dpo_micro_loss(cfg, model, batch, ref),
                 stat_names=DPO_STATS, show=[("rewards/accuracies", "acc"), ("rewards/margins", "margin")],
                 per_token=False, optimizer=o.name, lr=o.lr, weight_decay=o.weight_decay,
                 warmup_ratio=o.warmup_ratio, schedule=o.schedule, max_grad_norm=o.max_grad_norm,
                 global_batch_size=t_.global_batch_size, micro_batch_size=t_.micro_batch_size,
                 tokens_per_micro_batch=t_.tokens_per_micro_batch, chosen_only=False, epochs=t_.epochs,
                 max_steps=t_.max_steps, seed=t_.seed + t, group_by_length=cfg.data.group_by_length,
                 evaluate=evaluate, eval_every=cfg.eval.every, after_step=ref.after_step,
                 optional_stats=["aux_loss"])


# --------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------

def make_optimizer(model, stage: Stage, cfg: Config):
    # Decay matrices only; norms (and biases) are not decayed.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    o = cfg.optim
    if stage.optimizer == "adamw":
        # CPU: the fused kernel, one pass over each parameter's four tensors (the per-parameter loop takes ~10
        # passes and [V, H] temporaries; bench/RESULTS.md, issue 28). CUDA keeps torch's default (foreach).
        on_cpu = all(p.device.type == "cpu" and type(p.data) is torch.Tensor for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=stage.lr, betas=tuple(o.betas), eps=o.eps, fused=on_cpu or None)
    return torch.optim.RMSprop(groups, lr=stage.lr, alpha=o.alpha, eps=o.eps)


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


def peak_mem_gb(device) -> float:
    """Peak memory since the last reset_peak_mem (CUDA: allocated by torch); CPU: the process's peak
    resident set (Linux's VmHWM, which reset_peak_mem lowers to the current RSS; elsewhere
    ru_maxrss, a lifetime maximum)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB (macOS: bytes)


def reset_peak_mem(device) -> None:
    """Start a new peak_mem_gb window (each logged row's peak is its own window's, not the reference
    pass's or an earlier stage's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM to the current RSS (proc(5))
    except OSError:
        pass


def fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------

def optimize(run: Run, model, pairs, stage: Stage) -> None:
    """Train `model` in place on `pairs`; the learning-rate schedule restarts here."""
    cfg, info = run.cfg, run.info
    W, G, m = info.world_size, stage.global_batch_size, stage.micro_batch_size
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    opts = pack_options(packing=cfg.data.packing, share_prompt=cfg.data.share_prompt, device=info.device)
    costs = [pair_cost(p, opts is not None and opts["share_prompt"], stage.chosen_only) for p in pairs]

    def schedule_for(epoch):
        # Seeded per (stage, epoch): the order is a function of the step, so a resumed
        # run sees exactly the batches an uninterrupted one would. Each step's share is cut
        # into micro-batches by pairs and tokens; every rank cuts every rank's share, so all
        # run as many forwards as the rank that needs most (FSDP's all-gathers are collective).
        shares = [batch_schedule(len(pairs), G, seed=stage.seed, epoch=epoch, rank=r, world_size=W,
                                 lengths=lengths, group_by_length=stage.group_by_length) for r in range(W)]
        cut = lambda ids, n=0: micro_batches(ids, costs, max_pairs=m,  # noqa: E731
                                             max_tokens=stage.tokens_per_micro_batch, min_count=n)
        return [cut(step[info.rank], max(len(cut(s)) for s in step)) for step in zip(*shares)]

    def make_batch(chunk):
        if opts is None:
            return collate([pairs[i] for i in chunk], pad_id=run.tokenizer.pad_id)
        return pack([pairs[i] for i in chunk], pad_id=run.tokenizer.pad_id, chosen_only=stage.chosen_only, **opts)

    per_epoch = len(schedule_for(0))
    if per_epoch == 0:
        raise TrainingError(f"{stage.name}: {len(pairs)} pairs make no full global batch of {G}")
    total = per_epoch * stage.epochs if stage.max_steps is None else min(per_epoch * stage.epochs, stage.max_steps)
    warmup = math.ceil(stage.warmup_ratio * total)
    optimizer = make_optimizer(model, stage, cfg)

    start = 0
    if run.resume_state is not None and run.resume_state["stage"] == [stage.kind, stage.sdpo_step]:
        load_state(run, model, optimizer)
        start = run.resume_state["step"]
        run.global_step = run.resume_state["global_step"]
        log(run, f"{stage.name}: resumed at optimizer step {start}/{total} from {run.out / STATE}")
    run.resume_state = None

    model.train()
    reset_peak_mem(info.device)
    epoch_cache = {}
    t_start, t_prev = time.perf_counter(), time.perf_counter()
    # Logged values are means over the optimizer steps since the last log line (as other DPO
    # trainers log them), not a snapshot of the last step.
    tokens, window_steps, window_loss, window_grad_norm, window_stats = 0, 0, 0.0, 0.0, 0
    for k in range(start, total):
        epoch, j = divmod(k, per_epoch)
        if epoch not in epoch_cache:
            epoch_cache = {epoch: schedule_for(epoch)}
        plan = epoch_cache[epoch][j]  # this rank's micro-batches of pair indices
        indices = [i for chunk in plan for i in chunk]
        cur_lr = lr_at(k, total, warmup, stage.lr, stage.schedule)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr

        # The loss is a mean over the global batch's pairs, or its chosen tokens (counted
        # before backward, over all ranks); scale = W / count because FSDP averages over ranks.
        if stage.per_token:
            count = D.all_reduce(torch.tensor([float(sum(len(pairs[i].chosen_ids) for i in indices))])).item()
        else:
            count = G
        scale = W / count
        stats = None
        for n_mb, chunk in enumerate(plan):
            batch = make_batch(chunk)
            # Positions in `pairs`, as the reference log-probs are laid out. TokenizedPair.index is
            # the example's position before tokenization dropped any pair, so it can differ.
            batch["index"] = torch.tensor(chunk)
            # Tokens the forward computes (padding aside), counted on the CPU copy: int() of a
            # device tensor would sync every micro-batch.
            if opts is None:
                mask = batch["attention_mask"]
                tokens += int(mask[: mask.shape[0] // 2].sum() if stage.per_token else mask.sum())
            else:
                tokens += int((batch["doc_ids"] > 0).sum())
            batch = to_device(batch, info.device)
            batch["loss_scale"] = scale  # the factor below, for losses that take their gradient in forward
            with autocast(run):
                loss, st = stage.micro_loss(model, batch)
                loss = loss * scale
            # HSDP: the gradient all-reduce across replicas runs once per step, on the last micro-batch.
            D.defer_gradient_reduction(model, n_mb < len(plan) - 1)
            loss.backward()
            stats = st if stats is None else stats + st
        # The step's one sync: the loss check below needs it. Each rank's preemption flag rides along, so
        # all ranks agree to stop after this step without a sync of their own (sdpo.runtime.preempt).
        stats = D.all_reduce(torch.cat([stats, preempt.flag(stats.device)])).cpu()
        stats, preempted = stats[:-1], bool(stats[-1] > 0)

        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), stage.max_grad_norm or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        loss_value = float(stats[0] / count)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise TrainingError(
                f"{stage.name}: non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} at "
                f"optimizer step {k + 1}/{total} (global step {run.global_step + 1}): loss={loss_value}, "
                f"grad_norm={grad_norm}. Weights were not updated; the last good checkpoint is in {run.out}. "
                f"Lower the learning rate (optim.lr) or set optim.max_grad_norm.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.global_step += 1
        done = k + 1
        if stage.after_step is not None:
            stage.after_step(model, done)
        window_steps, window_loss, window_grad_norm = window_steps + 1, window_loss + loss_value, window_grad_norm + grad_norm
        window_stats = window_stats + stats

        if done % cfg.train.log_every == 0 or done == total or preempted:  # preempted: the window so far
            now = time.perf_counter()
            row = {"step": run.global_step, "sdpo_step": stage.sdpo_step, "stage": stage.kind, "epoch": epoch,
                   "lr": cur_lr, "loss": window_loss / window_steps, "grad_norm": window_grad_norm / window_steps}
            names = (stage.stat_names + stage.optional_stats)[:len(window_stats) - 1]  # the stats micro_loss gave
            row.update({name: float(window_stats[i] / (G * window_steps)) for i, name in enumerate(names, start=1)})
            all_tokens = D.all_reduce(torch.tensor([float(tokens)])).item()
            row["tokens"] = int(all_tokens)  # computed in the window, over all ranks
            row["tokens_per_s"] = all_tokens / max(now - t_prev, 1e-9)
            row["step_time_s"] = (now - t_prev) / window_steps
            row["peak_mem_gb"] = peak_mem_gb(info.device)
            reset_peak_mem(info.device)
            row["time"], row["elapsed_s"] = time.time(), time.time() - run.started
            write_metrics(run, row)
            eta = (now - t_start) / (done - start) * (total - done)
            extra = "".join(f" {label} {row[key]:.3f}" for key, label in stage.show)
            log(run, f"{stage.name} | {done}/{total} | loss {row['loss']:.4f}{extra} | lr {cur_lr:.2e} | "
                     f"gnorm {row['grad_norm']:.3f} | {row['tokens_per_s']:.0f} tok/s | ETA {fmt_time(eta)}")
            t_prev, tokens, window_steps, window_loss, window_grad_norm, window_stats = now, 0, 0, 0.0, 0.0, 0

        if stage.evaluate is not None and (done % stage.eval_every == 0 or done == total):
            held = stage.evaluate(model)
            write_metrics(run, {"step": run.global_step, "sdpo_step": stage.sdpo_step, "stage": "eval", **held,
                                "time": time.time(), "elapsed_s": time.time() - run.started})
            log(run, f"{stage.name} | held-out at {done}/{total} | loss {held['eval_loss']:.4f} | "
                     f"acc {held['eval_rewards/accuracies']:.3f} margin {held['eval_rewards/margins']:.3f}")

        if preempted or (cfg.train.save_every and done % cfg.train.save_every == 0 and done < total):
            save_state(run, model, optimizer, {"stage": [stage.kind, stage.sdpo_step], "step": done,
                                               "global_step": run.global_step})
        if preempted:
            raise Preempted(f"{stage.name}: preempted ({preempt.signal_name()}) after optimizer step {done}/{total} "
                            f"(global step {run.global_step}); its state is in {run.out / STATE}")
        if cfg.train.stop_after is not None and run.global_step >= cfg.train.stop_after:
            raise StopRequested(f"stopped after {run.global_step} optimizer steps (train.stop_after)")
