"""End-to-end sDPO runs on a very small model and a slice of the demo data."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo import loop, reference, stepwise
from sdpo.runtime.config import load_config
from sdpo.runtime.run import StopRequested, TrainingError
from sdpo.stepwise import train
from runs import torchrun

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"

# A ~25K-parameter model, 48 pairs per sDPO step, a few optimizer steps per stage; plain sigmoid
# DPO (the tiny default adds RPO's NLL term), so the first loss of a step is exactly ln 2.
SMALL = [
    "--loss.rpo_alpha=0",
    "--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
    "--model.num_attention_heads=2",
    "--data.max_examples=48", "--data.max_test_examples=48",
    "--sft.max_steps=8", "--sft.global_batch_size=16", "--sft.micro_batch_size=8",
    "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.epochs=1", "--train.log_every=1",
    "--eval.summary=false",
]


def small_cfg(tmp_path, *extra, out="run"):
    return load_config(TINY, SMALL + [f"--train.output_dir={tmp_path / out}", *extra])


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(model_dir):
    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs use repo-relative data paths


def test_two_step_sdpo_learns_and_the_reference_moves(tmp_path):
    cfg = small_cfg(tmp_path, "--data.max_examples=96", "--train.epochs=3", "--optim.lr=1e-2",
                    "--sft.max_steps=40", "--eval.summary=true", "--data.max_test_examples=96",
                    "--data.test_datasets=[\"data/demo/orca_pairs/train.jsonl\"]")
    result = train(cfg)
    out = Path(cfg.train.output_dir)
    rows = metrics(out)
    for t in (1, 2):
        dpo = [r for r in rows if r.get("stage") == "dpo" and r["sdpo_step"] == t]
        assert len(dpo) == 3 * 96 // 8
        # policy == reference at the first step: the sigmoid loss is exactly ln 2 (up to float32)
        assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
        first, last = dpo[: len(dpo) // 3], dpo[-len(dpo) // 3:]
        mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        assert mean(last, "loss") < mean(first, "loss") - 0.02, t
        assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies"), t
        for key in ("lr", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                    "logps/rejected", "grad_norm", "tokens_per_s", "peak_mem_gb", "step"):
            assert key in dpo[-1]
    gammas = [r["gamma_ref/mean"] for r in rows if "gamma_ref/mean" in r]
    assert len(gammas) == 2 and gammas[1] != gammas[0]
    assert result["models"] == [str(out / "M1"), str(out / "M2")]
    for d in ["sft", "M1", "M2"]:
        assert (out / d / "config.json").is_file() and (out / d / "tokenizer.json").is_file()
    # M1 was trained on D1 = these pairs: it prefers the chosen responses more than S does.
    s = result["summary"]
    assert all(0 <= s[m]["D1"]["exact_match"] <= 1 for m in ("S", "M1", "M2"))
    assert json.loads((out / "summary.json").read_text()) == s
    assert s["M1"]["D1"]["gamma_mean"] > s["S"]["D1"]["gamma_mean"]
    assert s["M1"]["D1"]["accuracy"] >= s["S"]["D1"]["accuracy"]
    saved = load_config(out / "config.toml")
    assert saved == cfg


def test_killed_and_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path):
    base = ["--train.save_every=2", "--sft.max_steps=6"]
    full = small_cfg(tmp_path, *base, out="full")
    train(full)
    # 6 SFT steps then 6 per sDPO step: stop inside SFT (after its save at 4)
    # and, on the first resume, inside sDPO step 1 (global step 9, saved at 8).
    cut = small_cfg(tmp_path, *base, "--train.stop_after=5", out="cut")
    with pytest.raises(StopRequested):
        train(cut)
    assert not (tmp_path / "cut" / "sft").exists()
    meta = json.loads((tmp_path / "cut" / "state" / "meta.json").read_text())
    assert meta == {"stage": ["sft", 0], "step": 4, "global_step": 4}
    # Killed one step into sDPO step 1, after its gamma_ref/mean line and before any state save:
    # the resumed run redoes the step from its start and must not log that line twice.
    with pytest.raises(StopRequested):
        train(small_cfg(tmp_path, *base, "--train.stop_after=7", "--train.resume=true", out="cut"))
    assert not (tmp_path / "cut" / "state").exists()
    with pytest.raises(StopRequested):
        train(small_cfg(tmp_path, *base, "--train.stop_after=9", "--train.resume=true", out="cut"))
    meta = json.loads((tmp_path / "cut" / "state" / "meta.json").read_text())
    assert meta == {"stage": ["dpo", 1], "step": 2, "global_step": 8}
    train(small_cfg(tmp_path, *base, "--train.resume=true", out="cut"))
    for d in ("sft", "M1", "M2"):
        a, b = weights(tmp_path / "full" / d), weights(tmp_path / "cut" / d)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{d}/{k}"
    strip = lambda rows: [{k: v for k, v in r.items() if k not in (*loop.MACHINE_DEPENDENT, "reference")} for r in rows]  # noqa
    assert strip(metrics(tmp_path / "cut")) == strip(metrics(tmp_path / "full"))


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = small_cfg(tmp_path, "--train.save_every=2", "--train.stop_after=3", "--optim.lr=1e-3")
    with pytest.raises(StopRequested):
        train(cfg)
    with pytest.raises(Exception, match=r"optim\.lr: 0\.001 -> 0\.002"):
        train(small_cfg(tmp_path, "--train.resume=true", "--optim.lr=2e-3"))


def test_reference_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, "--data.max_examples=16")
    train(cfg)
    out = Path(cfg.train.output_dir)
    cache = out / "ref_cache"
    assert len(list(cache.glob("*.safetensors"))) == 2  # one per sDPO step

    loads = []
    real = stepwise.load_for_training
    for module in (stepwise, reference):  # the policies, and the reference pass
        monkeypatch.setattr(module, "load_for_training", lambda run, d, **k: loads.append(str(d)) or real(run, d, **k))
    train(cfg)  # a repeated run: same S (deterministic), same data -> both reference passes from the cache
    assert loads == [str(out / "sft"), str(out / "M1")]  # the two policies only, no reference pass
    assert len(list(cache.glob("*.safetensors"))) == 2

    # different data -> new keys
    loads.clear()
    train(small_cfg(tmp_path, "--data.max_examples=12"))
    assert len(loads) == 4 and len(list(cache.glob("*.safetensors"))) == 4

    # same data, different weights (another SFT) -> new keys
    loads.clear()
    train(small_cfg(tmp_path, "--data.max_examples=16", "--sft.max_steps=5"))
    assert len(loads) == 4 and len(list(cache.glob("*.safetensors"))) == 6


def test_init_base_starts_each_step_from_s(tmp_path):
    prev = small_cfg(tmp_path, "--train.epochs=3", "--optim.lr=1e-2", out="prev")
    train(prev)
    base = small_cfg(tmp_path, "--train.epochs=3", "--optim.lr=1e-2", "--train.init=base", out="base")
    train(base)
    first = lambda out, t: [r for r in metrics(out) if r.get("stage") == "dpo" and r["sdpo_step"] == t][0]  # noqa
    # Step 1: both start from S = M_0. Step 2: the reference is M1; the policy is M1 (loss ln 2,
    # the paper's Figure 3 "initialised from M_{t-1}") or S (a different, larger initial loss).
    assert first(tmp_path / "prev", 1)["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first(tmp_path / "base", 1)["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first(tmp_path / "prev", 2)["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first(tmp_path / "base", 2)["loss"] > math.log(2) + 1e-3
    a, b = weights(tmp_path / "prev" / "M1"), weights(tmp_path / "base" / "M1")
    assert all(torch.equal(a[k], b[k]) for k in a)  # step 1 is the same in both


def test_non_finite_loss_stops_naming_the_step(tmp_path, monkeypatch):
    real = loop.preference_loss

    def poisoned(*args, **kwargs):
        losses, c, r = real(*args, **kwargs)
        return losses * float("nan"), c, r

    monkeypatch.setattr(loop, "preference_loss", poisoned)
    with pytest.raises(TrainingError, match=r"sDPO step 1/2: non-finite loss at optimizer step 1/6"):
        train(small_cfg(tmp_path))
    assert (tmp_path / "run" / "sft" / "config.json").is_file()  # the last good model stays
    assert not (tmp_path / "run" / "M1").exists()


def run_cli(*args, cwd=REPO, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--optim.lr=-1"], "optim.lr must be > 0"),
    (["--optim.learning_rate=1"], "unknown key in [optim] 'learning_rate'"),
    (["--data.datasets=[\"nowhere.jsonl\"]"], "data.datasets[0]: nowhere.jsonl does not exist"),
    (["--model.path=/nonexistent", '--data.datasets=["data/demo/orca_pairs/train.jsonl"]'],
     "model.path: /nonexistent is not a model directory"),
    (["--model.path=/nonexistent"], "data.datasets is empty"),  # no --config: the recipe defaults, no demo data
    (["--train.dp_shard=0"], "train.dp_shard must be >= 1"),  # batch arithmetic per world size: test_hsdp
    (["--sft.datasets=[\"data/demo/nowhere.jsonl\"]"], "sft.datasets[0]: data/demo/nowhere.jsonl does not exist"),
])
def test_bad_config_fails_fast(tmp_path, args, message):
    t0 = time.time()
    proc = run_cli(*args, f"--train.output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert time.time() - t0 < 60
    assert not (tmp_path / "out").exists()


def test_bad_data_record_fails_before_any_work(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "x", "chosen": 3}\n')
    proc = run_cli(f"--data.datasets=[\"{bad}\"]", "--data.test_datasets=", "--eval.summary=false",
                   f"--train.output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert "bad.jsonl:2" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    args = SMALL + ["--data.max_examples=16", "--sft.max_steps=4", "--train.device=cpu"]
    torchrun(REPO / "train.py", *args, f"--train.output_dir={tmp_path / 'two'}")
    train(load_config(TINY, args + [f"--train.output_dir={tmp_path / 'one'}"]))
    for d in ("sft", "M1", "M2"):
        a, b = weights(tmp_path / "one" / d), weights(tmp_path / "two" / d)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{d}/{k}: {m}")
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for r1, r2 in zip(one, two):
        for k in ("loss", "rewards/accuracies", "gamma_ref/mean"):
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-5), (k, r1, r2)


def test_easy_to_hard_orders_by_the_base_gamma(tmp_path, monkeypatch):
    seen = {}
    real = stepwise.split_steps

    def spy(datasets, strategy, **kw):
        seen["scores"], seen["pool"] = kw.get("scores"), [ex for d in datasets for ex in d]
        steps = real(datasets, strategy, **kw)
        seen["steps"] = steps
        return steps

    monkeypatch.setattr(stepwise, "split_steps", spy)
    cfg = small_cfg(tmp_path, "--data.split=easy_to_hard", "--data.fractions=0.5,0.5", "--data.max_examples=16")
    train(cfg)
    scores, pool = seen["scores"], seen["pool"]
    assert len(scores) == len(pool) and len(seen["steps"]) == 2
    score_of = {ex.origin: s for ex, s in zip(pool, scores)}
    d1, d2 = ([score_of[ex.origin] for ex in step] for step in seen["steps"])
    assert min(d1) >= max(d2)  # D1 holds the pairs S finds easiest (highest γ)
    assert [r["sdpo_step"] for r in metrics(tmp_path / "run") if "gamma_ref/mean" in r] == [1, 2]


def test_no_host_sync_or_transfer_from_the_training_modules_inside_a_micro_batch(tmp_path, monkeypatch):
    """On GPU, .item() / int() / float() / .cpu() / .to() on a device tensor stalls the host
    (or copies) every micro-batch; CPU tests can't feel it, so watch for the calls themselves.
    The window: from a batch's to_device until its micro-batch loss returns (training) or the
    next collate / model.train() (the no-grad passes). Only calls made from the training modules
    (loop.py, reference.py) count: the model's and logprobs' own syncs belong to those modules."""
    from torch.overrides import TorchFunctionMode

    SYNCS = {torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__bool__,
             torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.to}
    watched = {str(Path(m.__file__)) for m in (loop, reference)}
    seen = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in SYNCS:
                f = sys._getframe(1)
                while f is not None and f.f_code.co_filename not in watched and "/torch/" in f.f_code.co_filename:
                    f = f.f_back
                if f is not None and f.f_code.co_filename in watched:
                    name = Path(f.f_code.co_filename).name
                    seen.append(f"{getattr(func, '__name__', func)} at {name}:{f.f_lineno} ({f.f_code.co_name})")
            return func(*args, **(kwargs or {}))

    window = []

    def open_window():
        if not window:
            window.append(Watch())
            window[0].__enter__()

    def close_window():
        if window:
            window.pop().__exit__(None, None, None)

    def wrap(module, name, before=None, after=None):
        real = getattr(module, name)

        def spy(*a, **k):
            before and before()
            out = real(*a, **k)
            after and after()
            return out

        monkeypatch.setattr(module, name, spy)

    for module in (loop, reference):
        wrap(module, "collate", before=close_window)
        wrap(module, "to_device", after=open_window)
    wrap(loop, "dpo_micro_loss", after=close_window)
    wrap(loop, "sft_micro_loss", after=close_window)
    real_train = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: (close_window(), real_train(self, mode))[1])
    try:
        train(small_cfg(tmp_path, "--data.max_examples=16", "--sft.max_steps=2", "--eval.summary=true",
                        "--data.max_test_examples=8"))
    finally:
        close_window()
    assert not seen, sorted(set(seen))


@pytest.mark.parametrize("case", ["sigmoid+sft with rpo", "length-normalised ipo", "reference-free"])
def test_dpo_micro_loss_wires_the_loss_section(case):
    """The [loss] keys reach sdpo.loss: the per-pair loss is recomputed here from the policy's
    log-probs with the formulas written out (DPO Eq. 7; IPO, Azar et al. Eq. 17; NLL per token)."""
    import torch.nn.functional as F

    from sdpo.data.packing import collate
    from sdpo.data.pairs import TokenizedPair
    from sdpo.logprobs import concatenated_forward
    from sdpo.models.model import ModelConfig, Transformer

    overrides = {"sigmoid+sft with rpo": ["--loss.type=sigmoid+sft", "--loss.weights=[1.0,0.5]", "--loss.rpo_alpha=0.2"],
                 "length-normalised ipo": ["--loss.type=ipo", "--loss.length_normalize=true"],
                 "reference-free": ["--loss.reference_free=true"]}[case]
    cfg = load_config(TINY, ["--loss.beta=0.5", "--loss.rpo_alpha=none", *overrides])  # the demo sets RPO
    model = Transformer(ModelConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2))
    model.init_weights(seed=0, std=0.5)
    pairs = [TokenizedPair([1, 5, 6], [7, 8, 2], [9, 2], 0), TokenizedPair([1, 4], [3, 3, 3, 2], [10, 11, 2], 1)]
    batch = collate(pairs, pad_id=0)
    ref_c, ref_r = torch.tensor([-6.0, -9.0]), torch.tensor([-5.0, -7.5])
    loss, stats = loop.dpo_micro_loss(cfg, model, batch, ref_c, ref_r)

    with torch.no_grad():
        c, r = concatenated_forward(model, batch)
        beta = 0.5
        if case == "reference-free":
            ref_c, ref_r = torch.zeros(2), torch.zeros(2)
        h = (c.logps - ref_c) - (r.logps - ref_r)
        nll = -c.logps / c.counts
        if case == "sigmoid+sft with rpo":
            per_pair = -F.logsigmoid(beta * h) + 0.5 * nll + 0.2 * nll
        elif case == "length-normalised ipo":
            h_mean = (c.logps - ref_c) / c.counts - (r.logps - ref_r) / r.counts
            per_pair = (h_mean - 1 / (2 * beta)) ** 2
        else:
            per_pair = -F.logsigmoid(beta * h)
    torch.testing.assert_close(loss.detach(), per_pair.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[0], per_pair.sum(), rtol=1e-5, atol=1e-6)


def test_sft_datasets_replace_the_preference_data_for_the_base():
    from sdpo.data.tokenizer import load_tokenizer

    tok = load_tokenizer(REPO / "data" / "tokenizer")
    default = load_config(TINY)
    datasets, _, sft = stepwise.load_steps(default, tok)
    # The default S trains on its own demonstrations; none of the pairs' string prompts is among them
    # (the 100 single-digit sums recur by design).
    assert len(sft) == 2000 and {e.origin.rsplit(":", 1)[0] for e in sft} == {"data/demo/sft/train.jsonl"}
    prompts = lambda exs: {e.prompt[-1]["content"] for e in exs if not e.prompt[-1]["content"].startswith("add:")}  # noqa
    assert len(prompts(sft)) > 1500 and not prompts(sft) & prompts([e for d in datasets for e in d])
    _, _, sft = stepwise.load_steps(load_config(TINY, ["--sft.datasets=[]"]), tok)
    assert sft is None  # S trains on the chosen responses of data.datasets
    cfg = load_config(TINY, ['--sft.datasets=["data/demo/orca_pairs/test.jsonl"]'])
    datasets, _, sft = stepwise.load_steps(cfg, tok)
    assert [e.origin for e in sft] == [f"data/demo/orca_pairs/test.jsonl:{i}" for i in range(1, 101)]
    assert not {e.origin for e in sft} & {e.origin for d in datasets for e in d}


def test_logged_metrics_are_means_over_the_logging_window(tmp_path):
    every1 = small_cfg(tmp_path, "--train.log_every=1", out="one")
    every2 = small_cfg(tmp_path, "--train.log_every=2", out="two")
    train(every1)
    train(every2)
    one = {(r["stage"], r["step"]): r for r in metrics(every1.train.output_dir) if "loss" in r}
    two = [r for r in metrics(every2.train.output_dir) if r.get("stage") == "dpo"]
    assert len(two) == 6  # 6 optimizer steps per sDPO step, one line per 2
    for r in two:
        prev, cur = one[("dpo", r["step"] - 1)], one[("dpo", r["step"])]
        for key in ("loss", "grad_norm", "rewards/accuracies", "rewards/margins", "logps/chosen"):
            assert r[key] == pytest.approx((prev[key] + cur[key]) / 2, rel=1e-6, abs=1e-9), key
    assert any(one[("dpo", r["step"] - 1)]["loss"] != one[("dpo", r["step"])]["loss"] for r in two)


def test_a_pair_dropped_by_tokenization_does_not_shift_the_reference(tmp_path):
    """The reference log-probs are laid out by position among the kept pairs; a pair dropped at
    tokenization (identical responses after truncation) must not shift the lookup. At the first
    DPO step policy == reference, so the loss is ln 2 and every reward 0."""
    rows = [json.loads(line) for line in (REPO / "data/demo/orca_pairs/train.jsonl").read_text().splitlines()[:48]]
    rows.insert(1, {"system": "", "question": "repeat", "chosen": "a" * 80 + "b", "rejected": "a" * 80 + "c"})
    data = tmp_path / "orca_with_a_drop.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = small_cfg(tmp_path, f'--data.datasets=["{data}"]', "--train.global_batch_size=16",
                    "--train.micro_batch_size=8")
    train(cfg)
    first = next(r for r in metrics(cfg.train.output_dir) if r.get("stage") == "dpo")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_a_reference_free_loss_never_loads_a_reference(tmp_path, monkeypatch, loss_type):
    def no_reference(*a, **k):
        raise AssertionError("the reference pass ran for a reference-free loss")

    monkeypatch.setattr(reference, "reference_logps", no_reference)
    monkeypatch.setattr(stepwise, "reference_logps", no_reference)
    loads = []
    real = stepwise.load_for_training
    monkeypatch.setattr(stepwise, "load_for_training", lambda run, d, **k: loads.append(str(d)) or real(run, d, **k))
    cfg = small_cfg(tmp_path, f"--loss.type={loss_type}", "--loss.beta=2.0", "--data.max_examples=16")
    train(cfg)
    out = Path(cfg.train.output_dir)
    assert loads == [str(out / "sft"), str(out / "M1")]  # the two policies only
    rows = [r for r in metrics(out) if r.get("stage") == "dpo"]
    assert rows and all(math.isfinite(r["loss"]) for r in rows) and not any("gamma_ref/mean" in r for r in metrics(out))
