"""Chat templates: the built-in ones and the jinja sandbox they (and a model's own) render in.

Templates render as transformers' apply_chat_template renders them (tests/test_chat_templates.py
compares every family's published template with transformers' output, tests/fixtures/templates/):
jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols
extension, a pass-through `{% generation %}` tag, `raise_exception`, `strftime_now`, a `tojson` that
does not HTML-escape, a `dict` constructor and a `namespace` that refuses underscore names. The
messages are cleaned the same way first (template_messages: keys whose value is None dropped, a
message's reasoning under any of its names passed as `reasoning_content` and `thinking`).
sdpo.data.tokenizer.Tokenizer.apply_chat_template supplies the variables (`messages`,
`add_generation_prompt`, `tools=None`, `documents=None`, the special tokens that are set, and template
keywords such as Qwen3's and SmolLM3's `enable_thinking`).
"""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


# Built-in templates for models whose tokenizer_config.json has no chat_template.
# Each reproduces a published template; the comment says whose, and
# tests/test_tokenizer.py checks the rendered strings literally.
CHAT_TEMPLATES: dict[str, str] = {
    # No template (TRL's behaviour for plain-string prompts): the prompt is the messages'
    # texts joined by a blank line (one message: its text unchanged), no generation prompt,
    # and the response follows it directly.
    "none": (
        "{% for message in messages %}{% if not loop.first %}{{ '\n\n' }}{% endif %}"
        "{{ message['content'] }}{% endfor %}"
    ),
    # The ChatML template transformers used as its class default (also what
    # teknium/OpenHermes-2.5-Mistral-7B publishes): "<|im_start|>{role}\n{content}<|im_end|>\n".
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # meta-llama/Llama-2-7b-chat-hf: the system prompt goes inside the first [INST]
    # as <<SYS>>\n...\n<</SYS>>\n\n; every user turn opens with BOS; the assistant
    # turn is " {content} </s>". There is no generation prompt: "[/INST]" is it.
    "llama-2": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + content.strip() + ' ' + eos_token }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    # mistralai/Mistral-7B-Instruct-v0.2 (the 2024 revision of its
    # tokenizer_config.json, which Mixtral-8x7B-Instruct-v0.1 shares): one BOS, an
    # optional system message folded into the first user turn with a blank line,
    # " [INST] {user} [/INST]" and " {assistant}</s>". No generation prompt.
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set loop_messages = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system_message is defined %}"
        "{{ ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + message['content'] + eos_token }}"
        "{% else %}"
        "{{ raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    # HuggingFaceH4/zephyr-7b-beta: "<|{role}|>\n{content}</s>\n" per turn and
    # "<|assistant|>\n" as the generation prompt. The published template puts
    # newlines between its tags; trim_blocks removes those after block tags but
    # keeps the one after each {{ }}, hence the '\n' written out here.
    "zephyr": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token + '\n' }}"
        "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token + '\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}"
    ),
    # upstage/SOLAR-10.7B-Instruct-v1.0 (the sDPO paper's model family):
    # "### System:\n{s}\n\n" (skipped when empty), "### User:\n{u}\n\n",
    # "### Assistant:\n{a}" with no terminator; generation prompt "### Assistant:\n".
    "solar": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{% if message['content'] %}{{ '### System:\n' + message['content'] + '\n\n' }}{% endif %}"
        "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Assistant:\n' + message['content'] }}"
        "{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
        "{% endfor %}"
    ),
}


# ---------------------------------------------------------------------------- jinja


class _GenerationTag(jinja2.ext.Extension):
    # transformers marks assistant text with {% generation %}...{% endgeneration %}
    # to find it later; rendering is unaffected, so the body passes through.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class TemplateRaised(Exception):
    """A template called raise_exception(message): it rejects the conversation."""


def _raise_exception(message):
    raise TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes <, >, & and ' — wrong for prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    # `namespace(...)` / `{% set ns.x = ... %}`; names starting with "_" could reach interpreter
    # internals, so they are refused (transformers refuses them too).
    def __init__(*args, **kwargs):  # no named `self`: namespace(self=...) stays a valid attribute
        ns, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(ns, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set the namespace attribute {name!r}")


class _Dict:
    # `dict(...)` and `dict.fromkeys(...)` in templates, without exposing the dict type itself.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def template_messages(messages) -> list[dict]:
    """The messages a template sees: copies, keys whose value is None dropped (a template tests `is defined`,
    not `is none`), and a message's reasoning under any of its names also as `reasoning_content` (what
    Qwen3's template reads) and `thinking`."""
    out = []
    for m in messages:
        m = {k: v for k, v in dict(m).items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_KEYS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def compile_template(source: str) -> jinja2.Template:
    """Compile `source` in the sandbox; a syntax error raises jinja2.TemplateSyntaxError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)
