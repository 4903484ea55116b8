"""Reference fixtures from Hugging Face transformers, and the reverse check (sdpo -> transformers).

Needs transformers, which sdpo itself never imports. Keep it out of the main environment:
    python -m venv --system-site-packages /tmp/hfenv && /tmp/hfenv/bin/pip install transformers
    /tmp/hfenv/bin/python tools/make_hf_fixtures.py                   # writes tests/fixtures/hf_reference/
    /tmp/hfenv/bin/python tools/make_hf_fixtures.py --check-roundtrip # sdpo-saved dirs load in transformers
                                                       # (writes tests/fixtures/hf_reference/roundtrip.json)
    /tmp/hfenv/bin/python tools/make_hf_fixtures.py --only qwen3 gemma2     # just these fixtures
(here transformers 5.24 lives in /opt/hf/bin/python).

For each tiny config: a random HF model (fixed seed, weights re-drawn at scales that give O(1)
logits so a 1e-4 tolerance means something), saved with save_pretrained into <name>/, plus
<name>/reference.safetensors holding its float32 logits for fixed inputs, unpadded and padded.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "hf_reference"

COMMON = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
)
CONFIGS = {
    # GQA 4:2, default RoPE, untied
    "llama": dict(model_type="llama", **COMMON),
    # Llama-3.1 RoPE scaling with a tiny original context so every frequency band (kept, smoothed,
    # divided) occurs; head_dim 16 != hidden/heads = 8; one kv head (4:1 GQA)
    "llama3": dict(
        model_type="llama", **{**COMMON, "num_key_value_heads": 1, "rope_theta": 500000.0}, head_dim=16,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
    ),
    # window 4 < sequence length 10
    "mistral": dict(model_type="mistral", **COMMON, sliding_window=4),
    # q/k/v biases, tied embeddings
    "qwen2": dict(model_type="qwen2", **COMMON, tie_word_embeddings=True, use_sliding_window=False),
    # the other two RoPE scalings, smaller (vocab 64, MLP 32); dynamic: trained context 8 < SEQ = 10,
    # so the base is stretched for these inputs
    "llama_linear": dict(model_type="llama", **{**COMMON, "vocab_size": 64, "intermediate_size": 32},
                         rope_scaling=dict(rope_type="linear", factor=4.0)),
    "llama_dynamic": dict(model_type="llama", **{**COMMON, "vocab_size": 64, "intermediate_size": 32,
                                                  "max_position_embeddings": 8},
                          rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    # --- issue 22's families. Every family option is set so that it bites at SEQ = 10: windows of 4,
    # soft-caps of a few units (O(1) scores and logits would make a cap of 50 a no-op), RoPE scalings
    # whose trained context (8) is shorter than the inputs, head_dim != hidden / heads.
    "qwen3": dict(model_type="qwen3", **COMMON, head_dim=16, use_sliding_window=True, sliding_window=4,
                  max_window_layers=1),  # layer 1 slides
    "gemma2": dict(model_type="gemma2", **COMMON, head_dim=16, query_pre_attn_scalar=12, sliding_window=4,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh"),
    # 4.x spelling: rope_theta / rope_scaling (global layers) and rope_local_base_freq (sliding ones)
    "gemma3_text": dict(model_type="gemma3_text", **COMMON, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                        rope_local_base_freq=100.0, rope_scaling=dict(rope_type="linear", factor=2.0),
                        final_logit_softcapping=5.0),
    "olmo2": dict(model_type="olmo2", **COMMON),
    # 5.x spelling: rope_parameters per layer type, YaRN on the global layer
    "olmo3": dict(model_type="olmo3", **{k: v for k, v in COMMON.items() if k != "rope_theta"}, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={"full_attention": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                          original_max_position_embeddings=8),
                                   "sliding_attention": dict(rope_type="default", rope_theta=500000.0)}),
    # LongRoPE past its trained context (8 < SEQ), half the head rotated, a window of 5
    "phi3": dict(model_type="phi3", **{k: v for k, v in COMMON.items() if k != "rope_theta"},
                 partial_rotary_factor=0.5, sliding_window=5, original_max_position_embeddings=8,
                 rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                                      short_factor=[1.0, 1.5], long_factor=[3.0, 7.0])),
    # layer 1 without RoPE (NoPE), and sliding (SmolLM3 slides only NoPE layers)
    "smollm3": dict(model_type="smollm3", **COMMON, no_rope_layers=[1, 0], use_sliding_window=True,
                    sliding_window=4),
    # YaRN (its attention factor from factor alone) and the Llama-4 query scale by position
    "ministral3": dict(model_type="ministral3", **{k: v for k, v in COMMON.items() if k != "rope_theta"},
                       head_dim=16, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                         original_max_position_embeddings=8, beta_fast=8.0,
                                                         beta_slow=1.0, llama_4_scaling_beta=0.5)),
}
FAMILY_FIXTURES = ["qwen3", "gemma2", "gemma3_text", "olmo2", "olmo3", "phi3", "smollm3", "ministral3"]
for _name in FAMILY_FIXTURES:
    CONFIGS[_name]["pad_token_id"] = 0  # some classes default it past the tiny vocabulary (Phi-3: 32000)
SEQ = 10


def inputs(vocab: int) -> dict[str, torch.Tensor]:
    """Fixed input ids [2, SEQ] and a padded batch [3, SEQ]: left-padded, right-padded, unpadded."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, vocab, (2, SEQ), generator=g)
    pad = 0
    left, right = 3, 4
    padded = torch.stack([
        torch.cat([torch.full((left,), pad), ids[0, : SEQ - left]]),
        torch.cat([ids[1, : SEQ - right], torch.full((right,), pad)]),
        ids[0],
    ])
    mask = torch.ones_like(padded)
    mask[0, :left] = 0
    mask[1, SEQ - right:] = 0
    # positions count from each row's first real token (sdpo's default); transformers would count
    # from the row start, so they are passed to it explicitly.
    pos = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    # One packed row: documents of 4, 6 and 3 tokens side by side, then 2 pads ([1, 15]); its reference
    # logits are each document run alone through transformers (what packing must reproduce).
    packed = torch.cat([ids[0, :4], ids[1, :6], ids[0, 5:8], torch.full((2,), pad)])[None]
    segments = torch.tensor([[1] * 4 + [2] * 6 + [3] * 3 + [0] * 2])
    return dict(input_ids=ids, padded_input_ids=padded, padded_attention_mask=mask, padded_position_ids=pos,
                packed_input_ids=packed, packed_segments=segments)


def randomize(model, seed: int) -> None:
    """Re-draw all weights so activations and logits are O(1) (HF's std=0.02 init gives near-uniform logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * r)
            elif name.endswith(".bias"):
                p.copy_(0.2 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            else:  # [out, in]: unit-variance outputs for unit-variance inputs
                p.copy_(r / p.shape[1] ** 0.5)


def hf_logits(model, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        unpadded = model(input_ids=t["input_ids"]).logits
        padded = model(input_ids=t["padded_input_ids"], attention_mask=t["padded_attention_mask"],
                       position_ids=t["padded_position_ids"]).logits
        out = dict(logits=unpadded.float().contiguous(), padded_logits=padded.float().contiguous())
        if "packed_input_ids" in t:
            row, seg = t["packed_input_ids"][0], t["packed_segments"][0]
            packed = torch.zeros(1, row.shape[0], unpadded.shape[-1])
            for doc in seg.unique().tolist():
                if doc > 0:
                    where = (seg == doc).nonzero().squeeze(1)
                    packed[0, where] = model(input_ids=row[where][None]).logits[0].float()
            out["packed_logits"] = packed.contiguous()
    return out


def save_hf(model, path: Path) -> None:
    kwargs = {"safe_serialization": True} if "safe_serialization" in inspect.signature(model.save_pretrained).parameters else {}
    model.save_pretrained(path, **kwargs)  # transformers >= 5 always writes safetensors


def make_fixtures(only: list[str] | None = None) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    OUT.mkdir(parents=True, exist_ok=True)
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        if only and name not in only:
            continue
        cfg = dict(cfg)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
        randomize(model, seed=100 + i)
        t = inputs(config.vocab_size)
        if name not in FAMILY_FIXTURES:  # the first six fixtures predate the packed row
            t = {k: v for k, v in t.items() if not k.startswith("packed")}
        ref = hf_logits(model, t)
        eager = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, attn_implementation="eager").eval()
        eager.load_state_dict(model.state_dict())
        ref_eager = hf_logits(eager, t)
        d = max((ref[k] - ref_eager[k])[_valid(k, t)].abs().max().item() for k in ref)
        target = OUT / name
        save_hf(model, target)
        # bf16 logits catch op-order differences (e.g. where RMSNorm casts back) that float32 hides.
        # Loaded with from_pretrained, not model.to(bf16), which would also round the RoPE inv_freq buffer.
        bf16 = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            ref["logits_bf16"] = bf16(input_ids=t["input_ids"]).logits.contiguous()
        save_file({**t, **ref}, str(target / "reference.safetensors"), metadata={"format": "pt"})
        print(f"{name}: wrote {target} ({type(model).__name__}); HF sdpa vs eager max|dlogit| {d:.2e}")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total fixture size {size / 1024:.0f} KiB")


def _valid(key: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    if key == "packed_logits":
        return t["packed_segments"].bool()
    return t["padded_attention_mask"].bool() if key == "padded_logits" else torch.ones_like(t["input_ids"], dtype=torch.bool)


def check_roundtrip() -> int:
    """sdpo model -> save_model -> transformers from_pretrained; logits must agree."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoModelForCausalLM

    from sdpo.models.checkpoint import save_model
    from sdpo.models.hf_config import config_from_dict

    import transformers

    worst, record = 0.0, {"transformers": transformers.__version__, "tolerance": 1e-4, "models": {}}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        ours_cfg = config_from_dict(dict(cfg), f"CONFIGS[{name!r}]")
        from sdpo.models.model import Transformer

        model = Transformer(ours_cfg).eval()
        randomize(model, seed=200 + i)
        t = inputs(ours_cfg.vocab_size)
        for dtype, shard in ((torch.float32, "5GB"), (torch.bfloat16, "20KB")):
            m = model.to(dtype)
            with torch.no_grad():
                ours = dict(
                    logits=m(t["input_ids"]).float(),
                    padded_logits=m(t["padded_input_ids"], t["padded_attention_mask"]).float(),
                    packed_logits=m(t["packed_input_ids"], t["packed_segments"]).float(),
                )
            tok_dir = ROOT / "data" / "tokenizer" if i == 0 and dtype == torch.float32 else None
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                save_model(m, out, max_shard_size=shard, tokenizer_dir=tok_dir if tok_dir and tok_dir.is_dir() else None)
                files = sorted(p.name for p in out.iterdir())
                hf = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
                ref = hf_logits(hf, t)
                if tok_dir and tok_dir.is_dir():
                    from transformers import AutoTokenizer

                    text = "Hello world, stepwise DPO!"
                    same = AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(tok_dir)(text).input_ids
                    print(f"tokenizer copied from {tok_dir}: AutoTokenizer loads it from the saved dir, same ids: {same}")
                    worst = max(worst, 0.0 if same else float("inf"))
            diffs = {k: (ours[k] - ref[k])[_valid(k, t)].abs().max().item() for k in ours}
            if dtype == torch.float32:
                worst = max(worst, *diffs.values())
                record["models"][name] = {"class": type(hf).__name__, "max_abs_dlogit": diffs}
            print(f"{name:8s} {str(dtype):15s} {type(hf).__name__:18s} files={files}")
            print(f"{'':8s} max|dlogit| unpadded {diffs['logits']:.3e}  padded (real tokens) {diffs['padded_logits']:.3e}"
                  f"  packed (real tokens) {diffs['packed_logits']:.3e}")
        model.float()
    ok = worst <= 1e-4
    print(f"float32 worst max|dlogit| = {worst:.3e} -> {'OK' if ok else 'FAIL'} (tolerance 1e-4)")
    record["worst"] = worst
    (OUT / "roundtrip.json").write_text(json.dumps(record, indent=1) + "\n")  # read by tests/test_families.py
    print(f"wrote {OUT / 'roundtrip.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-roundtrip", action="store_true", help="save with sdpo, load with transformers, compare logits")
    ap.add_argument("--only", nargs="*", help="fixture names to (re)write (default: all)")
    args = ap.parse_args()
    if args.check_roundtrip:
        sys.exit(check_roundtrip())
    make_fixtures(args.only)
