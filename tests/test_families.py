"""Issue 22's families against transformers, and every feature on each (tiny models, CPU).

The references are committed fixtures made by transformers 5.24 (tools/make_hf_fixtures.py,
tools/make_hf_greedy_fixtures.py); these tests never import transformers.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sdpo.models.blocks as blocks
from sdpo.data.packing import collate, pack
from sdpo.data.pairs import TokenizedPair
from sdpo.logprobs import concatenated_forward, packed_forward, sequence_logps
from sdpo.models.checkpoint import load_model
from sdpo.models.generate import generate
from sdpo.models.hf_config import config_from_dict, load_model_config, model_config_to_dict
from sdpo.models.kv_cache import KVCache
from sdpo.models.lora import apply_lora, peft_state_dict
from sdpo.models.model import FAMILIES, Transformer
from runs import torchrun, train_two_dpo_steps

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "hf_reference"
NAMES = ["qwen3", "gemma2", "gemma3_text", "olmo2", "olmo3", "phi3", "smollm3", "ministral3"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread. Two threads on two busy cores made each 48x32 @ 32x96 matmul
    take 31 ms instead of 0.1 ms (OpenMP waiting for a core), and this file 2 minutes instead of ~20 s."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fixture(name):
    return load_model(FIXTURES / name).eval(), load_file(str(FIXTURES / name / "reference.safetensors"))


def rebuilt(name, **changes):
    """The fixture's weights in a model built from its config with `changes`: what a missing piece gives."""
    model, _ = fixture(name)
    cfg = load_model_config(FIXTURES / name)
    for k, v in changes.items():
        setattr(cfg, k, v)
    other = Transformer(cfg).eval()
    other.load_state_dict(model.state_dict())
    return other


def max_diff(a, b, where=None):
    d = (a - b).abs()
    return (d[where] if where is not None else d).max().item()


# ---------------------------------------------------------------------------------------------
# exact against transformers: logits, save -> from_pretrained, greedy decoding


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    """Unpadded, a padded batch (a left-padded, a right-padded and a full row) and a packed row of
    three documents: within 1e-4 of transformers' float32 logits on every real token."""
    model, ref = fixture(name)
    assert model.config.model_type == name
    assert ref["logits"].std() > 0.5  # O(1) logits, so 1e-4 means something
    real, seg = ref["padded_attention_mask"].bool(), ref["packed_segments"]
    with torch.no_grad():
        assert max_diff(model(ref["input_ids"]), ref["logits"]) <= 1e-4
        assert max_diff(model(ref["padded_input_ids"], ref["padded_attention_mask"]), ref["padded_logits"], real) <= 1e-4
        padded = model(ref["padded_input_ids"], ref["padded_attention_mask"], ref["padded_position_ids"])
        assert max_diff(padded, ref["padded_logits"], real) <= 1e-4
        assert max_diff(model(ref["packed_input_ids"], seg), ref["packed_logits"], seg.bool()) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_bf16_rounds_like_transformers(name):
    """As tests/test_checkpoint.py's bf16 test (0.6 of bf16 rounding, mean): an op in another order or
    dtype (where a norm casts, (1 + w) in bf16, the embedding scale, RoPE's dtype) lands near 1. These
    fixtures were made on the 2-core AVX2 machine the tests ran on: measured 0.00 (bit-identical)."""
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    model = load_model(FIXTURES / name, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ours = model(ref["input_ids"])
    assert ours.dtype == torch.bfloat16
    rounding = (ref["logits_bf16"].float() - ref["logits"]).abs().mean()
    assert rounding > 1e-3
    assert (ours.float() - ref["logits_bf16"].float()).abs().mean() <= 0.6 * rounding


# What each fixture's special piece does: without it the logits move far past the tolerance, so
# the test above would fail if the piece were missing or wrong.
PIECES = [
    ("qwen3", dict(sliding_window=None)),  # layer 1's window of 4
    ("gemma2", dict(attn_logit_softcapping=None)),  # the score soft-cap
    ("gemma2", dict(final_logit_softcapping=None)),  # the logit soft-cap
    ("gemma2", dict(query_pre_attn_scalar=None)),  # scale 12^-1/2, not head_dim^-1/2
    ("gemma3_text", dict(sliding_rope_theta=None)),  # the local layers' own RoPE base
    ("olmo3", dict(rope_scaling=None)),  # YaRN on the global layer
    ("phi3", dict(rope_scaling=None)),  # LongRoPE (its long factors: SEQ > 8) and its attention factor
    ("phi3", dict(partial_rotary_factor=1.0, rope_scaling=None)),  # rotating half the head only
    ("smollm3", dict(no_rope_layers=None)),  # the NoPE layer
    ("ministral3", dict(rope_scaling=dict(rope_type="linear", factor=4.0, llama_4_scaling_beta=0.5,
                                          original_max_position_embeddings=8))),  # YaRN
    ("ministral3", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, beta_fast=8.0, beta_slow=1.0,
                                          llama_4_scaling_beta=0.0, original_max_position_embeddings=8))),  # q scale
]


@pytest.mark.parametrize("name, changes", PIECES)
def test_each_piece_bites(name, changes):
    _, ref = fixture(name)
    with torch.no_grad():
        assert max_diff(rebuilt(name, **changes)(ref["input_ids"]), ref["logits"]) > 1e-2


def test_roundtrip_record():
    """sdpo -> save_model -> transformers from_pretrained (tools/make_hf_fixtures.py --check-roundtrip,
    its results committed): every family within 1e-4 unpadded, padded and packed."""
    record = json.loads((FIXTURES / "roundtrip.json").read_text())
    assert set(NAMES) <= set(record["models"])
    for name in NAMES:
        diffs = record["models"][name]["max_abs_dlogit"]
        assert set(diffs) == {"logits", "padded_logits", "packed_logits"}, name
        assert max(diffs.values()) <= 1e-4, (name, diffs)
        assert record["models"][name]["class"] == FAMILIES[name].architecture


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_transformers_generate(name):
    model, _ = fixture(name)
    ref = json.loads((FIXTURES / "greedy.json").read_text())["models"][name]
    kw = dict(max_new_tokens=len(ref["alone"][0]), eos_id=None, pad_id=0)
    assert [generate(model, [p], **kw)[0] for p in ref["prompts"]] == ref["alone"]
    assert generate(model, ref["prompts"], **kw) == ref["batched"]


# ---------------------------------------------------------------------------------------------
# config.json: both spellings, and back


def legacy_spelling(raw: dict) -> dict:
    """transformers 5's config.json (rope_parameters, dtype) in 4.x's spelling (rope_theta, rope_scaling,
    rope_local_base_freq, torch_dtype)."""
    out = {k: v for k, v in raw.items() if k not in ("rope_parameters", "dtype")}
    rope = raw["rope_parameters"]
    full = rope.get("full_attention", rope)
    out["rope_theta"] = full["rope_theta"]
    if "partial_rotary_factor" in full:
        out["partial_rotary_factor"] = full["partial_rotary_factor"]
    scaling = {k: v for k, v in full.items() if k not in ("rope_theta", "partial_rotary_factor")}
    out["rope_scaling"] = scaling if scaling.get("rope_type") != "default" else None
    if raw["model_type"] == "gemma3_text":
        out["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    out["torch_dtype"] = raw["dtype"]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_both_config_spellings_agree(name):
    raw = json.loads((FIXTURES / name / "config.json").read_text())
    assert "rope_parameters" in raw  # transformers 5 wrote it
    assert config_from_dict(raw) == config_from_dict(legacy_spelling(raw))


@pytest.mark.parametrize("name", NAMES)
def test_config_dict_round_trip(name):
    cfg = load_model_config(FIXTURES / name)
    assert config_from_dict(model_config_to_dict(cfg)) == cfg


def test_tied_checkpoint_with_or_without_lm_head(tmp_path):
    model, ref = fixture("gemma2")  # tied: transformers wrote no lm_head.weight
    from safetensors.torch import save_file

    tensors = load_file(str(FIXTURES / "gemma2" / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    d = tmp_path / "g"
    d.mkdir()
    (d / "config.json").write_text((FIXTURES / "gemma2" / "config.json").read_text())
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, str(d / "model.safetensors"))
    with torch.no_grad():
        assert max_diff(load_model(d)(ref["input_ids"]), ref["logits"]) <= 1e-4


def test_unknown_model_type_lists_the_families(tmp_path):
    raw = json.loads((FIXTURES / "olmo2" / "config.json").read_text())
    with pytest.raises(ValueError, match="unknown model_type 'gpt_neox'; supported: llama, mistral, qwen2, qwen3, "
                                         "gemma2, gemma3_text, olmo2, olmo3, phi3, smollm3, ministral3"):
        config_from_dict({**raw, "model_type": "gpt_neox"})


# ---------------------------------------------------------------------------------------------
# features on every family


def pairs(vocab, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(rnd(3 + i % 4), rnd(2 + i % 3) + [2], rnd(4 - i % 3) + [2], index=i) for i in range(n)]


@pytest.mark.parametrize("name", NAMES)
def test_packed_shared_prompt_equals_padded(name):
    """The shared-prompt packed rows (per-layer masks: sliding and global windows, NoPE layers) give the
    padded path's sequence log-probs, which the logits test ties to transformers."""
    model, _ = fixture(name)
    ps = pairs(model.config.vocab_size)
    with torch.no_grad():
        c0, r0 = concatenated_forward(model, collate(ps, pad_id=0), fused=False)
        c1, r1 = packed_forward(model, pack(ps, pad_id=0, share_prompt=True))
    torch.testing.assert_close(c1.logps, c0.logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(r1.logps, r0.logps, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_fused_logprobs_equal_unfused(name):
    """The fused lm_head + log-prob (soft-capped per chunk for Gemma 2 and this Gemma 3), values and
    gradients, against lm_head's own (soft-capped) logits."""
    model, ref = fixture(name)
    ids = ref["input_ids"]
    labels = ids.clone()
    labels[:, :3] = -100
    model.train()
    grads = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        logps = sequence_logps(model, ids, labels, fused=fused).logps
        (logps * torch.tensor([1.0, -0.5])).sum().backward()
        grads.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (unfused, g0), (fused, g1) = grads
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-4)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=n)
    # and both are the log-softmax of the full forward's (soft-capped) logits
    with torch.no_grad():
        logits = model(ids)[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(unfused, logits[:, 2:].sum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow_and_checkpointing_agrees(name):
    model, ref = fixture(name)
    model.train()
    x = ref["packed_input_ids"]
    seg = ref["packed_segments"]
    grads = []
    for ckpt in (False, "full"):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = ckpt
        (model(x, seg) * torch.linspace(-1, 1, model.config.vocab_size)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads[0].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_sliding_layers_cache_only_their_window():
    model, _ = fixture("gemma2")  # layer 0 slides (window 4), layer 1 is global
    cache = KVCache(model.config, 1, 12)
    with torch.no_grad():
        model.hidden_states(torch.arange(3, 12)[None], kv_cache=cache)
    assert cache.k[0].shape[2] == 3 and cache.k[1].shape[2] == 12  # window - 1 kept; all (buffer of max_len)


@pytest.mark.parametrize("name", ["phi3", "gemma2", "qwen3"])
def test_lora_default_targets_are_the_family_projections(name):
    from types import SimpleNamespace

    from sdpo.models.lora import LORA_TARGETS

    model, _ = fixture(name)
    apply_lora(model, SimpleNamespace(rank=2, alpha=4.0, dropout=0.0, targets=list(LORA_TARGETS)))
    want = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}.get(
        name, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert model.lora_config["targets"] == want
    names = sorted(peft_state_dict(model.state_dict()))
    assert names[0].startswith("base_model.model.model.layers.0.")
    if name == "phi3":
        assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in names
        assert "base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight" in names
        with pytest.raises(ValueError, match=r"phi3 has no \['q_proj'\] projections"):
            apply_lora(fixture(name)[0], SimpleNamespace(rank=2, alpha=4.0, dropout=0.0, targets=["q_proj"]))


def test_phi3_lora_names_equal_peft():
    """peft 0.21.2 on transformers' Phi-3 with all-linear targets (tools/make_peft_family_fixture.py):
    the same adapter tensor names and shapes as sdpo's default targets write."""
    from types import SimpleNamespace

    from sdpo.models.lora import LORA_TARGETS

    ref = json.loads(next((REPO / "tests" / "fixtures" / "peft").glob("peft_*_phi3_all_linear.json")).read_text())
    model, _ = fixture("phi3")
    apply_lora(model, SimpleNamespace(rank=2, alpha=4.0, dropout=0.0, targets=list(LORA_TARGETS)))
    ours = {k: list(v.shape) for k, v in peft_state_dict(model.state_dict()).items()}
    assert ours == ref["tensors"]
    assert sorted({m.rsplit(".", 1)[-1] for m in ref["target_modules"]}) == sorted(model.lora_config["targets"])


def test_attention_sees_one_dtype_under_autocast(monkeypatch):
    """Issue 29, finding 1: a float32 model under bf16 autocast (CPU here) hands q, k and v to attend in
    one dtype on the packed, the padded and the generation paths (OLMo 2 keeps float32 cos/sin)."""
    seen = []
    real = blocks.attend

    def spy(q, k, v, mask, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, mask, **kw)

    monkeypatch.setattr(blocks, "attend", spy)
    for name in ("llama", "olmo2", "phi3", "gemma2"):
        model, ref = fixture(name)
        ps = pairs(model.config.vocab_size)
        with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
            packed_forward(model, pack(ps, pad_id=0, share_prompt=True))
            model(ref["padded_input_ids"], ref["padded_attention_mask"])
            assert {s[0] for s in seen} == {torch.bfloat16}, name  # (autocast really ran)
            generate(model, [[1, 5, 7], [1, 9]], max_new_tokens=2, eos_id=None)
        assert seen and all(len(set(s)) == 1 for s in seen), (name, set(seen))
        seen.clear()


def test_rope_reads_nothing_to_the_host(monkeypatch):
    """Issue 29, finding 7b: "dynamic" and "longrope" pick their frequencies on the device."""
    model, ref = fixture("phi3")  # LongRoPE
    calls = []
    for method in ("item", "tolist", "__bool__", "__int__", "__float__"):
        orig = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _o=orig, _m=method: calls.append(_m) or _o(self, *a))
    with torch.no_grad():
        model.hidden_states(ref["input_ids"], None, ref["padded_position_ids"][:2])
    assert calls == []


# ---------------------------------------------------------------------------------------------
# a short DPO run per family through train.py


@pytest.mark.parametrize("name", NAMES)
def test_train_two_steps_with_model_path(tmp_path, name, capsys):
    """train.py --model.path DIR on a tiny random model of the family (the fixture's config with the
    demo tokenizer's vocabulary): two optimizer steps, finite loss, M1 written and loadable."""
    out = train_two_dpo_steps(tmp_path, json.loads((FIXTURES / name / "config.json").read_text()), capsys)
    m1 = load_model(out / "M1")
    assert m1.config.model_type == name


# ---------------------------------------------------------------------------------------------
# FSDP2 (two gloo ranks on CPU): the families' pieces shard like Llama's blocks

@pytest.mark.slow
def test_fsdp_matches_unsharded(tmp_path):
    dirs = [f"tests/fixtures/hf_reference/{name}" for name in ("gemma2", "phi3", "olmo3", "smollm3")]
    assert "OK" in torchrun(REPO / "tests" / "fsdp_worker.py", *dirs).stdout


def test_ministral3_without_its_query_scale_is_refused():
    from sdpo.models.hf_config import CheckpointError

    raw = json.loads((FIXTURES / "ministral3" / "config.json").read_text())
    raw["rope_parameters"] = {k: v for k, v in raw["rope_parameters"].items() if k != "llama_4_scaling_beta"}
    with pytest.raises(CheckpointError, match="ministral3 needs rope_parameters.llama_4_scaling_beta"):
        config_from_dict(raw)


@pytest.mark.parametrize("name", ["gemma2", "phi3", "smollm3"])
def test_h4_scorer_uses_the_families_logits(name):
    """The H4 harness's scorer (lm_head on the scored positions: Gemma 2's soft-cap included) equals
    the log-softmax of the model's own forward logits, which the tests above tie to transformers."""
    from sdpo.eval.loglikelihood import model_score_fn

    model, ref = fixture(name)
    ids, mask = ref["padded_input_ids"][1:], ref["padded_attention_mask"][1:]  # right-padded rows
    targets = torch.full_like(ids, -100)
    targets[:, 3:5] = ids[:, 4:6]  # score tokens 4 and 5 from positions 3 and 4
    got = model_score_fn(model)(ids, targets, mask)
    with torch.no_grad():
        logp = model(ids, mask).log_softmax(-1)
    want = logp[:, 3].gather(-1, ids[:, 4:5])[:, 0] + logp[:, 4].gather(-1, ids[:, 5:6])[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
