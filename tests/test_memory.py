"""Memory: finished models and optimizers are freed before the next stage (weakrefs), the
activation_checkpointing key, and the memory plan (sdpo.runtime.memory) against measured peaks."""

import gc
import weakref
from pathlib import Path

import pytest
import torch

from sdpo import loop, reference, stepwise
from sdpo.runtime.config import ConfigError, load_config

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
    from sdpo.models.model import checkpoint_every

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


# --------------------------------------------------------------------------------------
# The memory plan
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, dict(tie_word_embeddings=True),
                                dict(model_type="qwen2", attention_bias=True, num_key_value_heads=1)])
def test_param_counts_equal_the_model(kw):
    from sdpo.models.model import ModelConfig, Transformer
    from sdpo.runtime.memory import param_counts

    cfg = ModelConfig(vocab_size=101, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=kw.pop("num_key_value_heads", 2), **kw)
    model = Transformer(cfg)
    n = param_counts(cfg)
    assert n["total"] == sum(p.numel() for p in model.parameters())
    assert n["block"] == sum(p.numel() for p in model.layers[0].parameters())


def test_plan_shards_by_world_size_and_checkpointing_lowers_activations():
    from sdpo.models.hf_config import load_model_config
    from sdpo.runtime.memory import Setup, plan

    c = load_model_config(REPO / "bench" / "shapes" / "solar-10.7b")
    one, eight = plan(c, Setup(world_size=1)), plan(c, Setup(world_size=8))
    assert one["optimizer state"] == pytest.approx(8 * eight["optimizer state"], rel=1e-6)
    assert 10.6e9 < one["parameters"] / 4 < 10.8e9                     # SOLAR: 10.7B parameters
    acts = [plan(c, Setup(world_size=8, checkpoint=k))["activations"] for k in (0, 4, 2, 1)]
    assert acts == sorted(acts, reverse=True) and acts[-1] < acts[0] / 5
    # GPU chunks are large (kernels.fused_linear.CUDA_*: ~256 MiB of logits, a 256 MiB float32 dW block at
    # H = 4096), so the fused lm_head saves memory from ~12k scored rows on (32 pairs x 512 x 2 here).
    fused, unfused = (plan(c, Setup(world_size=8, micro_batch_size=32, fused=f))["logits"] for f in (True, False))
    assert unfused == 2 * 32 * 512 * 32000 * 2 and fused < unfused / 1.5 and fused < 1.2e9
    # CPU chunks: ~2^25 logits (kernels.fused_linear.CHUNK_ELEMENTS), so the saving shows from ~8k rows
    cpu = [plan(c, Setup(world_size=8, micro_batch_size=8, fused=f, device="cpu"))["logits"] for f in (True, False)]
    assert cpu[1] == 2 * 8 * 512 * 32000 * 2 and cpu[0] < cpu[1] / 1.5 and cpu[0] < 0.3e9


def test_plan_cli_on_solar_8x80(capsys):
    from sdpo.runtime import memory

    assert memory.main([str(REPO / "bench" / "shapes" / "solar-10.7b"), "--gpus", "8", "--gpu-mem-gb", "80",
                        "--config", str(REPO / "configs" / "solar-10.7b-sdpo.toml")]) == 0
    out = capsys.readouterr().out
    assert "| optimizer state | 10.73 |" in out and "-> fits" in out and "cheapest setting that fits" in out
    assert memory.main([str(REPO / "bench" / "shapes" / "solar-10.7b"), "--gpus", "1", "--gpu-mem-gb", "24"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


def test_plan_cli_bad_model_dir(tmp_path, capsys):
    from sdpo.runtime import memory

    assert memory.main([str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def _plan_vs_measured(ckpt):
    import sys
    sys.path.insert(0, str(REPO / "bench"))
    import memory_plan

    args = dict(hidden=256, inter=688, layers=4, heads=4, kv_heads=2, vocab=8000, pairs=4, seq=256,
                checkpoint=ckpt, fused=True)
    return memory_plan.planned(args), memory_plan.measure(args)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="Linux RSS")
def test_plan_within_15_percent_of_measured_peak_rss():
    """Two AdamW steps of a 7M-parameter float32 model on 2048 tokens, measured in a fresh process:
    the plan's total is within 15% of the peak RSS growth (bench/memory_plan.py has the table)."""
    planned, measured = _plan_vs_measured("none")
    assert 0.85 < planned / measured < 1.15, (planned, measured)


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", ["every:2", "full"])
def test_plan_within_15_percent_with_checkpointing(ckpt):
    planned, measured = _plan_vs_measured(ckpt)
    assert 0.85 < planned / measured < 1.15, (ckpt, planned, measured)


def test_plan_logits_chunk_is_the_devices():
    from kernels import fused_linear
    from sdpo.models.model import ModelConfig
    from sdpo.runtime.memory import Setup, plan

    c = ModelConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                    num_attention_heads=8)
    rows = {}
    for device, (elements, min_rows) in {"cpu": (fused_linear.CHUNK_ELEMENTS, fused_linear.MIN_ROWS),
                                         "cuda": (fused_linear.CUDA_CHUNK_ELEMENTS, fused_linear.CUDA_MIN_ROWS)}.items():
        # 16 pairs of 1024 tokens, 512 scored each: more response rows than either device's chunk
        logits = plan(c, Setup(micro_batch_size=16, bf16=False, device=device))["logits"]
        rows[device] = logits / (32000 * 4)
        assert rows[device] == max(min_rows, elements // 32000), device
    assert rows["cuda"] > 3 * rows["cpu"]  # a GPU plan counts the GPU's chunk, not the CPU's


# Published sizes (the model cards' parameter counts; safetensors totals) of the families' public
# checkpoints whose config.json dimensions bench/shapes/ holds.
PUBLISHED = {"qwen3-8b": 8.19e9, "gemma-2-9b": 9.24e9, "gemma-3-1b": 1.00e9, "olmo-2-7b": 7.30e9,
             "phi-3-mini": 3.82e9, "phi-4-mini": 3.84e9, "smollm3-3b": 3.08e9, "mistral-7b": 7.24e9,
             "solar-10.7b": 10.73e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_the_published_size(name):
    from sdpo.models.hf_config import load_model_config
    from sdpo.runtime.memory import param_counts

    n = param_counts(load_model_config(REPO / "bench" / "shapes" / name))
    assert abs(n["total"] / PUBLISHED[name] - 1) < 0.003, (name, n["total"])
    assert n["total"] == n["root"] + load_model_config(REPO / "bench" / "shapes" / name).num_hidden_layers * n["block"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only: VmHWM and clear_refs")
def test_cpu_peak_mem_is_per_window():
    import torch

    from sdpo.loop import peak_mem_gb, reset_peak_mem

    cpu = torch.device("cpu")
    reset_peak_mem(cpu)
    base = peak_mem_gb(cpu)
    x = torch.ones(100_000_000)  # 0.4 GB, touched
    assert peak_mem_gb(cpu) > base + 0.35
    del x
    reset_peak_mem(cpu)  # a new window: the freed 0.4 GB is not its peak (ru_maxrss would keep it)
    assert peak_mem_gb(cpu) < base + 0.1
