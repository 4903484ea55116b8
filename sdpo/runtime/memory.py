"""A memory plan to read before renting GPUs: per-rank bytes of a DPO step, from config.json alone.

    python -m sdpo.runtime.memory MODEL_DIR --gpus 8 --gpu-mem-gb 80 --config configs/solar-10.7b-sdpo.toml

Counts what this code keeps alive at the peak of a micro-batch's backward, per rank, with W
ranks under FSDP2 (sdpo.runtime.distributed.apply_fsdp):

  parameters       float32 master weights, sharded:               4·P / W
  gradients        float32, sharded (reduce-scattered):           4·P / W
  optimizer state  AdamW m and v (RMSprop: v), float32, sharded:  8·P / W  (4·P / W)
  unsharded root   embeddings + final norm + lm_head in the compute dtype, kept gathered from
                   hidden_states until backward (reshard_after_forward=False on the root)
  blocks in flight FSDP2 gathers a block and prefetches the next; in backward one more for the
                   block's unsharded gradient: 3 blocks (all L when blocks are not resharded)
  activations      saved for backward, per token per block (below), x tokens x blocks; a
                   checkpointed block keeps only its input [T, H], and backward holds at most the
                   saved blocks, or one recomputed block plus the saved ones below it (backward
                   frees each block's tensors as it passes; the gradients of a block's
                   intermediates add nothing measurable: bench/memory_plan.py)
  logits           fused: one [c, V] chunk of the device's size (kernels.fused_linear.chunk_sizes:
                   ~2^27 logits on CUDA, 2^22 on CPU; 16-bit backward: a chunk, a float32 [Vb, H]
                   block and the [R, H] accumulator); unfused: the [R, V] logits (overwritten by
                   their gradient)
  reference pass   the no-grad M_{t-1} pass before the policy exists: its own peak, not added

Per token, saved by one block (b = compute dtype bytes, r = residual-stream bytes, Q = heads x
head_dim, K = kv heads x head_dim, I = intermediate size; SDPA's flash/efficient kernels keep
q, k, v, out and a float32 log-sum-exp, not the [T, T] scores):

  2 RMSNorms  2·(4H + rH) (r = 2: the fp32 copy and the cast output; r = 4: the input and x·rsqrt)
  autocast    casts of the norm outputs to b for q/k/v and gate/up: 5·bH when r > b (not cached)
  RoPE        q, k and their rotated halves: 2b(Q + K)
  SDPA        q, k, v, out: b(2Q + 2K), log-sum-exp 4·heads; out's [T, Q] copy for o_proj: bQ
  SwiGLU      gate, up, silu(gate), their product: 4bI
  MoE layer   instead of SwiGLU (Mixtral, Qwen3-MoE; sdpo/models/moe.py): router logits bE and float32
              probabilities 4E; per token k expert rows: the gathered input and the down output 2bH,
              and each expert's SwiGLU 4bI_e, so k·(2bH + 4bI_e); plus the forward's running router
              sums over layers (probabilities, picks, z) 12E once. FSDP2 gathers a block whole: all E
              experts of a layer are in flight, though a token uses k of them (total vs active below).
              Qwen3.5-MoE's shared expert adds its SwiGLU 4bI_s, its output bH and its sigmoid gate 2b.
  linear layer instead of RoPE + SDPA (Qwen3.5's Gated DeltaNet, sdpo/models/linear_attention.py; D = the
              conv width 2·n_k·d_k + n_v·d_v, Z = n_v·d_v, C = the chunk, 64): the projection, conv and SiLU
              outputs 3bD, z bZ; in float32 q and k repeated to n_v heads before and after their L2 norm
              16·n_v·d_k, v 4Z, their chunked copies, β·k, β·v and the decayed q and k 4·n_v·(3d_k + 2d_v),
              six [C, C] matrices per chunk (decays, k·k, A, q·k, their products) 24·n_v·C, the solved U, W
              and the corrected U 4·n_v·(2d_v + d_k), the output 4Z, one recurrent state per chunk
              4·n_v·d_k·d_v / C (no K/V); the gated norm 12Z and o for out_proj bZ

Single process (W = 1): nothing sharded and no FSDP buffers; under bf16 autocast the casts
of the weights (2·P) live through the step. Headroom: 1 GiB per GPU for the CUDA context and
kernels, and 10% of the rest for allocator fragmentation.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from kernels.fused_linear import chunk_sizes
from sdpo.models.model import ModelConfig, Transformer, checkpoint_every

GIB = 1 << 30
CONTEXT_BYTES = 1 * GIB        # CUDA context, cuBLAS workspaces, NCCL buffers
FRAGMENTATION = 0.10           # of the GPU memory left after the context


@dataclass
class Setup:
    world_size: int = 1
    micro_batch_size: int = 1          # pairs per forward: 2 rows (chosen, rejected)
    max_length: int = 1024             # tokens per row (upper bound; packing only lowers it)
    response_tokens: int | None = None # scored tokens per micro-batch; None: max_length - max_prompt per row
    max_prompt_length: int = 512
    tokens_per_micro_batch: int | None = None  # a token budget replaces 2·mbs·max_length
    bf16: bool = True                  # FSDP bf16 params / bf16 autocast (GPU); False: float32 (CPU)
    optimizer: str = "adamw"
    checkpoint: int = 0                # checkpoint_every(): 0 none, 1 full, k every k-th block
    fused: bool = True
    reshard_after_forward: bool = True
    device: str = "cuda"               # the fused lm_head's chunk sizes are the device's (kernels.fused_linear)


def param_counts(c: ModelConfig) -> dict[str, int]:
    """Parameter counts: the largest block, the root (embeddings, final norm, lm_head), total, and active
    (what one token uses: a MoE layer's k experts of E) — counted on a meta-device model, so every
    family's pieces (q/k norms, sandwich norms, fused projections, routers, stacked experts) count."""
    with torch.device("meta"):
        model = Transformer(c)
    blocks = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    total = sum(p.numel() for p in model.parameters())  # a tied lm_head is counted once
    idle = 0  # expert parameters a token does not use: (E - k) / E of each sparse layer's experts
    for i, layer in enumerate(model.layers):
        if c.is_sparse(i):
            idle += sum(p.numel() for p in layer.mlp.experts.parameters()) * (c.num_experts - c.num_experts_per_tok) \
                // c.num_experts
    return {"block": max(blocks, default=0), "root": total - sum(blocks), "total": total, "active": total - idle}


def activation_bytes_per_token(c: ModelConfig, b: int, r: int, layer: int = 0) -> int:
    """Bytes block `layer` saves for backward per token (the table in the module docstring)."""
    H, I, Q, K = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, \
        c.num_key_value_heads * c.head_dim
    norms = 2 * (4 * H + r * H)
    casts = 5 * b * H if r > b else 0
    rope = 2 * b * (Q + K)
    sdpa = b * (2 * Q + 2 * K) + 4 * c.num_attention_heads + b * Q
    if c.layer_type(layer) == "linear_attention":
        rope, sdpa = 0, linear_bytes_per_token(c, b)
    mlp = moe_bytes_per_token(c, b) if c.is_sparse(layer) else 4 * b * I
    return norms + casts + rope + sdpa + mlp


def linear_bytes_per_token(c: ModelConfig, b: int, chunk: int = 64) -> int:
    """A Gated DeltaNet layer's mixer activations per token (the linear-layer row of the table)."""
    nv, dk, dv = c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
    D, Z = 2 * c.linear_num_key_heads * dk + nv * dv, nv * dv
    return (3 * b * D + b * Z + 16 * nv * dk + 4 * Z + 4 * nv * (3 * dk + 2 * dv) + 24 * nv * chunk
            + 4 * nv * (2 * dv + dk) + 4 * Z + 4 * nv * dk * dv // chunk + 12 * Z + b * Z)


def moe_bytes_per_token(c: ModelConfig, b: int) -> int:
    """A sparse layer's router and expert activations per token (the MoE row of the table)."""
    E, k, H, S = c.num_experts, c.num_experts_per_tok, c.hidden_size, c.shared_expert_intermediate_size
    shared = 4 * b * S + b * H + 2 * b if S else 0
    return b * E + 4 * E + k * (2 * b * H + 4 * b * (c.moe_intermediate_size or c.intermediate_size)) + shared


def plan(c: ModelConfig, s: Setup) -> dict[str, int]:
    """Per-rank bytes of each term at the peak of a policy micro-batch, and of the reference pass."""
    W, L, V, H = s.world_size, c.num_hidden_layers, c.vocab_size, c.hidden_size
    n = param_counts(c)
    P = n["total"]
    b = 2 if s.bf16 else 4                                   # compute dtype
    sharded = W > 1
    r = b if sharded else 4                                  # FSDP casts the params, so the residual stream too
    tokens = s.tokens_per_micro_batch or 2 * s.micro_batch_size * s.max_length
    resp = s.response_tokens or 2 * s.micro_batch_size * max(1, s.max_length - s.max_prompt_length)
    resp = min(resp, tokens)
    out = {"parameters": 4 * P // W, "gradients": 4 * P // W,
           "optimizer state": (8 if s.optimizer == "adamw" else 4) * P // W}
    if sharded:
        out["unsharded root"] = b * n["root"]
        out["blocks in flight"] = b * n["block"] * (3 if s.reshard_after_forward else L + 1)
    else:
        out["unsharded root"] = 0
        out["blocks in flight"] = 2 * P if s.bf16 else 0     # autocast's weight casts, kept for backward
    per_layer = [activation_bytes_per_token(c, b, r, i) for i in range(L)]
    per_tok = max(per_layer)
    k = s.checkpoint
    kept = 0 if k == 0 else -(-L // k)                       # blocks 0, k, 2k, ... are checkpointed
    checkpointed = [k > 0 and i % k == 0 for i in range(L)]
    # Backward runs the blocks last to first, freeing each block's saved tensors as it goes; a
    # checkpointed block's are recomputed just before its backward. The peak is the most alive at
    # once: all the saved blocks at the start, or a recomputed block plus the saved ones below it.
    live = [sum(per_layer)] if k == 0 else [sum(p for p, ck in zip(per_layer, checkpointed) if not ck)]
    for i in range(L):
        if checkpointed[i]:
            live.append(per_layer[i] + sum(per_layer[j] for j in range(i) if not checkpointed[j]))
    act = tokens * (max(live) + kept * r * H)                # a checkpointed block keeps its input
    if c.num_experts:
        act += tokens * 12 * c.num_experts                   # the router sums over layers (sdpo/models/moe.py)
    act += tokens * r * H * 2                                # final norm input and the gathered [R, H] rows
    out["activations"] = act
    chunk_elements, min_rows, vocab_block = chunk_sizes(s.device)
    chunk_rows = min(resp, max(min_rows, chunk_elements // V))
    if s.fused:
        rows = max(1, chunk_rows)
        # forward: one [c, V] chunk; 16-bit backward: a [c', Vb] chunk, the float32 [Vb, H] dW block
        # and the float32 [R, H] grad-of-hidden accumulator (kernels/fused_linear.py)
        bwd = 0 if b == 4 else min(chunk_elements, resp * V) * b + vocab_block * H * 4 + resp * H * 4
        out["logits"] = max(rows * V * b, bwd)
    else:
        out["logits"] = resp * V * b
    out["total"] = sum(out.values())
    # The no-grad reference pass: fp32 shards, the gathered root and blocks, one block's working
    # set for the micro-batch's tokens, and the logits chunk (or [R, V]).
    ref = 4 * P // W + (b * n["root"] + 2 * b * n["block"] if sharded else (2 * P if s.bf16 else 0))
    ref += tokens * (per_tok + 2 * r * H) + (chunk_rows * V * b if s.fused else resp * V * b)
    out["reference pass"] = ref
    return out


def usable_bytes(gpu_mem_gb: float) -> int:
    total = int(gpu_mem_gb * 1e9)
    return int((total - CONTEXT_BYTES) * (1 - FRAGMENTATION))


def checkpoint_choices(layers: int) -> list[int]:
    """Cheapest first: no recomputation, then every k-th block for k = 4, 3, 2, then all."""
    return [0] + [k for k in (4, 3, 2) if k < layers] + [1]


def setting_name(k: int) -> str:
    return "none" if k == 0 else "full" if k == 1 else f"every:{k}"


def cheapest(c: ModelConfig, s: Setup, gpu_mem_gb: float, per_rank_pairs: int) -> tuple[int, int] | None:
    """(checkpoint k, micro_batch_size) that fits with the least recomputation, then the largest
    micro-batch (fewer accumulation steps); None if nothing fits."""
    limit = usable_bytes(gpu_mem_gb)
    mbs_options = [m for m in (8, 4, 2, 1) if m <= per_rank_pairs and per_rank_pairs % m == 0] or [1]
    for k in checkpoint_choices(c.num_hidden_layers):
        for m in mbs_options:
            p = plan(c, Setup(**{**s.__dict__, "checkpoint": k, "micro_batch_size": m}))
            if max(p["total"], p["reference pass"]) <= limit:
                return k, m
    return None


def _gb(x: int) -> str:
    return f"{x / 1e9:8.2f}"


def format_plan(c: ModelConfig, s: Setup, gpu_mem_gb: float, per_rank_pairs: int | None = None) -> str:
    p = plan(c, s)
    n = param_counts(c)
    limit = usable_bytes(gpu_mem_gb)
    active = f" ({n['active'] / 1e9:.2f}B active per token: {c.num_experts_per_tok} of {c.num_experts} experts)" \
        if c.num_experts else ""
    lines = [f"model: {n['total'] / 1e9:.2f}B parameters{active}, {c.num_hidden_layers} blocks, H={c.hidden_size}, "
             f"V={c.vocab_size}; {s.world_size} rank(s), {'bf16' if s.bf16 else 'float32'} compute, "
             f"{s.optimizer}, micro_batch_size {s.micro_batch_size}, max_length {s.max_length}, "
             f"checkpointing {setting_name(s.checkpoint)}, {'fused' if s.fused else 'unfused'} logits",
             "", "| per rank | GB |", "| --- | ---: |"]
    for key in ("parameters", "gradients", "optimizer state", "unsharded root", "blocks in flight",
                "activations", "logits", "total", "reference pass"):
        lines.append(f"| {key} | {_gb(p[key]).strip()} |")
        if key == "activations" and c.num_experts:
            sparse = sum(c.is_sparse(i) and (s.checkpoint == 0 or i % s.checkpoint) for i in range(c.num_hidden_layers))
            tokens = s.tokens_per_micro_batch or 2 * s.micro_batch_size * s.max_length
            moe = tokens * (sparse * moe_bytes_per_token(c, 2 if s.bf16 else 4) + 12 * c.num_experts)
            lines.append(f"| (of which router + experts) | {_gb(moe).strip()} |")
    verdict = "fits" if max(p["total"], p["reference pass"]) <= limit else "does NOT fit"
    lines += ["", f"usable per GPU: {limit / 1e9:.2f} GB of {gpu_mem_gb:g} GB (1 GiB context, 10% fragmentation) "
                  f"-> {verdict}", "", "| checkpointing | activations GB | total GB | fits |", "| --- | ---: | ---: | --- |"]
    for k in checkpoint_choices(c.num_hidden_layers):
        q = plan(c, Setup(**{**s.__dict__, "checkpoint": k}))
        lines.append(f"| {setting_name(k)} | {_gb(q['activations']).strip()} | {_gb(q['total']).strip()} | "
                     f"{'yes' if max(q['total'], q['reference pass']) <= limit else 'no'} |")
    if not s.fused:
        q = plan(c, Setup(**{**s.__dict__, "fused": True}))
        lines.append(f"\nwith model.fused_logprobs = true the logits take {q['logits'] / 1e9:.2f} GB")
    if per_rank_pairs:
        best = cheapest(c, s, gpu_mem_gb, per_rank_pairs)
        lines.append("" if best is None else
                     f"\ncheapest setting that fits ({per_rank_pairs} pairs per rank per optimizer step): "
                     f"activation_checkpointing = \"{setting_name(best[0])}\", micro_batch_size = {best[1]}")
        if best is None:
            lines.append(f"\nno checkpointing setting fits with micro_batch_size 1 on {gpu_mem_gb:g} GB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdpo.runtime.memory", description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", help="HF model directory (only config.json is read)")
    ap.add_argument("--gpus", type=int, default=8, help="ranks (FSDP2 world size)")
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0)
    ap.add_argument("--config", help="training TOML: micro batch, lengths, checkpointing, fused logits, optimizer")
    ap.add_argument("overrides", nargs="*", help="--section.key=value, as train.py")
    args, extra = ap.parse_known_args(argv)
    from sdpo.models.hf_config import CheckpointError, load_model_config
    from sdpo.runtime.config import ConfigError, load_config

    try:
        c = load_model_config(args.model_dir)
        cfg = load_config(args.config, list(args.overrides) + extra, validate=False)
        k = checkpoint_every(cfg.model.activation_checkpointing)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"sdpo.runtime.memory: {e}", file=sys.stderr)
        return 2
    if args.gpus < 1 or args.gpu_mem_gb <= 0:
        print("sdpo.runtime.memory: --gpus must be >= 1 and --gpu-mem-gb > 0", file=sys.stderr)
        return 2
    t, d = cfg.train, cfg.data
    prompt = d.max_prompt_length if d.max_prompt_length is not None else d.max_length // 2
    s = Setup(world_size=args.gpus, micro_batch_size=t.micro_batch_size, max_length=d.max_length,
              max_prompt_length=prompt, tokens_per_micro_batch=getattr(t, "tokens_per_micro_batch", None),
              bf16=t.precision != "fp32", optimizer=cfg.optim.name, checkpoint=k,
              fused=cfg.model.fused_logprobs, reshard_after_forward=t.reshard_after_forward)
    per_rank = max(1, t.global_batch_size // args.gpus)
    print(format_plan(c, s, args.gpu_mem_gb, per_rank))
    return 0


if __name__ == "__main__":
    sys.exit(main())
