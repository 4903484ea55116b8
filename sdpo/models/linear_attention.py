"""Linear attention: the Gated DeltaNet layer of Qwen3.5's hybrid decoders, and where its state flows.

The gated delta rule (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks", eq. 10) keeps, per
value head, a state S [d_k, d_v] that each token decays, corrects toward its value and reads:

    S'_t = exp(g_t) · S_{t-1}                   g_t <= 0: the decay (from A_log and dt_bias)
    u_t  = β_t · (v_t - S'_tᵀ k_t)              β_t in (0, 1): how far the memory moves to v_t
    S_t  = S'_t + k_t u_tᵀ                      (the delta rule: write only what S' got wrong)
    o_t  = S_tᵀ q_t                             q, k L2-normalised, q × d_k^-½

`recurrent_gated_delta_rule` runs that token by token (the test oracle and the decode step).
`chunk_gated_delta_rule` computes the same in chunks of C tokens (the WY/UT form of Yang et al.
2024, "Parallelizing Linear Transformers with the Delta Rule", sec. 3): with γ_i = Σ_{j<=i} g_j the
log-decay inside a chunk and S_0 its incoming state, unrolling the recurrence gives

    u_i = β_i v_i - β_i e^{γ_i} k_iᵀ S_0 - Σ_{j<i} β_i e^{γ_i - γ_j} (k_i·k_j) u_j
      =>  (I + A) U = diag(β) V - diag(β e^γ) K S_0,   A_ij = β_i e^{γ_i-γ_j} k_i·k_j  (j < i)   (1)
    o_i = e^{γ_i} q_iᵀ S_0 + Σ_{j<=i} e^{γ_i-γ_j} (q_i·k_j) u_j                                   (2)
    S_C = e^{γ_C} S_0 + Σ_j e^{γ_C-γ_j} k_j u_jᵀ                                                   (3)

so a chunk costs two triangular solves and a few [C, C] / [C, d] matmuls, and only the chunk loop
is sequential. The state is float32 (float64 when the inputs are). Tokens with β = 0 and g = 0
leave the state alone, which is how padding inside a chunk is made harmless.

Where the state flows (`SequenceLayout`): an attention layer separates documents with a mask; a
recurrent layer must instead start each document from a zero state and a zero convolution window,
and, with a shared prompt (sdpo.data.packing.pack: prompt | chosen | rejected), start the chosen
and the rejected response both from the prompt's final state. The layout cuts every row into
pieces (maximal runs of one document and segment), gathers the pieces into right-padded rows and
runs them in two stages: roots (prompts, and sequences with no prompt) from zero state, then
responses from their prompt's final conv window and recurrent state. The prompt is computed once,
and every token sees exactly what it would in its own unpadded `prompt | response` row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdpo.models.layers import RMSNorm, _normalize

PROMPT = 0  # sdpo.models.attention's segment id of a prompt; the responses are 1 (chosen) and 2 (rejected)


# ---------------------------------------------------------------------------------------------
# the delta rule


def _state_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                               initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence above, one token at a time.

    q, k [B, T, H, d_k] (normalised and scaled by the caller), v [B, T, H, d_v], g, beta [B, T, H];
    initial_state [B, H, d_k, d_v] or None (zeros) -> (o [B, T, H, d_v], final state), both in
    float32 (float64 for float64 inputs)."""
    with torch.autocast(q.device.type, enabled=False):
        return _recurrent(q, k, v, g, beta, initial_state)


def _recurrent(q, k, v, g, beta, initial_state):
    dt = _state_dtype(q)
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, dk, dv) if initial_state is None else initial_state.to(dt)
    out = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))  # [B, H, d_v]
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(out, dim=1) if out else q.new_zeros(B, 0, H, dv)
    return o, S


def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                           initial_state: Tensor | None = None, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """The same as recurrent_gated_delta_rule (same arguments and results), by chunks: eqs. (1)-(3).
    Autocast is off inside: every product here is float32 (or float64), as the state is."""
    with torch.autocast(q.device.type, enabled=False):
        return _chunked(q, k, v, g, beta, initial_state, chunk_size)


def _chunked(q, k, v, g, beta, initial_state, chunk_size):
    dt = _state_dtype(q)
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    if T == 0:
        return _recurrent(q, k, v, g, beta, initial_state)
    C = min(chunk_size, T)
    pad = (-T) % C
    N = (T + pad) // C

    def chunks(x: Tensor) -> Tensor:  # [B, T, H, ...] -> [B, H, N, C, ...], zero-padded (β = g = 0 there)
        x = x.to(dt).transpose(1, 2)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(B, H, N, C, *x.shape[3:])

    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))  # [B, H, N, C, d] / [B, H, N, C]
    gam = g.cumsum(-1)  # γ_i, [B, H, N, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # e^{γ_i - γ_j} for j <= i, 0 above the diagonal (masked before exp: no overflow, no NaN gradient)
    decay = torch.where(causal, gam[..., :, None] - gam[..., None, :], -torch.inf).exp()  # [B, H, N, C, C]
    kb = k * beta[..., None]
    A = ((kb @ k.transpose(-1, -2)) * decay).tril(-1)  # (1), strictly lower
    eye = torch.eye(C, dtype=dt, device=q.device)
    U0 = torch.linalg.solve_triangular(eye + A, v * beta[..., None], upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(eye + A, kb * gam.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay  # (2), the chunk's own part, j <= i
    q_in = q * gam.exp()[..., None]  # reads the incoming state
    k_out = k * (gam[..., -1:] - gam).exp()[..., None]  # writes the outgoing state (3)
    S = q.new_zeros(B, H, dk, dv) if initial_state is None else initial_state.to(dt)
    out = []
    for n in range(N):
        U = U0[:, :, n] - W[:, :, n] @ S  # (1): [B, H, C, d_v]
        out.append(q_in[:, :, n] @ S + attn[:, :, n] @ U)  # (2)
        S = S * gam[:, :, n, -1, None, None].exp() + k_out[:, :, n].transpose(-1, -2) @ U  # (3)
    o = torch.stack(out, dim=2).reshape(B, H, N * C, dv)[:, :, :T]
    return o.transpose(1, 2), S


# ---------------------------------------------------------------------------------------------
# the short convolution and the gated norm


def short_conv(x: Tensor, weight: Tensor, state: Tensor | None = None,
               lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Causal depthwise convolution of width K, then SiLU (Qwen3.5 convolves q, k and v together).

    x [n, L, C]; weight [C, 1, K]; state [n, K-1, C]: the inputs before x (None: zeros, a sequence
    start) -> (y [n, L, C] in x's dtype, the state after `lengths` [n] tokens of each row (default L):
    its last K-1 inputs, what the next token's window needs)."""
    n, L, C = x.shape
    K = weight.shape[-1]
    if state is None:
        state = x.new_zeros(n, K - 1, C)
    xe = torch.cat([state.to(x.dtype), x], dim=1)  # [n, K-1+L, C]
    y = F.conv1d(xe.transpose(1, 2).to(weight.dtype), weight, groups=C)  # [n, C, L], no padding needed
    y = F.silu(y).to(x.dtype).transpose(1, 2)
    if lengths is None:
        return y, xe[:, L:]
    idx = lengths[:, None] + torch.arange(K - 1, device=x.device)  # [n, K-1]
    return y, xe.gather(1, idx[..., None].expand(-1, -1, C))


class GatedRMSNorm(RMSNorm):
    """Norm, then gate: w · x / rms(x) · silu(z), per value head (the output norm of Gated DeltaNet)."""

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        return (self.weight * _normalize(x, self.eps).to(x.dtype) * F.silu(gate.float())).to(x.dtype)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------------
# where the state flows: pieces of rows


@dataclass
class Stage:
    index: Tensor  # [n, L] flat positions in the [B*T] tokens of each piece, B*T (a zero row) past its end
    lengths: Tensor  # [n] tokens per piece
    parent: Tensor | None  # [n] the stage-0 piece whose final state each piece continues; None: zero state
    src: Tensor  # [m] positions in the stage's [n*L] that hold real tokens
    dst: Tensor  # [m] their positions in [B*T]


@dataclass
class SequenceLayout:
    """Every row cut into pieces that the recurrent layers run from their own initial state."""
    stages: list[Stage]
    rows: list[int]  # the row of each stage-0 piece (the cache keeps one state per row)

    @classmethod
    def build(cls, doc: Tensor, seg: Tensor | None = None) -> "SequenceLayout | None":
        """doc [B, T] (0 = pad, a document id elsewhere; attention_mask's segment ids qualify), seg [B, T]
        (PROMPT | CHOSEN | REJECTED, None: every piece its own sequence). A response piece continues
        the PROMPT piece of its document in the same row; other pieces start from zero. None when
        every row is one piece from its first token to its last (nothing to cut). One host copy."""
        d = doc.detach().long().cpu()
        s = torch.zeros_like(d) if seg is None else seg.detach().long().cpu()
        B, T = d.shape
        key = (d * 4 + s).reshape(-1)
        new = torch.ones(B * T, dtype=torch.bool)
        new[1:] = key[1:] != key[:-1]
        new[::T] = True
        starts = new.nonzero().squeeze(1)
        ends = torch.cat([starts[1:], torch.tensor([B * T])])
        if len(starts) == B and bool((d.reshape(-1)[starts] > 0).all()):
            return None
        pieces = [(int(a), int(b), int(d.reshape(-1)[a]), int(s.reshape(-1)[a]))
                  for a, b in zip(starts.tolist(), ends.tolist()) if int(d.reshape(-1)[a]) > 0]
        roots, branches, prompt_of = [], [], {}
        for a, b, doc_id, seg_id in pieces:
            row = a // T
            parent = prompt_of.get((row, doc_id)) if seg is not None and seg_id != PROMPT else None
            if parent is None:
                if seg is not None and seg_id == PROMPT:
                    prompt_of[(row, doc_id)] = len(roots)
                roots.append((a, b, row))
            else:
                branches.append((a, b, parent))
        stages = [_stage([(a, b) for a, b, _ in roots], None, B * T, doc.device)]
        if branches:
            stages.append(_stage([(a, b) for a, b, _ in branches], [p for _, _, p in branches], B * T, doc.device))
        return cls(stages, [r for _, _, r in roots])

    def run(self, mix, x: Tensor, g: Tensor, beta: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """mix(x, g, beta, conv_state, state, lengths) -> (o, conv_state, state) run over the pieces.

        x [B, T, C], g, beta [B, T, H] -> (o [B, T, *o's trailing shape], 0 at pads; per-row final
        (conv_state, state) when every row is at most one piece, for the cache, else None)."""
        B, T = x.shape[:2]

        def flat(t):  # [B, T, ...] -> [B*T + 1, ...], the last entry zero: padding reads β = g = 0 there
            t = t.reshape(B * T, *t.shape[2:])
            return torch.cat([t, t.new_zeros(1, *t.shape[1:])])

        x, g, beta = flat(x), flat(g), flat(beta)
        finals, dsts, outs = None, [], []
        for stage in self.stages:
            conv0 = state0 = None
            if stage.parent is not None:
                conv0, state0 = finals[0].index_select(0, stage.parent), finals[1].index_select(0, stage.parent)
            o, conv1, state1 = mix(x[stage.index], g[stage.index], beta[stage.index], conv0, state0, stage.lengths)
            if finals is None:
                finals = (conv1, state1)
            outs.append(o.reshape(-1, *o.shape[2:]).index_select(0, stage.src))
            dsts.append(stage.dst)
        o = torch.cat(outs)
        out = o.new_zeros(B * T, *o.shape[1:]).index_copy(0, torch.cat(dsts), o).view(B, T, *o.shape[1:])
        per_row = None
        if len(self.stages) == 1 and len(set(self.rows)) == len(self.rows):
            rows = torch.tensor(self.rows, device=out.device)
            conv, state = finals
            per_row = (conv.new_zeros(B, *conv.shape[1:]).index_copy(0, rows, conv),
                       state.new_zeros(B, *state.shape[1:]).index_copy(0, rows, state))
        return out, per_row


def _stage(spans: list[tuple[int, int]], parents: list[int] | None, pad_index: int, device) -> Stage:
    lengths = torch.tensor([b - a for a, b in spans])
    L = int(lengths.max())
    t = torch.arange(L)
    starts = torch.tensor([a for a, _ in spans])
    real = t[None, :] < lengths[:, None]  # [n, L]
    index = torch.where(real, starts[:, None] + t[None, :], pad_index)
    src = real.reshape(-1).nonzero().squeeze(1)
    to = dict(device=device, non_blocking=True)
    return Stage(index.to(**to), lengths.to(**to), None if parents is None else torch.tensor(parents).to(**to),
                 src.to(**to), index.reshape(-1)[src].to(**to))


# ---------------------------------------------------------------------------------------------
# the layer


class GatedDeltaNet(nn.Module):
    """Qwen3.5's linear-attention mixer (HF's Qwen3_5GatedDeltaNet; parameter names as there):
    in_proj_qkv -> short conv + SiLU -> q, k, v heads; in_proj_b -> β = sigmoid; in_proj_a with A_log
    and dt_bias -> the decay g = -exp(A_log) · softplus(a + dt_bias); the gated delta rule;
    GatedRMSNorm with in_proj_z as the gate; out_proj. Each key head serves n_v / n_k value heads."""

    chunk_size = 64

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        H = config.hidden_size
        self.layer_idx = layer_idx
        self.n_k, self.n_v = config.linear_num_key_heads, config.linear_num_value_heads
        self.d_k, self.d_v = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim, self.value_dim = self.n_k * self.d_k, self.n_v * self.d_v
        conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkv = nn.Linear(H, conv_dim, bias=False)
        self.in_proj_z = nn.Linear(H, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(H, self.n_v, bias=False)
        self.in_proj_a = nn.Linear(H, self.n_v, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, config.linear_conv_kernel_dim, groups=conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.n_v))
        self.A_log = nn.Parameter(torch.zeros(self.n_v))
        self.norm = GatedRMSNorm(self.d_v, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, H, bias=False)

    def mix(self, x: Tensor, g: Tensor, beta: Tensor, conv_state: Tensor | None, state: Tensor | None,
            lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x [n, L, conv_dim] projected q|k|v, g, beta [n, L, n_v] -> (o [n, L, n_v, d_v] in x's dtype,
        the conv window after `lengths` tokens, the final recurrent state)."""
        n, L, _ = x.shape
        y, conv_state = short_conv(x, self.conv1d.weight, conv_state, lengths)
        q, k, v = y.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        rep = self.n_v // self.n_k
        q = q.reshape(n, L, self.n_k, self.d_k).repeat_interleave(rep, dim=2)  # (n, L, n_v, d_k)
        k = k.reshape(n, L, self.n_k, self.d_k).repeat_interleave(rep, dim=2)
        v = v.reshape(n, L, self.n_v, self.d_v)
        dt = _state_dtype(x)
        q = l2_normalize(q.to(dt)) * self.d_k ** -0.5
        k = l2_normalize(k.to(dt))
        o, state = chunk_gated_delta_rule(q, k, v, g, beta, state, self.chunk_size)
        return o.to(x.dtype), conv_state, state

    def forward(self, x: Tensor, rope, layout: SequenceLayout | None, cache=None) -> Tensor:
        """x [B, T, H] -> [B, T, H]. layout: the pieces (None: each row one sequence, continuing the
        cache's state when there is one); rope is unused (the layer has no positions)."""
        B, T, _ = x.shape
        qkv = self.in_proj_qkv(x)  # (B, T, conv_dim)
        z = self.in_proj_z(x).view(B, T, self.n_v, self.d_v)
        beta = self.in_proj_b(x).sigmoid()  # (B, T, n_v)
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)  # float32, <= 0
        if layout is None:
            conv0, state0 = cache.linear_state(self.layer_idx) if cache is not None else (None, None)
            o, conv1, state1 = self.mix(qkv, g, beta, conv0, state0)
            finals = (conv1, state1)
        else:
            o, finals = layout.run(self.mix, qkv, g, beta)
        if cache is not None:
            if finals is None:
                raise ValueError("a recurrent cache keeps one sequence per row; got rows of several segments")
            cache.set_linear_state(self.layer_idx, *finals)
        y = self.norm(o, z).reshape(B, T, self.value_dim)
        return self.out_proj(y)
