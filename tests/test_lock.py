"""One run per output directory (sdpo.runtime.lock): a live run's directory is refused with its name
and the holder's pid, before anything in it is written or tidied; a SIGKILLed holder leaves no
stale lock. (--resume after a SIGKILL: every scenario of test_faults.py kills a run holding it.)"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import train as train_cli
from sdpo.runtime import lock

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run's lock, as a live run's rank 0 does."""
    out = tmp_path / "run"
    out.mkdir()
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from sdpo.runtime import lock
        lock.acquire(Path({str(out)!r}))
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    lock.release()


def test_a_held_directory_is_refused_naming_it_and_the_holder(holder):
    out, proc = holder
    with pytest.raises(lock.RunDirInUse) as e:
        lock.acquire(out)
    assert f"{out} is in use by a live run (pid {proc.pid} on " in str(e.value)
    assert "choose another train.output_dir" in str(e.value)


def test_a_sigkilled_holder_leaves_no_stale_lock(holder):
    out, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / lock.LOCK).is_file()  # the file stays; the kernel dropped the lock with the process
    assert lock.acquire(out) is None
    assert f"pid {os.getpid()} on " in (out / lock.LOCK).read_text()


def test_train_into_a_live_runs_directory_exits_2_before_writing(holder, capsys, monkeypatch):
    out, proc = holder
    monkeypatch.chdir(REPO)
    argv = ["--config", str(TINY), "--data.max_examples=16", "--sft.max_steps=1", f"--train.output_dir={out}"]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: train.output_dir: {out} is in use by a live run (pid {proc.pid} on " in err
    assert sorted(p.name for p in out.iterdir()) == [lock.LOCK]  # no config.toml: nothing written
    # --resume is refused too, before its recovery could remove the live run's temporaries
    (out / "config.toml").write_text("# the live run's\n")
    (out / ".state.tmp").mkdir()
    assert train_cli.main(argv + ["--resume"]) == 2
    assert "is in use by a live run" in capsys.readouterr().err and (out / ".state.tmp").is_dir()
