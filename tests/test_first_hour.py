"""A new user's first run: an HF model directory and a prompt/chosen/rejected jsonl, no config file."""

import json
import math
from pathlib import Path

import pytest

import train as train_cli
from sdpo.runtime.config import Config, load_config, non_defaults, parse_args

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"


def test_model_path_without_config_takes_the_recipe_defaults_not_the_demo(user_model):
    model_dir, data = user_model
    cfg = parse_args(["--model.path", str(model_dir), f"--data.datasets=[\"{data}\"]"], default_config=TINY)
    demo = load_config(TINY)
    assert demo.sft.enabled and demo.model.tokenizer == "data/tokenizer" and demo.data.test_datasets
    assert not cfg.sft.enabled and cfg.model.tokenizer is None and cfg.data.test_datasets == []
    assert cfg.model.chat_template is None  # the tokenizer's own template
    assert (cfg.optim, cfg.loss, cfg.train.global_batch_size) == (Config().optim, Config().loss, 32)
    assert non_defaults(cfg) == [f"model.path = {str(model_dir)!r}", f"data.datasets = {[str(data)]!r}"]
    # an explicit --config still wins, and no arguments still mean the tiny demo
    assert parse_args(["--config", str(TINY), "--model.path", str(model_dir)], default_config=TINY).sft.enabled
    assert parse_args([], default_config=TINY) == demo


def test_max_length_alone_is_valid():
    cfg = load_config(None, ["--data.datasets=[\"x\"]", "--model.path=m", "--data.max_length=512"])
    assert cfg.data.max_prompt_length is None and cfg.data.prompt_length == 256


def test_plain_dpo_on_an_hf_directory_and_a_jsonl(user_model, tmp_path, capsys, monkeypatch):
    """The README's two-line command: no config, no chat template for plain strings."""
    model_dir, data = user_model
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    rc = train_cli.main(["--model.path", str(model_dir), "--data.datasets", f"[\"{data}\"]",
                         "--model.chat_template=none", "--data.max_length=64", "--train.global_batch_size=4",
                         "--train.micro_batch_size=2", "--train.max_steps=2", "--optim.lr=1e-3",
                         f"--train.output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "config (keys that differ from the defaults): model.path" in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dpo = [r for r in rows if r.get("stage") == "dpo"]
    assert len(dpo) == 2 and dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (out / "M1" / "config.json").is_file() and not (out / "sft").exists()
    # "none" on the command line is the template's name (plain concatenation), not an unset key
    assert load_config(out / "config.toml").model.chat_template == "none"
    assert "model.chat_template = 'none'" in err


def test_help_lists_every_key_with_a_meaning(capsys):
    import dataclasses

    from sdpo.runtime.config import _sections, key_help

    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name, cls in _sections().items():
        meanings = key_help(cls)
        for f in dataclasses.fields(cls):
            assert meanings.get(f.name), f"{name}.{f.name} has no comment in sdpo/runtime/config.py"
            assert f"{name}.{f.name} = " in text


def test_metrics_rows_carry_time_and_tokens_and_heldout_eval_matches_a_direct_scoring(tmp_path, monkeypatch):
    """eval.every: TRL-named held-out rows every k optimizer steps and at each step's end; the last
    one of step 1 is M1 scored against S on the held-out pairs, recomputed here independently."""
    import time

    import torch

    from sdpo.data.packing import collate
    from sdpo.data.pairs import tokenize_pairs
    from sdpo.data.read import read_preferences
    from sdpo.data.tokenizer import load_tokenizer
    from sdpo.logprobs import concatenated_forward
    from sdpo.loss import preference_loss
    from sdpo.models.checkpoint import load_model
    from sdpo.stepwise import train

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    t0 = time.time()
    cfg = load_config(TINY, [
        "--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
        "--model.num_attention_heads=2", "--data.max_examples=32", "--data.max_test_examples=24",
        "--sft.max_steps=4", "--sft.global_batch_size=16", "--sft.micro_batch_size=8",
        "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.epochs=1", "--train.log_every=1",
        "--eval.summary=false", "--eval.every=2", "--optim.lr=1e-2", "--loss.rpo_alpha=none",
        f"--train.output_dir={out}"])
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dpo = [r for r in rows if r.get("stage") == "dpo"]
    for r in dpo:
        assert r["tokens"] > 0 and r["step_time_s"] > 0 and t0 - 1 <= r["time"] <= time.time() and r["elapsed_s"] > 0
    assert [r["elapsed_s"] for r in dpo] == sorted(r["elapsed_s"] for r in dpo)
    held = [r for r in rows if r.get("stage") == "eval"]
    per_step = len([r for r in dpo if r["sdpo_step"] == 1])  # 32 pairs / 8 = 4 optimizer steps
    assert per_step == 4 and [(r["sdpo_step"], r["step"] - r0) for r, r0 in zip(held, [4, 4, 8, 8])] == [
        (1, 2), (1, 4), (2, 2), (2, 4)]
    # The last held-out row of step 1 = M1 against S on D1's test pairs, scored here by hand.
    tok = load_tokenizer(REPO / "data" / "tokenizer")
    examples = read_preferences(cfg.data.test_datasets[0])[0][:24]
    pairs, _ = tokenize_pairs(examples, tok, max_length=cfg.data.max_length, max_prompt_length=cfg.data.prompt_length)

    def logps(model_dir):
        model = load_model(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            c, r = concatenated_forward(model, collate(pairs, pad_id=tok.pad_id))
        return c.logps, r.logps

    (pc, pr), (rc, rr) = logps(out / "M1"), logps(out / "sft")
    losses, cr, rjr = preference_loss(pc, pr, rc, rr, beta=cfg.loss.beta)
    last = held[1]
    assert last["eval_loss"] == pytest.approx(losses.mean().item(), rel=1e-4, abs=1e-5)
    assert last["eval_rewards/accuracies"] == pytest.approx((cr > rjr).double().mean().item(), abs=1e-9)
    assert last["eval_rewards/margins"] == pytest.approx((cr - rjr).mean().item(), rel=1e-4, abs=1e-5)


def test_report_to_tensorboard_missing_package_is_a_clear_error(user_model, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    model_dir, data = user_model
    rc = train_cli.main(["--model.path", str(model_dir), "--data.datasets", f"[\"{data}\"]",
                         "--train.report_to=tensorboard", f"--train.output_dir={tmp_path / 'run'}"])
    assert rc == 2 and "needs the tensorboard package (pip install tensorboard)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_report_to_tensorboard_writes_the_metric_rows(user_model, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional; this checks the files it writes")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_dir, data = user_model
    out = tmp_path / "run"
    assert train_cli.main(["--model.path", str(model_dir), "--data.datasets", f"[\"{data}\"]", "--data.max_length=64",
                           "--train.global_batch_size=4", "--train.micro_batch_size=2", "--train.max_steps=2",
                           "--train.report_to=tensorboard", f"--train.output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("dpo/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in rows if r.get("stage") == "dpo"]
    assert "reference/gamma_ref/mean" in acc.Tags()["scalars"]
