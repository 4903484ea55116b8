"""torch.distributed plumbing kept out of the model: torchrun init, the device mesh,
FSDP2 sharding, metric all-reduces and the full-state-dict gather for HF export.

`python train.py` runs without a process group (world size 1, nothing sharded);
`torchrun --nproc_per_node N train.py` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR and
we join the group with NCCL on GPU or gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Replicate, Shard

from sdpo.models.checkpoint import checked_tensors, read_rows
from sdpo.models.hf_config import CheckpointError, load_model_config
from sdpo.models.model import Transformer


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


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the torchrun process group if the env vars say so; pick this rank's device.

    device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu" or "cuda".
    timeout_s (train.timeout_s): how long a collective may wait for the slowest rank before the
    job fails (None: torch's default, 10 min for NCCL); long waits by design (rank 0 writing
    M_t) use long_barrier instead.
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
        kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None, **kwargs)
        global _host_group
        # A CPU (gloo) group for waits on one rank's host work: every rank creates it, now, in order.
        _host_group = dist.new_group(backend="gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def destroy(barrier: bool = True) -> None:
    """Leave the process group. After a clean finish a barrier comes first, so no rank tears gloo
    down while a peer is still talking to it (gloo aborts: "terminate called without an active
    exception"); after an error there is none, as the other ranks may be inside another collective."""
    global _host_group
    if dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        if _host_group is not None:
            dist.destroy_process_group(_host_group)
            _host_group = None
        dist.destroy_process_group()


def mesh_shape(world_size: int, dp_shard: int | None = None, dp_replicate: int | None = None,
               local_world_size: int | None = None) -> tuple[int, int]:
    """(replicate, shard) group sizes for train.dp_replicate / train.dp_shard; raises ValueError naming them.

    dp_shard None: the GPUs per node (torchrun's LOCAL_WORLD_SIZE), so parameters are all-gathered
    and gradients reduce-scattered over the node's fast links only, and across nodes only the
    gradient all-reduce between the replicas travels (HSDP; 1/shard of the model per rank)."""
    if dp_shard is None:
        dp_shard = min(world_size, local_world_size or world_size)
        if dp_replicate is not None and world_size % dp_replicate == 0:
            dp_shard = world_size // dp_replicate
    if dp_replicate is None:
        dp_replicate = world_size // dp_shard if world_size % dp_shard == 0 else 0
    if dp_shard < 1 or dp_replicate < 1 or dp_shard * dp_replicate != world_size:
        raise ValueError(f"train.dp_replicate ({dp_replicate}) x train.dp_shard ({dp_shard}) must equal the world "
                         f"size ({world_size}); set train.dp_shard to a divisor of {world_size} (e.g. the GPUs per node)")
    return dp_replicate, dp_shard


def build_mesh(info: DistInfo, dp_shard: int | None = None, dp_replicate: int | None = None):
    """The FSDP2 mesh: None when unsharded; 1-D ("dp",) when every rank holds one shard of one copy;
    2-D ("replicate", "shard") for HSDP (fully_shard then shards along "shard" and all-reduces the
    gradients along "replicate"). Either way the result is the one-process result: the loss is a
    mean over the global batch, and both groups average."""
    if not info.distributed:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    replicate, shard = mesh_shape(info.world_size, dp_shard, dp_replicate, local)
    if replicate == 1:
        return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))
    return init_device_mesh(info.device.type, (replicate, shard), mesh_dim_names=("replicate", "shard"))


def describe_mesh(mesh) -> str:
    """For the start-up line: "unsharded", "FSDP over 8", "HSDP mesh 4 x 8 (replicate x shard)"."""
    if mesh is None:
        return "unsharded"
    if mesh.ndim == 1:
        return f"FSDP over {mesh.size()}"
    return f"HSDP mesh {mesh.size(0)} x {mesh.size(1)} (replicate x shard)"


def shard_group(mesh) -> tuple[int, int]:
    """(this rank's index, size) along the mesh dim FSDP2 shards parameters over."""
    if mesh.ndim == 1:
        return mesh.get_local_rank(), mesh.size()
    return mesh.get_local_rank("shard"), mesh.size(mesh.mesh_dim_names.index("shard"))


def use_bf16(precision: str, device: torch.device) -> bool:
    """train.precision: "bf16" always, "auto" on a GPU only, "fp32" never."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def default_mp_policy(device: torch.device, precision: str):
    """bf16 params for compute, float32 gradient reduction, on GPU; None (all float32) on CPU.

    The sharded parameters and the optimizer state stay float32 (the master weights)."""
    if use_bf16(precision, device):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def apply_fsdp(model: nn.Module, mesh, *, mp_policy=None, reshard_after_forward: bool = True,
               activation_checkpointing: bool | int | str = False) -> nn.Module:
    """Shard each transformer block, then the root (embeddings, final norm, lm_head).

    sdpo.logprobs calls `model.hidden_states(...)` and then `model.lm_head(...)` on the
    response positions only, outside `forward`. FSDP2 hooks `forward` alone, so
    `hidden_states` is registered as a forward method (the root's params get all-gathered
    for it), and the root is told not to reshard after forward: lm_head (tied to
    embed_tokens or not) is then still unsharded when called right after, and backward
    needs the root's params straight away anyway. The root's gradients, lm_head's
    included, are reduce-scattered in FSDP's end-of-backward callback. A no-grad pass
    (the reference) has no backward to reshard the root: call `reshard_root` after it.

    activation_checkpointing: "none" | "full" | "every:K" | K | bool (sdpo.models.model.checkpoint_every);
    the blocks are checkpointed inside their FSDP wrappers, so a recomputed block all-gathers
    its parameters again in backward, as it would without checkpointing.
    """
    model.gradient_checkpointing = activation_checkpointing
    kwargs = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in model.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def defer_gradient_reduction(model: nn.Module, defer: bool, *, reduce_scatter: bool = False) -> None:
    """Call before each micro-batch's backward: defer=True on all but the last of an optimizer step.

    HSDP (a 2-D mesh): the all-reduce across replicas (between nodes) is skipped while deferred
    (set_requires_all_reduce(False)); the reduce-scatter inside the shard group still runs, so the
    accumulated gradient stays sharded (no memory cost) and only the step's last micro-batch
    all-reduces, once, the sum of all. reduce_scatter=True also defers FSDP2's reduce-scatter
    (set_requires_gradient_sync(False)): gradients then accumulate unsharded, one full gradient per
    rank in the reduce dtype (43 GB for a 10.7B model in float32), so it is off unless asked for.
    The sums, hence the gradients, are the same either way; no-op without FSDP2."""
    if not hasattr(model, "set_requires_gradient_sync"):   # not an FSDPModule
        return
    if reduce_scatter:
        model.set_requires_gradient_sync(not defer)
    elif _is_hsdp(model):
        model.set_requires_all_reduce(not defer)


def _is_hsdp(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return isinstance(p, DTensor) and p.device_mesh.ndim == 2


def compile_blocks(model: nn.Module, enabled: bool = True) -> nn.Module:
    """train.compile: torch.compile each transformer block's forward, from outside the model.

    Per block (all blocks share one graph, compiled once per input shape) and forward only, as an
    instance attribute: the module tree and parameter names stay as they are (exports, DCP state,
    load_sharded), and FSDP2's pre/post-forward hooks, which run around forward in the module's
    __call__, stay eager: the compiled region holds the block's math and nothing of the sharding."""
    if enabled:
        for block in model.layers:
            block.forward = torch.compile(block.forward)
    return model


def reshard_root(model: nn.Module) -> None:
    """Free the root's all-gathered parameters (embeddings, final norm, lm_head) kept after
    forward (reshard_after_forward=False), e.g. once a no-grad pass is over; no-op unsharded."""
    if hasattr(model, "reshard"):  # an FSDPModule
        model.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded float32 CPU state dict on rank 0 (empty on other ranks when sharded)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum | max | min); identity without a process group.

    NCCL reduces GPU tensors only: a host tensor (a token count, a metric) makes the round
    trip through this rank's GPU, instead of failing with "no backend for device type cpu"."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=red)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t, op=red)
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


_host_group = None  # made by init_distributed


def long_barrier(timeout_s: float, what: str = "rank 0") -> None:
    """Wait up to timeout_s for every rank (e.g. while rank 0 writes a 43 GB M_t), over the gloo
    host group: a plain barrier would wait under the process group's timeout (train.timeout_s),
    and an NCCL one spins a GPU stream meanwhile. monitored_barrier names the ranks that never came."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    group = _host_group if _host_group is not None else dist.group.WORLD
    if dist.get_backend(group) != "gloo":  # no host group (a process group made elsewhere, NCCL)
        dist.barrier()
        return
    try:
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        raise RuntimeError(f"waited {timeout_s:.0f}s for {what} (train.export_timeout_s); {e}") from e


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# --------------------------------------------------------------------------------------
# Loading an HF checkpoint straight into FSDP2 shards
# --------------------------------------------------------------------------------------

def shard_rows(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of a dim-0 length n that FSDP2's Shard(0) gives `rank`.

    FSDP2 splits like torch.chunk: chunks of ceil(n / W) rows, the last ones short or empty
    (n = 5, W = 4 -> 2, 2, 1, 0 rows; n = 1, W = 2 -> 1, 0)."""
    size = -(-n // world_size)
    start = min(rank * size, n)
    return start, min(start + size, n)


def load_sharded(path, mesh, *, mp_policy=None, reshard_after_forward: bool = True,
                 activation_checkpointing: bool | int | str = False, device=None, prepare=None) -> nn.Module:
    """An HF model directory as an FSDP2-sharded float32 Transformer, without a full copy anywhere.

    Build on the meta device, fully_shard it (blocks, then root, as apply_fsdp), allocate
    only this rank's shards on `device` (to_empty), then fill each shard with its rows read
    from the safetensors file: get_slice(name)[start:stop] reads just those rows from the
    mmapped file. A rank's host memory holds its 1/W of the model plus one parameter's rows in
    flight, instead of the whole model in float32 (43 GB for a 10.7B model, on every rank).
    Values equal load_model(path, dtype=float32) bit for bit (the cast happens per row block).

    prepare(model) runs on the meta model before sharding (sdpo.models.lora adds its adapters there, so
    fully_shard shards them with their block) and returns full CPU values of the parameters it
    added, {name: tensor}; each rank copies its rows of those like the file's.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    config = load_model_config(root)
    device = torch.device(device if device is not None else "cpu")
    tensors = checked_tensors(root, config)  # our name -> (file, HF name); fails like load_model

    with torch.device("meta"):
        model = Transformer(config)
    added = prepare(model) if prepare is not None else {}
    apply_fsdp(model, mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward,
               activation_checkpointing=activation_checkpointing)
    # FSDPModule._apply re-registers each sharded parameter after to_empty (and pads the local
    # tensor); a tied lm_head stays the same Parameter object as embed_tokens (checked below).
    model.to_empty(device=device)
    model.tie_weights()
    if config.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight:
        raise RuntimeError("load_sharded: lm_head.weight is no longer tied to embed_tokens.weight after to_empty")

    # Rows along the shard dim only: under HSDP each replica group holds a full copy, so rank
    # (r, s) reads what rank s of a 1-D mesh of the shard group's size would.
    rank, W = shard_group(mesh)
    placement = (Shard(0),) if mesh.ndim == 1 else (Replicate(), Shard(0))
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head appears once, as embed_tokens.weight
            if not isinstance(p, DTensor) or tuple(p.placements) != placement:
                raise RuntimeError(f"load_sharded: {name} is not a {placement} DTensor ({type(p).__name__})")
            local = p.to_local()  # this rank's rows: a view into FSDP's padded shard buffer
            start, stop = shard_rows(p.shape[0], W, rank)
            if local.shape != (stop - start, *p.shape[1:]):
                raise RuntimeError(f"load_sharded: {name} local shard {tuple(local.shape)} != rows "
                                   f"[{start}, {stop}) of {tuple(p.shape)}")
            if stop == start:
                continue
            if name in added:
                local.copy_(added[name][start:stop])
                continue
            rows = read_rows(tensors[name], start, stop)  # [stop - start, ...] in the file's dtype (MoE: experts)
            local.copy_(rows)  # float32 cast in the copy, as load_model's .to(float32)
            del rows
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{root}: no data was loaded for {left}")
    model.config.torch_dtype = "float32"
    return model
