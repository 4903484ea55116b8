"""Evaluation: H4 multiple-choice scoring, preference metrics and γ_πref statistics.

H4 is the mean of ARC-Challenge (25-shot acc_norm), HellaSwag (10-shot acc_norm),
MMLU (5-shot acc, macro over subjects) and TruthfulQA (0-shot mc2), scored as
the Open LLM Leaderboard v1 scored them with EleutherAI's lm-evaluation-harness:

* each choice is a request (context, " " + choice); its score is the summed
  log-likelihood of the continuation tokens given the context tokens;
* acc = [argmax_i ll_i == gold]; acc_norm = [argmax_i ll_i / len(choice_i) == gold]
  with len in characters of the choice text (without the leading space);
* mc2 = Σ_{i true} exp(ll_i) / Σ_i exp(ll_i);
* few-shot examples are "query + target" blocks joined by a blank line, after an
  optional description line (MMLU), before the query being scored.

Everything here is a pure function of strings, token ids or log-likelihoods,
except `model_score_fn` / `pair_logps`, which run a model through
`sdpo.logprobs` (the fused hidden-states -> lm_head -> token_logprobs path).
"""
from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

IGNORE_INDEX = -100  # same value as sdpo.data.IGNORE_INDEX (not imported: keeps this module light)

H4_TASKS = ("arc", "hellaswag", "mmlu", "truthfulqa")


class H4DataError(ValueError):
    """A task file is missing, unreadable, or a row lacks a field in the expected form."""


# --------------------------------------------------------------------------------------
# Documents and prompts
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MCDoc:
    query: str                    # the text scored as context (the harness's doc_to_text)
    choices: tuple[str, ...]      # continuations are " " + choice
    gold: int                     # index of the right choice; -1 for mc2 docs
    labels: tuple[int, ...] = ()  # TruthfulQA mc2: 1 = true answer, per choice
    subject: str = ""             # MMLU subject (snake_case, as in the data)
    origin: str = ""              # "file:line" of the row

    def target(self) -> str:
        """The answer as it appears in a few-shot block."""
        return " " + self.choices[self.gold]


# TruthfulQA's fixed six-QA preamble ("QA prompt" of Lin et al. 2021), used 0-shot.
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def _field(row: dict, name: str, origin: str, kind: type | tuple, expected: str):
    if not isinstance(row, dict):
        raise H4DataError(f"{origin}: expected a JSON object per row, got {type(row).__name__}")
    if name not in row:
        raise H4DataError(f"{origin}: missing field '{name}' (expected {expected})")
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise H4DataError(f"{origin}: field '{name}' must be {expected}, got {value!r:.80}")
    return value


def _str_list(value, name: str, origin: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise H4DataError(f"{origin}: field '{name}' must be a non-empty list of non-empty strings, got {value!r:.80}")
    return list(value)


def arc_doc(row: dict, origin: str) -> MCDoc:
    """ai2_arc row: question, choices{text,label}, answerKey."""
    question = _field(row, "question", origin, str, "a string")
    choices = _field(row, "choices", origin, dict, "an object {text: [...], label: [...]}")
    texts = _str_list(choices.get("text"), "choices.text", origin)
    labels = _str_list(choices.get("label"), "choices.label", origin)
    if len(labels) != len(texts):
        raise H4DataError(f"{origin}: fields 'choices.text' and 'choices.label' differ in length "
                          f"({len(texts)} vs {len(labels)})")
    key = str(_field(row, "answerKey", origin, (str, int), "a choice label such as 'A' or '1'"))
    if key not in labels:
        # A few ARC rows use digits for the key but letters for labels, or the reverse.
        digit_to_letter = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}
        letter_to_digit = {v: k for k, v in digit_to_letter.items()}
        key = digit_to_letter.get(key, letter_to_digit.get(key, key))
    if key not in labels:
        raise H4DataError(f"{origin}: field 'answerKey' = {row['answerKey']!r} is not one of choices.label {labels}")
    return MCDoc("Question: " + question + "\nAnswer:", tuple(texts), labels.index(key), origin=origin)


_BRACKETS = re.compile(r"\[.*?\]")  # non-greedy: each [marker] alone


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleanup: WikiHow rows carry '[title]' / '[header]' markers."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = _BRACKETS.sub("", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict, origin: str) -> MCDoc:
    """hellaswag row: activity_label, ctx_a, ctx_b, endings, label."""
    activity = _field(row, "activity_label", origin, str, "a string")
    ctx_a = _field(row, "ctx_a", origin, str, "a string")
    ctx_b = _field(row, "ctx_b", origin, str, "a string")
    endings = _str_list(_field(row, "endings", origin, list, "a list of strings"), "endings", origin)
    label = row.get("label")
    try:
        gold = int(label)
    except (TypeError, ValueError):
        raise H4DataError(f"{origin}: field 'label' must be an integer index into 'endings' "
                          f"(the test split has none; use validation), got {label!r}") from None
    if not 0 <= gold < len(endings):
        raise H4DataError(f"{origin}: field 'label' = {gold} is out of range for {len(endings)} endings")
    # str.capitalize also lower-cases the rest of ctx_b; the harness does the same.
    query = hellaswag_preprocess(activity + ": " + ctx_a + " " + ctx_b.capitalize())
    return MCDoc(query, tuple(hellaswag_preprocess(e) for e in endings), gold, origin=origin)


MMLU_KEYS = "ABCDEFGHIJ"


def mmlu_doc(row: dict, origin: str) -> MCDoc:
    """cais/mmlu row: question, subject, choices, answer (int index, or a letter)."""
    question = _field(row, "question", origin, str, "a string")
    subject = _field(row, "subject", origin, str, "a subject name such as 'abstract_algebra'")
    choices = _str_list(_field(row, "choices", origin, list, "a list of strings"), "choices", origin)
    if len(choices) > len(MMLU_KEYS):
        raise H4DataError(f"{origin}: field 'choices' has {len(choices)} entries, at most {len(MMLU_KEYS)} supported")
    answer = _field(row, "answer", origin, (int, str), "an integer index or a letter A-D")
    gold = MMLU_KEYS.index(answer) if isinstance(answer, str) and answer in MMLU_KEYS else answer
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise H4DataError(f"{origin}: field 'answer' = {answer!r} does not index the {len(choices)} choices")
    keys = MMLU_KEYS[: len(choices)]
    listed = "".join(f"{k}. {c}\n" for k, c in zip(keys, choices))
    # The choices are the letters: the model is scored on " A", " B", ...
    return MCDoc(f"{question.strip()}\n{listed}Answer:", tuple(keys), gold, subject=subject, origin=origin)


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}."


def truthfulqa_doc(row: dict, origin: str) -> MCDoc:
    """truthful_qa multiple_choice row: question, mc2_targets{choices, labels}."""
    question = _field(row, "question", origin, str, "a string")
    targets = _field(row, "mc2_targets", origin, dict, "an object {choices: [...], labels: [...]}")
    choices = _str_list(targets.get("choices"), "mc2_targets.choices", origin)
    labels = targets.get("labels")
    if not isinstance(labels, list) or len(labels) != len(choices) or any(v not in (0, 1) for v in labels):
        raise H4DataError(f"{origin}: field 'mc2_targets.labels' must be a list of 0/1, one per choice "
                          f"({len(choices)}), got {labels!r:.80}")
    query = TRUTHFULQA_PREAMBLE + "\n\nQ: " + question + "\nA:"
    return MCDoc(query, tuple(choices), -1, labels=tuple(int(v) for v in labels), origin=origin)


def fewshot_context(doc: MCDoc, shots: Sequence[MCDoc], description: str = "") -> str:
    """description, then each shot as query+target, blank lines between, then the query."""
    head = description + "\n\n" if description else ""
    if shots:
        head += "\n\n".join(s.query + s.target() for s in shots) + "\n\n"
    return head + doc.query


# --------------------------------------------------------------------------------------
# Task files
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    name: str
    dirs: tuple[str, ...]          # where under --data-dir the task's files may be
    eval_split: str
    fewshot_split: str | None      # None: zero-shot only
    num_fewshot: int               # the leaderboard's setting
    metric: str                    # the number that enters H4
    make_doc: Callable[[dict, str], MCDoc]


TASKS: dict[str, TaskSpec] = {
    "arc": TaskSpec("arc", ("arc", "ARC-Challenge", "ai2_arc/ARC-Challenge", "arc_challenge"),
                    "test", "train", 25, "acc_norm", arc_doc),
    "hellaswag": TaskSpec("hellaswag", ("hellaswag", "hellaswag/data"),
                          "validation", "train", 10, "acc_norm", hellaswag_doc),
    "mmlu": TaskSpec("mmlu", ("mmlu", "mmlu/all", "cais_mmlu/all", "cais/mmlu/all"),
                     "test", "dev", 5, "acc", mmlu_doc),
    "truthfulqa": TaskSpec("truthfulqa", ("truthfulqa", "truthful_qa/multiple_choice",
                                          "truthfulqa/multiple_choice", "truthful_qa"),
                           "validation", None, 0, "mc2", truthfulqa_doc),
}

_EXTENSIONS = (".jsonl", ".json", ".parquet")


def read_rows(path: str | Path) -> list[tuple[dict, str]]:
    """Rows of a .jsonl / .json (a list, or {"data"|"rows": [...]}) / .parquet file, each with its origin."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise H4DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), "
                              "or convert the split to .jsonl") from None
        return [(r, f"{path}:row {i}") for i, r in enumerate(pq.read_table(path).to_pylist())]
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise H4DataError(f"{path}: cannot read ({e.strerror})") from None
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as e:
                raise H4DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise H4DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):
        data = data.get("data", data.get("rows"))
    if not isinstance(data, list):
        raise H4DataError(f"{path}: expected a JSON list of rows (or an object with a 'data' list)")
    return [(r, f"{path}:row {i}") for i, r in enumerate(data)]


def find_split_files(data_dir: str | Path, spec: TaskSpec, split: str) -> list[Path]:
    """`<dir>/<split>.jsonl` or HF shards `<dir>/[data/]<split>-00000-of-00001.parquet`, in one of spec.dirs."""
    root = Path(data_dir)
    for d in spec.dirs:
        base = root / d
        if not base.is_dir():
            continue
        found = [p for sub in (base, base / "data") if sub.is_dir() for p in sorted(sub.iterdir())
                 if p.suffix in _EXTENSIONS and (p.stem == split or p.name.startswith(split + "-"))]
        if found:
            return found
    tried = ", ".join(str(root / d) for d in spec.dirs)
    raise H4DataError(f"{spec.name}: no '{split}' split file ({'/'.join(_EXTENSIONS)}) found in any of: {tried}")


def load_split(data_dir: str | Path, spec: TaskSpec, split: str) -> list[MCDoc]:
    docs = [spec.make_doc(row, origin) for path in find_split_files(data_dir, spec, split)
            for row, origin in read_rows(path)]
    if not docs:
        raise H4DataError(f"{spec.name}: the '{split}' split under {data_dir} has no rows")
    return docs


# --------------------------------------------------------------------------------------
# Requests: (context, continuation) strings for each document
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskItem:
    task: str          # "arc", "hellaswag", "mmlu", "truthfulqa"
    doc: MCDoc
    context: str       # description + few-shot blocks + query

    def requests(self) -> list[tuple[str, str]]:
        return [(self.context, " " + c) for c in self.doc.choices]


def build_items(spec: TaskSpec, docs: Sequence[MCDoc], fewshot_pool: Sequence[MCDoc], *,
                num_fewshot: int, seed: int = 1234, limit: int | None = None) -> list[TaskItem]:
    """Contexts for one task, deterministic in `seed`.

    As the harness did: a `random.Random(seed)` per task (per subject for MMLU)
    shuffles the documents, `limit` keeps the first ones, and the same generator
    then samples each document's few-shot examples from the pool in turn. MMLU
    takes the first `num_fewshot` dev examples of the subject, unsampled.
    """
    if spec.fewshot_split is None and num_fewshot:
        raise ValueError(f"{spec.name} is zero-shot only (num_fewshot={num_fewshot})")
    if spec.name == "mmlu":
        by_subject: dict[str, list[MCDoc]] = {}
        for d in docs:
            by_subject.setdefault(d.subject, []).append(d)
        items = []
        for subject in sorted(by_subject):
            shots = [d for d in fewshot_pool if d.subject == subject][:num_fewshot]
            if len(shots) < num_fewshot:
                raise H4DataError(f"mmlu: subject '{subject}' has {len(shots)} dev examples, "
                                  f"{num_fewshot}-shot needs {num_fewshot}")
            rng = random.Random(seed)
            subject_docs = list(by_subject[subject])
            rng.shuffle(subject_docs)
            items += [TaskItem("mmlu", d, fewshot_context(d, shots, mmlu_description(subject)))
                      for d in subject_docs[:limit]]
        return items
    rng = random.Random(seed)
    docs = list(docs)
    rng.shuffle(docs)
    if num_fewshot > len(fewshot_pool):
        raise H4DataError(f"{spec.name}: {num_fewshot}-shot needs {num_fewshot} '{spec.fewshot_split}' "
                          f"examples, found {len(fewshot_pool)}")
    return [TaskItem(spec.name, d, fewshot_context(d, rng.sample(list(fewshot_pool), num_fewshot) if num_fewshot else []))
            for d in docs[:limit]]


def load_task_items(data_dir: str | Path, task: str, *, num_fewshot: int | None = None,
                    seed: int = 1234, limit: int | None = None) -> list[TaskItem]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    spec = TASKS[task]
    k = spec.num_fewshot if num_fewshot is None or spec.fewshot_split is None else num_fewshot
    docs = load_split(data_dir, spec, spec.eval_split)
    pool = load_split(data_dir, spec, spec.fewshot_split) if k else []
    return build_items(spec, docs, pool, num_fewshot=k, seed=seed, limit=limit)


# --------------------------------------------------------------------------------------
# Scoring formulas
# --------------------------------------------------------------------------------------

def _argmax(values: Sequence[float]) -> int:
    # first maximum wins, as numpy.argmax
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mc_scores(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc: argmax of ll; acc_norm: argmax of ll / len(choice) (characters, no leading space)."""
    acc = float(_argmax(lls) == gold)
    acc_norm = float(_argmax([ll / len(c) for ll, c in zip(lls, choices)]) == gold)
    return {"acc": acc, "acc_norm": acc_norm}


def mc2_score(lls: Sequence[float], labels: Sequence[int]) -> float:
    """Σ_true p / Σ_all p with p = exp(ll); computed as exp(lse(true) - lse(all)) to avoid underflow."""
    lls_t = torch.tensor(lls, dtype=torch.float64)
    true = torch.tensor(labels, dtype=torch.bool)
    if not true.any():
        return 0.0
    return math.exp(float(torch.logsumexp(lls_t[true], 0) - torch.logsumexp(lls_t, 0)))


def score_item(item: TaskItem, lls: Sequence[float]) -> dict[str, float]:
    if item.doc.labels:
        return {"mc2": mc2_score(lls, item.doc.labels)}
    return mc_scores(lls, item.doc.choices, item.doc.gold)


def aggregate(task: str, items: Sequence[TaskItem], per_item: Sequence[dict[str, float]]) -> dict:
    """Mean of each metric; MMLU's headline acc is the macro average over subjects."""
    spec = TASKS[task]
    out: dict = {"metric": spec.metric, "n": len(items)}
    keys = list(per_item[0]) if per_item else [spec.metric]
    for key in keys:
        out[key] = sum(s[key] for s in per_item) / len(per_item) if per_item else float("nan")
    if task == "mmlu":
        subjects: dict[str, list[float]] = {}
        for item, s in zip(items, per_item):
            subjects.setdefault(item.doc.subject, []).append(s["acc"])
        out["acc_micro"] = out["acc"]
        out["subjects"] = {k: {"acc": sum(v) / len(v), "n": len(v)} for k, v in sorted(subjects.items())}
        out["acc"] = sum(v["acc"] for v in out["subjects"].values()) / max(len(subjects), 1)
    out["score"] = out[spec.metric]
    return out


# --------------------------------------------------------------------------------------
# Token boundary and batched log-likelihoods
# --------------------------------------------------------------------------------------

def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the front of the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def encode_requests(encode: Callable[[str], list[int]], requests: Sequence[tuple[str, str]], *,
                    prefix_ids: Sequence[int] = ()) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per request.

    The whole string is encoded and split after as many tokens as the context
    alone encodes to, so the continuation's tokens are the ones the tokenizer
    produces in place (a leading space merges into the first word piece).
    Each distinct context is encoded once. `prefix_ids` (e.g. [BOS]) go in front.
    """
    context_cache: dict[str, list[int]] = {}
    out = []
    for context, continuation in requests:
        context, continuation = split_trailing_space(context, continuation)
        if context not in context_cache:
            context_cache[context] = encode(context)
        ctx_ids = context_cache[context]
        cont_ids = encode(context + continuation)[len(ctx_ids):]
        if not cont_ids:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens after its context")
        out.append((list(prefix_ids) + ctx_ids, cont_ids))
    return out


# score_fn(input_ids [B, T], labels [B, T], attention_mask [B, T]) -> [B] summed log p of the
# label tokens; labels are NOT shifted (logits at t score labels[t+1]), IGNORE_INDEX elsewhere.
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_batch(pairs: Sequence[tuple[list[int], list[int]]], *, max_length: int, pad_id: int):
    """Right-padded input_ids, labels, attention_mask [B, T] for (context, continuation) id pairs.

    A sequence longer than max_length loses tokens from the left (the context's start).
    """
    rows = []
    for ctx, cont in pairs:
        if len(cont) >= max_length:
            raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length={max_length}")
        if not ctx:
            raise ValueError("empty context: the first continuation token would have nothing to condition on")
        seq = (ctx + cont)[-max_length:]
        rows.append((seq, [IGNORE_INDEX] * (len(seq) - len(cont)) + cont))
    width = max(len(s) for s, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (seq, lab) in enumerate(rows):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(seq)] = torch.tensor(lab)
        mask[i, : len(seq)] = 1
    return input_ids, labels, mask


# next_token_fn(input_ids [B, T], attention_mask [B, T]) -> [B, V] log-probs of the token
# after each row's last real position.
NextTokenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def batched_loglikelihoods(score_fn: ScoreFn, pairs: Sequence[tuple[list[int], list[int]]], *,
                           batch_size: int = 8, max_length: int = 2048, pad_id: int = 0,
                           next_token_fn: NextTokenFn | None = None,
                           progress: "Progress | None" = None) -> list[float]:
    """Summed continuation log-likelihood per pair, in input order.

    With `next_token_fn`, requests that share a context and continue it by one token
    (MMLU's " A" .. " D") take one forward of the context for the whole group: the
    log-prob of each choice is read from the same next-token distribution. The rest go
    through `score_fn`, longest first (padding stays small and an out-of-memory shows
    at once), with requests that share a context next to each other.
    """
    out = [0.0] * len(pairs)
    rest = list(range(len(pairs)))
    if next_token_fn is not None:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if len(cont) == 1:
                groups.setdefault(tuple(ctx), []).append(i)
        shared = [(ctx, idx) for ctx, idx in groups.items() if len(idx) > 1]
        in_shared = {i for _, idx in shared for i in idx}
        rest = [i for i in rest if i not in in_shared]
        shared.sort(key=lambda g: -len(g[0]))
        for start in range(0, len(shared), batch_size):
            chunk = shared[start : start + batch_size]
            rows = [list(ctx)[-(max_length - 1):] for ctx, _ in chunk]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                input_ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            logps = next_token_fn(input_ids, mask)  # [G, V]
            for r, (_, idx) in enumerate(chunk):
                for i in idx:
                    out[i] = float(logps[r, pairs[i][1][0]])
            if progress is not None:
                progress.update(sum(len(idx) for _, idx in chunk))
    order = sorted(rest, key=lambda i: (-len(pairs[i][0]) - len(pairs[i][1]), pairs[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, labels, mask = make_batch([pairs[i] for i in idx], max_length=max_length, pad_id=pad_id)
        scores = score_fn(input_ids, labels, mask)
        for i, s in zip(idx, scores.tolist()):
            out[i] = float(s)
        if progress is not None:
            progress.update(len(idx))
    return out


def model_score_fn(model: torch.nn.Module, device: torch.device | str | None = None) -> ScoreFn:
    """ScoreFn over a Transformer through sdpo.logprobs.sequence_logps (fused log-prob kernel)."""
    from sdpo.logprobs import sequence_logps

    device = torch.device(device) if device is not None else next(model.parameters()).device

    @torch.no_grad()
    def score(input_ids, labels, attention_mask):
        out = sequence_logps(model, input_ids.to(device), labels.to(device),
                             attention_mask=attention_mask.to(device), ignore_index=IGNORE_INDEX)
        return out.logps.float().cpu()

    return score


def model_next_token_fn(model: torch.nn.Module, device: torch.device | str | None = None) -> NextTokenFn:
    """NextTokenFn over a Transformer: lm_head on each row's last real hidden state only ([B, V])."""
    device = torch.device(device) if device is not None else next(model.parameters()).device

    @torch.no_grad()
    def next_token(input_ids, attention_mask):
        mask = attention_mask.to(device)
        hidden = model.hidden_states(input_ids.to(device), mask)  # [B, T, H]
        last = mask.sum(1) - 1  # [B] right padding: the last real position
        h = hidden[torch.arange(hidden.shape[0], device=device), last]  # [B, H]
        return torch.log_softmax(model.lm_head(h).float(), dim=-1).cpu()

    return next_token


class LoglikelihoodRunner:
    """(context, continuation) strings -> summed log-likelihoods, via a tokenizer and a ScoreFn."""

    def __init__(self, score_fn: ScoreFn, encode: Callable[[str], list[int]], *, batch_size: int = 8,
                 max_length: int = 2048, pad_id: int = 0, prefix_ids: Sequence[int] = (),
                 next_token_fn: NextTokenFn | None = None, progress: bool = True):
        self.score_fn, self.encode, self.next_token_fn = score_fn, encode, next_token_fn
        self.batch_size, self.max_length, self.pad_id = batch_size, max_length, pad_id
        self.prefix_ids, self.progress = list(prefix_ids), progress

    def __call__(self, requests: Sequence[tuple[str, str]], label: str = "loglikelihood") -> list[float]:
        pairs = encode_requests(self.encode, requests, prefix_ids=self.prefix_ids)
        bar = Progress(label, len(pairs)) if self.progress else None
        lls = batched_loglikelihoods(self.score_fn, pairs, batch_size=self.batch_size,
                                     max_length=self.max_length, pad_id=self.pad_id,
                                     next_token_fn=self.next_token_fn, progress=bar)
        if bar is not None:
            bar.close()
        return lls


def evaluate_h4(loglikelihood: Callable[..., list[float]], data_dir: str | Path, *,
                tasks: Sequence[str] = H4_TASKS, num_fewshot: int | None = None, seed: int = 1234,
                limit: int | None = None) -> dict:
    """Score each task; `loglikelihood(requests, label=...)` maps (context, continuation) pairs to floats.

    Returns {"tasks": {task: {"metric", "score", "n", ...}}, "h4": mean score (only when
    all four tasks ran, else None), "mean": mean over the tasks that ran}.
    """
    results: dict = {}
    for task in tasks:
        items = load_task_items(data_dir, task, num_fewshot=num_fewshot, seed=seed, limit=limit)
        requests = [r for item in items for r in item.requests()]
        lls = loglikelihood(requests, label=task)
        per_item, at = [], 0
        for item in items:
            n = len(item.doc.choices)
            per_item.append(score_item(item, lls[at : at + n]))
            at += n
        spec = TASKS[task]
        results[task] = aggregate(task, items, per_item)
        results[task]["num_fewshot"] = (spec.num_fewshot if num_fewshot is None or spec.fewshot_split is None
                                        else num_fewshot)
    scores = [r["score"] for r in results.values()]
    mean = sum(scores) / len(scores) if scores else float("nan")
    complete = all(t in results for t in H4_TASKS)
    return {"tasks": results, "h4": mean if complete else None, "mean": mean,
            "seed": seed, "limit": limit}


# --------------------------------------------------------------------------------------
# Preference metrics and γ statistics
# --------------------------------------------------------------------------------------

def preference_metrics(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                       ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
                       beta: float = 0.1, losses: torch.Tensor | None = None) -> dict[str, float]:
    """Means over pairs of the DPO implicit rewards r = β·(log π(y|x) − log π_ref(y|x)) (DPO eq. 5).

    Each input is [N]. rewards/accuracies counts pairs with r_chosen > r_rejected (ties lose).
    `losses` ([N], from sdpo.loss.preference_loss) adds "loss".
    """
    pc, pr = policy_chosen_logps.double(), policy_rejected_logps.double()
    rc, rr = ref_chosen_logps.double(), ref_rejected_logps.double()
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    out = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": pc.mean().item(),
        "logps/rejected": pr.mean().item(),
        "ref_logps/chosen": rc.mean().item(),
        "ref_logps/rejected": rr.mean().item(),
        "n": int(pc.numel()),
    }
    if losses is not None:
        out["loss"] = losses.double().mean().item()
    return out


def gamma_stats(gammas: Sequence[float] | torch.Tensor) -> dict[str, float]:
    """mean, std (population), min, quartiles (linear interpolation) and max of γ = log π(y_w|x) − log π(y_l|x)."""
    g = torch.as_tensor(gammas, dtype=torch.float64).flatten()
    if g.numel() == 0:
        raise ValueError("gamma_stats: no values")
    q = torch.quantile(g, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"n": int(g.numel()), "mean": g.mean().item(), "std": g.std(unbiased=False).item(),
            "min": g.min().item(), "q1": q[0].item(), "median": q[1].item(), "q3": q[2].item(),
            "max": g.max().item()}


def histogram(values: dict[str, Sequence[float]], bins: int = 40) -> dict:
    """Counts per name over shared, equal-width bins spanning all values: {"edges": [bins+1], "counts": {name: [bins]}}."""
    all_values = torch.cat([torch.as_tensor(v, dtype=torch.float64).flatten() for v in values.values()])
    lo, hi = all_values.min().item(), all_values.max().item()
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    counts = {name: torch.histc(torch.as_tensor(v, dtype=torch.float64), bins=bins, min=lo, max=hi)
              .long().tolist() for name, v in values.items()}
    return {"edges": edges.tolist(), "counts": counts}


def plot_gamma_histogram(hist: dict, means: dict[str, float], path: str | Path, *,
                         title: str = "γ = log π(y_w|x) − log π(y_l|x)") -> bool:
    """Overlaid histograms (the paper's Figure 2) as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    edges = hist["edges"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, counts in hist["counts"].items():
        ax.stairs(counts, edges, fill=True, alpha=0.4, label=f"{name} (mean {means[name]:.2f})")
        ax.axvline(means[name], linestyle="--", linewidth=1)
    ax.set_xlabel("γ"), ax.set_ylabel("pairs"), ax.set_title(title), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_histogram_csv(hist: dict, path: str | Path) -> None:
    """bin_lo, bin_hi, then one count column per model."""
    names = list(hist["counts"])
    lines = [",".join(["bin_lo", "bin_hi", *names])]
    edges = hist["edges"]
    for i in range(len(edges) - 1):
        lines.append(",".join([f"{edges[i]:.6g}", f"{edges[i + 1]:.6g}",
                               *(str(hist["counts"][n][i]) for n in names)]))
    Path(path).write_text("\n".join(lines) + "\n")


@torch.no_grad()
def pair_logps(model: torch.nn.Module, pairs: Sequence, *, pad_id: int, batch_size: int = 8,
               device: torch.device | str | None = None,
               progress: "Progress | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (chosen [N], rejected [N]) of TokenizedPairs, in input order."""
    from sdpo.data import collate
    from sdpo.logprobs import concatenated_forward

    device = torch.device(device) if device is not None else next(model.parameters()).device
    chosen, rejected = torch.empty(len(pairs), dtype=torch.float64), torch.empty(len(pairs), dtype=torch.float64)
    for start in range(0, len(pairs), batch_size):
        chunk = list(pairs[start : start + batch_size])
        batch = {k: v.to(device) if torch.is_tensor(v) else v
                 for k, v in collate(chunk, pad_id=pad_id, ignore_index=IGNORE_INDEX).items()}
        c, r = concatenated_forward(model, batch)
        chosen[start : start + len(chunk)] = c.logps.detach().double().cpu()
        rejected[start : start + len(chunk)] = r.logps.detach().double().cpu()
        if progress is not None:
            progress.update(len(chunk))
    return chosen, rejected


# --------------------------------------------------------------------------------------
# Terminal output
# --------------------------------------------------------------------------------------

class Progress:
    """Progress on stderr: one line rewritten in place on a terminal (at most every 0.5 s);
    in a log file, a line every 30 s and at the end, so logs stay short."""

    def __init__(self, label: str, total: int, *, stream=None, interval: float | None = None):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 30.0)
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            line = f"{self.label}: {self.done}/{self.total} ({rate:.1f}/s, {now - self.start:.0f} s)"
            self.stream.write("\r" + line if self.tty else line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-markdown table, columns padded to line up in a terminal."""
    text_rows = [[_fmt(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text_rows]) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in text_rows)])


def _fmt(v: object) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)
