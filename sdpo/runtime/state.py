"""The output directory: its preparation, progress, metrics, and the resumable DCP state.

    config.toml       the resolved config
    metrics.jsonl     one JSON line per logging step (+ gamma_ref/mean at each step start)
    sft/              S, when built by the SFT stage
    M1/ .. MT/        the aligned models, HF format; M_t is step t+1's reference
    ref_cache/        reference log-probs, one file per (weights, data, tokenization) key
    state/            resumable state (DCP) of the stage in progress
    progress.json     the stages finished so far
    run.lock          held by the live run's rank 0 (sdpo.runtime.lock): a second run here is refused
    summary.json      the end-of-run table (eval.summary = true)

Every file is written to a temporary name and renamed into place, so a kill leaves
either the old or the new version, plus at most some temporaries. On --resume, rank 0
alone (`recover`) puts every such layout back into one consistent state before anyone
reads it:

    .state.tmp/                    an interrupted save                      -> removed
    state/ without meta.json       an interrupted deletion                  -> removed
    .state.old/ next to state/     killed before the old state was deleted  -> removed
    .state.old/ without state/     killed between the two renames           -> becomes state/
    state/ of a finished stage     killed between progress.json and cleanup -> removed
    .M1.tmp-*/, .M1.old-*/         an interrupted export                    -> removed
    .progress.json.tmp, ...        an interrupted small write               -> removed
    a partial last metrics line    killed inside an append                  -> dropped with the trim

A damaged file (one no kill can produce: truncated by a full disk, edited by hand) stops
--resume with a DamagedRunError naming it and the user's choices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sdpo.models.checkpoint import TEMP_DIR
from sdpo.runtime import distributed as D
from sdpo.runtime import lock, preempt, tracking
from sdpo.runtime.config import ConfigError, config_to_dict, load_config, save_config
from sdpo.runtime.run import Preempted, Run, TrainingError, log

STATE = "state"
PROGRESS = "progress.json"
METRICS = "metrics.jsonl"
# Keys that may change between a run and its --resume without changing the result.
# output_dir: a run directory moved (or copied) elsewhere resumes there.
RESUME_MAY_CHANGE = {("train", "resume"), ("train", "stop_after"), ("train", "log_every"), ("train", "save_every"),
                     ("eval", "summary"), ("eval", "batch_size"), ("train", "ref_batch_size"), ("train", "output_dir"),
                     ("train", "preempt_grace_s"), ("train", "report_to")}  # trackers only watch
# Written to a temporary name and renamed: a kill can leave these.
SMALL_TEMPS = (f".{PROGRESS}.tmp", f".{METRICS}.tmp")


class DamagedRunError(ConfigError):
    """A run directory's file is damaged; the message names it and what the user can do."""


def write_metrics(run: Run, row: dict) -> None:
    if run.info.is_main:
        with _writing(run.out / METRICS), open(run.out / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        tracking.log_row(run.out, run.cfg.train.report_to, row)  # TensorBoard, when asked for


@contextlib.contextmanager
def _writing(path: Path):
    """OSError (disk full, read-only directory) -> TrainingError naming the path."""
    try:
        yield
    except OSError as e:
        raise TrainingError(f"cannot write {path}: {e.strerror or e}") from e


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with _writing(path):
        tmp.write_text(text)
        os.replace(tmp, path)


def _rmtree(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# Progress: the stages finished so far
# --------------------------------------------------------------------------------------

def read_progress(out: Path) -> dict:
    p = out / PROGRESS
    if not p.exists():
        return {"done": [], "global_step": 0}
    try:
        progress = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(out, p, f"not readable as JSON: {e}") from None
    ok = (isinstance(progress, dict) and isinstance(progress.get("done"), list)
          and all(isinstance(x, str) for x in progress["done"])
          and isinstance(progress.get("global_step"), int) and progress["global_step"] >= 0)
    if not ok:
        raise _damaged(out, p, 'expected {"done": [stage names], "global_step": N >= 0}')
    return progress


def write_progress(run: Run, progress: dict) -> None:
    """Record a finished stage. A stage boundary: a preemption signal that came during the stage's
    export stops the run here, with nothing more to save (the ranks agree on one all-reduce)."""
    if run.info.is_main:
        _replace_text(run.out / PROGRESS, json.dumps(progress, indent=1))
        # The finished stage's state is stale now; a kill before this line leaves it for `recover`.
        shutil.rmtree(run.out / STATE, ignore_errors=True)
    D.barrier()
    if D.all_reduce(preempt.flag("cpu")).item() > 0:
        raise Preempted(f"preempted ({preempt.signal_name()}) after {progress['done'][-1]} was saved "
                        f"(global step {progress['global_step']})")


def _damaged(out: Path, file: Path, why: str) -> DamagedRunError:
    if file.parent.name == STATE:
        choice = (f"delete {out / STATE} and --resume again (the stage in progress restarts from its first step; "
                  f"finished stages are kept), or run without --resume to start over")
    else:
        choice = f"run without --resume to start over in {out} (reference log-probs in ref_cache/ are reused)"
    return DamagedRunError(f"--resume: {file} is damaged ({why}).\nYour choices: {choice}.")


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
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.save({"model": model_sd, "optim": optim_sd, "rng": _rng_state()}, checkpoint_id=str(tmp))
    except Exception as e:  # OSError, or DCP's CheckpointException wrapping one per rank
        raise TrainingError(f"cannot write the resumable state to {tmp}: {e}; the previous one in {final} "
                            "is intact") from e
    D.barrier()
    if run.info.is_main:
        with _writing(tmp / "meta.json"):
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: tmp/ is complete once it exists
            # Each instant leaves state/ or .state.old/ complete (see `recover`).
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()


def recover(run: Run) -> None:
    """Rank 0 tidies what a kill left (module docstring); everyone waits for it."""
    if run.info.is_main:
        try:
            _recover(run)
        except DamagedRunError:
            pass  # every rank raises it next, from read_progress / load_state_meta: none waits at a barrier
    D.barrier()


def _recover(run: Run) -> None:
    out = run.out
    final, tmp, old = out / STATE, out / f".{STATE}.tmp", out / f".{STATE}.old"
    for name in SMALL_TEMPS:
        (out / name).unlink(missing_ok=True)
    for q in out.iterdir():
        if TEMP_DIR.fullmatch(q.name):
            log(run, f"resume: removing {q}, left by an interrupted export")
            _rmtree(q)
    if run.cfg.train.ref_cache_dir is None and (out / "ref_cache").is_dir():  # not a shared cache: others' writes
        for q in (out / "ref_cache").glob(".*.tmp*"):
            q.unlink(missing_ok=True)
    _rmtree(tmp)
    if old.exists():
        if not (final / "meta.json").is_file():
            _rmtree(final)
            os.rename(old, final)
        else:
            _rmtree(old)
    meta = final / "meta.json"
    if final.exists() and not meta.is_file():
        # Only an interrupted rmtree leaves this: a save renames a complete .state.tmp into place.
        log(run, f"resume: removing {final}, left half-deleted")
        _rmtree(final)
    elif meta.is_file():
        stage = _read_meta(out).get("stage")
        name = "sft" if stage == ["sft", 0] else f"M{stage[1]}"
        if name in read_progress(out)["done"]:
            log(run, f"resume: removing {final}, the state of the finished stage {name}")
            _rmtree(final)


def _read_meta(out: Path) -> dict:
    file = out / STATE / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(out, file, f"not readable as JSON: {e}") from None
    stage = meta.get("stage") if isinstance(meta, dict) else None
    ok = stage == ["sft", 0] or (isinstance(stage, list) and len(stage) == 2 and stage[0] == "dpo"
                                 and isinstance(stage[1], int) and stage[1] >= 1)
    ok = ok and all(isinstance(meta.get(k), int) and meta[k] >= 0 for k in ("step", "global_step"))
    if not ok:
        raise _damaged(out, file, 'expected {"stage": ["sft", 0] or ["dpo", t], "step": N, "global_step": N}')
    return meta


def load_state_meta(out: Path) -> dict | None:
    """The meta of state/ (None without one), after checking every file DCP will read is there."""
    final = out / STATE
    if not final.exists():
        return None
    if not (final / "meta.json").is_file():
        raise _damaged(out, final / "meta.json", "missing")
    meta = _read_meta(out)
    try:
        md = dcp.FileSystemReader(str(final)).read_metadata()
    except Exception as e:  # missing, truncated or not a DCP .metadata pickle
        raise _damaged(out, final / ".metadata", f"not a readable checkpoint index: {e}") from None
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        f = final / rel
        if not f.is_file():
            raise _damaged(out, f, "missing: the checkpoint index lists it")
        if f.stat().st_size < size:
            raise _damaged(out, f, f"truncated: {f.stat().st_size} bytes, the index needs {size}")
    return meta


def load_state(run: Run, model, optimizer) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "rng": _rng_state()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(state, checkpoint_id=str(run.out / STATE))
    except Exception as e:  # contents that pass load_state_meta's checks but still do not load
        raise _damaged(run.out, run.out / STATE / ".metadata", f"loading the state failed: {e}") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])


# --------------------------------------------------------------------------------------
# Preparing the output directory: a fresh start, or a checked resume
# --------------------------------------------------------------------------------------

def prepare_output(run: Run) -> dict:
    """Lock the directory for this run; then, fresh run: clear our earlier outputs (not the
    reference cache); --resume: check the config matches the saved one, recover from a kill,
    and return the progress so far."""
    _lock(run)
    return _resume(run) if run.cfg.train.resume else _start_over(run)


def _lock(run: Run) -> None:
    """Rank 0 takes run.lock before anything is written or tidied; every rank stops if it could not."""
    problem = None
    if run.info.is_main and (not run.cfg.train.resume or (run.out / "config.toml").is_file()):
        try:
            run.out.mkdir(parents=True, exist_ok=True)
            warning = lock.acquire(run.out)
            if warning:
                log(run, warning)
        except lock.RunDirInUse as e:
            problem = ConfigError(str(e))
        except OSError as e:
            problem = ConfigError(f"train.output_dir: cannot prepare {run.out}: {e}")
    if D.all_reduce(torch.tensor([float(problem is not None)])).item() > 0:
        raise problem or ConfigError(f"train.output_dir: rank 0 could not lock {run.out / lock.LOCK} "
                                     "(its error says why)")


def _resume(run: Run) -> dict:
    cfg, out = run.cfg, run.out
    saved = out / "config.toml"
    if not saved.is_file():
        raise ConfigError(f"--resume: {out} has no config.toml; nothing to resume (run without --resume)")
    try:
        before = config_to_dict(load_config(saved, validate=False))
    except ConfigError as e:
        raise _damaged(out, saved, str(e)) from None
    now = config_to_dict(cfg)
    diffs = [f"{s}.{k}: {before[s][k]!r} -> {now[s][k]!r}" for s in now for k in now[s]
             if (s, k) not in RESUME_MAY_CHANGE and before[s][k] != now[s][k]]
    if diffs:
        raise ConfigError(f"--resume: the config differs from the run in {out}:\n  " + "\n  ".join(diffs))
    recover(run)
    progress = read_progress(out)
    run.resume_state = load_state_meta(out)
    run.global_step = progress["global_step"]
    if run.info.is_main:
        _trim_metrics(out, progress, run.resume_state)
    D.barrier()
    return progress


def _trim_metrics(out: Path, progress: dict, resume_state: dict | None) -> None:
    """Drop the metric lines the resumed run will write again, by the newest consistent record
    (state/ when there is one, else progress.json; `recover` has removed a stale state/)."""
    step = resume_state["global_step"] if resume_state else progress["global_step"]
    # A step's gamma_ref/mean line is written again unless the run resumes inside that step.
    inside = resume_state["stage"][1] if resume_state and resume_state["stage"][0] == "dpo" else None

    def kept(line):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return False  # a kill inside an append leaves a partial last line
        if not isinstance(row, dict):
            return False
        if "gamma_ref/mean" in row and f"M{row.get('sdpo_step')}" not in progress["done"]:
            return row.get("sdpo_step") == inside
        return row.get("step", 0) <= step

    mpath = out / METRICS
    if mpath.is_file():
        text = mpath.read_bytes().decode("utf-8", errors="replace")
        keep = "".join(ln + "\n" for ln in text.splitlines() if kept(ln))
        if keep != text:
            _replace_text(mpath, keep)


def _start_over(run: Run) -> dict:
    cfg, out = run.cfg, run.out
    if run.info.is_main:
        if out.is_dir() and any(p.name != lock.LOCK for p in out.iterdir()):
            log(run, f"note: {out} exists; starting over (pass --resume to continue the run in it)")
        try:
            out.mkdir(parents=True, exist_ok=True)
            for p in [STATE, f".{STATE}.tmp", f".{STATE}.old", PROGRESS, METRICS, "summary.json", "sft", *SMALL_TEMPS]:
                _rmtree(out / p)
            for q in out.iterdir():
                if (q.name.startswith("M") and q.name[1:].isdigit()) or TEMP_DIR.fullmatch(q.name):
                    _rmtree(q)
            save_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=False, stop_after=None)),
                        out / "config.toml")
        except OSError as e:
            raise ConfigError(f"train.output_dir: cannot prepare {out}: {e}") from e
    D.barrier()
    return {"done": [], "global_step": 0}
