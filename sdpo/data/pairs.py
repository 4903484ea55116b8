"""Tokenize preference pairs: chat template, boundary-safe response ids, DPO truncation.

    [PreferenceExample] ──tokenize_pairs──> [TokenizedPair] (prompt_ids, chosen_ids, rejected_ids)

The pairs go on to sdpo/data/packing.py for collation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sdpo.data.read import DataError
from sdpo.data.tokenizer import TokenizerError

@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response ids; end with EOS unless truncated
    rejected_ids: list[int]
    index: int  # position of the example in its step's list (stable id for caches)


def render_prompt(messages, tokenizer) -> str:
    """The prompt turns through the chat template, ending with the generation prompt."""
    return tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True)


def _adds_bos(tokenizer) -> bool:
    # sdpo's Tokenizer says whether tokenizer(text) puts BOS in front; a tokenizer without the
    # attribute is taken to put in front the BOS it has.
    return bool(getattr(tokenizer, "adds_bos", tokenizer.bos_id is not None))


def encode_prompt(messages, tokenizer) -> list[int]:
    """Chat template with the generation prompt, then BOS at most once, at the front:
    - the template wrote BOS (Gemma's, Llama 3's, Mistral's "{{ bos_token }}"): kept once, even when the
      tokenizer would add its own too, or the template wrote it twice;
    - it did not, and the tokenizer puts BOS in front of plain text (Llama 2's sentencepiece, a tokenizer.json
      whose post-processor adds it: what transformers' tokenizer(text) gives): BOS added;
    - otherwise none (Qwen has no BOS token; a tokenizer may also name a BOS that neither puts in front)."""
    ids = list(tokenizer.encode(render_prompt(messages, tokenizer), add_special_tokens=False))
    bos = tokenizer.bos_id
    if bos is None:
        return ids
    start = 0
    while start < len(ids) and ids[start] == bos:
        start += 1
    if start or _adds_bos(tokenizer):
        return [bos] + ids[start:]
    return ids


def bos_handling(messages, tokenizer) -> str:
    """One line saying which BOS rule of encode_prompt applies to this prompt (for `sdpo.data check`)."""
    bos = tokenizer.bos_id
    if bos is None:
        return "none: the tokenizer has no BOS token"
    name = getattr(tokenizer, "bos_token", None) or f"id {bos}"
    ids = list(tokenizer.encode(render_prompt(messages, tokenizer), add_special_tokens=False))
    if ids[:1] == [bos]:
        also = " (the tokenizer would add it too; kept once)" if _adds_bos(tokenizer) else ""
        return f"{name!s} written by the chat template{also}"
    if _adds_bos(tokenizer):
        return f"{name!s} added by the tokenizer (the chat template does not write it)"
    return f"none: neither the chat template nor the tokenizer puts {name!s} in front"


def encode_response(text: str, tokenizer, prompt_text: str | None = None) -> tuple[list[int], bool]:
    """Response ids, then exactly one EOS; returns (ids, encoded_alone).

    With `prompt_text` (the rendered prompt), the response is encoded as its continuation:
    encode(prompt_text + text) minus the tokens of encode(prompt_text), used only when those
    are exactly its first tokens, i.e. no token spans the boundary. The ids are then the ones
    the model reads in the whole conversation: a SentencePiece tokenizer does not put its
    dummy-prefix "▁" in front of a response that follows "### Assistant:\n" or "<|assistant|>\n".
    When a token would span the boundary, the text is encoded on its own (encoded_alone=True),
    so the prompt's tokens never change."""
    eos = tokenizer.eos_id
    ids, alone = None, True
    if prompt_text is not None:
        head = tokenizer.encode(prompt_text, add_special_tokens=False)
        joint = tokenizer.encode(prompt_text + text, add_special_tokens=False)
        if len(joint) > len(head) and list(joint[: len(head)]) == list(head):
            ids, alone = list(joint[len(head):]), False
    if ids is None:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    while ids and ids[-1] == eos:  # the text already ended with the EOS token's text
        ids.pop()
    return ids + [eos], alone


def _truncate_prompt(ids: list[int], max_prompt_length: int, truncation: str, bos) -> list[int]:
    if truncation == "keep_start":
        return ids[:max_prompt_length]
    if bos is not None and ids and ids[0] == bos:  # keep_end, but BOS stays in front
        return [bos] + ids[len(ids) - (max_prompt_length - 1):] if max_prompt_length > 1 else [bos]
    return ids[len(ids) - max_prompt_length:]


def tokenize_pairs(examples, tokenizer, *, max_length: int = 1024, max_prompt_length: int | None = None,
                   truncation: str = "keep_end") -> tuple[list[TokenizedPair], dict]:
    """Tokenize pairs with a boundary-safe split and the usual DPO truncation.

    prompt = encode(chat_template(prompt, add_generation_prompt=True)) with one BOS;
    response = its tokens as a continuation of the prompt text + [EOS], never a token that spans
    the boundary (see encode_response; `responses_encoded_alone` counts the fallbacks).
    If len(prompt) + max(len(chosen), len(rejected)) > max_length:
      1. a prompt longer than max_prompt_length is cut to it (keep_end keeps its last tokens and BOS;
         keep_start its first tokens);
      2. each response is cut to max_length - len(prompt). A cut response loses its EOS: the model
         must not learn to stop where the cut happened to fall.
    Dropped (counted, never trained on): pairs with no room left for a response token, and pairs
    whose responses become identical after the cut (their DPO gradient is exactly zero).
    Returns (pairs, stats); stats counts pairs_in, pairs_kept, truncated_prompts, truncated_chosen,
    truncated_rejected, dropped_no_room, dropped_identical_after_truncation, responses_encoded_alone,
    and dropped_indices.
    """
    if max_prompt_length is None:
        max_prompt_length = max(1, max_length // 2)
    if truncation not in ("keep_end", "keep_start"):
        raise DataError(f"truncation must be 'keep_end' or 'keep_start', got {truncation!r}")
    if max_length < 2 or not (1 <= max_prompt_length <= max_length):
        raise DataError(f"need max_length >= 2 and 1 <= max_prompt_length <= max_length, got "
                        f"max_length={max_length}, max_prompt_length={max_prompt_length}")
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no EOS token; responses must end with one")
    stats = Counter(pairs_in=0, pairs_kept=0, truncated_prompts=0, truncated_chosen=0, truncated_rejected=0,
                    dropped_no_room=0, dropped_identical_after_truncation=0, responses_encoded_alone=0)
    dropped: list[int] = []
    pairs: list[TokenizedPair] = []
    prompt_cache: dict[tuple, tuple[str, list[int]]] = {}  # UltraFeedback-style data repeats prompts
    for index, ex in enumerate(examples):
        stats["pairs_in"] += 1
        key = tuple((m["role"], m["content"]) for m in ex.prompt)
        if key not in prompt_cache:
            try:
                prompt_cache[key] = (render_prompt(ex.prompt, tokenizer), encode_prompt(ex.prompt, tokenizer))
            except TokenizerError as e:  # e.g. Gemma 2's template rejects a system message, as in transformers
                raise DataError(f"{ex.origin}: the prompt's {[m['role'] for m in ex.prompt]} messages: {e}") from None
        text, p = prompt_cache[key]
        c, c_alone = encode_response(ex.chosen, tokenizer, text)
        r, r_alone = encode_response(ex.rejected, tokenizer, text)
        stats["responses_encoded_alone"] += c_alone + r_alone
        if len(p) + max(len(c), len(r)) > max_length:
            if len(p) > max_prompt_length:
                p = _truncate_prompt(p, max_prompt_length, truncation, tokenizer.bos_id)
                stats["truncated_prompts"] += 1
            room = max_length - len(p)
            if room < 1:
                stats["dropped_no_room"] += 1
                dropped.append(index)
                continue
            if len(c) > room:
                c = c[:room]
                stats["truncated_chosen"] += 1
            if len(r) > room:
                r = r[:room]
                stats["truncated_rejected"] += 1
            if c == r:
                stats["dropped_identical_after_truncation"] += 1
                dropped.append(index)
                continue
        pairs.append(TokenizedPair(list(p), c, r, index))
        stats["pairs_kept"] += 1
    out = dict(stats)
    out["dropped_indices"] = dropped
    return pairs, out

