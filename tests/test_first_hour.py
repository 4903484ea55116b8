"""A new user's first run: an HF model directory and a prompt/chosen/rejected jsonl, no config file."""

import json
import math
from pathlib import Path

import pytest

import train as train_cli
from sdpo.checkpoint import save_model
from sdpo.config import Config, load_config, non_defaults, parse_args
from sdpo.model import ModelConfig, Transformer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"


@pytest.fixture
def user_model(tmp_path):
    """An HF-format model directory with its own tokenizer files (the demo tokenizer's)."""
    model = Transformer(ModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=256, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0))
    model.init_weights(seed=0)
    save_model(model, tmp_path / "model", tokenizer_dir=REPO / "data" / "tokenizer")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} + 1?\n", "chosen": f"{i + 1}",
                                        "rejected": f"{i + 2}"}) + "\n" for i in range(16)))
    return tmp_path / "model", data


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


def test_help_lists_every_key_with_a_meaning(capsys):
    import dataclasses

    from sdpo.config import _sections, key_help

    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name, cls in _sections().items():
        meanings = key_help(cls)
        for f in dataclasses.fields(cls):
            assert meanings.get(f.name), f"{name}.{f.name} has no comment in sdpo/config.py"
            assert f"{name}.{f.name} = " in text
