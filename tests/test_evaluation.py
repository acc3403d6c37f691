"""Metrics against hand-computed values and torchmetrics; properties with hypothesis; plots."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torchmetrics.functional.classification import multiclass_calibration_error

from bayes_polar.errors import NumericalError, ShapeMismatchError
from bayes_polar.evaluation.metrics import (
    accuracy,
    adaptive_calibration_error,
    brier_score,
    calibration_bins,
    classification_metrics,
    classwise_calibration_error,
    confidence_histogram,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    plot_elbo_trace,
    plot_reliability_diagrams,
    reliability_diagram,
)

F64 = torch.float64
PROPERTY = settings(max_examples=60, deadline=None)


def _tm_ece(probs, labels, n_bins, norm="l1"):
    """torchmetrics' top-label ECE (``norm="max"``: MCE), in percent."""
    return 100 * float(multiclass_calibration_error(probs, labels, probs.shape[1], n_bins=n_bins, norm=norm))


# ----------------------------------------------------------------------------- hand-computed
# conf = max prob: 0.9 (pred 0, right), 0.65 (pred 1, wrong), 0.7 (pred 1, right), 0.85 (pred 1, right)
SMALL_P = torch.tensor([[0.9, 0.1], [0.35, 0.65], [0.3, 0.7], [0.15, 0.85]], dtype=F64)
SMALL_Y = torch.tensor([0, 0, 1, 1])


def test_accuracy_by_hand():
    assert accuracy(SMALL_P, SMALL_Y) == pytest.approx(3 / 4)  # rows 0, 2, 3 right


def test_ece_by_hand():
    # 5 bins [0,.2) [.2,.4) [.4,.6) [.6,.8) [.8,1):
    #   [.6,.8): rows 1, 2 -> acc 1/2, conf (.65+.7)/2 = .675, |gap| .175, weight 2/4 -> .0875
    #   [.8,1):  rows 0, 3 -> acc 1,   conf (.9+.85)/2 = .875, |gap| .125, weight 2/4 -> .0625
    # ECE = .0875 + .0625 = .15 -> 15 %
    assert expected_calibration_error(SMALL_P, SMALL_Y, n_bins=5) == pytest.approx(15.0, abs=1e-9)
    # 1 bin: acc 3/4, conf (.9+.65+.7+.85)/4 = .775 -> |.75-.775| = .025 -> 2.5 %
    assert expected_calibration_error(SMALL_P, SMALL_Y, n_bins=1) == pytest.approx(2.5, abs=1e-9)


def test_nll_by_hand():
    # -(ln .9 + ln .35 + ln .7 + ln .85) / 4 = (.1053605 + 1.0498221 + .3566749 + .1625189) / 4
    expected = (0.1053605 + 1.0498221 + 0.3566749 + 0.1625189) / 4  # = .4185941
    assert negative_log_likelihood(SMALL_P, SMALL_Y) == pytest.approx(expected, abs=1e-6)


def test_brier_by_hand():
    # row 0: .1² + .1² = .02; row 1: .65² + .65² = .845; row 2: .3² + .3² = .18; row 3: .15² + .15² = .045
    # mean = (.02 + .845 + .18 + .045) / 4 = 1.09 / 4 = .2725
    assert brier_score(SMALL_P, SMALL_Y) == pytest.approx(0.2725, abs=1e-12)


def test_padded_class_with_zero_probability():
    # third class does not exist for row 0 (p = 0); row 1 has all three
    p = torch.tensor([[0.6, 0.4, 0.0], [0.2, 0.3, 0.5]], dtype=F64)
    y = torch.tensor([1, 2])
    # Brier: row 0: .6² + .6² + 0 = .72; row 1: .2² + .3² + .5² = .38 -> mean .55
    assert brier_score(p, y) == pytest.approx(0.55, abs=1e-12)
    # NLL: -(ln .4 + ln .5) / 2 = (.9162907 + .6931472) / 2 = .8047190
    assert negative_log_likelihood(p, y) == pytest.approx(0.8047190, abs=1e-6)
    # a label on a zero-probability class is clamped, not infinite: -ln(1e-12) = 27.631
    assert negative_log_likelihood(p[:1], torch.tensor([2])) == pytest.approx(-math.log(1e-12))


def test_bins_are_left_closed_like_torchmetrics():
    # n_bins=2: conf .5 (right) and .75 (wrong) both fall in [.5, 1): acc .5, conf .625 -> 12.5 %
    # (with right-closed bins (0,.5] (.5,1] it would be .5·.5 + .5·.75 = 62.5 %)
    p = torch.tensor([[0.5, 0.25, 0.25], [0.75, 0.25, 0.0]], dtype=F64)
    y = torch.tensor([0, 1])
    assert expected_calibration_error(p, y, n_bins=2) == pytest.approx(12.5)
    assert _tm_ece(p, y, 2) == pytest.approx(12.5, abs=1e-4)


def test_confidence_one_is_its_own_cell_like_torchmetrics():
    # n_bins=1: conf 1.0 (wrong) is the cell {1}: |0 - 1| · 1/2 = .5; conf .8 (right): |1 - .8| · 1/2 = .1
    # -> 60 % (merged into one bin it would be |.5 - .9| = 40 %)
    p = torch.tensor([[1.0, 0.0], [0.8, 0.2]], dtype=F64)
    y = torch.tensor([1, 0])
    assert expected_calibration_error(p, y, n_bins=1) == pytest.approx(60.0)
    assert _tm_ece(p, y, 1) == pytest.approx(60.0, abs=1e-4)
    bins = calibration_bins(p, y, n_bins=1)
    assert bins.count.tolist() == [1.0, 1.0]


def test_metrics_dict_is_plain_python():
    m = classification_metrics(SMALL_P, SMALL_Y, n_bins=5)
    assert set(m) == {"acc", "ece", "ace", "mce", "cw_ece", "nll", "brier", "n"}
    assert all(type(m[k]) is float for k in ("acc", "ece", "ace", "mce", "cw_ece", "nll", "brier"))
    assert type(m["n"]) is int
    assert m["ece"] == pytest.approx(15.0) and m["n"] == 4


# ----------------------------------------------------------------------------- torchmetrics
def _random_case(seed, n=400, c=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 4
    logits[: n // 10, -1] = -math.inf  # padded class for 10 % of the questions
    probs = logits.softmax(dim=1)
    probs[n // 10 : n // 5] = torch.nn.functional.one_hot(torch.randint(0, c, (n // 10,), generator=g), c).float()
    return probs, torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("n_bins", [1, 2, 7, 10, 15, 50])
@pytest.mark.parametrize("seed", [0, 1])
def test_ece_agrees_with_torchmetrics(n_bins, seed):
    probs, labels = _random_case(seed)
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(_tm_ece(probs, labels, n_bins), abs=1e-3)
    assert maximum_calibration_error(probs, labels, n_bins) == pytest.approx(
        _tm_ece(probs, labels, n_bins, "max"), abs=1e-3)


def test_mce_ace_and_classwise_by_hand():
    # SMALL_P, 5 equal-width bins: gaps .175 (rows 1, 2) and .125 (rows 0, 3) -> MCE 17.5 %
    assert maximum_calibration_error(SMALL_P, SMALL_Y, n_bins=5) == pytest.approx(17.5)
    # equal mass, 2 bins: sorted conf .65 (wrong) .7 | .85 .9 -> |.5 - .675| * 2/4 + |1 - .875| * 2/4 = .15
    assert adaptive_calibration_error(SMALL_P, SMALL_Y, n_bins=2) == pytest.approx(15.0)
    # as many bins as examples: mean |conf - correct| = (.1 + .65 + .3 + .15) / 4 = .3
    assert adaptive_calibration_error(SMALL_P, SMALL_Y, n_bins=4) == pytest.approx(30.0)
    assert adaptive_calibration_error(SMALL_P, SMALL_Y, n_bins=1) == pytest.approx(
        expected_calibration_error(SMALL_P, SMALL_Y, n_bins=1))
    # classwise, 1 bin: class 0: |freq 2/4 - mean p (.9+.35+.3+.15)/4 = .425| = .075; class 1: the same -> 7.5 %
    assert classwise_calibration_error(SMALL_P, SMALL_Y, n_bins=1) == pytest.approx(7.5)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("probs", "labels", "error", "match"),
    [
        (torch.full((3, 2), 0.5), torch.zeros(4, dtype=torch.long), ShapeMismatchError, r"\(3, 2\).*\(4,\)"),
        (torch.full((3,), 0.5), torch.zeros(3, dtype=torch.long), ShapeMismatchError, r"\(N, C\)"),
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), ShapeMismatchError, "empty"),
        (torch.full((2, 2), 0.5), torch.tensor([0, 2]), ValueError, r"\[0, 2\).*labels\[1\] = 2"),
        (torch.full((2, 2), 0.5), torch.tensor([-1, 0]), ValueError, r"labels\[0\] = -1"),
        (torch.tensor([[0.5, 0.5], [float("nan"), 1.0]]), torch.tensor([0, 1]), NumericalError, "row 1"),
        (torch.tensor([[0.5, 0.5], [0.5, float("inf")]]), torch.tensor([0, 1]), NumericalError, "row 1"),
        (torch.tensor([[0.5, 0.5], [0.5, 0.4], [0.5, 0.49]]), torch.tensor([0, 1, 0]), ValueError, "worst is row 1"),
        (torch.tensor([[1.5, -0.5]]), torch.tensor([0]), ValueError, ">= 0"),
        (torch.full((2, 2), 0.5), torch.tensor([0.0, 1.0]), TypeError, "integer"),
        (torch.ones(2, 2, dtype=torch.long), torch.tensor([0, 1]), TypeError, "floating"),
    ],
)
def test_invalid_inputs(probs, labels, error, match):
    for metric in (accuracy, expected_calibration_error, negative_log_likelihood, brier_score, classification_metrics):
        with pytest.raises(error, match=match):
            metric(probs, labels)


def test_input_errors_are_library_errors():
    from bayes_polar.errors import BayesPolarError, InvalidTypeError, InvalidValueError

    with pytest.raises(InvalidValueError) as info:
        accuracy(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))
    assert isinstance(info.value, (BayesPolarError, ValueError))
    with pytest.raises(InvalidTypeError) as info:
        accuracy(torch.full((2, 2), 0.5), torch.tensor([0.0, 1.0]))
    assert isinstance(info.value, (BayesPolarError, TypeError))


@pytest.mark.parametrize("n_bins", [0, -3, 2.5, True, "15"])
def test_invalid_n_bins(n_bins):
    with pytest.raises(ValueError, match="n_bins >= 1"):
        expected_calibration_error(SMALL_P, SMALL_Y, n_bins=n_bins)


def test_logits_get_a_hint():
    with pytest.raises(ValueError, match="not logits"):
        accuracy(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))


# ----------------------------------------------------------------------------- properties
@st.composite
def cases(draw):
    """(probs (N, C) float64 with zeros, one-hots and near-saturated rows, labels (N,))."""
    n, c = draw(st.integers(1, 20)), draw(st.integers(1, 6))
    logits = draw(arrays(np.float64, (n, c), elements=st.floats(-40, 40)))
    absent = draw(arrays(np.bool_, (n, c)))
    absent[:, 0] = False  # every question has at least one class
    logits = torch.from_numpy(np.where(absent, -np.inf, logits))
    labels = torch.from_numpy(draw(arrays(np.int64, (n,), elements=st.integers(0, c - 1))))
    return logits.softmax(dim=1), labels


def _all(probs, labels, n_bins=15):
    return classification_metrics(probs, labels, n_bins)


@PROPERTY
@given(cases(), st.integers(1, 30))
def test_ranges(case, n_bins):
    m = _all(*case, n_bins)
    assert 0 <= m["acc"] <= 1
    for key in ("ece", "ace", "mce", "cw_ece"):
        assert 0 <= m[key] <= 100 + 1e-9, key
    assert m["ece"] <= m["mce"] + 1e-9  # a weighted mean of gaps never exceeds their maximum
    assert m["nll"] >= 0
    assert 0 <= m["brier"] <= 2 + 1e-12


@PROPERTY
@given(cases(), st.randoms(use_true_random=False))
def test_invariant_to_permuting_examples(case, rng):
    probs, labels = case
    order = torch.tensor(rng.sample(range(len(labels)), len(labels)))
    before, after = _all(probs, labels), _all(probs[order], labels[order])
    assert after == pytest.approx(before, abs=1e-9)


@PROPERTY
@given(cases(), st.randoms(use_true_random=False))
def test_invariant_to_permuting_classes_with_labels(case, rng):
    probs, labels = case
    top2 = probs.topk(min(2, probs.shape[1]), dim=1).values
    assume(probs.shape[1] == 1 or bool((top2[:, 0] > top2[:, 1]).all()))  # ties make argmax order-dependent
    perm = torch.tensor(rng.sample(range(probs.shape[1]), probs.shape[1]))  # new class j is old perm[j]
    new_labels = torch.argsort(perm)[labels]
    assert _all(probs[:, perm], new_labels) == pytest.approx(_all(probs, labels), abs=1e-9)


@PROPERTY
@given(st.integers(1, 20), st.integers(1, 6), st.data())
def test_perfect_one_hot_predictions(n, c, data):
    labels = torch.tensor(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    probs = torch.nn.functional.one_hot(labels, c).double()
    m = _all(probs, labels, data.draw(st.integers(1, 30)))
    assert m["acc"] == 1 and m["ece"] == 0 and m["brier"] == 0
    assert m["ace"] == m["mce"] == m["cw_ece"] == 0
    assert m["nll"] == pytest.approx(0, abs=1e-12)


@PROPERTY
@given(cases(), st.integers(1, 30))
def test_torchmetrics_agreement_property(case, n_bins):
    probs, labels = case
    padded = torch.cat([probs, torch.zeros(len(probs), 1, dtype=F64)], dim=1)  # torchmetrics needs C >= 2
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(_tm_ece(padded, labels, n_bins), abs=1e-3)
    assert maximum_calibration_error(probs, labels, n_bins) == pytest.approx(
        _tm_ece(padded, labels, n_bins, "max"), abs=1e-3)


@PROPERTY
@given(cases(), st.integers(1, 30))
def test_ece_between_one_bin_and_per_example_gaps(case, n_bins):
    """Coarser partitions average gaps away: ECE(1 bin) <= ECE(M bins) <= 100 * mean |conf - correct|."""
    probs, labels = case
    conf, pred = probs.max(dim=1)
    per_example = 100 * float((conf - (pred == labels).double()).abs().mean())
    one, many = expected_calibration_error(probs, labels, 1), expected_calibration_error(probs, labels, n_bins)
    assert one <= many + 1e-9 and many <= per_example + 1e-9


@PROPERTY
@given(cases(), st.integers(2, 4))
def test_invariant_to_repeating_the_data(case, copies):
    probs, labels = case
    repeated, once = _all(probs.repeat(copies, 1), labels.repeat(copies)), _all(probs, labels)
    repeated.pop("ace"), once.pop("ace")  # equal-mass bins hold N/M examples: they change with N
    assert repeated == pytest.approx({**once, "n": copies * len(labels)}, abs=1e-9)


@PROPERTY
@given(cases())
def test_nll_is_the_mean_negative_log_probability_of_the_label(case):
    probs, labels = case
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    assume(bool((p_true >= 1e-12).all()))
    assert negative_log_likelihood(probs, labels) == pytest.approx(float(-p_true.log().mean()), rel=1e-12, abs=1e-12)


@PROPERTY
@given(cases(), st.floats(0.05, 20))
def test_accuracy_is_invariant_to_temperature(case, temperature):
    probs, labels = case
    top2 = probs.topk(min(2, probs.shape[1]), dim=1).values
    assume(probs.shape[1] == 1 or bool((top2[:, 0] > top2[:, 1] * (1 + 1e-6)).all()))
    scaled = (probs.log() / temperature).softmax(dim=1)
    assert accuracy(scaled, labels) == accuracy(probs, labels)


# ----------------------------------------------------------------------------- plots
def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000


@pytest.fixture
def no_new_figures():
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before


def test_reliability_diagram(tmp_path, no_new_figures):
    probs, labels = _random_case(0)
    path = reliability_diagram(probs, labels, tmp_path / "sub" / "rel.png", n_bins=10, title="MLE")
    assert path == tmp_path / "sub" / "rel.png"
    _assert_png(path)


def test_reliability_diagram_into_given_axes(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    try:
        assert reliability_diagram(SMALL_P, SMALL_Y, None, ax=ax) is None
        _assert_png(reliability_diagram(SMALL_P, SMALL_Y, tmp_path / "ax.png", ax=ax))
        assert plt.fignum_exists(fig.number)  # the caller's figure is left open
    finally:
        plt.close(fig)


def test_reliability_grid_and_other_plots(tmp_path, no_new_figures):
    a, b = _random_case(0), _random_case(1)
    _assert_png(plot_reliability_diagrams({"MLE": a, "VBLL": b, "MAP": a, "Ens": b}, tmp_path / "grid.png", title="ARC-E"))
    _assert_png(plot_elbo_trace([-3.0, -2.0, -1.5, float("nan"), -1.2], tmp_path / "elbo.png"))
    _assert_png(plot_elbo_trace({"seed 0": [-3, -2], "seed 1": [-4, -1]}, tmp_path / "elbo2.png"))
    _assert_png(confidence_histogram({"ID": a[0], "OOD": b[0][:50]}, tmp_path / "conf.png"))


def test_plots_validate(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_reliability_diagrams({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-empty"):
        plot_elbo_trace([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="sum to 1"):
        confidence_histogram({"ID": torch.ones(2, 2)}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
