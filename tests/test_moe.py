"""Mixture of experts (issue 25): Mixtral and Qwen3-MoE against transformers, the grouped expert
compute, the load-balancing loss in the DPO step, and every feature on the two families.

References are committed fixtures made by transformers 5.24 (tools/make_moe_fixtures.py); these
tests never import transformers.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdpo.data.packing import collate, pack
from sdpo.data.pairs import TokenizedPair
from sdpo.logprobs import concatenated_forward, packed_forward, sequence_logps
from sdpo.models.checkpoint import hub_names, load_model, save_model
from sdpo.models.generate import generate
from sdpo.models.hf_config import (
    CheckpointError,
    config_from_dict,
    load_model_config,
    model_config_to_dict,
)
from sdpo.models.lora import LORA_TARGETS, apply_lora, peft_state_dict
from sdpo.models.model import FAMILIES, Transformer
from sdpo.models.moe import Experts, load_balancing_loss, router_z_loss
from runs import torchrun, train_two_dpo_steps

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "moe"
NAMES = ["mixtral", "qwen3_moe", "qwen3_moe_plain"]
RECORD = json.loads((FIXTURES / "roundtrip.json").read_text())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices (see tests/test_families.py)
    yield
    torch.set_num_threads(n)


def fixture(name):
    return load_model(FIXTURES / name).eval(), load_file(str(FIXTURES / name / "reference.safetensors"))


def max_diff(a, b, where=None):
    d = (a - b).abs()
    return (d[where] if where is not None else d).max().item()


def set_impl(model, impl):
    for m in model.modules():
        if isinstance(m, Experts):
            m.impl = impl


def pairs(vocab, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(rnd(3 + i % 4), rnd(2 + i % 3) + [2], rnd(4 - i % 3) + [2], index=i) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# exact against transformers


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_aux_loss_match_transformers(name):
    """Unpadded, a padded batch (left-padded, right-padded and full rows) and a packed row of three
    documents: logits within 1e-4 on every real token, and the load-balancing loss equal to transformers'
    aux_loss (0/1 mask; packed: over the documents' real tokens) to float32 rounding."""
    model, ref = fixture(name)
    assert model.config.model_type == name.removesuffix("_plain") and model.config.num_experts == 4
    assert ref["logits"].std() > 0.5
    real, seg = ref["padded_attention_mask"], ref["packed_segments"]
    for impl in ("grouped", "loop"):
        set_impl(model, impl)
        with torch.no_grad():
            assert max_diff(model(ref["input_ids"]), ref["logits"]) <= 1e-4
            assert abs(load_balancing_loss(model.router_stats) - ref["aux_loss"]) <= 1e-6
            assert max_diff(model(ref["padded_input_ids"], real), ref["padded_logits"], real.bool()) <= 1e-4
            assert abs(load_balancing_loss(model.router_stats, real) - ref["padded_aux_loss"]) <= 1e-6
            padded = model(ref["padded_input_ids"], real, ref["padded_position_ids"])
            assert max_diff(padded, ref["padded_logits"], real.bool()) <= 1e-4
            assert max_diff(model(ref["packed_input_ids"], seg), ref["packed_logits"], seg.bool()) <= 1e-4
            assert abs(load_balancing_loss(model.router_stats, seg) - ref["packed_aux_loss"]) <= 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_bf16_rounds_like_transformers(name):
    """bf16 weights and compute (routing on bf16 router logits; Mixtral's top-k weights float32, Qwen's
    bf16): as tests/test_families.py's bf16 test, the mean |difference| from transformers' bf16 logits at
    most 0.6 of bf16's own rounding of the float32 logits (an op in another dtype lands near 1: casting the
    weighted expert outputs to bf16 before summing the k of them measured 1.6 on Mixtral). Measured 0.00."""
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    model = load_model(FIXTURES / name, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ours = model(ref["input_ids"])
    assert ours.dtype == torch.bfloat16
    rounding = (ref["logits_bf16"].float() - ref["logits"]).abs().mean()
    assert rounding > 1e-3
    assert (ours.float() - ref["logits_bf16"].float()).abs().mean() <= 0.6 * rounding


def test_roundtrip_record():
    """sdpo -> save_model (sharded, experts split over files) -> transformers from_pretrained
    (tools/make_moe_fixtures.py, committed): logits and aux_loss within 1e-4 for all three fixtures."""
    for name in NAMES:
        rec = RECORD["models"][name]
        assert set(rec["roundtrip_max_abs_diff"]) == {"logits", "padded_logits", "packed_logits", "aux_loss",
                                                      "padded_aux_loss", "packed_aux_loss"}
        assert max(rec["roundtrip_max_abs_diff"].values()) <= 1e-4, (name, rec)
        assert rec["roundtrip_class"] == FAMILIES[name.removesuffix("_plain")].architecture
        assert len([f for f in rec["roundtrip_files"] if f.endswith(".safetensors")]) > 1


def test_router_ties_resolve_as_transformers():
    """The Mixtral fixture's layer-0 router has two equal rows, so experts 1 and 2 tie on every token;
    on 17 tokens of the reference inputs the tie sits on the top-2 boundary (recorded by the tool), and
    the logits test above still matches: torch.topk picks the same expert in both implementations."""
    with safe_open(str(FIXTURES / "mixtral" / "model.safetensors"), "pt") as f:
        gate = f.get_tensor("model.layers.0.block_sparse_moe.gate.weight")
    assert torch.equal(gate[1], gate[2]) and not torch.equal(gate[0], gate[1])
    assert RECORD["models"]["mixtral"]["boundary_ties"] > 0
    model, ref = fixture("mixtral")
    other = [1, 2]  # the other choice at every tie: the expert weights differ, so the logits move
    with torch.no_grad():
        experts = model.layers[0].mlp.experts
        for p in (experts.gate_proj, experts.up_proj, experts.down_proj):
            p[other] = p[other[::-1]].clone()
        assert max_diff(model(ref["input_ids"]), ref["logits"]) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_transformers_generate(name):
    model, _ = fixture(name)
    ref = RECORD["models"][name]["greedy"]
    kw = dict(max_new_tokens=len(ref["alone"][0]), eos_id=None, pad_id=0)
    assert [generate(model, [p], **kw)[0] for p in ref["prompts"]] == ref["alone"]
    assert generate(model, ref["prompts"], **kw) == ref["batched"]


# ---------------------------------------------------------------------------------------------
# config.json and the hub's tensor names


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip_and_hub_names(name):
    cfg = load_model_config(FIXTURES / name)
    assert config_from_dict(model_config_to_dict(cfg)) == cfg
    with safe_open(str(FIXTURES / name / "model.safetensors"), "pt") as f:
        hub = set(f.keys())
    ours = set()
    for k in Transformer.__new__(Transformer).__class__(cfg).state_dict():
        n = hub_names(k, cfg)
        ours.update(n if isinstance(n, list) else [n])
    assert ours == hub  # every hub tensor, per expert, and nothing else


def test_qwen3_moe_layers_follow_sparse_step_and_mlp_only_layers():
    assert [load_model_config(FIXTURES / "qwen3_moe").is_sparse(i) for i in range(3)] == [True, False, True]
    assert [load_model_config(FIXTURES / "qwen3_moe_plain").is_sparse(i) for i in range(2)] == [False, True]
    model, _ = fixture("qwen3_moe")
    assert model.layers[1].mlp.gate_proj.weight.shape == (48, 32)  # the dense layer: intermediate_size
    assert model.layers[0].mlp.experts.gate_proj.shape == (4, 16, 32)  # [E, moe_intermediate_size, H]


@pytest.mark.parametrize("change, message", [
    (dict(num_experts_per_tok=5), "num_experts_per_tok .5. must be <= the number of experts .4."),
    (dict(router_jitter_noise=0.1), "router_jitter_noise=0.1 is not supported"),
    (dict(num_local_experts=0), "num_local_experts must be a positive integer"),
    (dict(num_local_experts=None), "required field 'num_local_experts' is missing"),
])
def test_bad_moe_config_names_the_field(change, message):
    raw = json.loads((FIXTURES / "mixtral" / "config.json").read_text())
    with pytest.raises(CheckpointError, match=message):
        config_from_dict({**raw, **change}, "x/config.json")


def test_missing_expert_tensor_is_named(tmp_path):
    from safetensors.torch import save_file

    tensors = load_file(str(FIXTURES / "mixtral" / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    (tmp_path / "config.json").write_text((FIXTURES / "mixtral" / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing: \['model.layers.1.block_sparse_moe.experts.3.w2.weight'\]"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------
# the grouped compute


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matmul_equals_per_expert_loop(dtype):
    """torch._grouped_mm (CPU, float32 and bf16) against the per-expert loop: outputs and gradients of x,
    the router and the stacked experts, with an expert that gets no token."""
    torch.manual_seed(0)
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm; the loop is the only path")
    model, _ = fixture("mixtral")
    model = model.to(dtype).train()
    moe = model.layers[1].mlp
    x = torch.randn(3, 7, 32, dtype=dtype).abs().requires_grad_()  # positive, so a negative router row loses
    with torch.no_grad():
        moe.gate.weight[3] = -1.0  # expert 3 never chosen: an empty group
    out = {}
    for impl in ("grouped", "loop"):
        moe.experts.impl = impl
        x.grad = None
        moe.zero_grad(set_to_none=True)
        y, stats = moe(x)
        assert stats.counts[:, 3].sum() == 0
        w = torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)
        ((y * w).sum() + load_balancing_loss(stats)).backward()
        out[impl] = [y.detach(), x.grad] + [p.grad for p in moe.parameters()]
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for a, b in zip(out["grouped"], out["loop"]):
        torch.testing.assert_close(a, b, **tol)


def test_grouped_path_reads_nothing_to_the_host(monkeypatch):
    """Routing, sorting, offsets and the grouped matmuls stay on the device: no .item() / .tolist() /
    bool() of a tensor in a forward and backward (the loop's offsets.cpu() is its one sync per layer)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm")
    model, ref = fixture("qwen3_moe")
    set_impl(model, "grouped")
    calls = []
    for method in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu"):
        orig = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _o=orig, _m=method: calls.append(_m) or _o(self, *a))
    model.hidden_states(ref["input_ids"]).sum().backward()
    assert calls == []


def test_auto_falls_back_to_the_loop_on_unaligned_sizes():
    e = Experts(4, hidden=10, intermediate=6, act="silu")  # 10 float32 = 40 bytes: not a multiple of 16
    assert not e.use_grouped(torch.zeros(2, 10))
    assert e.use_grouped(torch.zeros(2, 10, dtype=torch.float64)) is False
    if hasattr(torch, "_grouped_mm"):
        assert Experts(4, 32, 16, "silu").use_grouped(torch.zeros(2, 32))


def test_no_dense_tokens_by_experts_by_hidden_tensor(monkeypatch):
    """The expert compute never makes a [N, E, H]-sized tensor: only [N·k, ·] rows (k < E)."""
    model, ref = fixture("qwen3_moe_plain")  # top-3 of 4: N·k = 0.75 · N·E
    N, E, H = ref["input_ids"].numel(), 4, 32
    seen = []
    real = torch.Tensor.__torch_function__

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            r = func(*args, **(kwargs or {}))
            if isinstance(r, torch.Tensor):
                seen.append(r.numel())
            return r

    with Spy(), torch.no_grad():
        model(ref["input_ids"])
    assert real is not None and seen and max(seen) < N * E * H


# ---------------------------------------------------------------------------------------------
# the load-balancing loss in training


def test_aux_loss_closed_form():
    """Fedus et al. eq. 4 by hand: two tokens, E = 2, top-1, one layer. Token 1 picks expert 0 with
    p = (0.75, 0.25), token 2 expert 1 with p = (0.5, 0.5): f = (1/2, 1/2), P = (0.625, 0.375),
    loss = 2 · (0.5·0.625 + 0.5·0.375) = 1. A pad token (mask 0) changes nothing."""
    from sdpo.models.moe import RouterStats

    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.9, 0.1]])
    counts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    stats = RouterStats(probs, counts, torch.tensor([4.0, 1.0, 9.0]), 1)
    mask = torch.tensor([1, 1, 0])
    assert load_balancing_loss(stats, mask).item() == pytest.approx(1.0)
    assert router_z_loss(stats, mask).item() == pytest.approx(2.5)
    two_layers = stats + stats  # the same routing twice: the same loss
    assert load_balancing_loss(two_layers, mask).item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_packed_shared_prompt_equals_padded(name):
    """Tokens route one by one, so the shared-prompt packed rows give the padded log-probs exactly."""
    model, _ = fixture(name)
    ps = pairs(model.config.vocab_size)
    with torch.no_grad():
        c0, r0 = concatenated_forward(model, collate(ps, pad_id=0), fused=False)
        c1, r1 = packed_forward(model, pack(ps, pad_id=0, share_prompt=True))
    torch.testing.assert_close(c1.logps, c0.logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(r1.logps, r0.logps, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_fused_logprobs_and_checkpointing_keep_gradients(name):
    """Fused vs unfused log-probs, and activation checkpointing on or off: the same values and the same
    gradients of (log-prob sum + the aux loss) for every parameter, routers included; the recompute adds
    no router statistics twice (the aux loss is identical)."""
    model, ref = fixture(name)
    ids = ref["input_ids"]
    labels = ids.clone()
    labels[:, :3] = -100
    model.train()
    runs = []
    for fused, ckpt in ((False, False), (True, False), (False, "full")):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = ckpt
        logps = sequence_logps(model, ids, labels, fused=fused).logps
        aux = load_balancing_loss(model.router_stats)
        ((logps * torch.tensor([1.0, -0.5])).sum() + 3.0 * aux).backward()
        runs.append((logps.detach(), aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    base = runs[0]
    assert all(g.abs().sum() > 0 for n, g in base[2].items()), [n for n, g in base[2].items() if g.abs().sum() == 0]
    for logps, aux, grads in runs[1:]:
        torch.testing.assert_close(logps, base[0], rtol=1e-5, atol=1e-4)
        assert aux == base[1]
        for n in grads:
            torch.testing.assert_close(grads[n], base[2][n], rtol=1e-4, atol=1e-5, msg=n)


def test_dpo_micro_loss_adds_the_policy_aux_loss_only():
    """dpo_micro_loss: loss = Σ DPO + pairs · coef · aux of the policy's forward (the reference's router
    statistics never enter); stats carry aux_loss; coef 0 leaves the DPO loss; a dense model adds nothing."""
    from sdpo.loop import dpo_micro_loss
    from sdpo.runtime.config import Config

    policy, _ = fixture("mixtral")
    reference, _ = fixture("mixtral")
    with torch.no_grad():
        reference.layers[0].mlp.gate.weight.mul_(-1)  # another routing: another aux loss
    ps = pairs(policy.config.vocab_size, n=4)
    batch = pack(ps, pad_id=0, share_prompt=True)
    batch["index"] = torch.arange(4)

    class Live:  # a live reference: its forward runs inside the step, before the policy's
        def logps(self, b):
            with torch.no_grad():
                c, r = packed_forward(reference, b)
            return c.logps, r.logps

    def run(coef, z=0.0):
        cfg = Config()
        cfg.loss.router_aux_coef, cfg.loss.router_z_coef = coef, z
        return dpo_micro_loss(cfg, policy, batch, Live())

    loss0, stats0 = run(0.0)
    with torch.no_grad():
        packed_forward(policy, batch)
        aux = load_balancing_loss(policy.router_stats, batch["doc_ids"])
    assert stats0.shape == (8,) and stats0[-1].item() == pytest.approx(4 * aux.item(), rel=1e-6)
    assert loss0.item() == pytest.approx(stats0[0].item(), rel=1e-6)  # coef 0: the DPO loss alone
    loss1, _ = run(0.5)
    assert loss1.item() == pytest.approx(stats0[0].item() + 4 * 0.5 * aux.item(), rel=1e-5)
    loss_ckpt, _ = run(None)  # the checkpoint's router_aux_loss_coef (0.02 in this fixture)
    assert loss_ckpt.item() == pytest.approx(stats0[0].item() + 4 * 0.02 * aux.item(), rel=1e-5)
    with torch.no_grad():
        packed_forward(policy, batch)
        z = router_z_loss(policy.router_stats, batch["doc_ids"])
    loss_z, _ = run(0.0, z=0.1)
    assert z > 0 and loss_z.item() == pytest.approx(stats0[0].item() + 4 * 0.1 * z.item(), rel=1e-5)
    assert policy.router_stats is None  # taken off the model by the step


def test_train_two_dpo_steps_logs_aux_loss(tmp_path, capsys):
    """train.py --model.path DIR on a tiny random Mixtral: two optimizer steps, finite loss, aux_loss in
    every DPO row of metrics.jsonl, M1 written in the hub's per-expert layout and loadable."""
    out = train_two_dpo_steps(tmp_path, json.loads((FIXTURES / "mixtral" / "config.json").read_text()), capsys,
                              ("--train.micro_batch_size=1", "--model.activation_checkpointing=full"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dpo = [r for r in rows if r.get("stage") == "dpo"]
    assert len(dpo) == 2 and all(torch.isfinite(torch.tensor([r["loss"], r["aux_loss"]])).all() for r in dpo)
    assert all(0.9 < r["aux_loss"] < 4.0 for r in dpo)  # E · Σ f P: 1 when balanced, at most E = 4
    m1 = load_model(out / "M1")
    assert m1.config.model_type == "mixtral"
    with safe_open(str(out / "M1" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in f.keys()


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_h4_scorer_uses_the_models_logits(name):
    """The H4 harness's scorer on right-padded rows equals the log-softmax of the model's own logits."""
    from sdpo.eval.loglikelihood import model_score_fn

    model, ref = fixture(name)
    ids, mask = ref["padded_input_ids"][1:], ref["padded_attention_mask"][1:]
    targets = torch.full_like(ids, -100)
    targets[:, 3:5] = ids[:, 4:6]  # score tokens 4 and 5 from positions 3 and 4
    got = model_score_fn(model)(ids, targets, mask)
    with torch.no_grad():
        logp = model(ids, mask).log_softmax(-1)
    want = logp[:, 3].gather(-1, ids[:, 4:5])[:, 0] + logp[:, 4].gather(-1, ids[:, 5:6])[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def tiny_mixtral_base(path):
    raw = json.loads((FIXTURES / "mixtral" / "config.json").read_text())
    raw["vocab_size"] = 308  # data/tokenizer
    model = Transformer(config_from_dict(raw))
    model.init_weights(0, std=0.1)
    save_model(model, path, tokenizer_dir=REPO / "data" / "tokenizer")


TRAIN_ARGS = [f'--data.datasets=["{REPO}/data/demo/orca_pairs/train.jsonl"]', "--model.chat_template=none",
              "--data.max_examples=8", "--train.global_batch_size=4", "--train.micro_batch_size=1",
              "--train.max_steps=2", "--train.epochs=1", "--train.device=cpu", "--data.max_length=24",
              "--optim.lr=1e-3", "--loss.router_aux_coef=0.5"]


@pytest.mark.slow
def test_torchrun_train_two_ranks_equals_one_process(tmp_path, capsys):
    """train.py under torchrun (2 gloo ranks, FSDP2) on a tiny Mixtral against one process: the same M1
    weights and the same loss and aux_loss rows (each micro-batch's aux loss over its own tokens, in both).
    Slow: 25 s on 2 busy cores (load ~5)."""
    sys.path.insert(0, str(REPO))
    import train

    tiny_mixtral_base(tmp_path / "base")
    args = [f"--model.path={tmp_path / 'base'}", *TRAIN_ARGS]
    torchrun(REPO / "train.py", *args, f"--train.output_dir={tmp_path / 'two'}", timeout=600)
    assert train.main([*args, f"--train.output_dir={tmp_path / 'one'}"]) == 0, capsys.readouterr().err
    a, b = load_file(str(tmp_path / "one" / "M1" / "model.safetensors")), \
        load_file(str(tmp_path / "two" / "M1" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    one, two = ([r for r in rs if r.get("stage") == "dpo"] for rs in rows)
    assert len(one) == len(two) == 2
    for r1, r2 in zip(one, two):
        for k in ("loss", "aux_loss", "rewards/accuracies"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-5), (k, r1, r2)


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_targets_attention_not_experts():
    """Default targets on Qwen3-MoE: attention everywhere and the dense layer's MLP; the stacked experts
    and the router stay frozen and un-adapted (peft would need target_parameters on transformers 5's
    fused mlp.experts.gate_up_proj, a layout sdpo does not hold)."""
    model, ref = fixture("qwen3_moe")
    apply_lora(model, SimpleNamespace(rank=2, alpha=4.0, dropout=0.0, targets=list(LORA_TARGETS)))
    names = sorted(peft_state_dict(model.state_dict()))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight" in names  # the dense layer
    assert not any("experts" in n or ".mlp.gate." in n for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        assert max_diff(model(ref["input_ids"]), ref["logits"]) <= 1e-4  # B = 0: the base model
    with pytest.raises(ValueError, match=r"mixtral has no \['gate_proj'\] projections"):
        apply_lora(fixture("mixtral")[0], SimpleNamespace(rank=2, alpha=4.0, dropout=0.0, targets=["gate_proj"]))


# ---------------------------------------------------------------------------------------------
# FSDP2 over two gloo ranks

FSDP_WORKER = r"""
import sys
import torch
from sdpo.logprobs import packed_forward
from sdpo.data.packing import pack
from sdpo.data.pairs import TokenizedPair
from sdpo.models.checkpoint import load_model
from sdpo.models.moe import load_balancing_loss
from sdpo.runtime.distributed import build_mesh, destroy, init_distributed, load_sharded

info = init_distributed("cpu")
for name in sys.argv[1:]:
    path = f"tests/fixtures/moe/{name}"
    ref = load_model(path)
    model = load_sharded(path, build_mesh(info), activation_checkpointing="full")  # experts read row block by row block
    assert model.layers[0].mlp.experts.gate_proj.to_local().shape[0] == 2  # 4 experts, 2 ranks
    g = torch.Generator().manual_seed(0)
    rnd = lambda k: torch.randint(3, 96, (k,), generator=g).tolist()
    pairs = [TokenizedPair(rnd(4), rnd(3) + [2], rnd(5) + [2], index=i) for i in range(4)]

    def loss(m, mine):
        batch = pack(mine, pad_id=0, share_prompt=True)
        c, r = packed_forward(m, batch)
        aux = load_balancing_loss(m.router_stats, batch["doc_ids"])
        return c.logps, aux, (c.logps - r.logps).sum() / 2 + 0.5 * aux

    c, aux, l = loss(model, pairs[2 * info.rank: 2 * info.rank + 2])
    l.backward()  # FSDP averages the ranks' gradients
    total = 0
    for half in (0, 1):  # one process: the same two halves, the mean of their losses
        c0, aux0, l0 = loss(ref, pairs[2 * half: 2 * half + 2])
        total = total + l0 / 2
        if half == info.rank:
            torch.testing.assert_close(c, c0, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(aux, aux0, rtol=1e-6, atol=1e-6)
    total.backward()
    for (n, p), (_, p0) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), p0.grad, rtol=1e-4, atol=1e-5, msg=name + " " + n)
print("OK")
destroy()
"""


@pytest.mark.slow
def test_fsdp_two_gloo_ranks_match_one_process(tmp_path):
    """torchrun, 2 gloo ranks: load_sharded reads each rank's experts from the per-expert hub tensors,
    and FSDP2 with full activation checkpointing gives one process's log-probs, aux losses and gradients.
    Slow: 22-29 s on 2 busy cores (two torchrun workers start, import torch, build 4 models)."""
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    assert "OK" in torchrun(script, "mixtral", "qwen3_moe").stdout


# ---------------------------------------------------------------------------------------------
# the memory plan


@pytest.mark.parametrize("shape, total, active", [("qwen3-30b-a3b", 30.5e9, 3.3e9), ("mixtral-8x7b", 46.7e9, 12.9e9)])
def test_memory_plan_counts_total_and_active_parameters(shape, total, active):
    """bench/shapes' public configs: total and active parameters against the published sizes (the model
    cards: 30.5B / 3.3B activated; 46.7B / 12.9B), within the published figures' rounding."""
    from sdpo.runtime.memory import Setup, param_counts, plan

    c = load_model_config(REPO / "bench" / "shapes" / shape)
    n = param_counts(c)
    assert abs(n["total"] / total - 1) < 0.003 and abs(n["active"] / active - 1) < 0.02, n
    p = plan(c, Setup(world_size=8, micro_batch_size=1, max_length=1024, checkpoint=1))
    dense_mlp = Setup(world_size=8, micro_batch_size=1, max_length=1024, checkpoint=0)
    assert plan(c, dense_mlp)["activations"] > 4 * p["activations"]  # the experts' rows dominate without recompute
