"""On-policy sDPO steps ([online]): step t's pairs are sampled from M_{t-1} and ranked by a judge.

    prompts of D_t ──M_{t-1} samples k completions each──> judge scores ──> best vs worst per prompt
        (+ online.mix of the file's own pairs) ──> D_t of the usual sDPO step (reference = M_{t-1})

This is the Iterative RPO / Self-Rewarding loop (Pang et al. 2024, arXiv 2404.19733; Yuan et al.
2024) with sDPO's reference handoff: each step's reference is the model that sampled its pairs.

Sampling. The prompts (D_t's records, in order, after data.max_examples) are cut into batches of
online.batch_prompts; batch b decodes its prompts x online.samples rows at once
(sdpo.models.generate). Prompt i has its own generator, seeded by (train.seed, t, i), from which its
samples draw their tokens (sdpo.models.generate.per_row_draw), and the number of new tokens is fixed
by the step's longest prompt: so a prompt's samples do not depend on the batch it lands in
(online.batch_prompts) or on the world size. Batches are dealt to the ranks round-robin; each rank
decodes with a full, unsharded copy of M_{t-1}.

Judges (online.judge) score every completion of a batch at once, a number each, higher = better:
    exact_match         1 when strip(completion) == strip(answer), else 0 (online.casefold: both
                        case-folded first); answer = the record's online.answer_field (default
                        "chosen": the file's preferred response, whatever the schema)
    command:ARGV        ARGV (split like a shell would, never run by one) reads one JSON line
                        {"prompt": [messages], "completion": str, "record": {the file's record}}
                        per completion on stdin and writes one number per line on stdout
    reward_model:DIR    an HF ...ForSequenceClassification checkpoint (sdpo.models.score): the
                        score head on the last token of prompt + completion, rendered with DIR's
                        own tokenizer and chat template

The pair rule (`pick_pair`): best = the first completion with the highest score, worst = the first
with the lowest; no pair when they tie, when best - worst < online.min_margin, or when the two
texts are the same.

Record and resume: RUN/online/step{t}.jsonl holds one line per prompt: its index, origin, the
completions, whether each stopped at EOS, the scores, the kept pair (or null) and why. Each
sampling batch is first written atomically to RUN/online/.step{t}.parts/ by the rank that made
it; a killed run resumed with --resume samples only the batches that are not there, and the
seeds make those the batches an uninterrupted run would have made.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from sdpo.data.pairs import encode_prompt
from sdpo.data.read import DataError, PreferenceExample, iter_records
from sdpo.models.checkpoint import load_model
from sdpo.models.generate import generate
from sdpo.runtime import distributed as D
from sdpo.runtime.run import Run, TrainingError, autocast, free_memory, log

ONLINE_DIR = "online"


# --------------------------------------------------------------------------------------
# The step: sample, judge, pick pairs
# --------------------------------------------------------------------------------------

def on_policy_examples(run: Run, model_dir: str, examples: list[PreferenceExample], t: int):
    """(D_t's examples for the sDPO step, the step's online/ metrics). model_dir = M_{t-1}."""
    on = run.cfg.online
    t0 = time.perf_counter()
    records = step_records(run, model_dir, examples, t)
    kept = [PreferenceExample(ex.prompt, rec["completions"][rec["kept"][0]], rec["completions"][rec["kept"][1]],
                              ex.source, f"{ex.origin} (on-policy, step {t})")
            for ex, rec in zip(examples, records) if rec["kept"] is not None]
    mixed = mix_share(examples, on.mix, seed=run.cfg.train.seed + t)
    scores = [s for rec in records for s in rec["scores"]]
    metrics = {"online/mean_score": float(np.mean(scores)), "online/pairs_kept": len(kept),
               "online/ties": sum(rec["why"] == "tie" for rec in records), "online/prompts": len(records),
               "online/file_pairs": len(mixed), "online/sample_time_s": time.perf_counter() - t0}
    log(run, f"sDPO step {t}: on-policy pairs from {model_dir}: {len(kept)} of {len(records)} prompts kept "
             f"({metrics['online/ties']} ties), mean score {metrics['online/mean_score']:.3f}"
             + (f", + {len(mixed)} of the file's pairs" if mixed else ""))
    if not kept and not mixed:
        raise TrainingError(f"sDPO step {t} (online): no pair left: every prompt's {on.samples} samples tied or "
                            f"differed by less than online.min_margin = {on.min_margin} (see "
                            f"{run.out / ONLINE_DIR / f'step{t}.jsonl'}); raise online.temperature or "
                            f"online.samples, or keep file pairs with online.mix")
    return kept + mixed, metrics


def pick_pair(scores: list[float], completions: list[str], min_margin: float) -> tuple[list[int] | None, str]:
    """(best, worst) indices and "kept", or None and why not: "tie" (all scores equal), "margin"
    (best - worst < min_margin), "same text" (the judge scored one text two ways)."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first of the highest
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))  # the first of the lowest
    if scores[best] == scores[worst]:
        return None, "tie"
    if scores[best] - scores[worst] < min_margin:
        return None, "margin"
    if completions[best] == completions[worst]:
        return None, "same text"
    return [best, worst], "kept"


def mix_share(examples, mix: float, seed: int) -> list[PreferenceExample]:
    """online.mix: round(mix * N) of the file's own pairs, a seeded choice, in file order."""
    n = math.floor(mix * len(examples) + 0.5)
    chosen = sorted(np.random.default_rng(seed).permutation(len(examples))[:n].tolist())
    return [examples[i] for i in chosen]


def step_records(run: Run, model_dir: str, examples, t: int) -> list[dict]:
    """One record per prompt of D_t: from RUN/online/step{t}.jsonl when it is complete, else
    sampled and judged batch by batch (the batches already in .step{t}.parts/ are reused)."""
    on, out = run.cfg.online, run.out / ONLINE_DIR
    final, parts = out / f"step{t}.jsonl", out / f".step{t}.parts"
    batches = [range(b, min(b + on.batch_prompts, len(examples))) for b in range(0, len(examples), on.batch_prompts)]
    todo = D.broadcast_object(_missing(final, parts, batches) if run.info.is_main else None)
    if todo:
        log(run, f"sDPO step {t}: sampling {on.samples} completions for "
                 f"{sum(len(batches[b]) for b in todo)} prompts from {model_dir}"
                 + (f" ({len(batches) - len(todo)} of {len(batches)} batches already in {parts})"
                    if len(todo) < len(batches) else ""))
        mine = todo[run.info.rank::run.info.world_size]  # the round-robin share of this rank
        if mine:
            sample_batches(run, model_dir, examples, t, {b: batches[b] for b in mine}, parts)
    D.barrier()
    if run.info.is_main and not final.is_file():
        lines = [(parts / f"batch{b:06d}.jsonl").read_text() for b in range(len(batches))]
        write_atomic(final, "".join(lines))
        shutil.rmtree(parts, ignore_errors=True)
    D.barrier()
    return D.broadcast_object(read_step_file(final, len(examples)) if run.info.is_main else None)


def sample_batches(run: Run, model_dir: str, examples, t: int, batches: dict[int, range], parts: Path) -> None:
    """Sample and judge the given batches, writing each to parts/ as soon as it is done."""
    cfg, on, tok = run.cfg, run.cfg.online, run.tokenizer
    device = run.info.device
    # Unsharded: generate() takes as many steps as its batch needs, which no FSDP collective allows.
    model = load_model(model_dir, dtype=run.autocast_dtype or torch.float32, device=device).eval()
    judge = make_judge(run)
    eos = tok.eos_id
    prompts = [prompt_ids(ex, tok, cfg.data.prompt_length, cfg.data.truncation) for ex in examples]
    # one length for the whole step, not per batch: a prompt's samples must not depend on its batch
    n_new = min(on.max_new_tokens, model.config.max_position_embeddings - max(map(len, prompts)))
    if n_new < 1:
        raise TrainingError(f"sDPO step {t} (online): a prompt of {max(map(len, prompts))} tokens leaves "
                            f"no room to sample within max_position_embeddings = "
                            f"{model.config.max_position_embeddings}; lower data.max_prompt_length")
    for b, idx in batches.items():
        # prompt-major rows (prompt j's are j*k .. j*k+k-1), all k drawing from prompt j's generator
        rows = [prompts[i] for i in idx for _ in range(on.samples)]
        gens = [torch.Generator().manual_seed(prompt_seed(cfg.train.seed, t, i)) for i in idx]
        with autocast(run):
            ids = generate(model, rows, max_new_tokens=n_new, eos_id=eos, pad_id=tok.pad_id or 0,
                           temperature=on.temperature, top_p=on.top_p,
                           generator=[g for g in gens for _ in range(on.samples)])
        texts = [tok.decode(x) for x in ids]
        scores = judge.score([examples[i] for i in idx for _ in range(on.samples)], texts)
        lines = []
        for j, i in enumerate(idx):
            rows_j = slice(j * on.samples, (j + 1) * on.samples)
            comp, sc = texts[rows_j], scores[rows_j]
            kept, why = pick_pair(sc, comp, on.min_margin)
            lines.append(json.dumps({"index": i, "origin": examples[i].origin, "completions": comp,
                                     "stopped": [len(x) < n_new for x in ids[rows_j]], "scores": sc,
                                     "kept": kept, "why": why}) + "\n")
        write_atomic(parts / f"batch{b:06d}.jsonl", "".join(lines))
    judge.close()
    del model
    free_memory()


def prompt_seed(seed: int, t: int, index: int) -> int:
    """The generator seed of prompt `index` of D_t: fixed by the run's seed, not by batches or ranks."""
    return int.from_bytes(hashlib.sha256(f"sdpo-online/{seed}/{t}/{index}".encode()).digest()[:8], "little") >> 1


def prompt_ids(ex: PreferenceExample, tokenizer, max_prompt_length: int, truncation: str) -> list[int]:
    """The prompt as the pairs tokenize it (chat template, one BOS), cut as data.truncation says."""
    ids = encode_prompt(ex.prompt, tokenizer)
    if len(ids) <= max_prompt_length:
        return ids
    if truncation == "keep_start":
        return ids[:max_prompt_length]
    bos = tokenizer.bos_id
    if bos is not None and ids[0] == bos:
        return [bos] + ids[len(ids) - (max_prompt_length - 1):] if max_prompt_length > 1 else [bos]
    return ids[len(ids) - max_prompt_length:]


# --------------------------------------------------------------------------------------
# The step file and its parts
# --------------------------------------------------------------------------------------

def write_atomic(path: Path, text: str) -> None:
    """Temporary name, then rename: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TrainingError(f"cannot write {path}: {e.strerror or e}") from e


def _missing(final: Path, parts: Path, batches) -> list[int]:
    """The batches still to sample (none once the step file is complete). A part that does not read
    back as its batch's lines is sampled again: a rename is atomic, but the file may be hand-edited."""
    if final.is_file():
        shutil.rmtree(parts, ignore_errors=True)  # a kill between writing the step file and this cleanup
        return []
    todo = []
    for b, idx in enumerate(batches):
        try:
            rows = [json.loads(line) for line in (parts / f"batch{b:06d}.jsonl").read_text().splitlines()]
            if [r["index"] for r in rows] == list(idx):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            pass
        todo.append(b)
    for q in parts.glob(".*.tmp*") if parts.is_dir() else []:  # left by a kill inside write_atomic
        q.unlink(missing_ok=True)
    return todo


def read_step_file(path: Path, n: int) -> list[dict]:
    """The records of RUN/online/step{t}.jsonl; a file that is not n records in order stops the run."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainingError(f"{path}: unreadable ({e}); delete it to sample step again") from None
    if [r.get("index") if isinstance(r, dict) else None for r in records] != list(range(n)):
        raise TrainingError(f"{path}: expected one record per prompt, indices 0..{n - 1} in order; "
                            f"delete it to sample the step again")
    return records


def clear(run: Run) -> None:
    """A fresh run (not --resume) samples every step again: earlier step files are not its own."""
    if run.info.is_main and not run.cfg.train.resume:
        shutil.rmtree(run.out / ONLINE_DIR, ignore_errors=True)
    D.barrier()


# --------------------------------------------------------------------------------------
# Judges: score(items) -> one float per item, higher = better
# --------------------------------------------------------------------------------------

class JudgeError(TrainingError):
    """A judge that failed or answered out of contract; the message names the judge and the line."""


class RawRecords:
    """The file record an example was read from (by its origin "file:line" / "file:row N"), read on first use."""

    def __init__(self):
        self.table: dict[str, object] = {}
        self.files: set[str] = set()

    def get(self, ex: PreferenceExample):
        file = ex.origin.rsplit(":", 1)[0]
        if file not in self.files:
            self.files.add(file)
            try:
                self.table.update((o, r) for o, r in iter_records(Path(file)))
            except (OSError, DataError) as e:
                raise JudgeError(f"{ex.origin}: cannot read the record for the judge ({e})") from None
        return self.table.get(ex.origin)


class ExactMatch:
    """1.0 when strip(completion) == strip(answer) (both case-folded with casefold=True), else 0.0."""

    def __init__(self, answer_field: str = "chosen", casefold: bool = False):
        self.answer_field, self.casefold, self.raw = answer_field, casefold, RawRecords()

    def norm(self, text: str) -> str:
        text = text.strip()
        return text.casefold() if self.casefold else text

    def answer(self, ex: PreferenceExample) -> str:
        if self.answer_field == "chosen":  # the parsed preferred response, whatever the file's schema
            return ex.chosen
        rec = self.raw.get(ex)
        value = rec.get(self.answer_field) if isinstance(rec, dict) else None
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            keys = sorted(rec) if isinstance(rec, dict) else []
            raise JudgeError(f"{ex.origin}: online.answer_field {self.answer_field!r}: expected a string (or a number) "
                             f"in the record, got {value!r}; the record has {keys}")
        return str(value)

    def score(self, examples, completions) -> list[float]:
        return [float(self.norm(c) == self.norm(self.answer(ex))) for ex, c in zip(examples, completions)]

    def close(self):
        pass


class CommandJudge:
    """An external program, run without a shell: one JSON line per completion in, one number per line out."""

    def __init__(self, argv: list[str], timeout_s: float):
        self.argv, self.timeout_s, self.raw = argv, timeout_s, RawRecords()
        self.name = f"online.judge command {shlex.join(argv)}"

    def score(self, examples, completions) -> list[float]:
        text = "".join(json.dumps({"prompt": [dict(m) for m in ex.prompt], "completion": c, "record": self.raw.get(ex)},
                                  ensure_ascii=False) + "\n" for ex, c in zip(examples, completions))
        try:
            proc = subprocess.run(self.argv, input=text, capture_output=True, text=True, timeout=self.timeout_s)
        except FileNotFoundError:
            raise JudgeError(f"{self.name}: cannot run {self.argv[0]!r}: no such program") from None
        except PermissionError:
            raise JudgeError(f"{self.name}: cannot run {self.argv[0]!r}: not executable") from None
        except subprocess.TimeoutExpired:
            raise JudgeError(f"{self.name}: no answer within online.timeout_s = {self.timeout_s:g} s "
                             f"for {len(completions)} completions") from None
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-5:]
            raise JudgeError(f"{self.name}: exited with code {proc.returncode}"
                             + (": " + " | ".join(tail) if tail else ""))
        lines = proc.stdout.splitlines()
        if len(lines) != len(completions):
            raise JudgeError(f"{self.name}: wrote {len(lines)} lines for {len(completions)} completions "
                             f"(expected one number per input line)")
        scores = []
        for n, line in enumerate(lines, start=1):
            try:
                value = float(line)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise JudgeError(f"{self.name}: output line {n}: expected a finite number, got {line!r} "
                                 f"(for input line {n}, completion {completions[n - 1]!r})")
            scores.append(value)
        return scores

    def close(self):
        pass


class RewardModelJudge:
    """A sequence-classification reward model (sdpo.models.score): no grad, unsharded on each rank,
    which scores the completions of its own sampling batches."""

    def __init__(self, model_dir: str, *, batch_size: int, device, dtype):
        from sdpo.data.tokenizer import load_tokenizer
        from sdpo.models.score import load_reward_model

        self.model = load_reward_model(model_dir, dtype=dtype, device=device)
        self.tokenizer = load_tokenizer(model_dir)
        self.batch_size = batch_size

    def score(self, examples, completions) -> list[float]:
        from sdpo.models.score import reward_scores

        tok, limit = self.tokenizer, self.model.config.max_position_embeddings
        seqs = []
        for ex, c in zip(examples, completions):
            text = tok.apply_chat_template([*map(dict, ex.prompt), {"role": "assistant", "content": c}])
            ids = tok.encode(text, add_special_tokens=False)
            seqs.append(ids[-limit:])  # the score is read at the last token: keep the end
        return reward_scores(self.model, seqs, pad_id=tok.pad_id or 0, batch_size=self.batch_size)

    def close(self):
        del self.model
        free_memory()


def make_judge(run: Run):
    on = run.cfg.online
    kind, _, arg = on.judge.partition(":")
    if on.judge == "exact_match":
        return ExactMatch(on.answer_field, on.casefold)
    if kind == "command":
        return CommandJudge(shlex.split(arg), on.timeout_s)
    return RewardModelJudge(arg.strip(), batch_size=on.judge_batch_size, device=run.info.device,
                            dtype=run.autocast_dtype or torch.float32)


def check_judge(judge: str) -> list[str]:
    """Paths and programs a judge needs, before any model work (sdpo.stepwise.check_setup)."""
    kind, _, arg = judge.partition(":")
    if kind == "command":
        try:
            argv = shlex.split(arg)
        except ValueError as e:
            return [f"online.judge: cannot split the command {arg!r} into arguments ({e})"]
        if argv and shutil.which(argv[0]) is None and not Path(argv[0]).is_file():
            return [f"online.judge: command {argv[0]!r} is not a program on PATH or a file"]
    if kind == "reward_model" and not (Path(arg.strip()) / "config.json").is_file():
        return [f"online.judge: reward_model:{arg.strip()} is not a model directory (no config.json)"]
    return []
