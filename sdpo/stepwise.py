"""Stepwise DPO (Kim et al. 2024, "sDPO: Don't Use Your Data All at Once", Sec. 2.2).

Split the preference data into D_1 .. D_T and run DPO T times; at step t both the
reference and the policy start from M_{t-1}, the model aligned at step t-1 (M_0 = S):

    S = M_0  (given, or made by an optional SFT stage on chosen responses)
    for t = 1 .. T:
        [online]       D_t <- best vs worst of M_{t-1}'s samples of D_t's prompts, by a judge (sdpo.online)
        ref log-probs  <- M_{t-1} scores D_t once, without gradients   (sdpo.reference, cached)
        policy         <- M_{t-1}  (or S with train.init = "base": the Figure 3 ablation)
        policy         <- DPO on D_t against the reference              (sdpo.loop)
        M_t            <- policy, exported as an HF directory           (the next reference)

Plain DPO is the same run with data.split = "all" (one step over all the data). The output
directory's housekeeping (progress, resumable state, metrics) is sdpo.runtime.state's.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sdpo.data.pairs import tokenize_pairs
from sdpo.data.read import read_preferences, split_steps
from sdpo.data.tokenizer import load_tokenizer
from sdpo.eval.report import summarize
from sdpo.loop import dpo_stage, heldout_evaluator, optimize, sft_stage
from sdpo.metrics import gamma
from sdpo.models.hf_config import load_model_config
from sdpo.online import check_judge, on_policy_examples
from sdpo.online import clear as clear_online
from sdpo.reference import References, reference_logps
from sdpo.runtime import distributed as D
from sdpo.runtime import tracking
from sdpo.runtime.config import Config, ConfigError, non_defaults
from sdpo.runtime.run import Run, TrainingError, export, free_memory, load_for_training, log, random_base
from sdpo.runtime.state import prepare_output, write_metrics, write_progress


def train(cfg: Config) -> dict:
    """Run the whole recipe; returns {"base": dir, "models": [M_1 dir, ...], "summary": {...} or None}.

    The trackers (train.report_to) are flushed and finished however the run ends: done, failed or
    preempted (a failed one is marked so in W&B)."""
    try:
        result = _train(cfg)
    except BaseException:
        tracking.close(Path(cfg.train.output_dir), failed=True)
        raise
    tracking.close(Path(cfg.train.output_dir))
    return result


def _train(cfg: Config) -> dict:
    info = D.init_distributed(cfg.train.device, cfg.train.timeout_s)
    check_setup(cfg, info.world_size)
    torch.manual_seed(cfg.train.seed)
    bf16 = D.use_bf16(cfg.train.precision, info.device)
    tok_dir = cfg.model.tokenizer or cfg.model.path
    run = Run(cfg=cfg, info=info, mesh=D.build_mesh(info, cfg.train.dp_shard, cfg.train.dp_replicate), out=Path(cfg.train.output_dir),
              tokenizer=load_tokenizer(tok_dir, cfg.model.chat_template, {"enable_thinking": cfg.model.enable_thinking}),
              tokenizer_dir=tok_dir,
              autocast_dtype=torch.bfloat16 if bf16 else None)

    # Everything that can fail on bad input fails here, before any model work.
    datasets, tests, sft_examples = load_steps(cfg, run.tokenizer)
    references = References(run)  # [reference]: which model, its tokenizer, cached or live
    split = steps = None
    if cfg.data.split != "easy_to_hard":
        split = split_steps(datasets, cfg.data.split, fractions=cfg.data.fractions, seed=cfg.train.seed)
        steps = tokenize_steps(cfg, split, run.tokenizer)
    run.num_steps = len(steps) if steps is not None else len(cfg.data.fractions)
    progress = prepare_output(run)
    clear_online(run)  # a fresh run samples its own on-policy pairs; --resume keeps the finished batches
    log(run, f"sdpo: world size {info.world_size} ({D.describe_mesh(run.mesh)}), device {info.device}, "
             f"{'bf16 autocast' if bf16 else 'float32'}, output {run.out}")
    log(run, "config (keys that differ from the defaults): " + "; ".join(non_defaults(cfg)))

    # M_0 = S: the given base, or SFT on chosen responses.
    base = cfg.model.path
    if cfg.sft.enabled:
        base = str(run.out / "sft")
        if "sft" not in progress["done"]:
            model = random_base(run) if cfg.model.path is None else load_for_training(run, cfg.model.path)
            pool = tokenize(cfg, sft_examples or [ex for d in datasets for ex in d], run.tokenizer, "SFT data")
            optimize(run, model, pool, sft_stage(cfg))
            export(run, model, Path(base), cfg.model.export_dtype)
            del model
            free_memory()
            progress = {"done": progress["done"] + ["sft"], "global_step": run.global_step}
            write_progress(run, progress)
            log(run, f"SFT: base S saved to {base}")
    export_dtype = cfg.model.export_dtype or load_model_config(base).torch_dtype

    if steps is None:  # easy_to_hard needs S's γ of every pair before it can split
        split = easy_to_hard_split(run, datasets, base)
        steps = tokenize_steps(cfg, split, run.tokenizer)

    models, prev = [], base
    for t, pairs in enumerate(steps, start=1):
        out_t = run.out / f"M{t}"
        models.append(str(out_t))
        if f"M{t}" in progress["done"]:
            prev = str(out_t)
            continue
        examples, start_row = split[t - 1][: cfg.data.max_examples], {}
        if cfg.online.enabled:
            # On-policy: M_{t-1} samples D_t's prompts, a judge scores the samples, and best vs worst
            # per prompt are the pairs (sdpo.online; written to RUN/online/step{t}.jsonl, resumable).
            examples, start_row = on_policy_examples(run, prev, examples, t)
            pairs = tokenize(cfg, examples, run.tokenizer, f"sDPO step {t} (on-policy pairs)")
        resuming_inside = bool(run.resume_state and run.resume_state["stage"] == ["dpo", t])
        if cfg.loss.needs_reference:
            # The reference is M_{t-1} (or reference.path): scored once over D_t, then dropped from
            # memory (reference.mode = "live": kept, scoring each micro-batch; pairs: those its tokenizer kept too).
            pairs, ref = references.for_step(prev, pairs, examples, f"sDPO step {t}/{len(steps)}")
            gamma_ref = ref.gamma_mean  # the paper's Figure 2 statistic, of this step's reference (None: live)
            if gamma_ref is not None:
                start_row |= {"gamma_ref/mean": gamma_ref, "reference": references.model_dir(prev), "pairs": len(pairs)}
            log(run, f"sDPO step {t}/{len(steps)}: {len(pairs)} pairs, reference {references.model_dir(prev)}"
                     + (f", gamma_ref/mean {gamma_ref:.3f}" if gamma_ref is not None else ""))
        else:  # SimPO, CPO, ORPO: no reference model is loaded at all
            ref = (torch.zeros(len(pairs)), torch.zeros(len(pairs)))
        if start_row and not resuming_inside:  # a resumed step's row is in metrics.jsonl already
            write_metrics(run, {"step": run.global_step, "sdpo_step": t, **start_row})
        evaluate = heldout(run, references, prev, tests, t, len(steps))  # eval.every: held-out loss, same reference
        # The policy starts from M_{t-1} too (train.init = "base": from S).
        start = prev if cfg.train.init == "previous" else base
        model = load_for_training(run, start, lora=cfg.lora.enabled)  # adapters on the policy only
        optimize(run, model, pairs, dpo_stage(cfg, t, len(steps), ref, info.device, evaluate))
        export(run, model, out_t, export_dtype, base_model_path=start)  # merged, when LoRA
        del model, ref
        free_memory()
        progress = {"done": progress["done"] + [f"M{t}"], "global_step": run.global_step}
        write_progress(run, progress)
        log(run, f"sDPO step {t}/{len(steps)}: M{t} saved to {out_t}")
        prev = str(out_t)

    summary = None
    if cfg.eval.summary:
        summary = summarize(run, [("S", base)] + [(f"M{t}", d) for t, d in enumerate(models, start=1)], tests)
    return {"base": base, "models": models, "summary": summary}


# --------------------------------------------------------------------------------------
# Checks and data, before any model work
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
    ref = cfg.reference
    if ref.path is not None and not (Path(ref.path) / "config.json").is_file():
        problems.append(f"reference.path: {ref.path} is not a model directory (no config.json)")
    if ref.tokenizer is not None and not Path(ref.tokenizer).is_dir():
        problems.append(f"reference.tokenizer: {ref.tokenizer} is not a directory")
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        problems.append(f"train.output_dir: {out} exists and is not a directory")
    else:
        base = next(p for p in [out, *out.absolute().parents] if p.exists())  # what mkdir would start from
        if not base.is_dir():
            problems.append(f"train.output_dir: {out} cannot be created: {base} is a file, not a directory")
        elif not os.access(base, os.W_OK | os.X_OK):
            problems.append(f"train.output_dir: {base} is not writable")
    # Each rank takes global_batch_size / world size pairs per optimizer step and cuts them into
    # forwards of at most micro_batch_size (a cap, so it need not divide anything).
    for name, s in (("train", cfg.train), ("sft", cfg.sft if cfg.sft.enabled else None)):
        if s is not None and s.global_batch_size % world_size:
            fit = -(-s.global_batch_size // world_size) * world_size
            problems.append(f"{name}.global_batch_size ({s.global_batch_size}) must be divisible by the world size "
                            f"({world_size}): every rank takes the same number of pairs per optimizer step; set "
                            f"--{name}.global_batch_size={fit} or launch a number of ranks that divides it")
    if world_size > 1:
        try:
            D.mesh_shape(world_size, cfg.train.dp_shard, cfg.train.dp_replicate,
                         int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        except ValueError as e:
            problems.append(str(e))
    problems += tracking.missing_packages(cfg.train.report_to)
    if cfg.online.enabled:
        problems += check_judge(cfg.online.judge)
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


def tokenize(cfg: Config, examples, tokenizer, what: str, *, require: bool = True):
    pairs, stats = tokenize_pairs(examples, tokenizer, max_length=cfg.data.max_length,
                                  max_prompt_length=cfg.data.prompt_length, truncation=cfg.data.truncation)
    if require and not pairs:
        raise TrainingError(f"{what}: no pairs left after tokenization ({stats})")
    return pairs


def tokenize_steps(cfg: Config, steps, tokenizer):
    return [tokenize(cfg, d[: cfg.data.max_examples], tokenizer, f"sDPO step {t}") for t, d in enumerate(steps, 1)]


def heldout(run: Run, references: References, prev: str, tests, t: int, num_steps: int):
    """eval.every: step t's held-out pairs (test set t when there is one per step, else all of them)
    scored against the step's (starting) reference, cached like the training pairs; None when off."""
    cfg = run.cfg
    if cfg.eval.every is None or not tests:
        return None
    if references.tokenizer is not run.tokenizer:
        log(run, "eval.every: skipped, the held-out evaluation needs a reference with the policy's tokenizer")
        return None
    pairs = tests[t - 1] if len(tests) == num_steps else [p for test in tests for p in test]
    ref = (reference_logps(run, references.model_dir(prev), pairs, f"sDPO step {t}/{num_steps} held-out")
           if cfg.loss.needs_reference else (torch.zeros(len(pairs)), torch.zeros(len(pairs))))
    return heldout_evaluator(run, pairs, ref)


def easy_to_hard_split(run: Run, datasets, base: str):
    """The paper's open question (Sec. 4): order the pooled pairs by S's γ, easiest (highest) first."""
    cfg = run.cfg
    pool = [ex for d in datasets for ex in d]
    pool_pairs = tokenize(cfg, pool, run.tokenizer, "easy_to_hard pool", require=False)
    c, r = reference_logps(run, base, pool_pairs, "easy_to_hard scores (S)")
    scores = [0.0] * len(pool)  # pairs dropped by tokenization get a neutral score (and are dropped again)
    for p, g in zip(pool_pairs, gamma(c, r).tolist()):
        scores[p.index] = g
    return split_steps(datasets, "easy_to_hard", fractions=cfg.data.fractions, seed=cfg.train.seed, scores=scores)
