"""Sequence log-probs of responses, the fused chosen/rejected forward, response-only logits.

For a row x_0 .. x_{T-1} with labels l_0 .. l_{T-1} (labels == input ids on response
tokens, ignore_index elsewhere, NOT shifted; see sdpo.data.packing.collate):

    log π(y|x) = Σ_{t : l_{t+1} ≠ ignore} log softmax(z_t)[l_{t+1}]        (1)

where z_t = lm_head(h_t) are the logits at position t, which has seen x_0..x_t. The
shift happens here and only here: targets[t] = labels[t+1], the last column has no
target. Positions without a target (prompt, padding, the last column) contribute
exactly 0 to (1) and send exactly 0 gradient into their logits.

Response-only logits: on real data prompts are most tokens, and V ≈ 32K-128K makes
z the biggest activation in the step. So we run the model to the final hidden states
[N, T, H], gather the rows that have a target ([R, H], R = response tokens), and apply
lm_head only to those: the [N, T, V] logits are never materialised. With fused=True
(the default; config model.fused_logprobs) not even [R, V]: lm_head and the log-softmax
run together in chunks of rows (kernels.linear_token_logprobs), [chunk, V] at a time.

Packed rows (sdpo.data.packing.pack, packed_forward): the shift is done on the CPU instead.
The batch carries the flat position of the hidden state that predicts each scored token
([R]; the last prompt position twice, for the first chosen and the first rejected token)
and the targets; everything after the gather is the same as above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import kernels
from kernels.fused_linear import rows_per_chunk
from kernels.fused_loss import FusedLinearGroupLoss
from sdpo.data.packing import IGNORE_INDEX
from sdpo.models.attention import FLEX_BLOCK, flex_available, flex_row_length, packed_mask


@dataclass
class SequenceLogps:
    logps: Tensor  # [N] Σ log p over response tokens, eq. (1); gradient flows
    counts: Tensor  # [N] long, number of response tokens (targets that are not ignored)

    @property
    def mean_logps(self) -> Tensor:
        """[N] per-token mean log-prob (length-normalised; 0 for a row with no response tokens)."""
        return self.logps / self.counts.clamp(min=1).to(self.logps.dtype)


def _shifted_targets(labels: Tensor, ignore_index: int) -> Tensor:
    """labels [N, T] -> targets [N, T]: targets[:, t] = labels[:, t+1], last column ignored."""
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    return targets


def _check_token_range(model, token_range) -> bool:
    """token_range (min, max) from the CPU batch (sdpo.data.packing.host_facts) against the vocab:
    an id outside it would read out of bounds. True when checked, so the kernels may skip their
    own check on the device (a host sync per call); False: none given, the kernels check."""
    if token_range is None:
        return False
    vocab = model.lm_head.weight.shape[0]
    lo, hi = token_range
    if lo < 0 or hi >= vocab:
        raise ValueError(f"sdpo/logprobs.py: the batch holds token ids in [{lo}, {hi}], outside the model's "
                         f"vocabulary [0, {vocab}) (a tokenizer that does not match the model?)")
    return True


def _token_logps(model, h: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                 fused: bool | None = None, checked: bool = False) -> Tensor:
    """h [R, H] final hidden states, targets [R] -> log p(target) [R] float32.

    The one place lm_head is applied on the response-only paths (sequence_logps, packed_forward).
    fused (None: model.fused_logprobs if set, else True): kernels.linear_token_logprobs, at most
    [chunk, V] logits at a time; False: lm_head's [R, V] logits, then the log-prob kernel. With
    FSDP2 lm_head.weight is the root's unsharded parameter here: the caller has just run the
    registered forward method hidden_states, and the root is not resharded after forward.
    checked: the ids were range-checked on the host (_check_token_range), the kernels skip it."""
    if fused is None:
        fused = getattr(model, "fused_logprobs", True)
    if fused and getattr(model.lm_head, "bias", None) is None:
        # Gemma 2's final soft-cap lives in lm_head (sdpo.models.layers.SoftcappedHead); the fused kernel
        # applies it per chunk, forward and backward.
        softcap = getattr(model.lm_head, "softcap", None)
        return kernels.linear_token_logprobs(h, model.lm_head.weight, targets, ignore_index,
                                             check_targets=not checked, softcap=softcap)  # [R]
    logits = model.lm_head(h)  # [R, V], the only logits ever built (soft-capped by lm_head where the family caps)
    # The logits are a temporary: lm_head's backward needs h and its weight, not its
    # output, so the kernel may overwrite this buffer with its gradient (no 2nd [R, V]).
    return kernels.token_logprobs(logits, targets, ignore_index, inplace_backward=True,
                                  check_targets=not checked)  # [R]


def _check_inputs(input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None,
                  position_ids: Tensor | None) -> None:
    where = "sdpo/logprobs.py: sequence_logps"
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"{where}: input_ids must be a [N, T] tensor, got {got}")
    if input_ids.dtype.is_floating_point or labels.dtype.is_floating_point:
        raise TypeError(
            f"{where}: input_ids and labels must be integer token ids, got {input_ids.dtype}, {labels.dtype}"
        )
    for name, x in (("labels", labels), ("attention_mask", attention_mask), ("position_ids", position_ids)):
        if x is not None and tuple(x.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"{where}: {name} has shape {tuple(x.shape)}, expected input_ids' {tuple(input_ids.shape)}"
            )


def sequence_logps(
    model,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    response_only: bool = True,
    fused: bool | None = None,
    gather_index: Tensor | None = None,
    right_padded: bool = False,
    token_range: tuple[int, int] | None = None,
) -> SequenceLogps:
    """Eq. (1) for every row of a [N, T] batch.

    response_only=True needs `model.hidden_states(input_ids, attention_mask, position_ids)`
    -> [N, T, H] and `model.lm_head` (H -> V); False calls `model(...)` -> [N, T, V]
    (the reference path for tests and benchmarks). fused: see _token_logps.
    gather_index, right_padded, token_range: sdpo.data.packing.host_facts of the CPU batch, so the
    step asks the device nothing (no nonzero(), no is_right_padded .item(), no range check).
    """
    _check_inputs(input_ids, labels, attention_mask, position_ids)
    N, T = input_ids.shape
    targets = _shifted_targets(labels, ignore_index)  # [N, T]
    has_target = targets != ignore_index  # [N, T] bool
    counts = has_target.sum(dim=1)  # [N]

    if response_only:
        if not (hasattr(model, "hidden_states") and hasattr(model, "lm_head")):
            raise TypeError(
                f"sdpo/logprobs.py: response_only=True needs model.hidden_states() and model.lm_head; "
                f"{type(model).__name__} lacks them (pass response_only=False)"
            )
        # Right-padded rows: plain causal attention is exact for every scored token (the pads come
        # after it), so the model needs no mask and does not test the padding itself.
        hidden = model.hidden_states(input_ids, None if right_padded else attention_mask, position_ids)  # [N, T, H]
        flat_idx = gather_index
        if flat_idx is None:
            flat_idx = has_target.reshape(-1).nonzero().squeeze(1)  # [R] positions in N*T (one host sync)
        h = hidden.reshape(N * T, -1).index_select(0, flat_idx)  # [R, H]
        checked = _check_token_range(model, token_range)
        token_logps = _token_logps(model, h, targets.reshape(-1).index_select(0, flat_idx), ignore_index, fused,
                                   checked)  # [R]
        # Sums per row: scatter into [N*T] (distinct positions) and sum rows, no index_add_ (its
        # atomics add in a different order each run on CUDA); the backward is a gather.
        logps = token_logps.new_zeros(N * T).scatter(0, flat_idx, token_logps).view(N, T).sum(dim=1)  # [N]
    else:
        logits = model(input_ids, attention_mask, position_ids)  # [N, T, V]
        token_logps = kernels.token_logprobs(logits, targets, ignore_index)  # [N, T], 0 where no target
        logps = token_logps.sum(dim=1)
    return SequenceLogps(logps=logps, counts=counts)


def concatenated_forward(
    model, batch: dict, *, ignore_index: int = IGNORE_INDEX, response_only: bool = True, fused: bool | None = None
) -> tuple[SequenceLogps, SequenceLogps]:
    """One forward over the collated [2B, T] batch -> (chosen, rejected), each with [B] fields.

    batch: "input_ids" and "labels" [2B, T], optional "attention_mask" and "position_ids";
    rows 0..B-1 are the chosen responses, B..2B-1 the rejected ones (sdpo.data.packing.collate).
    One forward instead of two halves the number of weight reads and kernel launches, and
    with FSDP the number of parameter all-gathers.
    """
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise KeyError(f"sdpo/logprobs.py: concatenated_forward: batch has no {key!r} (keys: {sorted(batch)})")
    n = batch["input_ids"].shape[0]
    if n % 2:
        raise ValueError(
            f"sdpo/logprobs.py: concatenated_forward: batch has {n} rows; expected 2B (B chosen then B rejected)"
        )
    out = sequence_logps(
        model,
        batch["input_ids"],
        batch["labels"],
        batch.get("attention_mask"),
        batch.get("position_ids"),
        ignore_index=ignore_index,
        response_only=response_only,
        fused=fused,
        gather_index=batch.get("gather_index"),
        right_padded=batch.get("right_padded", False),
        token_range=batch.get("token_range"),
    )
    b = n // 2
    chosen = SequenceLogps(out.logps[:b], out.counts[:b])
    rejected = SequenceLogps(out.logps[b:], out.counts[b:])
    return chosen, rejected


PACKED_KEYS = ("input_ids", "position_ids", "doc_ids", "segments", "gather_index", "targets", "token_slot", "counts")


def _packed_masks(model, batch: dict, backend: str = "auto") -> dict:
    """The attention masks of a packed batch, one per distinct window over the layers (Gemma 2/3, OLMo 3:
    sliding and global layers), and under "documents" where each document and response starts (the
    recurrent layers of Qwen3.5 read that instead of a mask)."""
    config = getattr(model, "config", None)
    windows = config.attention_windows() if hasattr(config, "attention_windows") else [None]
    masks = {w: packed_mask(batch["doc_ids"], batch["segments"], batch["position_ids"], w, backend=backend,
                            spans=batch.get("doc_spans")) for w in windows}
    masks["documents"] = (batch["doc_ids"], batch["segments"])
    return masks


def packed_sequence_logps(model, batch: dict, *, backend: str = "auto") -> SequenceLogps:
    """Eq. (1) for every sequence of a packed batch (sdpo.data.packing.pack) -> [S] fields.

    One forward over the packed rows [n, T] with the shared-prompt mask (sdpo.models.attention), the
    hidden states gathered at the precomputed positions ([R, H]; the last prompt position
    twice, for the first chosen and the first rejected token), lm_head on those rows only.
    Sums per sequence are dense row sums over token_slot [S, L] (no index_add_: deterministic)."""
    missing = [k for k in PACKED_KEYS if k not in batch]
    if missing:
        raise KeyError(f"sdpo/logprobs.py: packed_sequence_logps: batch lacks {missing} (build it with sdpo.data.packing.pack)")
    if backend == "flex" or (backend == "auto" and flex_available(batch["input_ids"].device)):
        batch = _pad_to_bucket(batch)
    hidden = model.hidden_states(batch["input_ids"], None, batch["position_ids"],
                                 attn_mask=_packed_masks(model, batch, backend))  # [n, T, H]
    # [R, H]. Its backward adds into [n*T, H] at gather_index; a position occurs at most twice (the
    # last prompt token), and 0 + a + b == 0 + b + a exactly, so the atomics' order cannot show.
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["gather_index"])
    token_logps = _token_logps(model, h, batch["targets"], checked=_check_token_range(model, batch.get("token_range")))
    slot = batch["token_slot"]  # [S, L], R = the appended 0
    logps = torch.cat([token_logps, token_logps.new_zeros(1)])[slot].sum(dim=1)  # [S]
    return SequenceLogps(logps=logps, counts=batch["counts"])


def pair_loss_fusable(model, batch: dict) -> bool:
    """Whether packed_pair_loss can take this micro-batch: a packed batch of pairs on the CPU, a float32
    lm_head without bias or soft-cap under the fused log-probs, gradients on and no autocast (see
    kernels/fused_loss.py for why CPU and float32). model.fused_loss = False turns it off."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    return (getattr(model, "fused_loss", True) and getattr(model, "fused_logprobs", True)
            and "doc_ids" in batch and "index" in batch and torch.is_grad_enabled()
            and isinstance(weight, Tensor) and weight.device.type == "cpu" and weight.dtype == torch.float32
            and getattr(head, "bias", None) is None and getattr(head, "softcap", None) is None
            and not torch.is_autocast_enabled("cpu") and hasattr(model, "hidden_states"))


def packed_pair_loss(model, batch: dict, pair_losses, grad_scale: float = 1.0
                     ) -> tuple[Tensor, SequenceLogps, SequenceLogps]:
    """Σ_i pair_losses(i, chosen_i, rejected_i) over a packed pair batch, with the lm_head's gradient
    taken pair by pair while its logits are at hand (kernels.fused_loss: three GEMMs per scored token,
    not four) -> (loss, chosen, rejected); loss carries the gradient, the SequenceLogps [B] are detached.

    pair_losses(i, chosen, rejected) -> losses [1] for pair i (chosen/rejected: SequenceLogps [1] with
    gradient); it must read no other pair (sdpo.loss.BATCH_COUPLED types cannot come here). grad_scale:
    the factor the loss is multiplied by before backward (the loop's W / count): the pair gradients are
    taken with it, as autograd would, so they are the unfused path's numbers. The sequence sums are the
    same dense row sums as packed_sequence_logps'."""
    B = batch["index"].shape[0]
    slot, counts = batch["token_slot"], batch["counts"]
    if slot.shape[0] != 2 * B:
        raise ValueError(f"sdpo/logprobs.py: packed_pair_loss: {slot.shape[0]} sequences for {B} pairs")
    R, L = batch["targets"].shape[0], slot.shape[1]
    seq = batch.get("seq_spans")   # (first row in [R], count) per sequence
    if seq is None:   # a batch built without pack's host facts: read them off the tensors
        seq = list(zip(slot[:, 0].tolist(), counts.tolist()))
    n = [c for _, c in seq]
    spans = [(seq[i], seq[B + i]) for i in range(B)]   # a pair's chosen and rejected rows
    # pairs in row order; their rows one after the other (with a shared prompt they already are: perm = identity)
    order = sorted(range(B), key=lambda i: min((f for f, c in spans[i] if c), default=R))
    perm = torch.cat([torch.arange(f, f + c) for i in order for f, c in spans[i]] or [torch.zeros(0, dtype=torch.long)])
    bounds = [0]
    for i in order:
        bounds.append(bounds[-1] + n[i] + n[B + i])
    identity = bool(torch.equal(perm, torch.arange(R)))
    # Per pair, the [2, L] slot of its two sequences into [its rows, 0]: packed_sequence_logps' sums.
    t = torch.arange(L)
    local = {i: torch.stack([torch.where(t < n[i], t, n[i] + n[B + i]),
                             torch.where(t < n[B + i], n[i] + t, n[i] + n[B + i])]) for i in order}

    def group_loss(k, lp):
        i = order[k]
        sums = torch.cat([lp, lp.new_zeros(1)])[local[i]].sum(dim=1)  # [2]
        return pair_losses(i, SequenceLogps(sums[:1], counts[i:i + 1]),
                           SequenceLogps(sums[1:], counts[B + i:B + i + 1])).sum()

    hidden = model.hidden_states(batch["input_ids"], None, batch["position_ids"], attn_mask=_packed_masks(model, batch))
    gather = batch["gather_index"] if identity else batch["gather_index"].index_select(0, perm)
    targets = batch["targets"] if identity else batch["targets"].index_select(0, perm)
    weight = model.lm_head.weight
    if not _check_token_range(model, batch.get("token_range")) and targets.numel():
        lo, hi = int(targets.min()), int(targets.max())   # CPU tensors: no device sync
        _check_token_range(model, (lo, hi))
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, gather)  # [R, H], pair by pair
    rows = rows_per_chunk(R, weight.shape[0], None, "cpu")
    loss, lp = FusedLinearGroupLoss.apply(h, weight, targets.contiguous(), bounds, group_loss, IGNORE_INDEX,
                                           rows, float(grad_scale))
    tok = lp if identity else lp.new_empty(R).index_copy_(0, perm, lp)
    logps = torch.cat([tok, tok.new_zeros(1)])[slot].sum(dim=1)  # [2B], detached
    return loss, SequenceLogps(logps[:B], counts[:B]), SequenceLogps(logps[B:], counts[B:])


def _pad_to_bucket(batch: dict) -> dict:
    """Packed rows [n, T] right-padded to T' = flex_row_length(T): FlexAttention compiles once per row
    length, so a few dozen buckets instead of every multiple of 128. On the device, no sync; the pads
    are doc 0 (each sees only itself, never scored) and gather_index, flat in n*T, moves to n*T'."""
    T = batch["input_ids"].shape[1]
    Tb = flex_row_length(T)
    if Tb == T:
        return batch
    out = dict(batch)
    for key in ("input_ids", "position_ids", "doc_ids", "segments"):
        out[key] = torch.nn.functional.pad(batch[key], (0, Tb - T))
    g = batch["gather_index"]
    out["gather_index"] = g + torch.div(g, T, rounding_mode="floor") * (Tb - T)
    return out


def packed_forward(model, batch: dict, *, backend: str = "auto") -> tuple[SequenceLogps, SequenceLogps]:
    """packed_sequence_logps of a pair batch -> (chosen, rejected), each with [B] fields
    (sequences 0..B-1 chosen, B..2B-1 rejected), as concatenated_forward returns them."""
    out = packed_sequence_logps(model, batch, backend=backend)
    b = batch["index"].shape[0] if "index" in batch else out.logps.shape[0] // 2
    if out.logps.shape[0] != 2 * b:
        raise ValueError(f"sdpo/logprobs.py: packed_forward: {out.logps.shape[0]} sequences for {b} pairs "
                         "(a chosen_only batch? use packed_sequence_logps)")
    chosen = SequenceLogps(out.logps[:b], out.counts[:b])
    rejected = SequenceLogps(out.logps[b:], out.counts[b:])
    return chosen, rejected


def pair_forward(model, batch: dict) -> tuple[SequenceLogps, SequenceLogps]:
    """(chosen, rejected) of a packed (sdpo.data.packing.pack) or padded (collate) pair batch."""
    return packed_forward(model, batch) if "doc_ids" in batch else concatenated_forward(model, batch)


def pack_options(*, packing: bool, share_prompt: bool, device) -> dict | None:
    """sdpo.data.packing.pack() keyword arguments for the data.packing / data.share_prompt switches on `device`, or
    None: both off, the padded [2B, T] collate path. CUDA rows are padded to FlexAttention's block
    (one compile per length bucket); on CPU every document goes into one unpadded row (attention per
    document, sdpo.models.attention.DocumentMask); elsewhere rows of the longest document (a dense mask)."""
    if not (packing or share_prompt):
        return None
    flex = flex_available(device)
    rows = ("one" if flex or torch.device(device).type == "cpu" else "longest") if packing else "each"
    return {"share_prompt": share_prompt, "rows": rows, "pad_to_multiple_of": FLEX_BLOCK if flex else None}
