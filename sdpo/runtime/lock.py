"""One run per output directory: rank 0 holds an exclusive lock on OUT/run.lock while its run lives.

The lock is the kernel's (a POSIX record lock, fcntl.lockf), released when the process ends
however it ends: a SIGKILLed run leaves the file but no lock, so the next run or --resume takes
it at once; nothing to clean up, nothing stale. The file names its holder (pid, host, start,
command) for the refusal message. Across nodes this relies on the shared filesystem
implementing POSIX locks for all its clients: NFSv4 (or NFSv3 with lockd), Lustre mounted with
`-o flock` (`localflock` locks per node only), GPFS / Storage Scale, BeeGFS with global file
locks. A filesystem that refuses locks (ENOLCK, EOPNOTSUPP) gets a warning and an unlocked run.

POSIX locks belong to the process and are dropped when it closes *any* descriptor of the file,
so this module opens the file once and keeps it open; a process holds one run's lock at a time
(a second `acquire` releases the first: in-process callers run one training after another).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

LOCK = "run.lock"

_held: tuple[Path, int] | None = None   # (the locked directory, resolved; the open descriptor)


class RunDirInUse(Exception):
    """Another live process holds the output directory's lock; the message names it."""


def acquire(out: Path) -> str | None:
    """Lock `out` (an existing directory) for this process; None, or a warning when the
    filesystem cannot lock. RunDirInUse when a live process holds it; OSError from the open."""
    global _held
    key = Path(out).resolve()
    if _held is not None and _held[0] == key:
        return None
    release()
    fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip() if e.errno in (
            errno.EACCES, errno.EAGAIN) else None
        os.close(fd)
        if holder is None:
            return (f"warning: cannot lock {key / LOCK} ({e.strerror or e}): a second run into {out} "
                    "would not be refused")
        raise RunDirInUse(
            f"train.output_dir: {out} is in use by a live run ({holder or 'its holder did not say who it is'}). "
            "Two runs in one directory overwrite each other's files: wait for it to end or stop it, "
            "or choose another train.output_dir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()}, started "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {' '.join(sys.argv)[:500]}\n").encode(), 0)
    _held = (key, fd)
    return None


def release() -> None:
    """Drop the lock this process holds, if any (the file stays: removing it would race a waiter)."""
    global _held
    if _held is not None:
        os.close(_held[1])
        _held = None
