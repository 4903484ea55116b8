"""Generations in the layouts the LLM judges read: AlpacaEval's model outputs and Arena-Hard-Auto's
answer files (`eval.py generate --format alpaca_eval | arena_hard`).

Questions come from the benchmark's own file or from any prompts file:
- a `.json` list of objects (AlpacaEval's alpaca_eval.json) or a `.jsonl` of them, each with
  "instruction" (AlpacaEval), "prompt" (Arena-Hard-Auto v2.0 and later, with "uid"), or "turns"
  (a list of {"content"} user turns: Arena-Hard-Auto v0.1 as first released and MT-Bench, with
  "question_id"; several turns are answered one after another, each with the model's earlier
  answers in the conversation);
- any other file: one prompt per non-empty line.

Layouts written, as the judges' code reads them:
- alpaca_eval: one JSON list of {"instruction", "output", "generator", "dataset"} (the AlpacaEval
  README: `alpaca_eval --model_outputs FILE`, each dictionary with `instruction` and `output`;
  `generator` names the model on the leaderboard; `dataset` is copied from the question, as in
  alpaca_eval.json).
- arena_hard: one jsonl line per question, as lmarena/arena-hard-auto's gen_answer.py writes them
  (commit 196f6b8, June 2025): {"uid", "ans_id", "model", "messages": [user turn,
  {"role": "assistant", "content": {"answer": text}}, ...], "tstamp"}, which gen_judgment.py reads
  as messages[-1]["content"]["answer"]. A question file of the first release (with "question_id"
  and "turns") gets that release's layout instead (gen_answer.py at f3e6531, June 2024): {"question_id",
  "answer_id", "model_id", "choices": [{"index": 0, "turns": [{"content", "token_len"}]}], "tstamp"};
  token_len counts this model's tokens (that release's show_result averages it; its own gen_answer.py
  counted GPT-4 tokens with tiktoken). Arena-Hard-Auto v2's style control reads a
  "metadata" field its utils/add_markdown_info.py adds to answer files; it is not written here.
Every record also holds "sampling": the decoding settings, so a file says how it was made.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sdpo.models.generate import PromptFileError

FORMATS = ("jsonl", "alpaca_eval", "arena_hard")


@dataclass
class Question:
    line: int              # the line of a .jsonl or text file; the item number (from 1) of a .json list
    turns: list[str]       # the user turns, answered one after another
    record: dict           # the question as read: the ids a judge matches answers on (uid, question_id, dataset)


@dataclass
class Answer:
    text: str
    tokens: int            # generated tokens (EOS not counted)
    stopped: str           # "eos" | "length"


def read_questions(path) -> list[Question]:
    """The questions of a benchmark question file or a prompts file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(items, list):
            raise PromptFileError(f"{path}: expected a JSON list of question objects, got {type(items).__name__}")
        records = [(f"{path}: item {n}", n, rec) for n, rec in enumerate(items, start=1)]
    elif path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"{path}:{n}", n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise PromptFileError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    else:
        records = [(f"{path}:{n}", n, {"prompt": line}) for n, line in enumerate(text.splitlines(), start=1)
                   if line.strip()]
    questions = [_question(where, n, rec) for where, n, rec in records]
    if not questions:
        raise PromptFileError(f"{path}: no questions")
    return questions


def _question(where: str, n: int, rec) -> Question:
    if not isinstance(rec, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("instruction", "prompt"):
        if isinstance(rec.get(key), str) and rec[key].strip():
            return Question(n, [rec[key]], rec)
    turns = rec.get("turns")
    if isinstance(turns, list) and turns:
        texts = [t.get("content") if isinstance(t, dict) else t for t in turns]
        if all(isinstance(t, str) and t.strip() for t in texts):
            return Question(n, texts, rec)
    raise PromptFileError(f"{where}: expected \"instruction\" (AlpacaEval), \"prompt\" (Arena-Hard-Auto) or "
                          f"\"turns\" (a list of {{\"content\": str}}: Arena-Hard-Auto v0.1, MT-Bench), each "
                          f"non-empty text; got keys {sorted(rec)}")


def alpaca_eval_outputs(questions: list[Question], answers: list[list[Answer]], *, generator: str,
                        dataset: str, sampling: dict) -> list[dict]:
    """One object per question; `dataset` for questions whose record names none."""
    out = []
    for q, a in zip(questions, answers):
        if len(q.turns) != 1:
            raise ValueError(f"question {q.line} has {len(q.turns)} turns; AlpacaEval scores single-turn instructions")
        out.append({"instruction": q.turns[0], "output": a[0].text, "generator": generator,
                    "dataset": q.record.get("dataset", dataset), "sampling": sampling})
    return out


def arena_hard_answers(questions: list[Question], answers: list[list[Answer]], *, model: str,
                       sampling: dict) -> list[dict]:
    """One answer record per question, in the layout of the question file's release."""
    out = []
    for q, a in zip(questions, answers):
        if "question_id" in q.record and "turns" in q.record:  # the first release's layout
            out.append({"question_id": q.record["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model,
                        "choices": [{"index": 0, "turns": [{"content": t.text, "token_len": t.tokens} for t in a]}],
                        "tstamp": time.time(), "sampling": sampling})
        else:
            messages = []
            for user, t in zip(q.turns, a):
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": {"answer": t.text}}]
            out.append({"uid": q.record.get("uid", str(q.line)), "ans_id": uuid.uuid4().hex, "model": model,
                        "messages": messages, "tstamp": time.time(), "sampling": sampling})
    return out
