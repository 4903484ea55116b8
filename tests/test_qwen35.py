"""Qwen3.5 (issue 26): Gated DeltaNet + gated attention, against transformers and against itself.

The references are committed fixtures made by transformers 5.24 (tools/make_qwen35_fixtures.py);
these tests never import transformers. The delta rule's chunked form is checked against the
token-by-token recurrence in float64; packing against separate rows; generation against
transformers' greedy output.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdpo.data.packing import collate, pack
from sdpo.data.pairs import TokenizedPair
from sdpo.logprobs import concatenated_forward, packed_forward
from sdpo.models.checkpoint import load_model, save_model
from sdpo.models.generate import generate
from sdpo.models.hf_config import config_from_dict, load_model_config
from sdpo.models.kv_cache import KVCache
from sdpo.models.linear_attention import (SequenceLayout, chunk_gated_delta_rule, l2_normalize,
                                          recurrent_gated_delta_rule)
from runs import torchrun, train_two_dpo_steps

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "qwen35"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hf():
    return load_model(FIX / "text").eval(), load_file(str(FIX / "text" / "reference.safetensors"))


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# the delta rule: chunks against the recurrence (float64)


def delta_inputs(B, T, H, dk, dv, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q = l2_normalize(r(B, T, H, dk)) * dk ** -0.5
    k = l2_normalize(r(B, T, H, dk))
    decay = -torch.rand(B, T, H, generator=g, dtype=dtype) * 2  # g <= 0, some steps forget most
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    return q, k, r(B, T, H, dv), decay, beta, r(B, H, dk, dv)


@pytest.mark.parametrize("T,C", [(1, 64), (13, 4), (37, 8), (64, 16), (65, 64), (100, 7)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent_float64(T, C, with_state):
    """Odd lengths, a partial last chunk, lengths of exactly one chunk and one past it."""
    q, k, v, g, beta, S0 = delta_inputs(2, T, 3, 5, 6, seed=T)
    S0 = S0 if with_state else None
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, S0)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, S0, chunk_size=C)
    assert o.dtype == s.dtype == torch.float64
    assert max_diff(o, o_ref) < 1e-12 and max_diff(s, s_ref) < 1e-12


def test_chunked_state_carries_across_calls():
    """Running 50 tokens at once = 23 tokens, then 27 from the final state (a split inside a chunk)."""
    q, k, v, g, beta, S0 = delta_inputs(1, 50, 2, 4, 4, seed=3)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, S0, chunk_size=8)
    o1, s1 = chunk_gated_delta_rule(q[:, :23], k[:, :23], v[:, :23], g[:, :23], beta[:, :23], S0, chunk_size=8)
    o2, s2 = chunk_gated_delta_rule(q[:, 23:], k[:, 23:], v[:, 23:], g[:, 23:], beta[:, 23:], s1, chunk_size=8)
    assert max_diff(torch.cat([o1, o2], 1), o) < 1e-12 and max_diff(s2, s) < 1e-12
    o0, s0 = chunk_gated_delta_rule(q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0], S0)  # no tokens
    assert o0.shape == (1, 0, 2, 4) and torch.equal(s0, S0)


def test_chunked_gradients_equal_recurrent():
    inputs = [x.requires_grad_() for x in delta_inputs(2, 19, 2, 4, 3, seed=7)]
    up = torch.randn(2, 19, 2, 3, dtype=torch.float64)
    grads = []
    for fn in (recurrent_gated_delta_rule, lambda *a: chunk_gated_delta_rule(*a, chunk_size=8)):
        o, s = fn(*inputs)
        grads.append(torch.autograd.grad((o * up).sum() + s.square().sum(), inputs))
    for a, b in zip(*grads):
        assert max_diff(a, b) < 1e-10


def test_gated_delta_rule_gradcheck():
    args = [x.requires_grad_() for x in delta_inputs(1, 5, 1, 3, 3)]
    assert torch.autograd.gradcheck(lambda *a: chunk_gated_delta_rule(*a, chunk_size=2), args, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# against transformers


def test_logits_match_transformers(hf):
    model, ref = hf
    mask = ref["padded_attention_mask"]
    with torch.no_grad():
        assert max_diff(model(ref["input_ids"]), ref["logits"]) < 1e-4
        padded = model(ref["padded_input_ids"], mask)  # left-padded, right-padded and full rows
        assert max_diff(padded[mask.bool()], ref["padded_logits"][mask.bool()]) < 1e-4
        assert max_diff(model(ref["long_input_ids"]), ref["long_logits"]) < 1e-4  # three 64-token chunks


def test_layer_layout_and_config():
    cfg = load_model_config(FIX / "text")
    assert cfg.layer_types == ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    assert cfg.rotary_dim == 8 and cfg.linear_num_value_heads == 4 and cfg.attention_windows() == [None]
    raw = json.loads((FIX / "text" / "config.json").read_text())
    raw.pop("layer_types")
    raw["num_hidden_layers"] = 8
    assert config_from_dict(raw).layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 2  # the default
    raw["linear_num_value_heads"] = 3
    with pytest.raises(ValueError, match="multiple of linear_num_key_heads"):
        config_from_dict(raw)


def test_transformers_loads_what_sdpo_saves():
    """tools/make_qwen35_fixtures.py: sdpo save_model -> Qwen3_5ForCausalLM.from_pretrained, same logits
    (unpadded, left/right-padded, 150 tokens; sdpo's packed shared-prompt row against transformers' two rows)."""
    record = json.loads((FIX / "roundtrip.json").read_text())
    assert record["class"] == "Qwen3_5ForCausalLM"
    assert set(record["max_abs_dlogit"]) == {"logits", "padded_logits", "long_logits", "packed_pair_logits"}
    assert max(record["max_abs_dlogit"].values()) <= 1e-4


def test_save_load_roundtrip(tmp_path, hf):
    model, ref = hf
    save_model(model, tmp_path / "out")
    again = load_model(tmp_path / "out").eval()
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(again(ref["input_ids"]), model(ref["input_ids"]))


def test_vision_language_checkpoint(tmp_path, hf, capsys):
    """Qwen3_5ForConditionalGeneration's layout (names from transformers): the language tower under
    model.language_model.*, the vision tower skipped with a notice."""
    model, ref = hf
    text = load_file(str(FIX / "text" / "model.safetensors"))
    shapes = json.loads((FIX / "vl" / "tensors.json").read_text())
    tensors = {}
    for name, shape in shapes.items():
        if name.startswith("model.visual."):
            tensors[name] = torch.zeros(shape)
        else:
            tensors[name] = text[name.replace("model.language_model.", "model.")]
            assert list(tensors[name].shape) == shape
    out = tmp_path / "vl"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((FIX / "vl" / "config.json").read_text())
    vl = load_model(out).eval()
    assert "skipping" in capsys.readouterr().out and vl.config.model_type == "qwen3_5_text"
    with torch.no_grad():
        assert torch.equal(vl(ref["input_ids"]), model(ref["input_ids"]))


# ---------------------------------------------------------------------------------------------
# packing: documents and the shared prompt carry the recurrent state


def test_sequence_layout_pieces():
    doc = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 3, 3, 3, 3]])
    seg = torch.tensor([[0, 0, 1, 2, 2, 1, 2, 0], [0, 0, 0, 1, 1, 1, 2, 2]])
    layout = SequenceLayout.build(doc, seg)
    roots, branches = layout.stages
    # roots: doc 1's prompt, doc 2's responses (no prompt: each from zero), doc 3's prompt
    assert roots.index.tolist() == [[0, 1, 16], [5, 16, 16], [6, 16, 16], [8, 9, 10]]
    assert roots.lengths.tolist() == [2, 1, 1, 3] and layout.rows == [0, 0, 0, 1]
    assert branches.index.tolist() == [[2, 16, 16], [3, 4, 16], [11, 12, 13], [14, 15, 16]]
    assert branches.parent.tolist() == [0, 0, 3, 3]
    assert SequenceLayout.build(torch.ones(2, 5, dtype=torch.long)) is None  # nothing to cut


def pairs_for(ref):
    g = torch.Generator().manual_seed(5)
    rnd = lambda n: torch.randint(3, 96, (n,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(ref["pair_prompt"].tolist(), ref["pair_chosen"].tolist(), ref["pair_rejected"].tolist(), 0),
            TokenizedPair(rnd(5), rnd(3) + [2], rnd(7) + [2], 1),
            TokenizedPair([], rnd(4), rnd(2), 2),  # empty prompt
            TokenizedPair(rnd(66), rnd(1), rnd(3), 3)]  # a prompt past one chunk, a one-token response


def hf_response_logps(ref, which):
    """Σ log p of the fixture pair's response from transformers' own logits of its prompt|response row."""
    prompt, resp = ref["pair_prompt"], ref[f"pair_{which}"]
    logp = ref[f"pair_{which}_logits"][0].double().log_softmax(-1)
    P = len(prompt)
    return sum(logp[P - 1 + t, resp[t]] for t in range(len(resp))).item()


@pytest.mark.parametrize("share_prompt,rows", [(True, "one"), (True, "longest"), (False, "one"), (True, "each")])
def test_packed_logps_equal_separate_rows(hf, share_prompt, rows):
    model, ref = hf
    pairs = pairs_for(ref)
    with torch.no_grad():
        c, r = packed_forward(model, pack(pairs, pad_id=0, share_prompt=share_prompt, rows=rows))
        c0, r0 = concatenated_forward(model, collate(pairs, pad_id=0))  # right-padded rows, one per sequence
    assert max_diff(c.logps, c0.logps) < 1e-4 and max_diff(r.logps, r0.logps) < 1e-4
    assert abs(c.logps[0].item() - hf_response_logps(ref, "chosen")) < 1e-3  # 40 tokens summed
    assert abs(r.logps[0].item() - hf_response_logps(ref, "rejected")) < 1e-3


def test_packed_gradients_equal_separate_rows(hf):
    model, ref = hf
    pairs = pairs_for(ref)[1:]
    grads = []
    for batch, fwd in ((pack(pairs, pad_id=0, rows="one"), packed_forward), (collate(pairs, pad_id=0), concatenated_forward)):
        model.zero_grad()
        c, r = fwd(model, batch)
        (c.logps - 0.5 * r.logps).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    for n in grads[0]:
        assert max_diff(grads[0][n], grads[1][n]) < 1e-4, n


def test_packed_rows_need_the_documents(hf):
    model, ref = hf
    with pytest.raises(ValueError, match="documents"):
        model.hidden_states(ref["input_ids"], attn_mask={None: None})


# ---------------------------------------------------------------------------------------------
# generation: a cache of conv windows and recurrent states


def test_greedy_matches_transformers(hf):
    model, ref = hf
    p = ref["greedy_prompts"]
    prompts = [p[0].tolist(), p[1, 3:].tolist()]
    alone = [generate(model, [q], max_new_tokens=12, eos_id=None)[0] for q in prompts]
    assert alone == ref["greedy_alone"].tolist()
    assert generate(model, prompts, max_new_tokens=12, eos_id=None) == ref["greedy_batch"].tolist()


def test_cached_steps_equal_one_forward(hf):
    model, ref = hf
    ids = ref["long_input_ids"][:, :70]
    with torch.no_grad():
        full = model.hidden_states(ids)
        cache = KVCache(model.config, 1, 70)
        steps = [model.hidden_states(ids[:, a:b], kv_cache=cache) for a, b in ((0, 61), (61, 62), (62, 70))]
    assert max_diff(torch.cat(steps, 1), full) < 1e-5


# ---------------------------------------------------------------------------------------------
# training


def test_train_two_steps_with_model_path(tmp_path, capsys):
    """train.py --model.path DIR on a tiny random Qwen3.5 (the fixture's config, the demo tokenizer's
    vocabulary): two optimizer steps, finite loss, M1 written and loadable."""
    out = train_two_dpo_steps(tmp_path, json.loads((FIX / "text" / "config.json").read_text()), capsys)
    assert load_model(out / "M1").config.model_type == "qwen3_5_text"


def test_lora_names_equal_peft(hf):
    """sdpo's default LoRA targets on Qwen3.5 = peft 0.21.2's "all-linear" (tools/make_qwen35_fixtures.py):
    the Gated DeltaNet projections in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj included."""
    from types import SimpleNamespace

    from sdpo.models.lora import LORA_TARGETS, apply_lora, merge_lora, peft_state_dict

    _, ref = hf
    model = load_model(FIX / "text").eval()
    with torch.no_grad():
        base = model(ref["input_ids"])
    apply_lora(model, SimpleNamespace(rank=2, alpha=4.0, dropout=0.0, targets=list(LORA_TARGETS)))
    want = json.loads((FIX / "peft_all_linear.json").read_text())
    ours = {k: list(v.shape) for k, v in peft_state_dict(model.state_dict()).items()}
    assert ours == want["tensors"]
    assert sorted(model.lora_config["targets"]) == want["target_modules"]
    with torch.no_grad():
        assert torch.equal(model(ref["input_ids"]), base)  # B = 0: the base model exactly
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(std=0.1)
        adapted = model(ref["input_ids"])
        assert max_diff(adapted, base) > 1e-2
        assert max_diff(merge_lora(model)(ref["input_ids"]), adapted) < 1e-4


def test_activation_checkpointing_leaves_gradients(hf):
    model, ref = hf
    batch = pack(pairs_for(ref)[1:], pad_id=0, rows="one")
    grads = []
    for every in ("none", "full"):
        model.gradient_checkpointing = every
        model.zero_grad()
        c, r = packed_forward(model, batch)
        (c.logps - r.logps).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.gradient_checkpointing = False
    model.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_memory_plan_counts_qwen35_9b():
    """bench/shapes/qwen3.5-9b (the language model): parameters counted by hand from the layer shapes,
    and a linear layer's activations come from the Gated DeltaNet row of the plan, not K/V."""
    from sdpo.runtime.memory import activation_bytes_per_token, linear_bytes_per_token, param_counts

    c = load_model_config(REPO / "bench" / "shapes" / "qwen3.5-9b")
    H, I, V = 4096, 12288, 248320
    conv = 2 * 16 * 128 + 32 * 128
    linear = H * conv + H * 4096 + 2 * H * 32 + conv * 4 + 2 * 32 + 128 + 4096 * H
    full = H * 16 * 256 * 2 + 2 * H * 4 * 256 + 16 * 256 * H + 2 * 256
    block = 2 * H + 3 * H * I
    assert c.layer_types.count("linear_attention") == 24
    assert param_counts(c)["total"] == 2 * V * H + H + 32 * block + 24 * linear + 8 * full  # 8.95B
    Q, K = 16 * 256, 4 * 256
    rope, sdpa = 2 * 2 * (Q + K), 2 * (2 * Q + 2 * K) + 4 * 16 + 2 * Q
    base = activation_bytes_per_token(c, 2, 2, 3) - rope - sdpa  # the full layer (3) without RoPE and SDPA
    assert activation_bytes_per_token(c, 2, 2, 0) == base + linear_bytes_per_token(c, 2)


def test_fused_logprobs_equal_unfused(hf):
    model, ref = hf
    batch = pack(pairs_for(ref), pad_id=0, rows="one")
    out = []
    for fused in (True, False):
        model.fused_logprobs = fused
        model.zero_grad()
        c, r = packed_forward(model, batch)
        (c.logps - 0.3 * r.logps).sum().backward()
        out.append((torch.cat([c.logps, r.logps]).detach(), [p.grad.clone() for p in model.parameters()]))
    del model.fused_logprobs
    model.zero_grad()
    assert max_diff(out[0][0], out[1][0]) < 1e-4
    assert all(max_diff(a, b) < 1e-4 for a, b in zip(out[0][1], out[1][1]))


def test_h4_scorer_matches_transformers(hf):
    """The H4 harness's scorer on right-padded rows against transformers' log-softmax."""
    from sdpo.eval.loglikelihood import model_score_fn

    model, ref = hf
    ids, mask = ref["padded_input_ids"][1:], ref["padded_attention_mask"][1:]  # right-padded, then full
    targets = torch.full_like(ids, -100)
    targets[:, 3:6] = ids[:, 4:7]  # tokens 4..6 scored from positions 3..5
    got = model_score_fn(model)(ids, targets, mask)
    logp = ref["padded_logits"][1:].double().log_softmax(-1)
    want = sum(logp[:, t].gather(-1, ids[:, t + 1:t + 2])[:, 0] for t in (3, 4, 5))
    assert max_diff(got.double(), want) < 1e-4


@pytest.mark.slow
def test_fsdp_matches_unsharded(tmp_path):
    """FSDP2 over two gloo ranks with full activation checkpointing: the unsharded packed log-probs and gradients."""
    assert "OK" in torchrun(REPO / "tests" / "fsdp_worker.py", "--prompt-step", 30, "tests/fixtures/qwen35/text").stdout


def test_delta_rule_stays_float32_under_autocast(hf):
    q, k, v, g, beta, S0 = (x.float() for x in delta_inputs(1, 70, 2, 8, 8, seed=11))
    want = chunk_gated_delta_rule(q, k, v, g, beta, S0)
    with torch.autocast("cpu", torch.bfloat16):
        got = chunk_gated_delta_rule(q, k, v, g, beta, S0)
        model, ref = hf
        c, r = packed_forward(model, pack(pairs_for(ref), pad_id=0, rows="one"))  # runs under bf16 autocast
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and got[0].dtype == torch.float32
    assert torch.isfinite(c.logps).all() and torch.isfinite(r.logps).all()


def test_packed_model_chunked_equals_recurrent_float64(monkeypatch):
    """The whole model in float64 on a packed row (a 70-token prompt crossing chunk boundaries, an empty
    prompt, a one-token response): chunks of 5 and of 64 give the token-by-token recurrence's log-probs."""
    import sdpo.models.linear_attention as la

    model = load_model(FIX / "text").double().eval()
    ref = load_file(str(FIX / "text" / "reference.safetensors"))
    batch = pack(pairs_for(ref), pad_id=0, rows="one")
    out = {}
    with torch.no_grad():
        for C in (5, 64):
            monkeypatch.setattr(la.GatedDeltaNet, "chunk_size", C)
            out[C] = torch.cat([s.logps for s in packed_forward(model, batch)])
        monkeypatch.setattr(la, "chunk_gated_delta_rule", lambda *a: recurrent_gated_delta_rule(*a[:6]))
        out[0] = torch.cat([s.logps for s in packed_forward(model, batch)])
    assert out[0].dtype == torch.float64
    assert max_diff(out[5], out[0]) < 1e-10 and max_diff(out[64], out[0]) < 1e-10


def test_bf16_rounds_like_transformers():
    """bf16 weights (as from_pretrained(dtype=bfloat16) loads them): the mean logit difference from
    transformers' bf16 logits is at most 0.6 of bf16's own rounding (as tests/test_families.py), on 11
    tokens and on 150 (three chunks: the delta rule in float32 in both, by different formulas).
    Measured 0.00 on both (bit-identical) on the 2-core AVX2 machine that made the fixtures."""
    ref = load_file(str(FIX / "text" / "reference.safetensors"))
    model = load_model(FIX / "text", dtype=torch.bfloat16).eval()
    for key in ("logits", "long_logits"):
        with torch.no_grad():
            ours = model(ref[key.replace("logits", "input_ids")])
        assert ours.dtype == torch.bfloat16
        rounding = (ref[f"{key}_bf16"].float() - ref[key]).abs().mean()
        assert rounding > 1e-3
        assert (ours.float() - ref[f"{key}_bf16"].float()).abs().mean() <= 0.6 * rounding, key


def test_segment_ids_restart_the_state(hf):
    """attention_mask's segment ids (documents side by side, then pads): each document's logits are its
    own row's, so the recurrent layers restart at every segment."""
    model, ref = hf
    ids = ref["long_input_ids"][0]
    docs = [ids[:5], ids[5:75], ids[75:76], ids[76:90]]  # the second crosses a chunk boundary
    row = torch.cat([*docs, torch.zeros(3, dtype=torch.long)])[None]
    seg = torch.cat([torch.full((len(d),), i + 1) for i, d in enumerate(docs)] + [torch.zeros(3, dtype=torch.long)])[None]
    with torch.no_grad():
        packed = model(row, seg)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    assert max_diff(packed[:90], alone) < 1e-5
