"""Tokenizers and chat templates for Hugging Face model directories, without transformers.

A model directory holds `tokenizer.json` (read by the `tokenizers` library) and/or
`tokenizer.model` (a sentencepiece model); tokenizer.json wins when both exist, as
it does in transformers' fast tokenizers. Special tokens come from
tokenizer_config.json, special_tokens_map.json (which overrides the former, as in
transformers' `from_pretrained`) and the added-token tables.

Rules this module follows (each one matches what transformers does unless said):

* Special-token text inside `text` ("<s>", "<|im_end|>", any added token) encodes
  to its id with both backends. `tokenizers` does it itself; for sentencepiece we
  split the text on the added/special token strings and encode the pieces between.
* Sentencepiece leading space. A llama-style model has `add_dummy_prefix`, so
  `sp.encode("Hi")` is `["▁Hi"]`. transformers' slow LlamaTokenizer has two modes:
  - `legacy` true (its default when tokenizer_config.json says nothing): every
    chunk between special tokens is encoded by sentencepiece on its own, so each
    chunk gets the dummy "▁" prefix: "Hello <s>." -> ▁Hello ▁ <s> ▁. . For plain
    text this is exactly `sp.encode(text)`.
  - `legacy: false`: "▁" is put in front of the whole text once (when
    `add_prefix_space`, default true) and chunks after a special token get no
    prefix: "<s>Hello" -> <s> Hello. transformers strips the dummy prefix by
    editing the model's protobuf; we get the same pieces without protobuf by
    encoding `unk_piece + chunk` and dropping the unk piece's own pieces (the
    trick transformers itself uses for chunks that start with a space).
* add_special_tokens=True: the `tokenizers` backend runs tokenizer.json's
  post-processor (whatever BOS/EOS it adds); the sentencepiece backend prepends
  BOS when `add_bos_token` (default true, LlamaTokenizer's default) and appends EOS
  when `add_eos_token` (default false).
* decode: runs of ordinary ids go through the backend's decoder; for sentencepiece
  each run between special tokens is decoded on its own (so its leading "▁" is
  dropped, undoing the dummy prefix) and special tokens are inserted verbatim.
  transformers' slow decode can also add a space before a special token (legacy)
  and `clean_up_tokenization_spaces` rewrites " ." to "."; we do neither, so
  decode(encode(text)) == text for text sentencepiece's normaliser leaves alone.
* pad_id: the pad token's id; without one, eos_id; without that, 0. Padding
  positions are masked everywhere in sdpo, so the fallback only needs a valid id.
* vocab_size is max id + 1 over the base vocabulary and all added tokens, i.e. the
  smallest embedding the ids fit in.
* Chat templates (the built-in CHAT_TEMPLATES and the jinja sandbox that renders
  them and a model's own) live in sdpo/data/chat_templates.py; apply_chat_template passes
  `messages` (cleaned by template_messages), `add_generation_prompt`, `tools=None`,
  `documents=None`, the special tokens that are set (bos_token, eos_token, unk_token,
  pad_token, ...) and the template keywords (`template_kwargs` of load_tokenizer, e.g.
  enable_thinking=False; keywords given to the call win) as variables, as transformers'
  apply_chat_template does.
* `adds_bos`: whether encode(text, add_special_tokens=True) puts BOS in front, i.e. what
  transformers' `tokenizer(text)` does: the tokenizer.json post-processor decides for
  `tokenizers`, add_bos_token (default true) for sentencepiece. sdpo.data.pairs uses it for
  prompts whose template does not write BOS itself.
"""
from __future__ import annotations

import json
import os
import re
from functools import cached_property

import jinja2
import sentencepiece as spm
import tokenizers

from sdpo.data.chat_templates import CHAT_TEMPLATES, TemplateRaised, compile_template, template_messages


class TokenizerError(ValueError):
    pass


def parse_template_kwargs(items: list[str]) -> dict:
    """Command-line --template-kwarg KEY=VALUE items -> chat-template variables; VALUE is read as
    JSON (enable_thinking=false -> False), a bare word as a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise TokenizerError(f"--template-kwarg {item!r}: expected KEY=VALUE (e.g. enable_thinking=false)")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _compile_template(source: str, origin: str) -> jinja2.Template:
    try:
        return compile_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{origin}: chat template line {e.lineno}: {e.message}") from e


# ---------------------------------------------------------------------------- files


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read as JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value, where: str) -> str | None:
    # bos_token etc. are a string, an AddedToken dict {"content": ...}, or null.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a string or {{\"content\": ...}}, got {value!r}")


def _pick_template(value, origin: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    # transformers saves several templates as [{"name": ..., "template": ...}].
    if isinstance(value, list) and all(isinstance(t, dict) and "name" in t and "template" in t for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" in named:
            return named["default"]
        raise TokenizerError(f"{origin}: chat_template list has no 'default' entry (names: {sorted(named)})")
    raise TokenizerError(f"{origin}: chat_template must be a string or a list of {{name, template}}, got {value!r}")


class _AddedToken:
    __slots__ = ("content", "id", "special", "lstrip", "rstrip")

    def __init__(self, content, id, special=True, lstrip=False, rstrip=False):
        self.content, self.id, self.special, self.lstrip, self.rstrip = content, id, special, lstrip, rstrip


# ---------------------------------------------------------------------------- backends


class _HFTokenizersBackend:
    def __init__(self, file: str):
        try:
            self.tok = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise TokenizerError(f"{file}: cannot load with the tokenizers library ({e})") from e
        self.file = file

    def added_tokens(self) -> list[_AddedToken]:
        return [
            _AddedToken(t.content, i, t.special, t.lstrip, t.rstrip)
            for i, t in sorted(self.tok.get_added_tokens_decoder().items())
        ]

    def register_specials(self, texts):
        # transformers' fast tokenizers register the config's special tokens as added
        # tokens, so "<s>" in text matches even when tokenizer.json only has it as an
        # ordinary vocabulary entry. Strings absent from the vocabulary are left out
        # (transformers would append new ids; bos/eos/pad then fail in Tokenizer).
        have = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        new = [t for t in dict.fromkeys(texts) if t not in have and self.tok.token_to_id(t) is not None]
        if new:
            self.tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in new])

    def token_to_id(self, text):
        return self.tok.token_to_id(text)

    def max_id(self) -> int:
        return max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1)

    def encode(self, text, add_special_tokens):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


class _SentencePieceBackend:
    def __init__(self, file: str, added: list[_AddedToken], legacy: bool, add_prefix_space: bool):
        self.sp = spm.SentencePieceProcessor()
        try:
            with open(file, "rb") as f:
                proto = f.read()
            self.sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad files
            raise TokenizerError(f"{file}: cannot load as a sentencepiece model ({e})") from e
        self.file = file
        self.legacy = legacy
        self.add_prefix_space = add_prefix_space
        # Every added/special token; load_tokenizer sets it before the first encode
        # (_split_re is built from it once).
        self._added = added
        unk = self.sp.unk_id()
        self._unk_piece = self.sp.id_to_piece(unk) if 0 <= unk < self.sp.get_piece_size() else "<unk>"

    def added_tokens(self):
        return self._added

    def token_to_id(self, text):
        for t in self._added:
            if t.content == text:
                return t.id
        i = self.sp.piece_to_id(text)
        # piece_to_id answers unk_id for unknown strings; only the unk piece itself maps there.
        if i == self.sp.unk_id() and text != self._unk_piece:
            return None
        return i

    def max_id(self):
        return max([self.sp.get_piece_size() - 1] + [t.id for t in self._added])

    @cached_property
    def _split_re(self):
        texts = sorted({t.content for t in self._added if t.content}, key=len, reverse=True)
        return re.compile("(" + "|".join(re.escape(t) for t in texts) + ")") if texts else None

    def _encode_no_prefix(self, chunk):
        # sentencepiece always adds the dummy "▁"; prefixing the unk piece gives it
        # something else to attach to, and we drop the unk piece's own ids.
        head = self.sp.encode(self._unk_piece)
        ids = self.sp.encode(self._unk_piece + chunk)
        if ids[: len(head)] == head:
            return ids[len(head):]
        return self.sp.encode(chunk)  # a piece merged across the boundary (rare): keep the plain encoding

    def encode(self, text, add_special_tokens):
        by_text = {t.content: t for t in self._added}
        if not self.legacy:
            text = text.replace("\u2581", " ")
            if self.add_prefix_space:
                text = "\u2581" + text
        parts = self._split_re.split(text) if self._split_re else [text]
        # parts alternates plain text (even indices) and token text (odd indices).
        for k in range(1, len(parts), 2):
            tok = by_text[parts[k]]
            if tok.lstrip:
                parts[k - 1] = parts[k - 1].rstrip()
            if tok.rstrip:
                parts[k + 1] = parts[k + 1].lstrip()
        ids = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(by_text[part].id)
            elif not part:
                continue
            elif self.legacy:
                ids.extend(self.sp.encode(part))
            elif k == 0 and part == "\u2581" and len(parts) > 1 and by_text[parts[1]].special:
                continue  # the added prefix alone before a special token: transformers drops it
            else:
                ids.extend(self._encode_no_prefix(part))
        return ids

    def decode(self, ids, skip_special_tokens):
        by_id = {t.id: t for t in self._added}
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in by_id:
                out.append(self.sp.decode(run))
                run = []
                if not (skip_special_tokens and by_id[i].special):
                    out.append(by_id[i].content)
            elif 0 <= i < self.sp.get_piece_size():
                run.append(i)
            else:
                raise TokenizerError(f"{self.file}: id {i} is outside the vocabulary (0..{self.max_id()})")
        out.append(self.sp.decode(run))
        return "".join(out)


# ---------------------------------------------------------------------------- public


class Tokenizer:
    def __init__(self, path, backend, specials: dict[str, str | None], additional: list[str],
                 chat_template: str | None, template_origin: str, add_bos: bool, add_eos: bool,
                 template_kwargs: dict | None = None):
        self.path = path
        self._backend = backend
        self._specials = specials
        self._additional = additional
        self._add_bos = add_bos
        self._add_eos = add_eos
        self.bos_token = specials.get("bos_token")
        self.eos_token = specials.get("eos_token")
        self.bos_id = self._id_of(self.bos_token, "bos_token")
        self.eos_id = self._id_of(self.eos_token, "eos_token")
        pad = self._id_of(specials.get("pad_token"), "pad_token")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = backend.max_id() + 1
        self.chat_template = chat_template
        self.template_origin = template_origin if chat_template is not None else None  # where it came from, for reports
        self.template_kwargs = dict(template_kwargs or {})
        self._compiled = _compile_template(chat_template, template_origin) if chat_template is not None else None

    def _id_of(self, text, key):
        if text is None:
            return None
        i = self._backend.token_to_id(text)
        if i is None:
            raise TokenizerError(f"{self.path}: {key} {text!r} is not in the vocabulary or the added tokens")
        return i

    @property
    def backend(self) -> str:
        return "tokenizers" if isinstance(self._backend, _HFTokenizersBackend) else "sentencepiece"

    @property
    def special_ids(self) -> set[int]:
        ids = {t.id for t in self._backend.added_tokens() if t.special}
        ids.update(i for i in (self.bos_id, self.eos_id, self._id_of(self._specials.get("pad_token"), "pad_token")) if i is not None)
        return ids

    @cached_property
    def adds_bos(self) -> bool:
        return self.bos_id is not None and self.encode("a", add_special_tokens=True)[:1] == [self.bos_id]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        if isinstance(self._backend, _HFTokenizersBackend):
            return self._backend.encode(text, add_special_tokens)
        ids = self._backend.encode(text, add_special_tokens)
        if add_special_tokens:
            if self._add_bos and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self._add_eos and self.eos_id is not None:
                ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        if self._compiled is None:
            raise TokenizerError(
                f"{self.path}: no chat_template in tokenizer_config.json; pass one with "
                f"load_tokenizer(path, chat_template=NAME_OR_JINJA), NAME one of {sorted(CHAT_TEMPLATES)}"
            )
        variables = {k: v for k, v in self._specials.items() if v is not None}
        if self._additional:
            variables["additional_special_tokens"] = list(self._additional)
        variables.update(self.template_kwargs)
        variables.update(kwargs)  # as in transformers, keywords win over the special tokens
        try:
            return self._compiled.render(
                messages=template_messages(messages), tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **variables,
            )
        except TemplateRaised as e:
            raise TokenizerError(f"chat template rejected the conversation: {e}") from None
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed to render: {type(e).__name__}: {e}") from e

    def __repr__(self):
        return (f"Tokenizer({self.path!r}, backend={self.backend}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad_id={self.pad_id})")


def load_tokenizer(path, chat_template: str | None = None, template_kwargs: dict | None = None) -> Tokenizer:
    """The tokenizer in directory `path`. `chat_template`: a name in CHAT_TEMPLATES or jinja text in place of
    the directory's own template; `template_kwargs`: extra variables every render sees (enable_thinking=False;
    a None value is left out, so an unset config switch leaves the template's default)."""
    path = os.fspath(path)
    if template_kwargs is not None and not (
            isinstance(template_kwargs, dict) and all(isinstance(k, str) and k.isidentifier() for k in template_kwargs)):
        raise TokenizerError(f"template_kwargs must map variable names to values, got {template_kwargs!r}")
    taken = sorted(set(template_kwargs or ()) & {"messages", "add_generation_prompt", "tools", "documents"})
    if taken:
        raise TokenizerError(f"template_kwargs may not set {taken}: the renderer passes those itself")
    template_kwargs = {k: v for k, v in (template_kwargs or {}).items() if v is not None}
    if not os.path.isdir(path):
        raise TokenizerError(f"{path}: not a directory (expected a model directory with tokenizer.json or tokenizer.model)")
    tj, sm = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
    if not os.path.isfile(tj) and not os.path.isfile(sm):
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model found")

    cfg_file = os.path.join(path, "tokenizer_config.json")
    cfg = _read_json(cfg_file)
    stm_file = os.path.join(path, "special_tokens_map.json")
    stm = _read_json(stm_file)

    # tokenizer_config first, special_tokens_map.json over it (transformers' order).
    specials: dict[str, str | None] = {}
    for key in _SPECIAL_KEYS:
        if key in cfg:
            specials[key] = _token_text(cfg[key], f"{cfg_file}: {key}")
        if stm.get(key) is not None:
            specials[key] = _token_text(stm[key], f"{stm_file}: {key}")
    additional = []
    for src, where in ((cfg, cfg_file), (stm, stm_file)):
        extra = src.get("additional_special_tokens") or []
        if not isinstance(extra, list):
            raise TokenizerError(f"{where}: additional_special_tokens must be a list, got {extra!r}")
        additional = [_token_text(t, f"{where}: additional_special_tokens") for t in extra] or additional

    if os.path.isfile(tj):
        backend = _HFTokenizersBackend(tj)
        backend.register_specials([v for v in specials.values() if v] + additional)
    else:
        legacy = cfg.get("legacy")
        backend = _SentencePieceBackend(
            sm, [], legacy=True if legacy is None else bool(legacy),
            add_prefix_space=bool(cfg.get("add_prefix_space", True)),
        )
        # LlamaTokenizer's defaults when the config names no special tokens.
        for key, sp_id in (("bos_token", backend.sp.bos_id()), ("eos_token", backend.sp.eos_id()),
                           ("unk_token", backend.sp.unk_id())):
            if key not in specials and 0 <= sp_id < backend.sp.get_piece_size():
                specials[key] = backend.sp.id_to_piece(sp_id)
        backend._added = _sentencepiece_added_tokens(path, cfg, cfg_file, backend, specials, additional)

    template, origin = _resolve_template(path, cfg, cfg_file, chat_template)
    return Tokenizer(
        path, backend, specials, additional, template, origin,
        add_bos=bool(cfg.get("add_bos_token", True)), add_eos=bool(cfg.get("add_eos_token", False)),
        template_kwargs=template_kwargs,
    )


def _sentencepiece_added_tokens(path, cfg, cfg_file, backend, specials, additional) -> list[_AddedToken]:
    # Every string that must not go through sentencepiece: added tokens (with ids,
    # possibly past the sp vocabulary) and the special tokens that are sp pieces.
    found: dict[str, _AddedToken] = {}
    special_texts = {v for v in specials.values() if v} | set(additional)
    decoder = cfg.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{cfg_file}: added_tokens_decoder must be an object of id -> token")
    for key, tok in decoder.items():
        try:
            i = int(key)
        except ValueError:
            raise TokenizerError(f"{cfg_file}: added_tokens_decoder key {key!r} is not an integer id") from None
        content = _token_text(tok, f"{cfg_file}: added_tokens_decoder[{key}]")
        flags = tok if isinstance(tok, dict) else {}
        special = bool(flags.get("special", False)) or content in special_texts
        found[content] = _AddedToken(content, i, special,
                                     bool(flags.get("lstrip", False)), bool(flags.get("rstrip", False)))
    at_file = os.path.join(path, "added_tokens.json")
    for content, i in _read_json(at_file).items():
        if not isinstance(i, int):
            raise TokenizerError(f"{at_file}: id of {content!r} must be an integer, got {i!r}")
        found.setdefault(content, _AddedToken(content, i, special=content in special_texts))
    for content in [v for v in specials.values() if v] + additional:
        if content not in found:
            i = backend.sp.piece_to_id(content)
            if i != backend.sp.unk_id() or content == backend.sp.id_to_piece(backend.sp.unk_id()):
                found[content] = _AddedToken(content, i)
    for t in found.values():
        if t.id < 0:
            raise TokenizerError(f"{path}: added token {t.content!r} has negative id {t.id}")
    return list(found.values())


def _resolve_template(path, cfg, cfg_file, chat_template):
    if chat_template is not None:
        if chat_template in CHAT_TEMPLATES:
            return CHAT_TEMPLATES[chat_template], f"built-in {chat_template!r} (sdpo.data.chat_templates.CHAT_TEMPLATES)"
        if "{{" in chat_template or "{%" in chat_template:
            return chat_template, "chat_template argument"
        raise TokenizerError(
            f"unknown chat template name {chat_template!r}; valid names: {', '.join(sorted(CHAT_TEMPLATES))} "
            f"(or pass jinja text)"
        )
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):  # newer transformers save the template beside the config
        try:
            with open(jinja_file, encoding="utf-8") as f:
                return f.read(), jinja_file
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_file}: cannot read ({e})") from e
    return _pick_template(cfg.get("chat_template"), cfg_file), cfg_file


def check_vocab(tokenizer, model_config) -> None:
    # An embedding larger than the tokenizer is normal (vocab padded to a multiple
    # of 64/128); a smaller one means some ids would index past the table.
    if tokenizer.vocab_size > model_config.vocab_size:
        raise TokenizerError(
            f"tokenizer at {getattr(tokenizer, 'path', '?')} has vocab_size {tokenizer.vocab_size} "
            f"(max id + 1, added tokens included) but the model's embedding has vocab_size "
            f"{model_config.vocab_size}; the ids would not fit"
        )
