"""Optional experiment trackers, fed the same rows as metrics.jsonl (train.report_to).

metrics.jsonl stays the record of a run; a tracker is a view of it. state.write_metrics calls
`log_row` on rank 0 only, after the row is in metrics.jsonl. Each tracker's package is imported
only when it is asked for, and each works with no network:

- tensorboard: <output_dir>/tensorboard/, scalars tagged '<stage>/<name>' (dpo/loss, eval/eval_loss, ...).
- wandb: one W&B run per training run, its files under <output_dir>/wandb/ (or $WANDB_DIR).
  WANDB_MODE=offline writes them with no network; `wandb sync <output_dir>/wandb/offline-run-*` uploads.
- trackio: one trackio run in trackio's local store ($TRACKIO_DIR, by default
  ~/.cache/huggingface/trackio; `trackio show --project sdpo` opens the dashboard).

wandb and trackio get every numeric field of a row under its metrics.jsonl name (loss,
rewards/margins, eval_loss, gamma_ref/mean, sdpo_step, ...; the SFT stage's fields under 'sft/',
so that the DPO curves hold DPO values only) at the global optimizer step, and the resolved config
(<output_dir>/config.toml) once, when the tracker run starts. One tracker run covers every sDPO
step (`sdpo_step` tells them apart). A --resume continues the same tracker run: its id is kept in
<output_dir>/trackers.json with the config.toml it belongs to, and a fresh run, which rewrites
config.toml, starts a new tracker run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tomllib
import uuid
from pathlib import Path

TRACKERS = ("tensorboard", "wandb", "trackio")
IDENTITY = "trackers.json"
_NOT_SCALARS = {"step", "sdpo_step", "epoch", "time", "pairs"}  # TensorBoard's tags
_open: dict[str, dict[str, object]] = {}  # output dir -> tracker -> its writer or run


def missing_packages(report_to: list[str]) -> list[str]:
    """One message per tracker in report_to that cannot start (checked before any model work)."""
    problems = []
    for name in TRACKERS:
        if name in report_to and importlib.util.find_spec(name) is None:
            problems.append(f"train.report_to = [{name!r}] needs the {name} package (pip install {name}), "
                            f"or drop it from train.report_to")
    if "wandb" in report_to and not problems and _wandb_online():
        problem = _wandb_login_problem()
        if problem:
            problems.append(f"train.report_to = ['wandb']: W&B is online (WANDB_MODE unset or 'online') but "
                            f"cannot log in: {problem}. Run `wandb login` or set WANDB_API_KEY; or set "
                            f"WANDB_MODE=offline to write the run under <output_dir>/wandb/ with no network "
                            f"(`wandb sync` uploads it later)")
    return problems


def log_row(out: Path, report_to: list[str], row: dict) -> None:
    """Feed one metrics.jsonl row to every tracker in report_to; the first row starts them."""
    if not report_to:
        return
    trackers = _open.get(str(out))
    if trackers is None:
        trackers = _open[str(out)] = _start(Path(out), report_to)
    step = int(row.get("step", 0))
    if "tensorboard" in trackers:
        writer, stage = trackers["tensorboard"], row.get("stage", "reference")
        for name, value in row.items():
            if name not in _NOT_SCALARS and _is_number(value):
                writer.add_scalar(f"{stage}/{name}", value, global_step=step)
        writer.flush()
    fields = tracker_fields(row)
    if "wandb" in trackers:
        trackers["wandb"].log(fields, step=step)
    if "trackio" in trackers:
        trackers["trackio"].log(fields, step=step)


def close(out: Path, failed: bool = False) -> None:
    """Flush and finish the trackers of a run directory (the end of train.py's run, however it ended;
    failed: an error or a preemption stopped it, which W&B records as a non-zero exit code)."""
    for name, tracker in _open.pop(str(out), {}).items():
        if name == "tensorboard":
            tracker.close()
        elif name == "wandb":
            tracker.finish(exit_code=1 if failed else 0)
        else:
            tracker.finish()
        if name == "trackio":  # else trackio's exit hook finishes it again, printing after everything else
            try:
                from trackio import context_vars

                if context_vars.current_run.get() is tracker:
                    context_vars.current_run.set(None)
            except (ImportError, AttributeError):
                pass


def tracker_fields(row: dict) -> dict[str, float]:
    """A metrics row as wandb / trackio fields: its numeric values under their metrics.jsonl names
    (the SFT stage's under 'sft/'); 'step' is the tracker's own step and 'time' its own clock."""
    prefix = "sft/" if row.get("stage") == "sft" else ""
    return {(name if name == "sdpo_step" else prefix + name): value for name, value in row.items()
            if name not in ("step", "time") and _is_number(value)}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------- starting the trackers

def _start(out: Path, report_to: list[str]) -> dict[str, object]:
    config = _resolved_config(out)
    train = config.get("train", {})
    name = train.get("run_name") or out.resolve().name
    project = train.get("project")
    run_id, resumed = _identity(out) if {"wandb", "trackio"} & set(report_to) else (None, False)
    trackers: dict[str, object] = {}
    if "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter

        trackers["tensorboard"] = SummaryWriter(log_dir=str(out / "tensorboard"))
    if "wandb" in report_to:
        import wandb

        kwargs = {"dir": str(out)} if not os.environ.get("WANDB_DIR") else {}
        try:
            trackers["wandb"] = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "sdpo",
                                           name=name, id=run_id, resume="allow", config=config, **kwargs)
        except Exception as e:  # wandb.errors.UsageError / CommError: no login, no network, ...
            # an OSError, which train.py reports as a one-line error (this module imports no sdpo error class:
            # config_checks imports it)
            raise ConnectionError(f"train.report_to: wandb.init failed: {e}. With no network, set "
                               f"WANDB_MODE=offline (the run is written under {out}/wandb/)") from e
    if "trackio" in report_to:
        import trackio

        # auto_log_*: no system-metric threads; the tracker shows what metrics.jsonl holds
        trackers["trackio"] = trackio.init(project=project or "sdpo", name=name, config=config,
                                           resume="allow" if resumed else "never", embed=False,
                                           auto_log_cpu=False, auto_log_gpu=False)
    return trackers


def _resolved_config(out: Path) -> dict:
    """The run's config.toml as a nested dict ({} when there is none, e.g. log_row called directly)."""
    path = out / "config.toml"
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _identity(out: Path) -> tuple[str, bool]:
    """(tracker run id, resumed). config.toml is written once per fresh run and left alone by
    --resume, so its modification time tells a resumed run from a new one in the same directory."""
    path, config = out / IDENTITY, out / "config.toml"
    stamp = config.stat().st_mtime_ns if config.exists() else None
    try:
        saved = json.loads(path.read_text())
        if stamp is not None and saved.get("config_mtime_ns") == stamp and isinstance(saved.get("id"), str):
            return saved["id"], True
    except (OSError, ValueError, AttributeError):
        pass
    run_id = uuid.uuid4().hex[:8]  # W&B's own ids are 8 lowercase letters and digits
    tmp = path.with_name(f".{IDENTITY}.tmp")
    tmp.write_text(json.dumps({"id": run_id, "config_mtime_ns": stamp}) + "\n")
    os.replace(tmp, path)
    return run_id, False


def _wandb_online() -> bool:
    return os.environ.get("WANDB_MODE", "online").lower() not in ("offline", "dryrun", "disabled") \
        and os.environ.get("WANDB_DISABLED", "").lower() not in ("true", "1", "yes")


def _wandb_login_problem() -> str | None:
    """W&B's own credential lookup (env, .netrc, settings), without contacting the server."""
    import wandb

    try:
        try:
            ok = wandb.login(verify=False, prompt=False)
        except TypeError:  # a wandb without login(prompt=...)
            ok = wandb.login(verify=False)
    except Exception as e:  # wandb.errors.UsageError: "No API key configured"
        return str(e) or type(e).__name__
    return None if ok else "no API key configured"
