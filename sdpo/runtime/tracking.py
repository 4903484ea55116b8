"""Optional experiment trackers, fed the same rows as metrics.jsonl (train.report_to).

Only TensorBoard for now, through torch.utils.tensorboard (needs the optional `tensorboard`
package). metrics.jsonl stays the record of a run; a tracker is a view of it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

TRACKERS = ("tensorboard",)
_NOT_SCALARS = {"step", "sdpo_step", "epoch", "time", "pairs"}
_writers: dict[str, object] = {}


def missing_packages(report_to: list[str]) -> list[str]:
    """One message per tracker in report_to whose package is not installed."""
    problems = []
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:
        problems.append("train.report_to = ['tensorboard'] needs the tensorboard package "
                        "(pip install tensorboard), or drop it from train.report_to")
    return problems


def log_row(out: Path, report_to: list[str], row: dict) -> None:
    """Numeric fields as scalars tagged '<stage>/<name>' (dpo/loss, eval/eval_loss, ...) at the global step."""
    if "tensorboard" not in report_to:
        return
    key = str(out)
    if key not in _writers:
        from torch.utils.tensorboard import SummaryWriter

        _writers[key] = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))
    writer, stage = _writers[key], row.get("stage", "reference")
    for name, value in row.items():
        if name not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(f"{stage}/{name}", value, global_step=row.get("step", 0))
    writer.flush()


def close(out: Path) -> None:
    writer = _writers.pop(str(out), None)
    if writer is not None:
        writer.close()
