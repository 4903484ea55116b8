"""Collation and the batch schedule: tokenized pairs -> [2B, T] batches, indices per optimizer step.

    [TokenizedPair] ──batch_schedule + collate──> [2B, T] batches (rows 0..B-1 chosen, B..2B-1 rejected)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sdpo.data import DataError
from sdpo.pairs import TokenizedPair

IGNORE_INDEX = -100  # label of positions that are not scored (prompt, padding); torch's cross-entropy default

def pad_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int,
             ignore_index: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """(context ids, scored ids) rows -> right-padded input_ids, labels, attention_mask, position_ids [n, T].

    labels equal input_ids on the scored tokens and ignore_index on context and padding; they
    are NOT shifted (logprobs.py scores labels[t+1] with the logits at t). position_ids count
    from 0 per row and are 0 on padding. The one batch builder: pairs (collate) and
    (context, continuation) requests (sdpo.loglikelihood) both come through here.
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
    plus "index" [B], each pair's TokenizedPair.index."""
    if not pairs:
        raise DataError("collate got an empty batch")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    batch = pad_rows(rows, pad_id=pad_id, ignore_index=ignore_index, pad_to_multiple_of=pad_to_multiple_of)
    batch["index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return batch


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
