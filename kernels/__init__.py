"""Per-token log-probs without the N×V log-softmax: `token_logprobs` dispatches
to the Triton kernels (kernels/logsoftmax_gather.py) or the chunked PyTorch
reference (kernels/reference.py). `linear_token_logprobs` also fuses the lm_head
matmul in (kernels/fused_linear.py): no [N, V] logits at all, only [chunk, V].

inplace_backward=True tells the op that the logits are a temporary nobody reads
after this op (e.g. the lm_head output): its backward then overwrites the logits
buffer with their gradient instead of allocating a second N×V tensor. Any other
autograd user of those logits fails loudly (version-counter error) rather than
reading the overwritten values.

softcap=c (both entry points) takes the log-softmax of c·tanh(logits/c) instead of the logits:
Gemma 2's final_logit_softcapping, forward and backward, per chunk; None (default) leaves the
op exactly as without it.
"""

from __future__ import annotations

import torch

from .fused_linear import FusedLinearLogprobs
from .reference import chunked_token_logprobs, naive_token_logprobs

try:  # triton is absent on e.g. macOS; the reference path must still work there.
    from . import logsoftmax_gather as _triton_impl
except ImportError as exc:  # pragma: no cover - depends on the environment
    _triton_impl = None
    _TRITON_IMPORT_ERROR: ImportError | None = exc
else:
    _TRITON_IMPORT_ERROR = None

__all__ = ["token_logprobs", "linear_token_logprobs", "naive_token_logprobs", "chunked_token_logprobs",
           "triton_available"]

_IMPLS = ("auto", "triton", "reference")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def triton_available() -> bool:
    return _triton_impl is not None


def _check_inputs(logits, targets, ignore_index: int, check_targets: bool = True) -> None:
    where = "kernels.token_logprobs"
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"{where}: logits and targets must be torch.Tensors, got "
                        f"{type(logits).__name__} and {type(targets).__name__}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{where}: logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where}: logits dtype must be one of float32/bfloat16/float16/float64, got {logits.dtype}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{where}: targets must be an integer tensor (token ids), got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{where}: targets shape {tuple(targets.shape)} must equal logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])} (logits {tuple(logits.shape)})")
    if targets.device != logits.device:
        raise ValueError(f"{where}: logits on {logits.device} but targets on {targets.device}")
    vocab = logits.shape[-1]
    if 0 <= ignore_index < vocab:
        raise ValueError(f"{where}: ignore_index={ignore_index} is a valid token id for V={vocab}; "
                         "use a negative value such as -100")
    if check_targets and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):  # one host sync; an out-of-range id would read out of bounds in the kernel
            first = int(targets[bad].flatten()[0])
            raise ValueError(f"{where}: {int(bad.sum())} target(s) outside [0, {vocab}) that are not "
                             f"ignore_index={ignore_index}, e.g. {first}")


def _check_softcap(softcap, where: str) -> None:
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf"):
        raise ValueError(f"{where}: softcap must be None or a positive finite number (Gemma 2's "
                         f"final_logit_softcapping, e.g. 30.0), got {softcap!r}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                   inplace_backward: bool = False, impl: str = "auto", check_targets: bool = True,
                   *, softcap: float | None = None) -> torch.Tensor:
    """log softmax(logits)[targets] per token.

    logits [..., V] (fp32/bf16/fp16; fp64 on the reference path), targets [...]
    integer ids -> float32 [...] (float64 for float64 logits, reference only), 0 where targets == ignore_index (and no
    gradient there). impl: "auto" (Triton for CUDA tensors when triton
    imports, else the reference), "triton", or "reference". check_targets=False skips the range
    check of the ids (one host sync): for callers that checked them on the host already.
    softcap: c > 0 for log softmax(c·tanh(logits/c))[targets], or None.
    """
    _check_softcap(softcap, "kernels.token_logprobs")
    softcap = None if softcap is None else float(softcap)
    if impl not in _IMPLS:
        raise ValueError(f"kernels.token_logprobs: impl must be one of {_IMPLS}, got {impl!r}")
    _check_inputs(logits, targets, ignore_index, check_targets)
    if impl == "auto":
        impl = "triton" if (logits.is_cuda and _triton_impl is not None and logits.dtype != torch.float64) \
            else "reference"
    lead = targets.shape
    vocab = logits.shape[-1]
    # [N, V] view when the logits are contiguous (a copy otherwise: in place then
    # targets the copy, which is still correct).
    flat_logits = logits.reshape(-1, vocab)
    if flat_logits.stride(-1) != 1:
        flat_logits = flat_logits.contiguous()
    flat_targets = targets.reshape(-1).long()
    if impl == "reference":
        out = chunked_token_logprobs(flat_logits, flat_targets, ignore_index, inplace_backward, softcap=softcap)
    else:
        if _triton_impl is None:
            raise RuntimeError(f"kernels.token_logprobs(impl='triton'): triton failed to import "
                               f"({_TRITON_IMPORT_ERROR}); use impl='reference'")
        _triton_impl.check_device(flat_logits)
        out = _triton_impl.triton_token_logprobs(flat_logits, flat_targets, ignore_index, inplace_backward, softcap)
    return out.reshape(lead)


def _pick_impl(impl: str, x: torch.Tensor, where: str) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"{where}: impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if (x.is_cuda and _triton_impl is not None and x.dtype != torch.float64) else "reference"
    if impl == "triton":
        if _triton_impl is None:
            raise RuntimeError(f"{where}(impl='triton'): triton failed to import "
                               f"({_TRITON_IMPORT_ERROR}); use impl='reference'")
        _triton_impl.check_device(x)
    return impl


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          ignore_index: int = -100, chunk_size: int | None = None,
                          impl: str = "auto", check_targets: bool = True,
                          *, softcap: float | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[targets] per row, without the [R, V] logits.

    hidden [R, H], weight [V, H] (the lm_head weight; a tied embedding is the same Parameter),
    targets [R] integer ids -> float32 [R] (float64 for float64 inputs), 0 where
    targets == ignore_index. Gradients flow to hidden and weight. chunk_size: rows per chunk
    (None: per device, kernels.fused_linear.chunk_sizes: about 2^22 logits on CPU, 2^27 on
    CUDA). Under autocast both inputs are cast to its dtype, as F.linear would be; impl,
    check_targets and softcap (logits -> c·tanh(logits/c)) as in token_logprobs.
    """
    where = "kernels.linear_token_logprobs"
    _check_softcap(softcap, where)
    softcap = None if softcap is None else float(softcap)
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{where}: hidden must be [R, H] and weight [V, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if tuple(targets.shape) != (hidden.shape[0],):
        raise ValueError(f"{where}: targets shape {tuple(targets.shape)} must be ({hidden.shape[0]},) (one per row)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be >= 1 or None, got {chunk_size}")
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)   # differentiable casts: grads reach the fp32 params
    if hidden.dtype != weight.dtype or hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{where}: hidden and weight must share one float dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"{where}: hidden on {hidden.device} but weight on {weight.device}")
    # The value checks of token_logprobs (range of targets, ignore_index) on a [R, V]-shaped
    # stand-in that costs nothing (an expanded scalar).
    _check_inputs(hidden.new_empty(()).expand(hidden.shape[0], weight.shape[0]), targets, ignore_index, check_targets)
    impl = _pick_impl(impl, hidden, where)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    with torch.autocast(dev, enabled=False):  # the matmuls stay in the dtype chosen above
        return FusedLinearLogprobs.apply(hidden, weight, targets.long().contiguous(), ignore_index,
                                         chunk_size, impl == "triton", softcap)
