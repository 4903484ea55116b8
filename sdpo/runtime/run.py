"""What every stage of a training run shares: the `Run` record, logging, and models in and out.

A model is float32 master weights on this rank's device, FSDP2-sharded under torchrun
(sdpo.runtime.distributed); the model class itself knows nothing of that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
import time
from pathlib import Path

import torch

from sdpo.data.tokenizer import check_vocab
from sdpo.models.checkpoint import load_model, save_state_dict
from sdpo.models.hf_config import load_model_config
from sdpo.models.lora import apply_lora, initial_adapters, merge_state_dict, save_peft_adapter
from sdpo.models.model import ModelConfig, Transformer
from sdpo.runtime import distributed as D
from sdpo.runtime.config import Config


class TrainingError(RuntimeError):
    pass


class StopRequested(Exception):
    """train.stop_after reached (fault injection: the process exits as a kill would)."""


class Preempted(Exception):
    """SIGTERM / SIGUSR1 (sdpo.runtime.preempt): every rank stopped after the same step, the state saved."""


@dataclasses.dataclass
class Run:
    """What every stage needs; a record, not a class to subclass."""
    cfg: Config
    info: D.DistInfo
    mesh: object
    out: Path
    tokenizer: object
    tokenizer_dir: str
    autocast_dtype: torch.dtype | None     # bf16 on GPU by default; None = float32 everywhere
    num_steps: int = 0                     # T, the number of sDPO steps
    global_step: int = 0                   # optimizer steps over all stages
    resume_state: dict | None = None       # meta of the state/ checkpoint to continue from
    started: float = dataclasses.field(default_factory=time.time)  # this process's start, for elapsed_s


def log(run: Run, msg: str) -> None:
    if run.info.is_main:
        print(msg, file=sys.stderr, flush=True)


def autocast(run: Run):
    if run.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(run.info.device.type, dtype=run.autocast_dtype)


def to_device(batch: dict, device) -> dict:
    # Python values (sdpo.data.packing.host_facts: flags, id ranges, counts) stay on the host.
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def load_for_training(run: Run, model_dir: str | Path, *, lora: bool = False, tokenizer=None):
    """float32 master weights on this rank's device; FSDP2-sharded under torchrun.

    lora=True (the DPO policy when lora.enabled; never the no-grad reference): frozen base with
    float32 adapters (sdpo.models.lora), added before FSDP2 shards the model.
    tokenizer: the one whose ids the model will read (an external reference's own; default the run's)."""
    check_vocab(tokenizer or run.tokenizer, load_model_config(model_dir))  # before any weights are read
    la, seed = run.cfg.lora, run.cfg.train.seed
    if run.info.distributed:
        # FSDP2 all-gathers one dtype per block: the frozen base stays float32 there (its
        # mp_policy computes in bf16 on GPU anyway).
        prepare = (lambda m: initial_adapters(apply_lora(m, la, seed=seed), seed)) if lora else None
        # Each rank reads only its own FSDP shard rows: never a full float32 copy per rank.
        model = D.load_sharded(model_dir, run.mesh, mp_policy=mp_policy(run),
                               reshard_after_forward=run.cfg.train.reshard_after_forward,
                               activation_checkpointing=run.cfg.model.activation_checkpointing, device=run.info.device,
                               prepare=prepare)
    else:
        model = load_model(model_dir, dtype=torch.float32, device=run.info.device)
        model.gradient_checkpointing = run.cfg.model.activation_checkpointing
    model.fused_logprobs = run.cfg.model.fused_logprobs  # read by sdpo.logprobs
    model.fused_loss = run.cfg.model.fused_loss
    if lora and not run.info.distributed:
        bf16_base = la.base_dtype == "bfloat16" or (la.base_dtype == "auto" and run.autocast_dtype == torch.bfloat16)
        apply_lora(model, la, base_dtype=torch.bfloat16 if bf16_base else None, seed=seed)
    return D.compile_blocks(model, run.cfg.train.compile)


def random_base(run: Run):
    """The tiny default's starting point: a random-init Llama sized by [model], vocab from the tokenizer."""
    m, tok = run.cfg.model, run.tokenizer
    config = ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, torch_dtype="float32")
    model = Transformer(config)
    model.init_weights(seed=run.cfg.train.seed, std=m.init_std)
    model.fused_logprobs, model.fused_loss = m.fused_logprobs, m.fused_loss  # read by sdpo.logprobs
    if run.info.distributed:
        return D.compile_blocks(D.apply_fsdp(model, run.mesh, mp_policy=mp_policy(run),
                                             reshard_after_forward=run.cfg.train.reshard_after_forward,
                                             activation_checkpointing=m.activation_checkpointing), run.cfg.train.compile)
    model.gradient_checkpointing = m.activation_checkpointing
    return D.compile_blocks(model.to(run.info.device), run.cfg.train.compile)


def mp_policy(run: Run):
    return D.default_mp_policy(run.info.device, run.cfg.train.precision)


def export(run: Run, model, path: Path, dtype: str | None, *, base_model_path=None) -> None:
    """M_t as an HF directory (gathered to rank 0, written atomically by sdpo.models.checkpoint).

    A LoRA policy is written merged (W + (α/r)·BA: the next step's reference loads it like any
    model), and its adapter in peft's layout under path/adapter/, for base_model_path."""
    state = D.full_state_dict(model)
    if run.info.is_main:
        lora = getattr(model, "lora_config", None)
        merged = state if lora is None else merge_state_dict(state, lora["alpha"] / lora["rank"])
        # The manifest holds M_t's fingerprint: the next step's reference cache key reads it.
        save_state_dict(merged, model.config, path, tokenizer_dir=run.tokenizer_dir, dtype=dtype, manifest=True)
        if lora is not None:
            save_peft_adapter(model, path / "adapter", base_model_path, state=state)
    # Rank 0 alone writes (minutes for a 10B model): the others wait on the host, under
    # train.export_timeout_s rather than the collectives' timeout.
    D.long_barrier(run.cfg.train.export_timeout_s, f"rank 0 to write {path}")


def free_memory() -> None:
    """Return freed blocks to the allocator once the caller has dropped its last reference."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
