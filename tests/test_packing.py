from collections import Counter

import pytest
import torch

from sdpo.data import DataError
from sdpo.packing import IGNORE_INDEX, batch_schedule, collate
from sdpo.pairs import TokenizedPair


# ---------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------


def test_collate_layout():
    pairs = [TokenizedPair([1, 11, 12], [21, 2], [31, 32, 33, 2], index=5),
             TokenizedPair([1, 13], [22, 23, 24, 25, 26, 2], [34, 2], index=9)]
    b = collate(pairs, pad_id=0)
    assert b["input_ids"].shape == (4, 8)  # longest row: 2 + 6
    assert b["input_ids"].tolist() == [
        [1, 11, 12, 21, 2, 0, 0, 0],
        [1, 13, 22, 23, 24, 25, 26, 2],
        [1, 11, 12, 31, 32, 33, 2, 0],
        [1, 13, 34, 2, 0, 0, 0, 0],
    ]
    X = IGNORE_INDEX
    assert b["labels"].tolist() == [
        [X, X, X, 21, 2, X, X, X],
        [X, X, 22, 23, 24, 25, 26, 2],
        [X, X, X, 31, 32, 33, 2, X],
        [X, X, 34, 2, X, X, X, X],
    ]
    assert b["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 8, [1] * 7 + [0], [1] * 4 + [0] * 4]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 0, 0], list(range(8)), [0, 1, 2, 3, 4, 5, 6, 0],
                                          [0, 1, 2, 3, 0, 0, 0, 0]]
    assert b["index"].tolist() == [5, 9]
    assert all(t.dtype == torch.long for t in b.values())


def test_collate_pad_to_multiple_and_pad_equal_to_eos():
    pairs = [TokenizedPair([1, 11], [21, 2], [22, 23, 2], index=0)]
    b = collate(pairs, pad_id=2, pad_to_multiple_of=8, ignore_index=-1)
    assert b["input_ids"].shape == (2, 8)
    assert b["labels"][0].tolist() == [-1, -1, 21, 2, -1, -1, -1, -1]  # padding EOS-ids are never labels
    assert b["input_ids"][0, 4:].tolist() == [2, 2, 2, 2]


# ---------------------------------------------------------------------------
# Batch schedule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("group", [False, True])
def test_global_batch_is_the_same_for_any_world_size(group):
    n, G = 53, 8
    lengths = [(i * 7919) % 31 for i in range(n)]
    single = batch_schedule(n, G, seed=3, lengths=lengths, group_by_length=group)
    assert len(single) == n // G and all(len(b) == G for b in single)
    for W in (2, 4, 8):
        per_rank = [batch_schedule(n, G, seed=3, rank=r, world_size=W, lengths=lengths, group_by_length=group)
                    for r in range(W)]
        for step in range(len(single)):
            shares = [per_rank[r][step] for r in range(W)]
            assert all(len(s) == G // W for s in shares)
            assert sum(shares, []) == single[step]  # rank r holds the r-th slice, disjoint


def test_schedule_covers_every_example_once():
    n, G = 37, 8
    for W in (1, 2, 4):
        seen = Counter()
        for r in range(W):
            for b in batch_schedule(n, G, seed=0, rank=r, world_size=W, drop_last=False):
                seen.update(b)
        assert seen == Counter(range(n))
    kept = [i for b in batch_schedule(n, G, seed=0) for i in b]
    assert len(kept) == 32 and len(set(kept)) == 32


def test_schedule_deterministic_by_seed_and_epoch():
    a = batch_schedule(100, 10, seed=1)
    assert a == batch_schedule(100, 10, seed=1)
    assert a != batch_schedule(100, 10, seed=2)
    assert a != batch_schedule(100, 10, seed=1, epoch=1)


def test_group_by_length_reduces_padding():
    n, G = 512, 8
    lengths = [int(x) for x in torch.randint(5, 500, (n,), generator=torch.Generator().manual_seed(0))]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = batch_schedule(n, G, seed=0, lengths=lengths)
    grouped = batch_schedule(n, G, seed=0, lengths=lengths, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(n))
    assert padding(grouped) < padding(plain) / 5


def test_schedule_errors():
    with pytest.raises(DataError, match="not divisible by world_size 3"):
        batch_schedule(100, 8, seed=0, world_size=3)
    with pytest.raises(DataError, match="rank"):
        batch_schedule(100, 8, seed=0, rank=2, world_size=2)
    with pytest.raises(DataError, match="group_by_length needs"):
        batch_schedule(100, 8, seed=0, group_by_length=True)

