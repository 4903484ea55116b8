"""The rules a run config's values must follow, in one place (sdpo.runtime.config.validate_config raises them).

Each rule names the key and what was expected; all problems are reported together, before
any work starts.
"""

from __future__ import annotations

import dataclasses
import math

from sdpo.data.read import SPLIT_STRATEGIES
from sdpo.loss import check_loss_options
from sdpo.models.lora import LORA_TARGETS
from sdpo.models.model import checkpoint_every
from sdpo.runtime.tracking import TRACKERS

LOSS_OPTION_NAMES = {"type": "loss.type", "weights": "loss.weights", "beta": "loss.beta",
                     "label_smoothing": "loss.label_smoothing"}
OPTIMIZERS = ("adamw", "rmsprop")
SCHEDULES = ("constant", "linear", "cosine")
INITS = ("previous", "base")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
LORA_BASE_DTYPES = ("auto", "float32", "bfloat16")
REFERENCE_MODES = ("cached", "live")


def config_problems(cfg) -> list[str]:
    """Every problem with the values of `cfg` (a sdpo.runtime.config.Config), one message each; [] when valid.
    Paths are checked later, by sdpo.stepwise.check_setup."""
    problems = []

    def need(cond, msg):
        if not cond:
            problems.append(msg)

    m, d, lo, o, t, s, e = cfg.model, cfg.data, cfg.loss, cfg.optim, cfg.train, cfg.sft, cfg.eval
    # TOML reads inf and nan; no key means either (loss.beta = inf would fail only after the reference pass).
    for section, values in dataclasses.asdict(cfg).items():
        for key, v in values.items():
            if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, list) else [v])):
                problems.append(f"{section}.{key} must be finite, got {v}")
    if m.path is None:
        need(m.tokenizer is not None, "model.tokenizer is required when model.path is unset (random init)")
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            need(getattr(m, k) > 0, f"model.{k} must be > 0, got {getattr(m, k)}")
        need(m.num_attention_heads > 0 and m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads ({m.num_attention_heads})")
        kv = m.num_key_value_heads
        need(kv is None or (kv > 0 and m.num_attention_heads % kv == 0),
             f"model.num_key_value_heads ({kv}) must divide model.num_attention_heads ({m.num_attention_heads})")
    try:
        checkpoint_every(m.activation_checkpointing)
    except ValueError as err:  # not `e`: that name is the [eval] section here
        problems.append(f"model.{err}")
    need(m.export_dtype is None or m.export_dtype in DTYPES, f"model.export_dtype must be one of {DTYPES}, got {m.export_dtype!r}")

    need(len(d.datasets) > 0, "data.datasets is empty: give at least one preference file or directory")
    need(d.split in SPLIT_STRATEGIES, f"data.split must be one of {SPLIT_STRATEGIES}, got {d.split!r}")
    if d.fractions is not None:
        need(len(d.fractions) > 0 and all(f > 0 for f in d.fractions), f"data.fractions must be positive, got {d.fractions}")
        need(abs(sum(d.fractions) - 1.0) < 1e-6, f"data.fractions must sum to 1, got {d.fractions} (sum {sum(d.fractions):g})")
        need(d.split not in ("natural", "all"), f"data.fractions is only used by split random/stratified/easy_to_hard, not {d.split!r}")
    else:
        need(d.split in ("natural", "all"), f"data.split = {d.split!r} needs data.fractions (e.g. [0.5, 0.5])")
    need(d.on_error in ("fail", "skip"), f"data.on_error must be 'fail' or 'skip', got {d.on_error!r}")
    need(d.max_length > 0, f"data.max_length must be > 0, got {d.max_length}")
    need(d.max_prompt_length is None or 0 < d.max_prompt_length < d.max_length,
         f"data.max_prompt_length ({d.max_prompt_length}) must be in (0, data.max_length = {d.max_length})")
    need(d.max_examples is None or d.max_examples > 0, f"data.max_examples must be > 0, got {d.max_examples}")
    need(d.max_test_examples is None or d.max_test_examples > 0, f"data.max_test_examples must be > 0, got {d.max_test_examples}")

    problems += check_loss_options(lo.types, lo.weights, lo.beta, lo.label_smoothing, names=LOSS_OPTION_NAMES)
    need(lo.rpo_alpha is None or lo.rpo_alpha >= 0, f"loss.rpo_alpha must be >= 0 (or unset), got {lo.rpo_alpha}")
    need(not lo.length_normalize or "ipo" in lo.types, "loss.length_normalize applies to the 'ipo' type only")
    need(math.isfinite(lo.simpo_gamma), f"loss.simpo_gamma must be finite, got {lo.simpo_gamma}")
    need(lo.discopop_tau > 0 and math.isfinite(lo.discopop_tau), f"loss.discopop_tau must be > 0, got {lo.discopop_tau}")
    need(lo.cpo_alpha >= 0 and math.isfinite(lo.cpo_alpha), f"loss.cpo_alpha must be >= 0, got {lo.cpo_alpha}")
    need(lo.router_aux_coef is None or (lo.router_aux_coef >= 0 and math.isfinite(lo.router_aux_coef)),
         f"loss.router_aux_coef must be >= 0 (or unset: the checkpoint's), got {lo.router_aux_coef}")
    need(lo.router_z_coef >= 0 and math.isfinite(lo.router_z_coef), f"loss.router_z_coef must be >= 0, got {lo.router_z_coef}")

    need(o.name in OPTIMIZERS, f"optim.name must be one of {OPTIMIZERS}, got {o.name!r}")
    need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    need(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    need(0 <= o.alpha < 1, f"optim.alpha must be in [0, 1), got {o.alpha}")
    need(o.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}")
    need(0 <= o.warmup_ratio < 1, f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    need(o.max_grad_norm is None or o.max_grad_norm > 0, f"optim.max_grad_norm must be > 0 (or unset), got {o.max_grad_norm}")

    need(t.global_batch_size > 0, f"train.global_batch_size must be > 0, got {t.global_batch_size}")
    need(t.micro_batch_size > 0, f"train.micro_batch_size must be > 0, got {t.micro_batch_size}")
    need(t.micro_batch_size <= t.global_batch_size,
         f"train.micro_batch_size ({t.micro_batch_size}) must be <= train.global_batch_size ({t.global_batch_size})")
    need(t.epochs > 0, f"train.epochs must be > 0, got {t.epochs}")
    need(t.max_steps is None or t.max_steps > 0, f"train.max_steps must be > 0 (or unset), got {t.max_steps}")
    need(t.init in INITS, f"train.init must be one of {INITS}, got {t.init!r}")
    need(t.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}, got {t.precision!r}")
    need(t.device in DEVICES, f"train.device must be one of {DEVICES}, got {t.device!r}")
    need(t.save_every is None or t.save_every > 0, f"train.save_every must be > 0 (or unset), got {t.save_every}")
    need(t.log_every > 0, f"train.log_every must be > 0, got {t.log_every}")
    need(set(t.report_to) <= set(TRACKERS), f"train.report_to: unknown {sorted(set(t.report_to) - set(TRACKERS))}; "
                                            f"expected a list of {list(TRACKERS)}")
    for key in ("run_name", "project"):
        need(getattr(t, key) is None or getattr(t, key).strip() != "", f"train.{key} must be a non-empty name (or unset)")
    need(t.ref_batch_size is None or t.ref_batch_size > 0, f"train.ref_batch_size must be > 0, got {t.ref_batch_size}")
    for key in ("tokens_per_micro_batch", "ref_tokens_per_batch"):
        v = getattr(t, key)
        need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
             f"train.{key} must be a positive number of tokens (or unset), got {v!r}")
    need(t.stop_after is None or t.stop_after > 0, f"train.stop_after must be > 0, got {t.stop_after}")
    for key in ("dp_shard", "dp_replicate"):
        need(getattr(t, key) is None or getattr(t, key) >= 1, f"train.{key} must be >= 1 (or unset), got {getattr(t, key)}")
    for key in ("timeout_s", "export_timeout_s", "preempt_grace_s"):
        need(getattr(t, key) > 0, f"train.{key} must be > 0 seconds, got {getattr(t, key)}")
    need(bool(t.output_dir), "train.output_dir is empty")

    if s.enabled:
        need(s.lr > 0, f"sft.lr must be > 0, got {s.lr}")
        need(s.epochs > 0, f"sft.epochs must be > 0, got {s.epochs}")
        need(s.max_steps is None or s.max_steps > 0, f"sft.max_steps must be > 0 (or unset), got {s.max_steps}")
        need(0 < s.micro_batch_size <= s.global_batch_size,
             f"sft.micro_batch_size ({s.micro_batch_size}) must be in (0, sft.global_batch_size = {s.global_batch_size}]")
        need(0 <= s.warmup_ratio < 1, f"sft.warmup_ratio must be in [0, 1), got {s.warmup_ratio}")
        need(s.schedule in SCHEDULES, f"sft.schedule must be one of {SCHEDULES}, got {s.schedule!r}")
    elif m.path is None:
        problems.append("model.path is unset and sft.enabled = false: a random-init base needs the SFT stage "
                        "(set sft.enabled = true) or give model.path")
    need(e.batch_size > 0, f"eval.batch_size must be > 0, got {e.batch_size}")
    need(e.every is None or e.every > 0, f"eval.every must be > 0 (or unset), got {e.every}")
    need(e.every is None or len(d.test_datasets) > 0, "eval.every needs data.test_datasets (the held-out pairs)")
    if e.summary:
        need(len(d.test_datasets) > 0, "eval.summary = true needs data.test_datasets")
    la = cfg.lora
    if la.enabled:
        need(la.rank > 0, f"lora.rank must be > 0, got {la.rank}")
        need(la.alpha > 0, f"lora.alpha must be > 0, got {la.alpha}")
        need(0 <= la.dropout < 1, f"lora.dropout must be in [0, 1), got {la.dropout}")
        bad = [x for x in la.targets if x not in LORA_TARGETS]
        need(bool(la.targets) and not bad, f"lora.targets must be a non-empty list from {list(LORA_TARGETS)}, "
                                            f"got {la.targets}")
        need(la.base_dtype in LORA_BASE_DTYPES, f"lora.base_dtype must be one of {LORA_BASE_DTYPES}, "
                                                 f"got {la.base_dtype!r}")

    r = cfg.reference
    need(r.mode in REFERENCE_MODES, f"reference.mode must be one of {REFERENCE_MODES}, got {r.mode!r}")
    need(r.sync_every is None or r.sync_every > 0, f"reference.sync_every must be > 0 (or unset), got {r.sync_every}")
    need(0 < r.sync_alpha <= 1, f"reference.sync_alpha must be in (0, 1], got {r.sync_alpha}")
    need(r.sync_every is None or r.mode == "live",
         "reference.sync_every (TR-DPO) needs reference.mode = \"live\": the reference changes during the step")
    need(r.sync_every is None or not la.enabled,
         "reference.sync_every cannot mix a LoRA policy into the reference (lora.enabled); merge first")
    need(r.tokenizer is None or r.path is not None, "reference.tokenizer needs reference.path")
    need(r.chat_template is None or r.path is not None, "reference.chat_template needs reference.path")

    if cfg.online.enabled:
        problems += online_problems(cfg.online)
    return problems


ONLINE_JUDGES = ("exact_match", "command:ARGV", "reward_model:DIR")


def online_problems(on) -> list[str]:
    """The [online] section's rules (on-policy steps, sdpo/online.py)."""
    problems = []
    for ok, msg in (
            (on.samples >= 2, f"online.samples must be >= 2 (a pair is the best and the worst of them), got {on.samples}"),
            (on.temperature > 0, f"online.temperature must be > 0 (0 is greedy: every sample the same), got {on.temperature}"),
            (0 < on.top_p <= 1, f"online.top_p must be in (0, 1], got {on.top_p}"),
            (on.max_new_tokens > 0, f"online.max_new_tokens must be > 0, got {on.max_new_tokens}"),
            (on.batch_prompts > 0, f"online.batch_prompts must be > 0, got {on.batch_prompts}"),
            (on.min_margin >= 0, f"online.min_margin must be >= 0, got {on.min_margin}"),
            (0 <= on.mix <= 1, f"online.mix must be in [0, 1], got {on.mix}"),
            (on.timeout_s > 0, f"online.timeout_s must be > 0 seconds, got {on.timeout_s}"),
            (on.judge_batch_size > 0, f"online.judge_batch_size must be > 0, got {on.judge_batch_size}"),
            (bool(on.answer_field), "online.answer_field is empty")):
        if not ok:
            problems.append(msg)
    kind, _, arg = on.judge.partition(":")
    if on.judge != "exact_match" and not (kind in ("command", "reward_model") and arg.strip()):
        problems.append(f"online.judge must be one of {', '.join(ONLINE_JUDGES)}, got {on.judge!r}")
    return problems
