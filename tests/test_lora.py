"""LoRA (sdpo/models/lora.py): the update, merging, gradients, peft's file layout, and an sDPO run with it."""

import copy
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdpo.data.packing import collate
from sdpo.data.pairs import TokenizedPair
from sdpo.loop import dpo_micro_loss, dpo_stage, make_optimizer
from sdpo.models import lora as L
from sdpo.models.checkpoint import load_model, save_model
from sdpo.models.model import ModelConfig, Transformer
from sdpo.runtime.config import Config, ConfigError, load_config, parse_args
from runs import torchrun

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "peft" / "peft_0.21.2_llama_r4.json"  # tools/make_peft_fixture.py
ALL = list(L.LORA_TARGETS)


def tiny(layers=2, hidden=32, inter=64, heads=4, kv=2, vocab=61, seed=0):
    m = Transformer(ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv))
    m.init_weights(seed=seed, std=0.1)
    return m


def lcfg(rank=4, alpha=8.0, dropout=0.0, targets=ALL):
    return SimpleNamespace(rank=rank, alpha=alpha, dropout=dropout, targets=list(targets))


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in L.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def pairs(n=4, vocab=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(1, vocab, (k,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(ids(3 + i % 3), ids(4 + i % 2), ids(2 + i % 4), i) for i in range(n)]


def test_zero_B_first_forward_is_the_base_model_and_only_adapters_train():
    base = tiny()
    model = L.apply_lora(copy.deepcopy(base), lcfg(rank=4))
    x = torch.randint(0, 61, (2, 9))
    assert torch.equal(model(x), base(x))  # B = 0: the update is exactly zero
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B on 7 projections in each of 2 layers
    q = model.layers[0].self_attn.q_proj  # [32 -> 32], r = 4: A [4, 32], B [32, 4]
    assert q.lora_A.weight.shape == (4, 32) and q.lora_B.weight.shape == (32, 4)
    assert q.lora_A.weight.abs().sum() > 0 and q.lora_A.weight.dtype == torch.float32
    # base tensor names are unchanged (checkpoints and DCP state read the same keys)
    assert set(base.state_dict()) <= set(model.state_dict())


def test_targets_subset_and_bad_targets():
    model = L.apply_lora(tiny(), lcfg(targets=["q_proj", "down_proj"]))
    names = set(L.lora_modules(model))
    assert names == {f"layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "mlp.down_proj")}
    assert type(model.layers[0].self_attn.k_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="lora.targets"):
        L.apply_lora(tiny(), lcfg(targets=["qproj"]))
    with pytest.raises(ValueError, match="already"):
        L.apply_lora(model, lcfg())


def test_merged_weights_are_base_plus_scaled_BA_and_give_the_same_logits():
    base = tiny()
    model = L.apply_lora(copy.deepcopy(base), lcfg(rank=4, alpha=12.0, dropout=0.3))
    randomize_B(model)
    model.eval()  # dropout off: the merged model has none
    merged = L.merge_state_dict(model.state_dict(), 12.0 / 4)
    assert set(merged) == set(base.state_dict())
    sd = model.state_dict()
    for name in L.adapter_names(sd):
        A, B, W = (sd[f"{name}{s}"].double() for s in (L.A_SUFFIX, L.B_SUFFIX, ".weight"))
        torch.testing.assert_close(merged[name + ".weight"].double(), W + 3.0 * B @ A, rtol=0, atol=1e-6)
        assert not torch.allclose(merged[name + ".weight"], base.state_dict()[name + ".weight"])
    plain = tiny()
    plain.load_state_dict(merged)
    x = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)
    expect = model(x)
    L.merge_lora(model)  # in place
    assert not L.lora_modules(model) and set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(model(x), expect, rtol=1e-5, atol=1e-5)


def test_lora_dpo_step_matches_the_chain_rule_on_the_merged_weights():
    """y = (W + s·BA) x, so with G = ∂L/∂W_eff (autograd on the merged, plain model):
    ∂L/∂B = s · G Aᵀ and ∂L/∂A = s · Bᵀ G (Hu et al. 2021, eq. 3 differentiated)."""
    cfg = Config()
    cfg.loss.beta = 0.5
    s = 8.0 / 4
    model = L.apply_lora(tiny(), lcfg(rank=4, alpha=8.0))
    randomize_B(model)
    model.double()  # float64 throughout: the comparison below is then exact to ~1e-12
    batch = collate(pairs(), pad_id=0)
    ref_c, ref_r = torch.tensor([-20.0, -25.0, -18.0, -30.0]), torch.tensor([-22.0, -21.0, -19.0, -28.0])
    loss, _ = dpo_micro_loss(cfg, model, batch, ref_c, ref_r)
    loss.backward()

    plain = tiny().double()
    # W_eff = W + s·BA in float64 (merge_state_dict rounds to float32)
    sd = model.state_dict()
    plain.load_state_dict({k: v for k, v in sd.items() if "lora_" not in k})
    with torch.no_grad():
        for name, m in L.lora_modules(model).items():
            plain.get_submodule(name).weight.add_(s * m.lora_B.weight @ m.lora_A.weight)
    loss_plain, _ = dpo_micro_loss(cfg, plain, batch, ref_c, ref_r)
    torch.testing.assert_close(loss, loss_plain, rtol=1e-10, atol=1e-12)
    loss_plain.backward()
    plain_params = dict(plain.named_parameters())
    for name, m in L.lora_modules(model).items():
        G = plain_params[name + ".weight"].grad  # [out, in]
        A, B = m.lora_A.weight.detach(), m.lora_B.weight.detach()
        assert G.abs().max() > 1e-4
        torch.testing.assert_close(m.lora_B.weight.grad, s * G @ A.T, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(m.lora_A.weight.grad, s * B.T @ G, rtol=1e-8, atol=1e-12)
        assert m.weight.grad is None  # frozen
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)

    # The optimizer holds (and updates) the adapters only; AdamW's first step moves each by ≈ lr.
    stage = dpo_stage(cfg, 1, 1, (ref_c, ref_r), torch.device("cpu"))
    opt = make_optimizer(model, stage, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    lora_ids = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert {id(p) for p in opt.state} == lora_ids
    for n, p in model.named_parameters():
        if "lora_" in n:
            g = p.grad
            step = (before[n] - p.detach())[g.abs() > 1e-6]
            torch.testing.assert_close(step, stage.lr * torch.sign(g[g.abs() > 1e-6]), rtol=1e-2, atol=0)
        else:
            assert torch.equal(p, before[n]), n


def test_activation_checkpointing_gives_the_same_adapter_gradients_with_dropout():
    batch = collate(pairs(), pad_id=0)
    cfg, ref = Config(), (torch.full((4,), -20.0), torch.full((4,), -21.0))
    grads = []
    for ckpt in ("none", "full"):
        model = L.apply_lora(tiny(), lcfg(dropout=0.2))
        randomize_B(model)
        model.gradient_checkpointing = ckpt
        torch.manual_seed(7)  # the dropout masks; checkpoint replays the RNG in its recompute
        loss, _ = dpo_micro_loss(cfg, model, batch, *ref)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_bf16_frozen_base_with_float32_adapters():
    base = tiny()
    model = L.apply_lora(copy.deepcopy(base), lcfg(), base_dtype=torch.bfloat16)
    q = model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.weight.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.float32  # untargeted tensors keep their dtype
    x = torch.randint(0, 61, (2, 9))
    out = model(x)  # float32 activations, bf16 weights upcast on the fly
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, base(x), rtol=0.05, atol=0.05)


def test_peft_files_have_peft_names_shapes_and_config_fields(tmp_path):
    """Against what peft 0.21.2 saved for the same 1-layer model (tests/fixtures/peft)."""
    want = json.loads(FIXTURE.read_text())
    model = L.apply_lora(tiny(layers=1, hidden=16, inter=32, heads=2, kv=2, vocab=32), lcfg(rank=4, alpha=8))
    L.save_peft_adapter(model, tmp_path / "adapter", "runs/x/M1")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        got = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.metadata() == want["metadata"]
    assert got == want["tensors"]
    assert set(L.lora_state_dict(model)) == set(want["tensors"])
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    peft_cfg = want["adapter_config"]
    assert set(cfg) <= set(peft_cfg), set(cfg) - set(peft_cfg)
    for key, value in cfg.items():
        if key == "target_modules":
            assert sorted(value) == sorted(peft_cfg[key])
        elif key == "base_model_name_or_path":
            assert value == "runs/x/M1"
        else:
            assert value == peft_cfg[key] and type(value) in (type(peft_cfg[key]), float), key
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type",
                "fan_in_fan_out", "base_model_name_or_path"):
        assert key in cfg


HF_PYTHON = os.environ.get("SDPO_HF_PYTHON", "/tmp/hfenv/bin/python")  # a venv with transformers + peft


def _has_peft():
    if not Path(HF_PYTHON).is_file():
        return False
    return subprocess.run([HF_PYTHON, "-c", "import peft, transformers"], capture_output=True).returncode == 0


PEFT_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:]
m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32), adapter)
m.eval()
x = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])
with torch.no_grad():
    torch.save({"lora": m(x).logits, "merged": m.merge_and_unload()(x).logits}, out)
"""


@pytest.mark.skipif(not _has_peft(), reason=f"no transformers + peft at {HF_PYTHON} (SDPO_HF_PYTHON)")
def test_peft_itself_loads_our_adapter_and_gets_our_logits(tmp_path):
    base = tiny(layers=2, hidden=32, inter=64, heads=4, kv=2, vocab=61)
    save_model(base, tmp_path / "base")
    model = L.apply_lora(copy.deepcopy(base), lcfg(rank=4, alpha=16.0, dropout=0.1))
    randomize_B(model)
    model.eval()
    L.save_peft_adapter(model, tmp_path / "adapter", str(tmp_path / "base"))
    (tmp_path / "load.py").write_text(PEFT_LOAD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([HF_PYTHON, str(tmp_path / "load.py"), str(tmp_path / "base"), str(tmp_path / "adapter"),
                        str(tmp_path / "out.pt")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "missing" not in r.stderr.lower() and "unexpected" not in r.stderr.lower(), r.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    x = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])
    with torch.no_grad():
        ours = model(x)
    assert not torch.allclose(ours, base(x), atol=1e-3)  # the adapter changes the logits
    torch.testing.assert_close(theirs["lora"], ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs["merged"], ours, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Config and an sDPO run with --lora.enabled=true
# --------------------------------------------------------------------------------------

def test_lora_config_keys_and_errors(capsys):
    cfg = load_config(None, ["--model.path=x", "--data.datasets=a", "--lora.enabled=true", "--lora.rank=8",
                             "--lora.targets=q_proj,v_proj"], validate=False)
    assert cfg.lora.enabled and cfg.lora.rank == 8 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert Config().lora.enabled is False and Config().lora.targets == ALL
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny.toml", ["--lora.enabled=true", "--lora.rank=0", "--lora.dropout=1",
                                                     "--lora.targets=q_proj,lm_head", "--lora.base_dtype=fp8"])
    for key in ("lora.rank", "lora.dropout", "lora.targets", "lora.base_dtype"):
        assert key in str(e.value)
    with pytest.raises(SystemExit):
        parse_args(["--help"])  # what `python train.py --help` prints
    out = capsys.readouterr().out
    lora_part = out[out.index("[lora]"):]
    for key in ("enabled", "rank", "alpha", "dropout", "targets", "base_dtype"):
        assert key in lora_part


def test_sdpo_with_lora_exports_merged_models_and_peft_adapters(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the tiny config's data paths are repo-relative
    from sdpo import reference
    from sdpo.stepwise import train
    from tests.test_train import small_cfg

    ref_loads = []
    real = reference.load_for_training
    monkeypatch.setattr(reference, "load_for_training",
                        lambda run, d, **kw: ref_loads.append(kw) or real(run, d, **kw))
    cfg = small_cfg(tmp_path, "--lora.enabled=true", "--lora.rank=4", "--lora.alpha=8", "--lora.dropout=0.0",
                    "--optim.lr=5e-2", "--model.activation_checkpointing=full")
    result = train(cfg)
    out = Path(cfg.train.output_dir)
    assert ref_loads == [{}, {}]  # the two references load without adapters
    S = load_model(out / "sft")
    prev = S.state_dict()
    for t in (1, 2):
        m = load_model(out / f"M{t}")  # an ordinary HF directory: merged, no adapter tensors
        assert result["models"][t - 1] == str(out / f"M{t}")
        sd = m.state_dict()
        assert set(sd) == set(prev)
        adapter = load_file(str(out / f"M{t}" / "adapter" / "adapter_model.safetensors"))
        acfg = json.loads((out / f"M{t}" / "adapter" / "adapter_config.json").read_text())
        assert acfg["r"] == 4 and acfg["lora_alpha"] == 8.0 and acfg["base_model_name_or_path"] == (
            str(out / "sft") if t == 1 else str(out / "M1"))
        assert len(adapter) == 2 * 7 * cfg.model.num_hidden_layers
        changed = 0
        for name, w in sd.items():
            key = f"base_model.model.{'model.' + name[:-len('.weight')]}"
            if key + ".lora_A.weight" in adapter:
                A, B = adapter[key + ".lora_A.weight"], adapter[key + ".lora_B.weight"]
                torch.testing.assert_close(w, prev[name] + 2.0 * B @ A, rtol=1e-5, atol=1e-6)
                changed += int(B.abs().sum() > 0)
            else:
                assert torch.equal(w, prev[name]), name  # frozen: embeddings, norms, lm_head
        assert changed == len(adapter) // 2  # every adapter trained away from B = 0
        prev = sd


def test_lora_run_killed_inside_a_dpo_step_resumes_bit_for_bit(tmp_path, monkeypatch):
    """The resumable state holds the adapters, their AdamW moments and the dropout RNG."""
    monkeypatch.chdir(REPO)
    from sdpo.runtime.run import StopRequested
    from sdpo.stepwise import train
    from tests.test_train import small_cfg

    base = ["--train.save_every=2", "--sft.max_steps=6", "--lora.enabled=true", "--lora.rank=4",
            "--lora.dropout=0.1", "--optim.lr=1e-2"]
    train(small_cfg(tmp_path, *base, out="full"))
    with pytest.raises(StopRequested):  # 6 SFT steps, then global step 9 = DPO step 1's third (saved at 2)
        train(small_cfg(tmp_path, *base, "--train.stop_after=9", out="cut"))
    meta = json.loads((tmp_path / "cut" / "state" / "meta.json").read_text())
    assert meta == {"stage": ["dpo", 1], "step": 2, "global_step": 8}
    train(small_cfg(tmp_path, *base, "--train.resume=true", out="cut"))
    for d in ("M1", "M2", "M1/adapter", "M2/adapter"):
        name = "adapter_model.safetensors" if "adapter" in d else "model.safetensors"
        a, b = load_file(str(tmp_path / "full" / d / name)), load_file(str(tmp_path / "cut" / d / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{d}/{k}"


@pytest.mark.slow  # ~40 s on 2 shared cores: two torchrun ranks plus the one-process run
def test_lora_under_torchrun_two_ranks_equals_one_process(tmp_path, monkeypatch):
    """FSDP2 (gloo, 2 ranks): the adapters are added on the meta model before fully_shard, each
    rank copies its rows of the same initial values, and the merged M_t and the adapters equal
    a one-process run's."""
    monkeypatch.chdir(REPO)
    from sdpo.stepwise import train
    from tests.test_train import SMALL, TINY

    args = SMALL + ["--data.max_examples=16", "--sft.max_steps=4", "--train.device=cpu", "--lora.enabled=true",
                    "--lora.rank=4", "--lora.dropout=0.0", "--optim.lr=1e-3"]
    torchrun(REPO / "train.py", *args, f"--train.output_dir={tmp_path / 'two'}")
    train(load_config(TINY, args + [f"--train.output_dir={tmp_path / 'one'}"]))
    for d, name in (("M1", "model.safetensors"), ("M2", "model.safetensors"),
                    ("M1/adapter", "adapter_model.safetensors"), ("M2/adapter", "adapter_model.safetensors")):
        a, b = load_file(str(tmp_path / "one" / d / name)), load_file(str(tmp_path / "two" / d / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{d}/{k}: {m}")
    B = load_file(str(tmp_path / "two" / "M1" / "adapter" / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in B.items() if "lora_B" in k)  # trained under FSDP
