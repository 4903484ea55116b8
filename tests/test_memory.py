"""Memory: finished models and optimizers are freed before the next stage (weakrefs), the
activation_checkpointing key, and the memory plan (sdpo.memory) against measured peaks."""

import gc
import weakref
from pathlib import Path

import pytest
import torch

from sdpo import loop, reference, stepwise
from sdpo.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"
SMALL = [
    "--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
    "--model.num_attention_heads=2", "--data.max_examples=16", "--data.max_test_examples=16",
    "--sft.max_steps=2", "--sft.global_batch_size=8", "--sft.micro_batch_size=8",
    "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.epochs=1", "--train.max_steps=2",
    "--eval.summary=false",
]


def test_finished_models_and_optimizers_are_freed_before_the_next_stage(tmp_path, monkeypatch):
    """SFT, then 2 sDPO steps (each: reference pass, policy): whenever a model is built or a stage
    starts optimizing, no model or optimizer of an earlier stage is still alive."""
    monkeypatch.chdir(REPO)
    models, optimizers, alive_at = [], [], []

    def alive(refs):
        gc.collect()
        return sum(r() is not None for r in refs)

    def tracked(fn):
        def wrapper(*a, **k):
            alive_at.append(("build", alive(models), alive(optimizers)))
            model = fn(*a, **k)
            models.append(weakref.ref(model))
            return model
        return wrapper

    real_make_optimizer, real_optimize = loop.make_optimizer, stepwise.optimize

    def make_optimizer(*a, **k):
        opt = real_make_optimizer(*a, **k)
        optimizers.append(weakref.ref(opt))
        return opt

    def optimize(run, model, pairs, stage):
        alive_at.append((stage.name, alive(models), alive(optimizers)))
        return real_optimize(run, model, pairs, stage)

    for mod in (stepwise, reference):
        monkeypatch.setattr(mod, "load_for_training", tracked(mod.load_for_training))
    monkeypatch.setattr(stepwise, "random_base", tracked(stepwise.random_base))
    monkeypatch.setattr(loop, "make_optimizer", make_optimizer)
    monkeypatch.setattr(stepwise, "optimize", optimize)

    stepwise.train(load_config(TINY, SMALL + [f"--train.output_dir={tmp_path / 'run'}"]))
    # random base (SFT), ref 1, policy 1, ref 2, policy 2: 5 models, 3 optimizers.
    assert len(models) == 5 and len(optimizers) == 3
    builds = [a for a in alive_at if a[0] == "build"]
    stages = [a for a in alive_at if a[0] != "build"]
    assert builds == [("build", 0, 0)] * 5, alive_at         # nothing earlier alive when a model is made
    assert [s[1:] for s in stages] == [(1, 0)] * 3, alive_at  # only the stage's own model, no old optimizer
    assert alive(models) == 0 and alive(optimizers) == 0


@pytest.mark.parametrize("value, k", [("true", 1), ("false", 0), ("2", 2), ('"every:3"', 3), ('"full"', 1),
                                      ('"none"', 0)])
def test_activation_checkpointing_key_accepts_old_and_new_forms(tmp_path, monkeypatch, value, k):
    from sdpo.model import checkpoint_every

    monkeypatch.chdir(REPO)
    toml = tmp_path / "c.toml"
    toml.write_text(TINY.read_text().replace("[model]\n", f"[model]\nactivation_checkpointing = {value}\n", 1))
    cfg = load_config(toml)
    assert checkpoint_every(cfg.model.activation_checkpointing) == k
    cli = load_config(toml, [f"--model.activation_checkpointing={value.strip(chr(34))}"])
    assert checkpoint_every(cli.model.activation_checkpointing) == k


def test_activation_checkpointing_bad_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.activation_checkpointing must be 'none', 'full' or 'every:K'"):
        load_config(TINY, ["--model.activation_checkpointing=sometimes"])
