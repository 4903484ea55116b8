"""Qwen3.5 (Gated DeltaNet + gated attention) reference fixtures from transformers, both ways.

    /opt/hf/bin/python tools/make_qwen35_fixtures.py     # writes tests/fixtures/qwen35/

Needs transformers >= 5.2 (models/qwen3_5), which sdpo never imports. Without the fla and
causal-conv1d packages transformers runs its own torch implementation of the delta rule: that is
the reference. Writes, for one tiny random Qwen3_5ForCausalLM (three linear-attention layers and a
full-attention one, as the released models interleave them):

  text/                  save_pretrained output + reference.safetensors:
      logits             [2, SEQ] unpadded
      padded_logits      [3, SEQ] left-padded, right-padded, unpadded rows (attention_mask)
      long_logits        [1, LONG] one row over several 64-token chunks
      *_bf16             logits and long_logits of the same weights loaded in bfloat16
      pair_*             a shared-prompt pair: prompt|chosen and prompt|rejected run as their own rows
      greedy_*           generate(do_sample=False): each prompt alone, and the prompts left-padded in a batch
  vl/                    a vision-language checkpoint's config.json (model_type qwen3_5) and tensors.json, the
                         names and shapes Qwen3_5ForConditionalGeneration saves (model.language_model.*, a tiny
                         vision tower model.visual.*); tests write text/'s weights under those names
  roundtrip.json         an sdpo model saved with save_model, loaded by transformers: max |Δ logit| unpadded,
                         padded, long, and sdpo's packed shared-prompt row against transformers' two rows
  peft_all_linear.json   peft's LoRA adapter names and shapes on text/ with target_modules="all-linear"
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "qwen35"
SEQ, LONG = 11, 150
TEXT = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                         mrope_section=[1, 1, 0], mrope_interleaved=True),
    linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
    linear_num_value_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, patch_size=4, temporal_patch_size=2,
              spatial_merge_size=2, out_hidden_size=32, num_position_embeddings=16)


def randomize(model, seed: int) -> None:
    """Re-draw the weights so activations and logits are O(1) and every gate is away from saturation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                # (1 + w) norms everywhere except Gated DeltaNet's output norm (plain w)
                p.copy_((1.0 if ".linear_attn.norm." in name else 0.0) + 0.2 * r)
            elif name.endswith(("A_log", "dt_bias")):
                p.copy_(0.5 * r)
            elif name.endswith("conv1d.weight"):
                p.copy_(r / p.shape[-1] ** 0.5)
            elif name.endswith(".bias"):
                p.copy_(0.2 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            else:
                p.copy_(r / p.shape[-1] ** 0.5)


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    V = TEXT["vocab_size"]
    ids = torch.randint(3, V, (2, SEQ), generator=g)
    left, right = 3, 4
    padded = torch.stack([torch.cat([torch.zeros(left, dtype=torch.long), ids[0, :SEQ - left]]),
                          torch.cat([ids[1, :SEQ - right], torch.zeros(right, dtype=torch.long)]), ids[0]])
    mask = torch.ones_like(padded)
    mask[0, :left] = 0
    mask[1, SEQ - right:] = 0
    return dict(input_ids=ids, padded_input_ids=padded, padded_attention_mask=mask,
                long_input_ids=torch.randint(3, V, (1, LONG), generator=g),
                # a pair whose prompt (70 tokens) and chosen response (40) cross the 64-token chunk boundary
                pair_prompt=torch.randint(3, V, (70,), generator=g), pair_chosen=torch.randint(3, V, (40,), generator=g),
                pair_rejected=torch.randint(3, V, (9,), generator=g),
                greedy_prompts=torch.randint(3, V, (2, 7), generator=g))


def reference(model, t: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        pos = (t["padded_attention_mask"].cumsum(-1) - 1).clamp(min=0)
        out = dict(
            logits=model(input_ids=t["input_ids"]).logits,
            padded_logits=model(input_ids=t["padded_input_ids"], attention_mask=t["padded_attention_mask"],
                                position_ids=pos).logits,
            long_logits=model(input_ids=t["long_input_ids"]).logits,
            pair_chosen_logits=model(input_ids=torch.cat([t["pair_prompt"], t["pair_chosen"]])[None]).logits,
            pair_rejected_logits=model(input_ids=torch.cat([t["pair_prompt"], t["pair_rejected"]])[None]).logits,
        )
        # greedy: 12 new tokens, eos 2 disabled so the rows run to the end
        prompts = t["greedy_prompts"]
        kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        out["greedy_alone"] = torch.stack([model.generate(p[None], attention_mask=torch.ones_like(p[None]), **kw)[0, -12:]
                                           for p in (prompts[0], prompts[1, 3:])])
        batch = torch.stack([prompts[0], torch.cat([torch.zeros(3, dtype=torch.long), prompts[1, 3:]])])
        bmask = (batch != 0).long()
        bmask[0] = 1
        out["greedy_batch"] = model.generate(batch, attention_mask=bmask, **kw)[:, -12:]
    return {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in out.items()}


def packed_pair_diff(ours, hf, t: dict) -> float:
    """sdpo's packed row prompt | chosen | rejected (one prompt, both responses continuing its state)
    against transformers' prompt|chosen and prompt|rejected rows: max |Δ logit|."""
    from sdpo.data.packing import pack
    from sdpo.data.pairs import TokenizedPair
    from sdpo.models.attention import packed_mask

    P, C, R = (t[k].tolist() for k in ("pair_prompt", "pair_chosen", "pair_rejected"))
    b = pack([TokenizedPair(P, C, R, 0)], pad_id=0, rows="one")
    masks = {None: packed_mask(b["doc_ids"], b["segments"], b["position_ids"]),
             "documents": (b["doc_ids"], b["segments"])}
    with torch.no_grad():
        row = ours.lm_head(ours.hidden_states(b["input_ids"], None, b["position_ids"], attn_mask=masks))[0]
        chosen = hf(input_ids=torch.tensor([P + C])).logits[0]
        rejected = hf(input_ids=torch.tensor([P + R])).logits[0, len(P):]
    n = len(P) + len(C)
    return max((row[:n] - chosen).abs().max().item(), (row[n:n + len(R)] - rejected).abs().max().item())


def peft_names() -> None:
    """peft's adapter names and shapes for target_modules="all-linear" on text/ (peft_all_linear.json)."""
    import peft
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(OUT / "text")
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, task_type="CAUSAL_LM",
                                          target_modules="all-linear"))
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        cfg = json.loads((Path(d) / "adapter_config.json").read_text())
        with safe_open(str(Path(d) / "adapter_model.safetensors"), "pt") as f:
            tensors = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    record = {"peft": peft.__version__, "target_modules": sorted(cfg["target_modules"]), "tensors": tensors}
    (OUT / "peft_all_linear.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"peft {peft.__version__} all-linear: {record['target_modules']}, {len(tensors)} tensors")


def main() -> int:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3_5Config, Qwen3_5ForConditionalGeneration

    OUT.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model("qwen3_5_text", **TEXT)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model, seed=35)
    t = inputs()
    ref = reference(model, t)
    model.save_pretrained(OUT / "text")
    # bf16 logits catch an op done in another dtype or order; from_pretrained, as a user loads it.
    bf16 = AutoModelForCausalLM.from_pretrained(OUT / "text", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref["logits_bf16"] = bf16(input_ids=t["input_ids"]).logits.contiguous()
        ref["long_logits_bf16"] = bf16(input_ids=t["long_input_ids"]).logits.contiguous()
    save_file({**t, **ref}, str(OUT / "text" / "reference.safetensors"), metadata={"format": "pt"})
    print(f"text: {type(model).__name__}; greedy alone == batch: {torch.equal(ref['greedy_alone'], ref['greedy_batch'])}")

    # The language weights inside a vision-language checkpoint.
    vl_config = Qwen3_5Config(text_config=dict(TEXT), vision_config=dict(VISION), tie_word_embeddings=False)
    vl = Qwen3_5ForConditionalGeneration(vl_config).eval()
    missing = vl.model.language_model.load_state_dict(model.model.state_dict())
    vl.lm_head.load_state_dict(model.lm_head.state_dict())
    (OUT / "vl").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        vl.save_pretrained(tmp)
        from safetensors import safe_open

        with safe_open(str(Path(tmp) / "model.safetensors"), "pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        (OUT / "vl" / "config.json").write_text((Path(tmp) / "config.json").read_text())
    # The tensor names and shapes only (the weights are text/'s): the test writes the directory from them.
    (OUT / "vl" / "tensors.json").write_text(json.dumps(shapes, indent=0, sort_keys=True) + "\n")
    groups = sorted({".".join(k.split(".")[:2]) for k in shapes})
    print(f"vl: {type(vl).__name__} ({missing}); {len(shapes)} tensors in {groups}")

    # sdpo -> transformers
    sys.path.insert(0, str(ROOT))
    from sdpo.models.checkpoint import load_model, save_model

    ours = load_model(OUT / "text")
    randomize(ours, seed=36)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, Path(tmp) / "out")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "out", dtype=torch.float32).eval()
        with torch.no_grad():
            mask = t["padded_attention_mask"]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            diffs = {
                "logits": (ours(t["input_ids"]) - hf(input_ids=t["input_ids"]).logits).abs().max().item(),
                "padded_logits": ((ours(t["padded_input_ids"], mask) - hf(input_ids=t["padded_input_ids"],
                                  attention_mask=mask, position_ids=pos).logits)[mask.bool()]).abs().max().item(),
                "long_logits": (ours(t["long_input_ids"]) - hf(input_ids=t["long_input_ids"]).logits).abs().max().item(),
                "packed_pair_logits": packed_pair_diff(ours, hf, t),
            }
    record = {"transformers": transformers.__version__, "class": type(hf).__name__, "tolerance": 1e-4,
              "max_abs_dlogit": diffs}
    (OUT / "roundtrip.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"roundtrip sdpo -> {type(hf).__name__}: {diffs}")
    peft_names()
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total fixture size {size / 1024:.0f} KiB")
    return 0 if max(diffs.values()) <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
