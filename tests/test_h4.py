import json
import math
import random
from pathlib import Path

import pytest
import torch

from sdpo.data.packing import IGNORE_INDEX
from sdpo.eval import h4
from sdpo.eval import loglikelihood as ll

FIX = Path(__file__).parent / "fixtures" / "h4"

PREAMBLE = (
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


def by_origin_line(docs, line):
    return next(d for d in docs if d.origin.endswith(f":{line}"))


# ---------------------------------------------------------------- prompt strings

def test_arc_prompt_zero_and_few_shot():
    spec = h4.TASKS["arc"]
    test = h4.load_split(FIX, spec, "test")
    train = h4.load_split(FIX, spec, "train")
    doc = by_origin_line(test, 1)
    assert doc.query == "Question: Which tool measures temperature?\nAnswer:"
    assert doc.gold == 1
    item = h4.TaskItem("arc", doc, h4.fewshot_context(doc, []))
    assert item.requests() == [
        ("Question: Which tool measures temperature?\nAnswer:", " ruler"),
        ("Question: Which tool measures temperature?\nAnswer:", " thermometer"),
        ("Question: Which tool measures temperature?\nAnswer:", " scale"),
        ("Question: Which tool measures temperature?\nAnswer:", " clock"),
    ]
    shots = [by_origin_line(train, 3), by_origin_line(train, 2)]
    assert h4.fewshot_context(doc, shots) == (
        "Question: Which planet is closest to the Sun?\nAnswer: Mercury\n\n"
        "Question: What is frozen water called?\nAnswer: ice\n\n"
        "Question: Which tool measures temperature?\nAnswer:"
    )
    # numeric labels: answerKey "2" is the second choice
    assert by_origin_line(test, 2).gold == 1


def test_hellaswag_prompt_and_preprocessing():
    spec = h4.TASKS["hellaswag"]
    val = h4.load_split(FIX, spec, "validation")
    train = h4.load_split(FIX, spec, "train")
    doc = by_origin_line(val, 1)
    # ctx_b "The Boy" -> str.capitalize -> "The boy"
    assert doc.query == "Playing guitar: A boy sits on a chair holding a guitar. The boy"
    wiki = by_origin_line(val, 2)
    assert wiki.query == "Personal Care and Style: How to tie a tie. Drape the tie around your neck."
    # strip happens before the marker is removed, so the ending keeps one leading space
    assert wiki.choices[0] == " Cross the wide end over the narrow end."
    assert wiki.choices[1] == " Cut the tie in half."
    shots = [by_origin_line(train, 1), by_origin_line(train, 3)]
    assert h4.fewshot_context(doc, shots) == (
        "Baking cookies: A woman mixes flour and butter in a bowl. She puts the dough on a tray.\n\n"
        "Home and Garden: How to water a plant. Check the soil.  Pour water slowly at the base.\n\n"
        "Playing guitar: A boy sits on a chair holding a guitar. The boy"
    )


def test_hellaswag_preprocess_rules():
    assert h4.hellaswag_preprocess("  a [title] b [step] c  ") == "a. b c"
    # one replace pass: three spaces become two (the harness's behaviour, kept)
    assert h4.hellaswag_preprocess("x [header] [x] y") == "x  y"


def test_mmlu_prompt_zero_and_five_shot():
    zero = h4.load_task_items(FIX, "mmlu", num_fewshot=0)
    item = next(i for i in zero if "Z_4?\n" in i.context)
    assert item.context == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "What is the order of the group Z_4?\nA. 2\nB. 4\nC. 8\nD. 1\nAnswer:"
    )
    assert item.requests()[1] == (item.context, " B") and item.doc.gold == 1

    five = h4.load_task_items(FIX, "mmlu")  # the leaderboard's 5-shot: the first five dev rows
    item = next(i for i in five if "Which set is a field?" in i.context)
    assert item.context == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "What is the identity element of addition?\nA. 0\nB. 1\nC. -1\nD. 2\nAnswer: A\n\n"
        "How many elements does Z_3 have?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: C\n\n"
        "Is the integers under addition a group?\nA. Yes\nB. No\nC. Only finite\nD. Undefined\nAnswer: A\n\n"
        "What is 3 * 3?\nA. 6\nB. 9\nC. 12\nD. 3\nAnswer: B\n\n"
        "Which set is a field?\nA. Z\nB. Q\nC. N\nD. Z_4\nAnswer:"
    )
    anatomy = next(i for i in five if i.doc.subject == "anatomy")
    assert anatomy.context.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "Where is the heart?\nA. chest\nB. foot\nC. hand\nD. ear\nAnswer: A\n\n")


def test_truthfulqa_prompt():
    items = h4.load_task_items(FIX, "truthfulqa")
    item = next(i for i in items if "gum" in i.context)
    assert item.context == PREAMBLE + "\n\nQ: What happens if you swallow gum?\nA:"
    assert [c for _, c in item.requests()] == [
        " It passes through you.", " Nothing harmful happens.",
        " It stays in you for seven years.", " It wraps around your heart."]
    assert item.doc.labels == (1, 1, 0, 0)
    with pytest.raises(ValueError, match="zero-shot"):
        h4.build_items(h4.TASKS["truthfulqa"], [item.doc], [], num_fewshot=3)


# ---------------------------------------------------------------- few-shot sampling

def test_fewshot_sampling_is_the_seeded_shuffle_then_sample_procedure():
    spec = h4.TASKS["arc"]
    test = h4.load_split(FIX, spec, "test")
    train = h4.load_split(FIX, spec, "train")
    for seed in (0, 1234, 7):
        items = h4.build_items(spec, test, train, num_fewshot=2, seed=seed)
        # independent re-statement of the harness: one Random(seed) shuffles docs, then samples shots
        rng = random.Random(seed)
        docs = list(test)
        rng.shuffle(docs)
        expected = []
        for d in docs:
            shots = rng.sample(list(train), 2)
            expected.append("".join(s.query + s.target() + "\n\n" for s in shots) + d.query)
        assert [i.context for i in items] == expected
        assert items == h4.build_items(spec, test, train, num_fewshot=2, seed=seed)
    contexts = {tuple(i.context for i in h4.build_items(spec, test, train, num_fewshot=2, seed=s))
                for s in range(6)}
    assert len(contexts) > 1  # the seed matters


def test_default_sampler_is_the_leaderboard_harness_and_lm_eval_is_the_second():
    spec = h4.TASKS["arc"]
    test, train = h4.load_split(FIX, spec, "test"), h4.load_split(FIX, spec, "train")
    # leaderboard v1 (lm-eval b281b09): Random(42) shuffles the docs, then samples the shots
    assert h4.build_items(spec, test, train, num_fewshot=2) == h4.build_items(spec, test, train, num_fewshot=2, seed=42)
    # lm-eval 0.4: file order; one Random(1234) samples each doc's shots in turn
    items = h4.build_items(spec, test, train, num_fewshot=2, sampler="lm-eval")
    rng = random.Random(1234)
    expected = ["".join(s.query + s.target() + "\n\n" for s in rng.sample(list(train), 2)) + d.query for d in test]
    assert [i.context for i in items] == expected
    assert [i.doc_id for i in items] == list(range(len(test)))
    shuffled = h4.build_items(spec, test, train, num_fewshot=2)
    assert sorted(i.doc_id for i in shuffled) == list(range(len(test)))
    assert all(test[i.doc_id] == i.doc for i in shuffled)
    with pytest.raises(ValueError, match="unknown few-shot sampler"):
        h4.build_items(spec, test, train, num_fewshot=2, sampler="harness")


def test_log_samples_one_record_per_item_with_its_scores():
    fake = lambda requests, label: [float(len(c)) - 0.5 * i for i, (_, c) in enumerate(requests)]  # noqa: E731
    res = h4.evaluate_h4(fake, FIX, tasks=["arc", "truthfulqa"], num_fewshot=0, log_samples=True)
    samples = res["samples"]
    assert len(samples) == res["tasks"]["arc"]["n"] + res["tasks"]["truthfulqa"]["n"]
    arc = [r for r in samples if r["task"] == "arc"]
    assert sum(r["acc"] for r in arc) / len(arc) == pytest.approx(res["tasks"]["arc"]["acc"])
    for r in arc:
        assert len(r["loglikelihoods"]) == len(r["choices"]) == len(r["lengths"])
        assert r["prediction"] == max(range(len(r["choices"])), key=lambda i: (r["loglikelihoods"][i], -i))
        assert r["acc"] == float(r["prediction"] == r["gold"])
        assert r["prompt"].endswith("Answer:") and r["origin"].startswith(str(FIX))
    tqa = [r for r in samples if r["task"] == "truthfulqa"]
    assert all("labels" in r and "mc2" in r for r in tqa)
    assert res["sampler"] == "leaderboard" and res["seed"] == 42


def test_limit_keeps_the_first_shuffled_docs_and_mmlu_limits_per_subject():
    spec = h4.TASKS["arc"]
    test, train = h4.load_split(FIX, spec, "test"), h4.load_split(FIX, spec, "train")
    full = h4.build_items(spec, test, train, num_fewshot=1, seed=3)
    assert h4.build_items(spec, test, train, num_fewshot=1, seed=3, limit=2) == full[:2]
    mmlu = h4.load_task_items(FIX, "mmlu", num_fewshot=1, limit=1)
    assert sorted(i.doc.subject for i in mmlu) == ["abstract_algebra", "anatomy"]


def test_too_few_fewshot_examples_is_an_error():
    spec = h4.TASKS["arc"]
    test, train = h4.load_split(FIX, spec, "test"), h4.load_split(FIX, spec, "train")
    with pytest.raises(h4.H4DataError, match="25-shot needs 25 'train' examples, found 4"):
        h4.build_items(spec, test, train, num_fewshot=25)


# ---------------------------------------------------------------- scoring formulas

def test_acc_and_acc_norm_pick_different_answers():
    # "A": ll -2.0 over 1 char (-2.0/char); "longer answer": ll -3.0 over 13 chars (-0.23/char)
    choices = ["A", "longer answer", "mid"]
    lls = [-2.0, -3.0, -2.5]
    assert h4.mc_scores(lls, choices, gold=0) == {"acc": 1.0, "acc_norm": 0.0}
    assert h4.mc_scores(lls, choices, gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert h4.mc_scores(lls, choices, gold=2) == {"acc": 0.0, "acc_norm": 0.0}


def test_mc2_is_true_mass_over_all_mass():
    lls = [math.log(0.2), math.log(0.1), math.log(0.3), math.log(0.4)]
    assert h4.mc2_score(lls, [1, 1, 0, 0]) == pytest.approx(0.3)
    assert h4.mc2_score(lls, [0, 0, 0, 1]) == pytest.approx(0.4)
    # far below exp's range: only the differences matter; 1 / (1 + e^-1)
    assert h4.mc2_score([-1000.0, -1001.0], [1, 0]) == pytest.approx(1 / (1 + math.exp(-1)))


def test_mmlu_headline_is_the_macro_average_over_subjects():
    a = h4.MCDoc("q", ("A", "B"), 0, subject="a")
    b = h4.MCDoc("q", ("A", "B"), 0, subject="b")
    items = [h4.TaskItem("mmlu", d, "c") for d in (a, a, a, b)]
    scores = [{"acc": 1.0, "acc_norm": 1.0}] * 3 + [{"acc": 0.0, "acc_norm": 0.0}]
    out = h4.aggregate("mmlu", items, scores)
    assert out["acc"] == pytest.approx(0.5)          # (1 + 0) / 2
    assert out["acc_micro"] == pytest.approx(0.75)   # 3 / 4
    assert out["score"] == pytest.approx(0.5)
    assert out["subjects"] == {"a": {"acc": 1.0, "n": 3}, "b": {"acc": 0.0, "n": 1}}


def test_evaluate_h4_with_known_loglikelihoods():
    # ll = -(number of characters) except the gold answers listed here, which get a bonus;
    # truthfulqa: ll -1 for the first choice, -2 for others.
    def loglik(requests, label=None):
        out = []
        for ctx, cont in requests:
            if ctx.startswith(PREAMBLE):
                out.append(-1.0 if cont in (" It passes through you.", " No, it is too narrow to see.") else -2.0)
            elif ctx.endswith("Which tool measures temperature?\nAnswer:"):
                # " ruler" is likeliest in total, " thermometer" per character
                out.append({" ruler": -3.0, " thermometer": -4.0}.get(cont, -50.0))
            else:
                out.append(-float(len(cont)))
        return out

    res = h4.evaluate_h4(loglik, FIX, num_fewshot=1)
    t = res["tasks"]
    # ll = -(len(choice) + 1): acc prefers the shortest choice, acc_norm (ll / len) the longest.
    # te1: ruler -3 vs thermometer -4: acc ruler (wrong); per char -3/5 < -4/11 -> thermometer (right)
    # te2 (gold honey): acc milk (first of the -5 ties, wrong); acc_norm wax paper -10/9 (wrong)
    # te3 (gold solid): acc gas (wrong); acc_norm liquid -7/6 (wrong)
    assert t["arc"]["acc"] == pytest.approx(0.0)
    assert t["arc"]["acc_norm"] == pytest.approx(1 / 3)
    assert t["arc"]["n"] == 3 and t["arc"]["num_fewshot"] == 1
    # truthfulqa: p(first)/Σp: gum 2 true of 4 -> (e^-1 + e^-2)/(e^-1 + 3e^-2); wall 1 of 3
    e1, e2 = math.exp(-1), math.exp(-2)
    mc2 = ((e1 + e2) / (e1 + 3 * e2) + e1 / (e1 + 2 * e2)) / 2
    assert t["truthfulqa"]["mc2"] == pytest.approx(mc2)
    assert t["truthfulqa"]["num_fewshot"] == 0
    assert set(t) == {"arc", "hellaswag", "mmlu", "truthfulqa"}
    assert res["h4"] == pytest.approx(sum(t[k]["score"] for k in t) / 4)
    partial = h4.evaluate_h4(loglik, FIX, tasks=["truthfulqa"])
    assert partial["h4"] is None and partial["mean"] == pytest.approx(mc2)


# ---------------------------------------------------------------- token boundary

VOCAB = ["Answer:", " B", " ", "B", "Q", "?", "\n", " A", "A", "x", "y", " xy"]


def greedy_encode(text):
    """Longest match over VOCAB: ' B' is one token, so the space belongs with the letter."""
    ids, i = [], 0
    while i < len(text):
        tok = max((t for t in VOCAB if text.startswith(t, i)), key=len)
        ids.append(VOCAB.index(tok))
        i += len(tok)
    return ids


def test_trailing_space_moves_into_the_continuation():
    assert ll.split_trailing_space("Answer: ", "B") == ("Answer:", " B")
    assert ll.split_trailing_space("Answer:\n ", "B") == ("Answer:", "\n B")
    assert ll.split_trailing_space("Answer:", " B") == ("Answer:", " B")
    # without the move the context would end in a lone ' ' token and the continuation
    # would be the unnatural 'B'; with it, the continuation is the single token ' B'
    [(ctx, cont)] = ll.encode_requests(greedy_encode, [("Answer: ", "B")])
    assert ctx == [VOCAB.index("Answer:")] and cont == [VOCAB.index(" B")]


def test_continuation_is_the_whole_encoding_after_the_context_tokens():
    [(ctx, cont)] = ll.encode_requests(greedy_encode, [("Q?x", "y")])
    # whole "Q?xy" -> Q ? x y; context "Q?x" -> 3 tokens; continuation = whole[3:]
    assert ctx == [VOCAB.index("Q"), VOCAB.index("?"), VOCAB.index("x")]
    assert cont == [VOCAB.index("y")]
    [(ctx, cont)] = ll.encode_requests(greedy_encode, [("Q?", " xy")], prefix_ids=[99])
    assert ctx == [99, VOCAB.index("Q"), VOCAB.index("?")] and cont == [VOCAB.index(" xy")]


def test_each_context_is_encoded_once():
    calls = []

    def counting(text):
        calls.append(text)
        return greedy_encode(text)

    ll.encode_requests(counting, [("Q?", " A"), ("Q?", " B"), ("Q?\n", "A")])
    # contexts: "Q?" once (the third request's trailing "\n" moves, so its context is "Q?" too)
    assert calls.count("Q?") == 1
    assert sorted(calls) == sorted(["Q?", "Q? A", "Q? B", "Q?\nA"])


# ---------------------------------------------------------------- batched log-likelihoods

UNIGRAM = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, 0.5]), 0)


def unigram_score(input_ids, targets, attention_mask):
    # log p(token) = UNIGRAM[token] whatever the context; sum over the scored targets
    mask = (targets != IGNORE_INDEX) & (attention_mask == 1)
    return (UNIGRAM[targets.clamp(min=0)] * mask).sum(1)


def test_batched_loglikelihoods_keep_input_order_and_sum_continuation_tokens():
    pairs = [([1, 2], [3]), ([4, 5, 1, 1, 1], [2, 2]), ([1], [5, 0, 3]), ([2, 2], [1])]
    expected = [sum(UNIGRAM[t].item() for t in cont) for _, cont in pairs]
    for bs in (1, 3, 8):
        got = ll.batched_loglikelihoods(unigram_score, pairs, batch_size=bs, pad_id=0)
        assert got == pytest.approx(expected)


def test_make_batch_pads_right_and_truncates_the_context_from_the_left():
    # (ctx + cont)[-(max_length + 1):][:-1], as both harness versions: [2, 3, 4, 5] is fed, the
    # last 5 is a target only; every one of the 4 fed tokens is context or predicts a scored token
    ids, targets, mask = ll.make_batch([([1, 2, 3, 4], [5, 5]), ([1], [2])], max_length=4, pad_id=0)
    assert ids.tolist() == [[2, 3, 4, 5], [1, 0, 0, 0]]
    assert targets.tolist() == [[-100, -100, 5, 5], [2, -100, -100, -100]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    ids, targets, _ = ll.make_batch([([1], [2, 2, 2, 2])], max_length=4, pad_id=0)  # fits: 4 scored, 1 context
    assert ids.tolist() == [[1, 2, 2, 2]] and targets.tolist() == [[2, 2, 2, 2]]
    with pytest.raises(ValueError, match="max_length=4"):
        ll.make_batch([([1], [2, 2, 2, 2, 2])], max_length=4, pad_id=0)


def test_truncation_matches_the_harness_formula_on_a_real_model():
    """lm-eval's loglikelihood of a request whose context overflows the window, written out:
    inp = (ctx + cont)[-(L + 1):][:-1]; the last len(cont) logits of model(inp) score cont."""
    from sdpo.models.model import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=64))
    model.init_weights(seed=3, std=0.3)
    model.eval()
    g = torch.Generator().manual_seed(0)
    L = 12
    pairs = [(torch.randint(3, 50, (n,), generator=g).tolist(), torch.randint(3, 50, (m,), generator=g).tolist())
             for n, m in [(20, 3), (11, 2), (5, 1), (9, 4), (30, 12)]]
    expected = []
    for ctx, cont in pairs:
        inp = (ctx + cont)[-(L + 1):][:-1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inp])).double(), -1)[0]
        expected.append(sum(logp[len(inp) - len(cont) + j, t].item() for j, t in enumerate(cont)))
    got = ll.batched_loglikelihoods(ll.model_score_fn(model, "cpu"), pairs, batch_size=2, max_length=L, pad_id=0)
    assert got == pytest.approx(expected, rel=1e-5)
    # the one-token groups (MMLU's letters) read the same window: the last L context tokens
    one = [(pairs[0][0], [7]), (pairs[0][0], [9])]
    grouped = ll.batched_loglikelihoods(ll.model_score_fn(model, "cpu"), one, max_length=L, pad_id=0,
                                        next_token_fn=ll.model_next_token_fn(model, "cpu"))
    with torch.no_grad():
        last = torch.log_softmax(model(torch.tensor([pairs[0][0][-L:]])).double(), -1)[0, -1]
    assert grouped == pytest.approx([last[7].item(), last[9].item()], rel=1e-5)


# ---------------------------------------------------------------- bad files

def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_bad_rows_name_file_line_and_field(tmp_path):
    good = {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
    _write(tmp_path / "arc" / "test.jsonl", [good, {k: v for k, v in good.items() if k != "answerKey"}])
    with pytest.raises(h4.H4DataError, match=r"arc/test\.jsonl:2: missing field 'answerKey'"):
        h4.load_split(tmp_path, h4.TASKS["arc"], "test")
    _write(tmp_path / "arc" / "test.jsonl", [good, dict(good, answerKey="E")])
    with pytest.raises(h4.H4DataError, match=r"test\.jsonl:2: field 'answerKey' = 'E' is not one of"):
        h4.load_split(tmp_path, h4.TASKS["arc"], "test")
    _write(tmp_path / "arc" / "test.jsonl", ["{not json"])
    with pytest.raises(h4.H4DataError, match=r"test\.jsonl:1: not valid JSON"):
        h4.load_split(tmp_path, h4.TASKS["arc"], "test")
    _write(tmp_path / "truthfulqa" / "validation.jsonl",
           [{"question": "q", "mc2_targets": {"choices": ["a", "b"], "labels": [1]}}])
    with pytest.raises(h4.H4DataError, match=r"validation\.jsonl:1: field 'mc2_targets.labels'"):
        h4.load_split(tmp_path, h4.TASKS["truthfulqa"], "validation")
    _write(tmp_path / "hellaswag" / "validation.jsonl",
           [{"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["d", "e"], "label": ""}])
    with pytest.raises(h4.H4DataError, match=r"validation\.jsonl:1: field 'label' must be an integer"):
        h4.load_split(tmp_path, h4.TASKS["hellaswag"], "validation")
    _write(tmp_path / "mmlu" / "test.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(h4.H4DataError, match=r"mmlu/test\.jsonl:1: missing field 'subject'"):
        h4.load_split(tmp_path, h4.TASKS["mmlu"], "test")


def test_missing_split_names_the_places_searched(tmp_path):
    with pytest.raises(h4.H4DataError, match=r"mmlu: no 'dev' split file .* found in any of: .*/mmlu"):
        h4.load_split(tmp_path, h4.TASKS["mmlu"], "dev")


def test_hf_shard_names_and_json_lists_are_found(tmp_path):
    row = {"question": "q", "mc2_targets": {"choices": ["a", "b"], "labels": [1, 0]}}
    d = tmp_path / "truthful_qa" / "multiple_choice"
    d.mkdir(parents=True)
    (d / "validation-00000-of-00001.json").write_text(json.dumps([row, row]))
    docs = h4.load_split(tmp_path, h4.TASKS["truthfulqa"], "validation")
    assert len(docs) == 2 and docs[1].origin.endswith("validation-00000-of-00001.json:row 1")


class UnigramModel(torch.nn.Module):
    """hidden_states are a constant 1, lm_head's weight is the logit of each token:
    log p(token | anything) = UNIGRAM[token] by construction."""

    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, len(UNIGRAM), bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, 0.5])[:, None])

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None):
        return torch.ones(*input_ids.shape, 1)


def test_model_score_fn_through_the_fused_logprob_path():
    score = ll.model_score_fn(UnigramModel(), "cpu")
    pairs = [([1, 2], [3, 3]), ([4], [0]), ([2, 2, 2, 2], [5])]
    got = ll.batched_loglikelihoods(score, pairs, batch_size=2, pad_id=0)
    assert got == pytest.approx([2 * UNIGRAM[3].item(), UNIGRAM[0].item(), UNIGRAM[5].item()], rel=1e-6)
    # the runner: strings -> ids via a tokenizer -> the same sums; "x" and "y" map to ids 4 and 5
    runner = ll.LoglikelihoodRunner(score, lambda s: [{"x": 4, "y": 5, " ": 2}[c] for c in s], progress=False)
    assert runner([("xx ", "y"), ("x", " y")]) == pytest.approx(
        [UNIGRAM[2].item() + UNIGRAM[5].item()] * 2, rel=1e-6)
