"""config.json <-> ModelConfig: the HF spellings (transformers 4.x and 5.x), checked before any tensor.

Every value a model is built from is checked here first (positive sizes, heads dividing the
hidden size, known RoPE scalings), so a bad config.json names its file and key instead of
failing inside torch.empty.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sdpo.models.layers import ACTIVATIONS
from sdpo.models.model import FAMILIES, ModelConfig
from sdpo.models.rope import ROPE_TYPES

CONFIG_NAME = "config.json"
ARCHITECTURES = {model_type: family.architecture for model_type, family in FAMILIES.items()}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    pass


def parse_dtype(value, where: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise CheckpointError(f"{where}: dtype {value} is not supported; expected one of {list(DTYPES)}")
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise CheckpointError(f"{where}: dtype {value!r} is not supported; expected one of {list(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Families whose sliding layers come from layer_types (or the family's default pattern) and whose
# sliding_window is read as given; Mistral's absent key means 4096 (handled below); Qwen3 and SmolLM3
# use the window only with use_sliding_window.
WINDOWED = ("mistral", "qwen3", "gemma2", "gemma3_text", "olmo3", "phi3", "smollm3", "ministral3", "mixtral", "qwen3_moe")
# config.json keys transformers' config classes default when absent (only where they differ from Llama's).
DEFAULTS = {
    "qwen3": dict(head_dim=128),
    "gemma2": dict(head_dim=256, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(head_dim=256, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                        hidden_activation="gelu_pytorch_tanh", rope_theta=1_000_000.0, rope_local_base_freq=10_000.0),
    "olmo2": dict(rms_norm_eps=1e-5),
    "olmo3": dict(rms_norm_eps=1e-5, sliding_window=4096, rope_theta=500_000.0),
    "phi3": dict(rms_norm_eps=1e-5, original_max_position_embeddings=4096),
    "smollm3": dict(tie_word_embeddings=True, rope_theta=2_000_000.0),
    "ministral3": dict(head_dim=128, rms_norm_eps=1e-5),
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1_000_000.0, max_position_embeddings=131072),
    "qwen3_moe": dict(max_position_embeddings=32768, sliding_window=4096),
    "qwen3_5_text": dict(head_dim=256, partial_rotary_factor=0.25, linear_conv_kernel_dim=4, linear_key_head_dim=128,
                         linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32),
}
DEFAULTS["qwen3_5_moe_text"] = dict(DEFAULTS["qwen3_5_text"], max_position_embeddings=32768)
HYBRID = ("qwen3_5_text", "qwen3_5_moe_text")  # Gated DeltaNet + gated attention (Qwen3.5)
# Vision-language configs whose text_config is the language model: model_type -> its text model_type
VISION_LANGUAGE = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
LINEAR_FIELDS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                 "linear_conv_kernel_dim")
# Layer patterns transformers' configs build when config.json has no layer_types.
DEFAULT_PATTERN = {
    "gemma2": lambda raw, i: (i + 1) % 2 != 0,
    "gemma3_text": lambda raw, i: (i + 1) % raw.get("sliding_window_pattern", 6) != 0,
    "olmo3": lambda raw, i: (i + 1) % 4 != 0,
    "qwen3": lambda raw, i: bool(raw.get("use_sliding_window")) and i >= raw.get("max_window_layers", 28),
    "smollm3": lambda raw, i: bool(raw.get("use_sliding_window")) and not _no_rope_layers(raw)[i],
}
NESTED_ROPE = ("gemma3_text", "olmo3")  # per-layer-type RoPE (transformers 5 nests rope_parameters by type)


def supported() -> str:
    return ", ".join(ARCHITECTURES)


def check_family(config: ModelConfig, where: str) -> None:
    """Combinations transformers' classes can't express would silently change the numbers there."""
    if config.model_type not in ARCHITECTURES:
        raise CheckpointError(f"{where}: unknown model_type {config.model_type!r}; supported: {supported()}")
    if config.sliding_window is not None and config.model_type not in WINDOWED:
        raise CheckpointError(f"{where}: sliding_window is only supported for model_type "
                              f"{', '.join(repr(m) for m in WINDOWED)}; {config.model_type} has none")
    if config.model_type == "mistral" and config.attention_bias:
        raise CheckpointError(f"{where}: mistral has no attention biases (attention_bias must be false)")
    if config.model_type == "qwen2" and not config.attention_bias:
        raise CheckpointError(f"{where}: qwen2 always has q/k/v biases (attention_bias must be true)")


def _no_rope_layers(raw: dict) -> list[int]:
    if raw.get("no_rope_layers") is not None:
        return list(raw["no_rope_layers"])
    every = raw.get("no_rope_layer_interval", 4)  # SmolLM3: every 4th layer has no RoPE
    return [int((i + 1) % every != 0) for i in range(raw["num_hidden_layers"])]


def _read_rope(raw: dict, model_type: str, where: str) -> tuple[float, dict | None, float | None, dict | None, float]:
    """-> (theta, scaling) of full-attention layers, (theta, scaling) of sliding layers where they have
    their own, and partial_rotary_factor, from either spelling:
    transformers 4.x: rope_theta, rope_scaling (and Gemma 3's rope_local_base_freq) at the top level;
    transformers 5.x: rope_parameters = {"rope_type", "rope_theta", ...}, or one such dict per layer
    type ({"full_attention": ..., "sliding_attention": ...}: Gemma 3, OLMo 3)."""
    d = {**DEFAULTS.get(model_type, {}), **{k: v for k, v in raw.items() if v is not None}}
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{where}: rope_scaling should be an object, got {rope!r}")
    nested = "full_attention" in rope or "sliding_attention" in rope
    full = dict(rope.get("full_attention") or {}) if nested else dict(rope)
    if model_type == "ministral3" and not rope:  # Ministral3Config's default: YaRN
        full = dict(rope_type="yarn", rope_theta=1e6, factor=16.0, original_max_position_embeddings=16384,
                    beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)
    theta = full.pop("rope_theta", d.get("rope_theta", 10000.0))
    partial = full.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    sliding_theta = sliding = None
    if model_type in NESTED_ROPE:
        local = dict(rope.get("sliding_attention") or {}) if nested else {}
        # Gemma 3 spells the local base rope_local_base_freq; OLMo 3's legacy spelling gives its sliding
        # layers the class default 500000 whatever rope_theta says (transformers 5.24 reads it so).
        sliding_theta = local.pop("rope_theta", d.get("rope_local_base_freq", DEFAULTS[model_type]["rope_theta"]))
        local.pop("partial_rotary_factor", None)
        sliding = _scaling(local, raw, model_type)
    return theta, _scaling(full, raw, model_type), sliding_theta, sliding, partial


def _scaling(rope: dict, raw: dict, model_type: str) -> dict | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if model_type == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"  # Phi-3's early configs; transformers reads both as longrope
    if kind == "default":
        return None
    out = {k: v for k, v in rope.items() if k not in ("type", "rope_type", "rope_theta", "partial_rotary_factor")}
    out["rope_type"] = kind
    if kind in ("llama3", "yarn", "longrope"):
        # Phi-3 keeps the trained context at the top level (its config class defaults it to 4096), and
        # transformers prefers it there; elsewhere it defaults to max_position_embeddings.
        top = raw.get("original_max_position_embeddings", DEFAULTS.get(model_type, {}).get(
            "original_max_position_embeddings"))
        if top is not None:
            out["original_max_position_embeddings"] = top
        out.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings", 4096))
    return out


def language_config(raw: dict, where: str) -> dict:
    """A vision-language config (Qwen3.5's "qwen3_5" / "qwen3_5_moe": text_config + vision_config) -> its
    language model's config; other configs as they are."""
    if raw.get("model_type") not in VISION_LANGUAGE:
        return raw
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{where}: model_type {raw['model_type']!r} needs a text_config object "
                              "(the language model)")
    text = {**text, "model_type": VISION_LANGUAGE[raw["model_type"]]}
    if "tie_word_embeddings" in raw:  # the outer config owns the lm_head tie
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]
    return text


def config_from_dict(raw: dict, where: str = CONFIG_NAME) -> ModelConfig:
    """Parse an HF config dict; `where` names the file in error messages."""
    raw = language_config(raw, where)
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"{where}: unknown model_type {model_type!r}; supported: {supported()}")
    defaults = DEFAULTS.get(model_type, {})
    if model_type == "qwen3_5_moe_text" and raw.get("intermediate_size") is None:
        # every layer is sparse, so there is no dense MLP size; ModelConfig's field takes the experts'
        experts = raw.get("moe_intermediate_size") or MOE[model_type]["moe_intermediate_size"][1]
        raw = {**raw, "intermediate_size": experts}

    def get(key, kind, default=...):
        if key not in raw or raw[key] is None:
            default = defaults.get(key, default)
            if default is ...:
                raise CheckpointError(f"{where}: required field {key!r} is missing")
            return default
        value = raw[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise CheckpointError(f"{where}: field {key!r} should be {kind.__name__}, got {value!r}")
        return float(value) if kind is float else value

    act = raw.get("hidden_activation") or raw.get("hidden_act") or defaults.get("hidden_activation", "silu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported; expected one of {list(ACTIVATIONS)}")
    if raw.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")
    if raw.get("use_bidirectional_attention"):
        raise CheckpointError(f"{where}: use_bidirectional_attention=true (an encoder) is not supported")
    if model_type == "gemma3_text" and raw.get("attn_logit_softcapping") is not None:
        raise CheckpointError(f"{where}: gemma3_text with attn_logit_softcapping is not supported "
                              "(transformers' Gemma 3 ignores it, so no reference exists)")
    if model_type == "qwen2" and raw.get("use_sliding_window"):
        # Qwen2 applies the window only to layers >= max_window_layers; no released model uses it.
        raise CheckpointError(f"{where}: qwen2 with use_sliding_window=true is not supported")

    theta, rope_scaling, sliding_theta, sliding_scaling, partial = _read_rope(raw, model_type, where)
    beta = (rope_scaling or {}).get("llama_4_scaling_beta")
    if model_type == "ministral3" and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0):
        raise CheckpointError(f"{where}: ministral3 needs rope_parameters.llama_4_scaling_beta (its query scale by "
                              f"position), a number >= 0; got {rope_scaling}")
    sliding_window = None
    if model_type == "mistral":
        # transformers' MistralConfig defaults to 4096 when the key is absent; an explicit null
        # (Mistral-7B v0.2 and later) means no window.
        sliding_window = get("sliding_window", int, None) if "sliding_window" in raw else 4096
    elif model_type in ("qwen3", "smollm3", "qwen3_moe"):
        sliding_window = get("sliding_window", int, None) if raw.get("use_sliding_window") else None
    elif model_type in WINDOWED:
        sliding_window = get("sliding_window", int, None) if "sliding_window" in raw else defaults.get("sliding_window")

    sizes = {k: get(k, int) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads")}
    sizes.update(num_key_value_heads=get("num_key_value_heads", int, None), head_dim=get("head_dim", int, None),
                 max_position_embeddings=get("max_position_embeddings", int, 4096))
    layer_types = raw.get("layer_types")
    if layer_types is None and model_type in DEFAULT_PATTERN and sizes["num_hidden_layers"] > 0:
        pattern = DEFAULT_PATTERN[model_type]
        layer_types = ["sliding_attention" if pattern(raw, i) else "full_attention"
                       for i in range(sizes["num_hidden_layers"])]
    linear = {}
    if model_type in HYBRID:
        if layer_types is None:  # transformers' default: every full_attention_interval-th layer is full
            every = get("full_attention_interval", int, 4)
            layer_types = ["linear_attention" if (i + 1) % every else "full_attention"
                           for i in range(sizes["num_hidden_layers"])]
        linear = {k: get(k, int) for k in LINEAR_FIELDS}
        bad = [f"{k} must be a positive integer, got {v}" for k, v in linear.items() if v <= 0]
        if not bad and linear["linear_num_value_heads"] % linear["linear_num_key_heads"]:
            bad.append("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if bad:
            raise CheckpointError(f"{where}: " + "; ".join(bad))
    rms_norm_eps = get("rms_norm_eps", float, 1e-6)
    check_values(sizes, rms_norm_eps, theta, rope_scaling, sliding_window, where, partial)
    if sliding_scaling is not None:
        check_values(sizes, rms_norm_eps, sliding_theta, sliding_scaling, sliding_window, where + " (sliding layers)",
                     partial)
    gemma = model_type in ("gemma2", "gemma3_text")
    moe = _read_moe(raw, model_type, sizes["num_hidden_layers"], where) if model_type in MOE else {}
    try:
        return ModelConfig(
            **sizes,
            rms_norm_eps=rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            # Qwen2's config has no attention_bias field: its q/k/v biases are always there; Phi-3 has none.
            attention_bias={"qwen2": True, "phi3": False, "mixtral": False}.get(model_type,
                                                                                get("attention_bias", bool, False)),
            sliding_window=sliding_window,
            model_type=model_type,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=dtype_name(parse_dtype(raw.get("torch_dtype") or raw.get("dtype") or "float32", where)),
            hidden_act=act,
            layer_types=layer_types,
            sliding_rope_theta=None if sliding_theta is None else float(sliding_theta),
            sliding_rope_scaling=sliding_scaling,
            no_rope_layers=_no_rope_layers(raw) if model_type == "smollm3" else None,
            partial_rotary_factor=float(partial),
            query_pre_attn_scalar=get("query_pre_attn_scalar", float, None) if gemma else None,
            attn_logit_softcapping=get("attn_logit_softcapping", float, None) if model_type == "gemma2" else None,
            final_logit_softcapping=get("final_logit_softcapping", float, None) if gemma else None,
            **moe,
            **linear,
        )
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: {e}") from e


# Mixture-of-experts config.json keys -> ModelConfig fields, with transformers' defaults (None: required).
MOE = {
    "mixtral": dict(num_local_experts=("num_experts", None), num_experts_per_tok=("num_experts_per_tok", 2),
                    router_aux_loss_coef=("router_aux_loss_coef", 0.001)),
    "qwen3_moe": dict(num_experts=("num_experts", 128), num_experts_per_tok=("num_experts_per_tok", 8),
                      moe_intermediate_size=("moe_intermediate_size", 768), norm_topk_prob=("norm_topk_prob", False),
                      decoder_sparse_step=("decoder_sparse_step", 1), mlp_only_layers=("mlp_only_layers", []),
                      router_aux_loss_coef=("router_aux_loss_coef", 0.001)),
    # every layer sparse, top-k always renormalised (not a config field); one shared expert per layer
    "qwen3_5_moe_text": dict(num_experts=("num_experts", 256), num_experts_per_tok=("num_experts_per_tok", 8),
                             moe_intermediate_size=("moe_intermediate_size", 512),
                             shared_expert_intermediate_size=("shared_expert_intermediate_size", 512),
                             router_aux_loss_coef=("router_aux_loss_coef", 0.001)),
}


def _read_moe(raw: dict, model_type: str, layers: int, where: str) -> dict:
    """The router and expert fields of a MoE config.json, checked (sdpo/models/moe.py)."""
    out = {}
    if model_type == "qwen3_moe" and raw.get("num_experts") is None:  # transformers 5 writes num_local_experts
        raw = {**raw, "num_experts": raw.get("num_local_experts")}
    for key, (field, default) in MOE[model_type].items():
        value = raw.get(key, default) if raw.get(key) is not None else default
        if value is None:
            raise CheckpointError(f"{where}: required field {key!r} is missing ({model_type})")
        out[field] = value
    problems = [f"{k} must be a positive integer, got {raw.get(k, out[f])!r}"
                for k, (f, _) in MOE[model_type].items()
                if f in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                         "shared_expert_intermediate_size")
                and (isinstance(out[f], bool) or not isinstance(out[f], int) or out[f] < 1)]
    if not problems and out["num_experts_per_tok"] > out["num_experts"]:
        problems.append(f"num_experts_per_tok ({out['num_experts_per_tok']}) must be <= the number of experts "
                        f"({out['num_experts']})")
    only = out.get("mlp_only_layers", [])
    if not (isinstance(only, list) and all(isinstance(i, int) and 0 <= i < layers for i in only)):
        problems.append(f"mlp_only_layers must list layer indices in 0..{layers - 1}, got {only!r}")
    coef = out["router_aux_loss_coef"]
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0:
        problems.append(f"router_aux_loss_coef must be a number >= 0, got {coef!r}")
    if not isinstance(out.get("norm_topk_prob", True), bool):
        problems.append(f"norm_topk_prob must be true or false, got {out['norm_topk_prob']!r}")
    if raw.get("router_jitter_noise"):  # transformers multiplies training inputs by U(1 - ε, 1 + ε); not here
        problems.append(f"router_jitter_noise={raw['router_jitter_noise']} is not supported (0 only)")
    if raw.get("shared_expert_intermediate_size") and "shared_expert_intermediate_size" not in out:
        problems.append("a shared expert (shared_expert_intermediate_size) is not supported")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
    out["router_aux_loss_coef"] = float(coef)
    return out


def _positive(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v < math.inf


def check_values(sizes: dict, rms_norm_eps: float, rope_theta, rope_scaling, sliding_window, where: str,
                 partial_rotary_factor: float = 1.0) -> None:
    """Before any tensor exists: a size of -5 would otherwise reach torch.empty ("negative dimension")."""
    problems = [f"{k} must be a positive integer, got {v}" for k, v in sizes.items() if v is not None and v <= 0]
    heads, kv = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    rotary = None
    if not problems:
        if sizes["head_dim"] is None and sizes["hidden_size"] % heads:
            problems.append(f"hidden_size ({sizes['hidden_size']}) must be divisible by num_attention_heads ({heads})")
        if kv is not None and heads % kv:
            problems.append(f"num_key_value_heads ({kv}) must divide num_attention_heads ({heads})")
        head_dim = sizes["head_dim"] or sizes["hidden_size"] // heads
        rotary = int(head_dim * partial_rotary_factor) if _positive(partial_rotary_factor) else None
        if head_dim % 2 or rotary is None or rotary % 2:
            problems.append(f"head_dim ({head_dim}) must be even (rotary), and so must its rotary part "
                            f"(partial_rotary_factor {partial_rotary_factor})")
    if not (math.isfinite(rms_norm_eps) and rms_norm_eps > 0):
        problems.append(f"rms_norm_eps must be a finite number > 0, got {rms_norm_eps}")
    if not _positive(rope_theta):
        problems.append(f"rope_theta must be a finite number > 0, got {rope_theta!r}")
    if rope_scaling is not None:
        problems += _rope_problems(rope_scaling, rotary)
    if sliding_window is not None and sliding_window < 1:
        problems.append(f"sliding_window must be >= 1 or null, got {sliding_window}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def _rope_problems(rope: dict, rotary: int | None) -> list[str]:
    kind = rope.get("rope_type", rope.get("type"))
    if kind not in ROPE_TYPES:
        return [f"rope_scaling type {kind!r} is not supported; expected one of {list(ROPE_TYPES)}"]
    need = {"linear": ["factor"], "dynamic": ["factor"], "yarn": ["factor", "original_max_position_embeddings"],
            "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
            "longrope": ["original_max_position_embeddings"]}[kind]
    problems = [f"rope_scaling.{k} must be a finite number > 0, got {rope.get(k)!r}" for k in need
                if not _positive(rope.get(k))]
    if kind == "longrope":
        for k in ("short_factor", "long_factor"):
            v = rope.get(k)
            if not (isinstance(v, list) and all(_positive(x) for x in v) and (rotary is None or len(v) == rotary // 2)):
                problems.append(f"rope_scaling.{k} must be a list of {rotary // 2 if rotary else 'rotary_dim / 2'} "
                                f"numbers > 0, got {v!r}")
    return problems


def model_config_to_dict(config: ModelConfig, torch_dtype: str | None = None) -> dict:
    """The config.json transformers needs: the legacy rope_theta / rope_scaling keys (read by 4.x and 5.x),
    plus 5.x's per-layer-type rope_parameters where a family nests them."""
    c = config
    out = {
        "architectures": [ARCHITECTURES[c.model_type]],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": torch_dtype or c.torch_dtype,
    }
    mt = c.model_type
    if mt in ("llama", "qwen3", "olmo2", "olmo3", "smollm3", "qwen3_moe"):
        out.update(attention_bias=c.attention_bias, mlp_bias=False)
    if mt == "llama":
        out["pretraining_tp"] = 1
    if mt in ("mistral", "phi3", "ministral3", "gemma2", "gemma3_text", "olmo3"):
        out["sliding_window"] = c.sliding_window
    if mt == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_hidden_layers)
    if mt == "mixtral":
        out.update(sliding_window=c.sliding_window, num_local_experts=c.num_experts,
                   num_experts_per_tok=c.num_experts_per_tok, router_aux_loss_coef=c.router_aux_loss_coef,
                   router_jitter_noise=0.0, output_router_logits=False)
    if mt == "qwen3_moe":
        out.update(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                   moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob,
                   decoder_sparse_step=c.decoder_sparse_step, mlp_only_layers=list(c.mlp_only_layers or []),
                   router_aux_loss_coef=c.router_aux_loss_coef, output_router_logits=False)
    if mt in ("qwen3", "smollm3", "qwen3_moe"):
        sliding = [i for i in range(c.num_hidden_layers) if c.layer_window(i) is not None]
        # layer_types (below) decides in transformers >= 4.53; older Qwen3 slides layers >= max_window_layers
        out.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                   max_window_layers=sliding[0] if sliding else c.num_hidden_layers)
    if c.layer_types is not None:
        out["layer_types"] = list(c.layer_types)
    if mt in ("gemma2", "gemma3_text"):
        scalar = c.query_pre_attn_scalar  # transformers 5's config class insists on an int
        out.update(hidden_activation=c.hidden_act, query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                   final_logit_softcapping=c.final_logit_softcapping, attention_bias=c.attention_bias)
        if mt == "gemma2":
            out["attn_logit_softcapping"] = c.attn_logit_softcapping
    if mt == "smollm3":
        out["no_rope_layers"] = list(c.no_rope_layers)
    if mt == "phi3":
        out["partial_rotary_factor"] = c.partial_rotary_factor
        out["original_max_position_embeddings"] = (c.rope_scaling or {}).get(
            "original_max_position_embeddings", c.max_position_embeddings)
    if mt == "qwen3_5_moe_text":  # no dense MLP: transformers' config has no intermediate_size
        del out["intermediate_size"]
        out.update(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                   moe_intermediate_size=c.moe_intermediate_size,
                   shared_expert_intermediate_size=c.shared_expert_intermediate_size,
                   router_aux_loss_coef=c.router_aux_loss_coef, output_router_logits=False)
    if mt in HYBRID:
        out.update({k: getattr(c, k) for k in LINEAR_FIELDS}, attention_bias=c.attention_bias,
                   partial_rotary_factor=c.partial_rotary_factor,
                   rope_parameters={"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta,
                                    "partial_rotary_factor": c.partial_rotary_factor})
    if mt in NESTED_ROPE:
        sliding_theta = c.sliding_rope_theta if c.sliding_rope_theta is not None else c.rope_theta
        if mt == "gemma3_text":
            out["rope_local_base_freq"] = sliding_theta
        out["rope_parameters"] = {
            "full_attention": {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta},
            "sliding_attention": {"rope_type": "default", **(c.sliding_rope_scaling or {}), "rope_theta": sliding_theta},
        }
    return out


def load_model_config(path) -> ModelConfig:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{file}: not found; a Hugging Face model directory needs a config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return config_from_dict(raw, str(file))
