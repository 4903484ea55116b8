"""The output directory: recovery from every layout a kill leaves, damaged files named with the
user's choices, unwritable directories and non-finite config values refused before any work."""

import json
import os
import shutil
import types
from pathlib import Path

import pytest

import train as train_cli
from sdpo.runtime import state
from sdpo.runtime.config import ConfigError, load_config
from sdpo.runtime.run import StopRequested, TrainingError
from sdpo.runtime.state import DamagedRunError
from sdpo.stepwise import check_setup, train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"
ARGS = [
    "--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
    "--model.num_attention_heads=2", "--data.max_examples=16", "--data.max_test_examples=16",
    "--sft.max_steps=3", "--sft.global_batch_size=16", "--sft.micro_batch_size=8", "--sft.datasets=[]",
    "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.epochs=1", "--train.log_every=1",
    "--train.save_every=1", "--eval.summary=false",
]


def cfg_for(out, *extra):
    return load_config(TINY, ARGS + [f"--train.output_dir={out}", *extra])


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs use repo-relative data paths


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    """A run stopped one step into sDPO step 1: progress {sft}, state/ at (dpo 1, step 1)."""
    out = tmp_path_factory.mktemp("cut") / "run"
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with pytest.raises(StopRequested):
            train(cfg_for(out, "--train.stop_after=4"))
    finally:
        os.chdir(cwd)
    assert json.loads((out / "state" / "meta.json").read_text()) == {"stage": ["dpo", 1], "step": 1, "global_step": 4}
    return out


@pytest.fixture
def run_dir(cut, tmp_path):
    shutil.copytree(cut, tmp_path / "run")
    return tmp_path / "run"


def resume(out):
    return train(cfg_for(out, "--train.resume=true"))


# --------------------------------------------------------------------------------------
# damaged run directories: the file and the choices, before any model work


def truncate(path: Path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def cut_after(path: Path, text: str):
    data = path.read_text()
    path.write_text(data[: data.index(text) + len(text) + 5])


@pytest.mark.parametrize("damage,file,why", [
    (lambda d: truncate(d / "state" / "meta.json"), "state/meta.json", "not readable as JSON"),
    (lambda d: (d / "state" / "meta.json").write_text('{"stage": "dpo"}'), "state/meta.json", "expected"),
    (lambda d: (d / "state" / "__0_0.distcp").unlink(), "state/__0_0.distcp", "missing: the checkpoint index"),
    (lambda d: truncate(d / "state" / "__0_0.distcp"), "state/__0_0.distcp", "truncated"),
    (lambda d: (d / "state" / ".metadata").unlink(), "state/.metadata", "not a readable checkpoint index"),
    (lambda d: truncate(d / "progress.json"), "progress.json", "not readable as JSON"),
    (lambda d: (d / "progress.json").write_bytes(b"\xff\xfe garbage"), "progress.json", "not readable as JSON"),
    (lambda d: (d / "progress.json").write_text('{"done": "sft"}'), "progress.json", "expected"),
    (lambda d: cut_after(d / "config.toml", "datasets = ["), "config.toml", "invalid TOML"),
])
def test_damaged_run_directory_names_the_file_and_the_choices(run_dir, damage, file, why):
    damage(run_dir)
    with pytest.raises(DamagedRunError) as e:
        resume(run_dir)
    msg = str(e.value)
    assert f"{run_dir / file} is damaged" in msg and why in msg, msg
    assert "Your choices:" in msg and "without --resume to start over" in msg
    if file.startswith("state/"):
        assert f"delete {run_dir / 'state'} and --resume again" in msg


def test_damaged_state_on_the_command_line_then_the_advised_choice_works(run_dir, capsys):
    truncate(run_dir / "state" / "meta.json")
    argv = ["--config", str(TINY), *ARGS, f"--train.output_dir={run_dir}", "--resume"]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:") and "Traceback" not in err and "meta.json is damaged" in err
    shutil.rmtree(run_dir / "state")  # the first choice: the stage in progress restarts
    assert train_cli.main(argv) == 0
    assert (run_dir / "M2" / "model.safetensors").is_file()
    assert json.loads((run_dir / "progress.json").read_text())["done"] == ["sft", "M1", "M2"]


# --------------------------------------------------------------------------------------
# recovery of each layout a kill leaves (rank 0's `recover`), on hand-made directories


def fake_run(out, ref_cache_dir=None):
    info = types.SimpleNamespace(is_main=True, distributed=False)
    return types.SimpleNamespace(out=out, info=info, cfg=types.SimpleNamespace(
        train=types.SimpleNamespace(ref_cache_dir=ref_cache_dir)))


def make_state(d: Path, stage=("dpo", 1), tag="x"):
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"stage": list(stage), "step": 1, "global_step": 4}))
    (d / "tag").write_text(tag)


def test_recover_keeps_the_new_state_and_drops_the_old(tmp_path):
    make_state(tmp_path / "state", tag="new")
    make_state(tmp_path / ".state.old", tag="old")
    state.recover(fake_run(tmp_path))
    assert (tmp_path / "state" / "tag").read_text() == "new" and not (tmp_path / ".state.old").exists()


def test_recover_removes_a_half_deleted_state(tmp_path):
    make_state(tmp_path / "state")
    (tmp_path / "state" / "meta.json").unlink()  # rmtree killed after meta.json, before the rest
    state.recover(fake_run(tmp_path))
    assert not (tmp_path / "state").exists()


def test_recover_between_the_renames_falls_back_to_the_old_state(tmp_path):
    make_state(tmp_path / ".state.old", tag="old")
    make_state(tmp_path / ".state.tmp", tag="tmp")
    state.recover(fake_run(tmp_path))
    assert (tmp_path / "state" / "tag").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


@pytest.mark.parametrize("stage,done,kept", [(("dpo", 1), ["sft", "M1"], False), (("sft", 0), ["sft"], False),
                                             (("dpo", 2), ["sft", "M1"], True)])
def test_recover_removes_the_state_of_a_finished_stage(tmp_path, stage, done, kept):
    make_state(tmp_path / "state", stage=stage)
    (tmp_path / "progress.json").write_text(json.dumps({"done": done, "global_step": 6}))
    state.recover(fake_run(tmp_path))
    assert (tmp_path / "state").exists() == kept


def test_recover_removes_temporaries_and_nothing_else(tmp_path):
    for name in [".M1.tmp-ab_12cd9", ".M2.old-1234abcd", ".sft.tmp-zz", "M1", "notes"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("w")
    for name in [".progress.json.tmp", ".metrics.jsonl.tmp", ".keep"]:
        (tmp_path / name).write_text("")
    (tmp_path / "ref_cache").mkdir()
    (tmp_path / "ref_cache" / ".0123abcd.tmp4242").write_text("")
    (tmp_path / "ref_cache" / "0123abcd.safetensors").write_text("")
    state.recover(fake_run(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "M1", "notes", "ref_cache"]
    assert [p.name for p in (tmp_path / "ref_cache").iterdir()] == ["0123abcd.safetensors"]


def test_recover_leaves_a_shared_reference_cache_alone(tmp_path):
    shared = tmp_path / "shared_cache"
    shared.mkdir()
    (shared / ".k.tmp99").write_text("another run is writing this")
    (tmp_path / "run").mkdir()
    state.recover(fake_run(tmp_path / "run", ref_cache_dir=str(shared)))
    assert (shared / ".k.tmp99").exists()


def test_trim_drops_a_partial_last_line_and_lines_after_the_state(tmp_path):
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 3, "loss": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    state._trim_metrics(tmp_path, {"done": [], "global_step": 0}, {"stage": ["sft", 0], "step": 2, "global_step": 2})
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == lines[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# --------------------------------------------------------------------------------------
# output directories that cannot be written; non-finite config values


def test_output_dir_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=r"train.output_dir: .*afile/run cannot be created: .*afile is a file"):
        check_setup(cfg_for(tmp_path / "afile" / "run"), 1)


def test_unwritable_output_dir_is_refused(tmp_path, monkeypatch):
    # os.access, not chmod: tests run as root here, and root writes into read-only directories
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path)
    with pytest.raises(ConfigError, match=rf"train.output_dir: {tmp_path} is not writable"):
        check_setup(cfg_for(tmp_path / "run"), 1)


def test_a_failing_write_while_preparing_the_output_names_the_path(tmp_path, monkeypatch):
    def denied(cfg, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(state, "save_config", denied)
    with pytest.raises(ConfigError, match=r"cannot prepare .*run: \[Errno 13\] Permission denied: .*config.toml"):
        state.prepare_output(types.SimpleNamespace(cfg=cfg_for(tmp_path / "run"), out=tmp_path / "run",
                                                   info=types.SimpleNamespace(is_main=True, distributed=False)))


def test_a_failing_metrics_write_names_the_path(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()  # any OSError on open: here IsADirectoryError
    with pytest.raises(TrainingError, match=rf"cannot write {tmp_path / 'metrics.jsonl'}"):
        state.write_metrics(fake_run(tmp_path), {"step": 1})


@pytest.mark.parametrize("arg,key", [("--loss.beta=inf", "loss.beta"), ("--optim.lr=nan", "optim.lr"),
                                     ("--optim.max_grad_norm=inf", "optim.max_grad_norm"),
                                     ("--optim.betas=[0.9, nan]", "optim.betas"), ("--sft.lr=-inf", "sft.lr"),
                                     ("--loss.label_smoothing=nan", "loss.label_smoothing")])
def test_non_finite_config_values_are_refused(tmp_path, arg, key):
    with pytest.raises(ConfigError, match=rf"{key} must be finite"):
        cfg_for(tmp_path, arg)


def test_disk_full_during_a_state_save_keeps_the_previous_state(tmp_path, monkeypatch):
    import torch

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    run = fake_run(tmp_path)
    state.save_state(run, model, opt, {"stage": ["sft", 0], "step": 1, "global_step": 1})
    assert state.load_state_meta(tmp_path)["step"] == 1  # the DCP index and its shard check out

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state.dcp, "save", full)
    with pytest.raises(TrainingError, match=r"cannot write the resumable state to .*\.state\.tmp: .*No space left"):
        state.save_state(run, model, opt, {"stage": ["sft", 0], "step": 2, "global_step": 2})
    assert state.load_state_meta(tmp_path)["step"] == 1
