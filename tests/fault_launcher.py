"""Kill or signal `train.main` at a file event or a micro-batch, then `--resume` it until it finishes
(tests/test_faults.py, tests/test_cluster_faults.py).

    python tests/fault_launcher.py PLAN.json RESULTS.json

PLAN is {"cwd": the directory the runs start in, "jobs": [...]}, a job being
{"argv": [...], "out": DIR, "kills": [specs, one entry per attempt], "record": bool, "nproc": N or [N per attempt],
"max_attempts": n, "resume": bool}, and optionally "parallel": P, the number of jobs run at once (default 1). Attempt 1 runs argv (+ --resume if "resume"), later attempts argv + --resume,
until one exits 0 (at most max_attempts, default len(kills) + 2);
an attempt that ends otherwise than killed (137) or preempted (75) is reported, not retried.
An attempt with nproc 1 (the default) is a fork of this process, which imported torch and sdpo once
and never computes, so it costs its training only; with nproc N > 1 it is
`torchrun --nproc_per_node N` of this file in worker mode (gloo), each rank running train.main.
Hooks in the child (an audit hook, sys.addaudithook, for file events under DIR; a wrapper of
sdpo.loop.to_device for micro-batches) act on the attempt's specs (a spec, a list of specs, or null):

    {"match": REGEX, "nth": k, "when": "before" | "after"}   the k-th file event whose description matches
    {"index": i, "when": ...}                                the i-th file event under DIR (0-based)
    {"call": "to_device", "nth": k}                          the k-th micro-batch moved to the device: mid-step
    + "signal": "SIGTERM" | "SIGUSR1"    send it to this process and go on (default: os._exit(137), as SIGKILL)
    + "rank": r                          the rank it applies to (default 0)
    + "to": "torchrun"                   send the signal to the rank's parent, torchrun, which forwards it

"after" performs the operation itself first (the rename, the rmtree, the open that truncates),
so the kill lands between it and the next line of the trainer. An event's description is
"KIND PATH[ -> PATH]" relative to DIR, with the random parts of temporary names starred:
"rename .state.tmp -> state", "open-w .M1.tmp-*/config.json", "replace ref_cache/.K.tmp* -> ref_cache/K.safetensors".
RESULTS: per job {"attempts": [exit codes], "ranks": [[exit code per rank] or null per attempt],
"fired": [[{"rank", "what", "t"}] per attempt], "exited": [[time.time() of each rank's exit] per attempt],
"after": [{"state": state/meta.json or null, "last_step": the last metrics line's step} per attempt],
"events": [descriptions of attempt 1] if record, "log": stderr tail}.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KILLED = 137
PREEMPTED = 75  # sdpo.runtime.preempt.PREEMPTED, not imported: the parent imports it before forking anyway
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


def child(argv: list[str], out: str, specs: list[dict], rank: int, files: dict) -> None:
    """Run train.main once with the hooks of `specs` (this rank's), then os._exit with its code."""
    fd = os.open(files["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    specs = [sp for sp in specs if sp.get("rank", 0) == rank]
    events, busy, calls = [], [False], [0]

    def fire(sp, text):
        what = sp.get("signal", "kill")
        with open(files["fired"], "a") as f:
            f.write(json.dumps({"rank": rank, "what": what, "at": text, "t": time.time()}) + "\n")
        print(f"fault_launcher: rank {rank}: {what} at {text}", file=sys.stderr, flush=True)
        if what == "kill":
            os._exit(KILLED)
        os.kill(os.getppid() if sp.get("to") == "torchrun" else os.getpid(), getattr(signal, what))

    def hook(event, args):
        if busy[0] or not (files["record"] or any("call" not in sp for sp in specs)):
            return
        busy[0] = True
        try:
            d = describe(event, args, out)
            if d is None:
                return
            text, kind, paths, raw = d
            events.append(text)
            for sp in specs:
                if "call" in sp:
                    continue
                if "index" in sp:
                    hit = len(events) - 1 == sp["index"]
                else:
                    hit = re.search(sp["match"], text) is not None and \
                        sum(re.search(sp["match"], e) is not None for e in events) == sp.get("nth", 1)
                if hit:
                    if sp.get("when", "before") == "after":
                        perform(kind, paths, raw)
                    fire(sp, f"{sp.get('when', 'before')} event {len(events) - 1}: {text}")
        finally:
            busy[0] = False

    sys.addaudithook(hook)
    import torch

    torch.set_num_threads(1)
    import sdpo.loop
    import train

    if any("call" in sp for sp in specs):
        real = sdpo.loop.to_device

        def to_device(batch, device):
            calls[0] += 1
            for sp in specs:
                if sp.get("call") == "to_device" and sp.get("nth", 1) == calls[0]:
                    fire(sp, f"micro-batch {calls[0]}")
            return real(batch, device)

        sdpo.loop.to_device = to_device

    # torchrun SIGTERMs the other ranks once one fails; train.main's own handler (sdpo.runtime.preempt)
    # hands this one back when it returns, so a rank that ended on its own still reports how.
    signal.signal(signal.SIGTERM, lambda *_: None)
    rc, ended = 1, None
    try:
        rc = train.main(argv)
    except BaseException as e:  # a raw traceback reaching the user: the test reports it
        ended = time.time()
        import traceback

        traceback.print_exc()
        rc = 99 if not isinstance(e, SystemExit) else (e.code or 0)
    finally:
        ended = ended or time.time()
        if files["record"]:
            with open(files["events"], "w") as f:
                json.dump(events, f)
        with open(f"{files['exit']}.{rank}", "w") as f:
            json.dump({"rc": rc, "t": ended}, f)
        sys.stderr.flush()
        os._exit(rc)


def attempt_code(ranks: list, fired: list) -> int:
    if any(f["what"] == "kill" for f in fired) or KILLED in ranks:
        return KILLED
    if len(set(ranks)) == 1:
        return ranks[0]
    return max(ranks)  # ranks that disagree: the test reports them


def run_job(job: dict, n: int, work: Path, cwd: str) -> dict:
    out = os.path.abspath(job["out"])
    kills = job.get("kills", [])
    nproc = job.get("nproc", 1)
    result = {"attempts": [], "ranks": [], "fired": [], "exited": [], "after": []}
    for attempt in range(job.get("max_attempts", len(kills) + 2)):
        argv = job["argv"] + (["--resume"] if attempt or job.get("resume") else [])
        spec = kills[attempt] if attempt < len(kills) else None
        specs = [] if spec is None else spec if isinstance(spec, list) else [spec]
        n_ranks = nproc[min(attempt, len(nproc) - 1)] if isinstance(nproc, list) else nproc
        files = {k: str(work / f"job{n}.{k}") for k in ("log", "events", "fired")}
        files.update(record=job.get("record", False) and attempt == 0, exit=str(work / f"job{n}.a{attempt}.exit"))
        Path(files["fired"]).unlink(missing_ok=True)
        if n_ranks == 1:
            pid = os.fork()
            if pid == 0:
                child(argv, out, specs, 0, files)
            os.waitpid(pid, 0)
        else:
            plan = json.dumps({"argv": argv, "out": out, "specs": specs, "files": files})
            with open(files["log"], "a") as log:
                # torchrun's own rc says little (1 for any failure): each rank writes its own code
                proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", str(n_ranks), __file__, "--worker", plan],
                                        cwd=cwd, stdout=log, stderr=log, start_new_session=True,
                                        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
                try:
                    proc.wait(timeout=job.get("timeout", 600))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks: a hang is reported, not waited on
                    proc.wait()
                    print(f"fault_launcher: attempt {attempt + 1} timed out", file=log, flush=True)
        exits = []
        for r in range(n_ranks):
            p = Path(f"{files['exit']}.{r}")
            exits.append(json.loads(p.read_text()) if p.exists() else {"rc": None, "t": None})
        fired = [json.loads(line) for line in Path(files["fired"]).read_text().splitlines()] \
            if os.path.exists(files["fired"]) else []
        ranks = [e["rc"] for e in exits]
        result["ranks"].append(ranks)
        result["fired"].append(fired)
        result["exited"].append([e["t"] for e in exits])
        result["attempts"].append(attempt_code(ranks, fired))
        meta, mpath = Path(out) / "state" / "meta.json", Path(out) / "metrics.jsonl"
        rows = [json.loads(line) for line in mpath.read_text().splitlines() if line.strip()] if mpath.exists() else []
        steps = [r["step"] for r in rows if "step" in r and "gamma_ref/mean" not in r]
        result["after"].append({"state": json.loads(meta.read_text()) if meta.is_file() else None,
                                "last_step": steps[-1] if steps else None})
        if result["attempts"][-1] not in (KILLED, PREEMPTED):
            break  # done (0), or an error: report it
    log_file = work / f"job{n}.log"
    result["log"] = log_file.read_text()[-12000:] if log_file.exists() else ""
    if job.get("record"):
        result["events"] = json.loads(Path(work / f"job{n}.events").read_text())
    return result


def worker() -> None:
    """One torchrun rank of an attempt (run_job): the plan is argv[2]."""
    plan = json.loads(sys.argv[2])
    sys.path.insert(0, str(REPO))
    child(plan["argv"], plan["out"], plan["specs"], int(os.environ["RANK"]), plan["files"])


def main() -> None:
    if sys.argv[1] == "--worker":
        return worker()
    plan = json.loads(Path(sys.argv[1]).read_text())
    work = Path(sys.argv[2]).parent
    os.chdir(plan["cwd"])  # the config's relative data paths resolve here
    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401  imported once here; each forked attempt starts with it loaded

    import sdpo.stepwise  # noqa: F401
    import train  # noqa: F401

    gc.freeze()  # the children's gc.collect() (sdpo.runtime.run.free_memory) skips all of the above
    jobs, parallel = plan["jobs"], max(1, min(plan.get("parallel", 1), len(plan["jobs"])))
    if parallel == 1:
        results = [run_job(job, n, work, plan["cwd"]) for n, job in enumerate(jobs)]
    else:
        # `parallel` forked runners take the jobs in order, each claiming the next unclaimed one (an
        # O_EXCL file), and write each result to its own file. Jobs share nothing but the inputs, read only.
        runners = []
        for _ in range(parallel):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    for n, job in enumerate(jobs):
                        try:
                            os.close(os.open(work / f"job{n}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                        except FileExistsError:
                            continue
                        (work / f"job{n}.result").write_text(json.dumps(run_job(job, n, work, plan["cwd"])))
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                os._exit(code)
            runners.append(pid)
        if any(os.waitpid(pid, 0)[1] for pid in runners):
            sys.exit("fault_launcher: a runner failed (its traceback is above)")
        results = [json.loads((work / f"job{n}.result").read_text()) for n in range(len(jobs))]
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
