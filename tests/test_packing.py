import json
from collections import Counter

import pytest
import torch

from sdpo.data.packing import IGNORE_INDEX, batch_schedule, collate
from sdpo.data.pairs import TokenizedPair
from sdpo.data.read import DataError
from runs import torchrun


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
    assert all(t.dtype == torch.long for t in b.values() if isinstance(t, torch.Tensor))
    assert b["right_padded"] is True and b["token_range"] == (0, 34)  # host facts: Python values


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



# ---------------------------------------------------------------------------
# Packing: shared-prompt rows give the unpacked path's log-probs and gradients
# ---------------------------------------------------------------------------

from sdpo.data.packing import micro_batches, pack, pair_cost  # noqa: E402
from sdpo.logprobs import concatenated_forward, packed_forward, packed_sequence_logps  # noqa: E402
from sdpo.models.model import ModelConfig, Transformer  # noqa: E402


def _model(sliding_window=None, seed=0):
    m = Transformer(ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, sliding_window=sliding_window))
    m.init_weights(seed=seed, std=0.2)
    return m


def _random_pairs(seed, n=9):
    """A length mix with the edge cases: one-token responses, chosen and rejected sharing their
    first token (or all but the last), 'truncated' responses without EOS, a one-token prompt."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda k: torch.randint(3, 61, (k,), generator=g).tolist()  # noqa: E731
    pairs = []
    for i in range(n):
        P, C, R = (int(x) for x in torch.randint(1, 12, (3,), generator=g))
        prompt, chosen, rejected = rnd(P), rnd(C) + [2], rnd(R) + [2]
        kind = i % 5
        if kind == 1:
            chosen, rejected = rnd(1), rnd(1)  # one-token responses
        elif kind == 2:
            rejected = chosen[:1] + rejected  # same first token
        elif kind == 3:
            chosen, rejected = chosen[:-1], rejected[:-1] or rnd(1)  # truncated: no EOS
        elif kind == 4:
            prompt = rnd(1)
        pairs.append(TokenizedPair(prompt, chosen, rejected, index=100 + i))
    return pairs


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    c, r = fn()
    # an upstream gradient that is not all ones, and differs between chosen and rejected
    w = torch.linspace(0.5, 1.5, c.logps.shape[0])
    ((c.logps * w).sum() - (r.logps * w.flip(0)).sum()).backward()
    return c, r, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("share_prompt,row_tokens,window", [
    (True, None, None), (True, 24, None), (False, 24, None), (True, 30, 4), (False, None, 5)])
def test_packed_equals_padded_logps_and_gradients(share_prompt, row_tokens, window):
    model = _model(sliding_window=window)
    pairs = _random_pairs(seed=row_tokens or 7)
    c0, r0, g0 = _grads(model, lambda: concatenated_forward(model, collate(pairs, pad_id=0)))
    batch = pack(pairs, pad_id=0, share_prompt=share_prompt, row_tokens=row_tokens, pad_to_multiple_of=8)
    if row_tokens is not None:
        assert batch["input_ids"].shape[0] > 1  # several rows, several pairs per row
    c1, r1, g1 = _grads(model, lambda: packed_forward(model, batch))
    for a, b in ((c0, c1), (r0, r1)):
        assert torch.equal(a.counts, b.counts)
        torch.testing.assert_close(b.logps, a.logps, rtol=1e-5, atol=1e-5)
    assert (c1.logps - r1.logps).abs().min() > 1e-3  # the chosen and rejected sums really differ
    for n in g0:  # float32 sums in another order: tolerance relative to the tensor's scale
        scale = float(g0[n].abs().max())
        assert scale > 0, n
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")
    assert batch["index"].tolist() == [p.index for p in pairs]


def test_packed_chosen_only_and_empty_edges():
    """chosen_only (SFT) gives the chosen rows; an empty prompt (its first response token has no
    context) and an empty response (0 tokens, 0 log-prob) match the padded path too."""
    model = _model()
    pairs = _random_pairs(seed=3, n=5) + [TokenizedPair([], [5, 6, 2], [7, 2], 7),
                                          TokenizedPair([4, 4], [], [9, 9, 2], 8)]
    with torch.no_grad():
        c0, r0 = concatenated_forward(model, collate(pairs, pad_id=0))
        c1, r1 = packed_forward(model, pack(pairs, pad_id=0, row_tokens=16))
        sft = packed_sequence_logps(model, pack(pairs, pad_id=0, chosen_only=True))
    assert c1.counts.tolist()[-2:] == [2, 0] and r1.counts.tolist()[-2:] == [1, 3]
    for a, b in ((c0, c1), (r0, r1), (c0, sft)):
        assert torch.equal(a.counts, b.counts)
        torch.testing.assert_close(b.logps, a.logps, rtol=1e-5, atol=1e-5)


def test_pack_layout_one_position_serves_two_targets():
    b = pack([TokenizedPair([1, 11, 12], [21, 2], [21, 33, 2], index=5)], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 11, 12, 21, 2, 21, 33, 2]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]  # rejected restarts at len(prompt)
    assert b["segments"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    assert b["gather_index"].tolist() == [2, 3, 2, 5, 6]  # position 2 predicts both first tokens
    assert b["targets"].tolist() == [21, 2, 21, 33, 2]
    assert b["token_slot"].tolist() == [[0, 1, 5], [2, 3, 4]]  # 5 = R: the appended zero
    assert b["counts"].tolist() == [2, 3]
    assert pair_cost(TokenizedPair([1, 11, 12], [21, 2], [21, 33, 2], 0)) == 8
    assert pair_cost(TokenizedPair([1, 11, 12], [21, 2], [21, 33, 2], 0), share_prompt=False) == 11


def test_pack_rows_first_fit_and_padding():
    pairs = [TokenizedPair([1] * 4, [2] * 3, [3] * 3, i) for i in range(5)]  # 10 tokens each
    b = pack(pairs, pad_id=0, row_tokens=25, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (3, 24)  # 2 + 2 + 1 pairs, 20 tokens rounded up to 24
    assert b["doc_ids"].tolist()[2] == [1] * 10 + [0] * 14
    with pytest.raises(DataError, match="empty batch"):
        pack([], pad_id=0)


def test_micro_batches_by_token_budget_and_min_count():
    costs = [10, 30, 5, 5, 40, 10, 10, 10]
    assert micro_batches(range(8), costs, max_tokens=40) == [[0, 1], [2, 3], [4], [5, 6, 7]]
    assert micro_batches(range(8), costs, max_pairs=3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert micro_batches(range(8), costs, max_tokens=20) == [[0], [1], [2, 3], [4], [5, 6], [7]]  # 20 fits
    even = micro_batches(range(8), costs, max_tokens=1000, min_count=3)
    assert len(even) == 3 and sum(even, []) == list(range(8))  # split, order kept
    with pytest.raises(DataError, match="cannot make 3"):
        micro_batches([0, 1], costs, min_count=3)


# ---------------------------------------------------------------------------
# End to end: the switches, and the packed run against the padded one
# ---------------------------------------------------------------------------

def test_config_switches_are_validated():
    from pathlib import Path

    from sdpo.runtime.config import ConfigError, load_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    cfg = load_config(tiny)
    assert cfg.data.packing and cfg.data.share_prompt and cfg.train.tokens_per_micro_batch is None
    for bad in ("--train.tokens_per_micro_batch=0", "--train.ref_tokens_per_batch=-5"):
        with pytest.raises(ConfigError, match=bad.split("=")[0][2:]):
            load_config(tiny, [bad])


@pytest.mark.parametrize("packed_args", [[], ["--train.tokens_per_micro_batch=300", "--data.share_prompt=false"]])
def test_packed_run_equals_the_padded_run(tmp_path, monkeypatch, packed_args):
    """Same data, same steps: the packed runs (default switches; a token budget, which changes the
    micro-batches but not the global batch) end at the padded run's weights, to float32 rounding."""
    from pathlib import Path

    from safetensors.torch import load_file

    from sdpo.runtime.config import load_config
    from sdpo.stepwise import train

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    small = ["--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
             "--model.num_attention_heads=2", "--data.max_examples=32", "--sft.max_steps=3",
             "--sft.global_batch_size=16", "--sft.micro_batch_size=8", "--train.global_batch_size=8",
             "--train.micro_batch_size=8", "--train.epochs=1", "--train.max_steps=3", "--eval.summary=false",
             "--optim.lr=1e-3"]
    runs = {}
    for name, extra in (("padded", ["--data.packing=false", "--data.share_prompt=false"]), ("packed", packed_args)):
        cfg = load_config(repo / "configs" / "tiny.toml", small + extra + [f"--train.output_dir={tmp_path / name}"])
        train(cfg)
        runs[name] = load_file(str(tmp_path / name / "M2" / "model.safetensors"))
    a, b = runs["padded"], runs["packed"]
    moved = max(float((a[k] - load_file(str(tmp_path / "padded" / "sft" / "model.safetensors"))[k]).abs().max())
                for k in a)
    assert moved > 3e-3  # DPO really changed the weights (3 steps at lr 1e-3)
    # Adam divides by sqrt(v): where a gradient is ~0, float32 rounding noise becomes an update
    # of up to lr, so weights agree to a fraction of lr (1e-3), and the logged losses to 1e-4.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")
    rows = {name: [r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                   if r.get("stage") == "dpo"] for name in runs}
    assert len(rows["packed"]) == len(rows["padded"]) == 2  # one line per sDPO step (log_every 10)
    for x, y in zip(rows["packed"], rows["padded"]):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_torchrun_token_budget_two_ranks_equal_one_process(tmp_path):
    """A token budget cuts each rank's share into its own number of micro-batches; every rank
    runs as many forwards as the busiest (else FSDP's collectives hang), and the result is the
    one-process run's."""
    import os
    from pathlib import Path

    from safetensors.torch import load_file

    from sdpo.runtime.config import load_config
    from sdpo.stepwise import train

    repo = Path(__file__).resolve().parents[1]
    args = ["--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
            "--model.num_attention_heads=2", "--data.max_examples=16", "--sft.max_steps=2",
            "--sft.global_batch_size=16", "--sft.micro_batch_size=8", "--train.global_batch_size=8",
            "--train.micro_batch_size=4", "--train.tokens_per_micro_batch=90", "--train.epochs=1",
            "--eval.summary=false", "--train.device=cpu"]
    torchrun(repo / "train.py", *args, f"--train.output_dir={tmp_path / 'two'}", cwd=repo, timeout=600)
    old = os.getcwd()
    os.chdir(repo)
    try:
        train(load_config(repo / "configs" / "tiny.toml", args + [f"--train.output_dir={tmp_path / 'one'}"]))
    finally:
        os.chdir(old)
    for d in ("M1", "M2"):
        a = load_file(str(tmp_path / "one" / d / "model.safetensors"))
        b = load_file(str(tmp_path / "two" / d / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{d}/{k}: {m}")
