"""The paper's statistics (sdpo.metrics) against hand-computed values."""
import math

import pytest
import torch

from sdpo import metrics
from sdpo.eval import report



def test_preference_metrics_hand_computed():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    m = metrics.preference_metrics(pc, pr, rc, rr, beta=0.5, losses=torch.tensor([0.25, 0.75]))
    # chosen rewards 0.5*[1, 0] = [0.5, 0]; rejected 0.5*[-1, 1] = [-0.5, 0.5]
    assert m["rewards/chosen"] == pytest.approx(0.25)
    assert m["rewards/rejected"] == pytest.approx(0.0)
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["rewards/margins"] == pytest.approx(0.25)   # mean of [1.0, -0.5]
    assert m["logps/chosen"] == pytest.approx(-1.5)
    assert m["logps/rejected"] == pytest.approx(-2.0)
    assert m["loss"] == pytest.approx(0.5)
    assert m["n"] == 2
    tie = metrics.preference_metrics(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1))
    assert tie["rewards/accuracies"] == 0.0


def test_gamma_stats_hand_computed():
    s = metrics.gamma_stats([1.0, 2.0, 3.0, 4.0, 5.0, 10.0])
    assert s["n"] == 6
    assert s["mean"] == pytest.approx(25 / 6)
    assert s["median"] == pytest.approx(3.5)
    assert s["q1"] == pytest.approx(2.25)   # position 0.25*5 = 1.25 -> 2 + 0.25
    assert s["q3"] == pytest.approx(4.75)   # position 3.75 -> 4 + 0.75*(5-4)
    assert s["std"] == pytest.approx(math.sqrt(155 / 6 - (25 / 6) ** 2))
    assert (s["min"], s["max"]) == (1.0, 10.0)


def test_histogram_shares_bins_and_csv_fallback(tmp_path):
    h = metrics.histogram({"S": [0.0, 1.0, 2.0], "M1": [2.0]}, bins=2)
    assert h["edges"] == pytest.approx([0.0, 1.0, 2.0])
    assert h["counts"] == {"S": [1, 2], "M1": [0, 1]}
    report.write_histogram_csv(h, tmp_path / "h.csv")
    assert (tmp_path / "h.csv").read_text() == "bin_lo,bin_hi,S,M1\n0,1,1,0\n1,2,2,1\n"
