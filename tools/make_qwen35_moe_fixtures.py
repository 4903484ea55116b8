"""Qwen3.5-MoE (Gated DeltaNet + gated attention + experts with a shared expert) fixtures, both ways.

    /opt/hf/bin/python tools/make_qwen35_moe_fixtures.py     # writes tests/fixtures/qwen35_moe/

Needs transformers >= 5.2 (models/qwen3_5_moe), which sdpo never imports; without fla / causal-conv1d
transformers runs its own torch delta rule, the reference. One tiny random Qwen3_5MoeForCausalLM (two
linear-attention layers around a full-attention one; 4 experts, top-2, a shared expert on every layer):

  text/               save_pretrained output (per-expert tensors, as transformers writes them) +
                      reference.safetensors:
      logits, padded_logits, packed_logits     unpadded [2, SEQ]; left/right-padded [3, SEQ]; a packed row of
                                               three documents, each run alone through transformers
      aux_loss, padded_aux_loss, packed_aux_loss   output_router_logits=True .aux_loss (0/1 mask); packed:
                                               load_balancing_loss_func over the documents' router logits
      pair_*              a shared-prompt pair: prompt|chosen and prompt|rejected as rows of their own
      logits_bf16         the same weights loaded in bfloat16
      greedy_*            generate(do_sample=False): each prompt alone, and left-padded in a batch
  layouts.json        tensor names and shapes of the other two layouts the hub uses: transformers' own
                      parameters (experts fused: mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]) and
                      a vision-language checkpoint (Qwen3_5MoeForConditionalGeneration.save_pretrained:
                      model.language_model.*, model.visual.*) with its config.json; tests write text/'s
                      weights under those names
  roundtrip.json      an sdpo model (other random weights) -> save_model -> transformers: max |Δ logit|
                      unpadded, padded, packed, sdpo's packed shared-prompt row against transformers' two
                      rows, and |Δ aux_loss|; and the parameter count of transformers' default config
                      (Qwen3_5MoeTextConfig(): Qwen3.5-35B-A3B's language model) on the meta device
  peft_all_linear.json  peft's LoRA adapter names and shapes on text/ with target_modules="all-linear"
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "qwen35_moe"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
from make_hf_fixtures import _valid, hf_logits, inputs  # noqa: E402  (the dense fixtures' batches)
from make_moe_fixtures import aux, packed_aux  # noqa: E402

TEXT = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=256, rms_norm_eps=1e-6,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                         mrope_section=[1, 1, 0], mrope_interleaved=True),
    linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
    linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
    shared_expert_intermediate_size=16, router_aux_loss_coef=0.001,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, patch_size=4, temporal_patch_size=2,
              spatial_merge_size=2, out_hidden_size=32, num_position_embeddings=16)


def randomize(model, seed: int) -> None:
    """Weights re-drawn so activations, router logits and logits are O(1) and every gate is unsaturated."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):  # (1 + w) norms except Gated DeltaNet's output norm (plain w)
                p.copy_((1.0 if ".linear_attn.norm." in name else 0.0) + 0.2 * r)
            elif name.endswith(("A_log", "dt_bias")):
                p.copy_(0.5 * r)
            elif name.endswith("conv1d.weight"):
                p.copy_(r / p.shape[-1] ** 0.5)
            elif "embed_tokens" in name:
                p.copy_(r)
            elif name.endswith("mlp.gate.weight"):  # the router: logits of a few units, so top-k is decided
                p.copy_(3 * r / p.shape[-1] ** 0.5)
            else:
                p.copy_(r / p.shape[-1] ** 0.5)


def pair_and_greedy(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4321)
    return dict(pair_prompt=torch.randint(3, vocab, (20,), generator=g),
                pair_chosen=torch.randint(3, vocab, (9,), generator=g),
                pair_rejected=torch.randint(3, vocab, (6,), generator=g),
                greedy_prompts=torch.randint(3, vocab, (2, 7), generator=g))


def reference(model, t: dict) -> dict[str, torch.Tensor]:
    out = hf_logits(model, t)
    out["aux_loss"] = torch.tensor(aux(model, t["input_ids"]))
    out["padded_aux_loss"] = torch.tensor(aux(model, t["padded_input_ids"], t["padded_attention_mask"]))
    out["packed_aux_loss"] = torch.tensor(packed_aux(model, t))
    with torch.no_grad():
        P = t["pair_prompt"]
        out["pair_chosen_logits"] = model(input_ids=torch.cat([P, t["pair_chosen"]])[None]).logits.float()
        out["pair_rejected_logits"] = model(input_ids=torch.cat([P, t["pair_rejected"]])[None]).logits.float()
        prompts, n = t["greedy_prompts"], 8
        kw = dict(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        out["greedy_alone"] = torch.stack([
            model.generate(p[None], attention_mask=torch.ones_like(p[None]), **kw)[0, -n:]
            for p in (prompts[0], prompts[1, 3:])])
        batch = torch.stack([prompts[0], torch.cat([torch.zeros(3, dtype=torch.long), prompts[1, 3:]])])
        bmask = torch.ones_like(batch)
        bmask[1, :3] = 0
        out["greedy_batch"] = model.generate(batch, attention_mask=bmask, **kw)[:, -n:]
    return {k: v.contiguous() for k, v in out.items()}


def packed_pair_diff(ours, hf, t: dict) -> float:
    """sdpo's packed row prompt | chosen | rejected (both responses continue the prompt's state) against
    transformers' prompt|chosen and prompt|rejected rows: max |Δ logit|."""
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


def layouts(model) -> dict:
    """The fused parameter layout (transformers' own) and a vision-language checkpoint's names and config."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    fused = {k: list(v.shape) for k, v in model.state_dict().items()}
    text = {k: v for k, v in TEXT.items()}
    vl = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=text, vision_config=dict(VISION),
                                                             tie_word_embeddings=False)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        vl.save_pretrained(tmp)
        with safe_open(str(Path(tmp) / "model.safetensors"), "pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        config = json.loads((Path(tmp) / "config.json").read_text())
    return {"fused": fused, "vl": shapes, "vl_config": config}


def default_size() -> dict:
    """Qwen3_5MoeTextConfig()'s defaults (the 35B-A3B's language model) and transformers' parameter count."""
    from transformers import AutoModelForCausalLM, Qwen3_5MoeTextConfig

    config = Qwen3_5MoeTextConfig()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {"config": config.to_dict(), "parameters": sum(p.numel() for p in model.parameters())}


def peft_names() -> dict:
    """peft's adapter names and shapes for target_modules="all-linear" on text/."""
    import peft
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(OUT / "text")
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, task_type="CAUSAL_LM",
                                          target_modules="all-linear"))
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        cfg = json.loads((Path(d) / "adapter_config.json").read_text())
        with safe_open(str(Path(d) / "adapter_model.safetensors"), "pt") as f:
            tensors = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    return {"peft": peft.__version__, "target_modules": sorted(cfg["target_modules"]), "tensors": tensors}


def main() -> int:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    OUT.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model("qwen3_5_moe_text", **TEXT)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model, seed=351)
    t = {**inputs(config.vocab_size), **pair_and_greedy(config.vocab_size)}
    ref = reference(model, t)
    model.save_pretrained(OUT / "text")
    bf16 = AutoModelForCausalLM.from_pretrained(OUT / "text", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref["logits_bf16"] = bf16(input_ids=t["input_ids"]).logits.contiguous()
    save_file({**t, **ref}, str(OUT / "text" / "reference.safetensors"), metadata={"format": "pt"})
    greedy_same = torch.equal(ref["greedy_alone"], ref["greedy_batch"])
    print(f"text: {type(model).__name__}; aux {ref['aux_loss'].item():.6f} padded {ref['padded_aux_loss'].item():.6f} "
          f"packed {ref['packed_aux_loss'].item():.6f}; greedy alone == batch: {greedy_same}")
    lay = layouts(model)
    (OUT / "layouts.json").write_text(json.dumps(lay, indent=0, sort_keys=True) + "\n")
    print(f"layouts: fused {len(lay['fused'])} tensors, vl {len(lay['vl'])} tensors "
          f"({sorted({'.'.join(k.split('.')[:2]) for k in lay['vl']})})")

    # sdpo -> transformers
    from sdpo.models.checkpoint import load_model, save_model
    from sdpo.models.moe import load_balancing_loss

    ours = load_model(OUT / "text")
    randomize(ours, seed=352)
    seg, mask = t["packed_segments"], t["padded_attention_mask"]
    with torch.no_grad():
        mine = dict(logits=ours(t["input_ids"]))
        mine_aux = dict(aux_loss=load_balancing_loss(ours.router_stats).item())
        mine["padded_logits"] = ours(t["padded_input_ids"], mask)
        mine_aux["padded_aux_loss"] = load_balancing_loss(ours.router_stats, mask).item()
        mine["packed_logits"] = ours(t["packed_input_ids"], seg)
        mine_aux["packed_aux_loss"] = load_balancing_loss(ours.router_stats, seg).item()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, Path(tmp) / "out", max_shard_size="40KB")  # experts split over shards
        files = sorted(p.name for p in (Path(tmp) / "out").iterdir())
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "out", dtype=torch.float32).eval()
        theirs = hf_logits(hf, t)
        theirs_aux = dict(aux_loss=aux(hf, t["input_ids"]), padded_aux_loss=aux(hf, t["padded_input_ids"], mask),
                          packed_aux_loss=packed_aux(hf, t))
        diffs = {k: (mine[k] - theirs[k])[_valid(k, t)].abs().max().item() for k in mine}
        diffs["packed_pair_logits"] = packed_pair_diff(ours, hf, t)
        diffs.update({k: abs(mine_aux[k] - theirs_aux[k]) for k in mine_aux})
    record = {"transformers": transformers.__version__, "class": type(hf).__name__, "files": files,
              "tolerance": 1e-4, "max_abs_diff": diffs, "default_config": default_size()}
    (OUT / "roundtrip.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"roundtrip sdpo -> {type(hf).__name__} ({len(files)} files): " +
          ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    record = peft_names()
    (OUT / "peft_all_linear.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"peft {record['peft']} all-linear: {record['target_modules']}, {len(record['tensors'])} tensors")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total fixture size {size / 1024:.0f} KiB")
    return 0 if max(diffs.values()) <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
