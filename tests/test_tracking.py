"""train.report_to = wandb / trackio: the metrics.jsonl rows and the resolved config, read back
from what each tracker wrote locally (wandb's offline run files, trackio's SQLite store)."""

import json
import sqlite3
import struct
import sys
from pathlib import Path

import pytest

import train as train_cli
from sdpo.runtime import tracking

REPO = Path(__file__).resolve().parents[1]


def _forget_trackio():
    for name in [m for m in sys.modules if m == "trackio" or m.startswith("trackio.")]:
        del sys.modules[name]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb offline, trackio's store under tmp_path (TRACKIO_DIR is read when trackio is imported)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    store = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    _forget_trackio()
    yield store
    _forget_trackio()
    import wandb

    wandb.teardown()


# ---------------------------------------------------------------- reading back what the trackers wrote

def wandb_records(path: Path) -> list:
    """The protobuf Records of a .wandb file: a 7-byte header (':W&B', magic, version), then
    32 KiB blocks of chunks, each with a header (CRC32 u32, length u16, type u8: 1 full,
    2 first, 3 middle, 4 last); a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, records, payload = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += block - pos % block
            continue
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def wandb_runs(out: Path) -> list[dict]:
    """Per offline run directory (in order): id, name, project, config and history {step: {name: value}}."""
    import wandb

    wandb.teardown()  # run.finish() returns before wandb's service has written everything; this waits for it
    runs = []
    for d in sorted((out / "wandb").glob("offline-run-*"), key=lambda d: d.stat().st_mtime_ns):
        run = {"history": {}}
        for r in wandb_records(next(d.glob("run-*.wandb"))):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(id=r.run.run_id, name=r.run.display_name, project=r.run.project,
                           config={i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
                run["history"].setdefault(r.history.step.num, {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
        runs.append(run)
    return runs


def trackio_rows(store: Path, project: str) -> tuple[list, list]:
    con = sqlite3.connect(store / f"{project}.db")
    metrics = [(run_id, name, step, json.loads(m)) for run_id, name, step, m in
               con.execute("SELECT run_id, run_name, step, metrics FROM metrics ORDER BY id")]
    configs = [(run_id, json.loads(c)) for run_id, c in con.execute("SELECT run_id, config FROM configs ORDER BY id")]
    con.close()
    return metrics, configs


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step]), step


# ---------------------------------------------------------------- tests

def test_a_killed_and_resumed_run_feeds_one_wandb_and_one_trackio_run_the_metrics_rows(user_model, tmp_path, offline):
    model_dir, data = user_model
    out = tmp_path / "run"
    args = ["--model.path", str(model_dir), "--data.datasets", f"[\"{data}\"]", "--data.max_length=64",
            "--train.global_batch_size=4", "--train.micro_batch_size=2", "--train.max_steps=2",
            "--train.save_every=1", "--train.report_to=[\"wandb\", \"trackio\"]", "--train.run_name=first",
            f"--train.output_dir={out}"]
    assert train_cli.main(args + ["--train.stop_after=1"]) == 3  # killed after step 1 (state saved)
    tracking.close(out)  # what the killed process's exit does (wandb and trackio finish their runs at exit)
    assert train_cli.main(args + ["--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("stage") == "dpo"] == [1, 2]
    assert "gamma_ref/mean" in rows[0] and rows[0]["step"] == 0
    # what each tracker should hold per global step: every numeric field under its metrics.jsonl name
    want: dict[int, dict] = {}
    for r in rows:
        want.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k not in ("step", "time", "stage")
                                               and isinstance(v, (int, float))})
    assert {"loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm", "lr",
            "sdpo_step"} <= set(want[2])

    first, second = wandb_runs(out)  # one offline directory per process, the same W&B run
    assert first["id"] == second["id"] and first["name"] == "first" and first["project"] == "sdpo"
    assert first["config"]["train"]["run_name"] == "first" and first["config"]["loss"]["type"] == "sigmoid"
    assert first["config"]["train"]["output_dir"] == str(out)
    history = {**first["history"], **second["history"]}
    assert sorted(first["history"]) == [0, 1] and sorted(second["history"]) == [2]
    assert_same(history, want)

    metrics, configs = trackio_rows(offline, "sdpo")
    assert {(run_id, name) for run_id, name, _, _ in metrics} == {(metrics[0][0], "first")}  # resumed, one run
    got: dict[int, dict] = {}
    for _, _, step, values in metrics:
        got.setdefault(step, {}).update(values)
    assert_same(got, want)
    assert configs[0][1]["train"]["run_name"] == "first" and configs[0][1]["optim"]["lr"] == pytest.approx(5e-7)


def test_names_steps_and_a_fresh_run_in_the_same_directory(tmp_path, offline):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text('[train]\noutput_dir = "x"\nproject = "mine"\n')
    rows = [{"step": 3, "sdpo_step": 0, "stage": "sft", "epoch": 0, "loss": 2.5, "lr": 1e-3, "time": 1.7e9},
            {"step": 3, "sdpo_step": 1, "gamma_ref/mean": -4.0, "reference": "runs/x/sft", "pairs": 16},
            {"step": 4, "sdpo_step": 1, "stage": "dpo", "loss": 0.69, "rewards/margins": 0.01, "flag": True}]
    for r in rows:
        tracking.log_row(out, ["wandb", "trackio"], r)
    tracking.close(out)
    (run,) = wandb_runs(out)
    assert run["name"] == "run" and run["project"] == "mine"  # train.run_name unset: the directory's name
    # the SFT stage's loss is not the DPO loss: its own name; no wall-clock "time", no strings, no booleans
    assert run["history"] == {3: {"sft/loss": 2.5, "sft/epoch": 0, "sft/lr": 1e-3, "sdpo_step": 1,
                                  "gamma_ref/mean": -4.0, "pairs": 16},
                              4: {"sdpo_step": 1, "loss": 0.69, "rewards/margins": 0.01}}
    metrics, _ = trackio_rows(offline, "mine")
    assert [(step, m) for _, _, step, m in metrics] == [
        (3, {"sft/loss": 2.5, "sft/epoch": 0, "sft/lr": 1e-3, "sdpo_step": 0}),
        (3, {"sdpo_step": 1, "gamma_ref/mean": -4.0, "pairs": 16}),
        (4, {"sdpo_step": 1, "loss": 0.69, "rewards/margins": 0.01})]

    tracking.log_row(out, ["wandb"], rows[2])  # the same config.toml: a resumed run, the same W&B run
    tracking.close(out)
    (out / "config.toml").write_text('[train]\noutput_dir = "x"\n')  # a fresh run rewrites it: a new W&B run
    tracking.log_row(out, ["wandb"], rows[2])
    tracking.close(out)
    ids = [r["id"] for r in wandb_runs(out)]
    assert len(ids) == 3 and ids[0] == ids[1] != ids[2]


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_a_missing_tracker_package_stops_the_start(user_model, tmp_path, monkeypatch, capsys, tracker):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    model_dir, data = user_model
    rc = train_cli.main(["--model.path", str(model_dir), "--data.datasets", f"[\"{data}\"]",
                         f"--train.report_to={tracker}", f"--train.output_dir={tmp_path / 'run'}"])
    assert rc == 2 and f"needs the {tracker} package (pip install {tracker})" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_online_wandb_without_a_login_is_a_start_up_error(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    (problem,) = tracking.missing_packages(["wandb"])
    assert "cannot log in" in problem and "WANDB_MODE=offline" in problem
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.missing_packages(["wandb", "trackio"]) == []


def test_report_to_names_are_checked():
    from sdpo.runtime.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.report_to: unknown \['mlflow'\]"):
        load_config(None, ["--data.datasets=[\"x\"]", "--model.path=m", "--train.report_to=[\"wandb\", \"mlflow\"]"])
    with pytest.raises(ConfigError, match="train.run_name must be a non-empty name"):
        load_config(None, ["--data.datasets=[\"x\"]", "--model.path=m", "--train.run_name= "])


def test_a_stopped_run_closes_its_trackers_and_resume_may_change_them(user_model, tmp_path):
    model_dir, data = user_model
    out = tmp_path / "run"
    args = ["--model.path", str(model_dir), "--data.datasets", f"[\"{data}\"]", "--data.max_length=64",
            "--train.global_batch_size=4", "--train.micro_batch_size=2", "--train.max_steps=2",
            "--train.save_every=1", f"--train.output_dir={out}"]
    assert train_cli.main(args + ["--train.report_to=[\"tensorboard\"]", "--train.stop_after=1"]) == 3
    assert str(out) not in tracking._open  # stopped after step 1: the writer was closed, not left to exit
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert train_cli.main(args + ["--resume"]) == 0  # without the tracker: trackers only watch a run
    assert str(out) not in tracking._open
