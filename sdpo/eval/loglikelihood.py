"""(context, continuation) string requests -> summed continuation log-likelihoods, batched.

The request form of lm-evaluation-harness's `loglikelihood`: the continuation's tokens are
the ones the tokenizer produces in place after the context, and a model scores them with
lm_head on the scored positions only and the log-prob kernel (kernels.token_logprobs).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

import kernels
from sdpo.data.packing import IGNORE_INDEX, pad_rows
from sdpo.eval.report import Progress

def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the front of the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def encode_requests(encode: Callable[[str], list[int]], requests: Sequence[tuple[str, str]], *,
                    prefix_ids: Sequence[int] = ()) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per request.

    The whole string is encoded and split after as many tokens as the context
    alone encodes to, so the continuation's tokens are the ones the tokenizer
    produces in place (a leading space merges into the first word piece).
    Each distinct context is encoded once. `prefix_ids` (e.g. [BOS]) go in front.
    """
    context_cache: dict[str, list[int]] = {}
    out = []
    for context, continuation in requests:
        context, continuation = split_trailing_space(context, continuation)
        if context not in context_cache:
            context_cache[context] = encode(context)
        ctx_ids = context_cache[context]
        cont_ids = encode(context + continuation)[len(ctx_ids):]
        if not cont_ids:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens after its context")
        out.append((list(prefix_ids) + ctx_ids, cont_ids))
    return out


# score_fn(input_ids [B, T], targets [B, T], attention_mask [B, T]) -> [B] summed log p of the
# targets: targets[t] is the token the logits at position t predict (already shifted), IGNORE_INDEX
# where nothing is scored.
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_batch(pairs: Sequence[tuple[list[int], list[int]]], *, max_length: int, pad_id: int):
    """Right-padded input_ids, targets, attention_mask [B, T ≤ max_length] for (context, continuation) id pairs.

    Truncated as both lm-evaluation-harness versions do: the model is fed
    (context + continuation)[-(max_length + 1):][:-1], so it sees max_length tokens, every one
    of them context or scored; the last continuation token is a target only. A longer
    sequence loses tokens from the left (the context's start).
    """
    inputs, conts = [], []
    for ctx, cont in pairs:
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length={max_length}")
        if not ctx:
            raise ValueError("empty context: the first continuation token would have nothing to condition on")
        inputs.append((ctx + cont)[-(max_length + 1):][:-1])
        conts.append(cont)
    batch = pad_rows([(x, []) for x in inputs], pad_id=pad_id)
    targets = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for i, (x, cont) in enumerate(zip(inputs, conts)):
        # position len(x) - len(cont) + j predicts continuation token j
        targets[i, len(x) - len(cont):len(x)] = torch.tensor(cont, dtype=torch.long)
    return batch["input_ids"], targets, batch["attention_mask"]


# next_token_fn(input_ids [B, T], attention_mask [B, T]) -> [B, V] log-probs of the token
# after each row's last real position.
NextTokenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def batched_loglikelihoods(score_fn: ScoreFn, pairs: Sequence[tuple[list[int], list[int]]], *,
                           batch_size: int = 8, max_length: int = 2048, pad_id: int = 0,
                           next_token_fn: NextTokenFn | None = None,
                           progress: Progress | None = None) -> list[float]:
    """Summed continuation log-likelihood per pair, in input order.

    With `next_token_fn`, requests that share a context and continue it by one token
    (MMLU's " A" .. " D") take one forward of the context for the whole group: the
    log-prob of each choice is read from the same next-token distribution. The rest go
    through `score_fn`, longest first (padding stays small and an out-of-memory shows
    at once), with requests that share a context next to each other.
    """
    out = [0.0] * len(pairs)
    rest = list(range(len(pairs)))
    if next_token_fn is not None:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if len(cont) == 1:
                groups.setdefault(tuple(ctx), []).append(i)
        shared = [(ctx, idx) for ctx, idx in groups.items() if len(idx) > 1]
        in_shared = {i for _, idx in shared for i in idx}
        rest = [i for i in rest if i not in in_shared]
        shared.sort(key=lambda g: -len(g[0]))
        for start in range(0, len(shared), batch_size):
            chunk = shared[start : start + batch_size]
            rows = [list(ctx)[-max_length:] for ctx, _ in chunk]  # the harness's window for a 1-token continuation
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                input_ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            logps = next_token_fn(input_ids, mask)  # [G, V]
            for r, (_, idx) in enumerate(chunk):
                for i in idx:
                    out[i] = float(logps[r, pairs[i][1][0]])
            if progress is not None:
                progress.update(sum(len(idx) for _, idx in chunk))
    order = sorted(rest, key=lambda i: (-len(pairs[i][0]) - len(pairs[i][1]), pairs[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, targets, mask = make_batch([pairs[i] for i in idx], max_length=max_length, pad_id=pad_id)
        scores = score_fn(input_ids, targets, mask)
        for i, s in zip(idx, scores.tolist()):
            out[i] = float(s)
        if progress is not None:
            progress.update(len(idx))
    return out


def model_score_fn(model: torch.nn.Module, device: torch.device | str | None = None) -> ScoreFn:
    """ScoreFn over a Transformer: lm_head on the scored positions only, then the log-prob kernel."""
    device = torch.device(device) if device is not None else next(model.parameters()).device

    @torch.no_grad()
    def score(input_ids, targets, attention_mask):
        targets = targets.to(device)
        hidden = model.hidden_states(input_ids.to(device), attention_mask.to(device))  # [B, T, H]
        scored = targets != IGNORE_INDEX  # [B, T]
        token_logps = kernels.token_logprobs(model.lm_head(hidden[scored]), targets[scored])  # [R]
        dense = torch.zeros(scored.shape, dtype=torch.float32, device=device)
        dense[scored] = token_logps.float()
        return dense.sum(dim=1).cpu()  # [B], row sums: no atomics, the same bits every run

    return score


def model_next_token_fn(model: torch.nn.Module, device: torch.device | str | None = None) -> NextTokenFn:
    """NextTokenFn over a Transformer: lm_head on each row's last real hidden state only ([B, V])."""
    device = torch.device(device) if device is not None else next(model.parameters()).device

    @torch.no_grad()
    def next_token(input_ids, attention_mask):
        mask = attention_mask.to(device)
        hidden = model.hidden_states(input_ids.to(device), mask)  # [B, T, H]
        last = mask.sum(1) - 1  # [B] right padding: the last real position
        h = hidden[torch.arange(hidden.shape[0], device=device), last]  # [B, H]
        return torch.log_softmax(model.lm_head(h).float(), dim=-1).cpu()

    return next_token


class LoglikelihoodRunner:
    """(context, continuation) strings -> summed log-likelihoods, via a tokenizer and a ScoreFn."""

    def __init__(self, score_fn: ScoreFn, encode: Callable[[str], list[int]], *, batch_size: int = 8,
                 max_length: int = 2048, pad_id: int = 0, prefix_ids: Sequence[int] = (),
                 next_token_fn: NextTokenFn | None = None, progress: bool = True):
        self.score_fn, self.encode, self.next_token_fn = score_fn, encode, next_token_fn
        self.batch_size, self.max_length, self.pad_id = batch_size, max_length, pad_id
        self.prefix_ids, self.progress = list(prefix_ids), progress

    def __call__(self, requests: Sequence[tuple[str, str]], label: str = "loglikelihood") -> list[float]:
        pairs = encode_requests(self.encode, requests, prefix_ids=self.prefix_ids)
        bar = Progress(label, len(pairs)) if self.progress else None
        lls = batched_loglikelihoods(self.score_fn, pairs, batch_size=self.batch_size,
                                     max_length=self.max_length, pad_id=self.pad_id,
                                     next_token_fn=self.next_token_fn, progress=bar)
        if bar is not None:
            bar.close()
        return lls
