"""torch.distributed plumbing kept out of the model: torchrun init, the device mesh,
FSDP2 sharding, metric all-reduces and the full-state-dict gather for HF export.

`python train.py` runs without a process group (world size 1, nothing sharded);
`torchrun --nproc_per_node N train.py` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR and
we join the group with NCCL on GPU or gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if the env vars say so; pick this rank's device.

    device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu" or "cuda".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but torch.cuda.is_available() is False")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def build_mesh(info: DistInfo):
    """1-D data-parallel mesh over all ranks (FSDP shards along it); None when unsharded."""
    if not info.distributed:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))


def default_mp_policy(device: torch.device, precision: str):
    """bf16 params for compute, float32 gradient reduction, on GPU; None (all float32) on CPU.

    The sharded parameters and the optimizer state stay float32 (the master weights)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def apply_fsdp(model: nn.Module, mesh, *, mp_policy=None, reshard_after_forward: bool = True,
               activation_checkpointing: bool = False) -> nn.Module:
    """Shard each transformer block, then the root (embeddings, final norm, lm_head).

    sdpo.logprobs calls `model.hidden_states(...)` and then `model.lm_head(...)` on the
    response positions only, outside `forward`. FSDP2 hooks `forward` alone, so
    `hidden_states` is registered as a forward method (the root's params get all-gathered
    for it), and the root is told not to reshard after forward: lm_head (tied to
    embed_tokens or not) is then still unsharded when called right after, and backward
    needs the root's params straight away anyway. The root's gradients, lm_head's
    included, are reduce-scattered in FSDP's end-of-backward callback.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if activation_checkpointing:
        model.gradient_checkpointing = True
    kwargs = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in model.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded float32 CPU state dict on rank 0 (empty on other ranks when sharded)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum | max | min); identity without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def all_gather_objects(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
