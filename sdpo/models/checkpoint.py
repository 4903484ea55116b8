"""Hugging Face model directories in and out: config.json, (sharded) safetensors, tokenizer files.

A directory written by save_model loads in transformers' AutoModelForCausalLM.from_pretrained
with the same logits, and one written by transformers' save_pretrained(safe_serialization=True)
loads here (tools/make_hf_fixtures.py checks both ways).

Tensor names: HF's are ours with a "model." prefix, except "lm_head.weight".
Only safetensors are read: pickle-based .bin/.pt files can run code on load, so they are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# config.json <-> ModelConfig lives in sdpo.models.hf_config; its public functions are importable from here too.
from sdpo.models.hf_config import (CONFIG_NAME, CheckpointError, check_family, dtype_name, load_model_config,
                                   model_config_to_dict, parse_dtype)
from sdpo.models.model import ModelConfig, Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
# The temporary and replaced directories save_state_dict leaves when killed: .M1.tmp-ab12cd, .M1.old-ab12cd34
TEMP_DIR = re.compile(r"\.(.+)\.(tmp|old)-[0-9a-zA-Z_]+")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Buffers some old conversions stored; we recompute them, so they are skipped on load.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Vision-language checkpoints (Qwen3.5): the language tower is model.language_model.*; the vision tower
# and the multi-token-prediction head are not part of the decoder and are skipped with a notice.
LANGUAGE_PREFIX = "model.language_model."
SKIPPED_PREFIXES = ("model.visual.", "mtp.")


# ---------------------------------------------------------------------------------------------
# tensor names


def to_hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def from_hf_name(name: str) -> str | None:
    if name == "lm_head.weight":
        return name
    if name.startswith(LANGUAGE_PREFIX):
        return name[len(LANGUAGE_PREFIX):]
    return name[len("model."):] if name.startswith("model.") else None


# Mixture of experts: the hub keeps each expert's projections as tensors of their own
# (model.layers.N.block_sparse_moe.experts.E.w1.weight); we hold a layer's experts stacked, [E, ...],
# so FSDP2 shards them as three parameters. model_type -> (the hub's module, our stacked name -> its name).
HUB_EXPERTS = {
    "mixtral": ("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),
    "qwen3_moe": ("mlp", {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}),
    "qwen3_5_moe_text": ("mlp", {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}),
}
_MOE_NAME = re.compile(r"layers\.(\d+)\.mlp\.(?:experts\.(gate_proj|up_proj|down_proj)|gate\.weight)")
# Also read: transformers 5's in-memory layout, which a checkpoint may store as it is (transformers and vLLM
# load both for Qwen3.5-MoE): a layer's experts fused, mlp.experts.gate_up_proj [E, 2I, H] (gate rows, then
# up rows) and mlp.experts.down_proj [E, H, I]. save_model writes the per-expert names, as save_pretrained does.
FUSED_EXPERTS = ("qwen3_5_moe_text",)


def hub_names(name: str, config: ModelConfig) -> str | list[str]:
    """Our parameter name -> its HF tensor name, or the E per-expert names of a stacked expert tensor
    (expert e is row block e)."""
    m = _MOE_NAME.fullmatch(name)
    if m is None or config.model_type not in HUB_EXPERTS:
        return to_hf_name(name)
    module, rename = HUB_EXPERTS[config.model_type]
    if m[2] is None:  # the router
        return f"model.layers.{m[1]}.{module}.gate.weight"
    return [f"model.layers.{m[1]}.{module}.experts.{e}.{rename[m[2]]}.weight" for e in range(config.num_experts)]


def _take_experts(found: dict, expected: dict, config: ModelConfig, root) -> dict:
    """Move the MoE tensors whose hub names differ from to_hf_name's out of `found` and `expected`
    (in place) -> {ours: (file, HF name)} for a router, {ours: [(file, HF name) per expert]} for a stack,
    {ours: (file, HF name, lo, hi)} for half of a fused gate_up_proj."""
    out, missing = {}, []

    def located(n: str) -> str:  # a vision-language checkpoint keeps them under model.language_model.
        alt = LANGUAGE_PREFIX + n[len("model."):]
        return alt if n not in found and alt in found else n

    fused_keys = set()
    for ours in [k for k in expected if config.model_type in HUB_EXPERTS and _MOE_NAME.fullmatch(k)]:
        want = expected.pop(ours)
        m = _MOE_NAME.fullmatch(ours)
        fused = located(f"model.layers.{m[1]}.mlp.experts.gate_up_proj")
        if m[2] is not None and config.model_type in FUSED_EXPERTS and fused in found:
            out[ours] = _fused_source(found, fused, m[2], want)
            fused_keys.add(out[ours][1])
            continue
        hub = hub_names(ours, config)
        parts = [located(n) for n in ([hub] if isinstance(hub, str) else hub)]
        missing += [n for n in parts if n not in found]
        for n in parts:
            shape = want if isinstance(hub, str) else want[1:]
            if n in found and found[n][1] != shape:
                raise CheckpointError(f"{found[n][0]}: tensor {n!r} has shape {list(found[n][1])}, expected {list(shape)}")
        if not missing:
            srcs = [(found.pop(n)[0], n) for n in parts]
            out[ours] = srcs[0] if isinstance(hub, str) else srcs
    if missing:
        raise CheckpointError(f"{root}: tensors do not match config.json ({config.model_type}, {config.num_experts} "
                              f"experts); missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    for key in fused_keys:
        found.pop(key)
    return out


def _fused_source(found: dict, gate_up: str, proj: str, want: tuple) -> tuple:
    """Our stacked gate_proj / up_proj [E, I, H] -> (file, gate_up_proj, first row, end row) of its half of the
    fused [E, 2I, H]; down_proj [E, H, I] -> (file, down_proj) as it is."""
    key = gate_up if proj != "down_proj" else gate_up.removesuffix("gate_up_proj") + "down_proj"
    E, rows, cols = want
    shape = want if proj == "down_proj" else (E, 2 * rows, cols)
    if key not in found:
        raise CheckpointError(f"{found[gate_up][0]}: has {gate_up!r} but no {key!r} (fused experts)")
    if found[key][1] != shape:
        raise CheckpointError(f"{found[key][0]}: tensor {key!r} has shape {list(found[key][1])}, "
                              f"expected {list(shape)}")
    if proj == "down_proj":
        return found[key][0], key
    return (found[key][0], key, 0, rows) if proj == "gate_proj" else (found[key][0], key, rows, 2 * rows)


def read_rows(source, start: int | None = None, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of dim 0 of one of our parameters, read from the files checked_tensors named:
    (file, HF name) reads those rows only (get_slice); (file, HF name, lo, hi) reads dim 1's [lo, hi) of
    them (one half of fused experts); a list of per-expert sources reads experts start..stop."""
    if isinstance(source, list):
        return torch.stack([read_rows(part) for part in source[slice(start, stop)]])
    file, key, *cols = source
    if cols:
        with open_safetensors(file) as f:
            try:
                return f.get_slice(key)[slice(start, stop), cols[0]:cols[1]]
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read rows {start}:{stop}, {cols} of {key!r} ({e})") from e
    # One open per tensor: the file is mmapped while open, and the pages we touch count in this
    # process's resident set until it is closed, so keep at most one tensor's rows mapped.
    with open_safetensors(file) as f:
        try:
            return f.get_slice(key)[slice(start, stop)] if start is not None else f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read rows {start}:{stop} of {key!r} ({e})") from e


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names -> shapes, without allocating (a meta-device model); tied lm_head left out."""
    with torch.device("meta"):
        model = Transformer(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


# ---------------------------------------------------------------------------------------------
# loading


def _weight_files(root: Path) -> list[Path]:
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' should map tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (root / shard).is_file():
                names = [k for k, v in weight_map.items() if v == shard]
                raise CheckpointError(
                    f"{index}: points at shard {shard!r} (tensors {names[:5]}{'...' if len(names) > 5 else ''}) "
                    f"but {root / shard} does not exist"
                )
        return [root / s for s in shards]
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{root}: only pickle checkpoints found ({', '.join(pickles)}); sdpo reads safetensors only, since "
            "unpickling can run arbitrary code. Convert once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
        )
    present = sorted(p.name for p in root.iterdir())
    raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE} found (files: {present})")


def _shard_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """HF tensor name -> (file, shape), from the headers only."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                if key in found:
                    raise CheckpointError(f"{file}: tensor {key!r} also appears in {found[key][0]}")
                found[key] = (file, tuple(f.get_slice(key).get_shape()))
    return found


def open_safetensors(file: Path):
    """safe_open with a CheckpointError naming the file when it is truncated or corrupt."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (header/size checks)
        raise CheckpointError(f"{file}: cannot read safetensors file, it is truncated or corrupt ({e})") from e


def checked_tensors(root: Path, config: ModelConfig) -> dict[str, tuple[Path, str]]:
    """Our parameter name -> (file, HF name) for every tensor the model needs, from the headers only;
    a stacked MoE expert tensor maps to a list, one (file, HF name) per expert (read_rows reads either).

    Raises CheckpointError listing missing and unexpected tensors, or naming a shape mismatch.
    Shared by load_model and the sharded loader in sdpo.runtime.distributed, so both fail alike."""
    found = _shard_shapes(_weight_files(root))
    expected = expected_shapes(config)  # a tied lm_head is left out
    moe = _take_experts(found, expected, config, root)  # MoE: stacked experts and renamed routers
    names = {}
    unexpected, skipped = [], []
    for key in found:
        ours = from_hf_name(key)
        if ours in expected:
            names[ours] = key
        elif key.startswith(SKIPPED_PREFIXES):
            skipped.append(key)
        elif key.endswith(IGNORED_SUFFIXES) or (ours == "lm_head.weight" and config.tie_word_embeddings):
            continue  # tied checkpoints sometimes also store lm_head.weight (a copy of the embedding)
        else:
            unexpected.append(key)
    if skipped:
        print(f"{root}: skipping {len(skipped)} tensors outside the language model "
              f"({', '.join(sorted({k.split('.')[0] + '.' + k.split('.')[1] for k in skipped}))})")
    missing = [to_hf_name(k) for k in expected if k not in names]
    if missing or unexpected:
        raise CheckpointError(
            f"{root}: tensors do not match config.json ({config.model_type}, {config.num_hidden_layers} layers, "
            f"tie_word_embeddings={config.tie_word_embeddings}); missing: {missing or 'none'}; "
            f"unexpected: {unexpected or 'none'}"
        )
    for ours, key in names.items():
        file, shape = found[key]
        if shape != expected[ours]:
            raise CheckpointError(f"{file}: tensor {key!r} has shape {list(shape)}, expected {list(expected[ours])}")
    return {**{ours: (found[key][0], key) for ours, key in names.items()}, **moe}


def load_model(path, dtype=None, device=None) -> Transformer:
    """Build on the meta device, then assign tensors shard by shard: host memory holds the model once.

    dtype None keeps the checkpoint's torch_dtype; device None means CPU.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    config = load_model_config(root)
    dtype = parse_dtype(dtype if dtype is not None else config.torch_dtype, f"load_model({root})")
    device = torch.device(device if device is not None else "cpu")
    tensors = checked_tensors(root, config)
    # stacked experts (per-expert tensors, or half of a fused one): read below
    moe = {ours: src for ours, src in tensors.items() if isinstance(src, list) or len(src) > 2}
    names = {key: ours for ours, src in tensors.items() if ours not in moe for key in [src[1]]}  # HF name -> ours
    files = sorted({src[0] for ours, src in tensors.items() if ours not in moe})

    with torch.device("meta"):
        model = Transformer(config)
    for file in files:
        with open_safetensors(file) as f:
            shard = {}
            for key in f.keys():
                if key in names:
                    try:
                        shard[names[key]] = f.get_tensor(key).to(device=device, dtype=dtype)
                    except Exception as e:
                        raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e})") from e
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    for ours, src in moe.items():  # one stacked [E, ...] parameter at a time
        model.load_state_dict({ours: read_rows(src).to(device=device, dtype=dtype)}, strict=False, assign=True)
    model.tie_weights()  # assign=True replaced embed_tokens.weight; point lm_head at the new one
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{root}: no data was loaded for {left}")
    model.config.torch_dtype = dtype_name(dtype)
    return model


# ---------------------------------------------------------------------------------------------
# saving


def parse_size(size) -> int:
    """5GB / 500MB / 10KB (powers of 1000, as transformers) or 5GiB (powers of 1024) or an int of bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise CheckpointError(f"max_shard_size {size!r}: expected an int of bytes or a string like '5GB' or '500MB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Greedy, in order: start a new shard when the next tensor would push this one past the limit."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_state_dict(
    state_dict, config: ModelConfig, path, *, max_shard_size="5GB", tokenizer_dir=None, dtype=None,
    manifest: bool = False,
) -> None:
    """Write an HF model directory from a state dict in our parameter names (model.state_dict()).

    dtype None keeps each tensor's dtype. manifest: also write MANIFEST_NAME, the weights'
    fingerprint (write_manifest), so a reader of this directory never has to hash it. The directory is built beside `path` and renamed into
    place, so `path` is never half-written; an existing `path` is replaced only once the new one is complete.
    """
    path = Path(path)
    check_family(config, f"save to {path}")
    limit = parse_size(max_shard_size)
    dtype = parse_dtype(dtype, f"save to {path}") if dtype is not None else None

    expected = expected_shapes(config)
    names = [k for k in state_dict if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in names if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"save to {path}: state dict does not match the config; missing: {missing or 'none'}; "
            f"unexpected: {unexpected or 'none'}"
        )
    tensors = {}
    for name in expected:  # canonical order: embeddings, layer by layer, norm, lm_head
        t = state_dict[name].detach()
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(
                f"save to {path}: tensor {name!r} has shape {list(t.shape)}, expected {list(expected[name])}"
            )
        t = t.to(device="cpu", dtype=dtype or t.dtype).contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger buffer: safetensors refuses shared storage
        hub = hub_names(name, config)
        if isinstance(hub, list):  # a stacked expert tensor: one hub tensor per expert
            tensors.update({n: t[e].clone() for e, n in enumerate(hub)})
        else:
            tensors[hub] = t
    out_dtype = tensors["model.embed_tokens.weight"].dtype

    tok_files = []
    if tokenizer_dir is not None:
        tok_root = Path(tokenizer_dir)
        if not tok_root.is_dir():
            raise CheckpointError(f"tokenizer_dir {tok_root}: not a directory")
        tok_files = [tok_root / n for n in TOKENIZER_FILES if (tok_root / n).is_file()]
        if not tok_files:
            raise CheckpointError(f"tokenizer_dir {tok_root}: none of {TOKENIZER_FILES} found")

    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory; refusing to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise CheckpointError(f"save to {path}: cannot create a directory in {path.parent} ({e})") from e
    # Built as .NAME.tmp-*; a kill leaves it (or .NAME.old-*) behind, never a NAME that looks complete.
    # sdpo.runtime.state removes such leftovers (TEMP_DIR) when a run resumes.
    try:
        shards = _shards(tensors, limit)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        cfg = model_config_to_dict(config, dtype_name(out_dtype))
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        for f in tok_files:
            shutil.copyfile(f, tmp / f.name)
        if manifest:  # inside the directory before its rename: never a complete M_t without it
            write_manifest(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):  # disk full, permissions: name the path, not a traceback
            raise CheckpointError(f"save to {path}: writing {tmp} failed ({e}); nothing was written to {path}") from e
        raise


# --------------------------------------------------------------------------------------
# The weights fingerprint and its manifest
# --------------------------------------------------------------------------------------

# {"sha256": fingerprint, "files": {name: size}}; no times in it, so the same weights write the
# same bytes (a resumed run's directory equals an uninterrupted one's). Staleness is read off
# the mtimes instead: it is written after the weights, so a later rewrite of one makes it older.
MANIFEST_NAME = "sdpo_manifest.json"


def _fingerprinted_files(root: Path) -> list[Path]:
    return sorted(list(root.glob("*.safetensors")) + [root / CONFIG_NAME])


def hash_weights(model_dir) -> str:
    """sha256 over config.json and every safetensors file (names and content, not mtimes)."""
    h = hashlib.sha256()
    for f in _fingerprinted_files(Path(model_dir)):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def write_manifest(model_dir) -> str:
    """Hash the directory's weights once, as they were just written, into MANIFEST_NAME; returns it."""
    root = Path(model_dir)
    fingerprint = hash_weights(root)
    sizes = {f.name: f.stat().st_size for f in _fingerprinted_files(root)}
    tmp = root / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps({"sha256": fingerprint, "files": sizes}, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST_NAME)
    return fingerprint


def read_manifest(model_dir) -> str | None:
    """The manifest's fingerprint while the files are the ones it describes (same names and sizes,
    none modified after it); None when there is none, it is damaged, or the weights changed since."""
    root = Path(model_dir)
    try:
        m = json.loads((root / MANIFEST_NAME).read_text())
        written = (root / MANIFEST_NAME).stat().st_mtime_ns
        stats = {f.name: f.stat() for f in _fingerprinted_files(root)}
        if (m["files"] == {n: st.st_size for n, st in stats.items()} and isinstance(m["sha256"], str)
                and all(st.st_mtime_ns <= written for st in stats.values())):
            return m["sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def files_signature(model_dir) -> dict[str, list[int]]:
    """{file name: [size, mtime_ns]} of config.json and the safetensors files: what a rewrite changes."""
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in _fingerprinted_files(Path(model_dir))}


def save_model(model: Transformer, path, *, max_shard_size="5GB", tokenizer_dir=None, dtype=None) -> None:
    save_state_dict(
        model.state_dict(), model.config, path, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir, dtype=dtype
    )
