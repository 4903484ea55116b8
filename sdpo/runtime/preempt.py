"""Preemption: SIGTERM or SIGUSR1 ends the run at the end of an optimizer step, its state saved.

SLURM and Kubernetes end a job with SIGTERM (or SIGUSR1, `sbatch --signal=USR1@T`) and, a grace
period later, SIGKILL. The handler only records the signal. The training loop (sdpo.loop) reads
the record once per optimizer step, summed over ranks inside the step's own all-reduce of its
statistics, so every rank stops after the same step without a sync of its own; it then saves the
resumable state and the metrics of that step and raises `Preempted` (exit code PREEMPTED).
A stage boundary (sdpo.runtime.state.write_progress) checks too: a signal that arrives during
an export stops the run once M_t is recorded, with nothing more to save.

Later signals are noted and ignored, so a second SIGTERM (torchrun forwards the one SLURM also
sends to the workers) never interrupts the save. A process still alive `grace_s` after the first
signal (the step or the save too long for the grace, a reference pass in progress, a peer gone)
exits at once with 128 + the signal's number, as the signal's default action would: the save
in progress, if any, is abandoned as a kill would leave it, and --resume continues from the
last complete one.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; the same command plus --resume continues
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_first: int | None = None        # the first signal's number
_grace_s = 0.0
_timer: threading.Timer | None = None
_previous: dict = {}             # the handlers `install` replaced


def install(grace_s: float) -> None:
    """Catch SIGTERM and SIGUSR1 in this process (the main thread only can) until `uninstall`."""
    global _grace_s
    if threading.current_thread() is not threading.main_thread():
        return
    uninstall()
    _grace_s = grace_s
    for s in SIGNALS:
        _previous[s] = signal.signal(s, _handler)


def uninstall() -> None:
    global _first, _timer
    if _timer is not None:
        _timer.cancel()
    for s, h in _previous.items():
        signal.signal(s, h)
    _previous.clear()
    _first, _timer = None, None


def requested() -> bool:
    return _first is not None


def flag(device) -> torch.Tensor:
    """[1.] once this process got a signal, else [0.]: summed over ranks, > 0 means stop.
    Filled on the device (torch.tensor([x], device=cuda) would copy from the host and sync)."""
    return torch.ones(1, device=device) if _first is not None else torch.zeros(1, device=device)


def signal_name() -> str:
    return signal.Signals(_first).name if _first is not None else "a signal to another rank"


def _say(msg: str) -> None:
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    os.write(2, f"sdpo: {rank}{msg}\n".encode())  # no buffered stream: this may run between any two bytecodes


def _handler(signum, frame) -> None:
    global _first, _timer
    name = signal.Signals(signum).name
    if _first is not None:
        _say(f"{name} again: already stopping after this optimizer step; the save is not interrupted")
        return
    _first = signum
    _say(f"{name}: stopping after this optimizer step with its state saved "
         f"(train.preempt_grace_s = {_grace_s:g} s)")
    _timer = threading.Timer(_grace_s, _expire, args=(signum, time.monotonic()))
    _timer.daemon = True
    _timer.start()


def _expire(signum: int, since: float) -> None:
    _say(f"{signal.Signals(signum).name} came {time.monotonic() - since:.0f} s ago (train.preempt_grace_s) and no "
         f"save at a step end has finished: exiting without one; --resume continues from the last save")
    os._exit(128 + signum)
