"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), written out.

A targeted projection y = W x + b keeps W frozen and learns a rank-r update (eq. 3):

    y = W x + b + (α / r) · B A dropout(x),   A [r, in], B [out, r]

A starts random (kaiming-uniform, as peft and nn.Linear), B at zero, so the first forward
is the base model's exactly. Only A and B (float32) get gradients and optimizer state; every
other parameter is frozen, and the targeted base weights may be held in bf16 on a GPU (half
the memory; autocast computes in bf16 anyway).

Parameter names: a LoRALinear is an nn.Linear with the same `weight` / `bias`, plus
`lora_A.weight` and `lora_B.weight`, so "layers.0.self_attn.q_proj.weight" keeps its name in
checkpoints, and the adapters are "layers.0.self_attn.q_proj.lora_A.weight" — peft's names
once its "base_model.model." prefix and HF's "model." are put in front (`peft_state_dict`).

For sDPO M_t is the merged model W + (α/r)·BA (`merge_state_dict`), an ordinary HF directory
that the next step's reference loads; the adapter itself is also written in peft's layout
(`save_peft_adapter`: adapter_config.json + adapter_model.safetensors).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from sdpo.models.checkpoint import to_hf_name

# sdpo.models.model's projection names (HF's): attention, then the gated MLP; Phi-3 fuses q/k/v into
# qkv_proj and gate/up into gate_up_proj (peft targets those names for it); Qwen3.5's Gated DeltaNet
# layers have in_proj_qkv, in_proj_z, in_proj_b, in_proj_a and out_proj; Qwen3.5-MoE's shared expert its
# gate/up/down and shared_expert_gate ([1, H]). The default, all of them, means every projection the family
# has (peft's "all-linear"; MoE routers and stacked experts are not nn.Linear projections there either).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                "down_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "shared_expert_gate")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the HF model)
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


class LoRALinear(nn.Linear):
    """nn.Linear with a frozen weight and a trainable low-rank update; see the module docstring."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # not nn.Linear.__init__: reuse base's tensors, allocate nothing new
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dev = base.weight.device  # may be "meta" (sdpo.runtime.distributed.load_sharded); initial_adapters fills them
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)  # a bf16 frozen base under float32 activations (autocast does this itself)
        y = F.linear(x, w, self.bias)
        # The low-rank path in the adapters' dtype (float32 unless autocast says otherwise), as peft.
        h = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(h)) * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def apply_lora(model: nn.Module, cfg, *, base_dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """Freeze `model` and put LoRALinear adapters on the projections named in cfg.targets.

    cfg: anything with rank, alpha, dropout, targets (sdpo.runtime.config.LoRASection). base_dtype casts
    the targeted frozen weights (e.g. bfloat16 on a GPU); None keeps them. In place; returns model.
    On a meta-device model (before FSDP2 sharding) the adapters stay empty: fill them from
    initial_adapters(model, seed) once allocated."""
    unknown = sorted(set(cfg.targets) - set(LORA_TARGETS))
    if unknown or not cfg.targets:
        raise ValueError(f"lora.targets: {unknown or 'empty'}; expected names from {list(LORA_TARGETS)}")
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("apply_lora: the model already has LoRA adapters")
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear}
    absent = [t for t in cfg.targets if t not in present]
    if absent and set(cfg.targets) != set(LORA_TARGETS):
        family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"lora.targets: {family} has no {absent} projections; its projections are "
                         f"{[t for t in LORA_TARGETS if t in present]}")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(cfg.targets) & present
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                if base_dtype is not None:
                    child.weight.data = child.weight.data.to(base_dtype)
                setattr(parent, child_name, LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout))
    model.lora_config = {"rank": cfg.rank, "alpha": float(cfg.alpha), "dropout": float(cfg.dropout),
                         "targets": [t for t in LORA_TARGETS if t in targets]}
    init = initial_adapters(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in init and not p.is_meta:
                p.copy_(init[name])
    return model


def initial_adapters(model: nn.Module, seed: int = 0) -> dict[str, Tensor]:
    """The adapters' starting values, full float32 CPU tensors by parameter name: peft's
    init_lora_weights=True, A ~ kaiming_uniform(a=√5) (nn.Linear's default), B = 0. Drawn on the
    CPU in module order (layer 0 q, k, v, o, gate, up, down, layer 1, ...), so they depend on the
    seed only: the same on every device and rank (load_sharded copies each rank's rows)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in lora_modules(model).items():
        a = torch.empty(m.rank, m.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        out[name + A_SUFFIX], out[name + B_SUFFIX] = a, torch.zeros(m.out_features, m.rank)
    return out


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(state: dict[str, Tensor]) -> list[str]:
    """Module names ("layers.0.self_attn.q_proj") that have adapters in a state dict."""
    return [k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX)]


def merge_state_dict(state: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """A LoRA model's state dict (our names) -> the plain model's: W + scaling · B A in float32.

    Works on the gathered full state dict (sdpo.runtime.distributed.full_state_dict), so the live model
    is untouched. Non-targeted tensors pass through as they are."""
    out = {k: v for k, v in state.items() if not (k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX))}
    for name in adapter_names(state):
        A, B = state[name + A_SUFFIX].float(), state[name + B_SUFFIX].float()  # [r, in], [out, r]
        out[name + ".weight"] = state[name + ".weight"].float() + scaling * (B @ A)  # [out, in]
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """In place: every LoRALinear becomes a plain float32 nn.Linear holding W + (α/r)·BA;
    trainability is not restored (the merged model is for export / inference). Returns model."""
    for name, m in lora_modules(model).items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                          device=m.weight.device, dtype=torch.float32)
        plain.weight.copy_(m.weight.float() + m.scaling * (m.lora_B.weight @ m.lora_A.weight))
        if m.bias is not None:
            plain.bias = m.bias
        plain.requires_grad_(False)
        setattr(parent, child_name, plain)
    model.lora_config = None
    return model


def peft_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapters of a state dict (our names) under the names peft saves
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"), float32 CPU."""
    return {PEFT_PREFIX + to_hf_name(k): v.detach().to("cpu", torch.float32).contiguous()
            for k, v in state.items() if k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's adapters in peft naming (see peft_state_dict)."""
    return peft_state_dict(model.state_dict())


def adapter_config(lora_config: dict, base_model_path: str | None) -> dict:
    """adapter_config.json as peft's LoraConfig writes it. The fields peft has had since 0.10 (a
    newer peft fills the ones it added with their defaults; an older one would reject them)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": None if base_model_path is None else str(base_model_path),
        "revision": None, "inference_mode": True,
        "r": lora_config["rank"], "lora_alpha": lora_config["alpha"], "lora_dropout": lora_config["dropout"],
        "target_modules": list(lora_config["targets"]),
        "fan_in_fan_out": False,  # our weights are [out, in], as nn.Linear's (GPT-2's Conv1D would be True)
        "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "megatron_config": None, "megatron_core": "megatron.core",
        "loftq_config": {}, "layer_replication": None,
    }


def save_peft_adapter(model: nn.Module, path, base_model_path=None, *, state: dict[str, Tensor] | None = None) -> None:
    """Write `path`/adapter_config.json and adapter_model.safetensors (peft's layout), atomically
    per file. state: a full state dict to take the adapters from (default model.state_dict())."""
    if getattr(model, "lora_config", None) is None:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters (apply_lora first)")
    tensors = peft_state_dict(model.state_dict() if state is None else state)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{ADAPTER_WEIGHTS}.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})  # peft writes format=pt too
    os.replace(tmp, path / ADAPTER_WEIGHTS)
    tmp = path / f".{ADAPTER_CONFIG}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(adapter_config(model.lora_config, base_model_path), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / ADAPTER_CONFIG)
