"""Kill `train.main` at a file event, then `--resume` it until it finishes (tests/test_faults.py).

    python tests/fault_launcher.py PLAN.json RESULTS.json

PLAN is {"cwd": the directory the runs start in, "jobs": [...]}, a job being
{"argv": [...], "out": DIR, "kills": [spec or null, one per attempt], "record": bool}.
Attempt 1 runs argv, later attempts argv + --resume, until one exits 0 (at most len(kills) + 2).
Each attempt is a fork of this process, which imported torch and sdpo once and never computes,
so an attempt costs its training only; an audit hook (sys.addaudithook) in the child watches the
file events under DIR and ends the child with os._exit(137), as SIGKILL would (no cleanup runs):

    spec {"match": REGEX, "nth": k, "when": "before" | "after"}   the k-th event whose description matches
    spec {"index": i, "when": ...}                                the i-th event under DIR (0-based)

"after" performs the operation itself first (the rename, the rmtree, the open that truncates),
so the kill lands between it and the next line of the trainer. An event's description is
"KIND PATH[ -> PATH]" relative to DIR, with the random parts of temporary names starred:
"rename .state.tmp -> state", "open-w .M1.tmp-*/config.json", "replace ref_cache/.K.tmp* -> ref_cache/K.safetensors".
RESULTS: per job {"attempts": [exit codes], "events": [descriptions of attempt 1] if record, "log": stderr tail}.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KILLED = 137
STAR = [(re.compile(r"\.tmp-[0-9a-zA-Z_]+"), ".tmp-*"), (re.compile(r"\.old-[0-9a-f]+"), ".old-*"),
        (re.compile(r"\.tmp\d+"), ".tmp*"), (re.compile(r"\b[0-9a-f]{24}\b"), "K")]


def describe(event: str, args: tuple, out: str):
    """(description, kind, paths) of a file event under `out`, else None."""
    if event == "open":
        path, mode, flags = args
        if not isinstance(path, (str, bytes, os.PathLike)):
            return None
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        if not writes:
            return None
        kind, paths = "open-w", [path]
    elif event in ("os.rename", "os.replace"):
        kind, paths = event[3:], list(args[:2])
    elif event in ("shutil.rmtree", "os.remove", "os.mkdir", "os.rmdir"):
        kind, paths = event.split(".")[1], [args[0]]
    else:
        return None
    paths = [os.path.abspath(os.fsdecode(p)) for p in paths]
    if not any(p == out or p.startswith(out + os.sep) for p in paths):
        return None
    rel = [os.path.relpath(p, out) for p in paths]
    text = f"{kind} " + " -> ".join(rel)
    for pattern, repl in STAR:
        text = pattern.sub(repl, text)
    return text, kind, paths, args


def perform(kind: str, paths: list[str], args: tuple) -> None:
    try:
        if kind == "rename":
            os.rename(*paths)
        elif kind == "replace":
            os.replace(*paths)
        elif kind == "rmtree":
            shutil.rmtree(paths[0], ignore_errors=True)
        elif kind == "remove":
            os.remove(paths[0])
        elif kind == "rmdir":
            os.rmdir(paths[0])
        elif kind == "mkdir":
            os.mkdir(paths[0])
        elif kind == "open-w":
            mode, flags = args[1], args[2]
            if isinstance(mode, str):
                open(paths[0], mode.replace("r+", "a")).close()  # "w" truncates: the file is there, empty
            else:
                os.close(os.open(paths[0], flags, 0o644))
    except OSError:
        pass  # the trainer would have failed here too; the kill still lands


def child(argv: list[str], out: str, spec: dict | None, record: bool, events_file: str, log_file: str) -> None:
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    events, busy = [], [False]

    def hook(event, args):
        if busy[0] or (spec is None and not record):
            return
        busy[0] = True
        try:
            d = describe(event, args, out)
            if d is None:
                return
            text, kind, paths, raw = d
            events.append(text)
            if spec is None:
                return
            if "index" in spec:
                hit = len(events) - 1 == spec["index"]
            else:
                hit = re.search(spec["match"], text) is not None and \
                    sum(re.search(spec["match"], e) is not None for e in events) == spec.get("nth", 1)
            if hit:
                if spec.get("when", "before") == "after":
                    perform(kind, paths, raw)
                print(f"fault_launcher: killed {spec.get('when', 'before')} event {len(events) - 1}: {text}",
                      file=sys.stderr, flush=True)
                os._exit(KILLED)
        finally:
            busy[0] = False

    sys.addaudithook(hook)
    import torch

    torch.set_num_threads(1)
    import train

    rc = 1
    try:
        rc = train.main(argv)
    except BaseException as e:  # a raw traceback reaching the user: the test reports it
        import traceback

        traceback.print_exc()
        rc = 99 if not isinstance(e, SystemExit) else (e.code or 0)
    finally:
        if record:
            with open(events_file, "w") as f:
                json.dump(events, f)
        sys.stderr.flush()
        os._exit(rc)


def run_job(job: dict, n: int, work: Path) -> dict:
    out = os.path.abspath(job["out"])
    kills = job.get("kills", [])
    log_file = str(work / f"job{n}.log")
    events_file = str(work / f"job{n}.events.json")
    codes = []
    for attempt in range(len(kills) + 2):
        argv = job["argv"] + (["--resume"] if attempt else [])
        spec = kills[attempt] if attempt < len(kills) else None
        pid = os.fork()
        if pid == 0:
            child(argv, out, spec, job.get("record", False) and attempt == 0, events_file, log_file)
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
        if codes[-1] not in (0, KILLED):
            break  # an error, not a kill: report it
        if codes[-1] == 0:
            break
    result = {"attempts": codes, "log": Path(log_file).read_text()[-4000:] if os.path.exists(log_file) else ""}
    if job.get("record"):
        result["events"] = json.loads(Path(events_file).read_text())
    return result


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    work = Path(sys.argv[2]).parent
    os.chdir(plan["cwd"])  # the config's relative data paths resolve here
    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401  imported once here; each forked attempt starts with it loaded

    import sdpo.stepwise  # noqa: F401
    import train  # noqa: F401

    gc.freeze()  # the children's gc.collect() (sdpo.runtime.run.free_memory) skips all of the above
    results = [run_job(job, n, work) for n, job in enumerate(plan["jobs"])]
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
