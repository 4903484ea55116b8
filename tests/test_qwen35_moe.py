"""Qwen3.5-MoE: Qwen3.5's hybrid layers with a mixture of experts and a gated shared expert on every layer.

References are committed fixtures made by transformers 5.24 (tools/make_qwen35_moe_fixtures.py); these
tests never import transformers. The pieces (the delta rule, the router, grouped experts) have their own
tests in tests/test_qwen35.py and tests/test_moe.py; here: the family against transformers, its
checkpoint layouts, the shared-prompt packing, generation, LoRA and a train.py run.
"""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdpo.data.packing import collate, pack
from sdpo.data.pairs import TokenizedPair
from sdpo.logprobs import concatenated_forward, packed_forward
from sdpo.models.checkpoint import CheckpointError, checked_tensors, load_model, read_rows, save_model
from sdpo.models.generate import generate
from sdpo.models.hf_config import config_from_dict, model_config_to_dict
from sdpo.models.lora import LORA_TARGETS, apply_lora, merge_lora, peft_state_dict
from sdpo.models.moe import SparseMoE, load_balancing_loss
from runs import train_two_dpo_steps

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "qwen35_moe"
LAYOUTS = json.loads((FIX / "layouts.json").read_text())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hf():
    return load_model(FIX / "text").eval(), load_file(str(FIX / "text" / "reference.safetensors"))


def max_diff(a, b, where=None):
    d = (a.float() - b.float()).abs()
    return (d[where] if where is not None else d).max().item()


def test_layers_and_config(hf):
    """Every layer: its mixer (linear / full attention, from layer_types) and a SparseMoE with a shared expert;
    config.json round-trips without a dense intermediate_size (transformers' config has none)."""
    model, _ = hf
    c = model.config
    assert c.model_type == "qwen3_5_moe_text" and (c.num_experts, c.num_experts_per_tok) == (4, 2)
    assert (c.moe_intermediate_size, c.shared_expert_intermediate_size) == (8, 16) and c.norm_topk_prob
    assert [layer.linear for layer in model.layers] == [True, False, True]
    for layer in model.layers:
        assert isinstance(layer.mlp, SparseMoE) and layer.mlp.shared_expert.gate_proj.weight.shape == (16, 32)
        assert layer.mlp.shared_expert_gate.weight.shape == (1, 32)
    out = model_config_to_dict(c)
    assert "intermediate_size" not in out and out["architectures"] == ["Qwen3_5MoeForCausalLM"]
    assert config_from_dict(out) == c


def test_logits_and_aux_loss_match_transformers(hf):
    """Unpadded, left/right-padded and a packed row of three documents: logits within 1e-4 of transformers on
    every real token; the load-balancing loss equal to its aux_loss (0/1 mask; packed: the documents alone)."""
    model, ref = hf
    assert ref["logits"].std() > 0.5
    real, seg = ref["padded_attention_mask"], ref["packed_segments"]
    with torch.no_grad():
        assert max_diff(model(ref["input_ids"]), ref["logits"]) <= 1e-4
        assert abs(load_balancing_loss(model.router_stats) - ref["aux_loss"]) <= 1e-6
        assert max_diff(model(ref["padded_input_ids"], real), ref["padded_logits"], real.bool()) <= 1e-4
        assert abs(load_balancing_loss(model.router_stats, real) - ref["padded_aux_loss"]) <= 1e-6
        assert max_diff(model(ref["packed_input_ids"], seg), ref["packed_logits"], seg.bool()) <= 1e-4
        assert abs(load_balancing_loss(model.router_stats, seg) - ref["packed_aux_loss"]) <= 1e-6


def test_bf16_rounds_like_transformers():
    """bf16 weights and compute: the mean |difference| from transformers' bf16 logits is at most 0.6 of bf16's
    own rounding of the float32 logits (as tests/test_moe.py; an op in another dtype lands near 1 or above)."""
    ref = load_file(str(FIX / "text" / "reference.safetensors"))
    model = load_model(FIX / "text", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ours = model(ref["input_ids"]).float()
    rounding = (ref["logits"] - ref["logits"].bfloat16().float()).abs().mean().item()
    assert (ours - ref["logits_bf16"].float()).abs().mean().item() <= 0.6 * rounding


def test_transformers_loads_what_sdpo_saves():
    """tools/make_qwen35_moe_fixtures.py: sdpo (other random weights) -> save_model (40 KB shards, per-expert
    tensors) -> Qwen3_5MoeForCausalLM.from_pretrained: logits within 1e-4, aux_loss to float32 rounding."""
    record = json.loads((FIX / "roundtrip.json").read_text())
    assert record["class"] == "Qwen3_5MoeForCausalLM" and len(record["files"]) > 3
    d = record["max_abs_diff"]
    assert set(d) == {"logits", "padded_logits", "packed_logits", "packed_pair_logits", "aux_loss",
                      "padded_aux_loss", "packed_aux_loss"}
    assert max(d.values()) <= 1e-4 and max(v for k, v in d.items() if "aux" in k) <= 1e-6


def test_save_load_roundtrip(tmp_path, hf):
    model, ref = hf
    save_model(model, tmp_path / "out")
    names = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert names == set(load_file(str(FIX / "text" / "model.safetensors")))  # the layout transformers saves
    again = load_model(tmp_path / "out").eval()
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(again(ref["input_ids"]), model(ref["input_ids"]))


def fused_tensors(prefix: str) -> dict:
    """text/'s weights under transformers' own parameter names (experts fused: gate_up_proj [E, 2I, H],
    gate rows first), each name's shape from layouts.json."""
    text = load_file(str(FIX / "text" / "model.safetensors"))
    out = {}
    for name, shape in LAYOUTS["fused"].items():
        stem = name.removeprefix("model.")
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            layer, E = stem.removesuffix(".gate_up_proj").removesuffix(".down_proj"), shape[0]
            per = ["gate_proj", "up_proj"] if name.endswith("gate_up_proj") else ["down_proj"]
            t = torch.cat([torch.stack([text[f"model.{layer}.{e}.{p}.weight"] for e in range(E)]) for p in per], dim=1)
        else:
            t = text[name]
        assert list(t.shape) == shape, name
        out[name if name == "lm_head.weight" else prefix + stem] = t
    return out


@pytest.mark.parametrize("layout", ["fused", "vl", "vl_fused"])
def test_hub_layouts_load(tmp_path, hf, capsys, layout):
    """The experts fused as transformers 5 holds them, and a vision-language checkpoint
    (Qwen3_5MoeForConditionalGeneration: model.language_model.*, the vision tower skipped with a notice),
    names and config from transformers: the same model as text/."""
    model, ref = hf
    if layout == "fused":
        tensors, config = fused_tensors("model."), (FIX / "text" / "config.json").read_text()
    else:
        vl = LAYOUTS["vl"]
        text = load_file(str(FIX / "text" / "model.safetensors"))
        tensors = fused_tensors("model.language_model.") if layout == "vl_fused" else {
            n: text[n.replace("model.language_model.", "model.")] for n in vl if not n.startswith("model.visual.")}
        tensors.update({n: torch.zeros(s) for n, s in vl.items() if n.startswith("model.visual.")})
        config = json.dumps(LAYOUTS["vl_config"])
    (tmp_path / "m").mkdir()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "m" / "config.json").write_text(config)
    loaded = load_model(tmp_path / "m").eval()
    assert ("skipping" in capsys.readouterr().out) == layout.startswith("vl")
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(ref["input_ids"]), model(ref["input_ids"]))
    # the sharded loader's reads (sdpo.runtime.distributed.load_sharded): experts 1..2 of a stacked tensor
    sources = checked_tensors(tmp_path / "m", model.config)
    for name in ("layers.2.mlp.experts.gate_proj", "layers.2.mlp.experts.up_proj", "layers.2.mlp.experts.down_proj"):
        assert torch.equal(read_rows(sources[name], 1, 3), model.state_dict()[name][1:3])
    if layout == "fused":  # a fused tensor of the wrong shape is named
        key = "model.layers.1.mlp.experts.gate_up_proj"
        tensors[key] = tensors[key][:, :-1].contiguous()
        save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match="gate_up_proj.*shape"):
            load_model(tmp_path / "m")


def pairs_for(ref):
    g = torch.Generator().manual_seed(5)
    rnd = lambda n: torch.randint(3, 64, (n,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(ref["pair_prompt"].tolist(), ref["pair_chosen"].tolist(), ref["pair_rejected"].tolist(), 0),
            TokenizedPair(rnd(5), rnd(3) + [2], rnd(7) + [2], 1), TokenizedPair([], rnd(4), rnd(2), 2)]


def hf_response_logps(ref, which):
    """Σ log p of the fixture pair's response from transformers' logits of its own prompt|response row."""
    prompt, resp = ref["pair_prompt"], ref[f"pair_{which}"]
    logp = ref[f"pair_{which}_logits"][0].double().log_softmax(-1)
    return sum(logp[len(prompt) - 1 + t, resp[t]] for t in range(len(resp))).item()


def test_shared_prompt_packing_equals_transformers(hf):
    """One row prompt | chosen | rejected (both responses continue the prompt's recurrent state, attention
    masks the other response): per-response log-probs equal transformers' on separate rows and sdpo's padded
    rows; gradients equal the padded rows'."""
    model, ref = hf
    pairs = pairs_for(ref)
    with torch.no_grad():
        c, r = packed_forward(model, pack(pairs, pad_id=0, share_prompt=True, rows="one"))
        c0, r0 = concatenated_forward(model, collate(pairs, pad_id=0))
    assert max_diff(c.logps, c0.logps) < 1e-4 and max_diff(r.logps, r0.logps) < 1e-4
    assert abs(c.logps[0].item() - hf_response_logps(ref, "chosen")) < 1e-4
    assert abs(r.logps[0].item() - hf_response_logps(ref, "rejected")) < 1e-4
    grads = []
    for batch, fwd in ((pack(pairs, pad_id=0, rows="one"), packed_forward),
                       (collate(pairs, pad_id=0), concatenated_forward)):
        model.zero_grad()
        c, r = fwd(model, batch)
        (c.logps - 0.5 * r.logps).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    assert grads[0]["layers.0.mlp.shared_expert_gate.weight"].abs().max() > 0
    for n in grads[0]:  # float32 sums in another order: relative to the gradient's size (embeddings' reach 6)
        assert max_diff(grads[0][n], grads[1][n]) < 1e-4 * max(1.0, grads[1][n].abs().max().item()), n


def test_greedy_matches_transformers(hf):
    model, ref = hf
    p = ref["greedy_prompts"]
    prompts = [p[0].tolist(), p[1, 3:].tolist()]
    assert [generate(model, [q], max_new_tokens=8, eos_id=None)[0] for q in prompts] == ref["greedy_alone"].tolist()
    assert generate(model, prompts, max_new_tokens=8, eos_id=None) == ref["greedy_batch"].tolist()


def test_activation_checkpointing_leaves_gradients_and_router_stats(hf):
    model, ref = hf
    batch = pack(pairs_for(ref), pad_id=0, rows="one")
    grads, aux = [], []
    for every in ("none", "full"):
        model.gradient_checkpointing = every
        model.zero_grad()
        c, r = packed_forward(model, batch)
        aux.append(load_balancing_loss(model.router_stats, batch["doc_ids"]))
        (c.logps - r.logps + aux[-1]).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.gradient_checkpointing = False
    model.zero_grad()
    assert torch.equal(aux[0], aux[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_lora_names_equal_peft():
    """Default targets = peft 0.21.2's "all-linear" on Qwen3_5MoeForCausalLM (peft_all_linear.json): attention,
    Gated DeltaNet, the shared expert and its [1, H] gate; the router and the stacked experts stay frozen.
    B = 0 leaves the model; merging keeps the adapted one."""
    ref = load_file(str(FIX / "text" / "reference.safetensors"))
    model = load_model(FIX / "text").eval()
    with torch.no_grad():
        base = model(ref["input_ids"])
    apply_lora(model, SimpleNamespace(rank=2, alpha=4.0, dropout=0.0, targets=list(LORA_TARGETS)))
    want = json.loads((FIX / "peft_all_linear.json").read_text())
    assert {k: list(v.shape) for k, v in peft_state_dict(model.state_dict()).items()} == want["tensors"]
    assert sorted(model.lora_config["targets"]) == want["target_modules"]
    assert not any(".experts" in n or n.endswith("mlp.gate.lora_A.weight") for n in want["tensors"])
    with torch.no_grad():
        assert torch.equal(model(ref["input_ids"]), base)
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(std=0.1)
        out = model(ref["input_ids"])
        assert max_diff(out, base) > 1e-2 and max_diff(merge_lora(model)(ref["input_ids"]), out) < 1e-4


def test_train_two_dpo_steps_logs_aux_loss(tmp_path, capsys):
    """train.py --model.path DIR on a tiny random Qwen3.5-MoE (the fixture's config, the demo tokenizer's
    vocabulary): two optimizer steps, finite loss and aux_loss, M1 written and loadable."""
    out = train_two_dpo_steps(tmp_path, json.loads((FIX / "text" / "config.json").read_text()), capsys)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dpo = [r for r in rows if r.get("stage") == "dpo"]
    assert len(dpo) == 2 and all(torch.isfinite(torch.tensor([r["loss"], r["aux_loss"]])).all() for r in dpo)
    assert all(0.9 < r["aux_loss"] < 4.0 for r in dpo)  # E · Σ f P: 1 when balanced, at most E = 4
    assert load_model(out / "M1").config.model_type == "qwen3_5_moe_text"


def test_parameter_count_and_memory_plan():
    """transformers' default Qwen3_5MoeTextConfig (Qwen3.5-35B-A3B's language model): sdpo's parameter count
    equals transformers' (34.66B; tools/make_qwen35_moe_fixtures.py), 8 of 256 experts active per token (~3.5B);
    the memory plan counts the shared expert's activations in every sparse layer."""
    from sdpo.runtime.memory import moe_bytes_per_token, param_counts

    record = json.loads((FIX / "roundtrip.json").read_text())["default_config"]
    c = config_from_dict(record["config"])
    assert c.num_hidden_layers == 40 and c.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    n = param_counts(c)
    assert n["total"] == record["parameters"] == 34_660_610_688
    assert 3.3e9 < n["active"] < 3.6e9
    plain = dataclasses.replace(c, shared_expert_intermediate_size=0)
    assert moe_bytes_per_token(c, 2) - moe_bytes_per_token(plain, 2) == 4 * 2 * 512 + 2 * 2048 + 2 * 2
