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

from sdpo.models.model import ROPE_TYPES, ModelConfig

CONFIG_NAME = "config.json"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
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


def check_family(config: ModelConfig, where: str) -> None:
    """Combinations transformers' classes can't express would silently change the numbers there."""
    if config.model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: unknown model_type {config.model_type!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    if config.sliding_window is not None and config.model_type != "mistral":
        raise CheckpointError(f"{where}: sliding_window is only supported for model_type 'mistral'")
    if config.model_type == "mistral" and config.attention_bias:
        raise CheckpointError(f"{where}: mistral has no attention biases (attention_bias must be false)")
    if config.model_type == "qwen2" and not config.attention_bias:
        raise CheckpointError(f"{where}: qwen2 always has q/k/v biases (attention_bias must be true)")


def config_from_dict(raw: dict, where: str = CONFIG_NAME) -> ModelConfig:
    """Parse an HF config dict; `where` names the file in error messages."""
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: unknown model_type {model_type!r}; supported: {', '.join(ARCHITECTURES)}"
        )

    def get(key, kind, default=...):
        if key not in raw or raw[key] is None:
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

    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported; expected 'silu'")
    if raw.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")

    # transformers >= 5 writes rope_parameters = {"rope_type", "rope_theta", scaling keys...};
    # older versions write rope_theta and rope_scaling at the top level.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{where}: rope_scaling should be an object, got {rope!r}")
    rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) == "default":
        rope_scaling = None

    sliding_window = None
    if model_type == "mistral":
        # transformers' MistralConfig defaults to 4096 when the key is absent; an explicit null
        # (Mistral-7B v0.2 and later) means no window.
        sliding_window = get("sliding_window", int, None) if "sliding_window" in raw else 4096
    elif model_type == "qwen2" and raw.get("use_sliding_window"):
        # Qwen2 applies the window only to layers >= max_window_layers; no released model uses it.
        raise CheckpointError(f"{where}: qwen2 with use_sliding_window=true is not supported")

    sizes = {k: get(k, int) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads")}
    sizes.update(num_key_value_heads=get("num_key_value_heads", int, None), head_dim=get("head_dim", int, None),
                 max_position_embeddings=get("max_position_embeddings", int, 4096))
    rms_norm_eps = get("rms_norm_eps", float, 1e-6)
    check_values(sizes, rms_norm_eps, rope_theta, rope_scaling, sliding_window, where)
    try:
        return ModelConfig(
            **sizes,
            rms_norm_eps=rms_norm_eps,
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            # Qwen2's config has no attention_bias field: its q/k/v biases are always there.
            attention_bias=True if model_type == "qwen2" else get("attention_bias", bool, False),
            sliding_window=sliding_window,
            model_type=model_type,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=dtype_name(parse_dtype(raw.get("torch_dtype") or raw.get("dtype") or "float32", where)),
        )
    except (ValueError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: {e}") from e


def check_values(sizes: dict, rms_norm_eps: float, rope_theta, rope_scaling, sliding_window, where: str) -> None:
    """Before any tensor exists: a size of -5 would otherwise reach torch.empty ("negative dimension")."""
    problems = [f"{k} must be a positive integer, got {v}" for k, v in sizes.items() if v is not None and v <= 0]
    heads, kv = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if not problems:
        if sizes["head_dim"] is None and sizes["hidden_size"] % heads:
            problems.append(f"hidden_size ({sizes['hidden_size']}) must be divisible by num_attention_heads ({heads})")
        if kv is not None and heads % kv:
            problems.append(f"num_key_value_heads ({kv}) must divide num_attention_heads ({heads})")
        if (sizes["head_dim"] or sizes["hidden_size"] // heads) % 2:
            problems.append(f"head_dim ({sizes['head_dim'] or sizes['hidden_size'] // heads}) must be even (rotary)")
    if not (math.isfinite(rms_norm_eps) and rms_norm_eps > 0):
        problems.append(f"rms_norm_eps must be a finite number > 0, got {rms_norm_eps}")
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not (0 < rope_theta < math.inf):
        problems.append(f"rope_theta must be a finite number > 0, got {rope_theta!r}")
    if rope_scaling is not None:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind not in ROPE_TYPES:
            problems.append(f"rope_scaling type {kind!r} is not supported; expected one of {list(ROPE_TYPES)}")
        else:
            factor = rope_scaling.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (0 < factor < math.inf):
                problems.append(f"rope_scaling.factor must be a finite number > 0, got {factor!r}")
            if kind == "llama3":
                for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    v = rope_scaling.get(k)
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
                        problems.append(f"rope_scaling.{k} must be a finite number > 0, got {v!r}")
    if sliding_window is not None and sliding_window < 1:
        problems.append(f"sliding_window must be >= 1 or null, got {sliding_window}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def model_config_to_dict(config: ModelConfig, torch_dtype: str | None = None) -> dict:
    """The config.json transformers needs (legacy rope_theta/rope_scaling keys, read by 4.x and 5.x)."""
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
        "hidden_act": "silu",
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
    if c.model_type == "llama":
        out.update(attention_bias=c.attention_bias, mlp_bias=False, pretraining_tp=1)
    elif c.model_type == "mistral":
        out["sliding_window"] = c.sliding_window
    elif c.model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_hidden_layers)
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
