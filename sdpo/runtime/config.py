"""Typed run configuration: dataclass sections, TOML files, `--section.key=value` overrides.

A config is one `Config` made of sections (`[model]`, `[data]`, `[loss]`, `[optim]`,
`[train]`, `[sft]`, `[eval]`, `[lora]`, `[reference]`, `[online]`). Each field has one type; TOML values and command-line
overrides are checked against it, so a typo or a wrong type fails before any work:

    cfg = load_config("configs/tiny.toml", overrides=["--loss.beta=0.2"])
    save_config(cfg, "runs/tiny/config.toml")    # the resolved config, reloadable

TOML has no null, so every optional field defaults to None and a None value is
written as an omitted key (commented out), which reads back as None.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from sdpo.loss import REFERENCE_FREE_TYPES
from sdpo.models.lora import LORA_TARGETS
from sdpo.runtime.config_checks import config_problems


class ConfigError(ValueError):
    pass


@dataclass
class ModelSection:
    # HF-format directory of the base model S (M_0). None: a random-init model built from
    # the sizes below (vocab from the tokenizer), usually followed by the [sft] stage.
    path: str | None = None
    tokenizer: str | None = None        # tokenizer directory; None -> model.path
    chat_template: str | None = None    # None -> tokenizer_config.json's; else a name in CHAT_TEMPLATES or jinja text
    enable_thinking: bool | None = None  # passed to the chat template when set (Qwen3, SmolLM3: false = no reasoning)
    # Random-init sizes (used only when path is None).
    hidden_size: int = 64
    intermediate_size: int = 176          # MLP width (random init)
    num_hidden_layers: int = 2            # blocks (random init)
    num_attention_heads: int = 4          # query heads (random init)
    num_key_value_heads: int | None = None  # key/value heads for GQA; None: = num_attention_heads
    max_position_embeddings: int = 1024   # context length (random init)
    tie_word_embeddings: bool = False     # lm_head shares the embedding matrix (random init)
    rope_theta: float = 10000.0           # RoPE base (random init)
    init_std: float = 0.02                # std of the normal init (random init)
    # Recompute block activations in backward: "none", "full" (every block) or "every:K" (blocks
    # 0, K, 2K, ...; the int K works too; old configs' true / false mean full / none). The
    # cheapest setting that fits: python -m sdpo.runtime.memory MODEL_DIR --config FILE.
    activation_checkpointing: str = "none"
    # lm_head + log-softmax in chunks of rows (kernels.linear_token_logprobs): no [R, V] logits.
    fused_logprobs: bool = True
    # with it, on CPU in float32: a pair-separable DPO loss taken pair by pair inside the lm_head, whose
    # gradient then needs no second pass over the logits (sdpo.logprobs.packed_pair_loss).
    fused_loss: bool = True
    # dtype of the exported M_t directories; None -> the base config's torch_dtype.
    export_dtype: str | None = None


@dataclass
class DataSection:
    # One entry per source dataset (a file or a directory of files). With split = "natural"
    # dataset t is D_t; other strategies pool them and cut by `fractions`.
    datasets: list[str] = field(default_factory=list)
    split: str = "natural"              # natural | random | stratified | easy_to_hard | all
    fractions: list[float] | None = None  # share of the pooled data per sDPO step (random / stratified / easy_to_hard)
    schema: str = "auto"                  # auto | generic | orca | ultrafeedback | conversational
    on_error: str = "fail"              # fail | skip
    max_length: int = 1024                # tokens per pair: prompt + the longer response
    max_prompt_length: int | None = None  # None: max_length // 2 (valid for any max_length)
    truncation: str = "keep_end"          # keep_end | keep_start: which end of a long prompt stays
    max_examples: int | None = None     # cap per sDPO step after the split (smoke runs)
    group_by_length: bool = False       # sort by length within mega-batches (less padding when packing is off)
    # Throughput (exact: the same log-probs as padded rows). packing: several pairs per row,
    # no padding; share_prompt: one row segment prompt | chosen | rejected per pair.
    packing: bool = True
    share_prompt: bool = True             # packing off: one padded row prompt | chosen | rejected per pair
    # Held-out sets (one per sDPO step, same order) for the end-of-run summary table.
    test_datasets: list[str] = field(default_factory=list)
    max_test_examples: int | None = None  # cap per held-out set (smoke runs)

    @property
    def prompt_length(self) -> int:
        """max_prompt_length, or half of max_length when it is unset."""
        return self.max_prompt_length if self.max_prompt_length is not None else max(1, self.max_length // 2)


@dataclass
class LossSection:
    # One name from sdpo.loss.LOSS_TYPES, or several joined by "+" whose losses are summed
    # with `weights` (e.g. "sigmoid+sft"; "sft" is the chosen-response NLL per token).
    type: str = "sigmoid"
    beta: float = 0.1                     # β: inverse strength of the KL anchor to the reference
    label_smoothing: float = 0.0        # ε: cDPO for sigmoid, rDPO for robust, EXO's target
    weights: list[float] | None = None  # one per type in `type`; None: 1 each
    rpo_alpha: float | None = None      # RPO: + α · (chosen NLL per token)
    reference_free: bool = False        # reference log-probs taken as 0 (γ_ref is still logged)
    length_normalize: bool = False      # IPO on per-token mean log-probs (Zephyr/TRL practice)
    simpo_gamma: float = 0.5            # SimPO's target margin γ
    discopop_tau: float = 0.05          # DiscoPOP's modulation temperature τ
    cpo_alpha: float = 1.0              # weight of CPO's NLL term
    # Mixture-of-experts policies: + coef · the load-balancing loss of the policy's forward (Switch
    # Transformer, eq 4; sdpo/models/moe.py), logged as aux_loss; None: the checkpoint's router_aux_loss_coef, 0: off
    router_aux_coef: float | None = None
    router_z_coef: float = 0.0            # + coef · the router z-loss (ST-MoE, eq 5); 0: off

    @property
    def types(self) -> list[str]:
        return self.type.split("+")

    @property
    def needs_reference(self) -> bool:
        """False for SimPO, CPO and ORPO alone: the reference pass is skipped."""
        return not REFERENCE_FREE_TYPES.issuperset(self.types)


@dataclass
class OptimSection:
    name: str = "adamw"                 # adamw | rmsprop
    lr: float = 5e-7                      # peak learning rate of the DPO steps
    weight_decay: float = 0.0             # decoupled weight decay on matrices (AdamW)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam β1, β2
    eps: float = 1e-8                     # Adam / RMSprop ε
    alpha: float = 0.99                 # RMSprop smoothing constant
    schedule: str = "linear"            # constant | linear | cosine (after warmup), restarted per sDPO step
    warmup_ratio: float = 0.1             # share of each step's optimizer steps spent warming up
    max_grad_norm: float | None = None  # None: no clipping (the paper configs set 1.0, transformers' Trainer default)


@dataclass
class TrainSection:
    output_dir: str = "runs/default"      # run directory (see README: what it holds)
    seed: int = 42                        # data order, splits and random init
    global_batch_size: int = 32         # pairs per optimizer step, summed over ranks and accumulation
    micro_batch_size: int = 1           # pairs per forward on one rank
    epochs: int = 3                     # passes over D_t per sDPO step (Zephyr-7B-β: 3)
    max_steps: int | None = None        # cap on optimizer steps per sDPO step (smoke runs)
    init: str = "previous"              # previous: policy starts from M_{t-1}; base: from S (Figure 3)
    precision: str = "auto"             # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"                # auto | cpu | cuda
    save_every: int | None = None       # resumable state every N optimizer steps; None: only at step ends
    log_every: int = 1                    # optimizer steps per metrics line (values are means over the window)
    resume: bool = False                # also `--resume`
    ref_cache_dir: str | None = None    # None -> <output_dir>/ref_cache
    ref_batch_size: int | None = None   # pairs per no-grad reference forward; None -> micro_batch_size
    # Token budgets per forward (packed tokens; micro_batch_size / ref_batch_size still cap the
    # pairs). None: no budget. The global batch stays global_batch_size pairs either way.
    tokens_per_micro_batch: int | None = None
    ref_tokens_per_batch: int | None = None  # None -> tokens_per_micro_batch
    reshard_after_forward: bool = True  # FSDP2: free gathered block params after forward
    dp_shard: int | None = None         # ranks one model copy is sharded over (HSDP); None: GPUs per node
    dp_replicate: int | None = None     # HSDP replicas, gradients all-reduced across; None: world size / dp_shard
    timeout_s: float = 1800.0           # process-group timeout: a collective waiting longer fails the job
    export_timeout_s: float = 7200.0    # how long the other ranks wait for rank 0 to write M_t
    # SIGTERM / SIGUSR1 (a preemption): finish the optimizer step, save, exit 75; a process not out
    # this long after the signal exits anyway (128 + signal). A few seconds under the scheduler's grace.
    preempt_grace_s: float = 25.0
    compile: bool = False               # torch.compile each transformer block (inductor; needs a C compiler on CPU)
    report_to: list[str] = field(default_factory=list)  # trackers fed the metrics rows too: tensorboard | wandb | trackio
    run_name: str | None = None         # the wandb / trackio run's name; None: the output directory's name
    project: str | None = None          # the wandb / trackio project; None: $WANDB_PROJECT for wandb, else "sdpo"
    # Fault injection for tests: exit with code 3 after this many optimizer steps in
    # total, as a kill would (no state saved beyond the last save_every checkpoint).
    stop_after: int | None = None


@dataclass
class SFTSection:
    # Optional first stage: NLL on the chosen responses, making S.
    enabled: bool = False
    # Preference files whose chosen responses S is trained on; empty: data.datasets (all steps).
    # The paper's S never saw the preference data; a separate set keeps that property.
    datasets: list[str] = field(default_factory=list)
    lr: float = 1e-3                      # peak learning rate
    epochs: int = 1                       # passes over the SFT data
    max_steps: int | None = None          # cap on optimizer steps (smoke runs)
    global_batch_size: int = 16           # sequences per optimizer step
    micro_batch_size: int = 16            # sequences per forward on one rank
    warmup_ratio: float = 0.0             # share of the steps spent warming up
    schedule: str = "cosine"              # constant | linear | cosine (after warmup)
    weight_decay: float = 0.0             # decoupled weight decay on matrices


@dataclass
class EvalSection:
    # After training: preference accuracy and mean gamma of S, M_1..M_T on data.test_datasets.
    summary: bool = False
    batch_size: int = 16                  # pairs per no-grad forward of the summary and held-out evaluation
    # Held-out DPO loss, reward accuracy and margins during training (eval_ rows in metrics.jsonl):
    # every this many optimizer steps and at each sDPO step's end; None: off.
    every: int | None = None


@dataclass
class LoRASection:
    # Low-rank adapters on the DPO steps' policy (Hu et al. 2021; sdpo/models/lora.py): base frozen,
    # M_t exported merged, plus its adapter in peft's layout under M_t/adapter/.
    enabled: bool = False                 # train LoRA adapters instead of all weights (DPO steps; SFT trains all)
    rank: int = 16                        # r, the adapters' rank
    alpha: float = 32.0                   # α: the update is scaled by α / r
    dropout: float = 0.05                 # dropout on the adapters' input
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # projections that get adapters
    base_dtype: str = "auto"              # frozen targeted weights: auto (bfloat16 under bf16 autocast) | float32 | bfloat16


@dataclass
class ReferenceSection:
    # The DPO steps' reference model (sdpo/reference.py). Unset path: M_{t-1} at step t (sDPO);
    # a directory: that model at every step (the paper's Table 1: an external reference).
    path: str | None = None               # reference model directory for every step; None: M_{t-1} (sDPO)
    tokenizer: str | None = None          # the reference's tokenizer; None -> reference.path's (scores its own tokens)
    chat_template: str | None = None      # None -> the policy's (the same prompt text); else a name in CHAT_TEMPLATES or jinja
    mode: str = "cached"                  # cached: one no-grad pass per step, on disk | live: in memory, per micro-batch
    sync_every: int | None = None         # TR-DPO: ref <- a*policy + (1-a)*ref every this many optimizer steps (live)
    sync_alpha: float = 1.0               # TR-DPO's α in (0, 1]: 1 is a hard sync (sDPO: one at each step's end)


@dataclass
class OnlineSection:
    # On-policy steps (sdpo/online.py): at step t, M_{t-1} samples completions for D_t's prompts, a
    # judge scores them, best vs worst per prompt become D_t's pairs (reference = M_{t-1} as before).
    enabled: bool = False                 # off: D_t is the file's pairs
    samples: int = 4                      # completions per prompt (>= 2)
    temperature: float = 1.0              # sampling temperature (> 0)
    top_p: float = 1.0                    # nucleus sampling's p, in (0, 1]
    max_new_tokens: int = 64              # tokens per completion at most
    batch_prompts: int = 16               # prompts per sampling batch (x samples rows): the unit of seeding, ranks and resume
    judge: str = "exact_match"            # exact_match | command:ARGV (argument list, no shell) | reward_model:DIR
    answer_field: str = "chosen"          # exact_match: the record's reference answer (chosen: the preferred response)
    casefold: bool = False                # exact_match: compare case-folded, after stripping whitespace
    min_margin: float = 0.0               # a prompt's pair needs best - worst >= this (and > 0: ties are dropped)
    mix: float = 0.0                      # share of the file's own pairs of D_t kept alongside, in [0, 1]
    timeout_s: float = 600.0              # command judge: seconds per call (one call per sampling batch)
    judge_batch_size: int = 16            # reward model judge: sequences per no-grad forward


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    sft: SFTSection = field(default_factory=SFTSection)
    eval: EvalSection = field(default_factory=EvalSection)
    lora: LoRASection = field(default_factory=LoRASection)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    online: OnlineSection = field(default_factory=OnlineSection)




def _hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _sections() -> dict[str, type]:
    return _hints(Config)   # section name -> its dataclass


def _type_name(tp) -> str:
    if tp is type(None):
        return "none"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return tp.__name__


def _check(value, tp, where: str):
    """Return `value` as type `tp` (int widens to float) or raise naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check(value, args[0], where) if len(args) == 1 else value
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is list:
        if isinstance(value, list):
            (inner,) = typing.get_args(tp)
            return [_check(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _parse_scalar(text: str, tp, where: str):
    if tp is str:
        return text
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
    elif tp is int:
        try:
            return int(text)
        except ValueError:
            pass
    elif tp is float:
        try:
            return float(text)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {text!r}")


def _parse_text(text: str, tp, where: str):
    """Parse an override's text as `tp`: `none` for optional fields, a TOML array or a
    comma-separated list for lists."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null"):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _parse_text(text, inner, where)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if text.strip().startswith("["):
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{where}: expected a TOML array like [1, 2], got {text!r} ({e})") from None
            return _check(value, tp, where)
        if not text.strip():
            return []
        return [_parse_text(part.strip(), inner, f"{where}[{i}]") for i, part in enumerate(text.split(","))]
    return _parse_scalar(text, tp, where)


def _unknown(kind: str, name: str, valid) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown {kind} {name!r}{hint}; valid: {', '.join(valid)}")


def _set(cfg: Config, section: str, key: str, value, *, source: str, from_text: bool) -> None:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"{source}: " + str(_unknown("section", section, sections)))
    sec = getattr(cfg, section)
    hints = _hints(type(sec))
    if key not in hints:
        raise ConfigError(f"{source}: " + str(_unknown(f"key in [{section}]", key, hints)))
    where = f"{source}: {section}.{key}"
    tp = hints[key]
    if (section, key) == ("model", "activation_checkpointing") and isinstance(value, (bool, int)):
        value = str(value).lower()  # true / false / K from configs written before it was a string
    if key == "chat_template" and from_text and value.strip() == "none":
        # the built-in template named "none" (plain concatenation), not an unset key: --...=null unsets
        setattr(sec, key, "none")
        return
    setattr(sec, key, _parse_text(value, tp, where) if from_text else _check(value, tp, where))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--section.key=value` (or `section.key=value`) strings in order."""
    for item in overrides:
        body = item[2:] if item.startswith("--") else item
        if "=" not in body or "." not in body.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected --section.key=value")
        name, value = body.split("=", 1)
        section, key = name.split(".", 1)
        _set(cfg, section.strip(), key.strip().replace("-", "_"), value, source=f"override {item!r}", from_text=True)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), *, validate: bool = True) -> Config:
    """Defaults <- TOML file <- overrides, then `validate_config`."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table; "
                                  f"valid sections: {', '.join(_sections())}")
            for key, value in table.items():
                _set(cfg, section, key, value, source=str(path), from_text=False)
    apply_overrides(cfg, list(overrides))
    if validate:
        validate_config(cfg)
    return cfg


def validate_config(cfg: Config) -> None:
    """Check values (not paths: see sdpo.stepwise.check_setup). All problems in one error."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        # JSON string escapes (\" \\ \n \uXXXX) are valid TOML basic-string escapes.
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: Config) -> str:
    lines = []
    for section, values in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            # TOML has no null; an omitted optional key reads back as its default None.
            lines.append(f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as TOML (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(to_toml(cfg))
    os.replace(tmp, path)


def parse_args(argv: list[str], default_config: str | os.PathLike | None = None) -> Config:
    """`[--config FILE] [--resume] [--section.key=value | --section.key value ...]`.

    Without --config the file is `default_config` (the tiny demo), unless --model.path is given:
    then a user's own model starts from the dataclass defaults, the paper's recipe, with no demo
    data, SFT stage or demo tokenizer carried along."""
    config_path, overrides, resume, explicit = default_config, [], False, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(_usage())
            raise SystemExit(0)
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                i += 1
                config_path = argv[i]
            else:
                raise ConfigError("--config needs a file")
            explicit = True
        elif arg == "--resume":
            resume = True
        elif arg.startswith("--") and "." in arg.split("=", 1)[0]:
            if "=" not in arg:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value (--section.key=value)")
                i += 1
                arg = f"{arg}={argv[i]}"
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}\n{_usage()}")
        i += 1
    if resume:
        overrides.append("--train.resume=true")
    if not explicit and any(o.split("=", 1)[0] in ("--model.path", "model.path") for o in overrides):
        config_path = None
    return load_config(config_path, overrides)


def non_defaults(cfg: Config) -> list[str]:
    """`section.key = value` for every value that differs from the dataclass default."""
    now, default = config_to_dict(cfg), config_to_dict(Config())
    return [f"{s}.{k} = {v!r}" for s in now for k, v in now[s].items() if v != default[s][k]]


def key_help(cls) -> dict[str, str]:
    """key -> its one-line meaning: the comment on the field's line, else the comment block above it
    (the dataclass source is the one place each key is documented)."""
    out, block = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            block.append(text.lstrip("# ").strip())
            continue
        m = re.match(r"(\w+): [^#]*?(?:#\s*(.*))?$", text)
        if m and m.group(1) in cls.__dataclass_fields__:
            out[m.group(1)] = m.group(2) or " ".join(block)
        block = [] if not text.startswith("#") else block
    return out


def _usage() -> str:
    lines = ["usage: train.py [--config FILE] [--resume] [--section.key=value ...]", "",
             "keys (default, then meaning); any of them as --section.key=value:"]
    for name, cls in _sections().items():
        lines.append(f"  [{name}]")
        meanings = key_help(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meaning = meanings.get(f.name, "").split(". ")[0].rstrip(".")  # the first sentence
            lines.append(f"    {name}.{f.name} = {default!r}".ljust(44) + f"  {meaning}".rstrip())
    return "\n".join(lines)
