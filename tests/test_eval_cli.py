"""eval.py's four subcommands, in-process, on tiny random models saved with save_model."""
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import eval as eval_cli  # noqa: E402
from sdpo.eval import h4  # noqa: E402
from sdpo.data.tokenizer import CHAT_TEMPLATES, load_tokenizer  # noqa: E402
from sdpo.eval.loglikelihood import LoglikelihoodRunner, model_next_token_fn, model_score_fn  # noqa: E402
from sdpo.models.checkpoint import save_model  # noqa: E402
from sdpo.models.model import ModelConfig, Transformer  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "h4"


def _corpus():
    # the fixture task texts plus some filler, so the BPE merges cover the prompts
    texts = []
    for f in sorted(FIX.rglob("*.jsonl")):
        texts += f.read_text().splitlines()
    texts.append(h4.TRUTHFULQA_PREAMBLE)
    rng = random.Random(0)
    words = "the a model answer question chosen rejected good bad yes no".split()
    texts += [" ".join(rng.choice(words) for _ in range(8)) for _ in range(100)]
    texts += ["Answer: A Answer: B Answer: C Answer: D"] * 50  # " A" .. " D" become single tokens
    return texts


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("evalcli")
    tokdir = root / "tok"
    tokdir.mkdir()
    tok = Tokenizer(tmodels.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.save(str(tokdir / "tokenizer.json"))
    (tokdir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATES["chatml"]}))
    vocab = load_tokenizer(tokdir).vocab_size
    paths = {}
    for name, seed in (("S", 0), ("M1", 1)):
        cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        model = Transformer(cfg)
        model.init_weights(seed=seed, std=0.2)  # a larger std: log-probs differ visibly between models
        save_model(model, root / name, tokenizer_dir=tokdir)
        paths[name] = root / name
    prefs = root / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Is the answer good?", "chosen": "yes the answer is good", "rejected": "no"},
        {"prompt": "Pick a model.", "chosen": "the chosen model", "rejected": "the rejected model answer"},
        {"prompt": "Say no.", "chosen": "no", "rejected": "yes yes yes"},
    ]))
    return {"root": root, "prefs": prefs, **paths}


def run(argv, capsys):
    rc = eval_cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_h4_end_to_end_matches_a_direct_forward(models, tmp_path, capsys):
    out = tmp_path / "h4.json"
    rc, stdout, stderr = run(["h4", "--model", models["S"], "--data-dir", FIX, "--num-fewshot", "1",
                              "--batch-size", "3", "--out", out], capsys)
    assert rc == 0, stderr
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"arc", "hellaswag", "mmlu", "truthfulqa"}
    assert res["tasks"]["arc"]["n"] == 3 and res["tasks"]["mmlu"]["n"] == 3
    assert res["h4"] == pytest.approx(sum(t["score"] for t in res["tasks"].values()) / 4)
    assert "| arc " in stdout and "H4 = " in stdout
    assert "truthfulqa: " in stderr  # progress line

    # Recompute TruthfulQA's mc2 with a plain full-logits forward of the same model
    from sdpo.models.checkpoint import load_model

    model = load_model(models["S"], dtype=torch.float32).eval()
    tok = load_tokenizer(models["S"])
    items = h4.load_task_items(FIX, "truthfulqa")
    mc2 = []
    for item in items:
        lls = []
        for ctx, cont in item.requests():
            ctx_ids = tok.encode(ctx)
            whole = tok.encode(ctx + cont)
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).double(), -1)[0]
            n = len(ctx_ids)
            lls.append(sum(logp[t - 1, whole[t]].item() for t in range(n, len(whole))))
        p = [math.exp(x) for x in lls]
        mc2.append(sum(pi for pi, lab in zip(p, item.doc.labels) if lab) / sum(p))
    assert res["tasks"]["truthfulqa"]["mc2"] == pytest.approx(sum(mc2) / len(mc2), rel=1e-4)


def test_h4_bad_data_dir_is_a_clear_error(models, tmp_path, capsys):
    rc, _, err = run(["h4", "--model", models["S"], "--data-dir", tmp_path, "--tasks", "arc",
                      "--out", tmp_path / "x.json"], capsys)
    assert rc == 2
    assert "eval.py h4: error: arc: no 'test' split file" in err
    rc, _, err = run(["h4", "--model", models["S"], "--data-dir", FIX, "--tasks", "arc,squad"], capsys)
    assert rc == 2 and "unknown ['squad']" in err


def test_preference_against_itself_and_another_model(models, tmp_path, capsys):
    out = tmp_path / "pref.json"
    rc, stdout, err = run(["preference", "--model", models["S"], "--ref", models["S"], "--data", models["prefs"],
                           "--beta", "0.1", "--out", out], capsys)
    assert rc == 0, err
    m = json.loads(out.read_text())["metrics"]
    # policy == reference: every reward is 0, ties lose, the sigmoid loss is ln 2
    assert m["rewards/chosen"] == 0 and m["rewards/margins"] == 0 and m["rewards/accuracies"] == 0
    assert m["loss"] == pytest.approx(math.log(2))
    assert "rewards/accuracies" in stdout

    rc, _, err = run(["preference", "--model", models["M1"], "--ref", models["S"], "--data", models["prefs"],
                      "--beta", "0.5", "--out", out], capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    pairs = res["pairs"]
    assert len(pairs) == 3 and pairs[0]["origin"].endswith("prefs.jsonl:1")
    margins = [0.5 * ((p["policy_chosen"] - p["ref_chosen"]) - (p["policy_rejected"] - p["ref_rejected"]))
               for p in pairs]
    assert res["metrics"]["rewards/margins"] == pytest.approx(sum(margins) / 3)
    assert res["metrics"]["rewards/accuracies"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert res["metrics"]["loss"] == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / 3)
    assert res["metrics"]["rewards/margins"] != 0


def test_gamma_stats_histogram_and_missing_matplotlib_note(models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "g" / "gamma.json"
    rc, stdout, err = run(["gamma", "--models", models["S"], models["M1"], "--names", "S", "M1",
                           "--data", models["prefs"], "--bins", "5", "--out", out], capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    g = res["pairs"]["gamma"]
    assert set(g) == {"S", "M1"} and len(g["S"]) == 3
    assert res["stats"]["S"]["mean"] == pytest.approx(sum(g["S"]) / 3)
    assert sum(res["histogram"]["counts"]["M1"]) == 3 and len(res["histogram"]["edges"]) == 6
    assert (tmp_path / "g" / "gamma.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib: requirements.txt

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed: bins as CSV, and a note
    out = tmp_path / "h" / "gamma.json"
    rc, stdout, err = run(["gamma", "--models", models["S"], models["M1"], "--names", "S", "M1",
                           "--data", models["prefs"], "--bins", "5", "--out", out], capsys)
    assert rc == 0, err
    assert "matplotlib is not installed" in stdout and not (tmp_path / "h" / "gamma.png").exists()
    assert (tmp_path / "h" / "gamma.csv").read_text().startswith("bin_lo,bin_hi,S,M1\n")
    assert json.loads(out.read_text())["figure"] is None
    monkeypatch.undo()
    rc, _, err = run(["gamma", "--models", models["S"], "--names", "a", "b", "--data", models["prefs"]], capsys)
    assert rc == 2 and "--names needs 1 distinct names" in err


def test_preference_bad_file_names_file_and_field(models, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    rc, _, err = run(["preference", "--model", models["S"], "--ref", models["S"], "--data", bad], capsys)
    assert rc == 2
    assert "bad.jsonl:1" in err and "rejected" in err


def test_report_table(tmp_path, capsys):
    a = {"kind": "h4", "name": "sDPO", "h4": 0.7431, "tasks": {
        "arc": {"score": 0.7125}, "hellaswag": {"score": 0.8817}, "mmlu": {"score": 0.6668},
        "truthfulqa": {"score": 0.7214}}}
    b = {"kind": "h4", "model": "/m/base", "h4": None, "tasks": {"arc": {"score": 0.5}}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = tmp_path / "r.md"
    rc, stdout, err = run(["report", tmp_path / "a.json", tmp_path / "b.json", "--out", out], capsys)
    assert rc == 0, err
    assert out.read_text() == (
        "| Model   | H4    | ARC   | HellaSwag | MMLU  | TruthfulQA |\n"
        "|---------|-------|-------|-----------|-------|------------|\n"
        "| sDPO    | 74.31 | 71.25 | 88.17     | 66.68 | 72.14      |\n"
        "| /m/base | —     | 50.00 | —         | —     | —          |\n")
    assert "| sDPO " in stdout
    (tmp_path / "c.json").write_text(json.dumps({"kind": "gamma"}))
    rc, _, err = run(["report", tmp_path / "c.json"], capsys)
    assert rc == 2 and "c.json: not an `eval.py h4` result" in err


def test_one_token_groups_share_a_forward_and_agree_with_the_fused_path(models):
    from sdpo.models.checkpoint import load_model

    model = load_model(models["S"], dtype=torch.float32).eval()
    tok = load_tokenizer(models["S"])
    items = h4.load_task_items(FIX, "mmlu", num_fewshot=1) + h4.load_task_items(FIX, "arc", num_fewshot=0)
    requests = [r for item in items for r in item.requests()]
    encode = lambda s: tok.encode(s)  # noqa: E731
    calls = []

    def counting_next(ids, mask):
        calls.append(ids.shape[0])
        return model_next_token_fn(model)(ids, mask)

    plain = LoglikelihoodRunner(model_score_fn(model), encode, batch_size=4, progress=False)(requests)
    grouped = LoglikelihoodRunner(model_score_fn(model), encode, batch_size=4, progress=False,
                                     next_token_fn=counting_next)(requests)
    assert all(len(tok.encode(ctx + c)) - len(tok.encode(ctx)) == 1
               for item in items[:3] for ctx, c in item.requests())
    assert grouped == pytest.approx(plain, abs=1e-4)
    # the 3 MMLU questions (4 one-token letters each) take 3 context rows, not 12
    assert sum(calls) == 3


def test_h4_log_samples_and_samplers(models, tmp_path, capsys):
    out, samples = tmp_path / "h4.json", tmp_path / "samples.jsonl"
    rc, stdout, err = run(["h4", "--model", models["S"], "--data-dir", FIX, "--tasks", "arc,mmlu", "--num-fewshot", "1",
                           "--out", out, "--log-samples", samples], capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == res["tasks"]["arc"]["n"] + res["tasks"]["mmlu"]["n"]
    arc = [r for r in rows if r["task"] == "arc"]
    assert sum(r["acc_norm"] for r in arc) / len(arc) == pytest.approx(res["tasks"]["arc"]["acc_norm"])
    assert res["sampler"] == "leaderboard" and res["seed"] == 42 and "samples" not in res
    rc, _, err = run(["h4", "--model", models["S"], "--data-dir", FIX, "--tasks", "arc", "--num-fewshot", "1",
                      "--fewshot-sampler", "lm-eval", "--out", tmp_path / "b.json", "--log-samples", tmp_path / "b.jsonl"],
                     capsys)
    assert rc == 0, err
    b = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in b] == list(range(len(b)))  # lm-eval 0.4 keeps file order
    assert json.loads((tmp_path / "b.json").read_text())["seed"] == 1234


# ---------------------------------------------------------------- generate

def test_generate_jsonl_and_text_prompts_match_the_library(models, tmp_path, capsys):
    from sdpo.data.pairs import encode_prompt
    from sdpo.models.checkpoint import load_model
    from sdpo.models.generate import generate

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Is the answer good?"}) + "\n\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Pick a model."}]}) + "\n")
    out = tmp_path / "gen.jsonl"
    rc, stdout, stderr = run(["generate", "--model", models["S"], "--prompts", prompts, "--max-new-tokens", "6",
                              "--batch-size", "2", "--out", out], capsys)
    assert rc == 0, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 3]
    model, tok = load_model(models["S"]).eval(), load_tokenizer(models["S"])
    want_ids = [encode_prompt([{"role": "user", "content": "Is the answer good?"}], tok),
                encode_prompt([{"role": "user", "content": "Pick a model."}], tok)]
    want = [generate(model, [w], max_new_tokens=6, eos_id=tok.eos_id, pad_id=tok.pad_id)[0] for w in want_ids]
    assert [r["completion_ids"] for r in rows] == want
    assert [r["prompt_tokens"] for r in rows] == [len(w) for w in want_ids]
    for r in rows:
        assert r["completion"] == tok.decode(r["completion_ids"]) and r["tokens"] == len(r["completion_ids"])
        assert r["stopped"] == ("eos" if r["tokens"] < 6 else "length")
    assert rows[0]["prompt"] == "Is the answer good?" and rows[1]["prompt"][0]["content"] == "Pick a model."
    assert "wrote" in stdout and "mean tokens" in stdout

    # plain text: one prompt per line, the same encoding as a "prompt" record
    txt = tmp_path / "p.txt"
    txt.write_text("Is the answer good?\n")
    rc, _, stderr = run(["generate", "--model", models["S"], "--prompts", txt, "--max-new-tokens", "6",
                         "--out", tmp_path / "t.jsonl"], capsys)
    assert rc == 0, stderr
    assert json.loads((tmp_path / "t.jsonl").read_text())["completion_ids"] == want[0]


def test_generate_sampling_is_seeded(models, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Say no.", "Pick a model.", "the a"]))

    def sample(seed, name):
        rc, _, stderr = run(["generate", "--model", models["S"], "--prompts", prompts, "--max-new-tokens", "8",
                             "--temperature", "1.5", "--top-p", "0.9", "--seed", seed, "--out", tmp_path / name],
                            capsys)
        assert rc == 0, stderr
        return [json.loads(line)["completion_ids"] for line in (tmp_path / name).read_text().splitlines()]

    a, b, c = sample(3, "a.jsonl"), sample(3, "b.jsonl"), sample(4, "c.jsonl")
    assert a == b and a != c


def test_generate_on_an_hf_fixture_model_with_token_ids(tmp_path, capsys):
    from sdpo.models.checkpoint import load_model
    from sdpo.models.generate import generate

    fixture = Path(__file__).parent / "fixtures" / "hf_reference" / "mistral"  # no tokenizer files
    prompts = tmp_path / "ids.jsonl"
    ids = [[1, 5, 6, 7, 40], [1, 9]]
    prompts.write_text("".join(json.dumps({"input_ids": i}) + "\n" for i in ids))
    out = tmp_path / "gen.jsonl"
    rc, _, stderr = run(["generate", "--model", fixture, "--prompts", prompts, "--max-new-tokens", "7",
                         "--out", out], capsys)
    assert rc == 0, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model = load_model(fixture).eval()
    assert [r["completion_ids"] for r in rows] == generate(model, ids, max_new_tokens=7, eos_id=2)
    assert all(r["completion"] is None for r in rows)  # no tokenizer: ids only


@pytest.mark.parametrize("content, words", [
    ('{"prompt": "ok"}\n{"prompt": 3}\n', ["p.jsonl:2", '"prompt" (a string)', "got keys ['prompt']"]),
    ('{"prompt": "ok"}\nnot json\n', ["p.jsonl:2", "not valid JSON"]),
    ('{"input_ids": [1, 99999]}\n', ["p.jsonl:1", "99999", "vocab_size"]),
    ("\n\n", ["p.jsonl", "no prompts"]),
])
def test_generate_bad_prompts_name_file_and_line(models, tmp_path, capsys, content, words):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    rc, _, stderr = run(["generate", "--model", models["S"], "--prompts", prompts, "--out", tmp_path / "o.jsonl"],
                        capsys)
    assert rc == 2 and "Traceback" not in stderr
    for w in words:
        assert w in stderr
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------- generate for the LLM judges

def _greedy_text(model, tok, messages, n):
    from sdpo.data.pairs import encode_prompt
    from sdpo.models.generate import generate

    ids = generate(model, [encode_prompt(messages, tok)], max_new_tokens=n, eos_id=tok.eos_id, pad_id=tok.pad_id)[0]
    return tok.decode(ids), len(ids)


def test_generate_alpaca_eval_from_its_own_question_file(models, tmp_path, capsys):
    from sdpo.models.checkpoint import load_model

    questions = tmp_path / "alpaca_eval.json"  # the eval set's layout: reference outputs of another generator
    questions.write_text(json.dumps([
        {"dataset": "helpful_base", "instruction": "Is the answer good?", "output": "Yes.", "generator": "gpt4_turbo"},
        {"dataset": "koala", "instruction": "Pick a model.", "output": "This one.", "generator": "gpt4_turbo"}]))
    out = tmp_path / "outputs.json"
    rc, stdout, stderr = run(["generate", "--model", models["M1"], "--prompts", questions, "--format", "alpaca_eval",
                              "--name", "sdpo-M1", "--max-new-tokens", "6", "--batch-size", "2", "--out", out], capsys)
    assert rc == 0, stderr
    got = json.loads(out.read_text())
    model, tok = load_model(models["M1"]).eval(), load_tokenizer(models["M1"])
    want = [_greedy_text(model, tok, [{"role": "user", "content": q}], 6)[0]
            for q in ("Is the answer good?", "Pick a model.")]
    assert [{k: r[k] for k in ("instruction", "output", "generator", "dataset")} for r in got] == [
        {"instruction": "Is the answer good?", "output": want[0], "generator": "sdpo-M1", "dataset": "helpful_base"},
        {"instruction": "Pick a model.", "output": want[1], "generator": "sdpo-M1", "dataset": "koala"}]
    assert got[0]["sampling"] == {"model": str(models["M1"]), "max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0,
                                  "seed": 0, "batch_size": 2, "chat_template": "the tokenizer's", "dtype": "auto",
                                  "template_kwargs": {}}
    assert "format alpaca_eval" in stdout and "wrote" in stdout

    # a plain prompts file: "dataset" is the file's name; sampling settings recorded as given
    plain = tmp_path / "mine.txt"
    plain.write_text("Say no.\n")
    rc, _, stderr = run(["generate", "--model", models["M1"], "--prompts", plain, "--format", "alpaca_eval",
                         "--max-new-tokens", "4", "--temperature", "1.5", "--top-p", "0.9", "--seed", "3",
                         "--out", tmp_path / "plain.json"], capsys)
    assert rc == 0, stderr
    (row,) = json.loads((tmp_path / "plain.json").read_text())
    assert row["dataset"] == "mine" and row["generator"] == models["M1"].name and row["instruction"] == "Say no."
    assert (row["sampling"]["temperature"], row["sampling"]["top_p"], row["sampling"]["seed"]) == (1.5, 0.9, 3)


def test_generate_arena_hard_answers_in_each_release_layout(models, tmp_path, capsys, monkeypatch):
    from sdpo.models.checkpoint import load_model

    monkeypatch.chdir(tmp_path)
    v2 = tmp_path / "v2" / "question.jsonl"  # arena-hard-v2.0/question.jsonl
    v2.parent.mkdir()
    v2.write_text("".join(json.dumps(q) + "\n" for q in [
        {"uid": "2edbb5f36f5b42be", "category": "hard_prompt", "subcategory": "coding", "prompt": "Say no."},
        {"uid": "0122ab60646b4961", "category": "hard_prompt", "subcategory": "math", "prompt": "Pick a model."}]))
    rc, stdout, stderr = run(["generate", "--model", models["S"], "--prompts", v2, "--format", "arena_hard",
                              "--name", "sdpo-S", "--max-new-tokens", "5"], capsys)
    assert rc == 0, stderr
    answers = [json.loads(line) for line in (tmp_path / "results" / "model_answer" / "sdpo-S.jsonl").open()]
    model, tok = load_model(models["S"]).eval(), load_tokenizer(models["S"])
    for a, (uid, prompt) in zip(answers, [("2edbb5f36f5b42be", "Say no."), ("0122ab60646b4961", "Pick a model.")]):
        assert (a["uid"], a["model"]) == (uid, "sdpo-S") and isinstance(a["ans_id"], str) and a["tstamp"] > 0
        text = _greedy_text(model, tok, [{"role": "user", "content": prompt}], 5)[0]
        # what arena-hard-auto's gen_judgment.py reads: messages[-1]["content"]["answer"]
        assert a["messages"] == [{"role": "user", "content": prompt}, {"role": "assistant", "content": {"answer": text}}]
        assert a["sampling"]["max_new_tokens"] == 5 and a["sampling"]["temperature"] == 0.0

    # the first release's question.jsonl (question_id, turns); two turns: the second sees the first answer
    v01 = tmp_path / "question.jsonl"
    v01.write_text(json.dumps({"question_id": "q1", "category": "arena-hard-v0.1", "cluster": "c",
                               "turns": [{"content": "Say no."}, {"content": "Pick a model."}]}) + "\n")
    out = tmp_path / "v01.jsonl"
    rc, _, stderr = run(["generate", "--model", models["S"], "--prompts", v01, "--format", "arena_hard",
                         "--name", "sdpo-S", "--max-new-tokens", "5", "--out", out], capsys)
    assert rc == 0, stderr
    (a,) = [json.loads(line) for line in out.open()]
    first, n1 = _greedy_text(model, tok, [{"role": "user", "content": "Say no."}], 5)
    second, n2 = _greedy_text(model, tok, [{"role": "user", "content": "Say no."}, {"role": "assistant", "content": first},
                                           {"role": "user", "content": "Pick a model."}], 5)
    assert (a["question_id"], a["model_id"]) == ("q1", "sdpo-S") and isinstance(a["answer_id"], str)
    assert a["choices"] == [{"index": 0, "turns": [{"content": first, "token_len": n1},
                                                   {"content": second, "token_len": n2}]}]

    # AlpacaEval is single-turn: refused before any model work
    rc, _, stderr = run(["generate", "--model", models["S"], "--prompts", v01, "--format", "alpaca_eval"], capsys)
    assert rc == 2 and "question.jsonl:1: 2 turns" in stderr


@pytest.mark.parametrize("content, words", [
    ('{"uid": "a", "prompt": "ok"}\n{"uid": "b", "messages": []}\n',
     ["q.jsonl:2", '"instruction" (AlpacaEval), "prompt" (Arena-Hard-Auto) or "turns"', "got keys ['messages', 'uid']"]),
    ('{"question_id": 1, "turns": [{"content": ""}]}\n', ["q.jsonl:1", "non-empty text"]),
    ('{"instruction": "ok"}\n[1]\n', ["q.jsonl:2", "expected a JSON object, got list"]),
])
def test_generate_for_judges_bad_questions_name_file_and_line(models, tmp_path, capsys, content, words):
    questions = tmp_path / "q.jsonl"
    questions.write_text(content)
    rc, _, stderr = run(["generate", "--model", models["S"], "--prompts", questions, "--format", "arena_hard",
                         "--out", tmp_path / "o.jsonl"], capsys)
    assert rc == 2 and "Traceback" not in stderr
    for w in words:
        assert w in stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_passes_template_kwargs_to_the_chat_template(models, tmp_path, capsys):
    from sdpo.data.pairs import encode_prompt

    template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                "{% if enable_thinking is defined and enable_thinking is false %} the a model{% endif %}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Pick a model."}) + "\n")
    got = {}
    for name, extra in (("plain", []), ("off", ["--template-kwarg", "enable_thinking=false"])):
        rc, _, stderr = run(["generate", "--model", models["S"], "--prompts", prompts, "--max-new-tokens", "2",
                             "--chat-template", template, *extra, "--out", tmp_path / f"{name}.jsonl"], capsys)
        assert rc == 0, stderr
        got[name] = json.loads((tmp_path / f"{name}.jsonl").read_text())["prompt_tokens"]
    messages = [{"role": "user", "content": "Pick a model."}]
    off = load_tokenizer(models["S"], chat_template=template, template_kwargs={"enable_thinking": False})
    assert got["off"] == len(encode_prompt(messages, off)) > got["plain"]

    rc, _, stderr = run(["generate", "--model", models["S"], "--prompts", prompts, "--template-kwarg", "no value",
                         "--out", tmp_path / "bad.jsonl"], capsys)
    assert rc == 2 and "--template-kwarg 'no value': expected KEY=VALUE" in stderr
