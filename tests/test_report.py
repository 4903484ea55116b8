"""Tables and progress lines (sdpo.eval.report)."""
import io

from sdpo.eval import report


def test_format_table():
    assert report.format_table(["a", "bb"], [["x", 0.5], ["yyy", None]]) == (
        "| a   | bb     |\n|-----|--------|\n| x   | 0.5000 |\n| yyy | —      |")


def test_progress_lines_in_a_log_file():
    buf = io.StringIO()
    bar = report.Progress("arc", 10, stream=buf, interval=1e9)
    bar.update(4)
    bar.update(6)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("arc: 10/10 (")  # only the final line, no '\r'


def test_exact_match_compares_the_greedy_completion_text_with_the_chosen_response(monkeypatch):
    from pathlib import Path

    from sdpo.data.pairs import TokenizedPair
    from sdpo.data.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(__file__).resolve().parents[1] / "data" / "tokenizer")
    enc = lambda s: list(tok.encode(s, add_special_tokens=False))  # noqa: E731
    eos = tok.eos_id
    prompt = enc("copy: abcde")
    answers = ["abcde", "abcde", "abcde", "ABC", "12"]
    pairs = [TokenizedPair(prompt, enc(a) + [eos], enc("x") + [eos], i) for i, a in enumerate(answers)]
    pairs[4].chosen_ids = enc("12")  # truncated by max_length: no EOS to strip
    byte_ids = [tok.encode(c, add_special_tokens=False)[0] for c in "ABC"]  # the same text, one token per byte
    completions = [enc("abcde"),      # right
                   enc("abcd"),       # the truncation the demo's S makes
                   enc("abcdef"),     # runs on past the answer
                   byte_ids,          # right, spelled with other token ids
                   enc("13")]
    calls = []

    def fake_generate(model, prompts, *, max_new_tokens, eos_id, pad_id):
        calls.append((len(prompts), max_new_tokens, eos_id))
        done = sum(n for n, _, _ in calls[:-1])
        return completions[done: done + len(prompts)]

    monkeypatch.setattr(report, "generate", fake_generate)
    hits = report.exact_match(None, pairs, tok, batch_size=3)
    assert hits == [True, False, False, True, False]
    # per batch, its longest answer + 1 ids: enough to see a completion that does not stop
    assert calls == [(3, 6, eos), (2, 4, eos)]
    calls.clear()
    report.exact_match(None, pairs[:3], tok, batch_size=8, max_positions=len(prompt) + 4)
    assert calls == [(3, 4, eos)]


def test_format_summary_puts_exact_match_first():
    row = lambda em: {s: {"exact_match": em, "accuracy": 0.5, "gamma_mean": 1.0, "n": 4} for s in ("D1", "D2")}  # noqa
    table = {"S": row(0.25), "M1": {s: {**v, "reward_accuracy_vs_S": 0.75} for s, v in row(1.0).items()}}
    lines = report.format_summary(table).splitlines()
    assert lines[1].split("|")[1:4] == [" model ", " EM D1 ", " EM D2 "]
    assert lines[3].split("|")[2].strip() == "0.250" and lines[4].split("|")[2].strip() == "1.000"
    assert lines[4].split("|")[-2].strip() == "0.750" and lines[3].split("|")[-2].strip() == "-"
