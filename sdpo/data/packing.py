"""Collation, packing and the batch schedule: tokenized pairs -> batches, indices per optimizer step.

    [TokenizedPair] ──batch_schedule──> pair indices per optimizer step (a fixed number of pairs)
        ──micro_batches (token budget)──> pair indices per forward
        ──pack──> packed rows: prompt | chosen | rejected per pair, several pairs per row
        (or collate──> [2B, T] padded rows: 0..B-1 chosen, B..2B-1 rejected; the unpacked path)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sdpo.data.pairs import TokenizedPair
from sdpo.data.read import DataError

IGNORE_INDEX = -100  # label of positions that are not scored (prompt, padding); torch's cross-entropy default

def pad_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int,
             ignore_index: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """(context ids, scored ids) rows -> right-padded input_ids, labels, attention_mask, position_ids [n, T].

    labels equal input_ids on the scored tokens and ignore_index on context and padding; they
    are NOT shifted (logprobs.py scores labels[t+1] with the logits at t). position_ids count
    from 0 per row and are 0 on padding. The one batch builder: pairs (collate) and
    (context, continuation) requests (sdpo.eval.loglikelihood) both come through here.
    """
    T = max(len(a) + len(b) for a, b in rows)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = torch.full((n, T), pad_id, dtype=torch.long)
    labels = torch.full((n, T), ignore_index, dtype=torch.long)
    attention_mask = torch.zeros((n, T), dtype=torch.long)
    position_ids = torch.zeros((n, T), dtype=torch.long)
    for i, (context, scored) in enumerate(rows):
        lc, L = len(context), len(context) + len(scored)
        input_ids[i, :lc] = torch.tensor(context, dtype=torch.long)
        input_ids[i, lc:L] = torch.tensor(scored, dtype=torch.long)
        labels[i, lc:L] = input_ids[i, lc:L]
        attention_mask[i, :L] = 1
        position_ids[i, :L] = torch.arange(L)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "labels": labels}


def collate(pairs: Sequence[TokenizedPair], *, pad_id: int, ignore_index: int = IGNORE_INDEX,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """B pairs -> one right-padded [2B, T] batch: rows 0..B-1 chosen, B..2B-1 rejected (see pad_rows),
    plus "index" [B], each pair's TokenizedPair.index, and host_facts (computed here, on the CPU)."""
    if not pairs:
        raise DataError("collate got an empty batch")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    batch = pad_rows(rows, pad_id=pad_id, ignore_index=ignore_index, pad_to_multiple_of=pad_to_multiple_of)
    batch["index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
    batch.update(host_facts(batch["input_ids"], batch["labels"], ignore_index))
    return batch


def host_facts(input_ids: torch.Tensor, labels: torch.Tensor | None = None,
               ignore_index: int = IGNORE_INDEX) -> dict:
    """What the forward would otherwise ask the device (one host sync each), read off the CPU batch.

      token_range     (min, max) Python ints of input_ids: sdpo.logprobs checks them against the
                      vocab here, so the kernels skip their device-side range check
    and, for right-padded rows with labels (pad_rows):
      right_padded    True: plain causal attention is exact (sdpo.models.model.is_right_padded, known here)
      gather_index    [R] flat positions in [N*T] whose next label is scored (instead of nonzero())
      chosen_targets  how many of them lie in the first half of the rows (SFT scores rows 0..B-1)
    """
    out = {"token_range": (int(input_ids.min()), int(input_ids.max())) if input_ids.numel() else (0, 0)}
    if labels is not None:
        N, T = labels.shape
        has_target = torch.zeros_like(labels, dtype=torch.bool)
        has_target[:, :-1] = labels[:, 1:] != ignore_index
        flat = has_target.reshape(-1).nonzero().squeeze(1)  # on the CPU: no device sync
        out.update(right_padded=True, gather_index=flat, chosen_targets=int((flat < (N // 2) * T).sum()))
    return out


def batch_schedule(num_examples: int, global_batch_size: int, *, seed: int, epoch: int = 0, rank: int = 0,
                   world_size: int = 1, lengths=None, group_by_length: bool = False,
                   drop_last: bool = True) -> list[list[int]]:
    """Example indices for each optimizer step, this rank's share.

    The global batches depend only on (num_examples, global_batch_size, seed, epoch, lengths,
    group_by_length): a shuffled permutation cut into batches of global_batch_size. Rank r takes
    the slice [r*G/W, (r+1)*G/W) of each, so ranks are disjoint and their union is the same global
    batch whatever world_size. group_by_length: within mega-chunks of 16 global batches (of the
    shuffled order) pairs are sorted by length, longest first, then the batch order is shuffled —
    less padding, still random. drop_last=False keeps a final short batch, split over ranks as
    evenly as possible (a rank may then get fewer, even zero, indices).
    """
    if num_examples < 0 or global_batch_size < 1:
        raise DataError(f"need num_examples >= 0 and global_batch_size >= 1, got {num_examples}, {global_batch_size}")
    if world_size < 1 or not (0 <= rank < world_size):
        raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if global_batch_size % world_size:
        raise DataError(f"global_batch_size {global_batch_size} is not divisible by world_size {world_size}; "
                        "every rank must get the same number of pairs")
    if seed < 0 or epoch < 0:
        raise DataError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_examples)
    if group_by_length:
        if lengths is None or len(lengths) != num_examples:
            raise DataError(f"group_by_length needs one length per example ({num_examples})")
        lens = np.asarray(lengths)
        mega = global_batch_size * 16
        parts = []
        for s in range(0, num_examples, mega):
            chunk = order[s:s + mega]
            parts.append(chunk[np.argsort(-lens[chunk], kind="stable")])
        order = np.concatenate(parts) if parts else order
    batches = [order[s:s + global_batch_size] for s in range(0, num_examples, global_batch_size)]
    if batches and len(batches[-1]) < global_batch_size and drop_last:
        batches.pop()
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    per_rank = global_batch_size // world_size
    out = []
    for b in batches:
        if len(b) == global_batch_size:
            out.append(b[rank * per_rank:(rank + 1) * per_rank].tolist())
        else:
            out.append(np.array_split(b, world_size)[rank].tolist())
    return out


# --------------------------------------------------------------------------------------
# Packing: padding-free rows, one document per pair with a shared prompt
# --------------------------------------------------------------------------------------

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # segment ids, as sdpo.models.attention reads them
MIN_ROW = 256  # CPU rows hold at least this many tokens: short pairs share a row, T² stays small


def pair_cost(p: TokenizedPair, share_prompt: bool = True, chosen_only: bool = False) -> int:
    """Tokens one pair puts through the model when packed."""
    P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
    if chosen_only:
        return P + C
    return P + C + R if share_prompt else 2 * P + C + R


@dataclass
class _Doc:
    pair: int  # position in the micro-batch
    parts: list[tuple[int, list[int]]]  # (segment, ids) in row order; prompt first


def _docs(pairs: Sequence[TokenizedPair], share_prompt: bool, chosen_only: bool) -> list[_Doc]:
    docs = []
    for k, p in enumerate(pairs):
        if chosen_only:
            docs.append(_Doc(k, [(PROMPT, p.prompt_ids), (CHOSEN, p.chosen_ids)]))
        elif share_prompt:
            docs.append(_Doc(k, [(PROMPT, p.prompt_ids), (CHOSEN, p.chosen_ids), (REJECTED, p.rejected_ids)]))
        else:
            docs.append(_Doc(k, [(PROMPT, p.prompt_ids), (CHOSEN, p.chosen_ids)]))
            docs.append(_Doc(k, [(PROMPT, p.prompt_ids), (REJECTED, p.rejected_ids)]))
    return docs


def pack(pairs: Sequence[TokenizedPair], *, pad_id: int, share_prompt: bool = True, chosen_only: bool = False,
         rows: str = "one", row_tokens: int | None = None,
         pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """B pairs -> packed rows [n_rows, T] plus the gather of every scored token, all on the CPU.

    Documents (one per pair `prompt | chosen | rejected` with share_prompt, else `prompt | chosen`
    and `prompt | rejected`; `prompt | chosen` only with chosen_only, for SFT) are laid first-fit
    decreasing (longest first; the outputs are per pair, so row order is free) into rows of at most
    row_tokens tokens (a longer document gets a row of its own); without row_tokens, `rows` sets
    it: "one" (a single row: FlexAttention skips the masked tiles), "longest" (the longest document,
    at least MIN_ROW tokens, balanced: a dense [T, T] mask stays near an unpacked row's cost),
    "each" (one document per row: padded rows with a shared prompt). Rows are right-padded to the
    longest (rounded up to pad_to_multiple_of).

    Keys: input_ids, position_ids, doc_ids (0 = pad), segments (PROMPT/CHOSEN/REJECTED) [n_rows, T]
    for sdpo.models.attention.packed_mask; and for sdpo.logprobs.packed_forward, with S = B sequences
    (chosen_only) or 2B (0..B-1 chosen, B..2B-1 rejected) and R scored tokens:
      gather_index [R]  flat index into n_rows*T of the hidden state that predicts each target;
                        the last prompt position serves both the first chosen and the first
                        rejected token, so an index may occur twice
      targets      [R]  the token ids scored
      token_slot   [S, L] index into [R] of each sequence's tokens in order, R where the sequence
                        is shorter (an extra 0 entry), so the sums are dense row sums (deterministic)
      counts       [S]  scored tokens per sequence
      index        [B]  TokenizedPair.index
      token_range  (min, max) token id, Python ints (see host_facts)
      doc_spans    per row, (start, prompt, chosen, rejected) lengths of its documents, Python ints:
                   sdpo.models.attention.document_mask reads them instead of the device tensors
      seq_spans    per sequence, (first position in [R], count), Python ints (sdpo.logprobs.packed_pair_loss)
    As in collate, the first token of a row-sequence is never scored: with an empty prompt the
    first response token has no context, and the unpacked path skips it too.
    """
    if not pairs:
        raise DataError("pack got an empty batch")
    docs = _docs(pairs, share_prompt, chosen_only)
    if rows not in ("one", "longest", "each"):
        raise ValueError(f"pack: rows must be 'one', 'longest' or 'each', got {rows!r}")
    size = {id(d): sum(len(ids) for _, ids in d.parts) for d in docs}
    docs = sorted(docs, key=lambda d: -size[id(d)])  # stable: ties keep their order
    if row_tokens is None and rows == "longest":
        # As many rows as rows of max(longest, MIN_ROW) tokens need, filled longest-first into the
        # emptiest row (LPT): the rows come out nearly equal, so right-padding them costs little.
        n_rows = -(-sum(size.values()) // max(size[id(docs[0])], MIN_ROW))
        table: list[list[_Doc]] = [[] for _ in range(n_rows)]
        fill = [0] * n_rows
        for d in docs:
            r = min(range(n_rows), key=fill.__getitem__)
            table[r].append(d)
            fill[r] += size[id(d)]
    else:
        cap = {"one": None, "longest": None, "each": 0}[rows] if row_tokens is None else row_tokens
        table, fill = [], []
        for d in docs:  # first-fit decreasing
            r = next((r for r in range(len(table)) if cap is None or fill[r] + size[id(d)] <= cap), None)
            if r is None:
                table.append([])
                fill.append(0)
                r = len(table) - 1
            table[r].append(d)
            fill[r] += size[id(d)]
    rows = table
    T = max(fill)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    n_rows, B = len(rows), len(pairs)
    S = B if chosen_only else 2 * B
    input_ids = torch.full((n_rows, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, T), dtype=torch.long)
    doc_ids = torch.zeros((n_rows, T), dtype=torch.long)
    segments = torch.zeros((n_rows, T), dtype=torch.long)
    gather, targets = [], []  # tensors, one per response segment
    doc_spans = [[] for _ in rows]  # per row: (start, prompt, chosen, rejected) lengths of each document
    spans = [(0, 0)] * S  # (first position in gather/targets, count) per sequence
    R = 0
    for r, row in enumerate(rows):
        o = 0
        for j, d in enumerate(row, start=1):
            P = len(d.parts[0][1])
            start = o
            for seg, ids in d.parts:
                n = len(ids)
                input_ids[r, o:o + n] = torch.tensor(ids, dtype=torch.long)
                segments[r, o:o + n] = seg
                # Responses continue from the prompt: the rejected positions restart at len(prompt).
                first_pos = 0 if seg == PROMPT else P
                position_ids[r, o:o + n] = torch.arange(first_pos, first_pos + n)
                if seg != PROMPT and n:
                    # Target ids[t] is predicted at the previous token of its own sequence: the
                    # last prompt token for t = 0, else the response's own token t - 1.
                    src = torch.cat([torch.tensor([start + P - 1]), torch.arange(o, o + n - 1)])
                    tgt = input_ids[r, o:o + n]
                    if P == 0:  # empty prompt: no context for the first token
                        src, tgt = src[1:], tgt[1:]
                    spans[d.pair if seg == CHOSEN else B + d.pair] = (R, len(tgt))
                    gather.append(r * T + src)
                    targets.append(tgt)
                    R += len(tgt)
                o += n
            doc_ids[r, start:o] = j
            lengths = {seg: len(ids) for seg, ids in d.parts}
            doc_spans[r].append((start, lengths[PROMPT], lengths.get(CHOSEN, 0), lengths.get(REJECTED, 0)))
    counts = torch.tensor([m for _, m in spans], dtype=torch.long)
    first = torch.tensor([b for b, _ in spans], dtype=torch.long)
    t = torch.arange(max(1, int(counts.max())))
    token_slot = torch.where(t[None, :] < counts[:, None], first[:, None] + t[None, :], R)  # [S, L]
    empty = torch.zeros(0, dtype=torch.long)
    return {"input_ids": input_ids, "position_ids": position_ids, "doc_ids": doc_ids, "segments": segments,
            "gather_index": torch.cat(gather) if gather else empty, "targets": torch.cat(targets) if targets else empty,
            "token_slot": token_slot, "counts": counts, "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
            "doc_spans": doc_spans, "seq_spans": spans, **host_facts(input_ids)}


def micro_batches(indices: Sequence[int], costs: Sequence[int], *, max_pairs: int | None = None,
                  max_tokens: int | None = None, min_count: int = 0) -> list[list[int]]:
    """Cut one optimizer step's pair indices (in order) into micro-batches of at most max_pairs pairs
    and at most max_tokens tokens (costs[i]: pair i's tokens, see pair_cost; a pair over the budget
    goes alone). min_count: split the largest micro-batches in two until there are at least that
    many, so every rank runs the same number of forwards (FSDP's all-gathers are collective)."""
    out: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in indices:
        c = costs[i]
        if cur and ((max_pairs is not None and len(cur) >= max_pairs) or
                    (max_tokens is not None and used + c > max_tokens)):
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += c
    if cur:
        out.append(cur)
    while len(out) < min_count:
        k = max(range(len(out)), key=lambda j: (sum(costs[i] for i in out[j]), len(out[j])))
        if len(out[k]) < 2:
            raise DataError(f"micro_batches: cannot make {min_count} micro-batches from {len(indices)} pairs")
        mb = out[k]
        out[k:k + 1] = [mb[: len(mb) // 2], mb[len(mb) // 2:]]
    return out
