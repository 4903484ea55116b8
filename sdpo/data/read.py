"""Preference data: read and validate files, split them into sDPO steps.

    files ──read_preferences──> [PreferenceExample] ──split_steps──> D_1 .. D_T

Tokenization is in sdpo/data/pairs.py, collation and batching in sdpo/data/packing.py.

Every record is checked before any model work; a bad record is reported as
``file:line: field 'x': what was expected`` and either stops the run
(``on_error="fail"``) or is dropped and counted (``"skip"``).

The ``python -m sdpo.data check`` command line is in sdpo/data/check.py.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

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


class RowError(Exception):
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


def iter_records(path: Path) -> Iterator[tuple[str, object]]:
    """Yields (origin, record) or (origin, RowError) for records that cannot even be parsed, of a
    .jsonl, .json (a list, or an object with a "data" or "rows" list) or .parquet file; raises
    DataError for a file that cannot be read as a whole. The one record reader (sdpo.eval.h4 uses it too)."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                origin = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield origin, RowError("undecodable_text", None, f"not valid UTF-8 at byte column {e.start + 1}")
                    continue
                if not line.strip():
                    continue  # blank lines (e.g. a trailing newline) are not records
                try:
                    yield origin, json.loads(line)
                except json.JSONDecodeError as e:
                    yield origin, RowError("invalid_json", None, f"invalid JSON: {e.msg} at column {e.colno}")
                except RecursionError:
                    yield origin, RowError("invalid_json", None, "JSON nested too deeply to parse")
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
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to parse; expected a list of flat records") from None
        if isinstance(data, dict) and isinstance(data.get("data", data.get("rows")), list):
            data = data.get("data", data.get("rows"))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {_type_name(data)}")
        for i, rec in enumerate(data):
            yield f"{path}:row {i}", rec
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's ArrowInvalid / OSError for a file that is not Parquet
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        for i, rec in enumerate(rows):
            yield f"{path}:row {i}", rec


# ---------------------------------------------------------------------------
# Record validation, one function per schema
# ---------------------------------------------------------------------------


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def _require(rec: dict, key: str):
    if key not in rec:
        raise RowError("missing_field", key, f"missing; the record has {sorted(rec)}")
    return rec[key]


def _text(value, name: str, *, optional: bool = False) -> str:
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise RowError("wrong_type", name, f"expected a string, got {_type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. a JSON "\ud800" escape
        raise RowError("undecodable_text", name, "contains text that is not valid Unicode (lone surrogate)") from None
    if not optional and not value.strip():
        raise RowError("empty_text", name, "is empty")
    return value


def _messages(value, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise RowError("wrong_type", name, f"expected a list of {{role, content}} messages, got {_type_name(value)}")
    if not value:
        raise RowError("bad_messages", name, "is an empty message list")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise RowError("bad_messages", where, f"expected a {{role, content}} object, got {_type_name(m)}")
        if "role" not in m:
            raise RowError("bad_messages", f"{where}.role", "missing")
        role = m["role"]
        if role not in ROLES:
            raise RowError("bad_role", f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        if "content" not in m:
            raise RowError("bad_messages", f"{where}.content", "missing")
        out.append({"role": role, "content": _text(m["content"], f"{where}.content")})
    return out


def _check_prompt(prompt: list[dict], name: str) -> tuple[dict, ...]:
    for i, m in enumerate(prompt):
        if m["role"] == "system" and i > 0:
            raise RowError("bad_role", f"{name}[{i}].role", "a system message may only come first")
    if not prompt or prompt[-1]["role"] != "user":
        got = prompt[-1]["role"] if prompt else "nothing"
        raise RowError("bad_role", name, f"the prompt must end with a user turn, got {got}")
    return tuple(prompt)


def _split_conversations(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    """chosen = prefix + [assistant reply], rejected = the same prefix + [another reply]."""
    for msgs, name in ((chosen, "chosen"), (rejected, "rejected")):
        if msgs[-1]["role"] != "assistant":
            raise RowError("bad_role", f"{name}[{len(msgs) - 1}].role",
                            f"the last message must be the assistant's response, got {msgs[-1]['role']!r}")
    if len(chosen) != len(rejected):
        raise RowError("prefix_mismatch", "rejected",
                        f"has {len(rejected)} messages but chosen has {len(chosen)}; they must share all but the last")
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])):
        if a != b:
            raise RowError("prefix_mismatch", f"rejected[{i}]",
                            f"differs from chosen[{i}]; both must share every message before the response")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _score(rec: dict, key: str) -> None:
    if key in rec and rec[key] is not None:
        v = rec[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RowError("bad_score", key, f"expected a finite number, got {v!r}")


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
    """Validate one record against `schema`; raises RowError naming the field."""
    if not isinstance(rec, dict):
        raise RowError("not_an_object", None, f"expected a JSON object, got {_type_name(rec)}")
    prompt, chosen, rejected = _PARSERS[schema](rec)
    prompt = _check_prompt(prompt, "prompt")
    if chosen == rejected:
        raise RowError("identical_responses", "rejected", "is identical to chosen; the pair carries no preference")
    source = rec.get("source")
    if source is not None and not isinstance(source, str):
        raise RowError("wrong_type", "source", f"expected a string, got {_type_name(source)}")
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
        for origin, rec in iter_records(path):
            try:
                if isinstance(rec, RowError):
                    raise rec
                # "auto": the first record that parses cleanly fixes the file's schema, so one
                # malformed first record cannot mislabel every good record after it.
                rec_schema = file_schema or detect_schema(rec)
                if rec_schema is None:
                    if not isinstance(rec, dict):
                        raise RowError("not_an_object", None, f"expected a JSON object, got {_type_name(rec)}")
                    raise RowError("unknown_schema", None,
                                    f"cannot tell the schema from keys {sorted(rec)}; expected prompt/chosen/rejected "
                                    "(generic), system/question/chosen/rejected (orca), or message lists in chosen/rejected")
                examples.append(parse_record(rec, rec_schema, origin, default_source))
                file_schema = info["schema"] = rec_schema
                info["kept"] += 1
            except RowError as e:
                info["dropped"] += 1
                report.dropped[e.reason] += 1
                where = f"field '{e.field}': " if e.field else ""
                report.errors.append(f"{origin}: {where}{e.message}")
        if info["kept"] == 0 and info["dropped"] == 0:
            raise DataError(f"{path}: holds no records; expected one preference pair per line (.jsonl), "
                            "a JSON list (.json) or table rows (.parquet)", report)
        if info["kept"] == 0 and on_error == "skip":
            raise DataError(f"{path}: none of its {info['dropped']} record(s) is valid:\n{report.summary()}", report)
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
    their input order (easy_to_hard: easiest first); sdpo.data.packing.batch_schedule shuffles them for training.
    """
    if strategy not in SPLIT_STRATEGIES:
        raise DataError(f"unknown split strategy {strategy!r}; expected one of {', '.join(SPLIT_STRATEGIES)}")
    datasets = [list(d) for d in datasets]
    pool = [ex for d in datasets for ex in d]
    if strategy == "natural":
        if any(not d for d in datasets):
            empty = [i + 1 for i, d in enumerate(datasets) if not d]
            raise DataError(f"natural split: dataset {empty[0]} of {len(datasets)} (data.datasets[{empty[0] - 1}]) "
                            "is empty, which would make an empty sDPO step")
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
