"""OOD detection (AUROC/AUPR per score) and selective prediction (accuracy-coverage, AURC, E-AURC)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bayes_polar.errors import InvalidValueError, ShapeMismatchError
from bayes_polar.evaluation.ood import detection_metrics, ood_detection
from bayes_polar.evaluation.selective import plot_selective, selective_curve, selective_metrics

PROPERTY = settings(max_examples=30, deadline=None)


# ----------------------------------------------------------------------------- OOD detection
def test_perfect_separator_scores_one_and_its_reverse_zero():
    id_u, ood_u = torch.rand(50) * 0.4, 0.6 + torch.rand(30) * 0.4
    assert detection_metrics(id_u, ood_u) == {"auroc": pytest.approx(1.0), "aupr": pytest.approx(1.0)}
    assert detection_metrics(ood_u, id_u)["auroc"] == pytest.approx(0.0)


def test_auroc_is_the_mann_whitney_probability_with_ties_half():
    id_u, ood_u = torch.tensor([0.1, 0.5, 0.5]), torch.tensor([0.5, 0.9])
    # pairs (ood > id): 0.5 vs {0.1: 1, 0.5: .5, 0.5: .5} = 2; 0.9 vs all = 3 -> 5 / 6
    assert detection_metrics(id_u, ood_u)["auroc"] == pytest.approx(5 / 6)


@PROPERTY
@given(st.integers(0, 2 ** 31 - 1), st.integers(200, 1000), st.integers(200, 1000))
def test_random_score_is_near_one_half(seed, n_id, n_ood):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_id + n_ood, generator=g)  # the same distribution in and out
    auroc = detection_metrics(scores[:n_id], scores[n_id:])["auroc"]
    assert abs(auroc - 0.5) < 0.08  # sd of AUROC under H0 is below 0.02 at these sizes


def test_scores_are_oriented_larger_is_more_uncertain():
    id_scores = {"max_prob": torch.tensor([0.9, 0.95]), "entropy": torch.tensor([0.1, 0.2])}
    ood_scores = {"max_prob": torch.tensor([0.4, 0.5]), "entropy": torch.tensor([1.0, 1.1]), "extra": torch.ones(2)}
    result = ood_detection(id_scores, ood_scores)
    assert set(result) == {"max_prob", "entropy"}
    assert result["max_prob"]["auroc"] == pytest.approx(1.0) and result["entropy"]["auroc"] == pytest.approx(1.0)


def test_ood_errors():
    with pytest.raises(InvalidValueError, match="ID and OOD"):
        detection_metrics(torch.tensor([]), torch.ones(3))
    with pytest.raises(InvalidValueError, match="No common scores"):
        ood_detection({"a": torch.ones(2)}, {"b": torch.ones(2)})


# ----------------------------------------------------------------------------- selective prediction
def test_selective_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])  # conf .9 right, .8 wrong, .7 right, .6 right
    curve = selective_curve(probs, labels)
    torch.testing.assert_close(curve.accuracy, torch.tensor([1, 1 / 2, 2 / 3, 3 / 4], dtype=torch.float64))
    m = selective_metrics(probs, labels)
    assert m["aurc"] == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert m["e_aurc"] == pytest.approx(m["aurc"] - (0 + 0 + 0 + 1 / 4) / 4)  # the oracle answers the 3 right first
    assert m["acc@80"] == pytest.approx(3 / 4) and m["acc@90"] == pytest.approx(3 / 4)  # ceil(.8 * 4) = 4
    oracle = selective_metrics(probs, labels, confidence=(probs.argmax(1) == labels).double())
    assert oracle["e_aurc"] == 0


def test_ties_are_errors_first_and_order_free():
    probs = torch.tensor([[0.5, 0.5]] * 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    a, b = selective_metrics(probs, labels), selective_metrics(probs.flip(0), labels.flip(0))
    assert a == b and a["aurc"] == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4)


@PROPERTY
@given(st.integers(0, 2 ** 31 - 1))
def test_selective_accuracy_is_non_increasing_in_coverage_for_a_calibrated_toy(seed):
    """Confidence c ~ U(1/2, 1) over two classes, correct with probability c: calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    n = 20000
    conf = 0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    correct = torch.rand(n, generator=g, dtype=torch.float64) < conf
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.where(correct, 0, 1)
    curve = selective_curve(probs, labels)
    grid = [curve.accuracy_at(c / 10) for c in range(1, 11)]
    assert all(later <= earlier + 0.005 for earlier, later in zip(grid, grid[1:])), grid
    assert grid[0] > grid[-1] + 0.15  # abstaining helps: ~0.975 at 10 % vs ~0.75 at full coverage


def test_selective_errors_and_plot(tmp_path):
    probs, labels = torch.tensor([[0.7, 0.3], [0.4, 0.6]]), torch.tensor([0, 0])
    with pytest.raises(ShapeMismatchError, match="confidence"):
        selective_curve(probs, labels, torch.ones(3))
    with pytest.raises(InvalidValueError, match="coverage"):
        selective_curve(probs, labels).accuracy_at(0)
    path = plot_selective({"a": selective_curve(probs, labels)}, tmp_path / "selective.png")
    assert path.stat().st_size > 1000
