import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm

from sdpo.data.pairs import tokenize_pairs
from sdpo.data.read import DataError, PreferenceExample, read_preferences
from sdpo.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# A contract-following fake tokenizer: one id per character, except the pair "\nA" which
# becomes ONE token (as SentencePiece merges "▁word"), so joint tokenization of a prompt
# ending in "\n" with a response starting with "A" differs from separate tokenization.
# ---------------------------------------------------------------------------


class FakeTokenizer:
    SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|user|>": 3, "<|assistant|>": 4, "<|system|>": 5}
    MERGE = ("\nA", 7)

    def __init__(self, bos=True, template_bos=1):
        self.bos_id = 1 if bos else None
        self.bos_token = "<s>" if bos else None
        self.eos_id, self.eos_token, self.pad_id = 2, "</s>", 0
        self.template_bos = template_bos  # how many "<s>" the template writes in front

    def encode(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            for tok, tid in self.SPECIALS.items():
                if text.startswith(tok, i):
                    ids.append(tid)
                    i += len(tok)
                    break
            else:
                if text.startswith(self.MERGE[0], i):
                    ids.append(self.MERGE[1])
                    i += 2
                else:
                    ids.append(100 + ord(text[i]))
                    i += 1
        return ids

    def apply_chat_template(self, messages, add_generation_prompt=False):
        out = "<s>" * self.template_bos
        for m in messages:
            out += f"<|{m['role']}|>\n{m['content']}</s>"
        return out + ("<|assistant|>\n" if add_generation_prompt else "")


def chars(s):
    return [100 + ord(c) for c in s]



def example(prompt="hi", chosen="Abc", rejected="Abd", source="s", origin="x:1", system=None):
    msgs = ({"role": "user", "content": prompt},)
    if system:
        msgs = ({"role": "system", "content": system},) + msgs
    return PreferenceExample(msgs, chosen, rejected, source, origin)



# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------


def test_prompt_response_boundary_never_merges():
    tok = FakeTokenizer()
    ex = example(prompt="hi", chosen="Abc", rejected="Abd")
    [pair], stats = tokenize_pairs([ex], tok)
    assert stats["responses_encoded_alone"] == 2  # the joint encoding would change the prompt's tokens
    # rendered: <s><|user|>\nhi</s><|assistant|>\n   — ends in "\n", the response starts with "A"
    assert pair.prompt_ids == [1, 3] + chars("\nhi") + [2, 4] + chars("\n")
    assert pair.chosen_ids == chars("Abc") + [2]
    assert pair.rejected_ids == chars("Abd") + [2]
    joint = tok.encode("<s><|user|>\nhi</s><|assistant|>\nAbc</s>")
    assert 7 in joint  # the joint encoding would have merged "\nA" into one token
    assert joint != pair.prompt_ids + pair.chosen_ids


@pytest.mark.parametrize("template_bos", [0, 1, 2])
def test_bos_exactly_once(template_bos):
    tok = FakeTokenizer(template_bos=template_bos)
    [pair], _ = tokenize_pairs([example()], tok)
    assert pair.prompt_ids[:2] == [1, 3]
    assert (pair.prompt_ids + pair.chosen_ids).count(1) == 1


def test_no_bos_when_tokenizer_has_none():
    tok = FakeTokenizer(bos=False, template_bos=0)
    [pair], _ = tokenize_pairs([example()], tok)
    assert pair.prompt_ids[0] == 3


def test_eos_exactly_once_at_end():
    tok = FakeTokenizer()
    [pair], _ = tokenize_pairs([example(chosen="Abc</s>", rejected="xy")], tok)
    assert pair.chosen_ids == chars("Abc") + [2]
    assert pair.rejected_ids == chars("xy") + [2]


def test_no_truncation_when_it_fits():
    tok = FakeTokenizer()
    ex = example(prompt="p" * 10, chosen="a" * 5, rejected="b" * 8)
    [pair], stats = tokenize_pairs([ex], tok, max_length=8 + 10 + 9, max_prompt_length=4)
    # prompt = <s> <|user|> \n p*10 </s> <|assistant|> \n = 16 tokens; 16 + 9 = 25 <= 27
    assert len(pair.prompt_ids) == 16 and pair.rejected_ids == chars("b" * 8) + [2]
    assert stats["truncated_prompts"] == 0 and stats["truncated_rejected"] == 0


def test_prompt_truncation_keep_end_and_keep_start():
    tok = FakeTokenizer()
    ex = example(prompt="0123456789", chosen="ab", rejected="abc")
    full = [1, 3] + chars("\n0123456789") + [2, 4] + chars("\n")  # 16 tokens
    [pair], stats = tokenize_pairs([ex], tok, max_length=12, max_prompt_length=6)
    assert pair.prompt_ids == [1] + full[-5:]  # BOS kept in front, then the last 5 tokens
    assert stats["truncated_prompts"] == 1
    assert pair.chosen_ids == chars("ab") + [2] and pair.rejected_ids == chars("abc") + [2]
    [pair], _ = tokenize_pairs([ex], tok, max_length=12, max_prompt_length=6, truncation="keep_start")
    assert pair.prompt_ids == full[:6]


def test_response_truncation_drops_eos():
    tok = FakeTokenizer()
    ex = example(prompt="p", chosen="abcdefgh", rejected="xy")
    # prompt: <s> <|user|> \n p </s> <|assistant|> \n = 7 tokens; room = 12 - 7 = 5
    [pair], stats = tokenize_pairs([ex], tok, max_length=12, max_prompt_length=10)
    assert len(pair.prompt_ids) == 7  # prompt shorter than max_prompt_length: untouched
    assert pair.chosen_ids == chars("abcde")  # cut, and no EOS
    assert pair.rejected_ids == chars("xy") + [2]  # fits: keeps its EOS
    assert stats["truncated_chosen"] == 1 and stats["truncated_rejected"] == 0


def test_both_rules_in_order():
    tok = FakeTokenizer()
    ex = example(prompt="0123456789", chosen="abcdefghij", rejected="abcXefghij")
    [pair], stats = tokenize_pairs([ex], tok, max_length=10, max_prompt_length=4)
    assert pair.prompt_ids == [1, 2, 4] + chars("\n")  # prompt first: BOS + its last 3 tokens
    assert pair.chosen_ids == chars("abcdef")  # then responses: room = 10 - 4 = 6
    assert pair.rejected_ids == chars("abcXef")
    assert (stats["truncated_prompts"], stats["truncated_chosen"], stats["truncated_rejected"]) == (1, 1, 1)


def test_pairs_without_signal_or_room_are_dropped_and_counted():
    tok = FakeTokenizer()
    exs = [example(chosen="abcdefghij", rejected="abcdefghiX"),  # identical after the cut
           example(chosen="Xb", rejected="Yb"),
           example(prompt="a much longer prompt", chosen="Xb", rejected="Yb")]
    pairs, stats = tokenize_pairs(exs, tok, max_length=12, max_prompt_length=8)
    # prompt "hi": 8 tokens -> room 4: "abcd" vs "abcd" -> dropped
    assert [p.index for p in pairs] == [1, 2]
    assert stats["dropped_identical_after_truncation"] == 1 and stats["dropped_indices"] == [0]
    assert stats["pairs_in"] == 3 and stats["pairs_kept"] == 2
    # max_prompt_length == max_length: a long prompt fills the window, leaving no room
    pairs, stats = tokenize_pairs(exs[2:], tok, max_length=8, max_prompt_length=8)
    assert pairs == [] and stats["dropped_no_room"] == 1


def test_tokenize_argument_errors():
    tok = FakeTokenizer()
    with pytest.raises(DataError, match="truncation"):
        tokenize_pairs([example()], tok, truncation="middle")
    with pytest.raises(DataError, match="max_prompt_length"):
        tokenize_pairs([example()], tok, max_length=8, max_prompt_length=9)
    tok.eos_id = None
    with pytest.raises(DataError, match="no EOS"):
        tokenize_pairs([example()], tok)

def test_demo_tokenizer_with_load_tokenizer():
    tokenizer_mod = pytest.importorskip("sdpo.data.tokenizer")
    tok = tokenizer_mod.load_tokenizer(ROOT / "data" / "tokenizer")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0) and tok.vocab_size <= 400
    exs, _ = read_preferences(ROOT / "data/demo/ultrafeedback/test_prefs.jsonl")
    pairs, stats = tokenize_pairs(exs, tok, max_length=64, max_prompt_length=48)
    assert stats["pairs_kept"] == len(exs)
    for ex, p in zip(exs, pairs):
        text = tok.apply_chat_template(list(ex.prompt), add_generation_prompt=True)
        assert text.startswith("<s><|user|>\n") and text.endswith("</s><|assistant|>\n")
        assert p.prompt_ids.count(tok.bos_id) == 1 and p.prompt_ids[0] == tok.bos_id
        assert p.chosen_ids[-1] == tok.eos_id and p.chosen_ids.count(tok.eos_id) == 1
        # task strings stay one token per character, so a reversed answer tokenizes like its input
        assert len(p.chosen_ids) == len(ex.chosen) + 1 and len(p.rejected_ids) == len(ex.rejected) + 1
        assert tok.decode(p.prompt_ids + p.chosen_ids) == text + ex.chosen + "</s>"

def test_response_ids_are_the_prompts_continuation_with_a_sentencepiece_tokenizer(tmp_path):
    """Llama-style SentencePiece puts a dummy-prefix "▁" in front of text encoded on its own.
    After SOLAR's "### Assistant:\\n" the model reads "Paris", not "▁Paris": the response must
    be tokenized as the continuation of the rendered prompt (and the prompt's ids unchanged)."""
    words = ["Paris", "is", "the", "answer", "capital", "of", "France", "what", "Lyon", "it", "###", "User:",
             "Assistant:"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=330,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, byte_fallback=True,  # as Llama's: "\n" -> <0x0A>
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path, chat_template="solar")

    ex = PreferenceExample(prompt=({"role": "user", "content": "what is the capital of France"},),
                           chosen="Paris is the answer", rejected="Lyon is it", source="s", origin="f:1")
    (pair,), stats = tokenize_pairs([ex], tok)
    text = tok.apply_chat_template(list(ex.prompt), add_generation_prompt=True)
    assert text.endswith("### Assistant:\n")
    for response, ids in ((ex.chosen, pair.chosen_ids), (ex.rejected, pair.rejected_ids)):
        assert pair.prompt_ids + ids == [tok.bos_id] + tok.encode(text + response) + [tok.eos_id]
        alone = tok.encode(response)
        assert ids[0] != alone[0]  # the case matters: on its own the text starts with a "▁" piece
    assert stats["responses_encoded_alone"] == 0



def test_chat_template_none_is_plain_concatenation(tmp_path):
    """model.chat_template = "none" (TRL's plain-string behaviour): BOS, the prompt text as it
    is, then the response and EOS; a system message and the question join with a blank line."""
    tok = load_tokenizer(ROOT / "data" / "tokenizer", chat_template="none")
    f, g = tmp_path / "plain.jsonl", tmp_path / "orca.jsonl"
    f.write_text(json.dumps({"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}) + "\n")
    g.write_text(json.dumps({"system": "Be brief.", "question": "abc?", "chosen": "yes", "rejected": "no"}) + "\n")
    exs = read_preferences(f)[0] + read_preferences(g)[0]
    pairs, _ = tokenize_pairs(exs, tok, max_length=64)
    assert tok.decode(pairs[0].prompt_ids + pairs[0].chosen_ids) == "<s>Q: 2+2?\nA: 4</s>"
    assert tok.decode(pairs[0].prompt_ids + pairs[0].rejected_ids) == "<s>Q: 2+2?\nA: 5</s>"
    assert tok.decode(pairs[1].prompt_ids) == "<s>Be brief.\n\nabc?"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True) == "x"
