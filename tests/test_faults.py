"""Kill or preempt the trainer at file events and micro-batches (tests/fault_launcher.py), --resume
until done, and compare with an uninterrupted run: the same bytes in sft/, M1/, M2/, the same metrics
lines, nothing left over.

The default run covers the three kill points issue 11 found broken and one or more of every kind
of write the trainer makes (state save, export, progress, reference cache, metrics, and the
resumed run's own recovery and trim), and preemption (SIGTERM / SIGUSR1: exit 75 with the state
saved at the step, a second signal during the save, the last step of a stage, an export);
test_every_kill_point (slow) kills at every event of the run. Several ranks: test_cluster_faults.py.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo.loop import MACHINE_DEPENDENT

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = Path(__file__).with_name("fault_launcher.py")
KILLED = 137
PREEMPTED = 75

# ~10K parameters, 16 pairs per sDPO step; SFT 3 steps, 2 per sDPO step, a state save after every
# step but a stage's last: 97 file events in all (the events are listed by the launcher's record).
ARGS = [
    "--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
    "--model.num_attention_heads=2", "--data.max_examples=16", "--data.max_test_examples=16",
    "--sft.max_steps=3", "--sft.global_batch_size=16", "--sft.micro_batch_size=8",
    "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.epochs=1", "--train.log_every=1",
    "--train.save_every=1", "--eval.summary=false", "--sft.datasets=[]",
]


def kill(match, nth=1, when="before"):
    return {"match": match, "nth": nth, "when": when}


def signal_at(sig, nth=None, match=None, when="before"):
    """`sig` at the nth micro-batch (mid-step: SFT steps have 2, sDPO steps 2), or at the nth matching file event."""
    if match is None:
        return {"call": "to_device", "nth": nth, "signal": sig}
    return {"match": match, "nth": nth or 1, "when": when, "signal": sig}


# name -> the kill of each attempt (attempt 1 runs fresh, later ones --resume)
SCENARIOS = {
    # issue 11's defects
    "after_state_rename_before_old_deleted": [kill(r"^rename \.state\.tmp -> state$", 2, "after")],
    "export_weights_written_config_not": [kill(r"^open-w \.M1\.tmp-\*/config\.json$")],
    "progress_records_M1_state_not_removed": [kill(r"^rename \.progress\.json\.tmp -> progress\.json$", 2, "after")],
    # the other writes
    "between_the_state_renames": [kill(r"^rename state -> \.state\.old$", 1, "after")],
    "dcp_shard_empty": [kill(r"^open-w \.state\.tmp/__0_0\.distcp$", 2, "after")],
    "state_meta_empty": [kill(r"^open-w \.state\.tmp/meta\.json$", 3, "after")],
    "sft_export_started": [kill(r"^mkdir \.sft\.tmp-\*$", 1, "after")],
    "M1_exported_progress_not": [kill(r"^rename \.M1\.tmp-\* -> M1$", 1, "after")],
    "finished_state_half_deleted": [kill(r"^rmdir state$", 2)],  # found by the sweep
    "progress_tmp_empty": [kill(r"^open-w \.progress\.json\.tmp$", 1, "after")],
    "reference_cache_written_not_renamed": [kill(r"^rename ref_cache/\.K\.tmp\* -> ", 2)],
    "metrics_line_of_a_saved_step": [kill(r"^open-w metrics\.jsonl$", 5)],
    # killed again inside --resume's own recovery and trim
    "killed_in_recovery_rename": [kill(r"^rename state -> \.state\.old$", 1, "after"),
                                  kill(r"^rename \.state\.old -> state$", 1)],
    "killed_in_recovery_rmtree": [kill(r"^rename \.state\.tmp -> state$", 2, "after"),
                                  kill(r"^rmtree \.state\.old$", 1)],
    "killed_in_metrics_trim": [kill(r"^rmtree \.state\.tmp$", 2),
                               kill(r"^open-w \.metrics\.jsonl\.tmp$", 1, "after")],
}
# name -> (the signals of attempt 1 (then --resume), the state/meta.json and last metrics step it leaves)
PREEMPTIONS = {
    # mid-step: the first micro-batch of global step 4 (sDPO step 1's first); the state is saved after it
    "SIGTERM_mid_step": ([signal_at("SIGTERM", 7)], ({"stage": ["dpo", 1], "step": 1, "global_step": 4}, 4)),
    # SIGUSR1 in SFT step 1, then SIGUSR1 again while that step's state is being written: no harm
    "SIGUSR1_again_during_the_save": ([signal_at("SIGUSR1", 2),
                                       signal_at("SIGUSR1", 1, r"^open-w \.state\.tmp/__0_0\.distcp$", "after")],
                                      ({"stage": ["sft", 0], "step": 1, "global_step": 1}, 1)),
    # in a stage's last step: its state is saved at step == total, the export is left to --resume
    "SIGTERM_in_the_last_step_of_SFT": ([signal_at("SIGTERM", 6)],
                                        ({"stage": ["sft", 0], "step": 3, "global_step": 3}, 3)),
    # during M1's export: the run stops once progress.json records M1, with no state/ to save
    "SIGTERM_during_an_export": ([signal_at("SIGTERM", 1, r"^mkdir \.M1\.tmp-\*$", "after")], (None, 5)),
}
EXPECTED_TOP = {"config.toml", "metrics.jsonl", "progress.json", "ref_cache", "sft", "M1", "M2", "run.lock"}


def launch(tmp_path, jobs, timeout=900, parallel=2):
    # The runs read a private copy of the config and data: every run of a comparison sees the same bytes.
    cwd = tmp_path / "inputs"
    if not cwd.exists():
        shutil.copytree(REPO / "data", cwd / "data", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        shutil.copy(REPO / "configs" / "tiny.toml", cwd / "tiny.toml")
    plan, results = tmp_path / "plan.json", tmp_path / "results.json"
    # single-threaded runs, two at a time: the 2-core CI machine's cores both busy
    plan.write_text(json.dumps({"cwd": str(cwd), "jobs": jobs, "parallel": parallel}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(LAUNCHER), str(plan), str(results)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results.read_text())


def job(out, kills=(), record=False, extra=(), **kw):
    return {"argv": ["--config", "tiny.toml", *ARGS, f"--train.output_dir={out}", *extra], "out": str(out),
            "kills": list(kills), "record": record, **kw}


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        for k in MACHINE_DEPENDENT:
            r.pop(k, None)
        if "reference" in r:
            r["reference"] = os.path.relpath(r["reference"], out)
    return rows


def tree(root: Path) -> dict:
    # A manifest may record file mtimes, which differ between any two runs; the weights it describes do not.
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "manifest" not in p.name}


def check_same(full: Path, out: Path, result: dict, first=KILLED) -> None:
    codes = result["attempts"]
    assert codes[0] == first, f"the kill point was not reached: {codes}\n{result['log']}"
    assert codes[-1] == 0 and all(c in (KILLED, PREEMPTED) for c in codes[:-1]), f"{codes}\n{result['log']}"
    assert {p.name for p in out.iterdir()} == EXPECTED_TOP  # no state/, .state.old, .M1.tmp-*, ...
    leftovers = [str(p) for p in out.rglob(".*")]
    assert not leftovers, leftovers
    for d in ("sft", "M1", "M2"):
        a, b = tree(full / d), tree(out / d)
        assert a.keys() == b.keys(), d
        for name in a:
            assert a[name] == b[name], f"{d}/{name} differs from the uninterrupted run's"
    assert sorted(p.name for p in (out / "ref_cache").iterdir()) == sorted(p.name for p in (full / "ref_cache").iterdir())
    assert json.loads((out / "progress.json").read_text()) == json.loads((full / "progress.json").read_text())
    assert metrics(out) == metrics(full)  # none missing, none twice


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launcher: the uninterrupted run (its events recorded), then every scenario."""
    tmp = tmp_path_factory.mktemp("faults")
    names = list(SCENARIOS)
    # the preempted runs save only when preempted (the full run saves every step: the same weights)
    jobs = [job(tmp / n, SCENARIOS[n]) for n in names] + \
        [job(tmp / n, [sigs], extra=["--train.save_every=none"]) for n, (sigs, _) in PREEMPTIONS.items()]
    results = launch(tmp, [job(tmp / "full", record=True)] + jobs)
    return tmp, results[0], dict(zip(names + list(PREEMPTIONS), results[1:]))


def test_uninterrupted_run_and_its_events(runs):
    tmp, full, _ = runs
    assert full["attempts"] == [0], full["log"]
    events = full["events"]
    # every selector above names an event the run really makes, as often as it asks
    import re

    for name, kills in SCENARIOS.items():
        k = kills[0]
        assert sum(re.search(k["match"], e) is not None for e in events) >= k["nth"], name
    for name, (sigs, _) in PREEMPTIONS.items():
        for k in sigs:
            assert "match" not in k or sum(re.search(k["match"], e) is not None for e in events) >= k["nth"], name
    assert sum(e.startswith("rename .state.tmp -> state") for e in events) == 4  # SFT 2, sDPO 1 + 1


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_killed_and_resumed_equals_uninterrupted(runs, name):
    tmp, _, results = runs
    check_same(tmp / "full", tmp / name, results[name])


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "after"])
def test_every_kill_point(tmp_path, when):
    """Every event from config.toml's rename on (killed before it, the directory holds nothing
    to resume: --resume says so). SDPO_FAULT_STRIDE=k tries every k-th event only."""
    full = launch(tmp_path, [job(tmp_path / "full", record=True)])[0]
    events = full["events"]
    first = events.index("rename .config.toml.tmp* -> config.toml") + (when == "before")
    points = list(range(first, len(events), int(os.environ.get("SDPO_FAULT_STRIDE", "1"))))
    results = launch(tmp_path, [job(tmp_path / f"k{i}", [{"index": i, "when": when}]) for i in points],
                     timeout=3600)
    bad = []
    for i, r in zip(points, results):
        try:
            check_same(tmp_path / "full", tmp_path / f"k{i}", r)
        except AssertionError as e:
            bad.append(f"kill {when} event {i} ({events[i]}): {str(e)[:300]}")
    assert not bad, f"{len(bad)} of {len(points)} kill points:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", list(PREEMPTIONS))
def test_preempted_saves_at_the_step_exits_75_and_resumes_bit_identical(runs, name):
    tmp, _, results = runs
    r = results[name]
    state, last_step = PREEMPTIONS[name][1]
    assert r["attempts"] == [PREEMPTED, 0], f"{r['attempts']}\n{r['log']}"
    # what the preempted attempt left: the state and the metrics line of the step it stopped after
    assert r["after"][0] == {"state": state, "last_step": last_step}, r["log"]
    signalled, exited = r["fired"][0][0]["t"], r["exited"][0][0]
    assert 0 < exited - signalled < 25  # train.preempt_grace_s (default 25 s)
    assert "continue with the same command plus --resume" in r["log"]
    if len(PREEMPTIONS[name][0]) > 1:
        assert "SIGUSR1 again: already stopping" in r["log"]
    check_same(tmp / "full", tmp / name, r, first=PREEMPTED)
