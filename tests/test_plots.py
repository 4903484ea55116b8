"""eval.py plot: the curves of a run directory."""

import json
import sys

import pytest

import eval as eval_cli
from sdpo.eval.plots import PlotError, plot_run, run_series


def write_run(tmp_path):
    rows = [{"step": 0, "sdpo_step": 1, "gamma_ref/mean": 3.5, "reference": "S", "pairs": 8}]
    rows += [{"step": k, "sdpo_step": 1, "stage": "dpo", "loss": 0.7 - 0.1 * k, "rewards/margins": 0.1 * k,
              "rewards/accuracies": 0.5 + 0.1 * k} for k in (1, 2)]
    rows += [{"step": 2, "sdpo_step": 1, "eval_loss": 0.6, "eval_rewards/margins": 0.05, "eval_rewards/accuracies": 0.6}]
    rows += [{"step": 2, "sdpo_step": 2, "gamma_ref/mean": 5.0, "reference": "M1", "pairs": 8}]
    rows += [{"step": 3, "sdpo_step": 2, "stage": "dpo", "loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.4}]
    rows += [{"step": 1, "sdpo_step": 0, "stage": "sft", "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_run_series_per_sdpo_step(tmp_path):
    s = run_series(write_run(tmp_path))
    assert s["gamma_ref"] == {1: 3.5, 2: 5.0}
    assert s["steps"][1]["loss"] == [(1, pytest.approx(0.6)), (2, pytest.approx(0.5))]
    assert s["steps"][2]["rewards/accuracies"] == [(3, 0.4)]
    assert s["eval"][1]["rewards/margins"] == [(2, 0.05)] and 0 not in s["steps"]  # SFT rows are not DPO curves


def test_plot_errors_name_the_file(tmp_path, monkeypatch, capsys):
    with pytest.raises(PlotError, match="metrics.jsonl: no such file"):
        run_series(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    with pytest.raises(PlotError, match=r"metrics.jsonl:2: not valid JSON"):
        run_series(tmp_path)
    write_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert eval_cli.main(["plot", str(tmp_path)]) == 2
    assert "needs matplotlib (pip install matplotlib)" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional; the PNG path needs it")
    out = plot_run(write_run(tmp_path), tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
