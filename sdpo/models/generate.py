"""Batched greedy and sampled decoding for sdpo.models.model.Transformer.

Prompts of different lengths are left-padded into one batch: the attention mask holds 0
at the pads, so each row's positions count from its own first token and no row sees
another's pads; a padded row therefore decodes the same tokens as the prompt alone (except
with "dynamic" RoPE scaling past max_position_embeddings, whose base follows the batch's
longest position, in transformers too).
One forward over the prompts fills a KVCache (sdpo/models/kv_cache.py); each later step feeds one
token per row and attends to the cache, so a step costs O(T) rather than O(T^2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdpo.models.kv_cache import KVCache
from sdpo.models.rope import rope_type


def _check(prompts, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"generate: temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p={top_p} must be in (0, 1]")


def _longrope_context(config) -> int | None:
    """original_max_position_embeddings where the model uses LongRoPE (Phi-3), else None."""
    rope = config.rope_scaling or {}
    return rope.get("original_max_position_embeddings") if rope_type(rope) == "longrope" else None


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """-> input_ids [B, T], attention_mask [B, T] (0 at the leading pads, 1 elsewhere)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits: Tensor, temperature: float, top_p: float, generator) -> Tensor:
    """logits [B, V] -> next token ids [B]. temperature 0 is argmax; otherwise nucleus sampling
    (Holtzman et al. 2020): sample from the smallest set of top tokens whose probability reaches top_p.
    generator: None, one torch.Generator for the batch, or a list of B generators, one per row
    (`per_row_draw`)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p; the top token always stays
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if isinstance(generator, (list, tuple)):
        return per_row_draw(probs, generator)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def per_row_draw(probs: Tensor, generators) -> Tensor:
    """probs [B, V] (rows need not sum to 1) -> token ids [B] by inverse transform sampling: row i
    draws one uniform u from generators[i] (rows in order) and takes the first token whose
    cumulative probability exceeds u * total. A row's token then depends only on its own
    probabilities and its generator's state, not on the other rows of the batch; rows that share a
    generator (one prompt's samples, consecutive) draw from it in row order."""
    if len(generators) != probs.shape[0]:
        raise ValueError(f"generate: {len(generators)} generators for {probs.shape[0]} rows (one per row)")
    u = torch.stack([torch.rand((), generator=g, device=g.device, dtype=torch.float64).cpu() for g in generators])
    cdf = probs.double().cumsum(dim=-1)  # [B, V]
    target = (u.to(probs.device) * cdf[:, -1])[:, None]  # [B, 1], in [0, total)
    token = torch.searchsorted(cdf, target, right=True)[:, 0]  # right=True never lands on a zero-probability token
    # u * total can round up to total: then the row's last token of nonzero probability
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(token, last)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int | list[int] | None,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> list[list[int]]:
    """Per prompt, the generated ids after it, stopped before the first eos_id (not included;
    a list stops at any of them, as Llama-3's several end tokens need); temperature 0 = greedy.
    All prompts decode as one batch; rows that have finished keep running (their extra tokens
    are dropped) until every row is done or max_new_tokens is reached. With one generator the
    sampled tokens depend on the batch a prompt is in; with a list of one generator per row
    (`per_row_draw`: every row draws once per step, finished or not) a row's tokens depend only
    on its prompt and its generator."""
    _check(prompts, max_new_tokens, temperature, top_p)
    stops = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else [int(e) for e in eos_id]
    param = next(model.parameters())
    ids, prompt_mask = left_pad(prompts, pad_id, param.device)
    B, T = ids.shape
    cache = KVCache(model.config, B, T + max_new_tokens, param.device, param.dtype)
    mask = torch.zeros((B, T + max_new_tokens), dtype=torch.long, device=param.device)  # [B, cached + new]
    mask[:, :T] = prompt_mask
    out = torch.empty((B, max_new_tokens), dtype=torch.long, device=param.device)
    done = torch.zeros(B, dtype=torch.bool, device=param.device)
    refresh_at = _longrope_context(model.config)
    n = 0
    while n < max_new_tokens:
        if n and cache.length == refresh_at:
            # LongRoPE switches to its long factors once a sequence outgrows the trained context: the
            # cached keys were rotated with the short ones, so recompute them all once (transformers'
            # Phi-3 drops its cache at the same step).
            ids = torch.cat([left_pad(prompts, pad_id, param.device)[0], out[:, :n]], dim=1)
            cache.reset()
        hidden = model.hidden_states(ids, mask[:, : cache.length + ids.shape[1]], kv_cache=cache)  # [B, t, H]
        logits = model.lm_head(hidden[:, -1])  # [B, V]: only the last position is needed
        nxt = sample_next(logits, temperature, top_p, generator)
        out[:, n], mask[:, T + n], ids = nxt, 1, nxt[:, None]
        n += 1
        if stops:
            done |= torch.isin(nxt, torch.tensor(stops, device=nxt.device))
            if bool(done.all()):  # one host sync per token: the decode loop is sequential anyway
                break
    out = out[:, :n]
    result = []
    for row in out.tolist():
        end = next((i for i, tok in enumerate(row) if tok in stops), len(row))
        result.append(row[:end])
    return result


# ---------------------------------------------------------------- prompt files (eval.py generate)

class PromptFileError(ValueError):
    """A prompts file that cannot be used; the message names the file and line."""


@dataclass
class Prompt:
    line: int
    text: str | None = None  # "prompt": one user turn, through the chat template
    messages: list | None = None  # "messages": [{"role", "content"}, ...], through the chat template
    input_ids: list[int] | None = None  # "input_ids": used as they are (no tokenizer needed)


def read_prompts(path) -> list[Prompt]:
    """A .jsonl file: one object per line with "prompt" (a string), "messages" (a list of
    {"role", "content"}) or "input_ids" (a list of token ids). Any other file: one prompt
    string per non-empty line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            out.append(Prompt(n, text=line))
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise PromptFileError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if isinstance(rec.get("prompt"), str):
            out.append(Prompt(n, text=rec["prompt"]))
        elif isinstance(rec.get("messages"), list) and rec["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in rec["messages"]):
            out.append(Prompt(n, messages=rec["messages"]))
        elif isinstance(rec.get("input_ids"), list) and rec["input_ids"] and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in rec["input_ids"]):
            out.append(Prompt(n, input_ids=rec["input_ids"]))
        else:
            raise PromptFileError(
                f"{where}: expected \"prompt\" (a string), \"messages\" (a non-empty list of "
                f"{{\"role\": str, \"content\": str}}) or \"input_ids\" (a non-empty list of token ids); "
                f"got keys {sorted(rec)}")
    if not out:
        raise PromptFileError(f"{path}: no prompts")
    return out
