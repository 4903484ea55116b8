"""Preference data: read and validate, split into sDPO steps, tokenize, collate, schedule.

    files ──read_preferences──> [PreferenceExample] ──split_steps──> D_1 .. D_T
          ──tokenize_pairs──> [TokenizedPair] ──batch_schedule + collate──> [2B, T] batches

Every record is checked before any model work; a bad record is reported as
``file:line: field 'x': what was expected`` and either stops the run
(``on_error="fail"``) or is dropped and counted (``"skip"``).

Command line: ``python -m sdpo.data check FILE_OR_DIR... [--schema S]
[--tokenizer DIR --max-length N --max-prompt-length N]`` prints the summary and
exits 1 when any record is invalid.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100

SCHEMAS = ("auto", "generic", "orca", "ultrafeedback", "conversational")
SPLIT_STRATEGIES = ("natural", "random", "stratified", "easy_to_hard", "all")
ROLES = ("system", "user", "assistant")
EXTENSIONS = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """Bad preference data or bad arguments; ``report`` is set when records were validated."""

    def __init__(self, message: str, report: "ValidationReport | None" = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class PreferenceExample:
    prompt: tuple[dict, ...]  # messages before the response; the last one is the user turn
    chosen: str
    rejected: str
    source: str  # the row's `source` column, else the dataset name
    origin: str  # "file:line" (jsonl) or "file:row N" (json / parquet, N counted from 0)


# ---------------------------------------------------------------------------
# Validation report
# ---------------------------------------------------------------------------


@dataclass
class ValidationReport:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> records dropped
    errors: list[str] = field(default_factory=list)  # one message per dropped record
    files: dict[str, dict] = field(default_factory=dict)  # path -> {"schema", "kept", "dropped"}

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def ok(self) -> bool:
        return self.num_dropped == 0

    def summary(self, max_errors: int = 20) -> str:
        lines = []
        for path, info in self.files.items():
            lines.append(f"{path}: schema={info['schema']} kept={info['kept']} dropped={info['dropped']}")
        lines.append(f"total: kept {self.kept}, dropped {self.num_dropped}")
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  {reason}: {n}")
        for msg in self.errors[:max_errors]:
            lines.append(f"  error: {msg}")
        if len(self.errors) > max_errors:
            lines.append(f"  ... and {len(self.errors) - max_errors} more errors")
        return "\n".join(lines)


class _RowError(Exception):
    """One invalid record: ``reason`` is the summary bucket, ``field`` the offending field."""

    def __init__(self, reason: str, field: str | None, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message


# ---------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------


def _list_files(paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in EXTENSIONS)
            if not found:
                raise DataError(f"{p}: directory holds no {', '.join(EXTENSIONS)} files")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in EXTENSIONS:
                raise DataError(f"{p}: unsupported file type {p.suffix!r}; expected one of {', '.join(EXTENSIONS)}")
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    if not files:
        raise DataError("no preference files given")
    return files


_SPLIT_STEM = re.compile(r"^(train|test|valid|validation|dev|eval)([_\-].*)?$")


def dataset_name(path: Path) -> str:
    """`orca_pairs/train.jsonl` -> "orca_pairs"; `repo/data/train_prefs-0000.parquet` -> "repo";
    a file not named after a split keeps its own stem (`orca_rlhf.jsonl` -> "orca_rlhf")."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    if not _SPLIT_STEM.match(stem):
        return stem
    parent = path.absolute().parent  # not resolve(): HF-cache files are symlinks into blobs/
    if parent.name == "data" and parent.parent.name:  # HF hub layout: <repo>/data/<split>-*.parquet
        parent = parent.parent
    return parent.name or stem


def _iter_records(path: Path) -> Iterator[tuple[str, object]]:
    """Yields (origin, record) or (origin, _RowError) for records that cannot even be parsed."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                origin = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield origin, _RowError("undecodable_text", None, f"not valid UTF-8 at byte column {e.start + 1}")
                    continue
                if not line.strip():
                    continue  # blank lines (e.g. a trailing newline) are not records
                try:
                    yield origin, json.loads(line)
                except json.JSONDecodeError as e:
                    yield origin, _RowError("invalid_json", None, f"invalid JSON: {e.msg} at column {e.colno}")
    elif path.suffix == ".json":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not valid UTF-8") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {_type_name(data)}")
        for i, rec in enumerate(data):
            yield f"{path}:row {i}", rec
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", rec


# ---------------------------------------------------------------------------
# Record validation, one function per schema
# ---------------------------------------------------------------------------


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def _require(rec: dict, key: str):
    if key not in rec:
        raise _RowError("missing_field", key, f"missing; the record has {sorted(rec)}")
    return rec[key]


def _text(value, name: str, *, optional: bool = False) -> str:
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise _RowError("wrong_type", name, f"expected a string, got {_type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. a JSON "\ud800" escape
        raise _RowError("undecodable_text", name, "contains text that is not valid Unicode (lone surrogate)") from None
    if not optional and not value.strip():
        raise _RowError("empty_text", name, "is empty")
    return value


def _messages(value, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise _RowError("wrong_type", name, f"expected a list of {{role, content}} messages, got {_type_name(value)}")
    if not value:
        raise _RowError("bad_messages", name, "is an empty message list")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise _RowError("bad_messages", where, f"expected a {{role, content}} object, got {_type_name(m)}")
        if "role" not in m:
            raise _RowError("bad_messages", f"{where}.role", "missing")
        role = m["role"]
        if role not in ROLES:
            raise _RowError("bad_role", f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        if "content" not in m:
            raise _RowError("bad_messages", f"{where}.content", "missing")
        out.append({"role": role, "content": _text(m["content"], f"{where}.content")})
    return out


def _check_prompt(prompt: list[dict], name: str) -> tuple[dict, ...]:
    for i, m in enumerate(prompt):
        if m["role"] == "system" and i > 0:
            raise _RowError("bad_role", f"{name}[{i}].role", "a system message may only come first")
    if not prompt or prompt[-1]["role"] != "user":
        got = prompt[-1]["role"] if prompt else "nothing"
        raise _RowError("bad_role", name, f"the prompt must end with a user turn, got {got}")
    return tuple(prompt)


def _split_conversations(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    """chosen = prefix + [assistant reply], rejected = the same prefix + [another reply]."""
    for msgs, name in ((chosen, "chosen"), (rejected, "rejected")):
        if msgs[-1]["role"] != "assistant":
            raise _RowError("bad_role", f"{name}[{len(msgs) - 1}].role",
                            f"the last message must be the assistant's response, got {msgs[-1]['role']!r}")
    if len(chosen) != len(rejected):
        raise _RowError("prefix_mismatch", "rejected",
                        f"has {len(rejected)} messages but chosen has {len(chosen)}; they must share all but the last")
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])):
        if a != b:
            raise _RowError("prefix_mismatch", f"rejected[{i}]",
                            f"differs from chosen[{i}]; both must share every message before the response")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _score(rec: dict, key: str) -> None:
    if key in rec and rec[key] is not None:
        v = rec[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _RowError("bad_score", key, f"expected a finite number, got {v!r}")


def _parse_single_turn(rec, question_key: str):
    """One user turn (+ optional system) and two string responses.
    generic: {"prompt", "chosen", "rejected", "system"?};
    Intel/orca_dpo_pairs: {"system", "question", "chosen", "rejected"}, all strings; system often ""."""
    system = _text(rec.get("system"), "system", optional=True)
    prompt = [{"role": "user", "content": _text(_require(rec, question_key), question_key)}]
    if system.strip():
        prompt.insert(0, {"role": "system", "content": system})
    return prompt, _text(_require(rec, "chosen"), "chosen"), _text(_require(rec, "rejected"), "rejected")


def _parse_ultrafeedback(rec):
    # {"prompt": str, "prompt_id", "chosen": [user, assistant], "rejected": [user, assistant],
    #  "messages", "score_chosen", "score_rejected", "source" (allenai's cleaned version)}
    prompt_text = _text(_require(rec, "prompt"), "prompt")
    chosen = _messages(_require(rec, "chosen"), "chosen")
    rejected = _messages(_require(rec, "rejected"), "rejected")
    _score(rec, "score_chosen")
    _score(rec, "score_rejected")
    prefix, c, r = _split_conversations(chosen, rejected)
    if not prefix:  # some derivatives keep only the assistant turn in chosen/rejected
        prefix = [{"role": "user", "content": prompt_text}]
    return prefix, c, r


def _parse_conversational(rec):
    # {"chosen": [..., assistant], "rejected": [..., assistant]} sharing a prefix, optionally
    # {"prompt": [messages]} in front of both (TRL's conversational preference format).
    prompt = _messages(rec["prompt"], "prompt") if rec.get("prompt") is not None else []
    chosen = _messages(_require(rec, "chosen"), "chosen")
    rejected = _messages(_require(rec, "rejected"), "rejected")
    prefix, c, r = _split_conversations(chosen, rejected)
    return prompt + prefix, c, r


_PARSERS = {
    "generic": lambda rec: _parse_single_turn(rec, "prompt"),
    "orca": lambda rec: _parse_single_turn(rec, "question"),
    "ultrafeedback": _parse_ultrafeedback,
    "conversational": _parse_conversational,
}


def detect_schema(rec) -> str | None:
    if not isinstance(rec, dict):
        return None
    if "question" in rec:
        return "orca"
    if isinstance(rec.get("chosen"), list):
        return "ultrafeedback" if isinstance(rec.get("prompt"), str) else "conversational"
    if "prompt" in rec or isinstance(rec.get("chosen"), str):
        return "generic"
    return None


def parse_record(rec, schema: str, origin: str, default_source: str) -> PreferenceExample:
    """Validate one record against `schema`; raises _RowError naming the field."""
    if not isinstance(rec, dict):
        raise _RowError("not_an_object", None, f"expected a JSON object, got {_type_name(rec)}")
    prompt, chosen, rejected = _PARSERS[schema](rec)
    prompt = _check_prompt(prompt, "prompt")
    if chosen == rejected:
        raise _RowError("identical_responses", "rejected", "is identical to chosen; the pair carries no preference")
    source = rec.get("source")
    if source is not None and not isinstance(source, str):
        raise _RowError("wrong_type", "source", f"expected a string, got {_type_name(source)}")
    return PreferenceExample(prompt, chosen, rejected, source or default_source, origin)


def read_preferences(paths, schema: str = "auto", on_error: str = "fail") -> tuple[list[PreferenceExample], ValidationReport]:
    """Read .jsonl / .json / .parquet files or directories of them.

    schema: "auto" detects it per file from its first valid record, or one of generic | orca |
    ultrafeedback | conversational for all files. on_error: "fail" validates every record
    and then raises DataError listing the bad ones; "skip" drops them, counting per reason.
    """
    if schema not in SCHEMAS:
        raise DataError(f"unknown schema {schema!r}; expected one of {', '.join(SCHEMAS)}")
    if on_error not in ("fail", "skip"):
        raise DataError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    report = ValidationReport()
    examples: list[PreferenceExample] = []
    for path in _list_files(paths):
        default_source = dataset_name(path)
        file_schema = None if schema == "auto" else schema
        info = {"schema": file_schema, "kept": 0, "dropped": 0}
        report.files[str(path)] = info
        for origin, rec in _iter_records(path):
            try:
                if isinstance(rec, _RowError):
                    raise rec
                # "auto": the first record that parses cleanly fixes the file's schema, so one
                # malformed first record cannot mislabel every good record after it.
                rec_schema = file_schema or detect_schema(rec)
                if rec_schema is None:
                    if not isinstance(rec, dict):
                        raise _RowError("not_an_object", None, f"expected a JSON object, got {_type_name(rec)}")
                    raise _RowError("unknown_schema", None,
                                    f"cannot tell the schema from keys {sorted(rec)}; expected prompt/chosen/rejected "
                                    "(generic), system/question/chosen/rejected (orca), or message lists in chosen/rejected")
                examples.append(parse_record(rec, rec_schema, origin, default_source))
                file_schema = info["schema"] = rec_schema
                info["kept"] += 1
            except _RowError as e:
                info["dropped"] += 1
                report.dropped[e.reason] += 1
                where = f"field '{e.field}': " if e.field else ""
                report.errors.append(f"{origin}: {where}{e.message}")
    report.kept = len(examples)
    if on_error == "fail" and not report.ok:
        raise DataError(f"{report.num_dropped} invalid record(s):\n{report.summary()}", report)
    return examples, report


# ---------------------------------------------------------------------------
# Splitting into sDPO steps
# ---------------------------------------------------------------------------


def _fractions(fractions, strategy: str) -> list[float]:
    if fractions is None:
        raise DataError(f"split strategy {strategy!r} needs fractions (a list summing to 1, or a number of chunks)")
    if isinstance(fractions, int) and not isinstance(fractions, bool):
        if fractions < 1:
            raise DataError(f"number of chunks must be >= 1, got {fractions}")
        return [1.0 / fractions] * fractions
    fr = [float(f) for f in fractions]
    if not fr or any(not (f > 0) for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise DataError(f"fractions must be positive and sum to 1, got {list(fractions)}")
    return fr


def _cut_points(n: int, fractions: list[float]) -> list[int]:
    """Boundaries round(n * cumulative fraction): each chunk is within one example of f_k * n."""
    cum = np.cumsum(fractions)
    points = [0] + [int(math.floor(n * c + 0.5)) for c in cum[:-1]] + [n]
    return points


def split_steps(datasets: list[list[PreferenceExample]], strategy: str, *, fractions=None, seed: int = 0,
                scores=None) -> list[list[PreferenceExample]]:
    """Cut the data into the sDPO steps D_1..D_T (every pair in exactly one step).

    natural      each dataset is one step, in the order given (the paper: orca, then UltraFeedback)
    all          one step with everything: plain DPO
    random       shuffle (seed), cut by `fractions`
    stratified   like random, but each source (PreferenceExample.source) is cut separately, so every
                 chunk holds round(f_k * n_source) +- 1 pairs of each source
    easy_to_hard sort by `scores` (aligned with the concatenated datasets; HIGHER = EASIER, e.g. the
                 initial model's gamma = log pi(y_w|x) - log pi(y_l|x)), cut by `fractions`, easiest first
    fractions: a list summing to 1, or an int k for k equal chunks. Within a chunk the pairs keep
    their input order (easy_to_hard: easiest first); batch_schedule shuffles them for training.
    """
    if strategy not in SPLIT_STRATEGIES:
        raise DataError(f"unknown split strategy {strategy!r}; expected one of {', '.join(SPLIT_STRATEGIES)}")
    datasets = [list(d) for d in datasets]
    pool = [ex for d in datasets for ex in d]
    if strategy == "natural":
        if any(not d for d in datasets):
            raise DataError("natural split: a dataset is empty, which would make an empty sDPO step")
        return datasets
    if strategy == "all":
        return [pool]
    fr = _fractions(fractions, strategy)
    n = len(pool)
    if strategy == "random":
        perm = np.random.default_rng(seed).permutation(n)
        pts = _cut_points(n, fr)
        chunks = [sorted(perm[pts[k]:pts[k + 1]].tolist()) for k in range(len(fr))]
    elif strategy == "stratified":
        rng = np.random.default_rng(seed)
        by_source: dict[str, list[int]] = {}
        for i, ex in enumerate(pool):
            by_source.setdefault(ex.source, []).append(i)
        chunks = [[] for _ in fr]
        for src in sorted(by_source):  # sorted: the result must not depend on dict order
            idx = np.array(by_source[src])[rng.permutation(len(by_source[src]))]
            pts = _cut_points(len(idx), fr)
            for k in range(len(fr)):
                chunks[k].extend(idx[pts[k]:pts[k + 1]].tolist())
        chunks = [sorted(c) for c in chunks]
    else:  # easy_to_hard
        if scores is None:
            raise DataError("easy_to_hard needs scores: one number per pair (higher = easier)")
        s = np.asarray(list(scores), dtype=np.float64)
        if s.shape != (n,):
            raise DataError(f"easy_to_hard: got {s.size} scores for {n} pairs")
        if not np.isfinite(s).all():
            raise DataError("easy_to_hard: scores must be finite")
        order = np.argsort(-s, kind="stable")  # ties keep input order
        pts = _cut_points(n, fr)
        chunks = [order[pts[k]:pts[k + 1]].tolist() for k in range(len(fr))]
    if any(not c for c in chunks):
        raise DataError(f"{strategy} split of {n} pairs by {fr} leaves an empty step")
    return [[pool[i] for i in c] for c in chunks]


# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response ids; end with EOS unless truncated
    rejected_ids: list[int]
    index: int  # position of the example in its step's list (stable id for caches)


def render_prompt(messages, tokenizer) -> str:
    """The prompt turns through the chat template, ending with the generation prompt."""
    return tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True)


def encode_prompt(messages, tokenizer) -> list[int]:
    """Chat template with the generation prompt; BOS exactly once at the front (if the tokenizer has one)."""
    ids = list(tokenizer.encode(render_prompt(messages, tokenizer), add_special_tokens=False))
    bos = tokenizer.bos_id
    if bos is not None:
        start = 0
        while start < len(ids) and ids[start] == bos:  # template already wrote <s> (maybe twice)
            start += 1
        ids = [bos] + ids[start:]
    return ids


def encode_response(text: str, tokenizer, prompt_text: str | None = None) -> tuple[list[int], bool]:
    """Response ids, then exactly one EOS; returns (ids, encoded_alone).

    With `prompt_text` (the rendered prompt), the response is encoded as its continuation:
    encode(prompt_text + text) minus the tokens of encode(prompt_text), used only when those
    are exactly its first tokens, i.e. no token spans the boundary. The ids are then the ones
    the model reads in the whole conversation: a SentencePiece tokenizer does not put its
    dummy-prefix "▁" in front of a response that follows "### Assistant:\n" or "<|assistant|>\n".
    When a token would span the boundary, the text is encoded on its own (encoded_alone=True),
    so the prompt's tokens never change."""
    eos = tokenizer.eos_id
    ids, alone = None, True
    if prompt_text is not None:
        head = tokenizer.encode(prompt_text, add_special_tokens=False)
        joint = tokenizer.encode(prompt_text + text, add_special_tokens=False)
        if len(joint) > len(head) and list(joint[: len(head)]) == list(head):
            ids, alone = list(joint[len(head):]), False
    if ids is None:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    while ids and ids[-1] == eos:  # the text already ended with the EOS token's text
        ids.pop()
    return ids + [eos], alone


def _truncate_prompt(ids: list[int], max_prompt_length: int, truncation: str, bos) -> list[int]:
    if truncation == "keep_start":
        return ids[:max_prompt_length]
    if bos is not None and ids and ids[0] == bos:  # keep_end, but BOS stays in front
        return [bos] + ids[len(ids) - (max_prompt_length - 1):] if max_prompt_length > 1 else [bos]
    return ids[len(ids) - max_prompt_length:]


def tokenize_pairs(examples, tokenizer, *, max_length: int = 1024, max_prompt_length: int = 512,
                   truncation: str = "keep_end") -> tuple[list[TokenizedPair], dict]:
    """Tokenize pairs with a boundary-safe split and the usual DPO truncation.

    prompt = encode(chat_template(prompt, add_generation_prompt=True)) with one BOS;
    response = its tokens as a continuation of the prompt text + [EOS], never a token that spans
    the boundary (see encode_response; `responses_encoded_alone` counts the fallbacks).
    If len(prompt) + max(len(chosen), len(rejected)) > max_length:
      1. a prompt longer than max_prompt_length is cut to it (keep_end keeps its last tokens and BOS;
         keep_start its first tokens);
      2. each response is cut to max_length - len(prompt). A cut response loses its EOS: the model
         must not learn to stop where the cut happened to fall.
    Dropped (counted, never trained on): pairs with no room left for a response token, and pairs
    whose responses become identical after the cut (their DPO gradient is exactly zero).
    Returns (pairs, stats); stats counts pairs_in, pairs_kept, truncated_prompts, truncated_chosen,
    truncated_rejected, dropped_no_room, dropped_identical_after_truncation, responses_encoded_alone,
    and dropped_indices.
    """
    if truncation not in ("keep_end", "keep_start"):
        raise DataError(f"truncation must be 'keep_end' or 'keep_start', got {truncation!r}")
    if max_length < 2 or not (1 <= max_prompt_length <= max_length):
        raise DataError(f"need max_length >= 2 and 1 <= max_prompt_length <= max_length, got "
                        f"max_length={max_length}, max_prompt_length={max_prompt_length}")
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no EOS token; responses must end with one")
    stats = Counter(pairs_in=0, pairs_kept=0, truncated_prompts=0, truncated_chosen=0, truncated_rejected=0,
                    dropped_no_room=0, dropped_identical_after_truncation=0, responses_encoded_alone=0)
    dropped: list[int] = []
    pairs: list[TokenizedPair] = []
    prompt_cache: dict[tuple, tuple[str, list[int]]] = {}  # UltraFeedback-style data repeats prompts
    for index, ex in enumerate(examples):
        stats["pairs_in"] += 1
        key = tuple((m["role"], m["content"]) for m in ex.prompt)
        if key not in prompt_cache:
            prompt_cache[key] = (render_prompt(ex.prompt, tokenizer), encode_prompt(ex.prompt, tokenizer))
        text, p = prompt_cache[key]
        c, c_alone = encode_response(ex.chosen, tokenizer, text)
        r, r_alone = encode_response(ex.rejected, tokenizer, text)
        stats["responses_encoded_alone"] += c_alone + r_alone
        if len(p) + max(len(c), len(r)) > max_length:
            if len(p) > max_prompt_length:
                p = _truncate_prompt(p, max_prompt_length, truncation, tokenizer.bos_id)
                stats["truncated_prompts"] += 1
            room = max_length - len(p)
            if room < 1:
                stats["dropped_no_room"] += 1
                dropped.append(index)
                continue
            if len(c) > room:
                c = c[:room]
                stats["truncated_chosen"] += 1
            if len(r) > room:
                r = r[:room]
                stats["truncated_rejected"] += 1
            if c == r:
                stats["dropped_identical_after_truncation"] += 1
                dropped.append(index)
                continue
        pairs.append(TokenizedPair(list(p), c, r, index))
        stats["pairs_kept"] += 1
    out = dict(stats)
    out["dropped_indices"] = dropped
    return pairs, out


# ---------------------------------------------------------------------------
# Collation and batch schedule
# ---------------------------------------------------------------------------


def collate(pairs: Sequence[TokenizedPair], *, pad_id: int, ignore_index: int = IGNORE_INDEX,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """B pairs -> one right-padded [2B, T] batch: rows 0..B-1 chosen, B..2B-1 rejected.

    labels equal input_ids on response tokens (EOS included) and ignore_index on prompt and
    padding; they are NOT shifted (logprobs.py scores labels[t+1] with the logits at t).
    position_ids count from 0 per row and are 0 on padding.
    """
    if not pairs:
        raise DataError("collate got an empty batch")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    T = max(len(a) + len(b) for a, b in rows)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = torch.full((n, T), pad_id, dtype=torch.long)
    labels = torch.full((n, T), ignore_index, dtype=torch.long)
    attention_mask = torch.zeros((n, T), dtype=torch.long)
    position_ids = torch.zeros((n, T), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        lp, L = len(prompt), len(prompt) + len(response)
        input_ids[i, :lp] = torch.tensor(prompt, dtype=torch.long)
        input_ids[i, lp:L] = torch.tensor(response, dtype=torch.long)
        labels[i, lp:L] = input_ids[i, lp:L]
        attention_mask[i, :L] = 1
        position_ids[i, :L] = torch.arange(L)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
        "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
    }


def batch_schedule(num_examples: int, global_batch_size: int, *, seed: int, epoch: int = 0, rank: int = 0,
                   world_size: int = 1, lengths=None, group_by_length: bool = False,
                   drop_last: bool = True) -> list[list[int]]:
    """Example indices for each optimizer step, this rank's share.

    The global batches depend only on (num_examples, global_batch_size, seed, epoch, lengths,
    group_by_length): a shuffled permutation cut into batches of global_batch_size. Rank r takes
    the slice [r*G/W, (r+1)*G/W) of each, so ranks are disjoint and their union is the same global
    batch whatever world_size. group_by_length: within mega-chunks of 16 global batches (of the
    shuffled order) pairs are sorted by length, longest first, then the batch order is shuffled —
    less padding, still random. drop_last=False keeps a final short batch, split over ranks as
    evenly as possible (a rank may then get fewer, even zero, indices).
    """
    if num_examples < 0 or global_batch_size < 1:
        raise DataError(f"need num_examples >= 0 and global_batch_size >= 1, got {num_examples}, {global_batch_size}")
    if world_size < 1 or not (0 <= rank < world_size):
        raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if global_batch_size % world_size:
        raise DataError(f"global_batch_size {global_batch_size} is not divisible by world_size {world_size}; "
                        "every rank must get the same number of pairs")
    if seed < 0 or epoch < 0:
        raise DataError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_examples)
    if group_by_length:
        if lengths is None or len(lengths) != num_examples:
            raise DataError(f"group_by_length needs one length per example ({num_examples})")
        lens = np.asarray(lengths)
        mega = global_batch_size * 16
        parts = []
        for s in range(0, num_examples, mega):
            chunk = order[s:s + mega]
            parts.append(chunk[np.argsort(-lens[chunk], kind="stable")])
        order = np.concatenate(parts) if parts else order
    batches = [order[s:s + global_batch_size] for s in range(0, num_examples, global_batch_size)]
    if batches and len(batches[-1]) < global_batch_size and drop_last:
        batches.pop()
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    per_rank = global_batch_size // world_size
    out = []
    for b in batches:
        if len(b) == global_batch_size:
            out.append(b[rank * per_rank:(rank + 1) * per_rank].tolist())
        else:
            out.append(np.array_split(b, world_size)[rank].tolist())
    return out


# ---------------------------------------------------------------------------
# python -m sdpo.data check FILE...
# ---------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdpo.data", description="Preference data tools.")
    sub = ap.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate preference files and print a summary")
    check.add_argument("paths", nargs="+", help=".jsonl / .json / .parquet files or directories")
    check.add_argument("--schema", default="auto", choices=SCHEMAS)
    check.add_argument("--max-errors", type=int, default=50, help="error lines to print")
    check.add_argument("--tokenizer", help="also tokenize with this tokenizer directory and report lengths")
    check.add_argument("--max-length", type=int, default=1024)
    check.add_argument("--max-prompt-length", type=int, default=512)
    args = ap.parse_args(list(argv) if argv is not None else None)
    try:
        examples, report = read_preferences(args.paths, schema=args.schema, on_error="skip")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary(max_errors=args.max_errors))
    sources = Counter(ex.source for ex in examples)
    print("sources: " + ", ".join(f"{s}={n}" for s, n in sorted(sources.items())))
    if args.tokenizer and examples:
        from sdpo.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        pairs, stats = tokenize_pairs(examples, tok, max_length=args.max_length,
                                      max_prompt_length=args.max_prompt_length)
        lens = np.array([len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs] or [0])
        print("tokens: " + ", ".join(f"{k}={v}" for k, v in stats.items() if k != "dropped_indices"))
        print(f"pair length (prompt + longer response): mean {lens.mean():.1f}, max {lens.max()}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
