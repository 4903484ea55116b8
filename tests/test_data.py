import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sdpo.data.check import main
from sdpo.data.read import (
    DataError,
    PreferenceExample,
    read_preferences,
    split_steps,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "data"


def example(prompt="hi", chosen="Abc", rejected="Abd", source="s", origin="x:1", system=None):
    msgs = ({"role": "user", "content": prompt},)
    if system:
        msgs = ({"role": "system", "content": system},) + msgs
    return PreferenceExample(msgs, chosen, rejected, source, origin)



# ---------------------------------------------------------------------------
# Readers: each schema in its exact HF layout
# ---------------------------------------------------------------------------


def test_orca_schema():
    path = FIXTURES / "orca_dpo_pairs" / "orca_rlhf.jsonl"
    exs, report = read_preferences(path)
    assert report.files[str(path)]["schema"] == "orca"
    assert [e.origin for e in exs] == [f"{path}:1", f"{path}:2", f"{path}:4"]  # line 3 is blank
    assert exs[0].prompt == ({"role": "user", "content": 'Translate "Guten Morgen" to English.'},)  # empty system dropped
    assert exs[1].prompt[0]["role"] == "system" and exs[1].prompt[0]["content"].startswith("You are an AI")
    assert exs[1].prompt[1] == {"role": "user", "content": "What is the capital of France?\nOptions:\n- Paris\n- Lyon"}
    assert (exs[1].chosen, exs[1].rejected) == ("The capital of France is Paris.", "The capital of France is Lyon.")
    assert {e.source for e in exs} == {"orca_rlhf"}
    assert report.kept == 3 and report.ok


def test_ultrafeedback_schema():
    path = FIXTURES / "ultrafeedback_binarized_cleaned" / "train_prefs.jsonl"
    exs, report = read_preferences(path)
    assert report.files[str(path)]["schema"] == "ultrafeedback"
    assert [e.source for e in exs] == ["evol_instruct", "flan_v2_niv2", "evol_instruct"]
    assert exs[0].prompt == ({"role": "user", "content": "How many legs does a spider have?"},)
    assert (exs[0].chosen, exs[0].rejected) == ("A spider has eight legs.", "A spider has six legs.")
    assert [m["role"] for m in exs[2].prompt] == ["system", "user"]
    assert exs[1].origin == f"{path}:2"


def test_h4_ultrafeedback_without_source_column_uses_dataset_name():
    exs, _ = read_preferences(FIXTURES / "h4_test_prefs.jsonl")
    assert exs[0].source == "h4_test_prefs"
    assert exs[0].chosen == "Red."


def test_split_named_file_takes_dataset_name_from_directory(tmp_path):
    d = tmp_path / "my_dataset" / "data"
    d.mkdir(parents=True)
    (d / "train-00000-of-00001.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    exs, _ = read_preferences(d)
    assert exs[0].source == "my_dataset"


def test_generic_json_list():
    path = FIXTURES / "generic.json"
    exs, report = read_preferences(path)
    assert report.files[str(path)]["schema"] == "generic"
    assert exs[0].origin == f"{path}:row 0" and exs[1].origin == f"{path}:row 1"
    assert exs[0].prompt == ({"role": "user", "content": "2+2=?"},)
    assert exs[1].prompt == ({"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say yes."})


def test_conversational_shared_prefix():
    exs, report = read_preferences(FIXTURES / "conversational.jsonl")
    assert [m["content"] for m in exs[0].prompt] == ["Hi", "Hello!", "What is 3*3?"]
    assert [m["role"] for m in exs[0].prompt] == ["user", "assistant", "user"]
    assert (exs[0].chosen, exs[0].rejected) == ("9", "6")
    assert exs[1].prompt == ({"role": "user", "content": "Spell 'dog'."},)  # TRL-style prompt list
    assert (exs[1].chosen, exs[1].rejected) == ("d-o-g", "d-o-t")
    assert report.files[str(FIXTURES / "conversational.jsonl")]["schema"] == "conversational"


def test_directory_detects_each_file():
    exs, report = read_preferences(FIXTURES)
    schemas = {Path(p).name: info["schema"] for p, info in report.files.items()}
    assert schemas == {"conversational.jsonl": "conversational", "generic.json": "generic",
                       "h4_test_prefs.jsonl": "ultrafeedback", "orca_rlhf.jsonl": "orca",
                       "train_prefs.jsonl": "ultrafeedback"}
    assert len(exs) == 2 + 2 + 1 + 3 + 3


def test_schema_override_applies_to_every_file():
    with pytest.raises(DataError, match=r"orca_rlhf.jsonl:1: field 'prompt': missing"):
        read_preferences(FIXTURES / "orca_dpo_pairs", schema="generic")


def test_parquet_without_pyarrow_gives_clear_message(tmp_path, monkeypatch):
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed (requirements.txt has it)
    p = tmp_path / "train.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"train.parquet: reading .parquet files needs pyarrow"):
        read_preferences(p)


def test_parquet_roundtrip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(l) for l in (FIXTURES / "ultrafeedback_binarized_cleaned" / "train_prefs.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train_prefs-00000-of-00001.parquet")
    exs, _ = read_preferences(tmp_path)
    assert [e.chosen for e in exs] == ["A spider has eight legs.", "tac", "Hi!"]
    assert exs[1].origin.endswith(":row 1")


# ---------------------------------------------------------------------------
# Validation: every malformed input gives its own error with file, line and field
# ---------------------------------------------------------------------------

GOOD = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
ORCA_GOOD = '{"system": "", "question": "q", "chosen": "a", "rejected": "b"}'
UF = ('{{"prompt": "q", "chosen": [{{"role": "user", "content": "q"}}, {{"role": "assistant", "content": {c}}}], '
      '"rejected": [{{"role": "user", "content": "q"}}, {{"role": "assistant", "content": "b"}}]{extra}}}')
UF_GOOD = UF.format(c='"a"', extra="")

# (first line that fixes the schema, bad second line, reason, text the error must contain)
MALFORMED = [
    ("invalid_json", GOOD, '{"prompt": "p", "chosen": "a", "rejected": }', "invalid JSON"),
    ("not_an_object", GOOD, '["p", "a", "b"]', "expected a JSON object, got list"),
    ("missing_chosen", GOOD, '{"prompt": "p", "rejected": "b"}', "field 'chosen': missing"),
    ("missing_rejected", ORCA_GOOD, '{"system": "", "question": "q", "chosen": "a"}', "field 'rejected': missing"),
    ("missing_question", ORCA_GOOD, '{"system": "", "chosen": "a", "rejected": "b"}', "field 'question': missing"),
    ("chosen_not_string", GOOD, '{"prompt": "p", "chosen": 3, "rejected": "b"}', "field 'chosen': expected a string, got int"),
    ("null_prompt", GOOD, '{"prompt": null, "chosen": "a", "rejected": "b"}', "field 'prompt': expected a string, got null"),
    ("system_not_string", ORCA_GOOD, '{"system": ["x"], "question": "q", "chosen": "a", "rejected": "b"}',
     "field 'system': expected a string, got list"),
    ("empty_prompt", GOOD, '{"prompt": "  \\n", "chosen": "a", "rejected": "b"}', "field 'prompt': is empty"),
    ("empty_rejected", GOOD, '{"prompt": "p", "chosen": "a", "rejected": ""}', "field 'rejected': is empty"),
    ("identical", GOOD, '{"prompt": "p", "chosen": "same", "rejected": "same"}', "field 'rejected': is identical to chosen"),
    ("lone_surrogate", GOOD, '{"prompt": "p", "chosen": "a\\ud800", "rejected": "b"}', "field 'chosen': contains text that is not valid Unicode"),
    ("messages_not_list", UF_GOOD, '{"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}',
     "field 'chosen': expected a list of {role, content} messages, got str"),
    ("message_not_object", UF_GOOD, '{"prompt": "q", "chosen": ["q", "a"], "rejected": [{"role": "assistant", "content": "b"}]}',
     "field 'chosen[0]': expected a {role, content} object, got str"),
    ("message_missing_content", UF_GOOD, UF.format(c='"a"', extra="").replace('"role": "user", "content": "q"', '"role": "user"', 1),
     "field 'chosen[0].content': missing"),
    ("bad_role", UF_GOOD, UF_GOOD.replace('"role": "assistant", "content": "b"', '"role": "bot", "content": "b"'),
     "field 'rejected[1].role': expected one of system, user, assistant, got 'bot'"),
    ("last_not_assistant", UF_GOOD, UF_GOOD.replace('"role": "assistant", "content": "a"', '"role": "user", "content": "a"'),
     "field 'chosen[1].role': the last message must be the assistant's response, got 'user'"),
    ("prefix_mismatch", UF_GOOD, UF_GOOD.replace('[{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]',
                                                 '[{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]'),
     "field 'rejected[0]': differs from chosen[0]"),
    ("content_not_string", UF_GOOD, UF.format(c="42", extra=""), "field 'chosen[1].content': expected a string, got int"),
    ("bad_score", UF_GOOD, UF.format(c='"a"', extra=', "score_chosen": "high"'), "field 'score_chosen': expected a finite number"),
    ("source_not_string", UF_GOOD, UF.format(c='"a"', extra=', "source": 7'), "field 'source': expected a string, got int"),
    ("system_not_first", '{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}',
     '{"prompt": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], '
     '"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}',
     "field 'prompt[1].role': a system message may only come first"),
    ("prompt_ends_with_assistant", '{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}',
     '{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], '
     '"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}',
     "field 'prompt': the prompt must end with a user turn, got assistant"),
]


@pytest.mark.parametrize("name,first,bad,expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_record_names_file_line_and_field(tmp_path, name, first, bad, expected):
    path = tmp_path / f"{name}.jsonl"
    path.write_text(first + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_preferences(path)
    errors = err.value.report.errors
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}:2: ")
    assert expected in errors[0]


def test_malformed_cases_are_distinct():
    assert len(MALFORMED) >= 15
    assert len({m[3] for m in MALFORMED}) == len(MALFORMED)


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "p\xff", "chosen": "a", "rejected": "b"}\n')
    _, report = read_preferences(path, on_error="skip")
    assert report.errors == [f"{path}:2: not valid UTF-8 at byte column 14"]
    assert report.dropped == {"undecodable_text": 1}


def test_unknown_schema_record(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"input": "p", "output": "a"}\n')
    # every record invalid: even on_error="skip" fails, naming the file (nothing would be left of it)
    with pytest.raises(DataError, match=r"x\.jsonl: none of its 1 record\(s\) is valid") as e:
        read_preferences(path, on_error="skip")
    report = e.value.report
    assert report.dropped == {"unknown_schema": 1}
    assert "cannot tell the schema from keys ['input', 'output']" in report.errors[0]


def test_file_level_errors(tmp_path):
    (tmp_path / "obj.json").write_text('{"prompt": "p"}')
    with pytest.raises(DataError, match=r"obj.json: expected a JSON list of records, got dict"):
        read_preferences(tmp_path / "obj.json")
    (tmp_path / "broken.json").write_text('[\n{"prompt": "p",\n]')
    with pytest.raises(DataError, match=r"broken.json:3: invalid JSON"):
        read_preferences(tmp_path / "broken.json")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"unsupported file type '.csv'"):
        read_preferences(tmp_path / "x.csv")
    with pytest.raises(DataError, match=r"nope.jsonl: no such file"):
        read_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unknown schema 'alpaca'"):
        read_preferences(FIXTURES, schema="alpaca")
    with pytest.raises(DataError, match="on_error"):
        read_preferences(FIXTURES, on_error="ignore")


def test_skip_keeps_every_good_record_and_counts_reasons(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"prompt": f"p{i}", "chosen": f"a{i}", "rejected": f"b{i}"}) for i in range(5)]
    lines = [good[0], MALFORMED[0][2], good[1], MALFORMED[2][2], MALFORMED[5][2], good[2], good[3],
             MALFORMED[10][2], good[4]]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="4 invalid record"):
        read_preferences(path)
    exs, report = read_preferences(path, on_error="skip")
    assert [e.prompt[0]["content"] for e in exs] == [f"p{i}" for i in range(5)]
    assert [e.origin for e in exs] == [f"{path}:{n}" for n in (1, 3, 6, 7, 9)]
    assert report.kept == 5 and report.num_dropped == 4
    assert report.dropped == {"invalid_json": 1, "missing_field": 1, "wrong_type": 1, "identical_responses": 1}
    summary = report.summary()
    assert "kept 5, dropped 4" in summary and f"{path}:2: invalid JSON" in summary


def test_check_command(tmp_path, capsys):
    assert main(["check", str(FIXTURES)]) == 0
    out = capsys.readouterr().out
    assert "total: kept 11, dropped 0" in out and "evol_instruct=2" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + "\n" + MALFORMED[5][2] + "\n")
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:2: field 'chosen': expected a string, got int" in out
    assert main(["check", str(tmp_path / "missing.jsonl")]) == 2


def test_check_module_entry_point(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + "\n{oops\n")
    proc = subprocess.run([sys.executable, "-m", "sdpo.data", "check", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{bad}:2: invalid JSON" in proc.stdout


# ---------------------------------------------------------------------------
# sDPO step splits
# ---------------------------------------------------------------------------


def _pool(counts: dict[str, int]):
    return [example(prompt=f"{s}{i}", source=s, origin=f"{s}:{i}") for s, n in counts.items() for i in range(n)]


def _check_partition(chunks, pool):
    flat = [e.origin for c in chunks for e in c]
    assert len(flat) == len(set(flat)) == len(pool)
    assert set(flat) == {e.origin for e in pool}


def test_natural_and_all():
    d1, d2 = _pool({"orca": 5}), _pool({"uf": 7})
    steps = split_steps([d1, d2], "natural")
    assert steps == [d1, d2]
    assert split_steps([d1, d2], "all") == [d1 + d2]
    with pytest.raises(DataError, match="empty"):
        split_steps([d1, []], "natural")


def test_random_split():
    pool = _pool({"a": 50, "b": 47})
    chunks = split_steps([pool], "random", fractions=[0.3, 0.7], seed=4)
    _check_partition(chunks, pool)
    assert [len(c) for c in chunks] == [29, 68]  # round(0.3 * 97) = 29
    assert chunks == split_steps([pool], "random", fractions=[0.3, 0.7], seed=4)
    assert chunks != split_steps([pool], "random", fractions=[0.3, 0.7], seed=5)
    assert [len(c) for c in split_steps([pool], "random", fractions=3)] == [32, 33, 32]


def test_stratified_keeps_source_shares_within_one():
    counts = {"evol": 61, "flan": 29, "sharegpt": 13, "ultrachat": 3}
    pool = _pool(counts)
    fr = [1 / 6, 5 / 6]  # the paper's 16.67% / 83.33% ablation
    for seed in range(5):
        chunks = split_steps([pool], "stratified", fractions=fr, seed=seed)
        _check_partition(chunks, pool)
        for k, chunk in enumerate(chunks):
            got = Counter(e.source for e in chunk)
            for s, n in counts.items():
                assert abs(got[s] - fr[k] * n) <= 1, (seed, k, s, got[s])
    assert split_steps([pool], "stratified", fractions=fr, seed=1) != split_steps([pool], "stratified", fractions=fr, seed=2)


def test_easy_to_hard():
    pool = _pool({"x": 6})
    scores = [0.5, 3.0, -1.0, 3.0, 2.0, -4.0]  # higher = easier
    chunks = split_steps([pool[:3], pool[3:]], "easy_to_hard", fractions=[0.5, 0.5], scores=scores)
    assert [[e.origin for e in c] for c in chunks] == [["x:1", "x:3", "x:4"], ["x:0", "x:2", "x:5"]]
    with pytest.raises(DataError, match="needs scores"):
        split_steps([pool], "easy_to_hard", fractions=2)
    with pytest.raises(DataError, match="got 2 scores for 6 pairs"):
        split_steps([pool], "easy_to_hard", fractions=2, scores=[1.0, 2.0])


def test_split_errors():
    pool = _pool({"a": 4})
    with pytest.raises(DataError, match="needs fractions"):
        split_steps([pool], "random")
    with pytest.raises(DataError, match="sum to 1"):
        split_steps([pool], "random", fractions=[0.5, 0.6])
    with pytest.raises(DataError, match="unknown split strategy"):
        split_steps([pool], "curriculum")
    with pytest.raises(DataError, match="empty step"):
        split_steps([pool], "random", fractions=[0.01, 0.99])


# ---------------------------------------------------------------------------
# The demo data and tokenizer under data/
# ---------------------------------------------------------------------------

DEMO_FILES = ["demo/orca_pairs/train.jsonl", "demo/orca_pairs/test.jsonl", "demo/ultrafeedback/train_prefs.jsonl",
              "demo/ultrafeedback/test_prefs.jsonl", "demo/sft/train.jsonl", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
              "tokenizer/special_tokens_map.json"]


def test_demo_generator_reproduces_committed_files(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "data" / "make_demo.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for rel in DEMO_FILES:
        assert (tmp_path / rel).read_bytes() == (ROOT / "data" / rel).read_bytes(), rel
    assert sum((ROOT / "data" / rel).stat().st_size for rel in DEMO_FILES) < 3 * 2**20


def test_demo_data_reads_cleanly():
    d1_train, r1 = read_preferences(ROOT / "data/demo/orca_pairs/train.jsonl")
    d1_test, _ = read_preferences(ROOT / "data/demo/orca_pairs/test.jsonl")
    d2_train, r2 = read_preferences(ROOT / "data/demo/ultrafeedback/train_prefs.jsonl")
    d2_test, _ = read_preferences(ROOT / "data/demo/ultrafeedback/test_prefs.jsonl")
    assert (len(d1_train), len(d1_test), len(d2_train), len(d2_test)) == (600, 100, 1500, 200)
    assert [i["schema"] for i in r1.files.values()] == ["orca"] and [i["schema"] for i in r2.files.values()] == ["ultrafeedback"]
    assert {e.source for e in d1_train} == {"orca_pairs"}
    shares = Counter(e.source for e in d2_train)
    assert set(shares) == {"reverse", "sort", "add"} and min(shares.values()) > 150
    # held out: no string-task prompt of a test split occurs in its train split (sums repeat by design)
    for train, test in ((d1_train, d1_test), (d2_train, d2_test)):
        train_prompts = {e.prompt[-1]["content"] for e in train}
        assert not {e.prompt[-1]["content"] for e in test if e.source != "add"} & train_prompts
    # chosen is the right answer
    for e in d2_train:
        task, arg = e.prompt[-1]["content"].split(": ")
        if task == "add":
            want = str(sum(int(x) for x in arg.split("+")))
        else:
            want = {"reverse": arg[::-1], "sort": "".join(sorted(arg))}[task]
        assert e.chosen == want != e.rejected


def test_a_malformed_first_record_does_not_decide_the_files_schema(tmp_path):
    good = {"system": "", "question": "q{}", "chosen": "a", "rejected": "b"}
    rows = [{"system": "", "chosen": "a", "rejected": "b"}] + [dict(good, question=f"q{i}") for i in range(3)]
    p = tmp_path / "orca_rlhf.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exs, report = read_preferences(p, on_error="skip")
    assert [e.prompt[-1]["content"] for e in exs] == ["q0", "q1", "q2"]
    assert report.files[str(p)]["schema"] == "orca"
    assert len(report.errors) == 1 and report.errors[0].startswith(f"{p}:1:")


def test_dataset_name_does_not_follow_symlinks_into_the_hf_cache(tmp_path):
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    blob.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    link = tmp_path / "snapshots" / "rev" / "my_dataset" / "train_prefs.jsonl"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    (ex,), _ = read_preferences(link)
    assert ex.source == "my_dataset"


# ---------------------------------------------------------------------------
# Hostile files: each one a DataError naming the file (and line), never a raw exception
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("on_error", ["fail", "skip"])
@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("empty.json", "[]")])
def test_a_file_without_records_is_an_error_naming_it(tmp_path, on_error, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=rf"{name}: holds no records"):
        read_preferences(tmp_path / name, on_error=on_error)


def test_check_command_fails_on_an_empty_file(tmp_path, capsys):
    (tmp_path / "good.jsonl").write_text(GOOD + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["check", str(tmp_path / "good.jsonl"), str(tmp_path / "empty.jsonl")]) == 2
    assert f"{tmp_path / 'empty.jsonl'}: holds no records" in capsys.readouterr().err


def test_deeply_nested_json_names_file_and_line(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.jsonl").write_text(GOOD + "\n" + deep + "\n")
    with pytest.raises(DataError) as e:
        read_preferences(tmp_path / "deep.jsonl")
    assert f"{tmp_path / 'deep.jsonl'}:2: JSON nested too deeply" in str(e.value)
    _, report = read_preferences(tmp_path / "deep.jsonl", on_error="skip")  # the good line is kept
    assert report.kept == 1 and report.dropped == {"invalid_json": 1}
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(DataError, match=r"deep\.json: JSON nested too deeply"):
        read_preferences(tmp_path / "deep.json")


def test_a_parquet_file_that_is_not_parquet(tmp_path, monkeypatch):
    import types

    class ArrowInvalid(ValueError):  # what pyarrow raises; faked so the test runs without pyarrow
        pass

    def read_table(path):
        if Path(path).read_bytes()[:4] != b"PAR1":
            raise ArrowInvalid("Parquet magic bytes not found in footer")

    pq = types.ModuleType("pyarrow.parquet")
    pq.read_table = read_table
    monkeypatch.setitem(sys.modules, "pyarrow", types.ModuleType("pyarrow"))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", pq)
    (tmp_path / "train.parquet").write_text(GOOD + "\n")
    with pytest.raises(DataError, match=r"train\.parquet: not a readable Parquet file \(Parquet magic bytes"):
        read_preferences(tmp_path / "train.parquet")


def test_natural_split_names_the_empty_dataset():
    with pytest.raises(DataError, match=r"dataset 2 of 2 \(data.datasets\[1\]\) is empty"):
        split_steps([[example()], []], "natural")
