"""The faults of a cluster on 2 torchrun ranks (gloo), through tests/fault_launcher.py:

- a SIGTERM to one rank stops both after the same optimizer step, each exits 75, and --resume
  ends bit-identical to an uninterrupted 2-rank run; so does a SIGTERM to torchrun, which forwards it;
- one rank SIGKILLed mid-step: the other exits on its own within seconds, --resume ends bit-identical;
- a state saved on 2 ranks resumes on 1 process (DCP reshards), close to a 1-process run;
- a damaged 2-rank run directory (a truncated or missing DCP shard, a damaged safetensors header,
  a shard index naming a missing file) stops --resume on both ranks with exit 2 and the file's name.

Each attempt is a torchrun of a few seconds' training; the module takes a few minutes (slow).
"""

import json
import re
import shutil

import pytest
from safetensors.torch import load_file

from test_faults import PREEMPTED, check_same, job, launch, tree

pytestmark = pytest.mark.slow

# The test_faults run on 2 ranks: each rank's share of a step is one micro-batch, so the k-th
# micro-batch of a rank is global step k (SFT 1-3, sDPO step 1: 4-5, sDPO step 2: 6-7).
MID_STEP = lambda k, rank, **kw: {"call": "to_device", "nth": k, "rank": rank, **kw}  # noqa: E731


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    jobs = {
        "full2": job(tmp / "full2", nproc=2),
        "full1": job(tmp / "full1"),
        # SIGTERM to rank 1 only, in global step 4: rank 0 learns it from the step's all-reduce
        "preempt2": job(tmp / "preempt2", [MID_STEP(4, 1, signal="SIGTERM")], nproc=2),
        # SIGTERM to torchrun (Kubernetes' way, or scancel's), which forwards it to both ranks
        "torchrun_sigterm": job(tmp / "torchrun_sigterm", [MID_STEP(4, 1, signal="SIGTERM", to="torchrun")], nproc=2),
        # rank 1 SIGKILLed before its forward of global step 5, while rank 0 is inside that step
        "kill2": job(tmp / "kill2", [MID_STEP(5, 1)], nproc=2),
        # saved on 2 ranks at global step 4, resumed on 1 process
        "reshard": job(tmp / "reshard", [MID_STEP(4, 0, signal="SIGUSR1")], nproc=[2, 1]),
        # a 2-rank state in sDPO step 2 (M1 exported), left for the damage tests: no --resume
        "cut": job(tmp / "cut", [MID_STEP(6, 0, signal="SIGTERM")], nproc=2, max_attempts=1),
    }
    results = launch(tmp, list(jobs.values()), timeout=1800, parallel=1)
    return tmp, dict(zip(jobs, results))


def test_uninterrupted_runs(runs):
    _, r = runs
    assert r["full2"]["attempts"] == [0] and r["full2"]["ranks"] == [[0, 0]], r["full2"]["log"]
    assert r["full1"]["attempts"] == [0], r["full1"]["log"]


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(runs):
    tmp, r = runs
    p = r["preempt2"]
    assert p["ranks"][0] == [PREEMPTED, PREEMPTED], p["log"]
    assert p["after"][0] == {"state": {"stage": ["dpo", 1], "step": 1, "global_step": 4}, "last_step": 4}, p["log"]
    for rank in (0, 1):  # each rank says where it stopped
        assert f"[rank {rank}] sDPO step 1/2: preempted" in p["log"]
    assert "after optimizer step 1/2 (global step 4)" in p["log"]
    assert "preempted (a signal to another rank)" in p["log"]  # rank 0 was never signalled
    assert max(p["exited"][0]) - p["fired"][0][0]["t"] < 25  # train.preempt_grace_s
    check_same(tmp / "full2", tmp / "preempt2", p, first=PREEMPTED)


def test_sigterm_to_torchrun_reaches_every_rank_and_they_stop_together(runs):
    tmp, r = runs
    p = r["torchrun_sigterm"]
    assert p["ranks"][0] == [PREEMPTED, PREEMPTED], p["log"]
    # the step depends on when torchrun forwarded it (or a stage boundary, state/ then gone): one for both ranks
    after = p["after"][0]
    state = after["state"]
    assert after["last_step"] >= 4 and (state is None or state["global_step"] == after["last_step"]), p["log"]
    assert "[rank 0] SIGTERM: stopping" in p["log"] and "[rank 1] SIGTERM: stopping" in p["log"]
    check_same(tmp / "full2", tmp / "torchrun_sigterm", p, first=PREEMPTED)


def test_one_rank_killed_mid_step_the_other_exits_and_resume_is_bit_identical(runs):
    tmp, r = runs
    k = r["kill2"]
    killed_at, (rank0_exit, _) = k["fired"][0][0]["t"], k["exited"][0]
    assert k["ranks"][0][0] not in (None, 0), k["log"]  # rank 0 ended on its own, with an error
    assert rank0_exit - killed_at < 10, k["log"]
    check_same(tmp / "full2", tmp / "kill2", k)


def test_a_state_saved_on_two_ranks_resumes_on_one(runs):
    tmp, r = runs
    s = r["reshard"]
    assert s["attempts"] == [PREEMPTED, 0] and s["ranks"][0] == [PREEMPTED, PREEMPTED], s["log"]
    assert s["after"][0]["state"] == {"stage": ["dpo", 1], "step": 1, "global_step": 4}
    worst = 0.0
    for d in ("sft", "M1", "M2"):
        a, b = load_file(tmp / "full1" / d / "model.safetensors"), load_file(tmp / "reshard" / d / "model.safetensors")
        assert a.keys() == b.keys()
        worst = max(worst, *((a[n].double() - b[n].double()).abs().max().item() for n in a))
    # measured 2.3e-7, as far as an uninterrupted 2-rank run is from 1 process (the gradient is summed in
    # another order); the bound leaves room for other CPUs' float32 rounding
    assert worst < 1e-5, worst


def damage_truncate_shard(d):
    f = d / "state" / "__1_0.distcp"
    f.write_bytes(f.read_bytes()[:100])
    return "state/__1_0.distcp is damaged (truncated", 2


def damage_missing_shard(d):
    (d / "state" / "__1_0.distcp").unlink()
    return "state/__1_0.distcp is damaged (missing: the checkpoint index lists it)", 2


def damage_safetensors_header(d):
    f = d / "M1" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    return "M1/model.safetensors: cannot read safetensors file", 2


def damage_index_names_a_missing_shard(d):
    """M1 as two safetensors shards and an index, then one shard gone."""
    m1 = d / "M1"
    tensors = load_file(m1 / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    from safetensors.torch import save_file

    for f, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, m1 / f, metadata={"format": "pt"})
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (m1 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    (m1 / "model.safetensors").unlink()
    (m1 / "model-00002-of-00002.safetensors").unlink()
    return "model-00002-of-00002.safetensors", 2


DAMAGES = [damage_truncate_shard, damage_missing_shard, damage_safetensors_header, damage_index_names_a_missing_shard]


def test_a_damaged_two_rank_run_directory_stops_both_ranks_with_the_file_named(runs, tmp_path):
    tmp, r = runs
    assert r["cut"]["ranks"] == [[PREEMPTED, PREEMPTED]], r["cut"]["log"]
    assert r["cut"]["after"][0]["state"] == {"stage": ["dpo", 2], "step": 1, "global_step": 6}
    expect, jobs = [], []
    for damage in DAMAGES:
        d = tmp_path / damage.__name__
        shutil.copytree(tmp / "cut", d)
        expect.append(damage(d))
        jobs.append(job(d, nproc=2, resume=True, max_attempts=1, timeout=300))
    results = launch(tmp_path, jobs, timeout=1800, parallel=1)
    bad = []
    for damage, (text, code), res in zip(DAMAGES, expect, results):
        # torchrun prints its own traceback (ChildFailedError) after any failure; the ranks print none
        worker_traceback = re.search(r'File "[^"]*(/sdpo/|/train\.py|fault_launcher\.py)', res["log"])
        if res["ranks"] != [[code, code]] or text not in res["log"] or worker_traceback:
            bad.append(f"{damage.__name__}: exit codes {res['ranks']}, expected [{code}, {code}] and {text!r}:\n"
                       f"{res['log'][-1500:]}")
    assert not bad, "\n\n".join(bad)


def test_torchrun_attempts_leave_no_temporaries(runs):
    tmp, _ = runs
    for name in ("preempt2", "torchrun_sigterm", "kill2", "reshard"):
        assert not [str(p) for p in (tmp / name).rglob(".*")], name
        assert tree(tmp / "full2" / "M2").keys() == tree(tmp / name / "M2").keys()
