import io
import json
import random
import shutil
from datetime import datetime
from types import SimpleNamespace

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from sdpo.data.tokenizer import CHAT_TEMPLATES, TokenizerError, check_vocab, load_tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog while hello world models learn "
         "preference pairs chosen rejected reference policy step data").split()


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + rng.choice(".!?,")
            for _ in range(n)]


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")


# ------------------------------------------------------------------ fixtures

BPE_VOCAB = 320  # 256 byte symbols + 5 specials + merges; the corpus supports ~360
BPE_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4

# Exercises what transformers' environment provides: lstrip_blocks/trim_blocks
# (indented block tags on their own lines leave nothing behind), raise_exception,
# the non-escaping tojson, {% generation %}, bos_token.
BPE_TEMPLATE = """{{ bos_token }}{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unsupported role: ' + m['role']) }}
    {% endif %}
    {% generation %}[{{ m['role'] }}]{{ m['content'] | tojson }}{% endgeneration %}
{% endfor %}
{% if add_generation_prompt %}
    [assistant]
{% endif %}"""


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    tok = RawTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=BPE_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(d / "tokenizer.json"))
    write_json(d / "tokenizer_config.json", {
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "eos_token": "</s>",
        "chat_template": BPE_TEMPLATE,
    })
    # special_tokens_map.json overrides tokenizer_config.json, as in transformers.
    write_json(d / "special_tokens_map.json", {"eos_token": {"content": "<|im_end|>"}})
    return d


@pytest.fixture(scope="module")
def raw_bpe(bpe_dir):
    return RawTokenizer.from_file(str(bpe_dir / "tokenizer.json"))


def _train_sp(model_type="bpe", vocab_size=120):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
        remove_extra_whitespaces=False,  # as in Llama's tokenizer.model: spaces survive
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def sp_proto():
    return _train_sp()


@pytest.fixture(scope="module")
def sp(sp_proto):
    return spm.SentencePieceProcessor(model_proto=sp_proto)


def make_sp_dir(root, proto, config):
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(proto)
    write_json(root / "tokenizer_config.json", config)
    return root


def sp_config(n, **extra):
    # Llama-style: <s>/</s> as AddedToken dicts, ChatML tokens appended after the
    # sentencepiece vocabulary (ids n, n+1) as transformers saves them.
    cfg = {
        "bos_token": {"content": "<s>", "lstrip": False, "rstrip": False},
        "eos_token": {"content": "</s>", "lstrip": False, "rstrip": False},
        "unk_token": "<unk>",
        "add_bos_token": True,
        "added_tokens_decoder": {
            "0": {"content": "<unk>", "special": True},
            "1": {"content": "<s>", "special": True},
            "2": {"content": "</s>", "special": True},
            str(n): {"content": "<|im_start|>", "special": True},
            str(n + 1): {"content": "<|im_end|>", "special": True},
        },
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, sp_proto, sp):
    return make_sp_dir(tmp_path_factory.mktemp("sp"), sp_proto, sp_config(sp.get_piece_size()))


# ------------------------------------------------------------------ tokenizers backend

ROUND_TRIP = [
    "the quick brown fox.",
    "  two  leading spaces and\ttabs\nnew lines\n\n",
    "unicode: héllo wörld — ✓ 日本",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_bpe_round_trip(bpe_dir, text):
    tok = load_tokenizer(bpe_dir)
    assert tok.decode(tok.encode(text)) == text


def test_bpe_special_tokens_in_text(bpe_dir, raw_bpe):
    tok = load_tokenizer(bpe_dir)
    start, end = raw_bpe.token_to_id("<|im_start|>"), raw_bpe.token_to_id("<|im_end|>")
    assert (start, end) == (3, 4)
    body = raw_bpe.encode("user\nhello world", add_special_tokens=False).ids
    ids = tok.encode("<|im_start|>user\nhello world<|im_end|>")
    assert ids == [start] + body + [end]
    assert tok.encode("a<s>b") == [raw_bpe.token_to_id("a"), 1, raw_bpe.token_to_id("b")]
    assert tok.decode(ids) == "<|im_start|>user\nhello world<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhello world"


def test_bpe_add_special_tokens_follows_post_processor(bpe_dir, raw_bpe):
    tok = load_tokenizer(bpe_dir)
    plain = raw_bpe.encode("hello world", add_special_tokens=False).ids
    assert tok.encode("hello world") == plain
    assert tok.encode("hello world", add_special_tokens=True) == [1] + plain


def test_bpe_properties(bpe_dir, raw_bpe):
    tok = load_tokenizer(bpe_dir)
    assert tok.bos_token == "<s>" and tok.bos_id == 1
    assert tok.eos_token == "<|im_end|>" and tok.eos_id == 4  # from special_tokens_map.json
    assert tok.pad_id == 4  # no pad token: falls back to eos
    assert tok.vocab_size == BPE_VOCAB == raw_bpe.get_vocab_size(with_added_tokens=True)
    assert tok.chat_template == BPE_TEMPLATE


def test_bpe_added_token_past_vocab_counts_in_vocab_size(tmp_path, bpe_dir):
    raw = RawTokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    raw.add_special_tokens(["<|tool|>"])
    d = tmp_path / "m"
    d.mkdir()
    raw.save(str(d / "tokenizer.json"))
    tok = load_tokenizer(d)
    assert tok.vocab_size == BPE_VOCAB + 1
    assert tok.encode("<|tool|>") == [BPE_VOCAB]


def test_config_special_token_that_is_a_plain_vocab_entry(tmp_path):
    # tokenizer.json knows "<s>" only as an ordinary word; the config's bos_token
    # makes it a special token, so "<s>" in text maps to its id (as in transformers).
    raw = RawTokenizer(models.WordLevel({"<s>": 0, "hi": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    assert raw.encode("<s>hi").ids == [2, 2, 2, 1]
    write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<s>"})
    tok = load_tokenizer(tmp_path)
    assert tok.encode("<s>hi") == [0, 1]
    assert tok.decode([0, 1], skip_special_tokens=True) == "hi"


def test_pad_falls_back_to_zero_without_eos(tmp_path, bpe_dir):
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)  # no tokenizer_config.json at all
    assert tok.bos_id is None and tok.eos_id is None and tok.pad_id == 0
    assert tok.encode("hello", add_special_tokens=True)[0] == 1  # the post-processor still adds <s>


def test_explicit_pad_token(tmp_path, bpe_dir):
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    write_json(tmp_path / "tokenizer_config.json", {"eos_token": "</s>", "pad_token": "<unk>"})
    tok = load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.pad_id) == (2, 0)


def test_tokenizer_json_preferred_over_model(tmp_path, bpe_dir, sp_proto):
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.model").write_bytes(sp_proto)
    assert load_tokenizer(tmp_path).backend == "tokenizers"


# ------------------------------------------------------------------ sentencepiece backend


@pytest.mark.parametrize("text", ["the quick brown fox.", "hello  world models learn ", "data, step! policy?"])
def test_sp_plain_text_matches_sentencepiece_and_round_trips(sp_dir, sp, text):
    tok = load_tokenizer(sp_dir)
    # legacy (transformers' default): plain text is exactly sp.encode, dummy prefix included.
    assert tok.encode(text) == sp.encode(text)
    assert sp.id_to_piece(tok.encode(text)[0]).startswith("\u2581")
    assert tok.decode(tok.encode(text)) == text


def test_sp_special_tokens_in_text_legacy(sp_dir, sp):
    tok = load_tokenizer(sp_dir)
    n = sp.get_piece_size()
    # The LlamaTokenizer docstring example: "Hello <s>." -> ▁Hello ▁ <s> ▁.
    assert tok.encode("hello <s>.") == sp.encode("hello ") + [1] + sp.encode(".")
    after = tok.encode("hello <s>.")
    assert sp.id_to_piece(after[after.index(1) + 1]).startswith("\u2581")  # the chunk after <s> got a prefix
    ids = tok.encode("<|im_start|>user\nhello<|im_end|></s>")
    assert ids == [n] + sp.encode("user\nhello") + [n + 1, 2]
    assert tok.decode([n] + sp.encode("user") + [n + 1]) == "<|im_start|>user<|im_end|>"
    assert tok.decode([1] + sp.encode("hello world") + [2], skip_special_tokens=True) == "hello world"
    assert tok.decode([1] + sp.encode("hello world") + [2]) == "<s>hello world</s>"


def test_sp_add_special_tokens(sp_dir, sp, tmp_path, sp_proto):
    tok = load_tokenizer(sp_dir)
    assert tok.encode("hello", add_special_tokens=True) == [1] + sp.encode("hello")
    d = make_sp_dir(tmp_path / "nobos", sp_proto,
                    sp_config(sp.get_piece_size(), add_bos_token=False, add_eos_token=True))
    assert load_tokenizer(d).encode("hello", add_special_tokens=True) == sp.encode("hello") + [2]


def test_sp_properties(sp_dir, sp):
    tok = load_tokenizer(sp_dir)
    n = sp.get_piece_size()
    assert n == 120
    assert (tok.bos_token, tok.bos_id, tok.eos_token, tok.eos_id) == ("<s>", 1, "</s>", 2)
    assert tok.pad_id == 2
    assert tok.vocab_size == n + 2  # the two ChatML tokens sit after the sp vocabulary
    assert tok.chat_template is None
    assert tok.backend == "sentencepiece"


def test_sp_non_legacy_no_prefix_after_special(tmp_path, sp_proto, sp):
    d = make_sp_dir(tmp_path / "nl", sp_proto, sp_config(sp.get_piece_size(), legacy=False))
    tok = load_tokenizer(d)
    # Plain text: one "▁" in front of the whole text, same pieces as the dummy prefix.
    assert tok.encode("hello world") == sp.encode("hello world")
    # After a special token the chunk gets no "▁": "<s>." -> <s> .  (not ▁.)
    ids = tok.encode("<s>hello")
    assert ids[0] == 1
    pieces = [sp.id_to_piece(i) for i in ids[1:]]
    assert "".join(pieces) == "hello", pieces
    assert tok.encode("hello <s>.")[-2:] == [1, sp.piece_to_id(".")]
    assert tok.encode("hello <s>.")[:-2] == sp.encode("hello ")


def test_sp_defaults_from_model_without_config(tmp_path, sp_proto):
    (tmp_path / "tokenizer.model").write_bytes(sp_proto)
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token, tok.bos_id, tok.eos_id) == ("<s>", 1, 2)
    assert tok.encode("<s>") == [1]


def test_sp_added_tokens_json(tmp_path, sp_proto, sp):
    n = sp.get_piece_size()
    d = make_sp_dir(tmp_path / "at", sp_proto, {"additional_special_tokens": ["<tool>"]})
    write_json(d / "added_tokens.json", {"<tool>": n})
    tok = load_tokenizer(d)
    assert tok.encode("<tool>hello") == [n] + sp.encode("hello")
    assert tok.vocab_size == n + 1
    assert tok.decode([n] + sp.encode("hello"), skip_special_tokens=True) == "hello"


def test_sp_added_token_flags(tmp_path, sp_proto, sp):
    n = sp.get_piece_size()
    cfg = sp_config(n)
    cfg["added_tokens_decoder"][str(n + 2)] = {"content": "<x>", "special": False}
    cfg["added_tokens_decoder"][str(n + 3)] = {"content": "<y>", "special": True, "lstrip": True, "rstrip": True}
    tok = load_tokenizer(make_sp_dir(tmp_path / "flags", sp_proto, cfg))
    ids = [n + 2] + sp.encode("hello") + [n + 3, 2]
    assert tok.decode(ids, skip_special_tokens=True) == "<x>hello"  # non-special added tokens stay
    # lstrip/rstrip swallow the spaces around <y>, as transformers' AddedToken does.
    assert tok.encode("hello <y> world") == sp.encode("hello") + [n + 3] + sp.encode("world")
    assert tok.encode("hello <x> world") == sp.encode("hello ") + [n + 2] + sp.encode(" world")
    assert sp.encode("hello ") != sp.encode("hello") and sp.encode(" world") != sp.encode("world")


def test_sp_unigram_model(tmp_path):
    proto = _train_sp("unigram", 50)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    tok = load_tokenizer(make_sp_dir(tmp_path / "uni", proto, sp_config(sp.get_piece_size())))
    text = "the lazy dog learns preference pairs."
    assert tok.encode(text) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == text


# ------------------------------------------------------------------ chat templates

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "Hi there"}
ASSISTANT = {"role": "assistant", "content": "Hello."}

# name -> (full conversation, prompt with generation prompt, prompt without)
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n",
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n",
    ),
    "llama-2": (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello. </s>",
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST]",
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST]",
    ),
    "mistral": (
        "<s> [INST] You are terse.\n\nHi there [/INST] Hello.</s>",
        "<s> [INST] You are terse.\n\nHi there [/INST]",
        "<s> [INST] You are terse.\n\nHi there [/INST]",
    ),
    "zephyr": (
        "<|system|>\nYou are terse.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello.</s>\n",
        "<|system|>\nYou are terse.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n",
        "<|system|>\nYou are terse.</s>\n<|user|>\nHi there</s>\n",
    ),
    "none": (
        "You are terse.\n\nHi there\n\nHello.",
        "You are terse.\n\nHi there",
        "You are terse.\n\nHi there",
    ),
    "solar": (
        "### System:\nYou are terse.\n\n### User:\nHi there\n\n### Assistant:\nHello.",
        "### System:\nYou are terse.\n\n### User:\nHi there\n\n### Assistant:\n",
        "### System:\nYou are terse.\n\n### User:\nHi there\n\n",
    ),
}


def test_every_builtin_template_has_an_expected_rendering():
    assert set(EXPECTED) == set(CHAT_TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_templates(sp_dir, name):
    tok = load_tokenizer(sp_dir, chat_template=name)
    full, prompt_gen, prompt = EXPECTED[name]
    assert tok.chat_template == CHAT_TEMPLATES[name]
    assert tok.apply_chat_template([SYSTEM, USER, ASSISTANT]) == full
    assert tok.apply_chat_template([SYSTEM, USER], add_generation_prompt=True) == prompt_gen
    assert tok.apply_chat_template([SYSTEM, USER], add_generation_prompt=False) == prompt


def test_multi_turn_builtin_templates(sp_dir):
    turns = [SYSTEM, USER, ASSISTANT, {"role": "user", "content": "Again"}]
    llama = load_tokenizer(sp_dir, chat_template="llama-2")
    assert llama.apply_chat_template(turns) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello. </s><s>[INST] Again [/INST]")
    mistral = load_tokenizer(sp_dir, chat_template="mistral")
    assert mistral.apply_chat_template(turns) == (
        "<s> [INST] You are terse.\n\nHi there [/INST] Hello.</s> [INST] Again [/INST]")
    solar = load_tokenizer(sp_dir, chat_template="solar")
    assert solar.apply_chat_template([{"role": "system", "content": ""}, USER], add_generation_prompt=True) == (
        "### User:\nHi there\n\n### Assistant:\n")  # an empty system message is skipped


def test_builtin_templates_raise_on_bad_roles(sp_dir):
    with pytest.raises(TokenizerError, match="roles must alternate"):
        load_tokenizer(sp_dir, chat_template="llama-2").apply_chat_template([USER, USER])
    with pytest.raises(TokenizerError, match="Only user and assistant roles"):
        load_tokenizer(sp_dir, chat_template="mistral").apply_chat_template([USER, {"role": "tool", "content": "x"}])


def test_config_template_renders_like_hf(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    msgs = [{"role": "user", "content": 'say "hi" <b> & é'}]
    # tojson without HTML escaping and without \u escapes; indented block-tag lines
    # leave nothing, but indentation before plain text ("    [assistant]") stays.
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == (
        '<s>[user]"say \\"hi\\" <b> & é"    [assistant]\n')
    assert tok.apply_chat_template(msgs + [ASSISTANT]) == '<s>[user]"say \\"hi\\" <b> & é"[assistant]"Hello."'


def test_published_zephyr_template_matches_builtin(tmp_path, bpe_dir, sp_dir):
    # The text of HuggingFaceH4/zephyr-7b-beta's tokenizer_config.json chat_template,
    # with its newlines between tags: trim_blocks/lstrip_blocks must make it render
    # exactly like our one-line version.
    published = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
                 "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
                 "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
                 "{% elif message['role'] == 'assistant' %}\n"
                 "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
                 "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
    d = tmp_path / "z"
    shutil.copytree(sp_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = published
    write_json(d / "tokenizer_config.json", cfg)
    tok = load_tokenizer(d)
    full, prompt_gen, prompt = EXPECTED["zephyr"]
    assert tok.apply_chat_template([SYSTEM, USER, ASSISTANT]) == full
    assert tok.apply_chat_template([SYSTEM, USER], add_generation_prompt=True) == prompt_gen


def test_raise_exception_surfaces(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    with pytest.raises(TokenizerError, match="unsupported role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_globals(sp_dir):
    tok = load_tokenizer(sp_dir, chat_template="{{ strftime_now('%Y') }}|{% if tools is not none %}T{% endif %}"
                                               "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                                               "{{ m['content'] }}{% endfor %}|{{ unk_token }}")
    year = str(datetime.now().year)
    assert tok.apply_chat_template([USER, ASSISTANT]) == f"{year}|Hi there|<unk>"


def test_template_list_picks_default(tmp_path, sp_dir):
    d = tmp_path / "list"
    shutil.copytree(sp_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                            {"name": "default", "template": "D:{{ messages[0]['content'] }}"}]
    write_json(d / "tokenizer_config.json", cfg)
    assert load_tokenizer(d).apply_chat_template([USER]) == "D:Hi there"
    cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}]
    write_json(d / "tokenizer_config.json", cfg)
    with pytest.raises(TokenizerError, match="no 'default'.*tool_use"):
        load_tokenizer(d)


def test_chat_template_jinja_file(tmp_path, sp_dir):
    d = tmp_path / "jf"
    shutil.copytree(sp_dir, d)
    (d / "chat_template.jinja").write_text("J:{{ messages[0]['role'] }}")
    assert load_tokenizer(d).apply_chat_template([USER]) == "J:user"


def test_override_replaces_config_template(bpe_dir):
    tok = load_tokenizer(bpe_dir, chat_template="solar")
    assert tok.apply_chat_template([USER], add_generation_prompt=True) == "### User:\nHi there\n\n### Assistant:\n"


# ------------------------------------------------------------------ errors


def test_error_missing_directory(tmp_path):
    with pytest.raises(TokenizerError, match="nope.*not a directory.*tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "nope")


def test_error_no_tokenizer_file(tmp_path):
    write_json(tmp_path / "tokenizer_config.json", {})
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_error_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot load"):
        load_tokenizer(tmp_path)


def test_error_corrupt_sentencepiece_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01not a model" * 10)
    with pytest.raises(TokenizerError, match="tokenizer.model: cannot load as a sentencepiece model"):
        load_tokenizer(tmp_path)


def test_error_bad_config_json(tmp_path, sp_proto):
    (tmp_path / "tokenizer.model").write_bytes(sp_proto)
    (tmp_path / "tokenizer_config.json").write_text("{bad json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: cannot read as JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="expected a JSON object"):
        load_tokenizer(tmp_path)


def test_error_bad_special_token_field(tmp_path, sp_proto):
    make_sp_dir(tmp_path, sp_proto, {"bos_token": 5})
    with pytest.raises(TokenizerError, match="tokenizer_config.json: bos_token: expected a string"):
        load_tokenizer(tmp_path)


def test_error_special_token_not_in_vocab(tmp_path, bpe_dir):
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<|endoftext|>"})
    with pytest.raises(TokenizerError, match="eos_token '<\\|endoftext\\|>' is not in the vocabulary"):
        load_tokenizer(tmp_path)


def test_error_bad_added_tokens_decoder_key(tmp_path, sp_proto):
    make_sp_dir(tmp_path, sp_proto, {"added_tokens_decoder": {"x": {"content": "<t>"}}})
    with pytest.raises(TokenizerError, match="added_tokens_decoder key 'x' is not an integer"):
        load_tokenizer(tmp_path)


def test_error_no_chat_template(sp_dir):
    tok = load_tokenizer(sp_dir)
    with pytest.raises(TokenizerError, match="no chat_template.*chat_template=.*chatml"):
        tok.apply_chat_template([USER])


def test_error_unknown_template_name(sp_dir):
    with pytest.raises(TokenizerError, match="unknown chat template name 'vicuna'.*chatml, llama-2, mistral, none, solar, zephyr"):
        load_tokenizer(sp_dir, chat_template="vicuna")


def test_error_template_syntax(sp_dir):
    with pytest.raises(TokenizerError, match="chat_template argument: chat template line 2"):
        load_tokenizer(sp_dir, chat_template="ok\n{% for m in messages %}{{ m }")


def test_error_template_runtime(sp_dir):
    tok = load_tokenizer(sp_dir, chat_template="{{ messages[0]['content'].nosuch() }}")
    with pytest.raises(TokenizerError, match="failed to render"):
        tok.apply_chat_template([USER])


def test_error_decode_out_of_range(sp_dir):
    with pytest.raises(TokenizerError, match="id 9999 is outside the vocabulary"):
        load_tokenizer(sp_dir).decode([9999])


def test_check_vocab(sp_dir, sp):
    tok = load_tokenizer(sp_dir)
    n = sp.get_piece_size() + 2
    check_vocab(tok, SimpleNamespace(vocab_size=n))
    check_vocab(tok, SimpleNamespace(vocab_size=256))  # embedding padded past the tokenizer: fine
    with pytest.raises(TokenizerError, match=f"vocab_size {n}.*vocab_size {n - 1}"):
        check_vocab(tok, SimpleNamespace(vocab_size=n - 1))
