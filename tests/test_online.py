"""On-policy sDPO ([online], sdpo/online.py): the pair rule, the judges' contracts and errors, the
reward-model head reader against transformers, samples independent of the world size, and a
run killed mid-sampling that resumes to the same step file and the same M_t."""

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdpo import online
from sdpo.data.read import PreferenceExample
from sdpo.loop import MACHINE_DEPENDENT
from sdpo.models.hf_config import CheckpointError
from sdpo.online import CommandJudge, ExactMatch, JudgeError, mix_share, pick_pair
from sdpo.runtime.config import ConfigError, load_config
from sdpo.runtime.run import StopRequested
from runs import torchrun

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"
SCORE_FIXTURE = REPO / "tests" / "fixtures" / "hf_reference" / "llama_score"


DEMO_LINE = f"{REPO / 'data' / 'demo' / 'orca_pairs' / 'train.jsonl'}:1"


def example(prompt="copy: abc", chosen="abc", rejected="abd", origin=DEMO_LINE):
    return PreferenceExample(({"role": "user", "content": prompt},), chosen, rejected, "demo", origin)


# ---------------------------------------------------------------- the pair rule

@pytest.mark.parametrize("scores, texts, margin, expected", [
    ([0.0, 1.0, 1.0, 0.0], "abcd", 0.0, ([1, 0], "kept")),      # first of the highest vs first of the lowest
    ([0.3, -2.0, 5.0, -2.0], "abcd", 0.0, ([2, 1], "kept")),
    ([1.0, 1.0, 1.0], "abc", 0.0, (None, "tie")),
    ([0.2, 0.5], "ab", 0.5, (None, "margin")),                    # 0.3 < 0.5
    ([0.0, 0.5], "ab", 0.5, ([1, 0], "kept")),                    # a margin equal to min_margin is enough
    ([0.0, 1.0], ["same", "same"], 0.0, (None, "same text")),
])
def test_pairs_are_best_vs_worst_and_dropped_on_ties_and_small_margins(scores, texts, margin, expected):
    assert pick_pair(scores, list(texts), margin) == expected


def test_mix_keeps_a_seeded_share_of_the_file_pairs_in_file_order():
    exs = [example(origin=f"f.jsonl:{i}") for i in range(10)]
    share = mix_share(exs, 0.3, seed=1)
    assert len(share) == 3 and share == sorted(share, key=exs.index)
    assert mix_share(exs, 0.3, seed=1) == share
    assert mix_share(exs, 1.0, seed=1) == exs and mix_share(exs, 0.0, seed=1) == []


# ---------------------------------------------------------------- exact match

def test_exact_match_strips_and_optionally_casefolds():
    ex = example(chosen="ABC")
    assert ExactMatch().score([ex] * 4, ["ABC", "  ABC\n", "abc", "ABCD"]) == [1.0, 1.0, 0.0, 0.0]
    assert ExactMatch(casefold=True).score([ex] * 2, ["abc ", "ab"]) == [1.0, 0.0]


def test_exact_match_reads_another_answer_field_and_names_a_missing_one(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "add: 7+5", "chosen": "12", "rejected": "2", "answer": 12}) + "\n"
                 + json.dumps({"prompt": "add: 1+1", "chosen": "2", "rejected": "3"}) + "\n")
    a, b = example("add: 7+5", "12", "2", f"{f}:1"), example("add: 1+1", "2", "3", f"{f}:2")
    assert ExactMatch("answer").score([a, a], ["12", "2"]) == [1.0, 0.0]
    with pytest.raises(JudgeError, match=r"d.jsonl:2: online.answer_field 'answer'.*has \['chosen', 'prompt', 'rejected'\]"):
        ExactMatch("answer").score([b], ["2"])


# ---------------------------------------------------------------- the command judge

def judge_script(tmp_path, body: str) -> list[str]:
    script = tmp_path / "judge.py"
    script.write_text("import json, sys\n" + textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_command_judge_gets_prompt_completion_record_per_line_and_returns_its_numbers(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "copy: abc", "chosen": "abc", "rejected": "abd", "system": ""}) + "\n")
    seen = tmp_path / "seen.jsonl"
    argv = judge_script(tmp_path, f"""
        lines = sys.stdin.read().splitlines()
        open({str(seen)!r}, "w").write("\\n".join(lines))
        for line in lines:
            print(len(json.loads(line)["completion"]) * 0.5)
    """)
    ex = example(origin=f"{f}:1")
    assert CommandJudge(argv, 30).score([ex, ex, ex], ["a", "abc", ""]) == [0.5, 1.5, 0.0]
    got = [json.loads(line) for line in seen.read_text().splitlines()]
    assert [sorted(g) for g in got] == [["completion", "prompt", "record"]] * 3
    assert got[1]["completion"] == "abc" and got[1]["prompt"] == [{"role": "user", "content": "copy: abc"}]
    assert got[0]["record"] == {"question": "copy: abc", "chosen": "abc", "rejected": "abd", "system": ""}


@pytest.mark.parametrize("body, message", [
    ("sys.stdin.read(); print(1.0)\n", r"wrote 1 lines for 3 completions"),
    ("sys.stdin.read(); print('1\\n2\\nbest')\n", r"output line 3: expected a finite number, got 'best'.*'c'"),
    ("sys.stdin.read(); print('1\\nnan\\n2')\n", r"output line 2: expected a finite number, got 'nan'"),
    ("sys.stdin.read(); sys.stderr.write('no judge today'); sys.exit(3)\n", r"exited with code 3: no judge today"),
    ("import time; time.sleep(30)\n", r"no answer within online.timeout_s = 1 s"),
])
def test_command_judge_errors_name_the_line_and_the_command(tmp_path, body, message):
    argv = judge_script(tmp_path, body)
    with pytest.raises(JudgeError, match=message) as e:
        CommandJudge(argv, 1.0).score([example()] * 3, ["a", "b", "c"])
    assert "judge.py" in str(e.value)


def test_command_judge_runs_no_shell(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(JudgeError, match="no such program"):
        CommandJudge([f"true; touch {marker}"], 5).score([example()], ["a"])
    assert not marker.exists()


def test_config_rules_and_setup_checks_name_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["--online.enabled=true", "--online.samples=1", "--online.temperature=0",
                           "--online.mix=1.5", "--online.judge=llm"])
    for key in ("online.samples", "online.temperature", "online.mix", "online.judge"):
        assert key in str(e.value)
    load_config(TINY, ["--online.samples=1"])  # [online] off: not checked
    assert online.check_judge("command:no-such-judge-program --x") != []
    assert "not a model directory" in online.check_judge(f"reward_model:{tmp_path}")[0]
    assert online.check_judge(f"command:{sys.executable} -c 1") == []


# ---------------------------------------------------------------- the reward model judge

def test_reward_model_scores_match_transformers():
    from sdpo.models.score import load_reward_model, reward_scores

    expected = json.loads((SCORE_FIXTURE / "expected.json").read_text())
    model = load_reward_model(SCORE_FIXTURE, dtype=torch.float32)
    got = reward_scores(model, expected["input_ids"], pad_id=0, batch_size=2)  # right-padded batches
    assert got == pytest.approx(expected["rewards"], abs=1e-4)
    # the judge: the conversation through the reward model's own chat template, as transformers renders it
    judge = online.RewardModelJudge(str(SCORE_FIXTURE), batch_size=3, device="cpu", dtype=torch.float32)
    exs = [example(p, "x", "y") for p, _ in expected["conversations"]]
    assert judge.score(exs, [c for _, c in expected["conversations"]]) == pytest.approx(expected["rewards"], abs=1e-4)


def test_reward_model_without_a_score_head_is_refused(tmp_path):
    from sdpo.models.score import load_reward_model

    d = tmp_path / "rm"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((SCORE_FIXTURE / f).read_bytes())
    tensors = load_file(str(SCORE_FIXTURE / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "score.weight"}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"rm: no 'score.weight' tensor: no score head"):
        load_reward_model(d)
    with pytest.raises(CheckpointError, match=r"a causal LM \(it has lm_head.weight\)"):
        load_reward_model(REPO / "tests" / "fixtures" / "hf_reference" / "llama")


# ---------------------------------------------------------------- samples and the world size

WORKER = textwrap.dedent(r"""
    import sys
    from pathlib import Path
    from sdpo.data.read import read_preferences
    from sdpo.data.tokenizer import load_tokenizer
    from sdpo.online import step_records
    from sdpo.runtime import distributed as D
    from sdpo.runtime.config import load_config
    from sdpo.runtime.run import Run

    model_dir, out, batch_prompts = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    cfg = load_config("configs/tiny.toml", ["--online.enabled=true", f"--online.batch_prompts={batch_prompts}",
                                            "--online.max_new_tokens=5", "--online.samples=3", "--train.seed=7"])
    info = D.init_distributed("cpu")
    run = Run(cfg=cfg, info=info, mesh=None, out=out, tokenizer=load_tokenizer("data/tokenizer"),
              tokenizer_dir="data/tokenizer", autocast_dtype=None)
    examples = read_preferences(["data/demo/orca_pairs/test.jsonl"])[0][:10]
    records = step_records(run, model_dir, examples, 2)
    assert len(records) == 10
    D.destroy()
""")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    from sdpo.data.tokenizer import load_tokenizer
    from sdpo.models.checkpoint import save_model
    from sdpo.models.model import ModelConfig, Transformer

    tok = load_tokenizer(REPO / "data" / "tokenizer")
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64))
    model.init_weights(seed=3, std=0.5)  # a peaked random model: samples differ, some repeat
    d = tmp_path_factory.mktemp("random") / "model"
    save_model(model, d, tokenizer_dir=REPO / "data" / "tokenizer")
    return d


@pytest.mark.slow  # two torchrun launches: ~90 s on two loaded cores
def test_samples_are_the_same_for_one_and_two_ranks(tmp_path, random_model):
    """One rank with batches of 4 prompts, two ranks with batches of 3 (dealt round-robin): the
    step file, which holds no batch or rank, is the same to the byte."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    files = {}
    for n, batch_prompts in ((1, 4), (2, 3)):
        torchrun(worker, random_model, tmp_path / f"w{n}", batch_prompts, nproc=n)
        files[n] = (tmp_path / f"w{n}" / "online" / "step2.jsonl").read_text()
        assert not (tmp_path / f"w{n}" / "online" / ".step2.parts").exists()
    assert files[1] == files[2]
    rows = [json.loads(line) for line in files[1].splitlines()]
    assert [r["index"] for r in rows] == list(range(10)) and all(len(r["completions"]) == 3 for r in rows)
    assert len({c for r in rows for c in r["completions"]}) > 10  # sampled, not one greedy answer per prompt



def test_a_prompts_samples_do_not_depend_on_its_batch(tmp_path, random_model):
    """Prompts of different lengths (so different left pads) sampled 1 and 4 to a batch, and in
    the reverse order of batches' sizes (4 then 1): every prompt gets the same completions."""
    from sdpo.data.read import read_preferences
    from sdpo.data.tokenizer import load_tokenizer
    from sdpo.runtime import distributed as D
    from sdpo.runtime.run import Run

    examples = read_preferences([REPO / "data" / "demo" / "orca_pairs" / "test.jsonl"])[0][:6]
    tok = load_tokenizer(REPO / "data" / "tokenizer")
    assert len({len(online.prompt_ids(ex, tok, 48, "keep_end")) for ex in examples}) > 1
    got = {}
    for bp in (1, 4):
        cfg = load_config(TINY, ["--online.enabled=true", f"--online.batch_prompts={bp}", "--online.samples=3",
                                 "--online.max_new_tokens=5", "--train.seed=7"])
        run = Run(cfg=cfg, info=D.init_distributed("cpu"), mesh=None, out=tmp_path / f"bp{bp}", tokenizer=tok,
                  tokenizer_dir=str(REPO / "data" / "tokenizer"), autocast_dtype=None)
        got[bp] = [r["completions"] for r in online.step_records(run, str(random_model), examples, 2)]
    assert got[1] == got[4]
    assert len({c for cs in got[1] for c in cs}) > 6  # sampled, not one greedy answer per prompt


def test_per_row_draw_follows_each_rows_probabilities():
    """Inverse transform sampling against hand-set probabilities (unnormalised rows, a zero, a row
    that is all on one token); a shared generator draws for its rows in row order."""
    from sdpo.models.generate import per_row_draw

    probs = torch.tensor([[0.2, 0.0, 1.2, 0.6], [0.0, 0.0, 0.0, 3.0]])  # row 0: 0.1, 0, 0.6, 0.3
    n = 20000
    g = torch.Generator().manual_seed(0)
    tokens = per_row_draw(probs.repeat(n, 1), [g] * (2 * n))
    row0, row1 = tokens[0::2], tokens[1::2]
    assert (row1 == 3).all() and not (row0 == 1).any()
    freq = torch.bincount(row0, minlength=4).double() / n
    for got, p in zip(freq.tolist(), [0.1, 0.0, 0.6, 0.3]):
        assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-12  # 4 standard errors
    # row i's token depends only on its generator: the same seed per row gives the same token in any batch
    one = [per_row_draw(probs[:1], [torch.Generator().manual_seed(s)]).item() for s in range(50)]
    both = per_row_draw(probs.repeat(50, 1), [torch.Generator().manual_seed(s // 2) for s in range(100)])
    assert both[0::2].tolist() == one
    with pytest.raises(ValueError, match="3 generators for 2 rows"):
        per_row_draw(probs, [g] * 3)

# ---------------------------------------------------------------- a run killed mid-sampling

SMALL = [
    "--loss.rpo_alpha=0", "--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
    "--model.num_attention_heads=2", "--data.max_examples=12", "--sft.max_steps=3", "--sft.global_batch_size=16",
    "--sft.micro_batch_size=16", "--train.global_batch_size=4", "--train.micro_batch_size=4", "--train.epochs=1",
    "--eval.summary=false", "--online.enabled=true", "--online.batch_prompts=4", "--online.max_new_tokens=6",
    "--online.samples=3",
]


def test_killed_during_sampling_resumes_to_the_same_pairs_and_models(tmp_path, monkeypatch):
    """A length judge (a command) makes pairs of any model; the kill comes inside step 2's second
    sampling batch. The resumed run samples only step 2's batches 1 and 2, and ends with the step
    files, metrics and M1/M2 of an uninterrupted run."""
    from sdpo.stepwise import train

    monkeypatch.chdir(REPO)
    argv = judge_script(tmp_path, "for line in sys.stdin: print(len(json.loads(line)['completion']))\n")
    judge = f"--online.judge=command:{' '.join(argv)}"
    cfg = lambda out, *extra: load_config(TINY, [*SMALL, judge, f"--train.output_dir={tmp_path / out}", *extra])  # noqa: E731
    sampled = []
    real = online.generate
    # a batch is known by its first prompt's generator seed
    monkeypatch.setattr(online, "generate", lambda *a, **k: (sampled.append(k["generator"][0].initial_seed()), real(*a, **k))[1])
    train(cfg("full"))
    full_seeds, sampled[:] = list(sampled), []

    real_score = CommandJudge.score
    calls = []

    def killed(self, examples, completions):
        calls.append(1)
        if len(calls) == 5:  # step 1 has 3 batches of 4 prompts: the 5th call is step 2's second batch
            raise StopRequested("killed")
        return real_score(self, examples, completions)

    monkeypatch.setattr(CommandJudge, "score", killed)
    with pytest.raises(StopRequested):
        train(cfg("cut"))
    parts = sorted(p.name for p in (tmp_path / "cut" / "online" / ".step2.parts").iterdir())
    assert parts == ["batch000000.jsonl"] and (tmp_path / "cut" / "online" / "step1.jsonl").is_file()
    monkeypatch.setattr(CommandJudge, "score", real_score)
    sampled[:] = []
    train(cfg("cut", "--train.resume=true"))
    assert sampled == full_seeds[4:]  # step 2's batches 1 and 2 only; step 1 and batch 0 are not sampled again

    for name in ("step1.jsonl", "step2.jsonl"):
        assert (tmp_path / "cut" / "online" / name).read_text() == (tmp_path / "full" / "online" / name).read_text()
    for d in ("M1", "M2"):
        a, b = load_file(str(tmp_path / "full" / d / "model.safetensors")), load_file(str(tmp_path / "cut" / d / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), d

    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    clock = (*MACHINE_DEPENDENT, "online/sample_time_s", "reference")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in clock} for r in rs]  # noqa: E731
    assert strip(rows) == strip(full_rows)
    # The step rows carry the online/ metrics, recomputed here from the step files.
    starts = [r for r in rows if "online/pairs_kept" in r]
    assert [r["sdpo_step"] for r in starts] == [1, 2]
    for r in starts:
        recs = [json.loads(line) for line in (tmp_path / "full" / "online" / f"step{r['sdpo_step']}.jsonl").read_text().splitlines()]
        assert r["online/pairs_kept"] == sum(x["kept"] is not None for x in recs) == r["pairs"]
        assert r["online/ties"] == sum(len(set(x["scores"])) == 1 for x in recs)
        scores = [s for x in recs for s in x["scores"]]
        assert r["online/mean_score"] == pytest.approx(sum(scores) / len(scores))
        for x in recs:  # the length judge: the kept pair is the longest vs the shortest completion
            lengths = [len(c) for c in x["completions"]]
            assert x["scores"] == [float(n) for n in lengths]
            if x["kept"] is not None:
                assert lengths[x["kept"][0]] == max(lengths) and lengths[x["kept"][1]] == min(lengths)
    assert not math.isnan(starts[0]["gamma_ref/mean"])
