"""The output directory: its preparation, progress, metrics, and the resumable DCP state.

    config.toml       the resolved config
    metrics.jsonl     one JSON line per logging step (+ gamma_ref/mean at each step start)
    sft/              S, when built by the SFT stage
    M1/ .. MT/        the aligned models, HF format; M_t is step t+1's reference
    ref_cache/        reference log-probs, one file per (weights, data, tokenization) key
    state/            resumable state (DCP) of the stage in progress
    progress.json     the stages finished so far
    summary.json      the end-of-run table (eval.summary = true)

Every file is written to a temporary name and renamed into place, so a kill leaves
either the old or the new version.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sdpo import distributed as D
from sdpo.config import ConfigError, config_to_dict, load_config, save_config
from sdpo.run import Run, log

STATE = "state"
PROGRESS = "progress.json"
METRICS = "metrics.jsonl"
# Keys that may change between a run and its --resume without changing the result.
RESUME_MAY_CHANGE = {("train", "resume"), ("train", "stop_after"), ("train", "log_every"), ("train", "save_every"),
                     ("eval", "summary"), ("eval", "batch_size"), ("train", "ref_batch_size")}


def write_metrics(run: Run, row: dict) -> None:
    if run.info.is_main:
        with open(run.out / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------
# Progress: the stages finished so far
# --------------------------------------------------------------------------------------

def read_progress(out: Path) -> dict:
    p = out / PROGRESS
    return json.loads(p.read_text()) if p.is_file() else {"done": [], "global_step": 0}


def write_progress(run: Run, progress: dict) -> None:
    if run.info.is_main:
        tmp = run.out / f".{PROGRESS}.tmp"
        tmp.write_text(json.dumps(progress, indent=1))
        os.replace(tmp, run.out / PROGRESS)
        shutil.rmtree(run.out / STATE, ignore_errors=True)  # the finished stage's state is stale
    D.barrier()


# --------------------------------------------------------------------------------------
# Resumable state (torch.distributed.checkpoint), written atomically
# --------------------------------------------------------------------------------------

def _rng_state() -> dict:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def save_state(run: Run, model, optimizer, meta: dict) -> None:
    final, tmp, old = run.out / STATE, run.out / f".{STATE}.tmp", run.out / f".{STATE}.old"
    if run.info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    D.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.save({"model": model_sd, "optim": optim_sd, "rng": _rng_state()}, checkpoint_id=str(tmp))
    D.barrier()
    if run.info.is_main:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        # A kill between these renames leaves .state.old, which load_state_meta falls back to.
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    D.barrier()


def load_state_meta(out: Path) -> dict | None:
    final, old = out / STATE, out / f".{STATE}.old"
    if not (final / "meta.json").is_file() and (old / "meta.json").is_file():
        os.rename(old, final)
    if (final / "meta.json").is_file():
        return json.loads((final / "meta.json").read_text())
    return None


def load_state(run: Run, model, optimizer) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "rng": _rng_state()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, checkpoint_id=str(run.out / STATE))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])


# --------------------------------------------------------------------------------------
# Preparing the output directory: a fresh start, or a checked resume
# --------------------------------------------------------------------------------------

def prepare_output(run: Run) -> dict:
    """Fresh run: clear our earlier outputs (not the reference cache). --resume: check the
    config matches the saved one and return the progress so far."""
    return _resume(run) if run.cfg.train.resume else _start_over(run)


def _resume(run: Run) -> dict:
    cfg, out = run.cfg, run.out
    saved = out / "config.toml"
    if not saved.is_file():
        raise ConfigError(f"--resume: {out} has no config.toml; nothing to resume")
    before, now = config_to_dict(load_config(saved, validate=False)), config_to_dict(cfg)
    diffs = [f"{s}.{k}: {before[s][k]!r} -> {now[s][k]!r}" for s in now for k in now[s]
             if (s, k) not in RESUME_MAY_CHANGE and before[s][k] != now[s][k]]
    if diffs:
        raise ConfigError(f"--resume: the config differs from the run in {out}:\n  " + "\n  ".join(diffs))
    progress = read_progress(out)
    run.resume_state = load_state_meta(out)
    run.global_step = progress["global_step"]
    if run.info.is_main:
        _trim_metrics(out, progress, run.resume_state)
    return progress


def _trim_metrics(out: Path, progress: dict, resume_state: dict | None) -> None:
    """Drop the metric lines the resumed run will write again."""
    step = resume_state["global_step"] if resume_state else progress["global_step"]
    # A step's gamma_ref/mean line is written again unless the run resumes inside that step.
    inside = resume_state["stage"][1] if resume_state and resume_state["stage"][0] == "dpo" else None

    def kept(row):
        if "gamma_ref/mean" in row and f"M{row['sdpo_step']}" not in progress["done"]:
            return row["sdpo_step"] == inside
        return row.get("step", 0) <= step

    mpath = out / METRICS
    if mpath.is_file():
        keep = [ln for ln in mpath.read_text().splitlines() if kept(json.loads(ln))]
        mpath.write_text("".join(ln + "\n" for ln in keep))


def _start_over(run: Run) -> dict:
    cfg, out = run.cfg, run.out
    if run.info.is_main:
        if out.is_dir() and any(out.iterdir()):
            log(run, f"note: {out} exists; starting over (pass --resume to continue the run in it)")
        for p in [STATE, f".{STATE}.tmp", f".{STATE}.old", PROGRESS, METRICS, "summary.json", "sft"]:
            q = out / p
            shutil.rmtree(q, ignore_errors=True) if q.is_dir() else q.unlink(missing_ok=True)
        for q in out.glob("M[0-9]*"):
            shutil.rmtree(q, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        save_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=False, stop_after=None)),
                    out / "config.toml")
    D.barrier()
    return {"done": [], "global_step": 0}
