"""sdpo.runtime.preempt on its own: the first SIGTERM / SIGUSR1 is recorded (the flag the ranks sum),
later ones are ignored, and a process still alive train.preempt_grace_s after the first signal
exits with 128 + its number. The trainer's use of it (save at the step, exit 75, --resume bit-identical)
is in test_faults.py, on 2 ranks in test_cluster_faults.py."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sdpo.runtime import preempt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def installed():
    preempt.install(600.0)
    yield
    preempt.uninstall()


def test_the_first_signal_sets_the_flag_and_later_ones_are_ignored(installed, capfd):
    assert not preempt.requested() and torch.equal(preempt.flag("cpu"), torch.tensor([0.0]))
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.01)  # the handler runs between two bytecodes of the main thread
    assert preempt.requested() and torch.equal(preempt.flag("cpu"), torch.tensor([1.0]))
    assert preempt.signal_name() == "SIGUSR1"
    os.kill(os.getpid(), signal.SIGTERM)  # the default action would end pytest here
    time.sleep(0.01)
    assert preempt.signal_name() == "SIGUSR1"
    err = capfd.readouterr().err
    assert "SIGUSR1: stopping after this optimizer step" in err and "SIGTERM again: already stopping" in err


def test_uninstall_restores_the_handlers_and_clears_the_flag():
    before = signal.getsignal(signal.SIGTERM)
    preempt.install(600.0)
    assert signal.getsignal(signal.SIGTERM) is not before
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    preempt.uninstall()  # also cancels the grace timer, which would end pytest in 600 s
    assert signal.getsignal(signal.SIGTERM) is before and not preempt.requested()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_process_not_out_within_the_grace_exits_with_128_plus_the_signal(sig):
    # a process busy elsewhere (a long reference pass) when the signal comes: no step end, no save
    code = textwrap.dedent(f"""
        import os, signal, time
        from sdpo.runtime import preempt
        preempt.install(1.0)
        os.kill(os.getpid(), signal.{sig})
        time.sleep(60)
    """)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    # the import of torch comes before the signal, so the time is bounded by more than the grace
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr
    assert time.monotonic() - t0 < 50
    assert re.search(rf"{sig} came \d+ s ago \(train.preempt_grace_s\)", proc.stderr), proc.stderr
    assert "--resume continues from the last save" in proc.stderr
