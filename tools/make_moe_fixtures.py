"""Mixture-of-experts fixtures from Hugging Face transformers (Mixtral, Qwen3-MoE), both ways.

Needs transformers, which sdpo never imports (here transformers 5.24 lives in /opt/hf/bin/python):
    /opt/hf/bin/python tools/make_moe_fixtures.py     # writes tests/fixtures/moe/

For each tiny config: a random HF model (fixed seed, weights at scales that give O(1) logits and
router logits), saved with save_pretrained into <name>/ (the hub's per-expert layout), plus
<name>/reference.safetensors: its float32 logits unpadded, on a padded batch (left-padded,
right-padded, full rows) and on a packed row (each document run alone through transformers), and
unpadded in bf16 (from_pretrained(dtype=bfloat16)); its
aux_loss (output_router_logits=True, a 0/1 mask) on the unpadded and padded batches and on the
packed row's real tokens (transformers' load_balancing_loss_func over the documents' router logits);
greedy tokens of generate(). Then the other way: an sdpo model with other random weights ->
save_model -> transformers from_pretrained, logits and aux_loss compared here, the differences
written to tests/fixtures/moe/roundtrip.json (read by tests/test_moe.py).

Router ties: the Mixtral fixture's layer 0 router has two equal rows (experts 1 and 2), so every
token's probabilities tie there; where the tie falls on the top-k boundary, which expert runs is
torch.topk's choice in both implementations. The count of such tokens is printed and recorded.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "moe"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
from make_hf_fixtures import _valid, inputs, save_hf  # noqa: E402  (the dense fixtures' inputs)

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
CONFIGS = {
    # 4 experts, top-2, renormalised; a window of 6 < SEQ = 10 on every layer
    "mixtral": dict(model_type="mixtral", **COMMON, intermediate_size=16, num_hidden_layers=2, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=6, router_aux_loss_coef=0.02, rope_theta=10000.0),
    # Qwen3-30B-A3B's choices: per-head q/k norms, head_dim != hidden / heads, norm_topk_prob; layer 1
    # dense (mlp_only_layers) with its own intermediate size
    "qwen3_moe": dict(model_type="qwen3_moe", **COMMON, head_dim=16, intermediate_size=48, moe_intermediate_size=16,
                      num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                      mlp_only_layers=[1], decoder_sparse_step=1, router_aux_loss_coef=0.001, rope_theta=10000.0),
    # the other router: top-3 weights not renormalised, every 2nd layer sparse (decoder_sparse_step)
    "qwen3_moe_plain": dict(model_type="qwen3_moe", **COMMON, head_dim=8, intermediate_size=24,
                            moe_intermediate_size=8, num_hidden_layers=2, num_experts=4, num_experts_per_tok=3,
                            norm_topk_prob=False, decoder_sparse_step=2, router_aux_loss_coef=0.001,
                            rope_theta=10000.0),
}
MAX_NEW = 8


def randomize(model, seed: int) -> None:
    """All weights re-drawn so activations, router logits and logits are O(1); [.., out, in] -> 1/√in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            elif name.endswith("gate.weight"):  # the router: logits of a few units, so top-k is decided
                p.copy_(3 * r / p.shape[-1] ** 0.5)
            else:
                p.copy_(r / p.shape[-1] ** 0.5)


def tie_router_rows(model) -> None:
    """Layer 0's router rows 1 and 2 made equal: tied probabilities on every token."""
    gate = model.model.layers[0].mlp.gate.weight
    with torch.no_grad():
        gate[2] = gate[1]


def aux(model, ids, mask=None) -> float:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss.item()


def packed_aux(model, t) -> float:
    """transformers' load_balancing_loss_func over the packed row's real tokens: the router logits of each
    document run alone (what packing must reproduce), concatenated per layer."""
    import importlib

    module = importlib.import_module(type(model).__module__)
    row, seg = t["packed_input_ids"][0], t["packed_segments"][0]
    per_doc = []
    with torch.no_grad():
        for doc in seg.unique().tolist():
            if doc > 0:
                per_doc.append(model(input_ids=row[seg == doc][None], output_router_logits=True).router_logits)
    layers = tuple(torch.cat([d[i] for d in per_doc]) for i in range(len(per_doc[0])))
    c = model.config
    return float(module.load_balancing_loss_func(layers, c.num_local_experts if hasattr(c, "num_local_experts")
                                                 else c.num_experts, c.num_experts_per_tok, None))


def hf_logits(model, t):
    from make_hf_fixtures import hf_logits as dense

    return dense(model, t)


def boundary_ties(model, ids) -> int:
    """Tokens whose layer-0 top-k boundary falls between the two tied experts."""
    captured = {}
    gate = model.model.layers[0].mlp.gate
    handle = gate.register_forward_hook(lambda m, i, o: captured.update(logits=o[0]))  # returns None: output kept
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    probs = torch.softmax(captured["logits"].float(), -1)
    k = model.config.num_experts_per_tok
    kth = probs.topk(k, -1).values[:, -1]
    return int(((probs[:, 1] == probs[:, 2]) & (probs[:, 1] == kth) & (probs.topk(k + 1, -1).values[:, -1] == kth)).sum())


def greedy(model, vocab: int) -> dict:
    g = torch.Generator().manual_seed(7)
    prompts = [[1] + torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 2, 4)]
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    kw = dict(max_new_tokens=MAX_NEW, do_sample=False, num_beams=1)
    with torch.no_grad():
        alone = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                **kw)[0, len(p):].tolist() for p in prompts]
        T = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        batched = model.generate(ids, attention_mask=mask, **kw)[:, T:].tolist()
    return {"prompts": prompts, "alone": alone, "batched": batched}


def make_fixtures() -> dict:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    record = {"transformers": transformers.__version__, "tolerance": 1e-4, "models": {}}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        cfg = dict(cfg)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        randomize(model, seed=300 + i)
        if name == "mixtral":
            tie_router_rows(model)
        t = inputs(config.vocab_size)
        ref = hf_logits(model, t)
        ref["aux_loss"] = torch.tensor(aux(model, t["input_ids"]))
        ref["padded_aux_loss"] = torch.tensor(aux(model, t["padded_input_ids"], t["padded_attention_mask"]))
        ref["packed_aux_loss"] = torch.tensor(packed_aux(model, t))
        target = OUT / name
        save_hf(model, target)
        # bf16: routing decided on bf16 router logits, Mixtral's float32 weights vs Qwen's bf16 ones
        bf16 = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            ref["logits_bf16"] = bf16(input_ids=t["input_ids"]).logits.contiguous()
        save_file({**t, **ref}, str(target / "reference.safetensors"), metadata={"format": "pt"})
        entry = {"class": type(model).__name__, "greedy": greedy(model, config.vocab_size)}
        if name == "mixtral":
            entry["boundary_ties"] = boundary_ties(model, torch.cat([t["input_ids"], t["padded_input_ids"]]))
        record["models"][name] = entry
        print(f"{name}: wrote {target}; aux {ref['aux_loss'].item():.6f} padded {ref['padded_aux_loss'].item():.6f} "
              f"packed {ref['packed_aux_loss'].item():.6f}; ties on the top-k boundary: {entry.get('boundary_ties')}")
    return record


def check_roundtrip(record: dict) -> float:
    """sdpo model (other random weights) -> save_model -> transformers from_pretrained."""
    from transformers import AutoModelForCausalLM

    from sdpo.models.checkpoint import save_model
    from sdpo.models.hf_config import config_from_dict
    from sdpo.models.model import Transformer
    from sdpo.models.moe import load_balancing_loss

    worst = 0.0
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        ours_cfg = config_from_dict(dict(cfg), f"CONFIGS[{name!r}]")
        model = Transformer(ours_cfg).eval()
        randomize(model, seed=400 + i)
        t = inputs(ours_cfg.vocab_size)
        seg, mask = t["packed_segments"], t["padded_attention_mask"]
        with torch.no_grad():
            ours = dict(logits=model(t["input_ids"]).float())
            ours_aux = dict(aux_loss=load_balancing_loss(model.router_stats).item())
            ours["padded_logits"] = model(t["padded_input_ids"], mask).float()
            ours_aux["padded_aux_loss"] = load_balancing_loss(model.router_stats, mask).item()
            ours["packed_logits"] = model(t["packed_input_ids"], seg).float()
            ours_aux["packed_aux_loss"] = load_balancing_loss(model.router_stats, seg).item()
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, Path(tmp) / "out", max_shard_size="40KB")  # experts split over shards
            files = sorted(p.name for p in (Path(tmp) / "out").iterdir())
            hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "out", dtype=torch.float32).eval()
            ref = hf_logits(hf, t)
            ref_aux = dict(aux_loss=aux(hf, t["input_ids"]), padded_aux_loss=aux(hf, t["padded_input_ids"], mask),
                           packed_aux_loss=packed_aux(hf, t))
        diffs = {k: (ours[k] - ref[k])[_valid(k, t)].abs().max().item() for k in ours}
        diffs.update({k: abs(ours_aux[k] - ref_aux[k]) for k in ours_aux})
        worst = max(worst, *diffs.values())
        record["models"][name].update(roundtrip_class=type(hf).__name__, roundtrip_files=files,
                                      roundtrip_max_abs_diff=diffs)
        print(f"{name}: sdpo -> {type(hf).__name__} ({len(files)} files): " +
              ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return worst


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    rec = make_fixtures()
    worst = check_roundtrip(rec)
    rec["worst_roundtrip"] = worst
    (OUT / "roundtrip.json").write_text(json.dumps(rec, indent=1) + "\n")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"worst roundtrip diff {worst:.2e} ({'OK' if worst <= 1e-4 else 'FAIL'}); fixtures {size / 1024:.0f} KiB")
    sys.exit(0 if worst <= 1e-4 else 1)
