"""Properties of the head's predictions for any finite features and Gaussian posterior (hypothesis).

Magnitudes are bounded to what a trained head sees, with room to spare: features and posterior
means in [-10, 10] (logits up to ~600), factor entries in [-3, 3], diagonal variances in [0, 4]
(logit standard deviations up to ~150). Dtype float32, as in training.
"""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bayes_polar.bll.elbo import jensen_expected_loglik
from bayes_polar.bll.model import head_logits
from bayes_polar.bll.posterior import GaussianWeights
from bayes_polar.bll.predictive import mean_proba, predictive_proba

PROPERTY = settings(max_examples=60, deadline=None)


def _floats(draw, shape, low, high) -> torch.Tensor:
    elements = st.floats(low, high, allow_nan=False, allow_infinity=False, width=32)
    return torch.from_numpy(draw(arrays(np.float32, shape, elements=elements)))


@st.composite
def heads(draw, covariance=True):
    """``(q, phi, mask, y)``: letters (K = C rows, φ (B, 1, D)) or options (K = 1, φ (B, C, D)),
    rowwise or joint low-rank factor and/or a diagonal, a choice mask with >= 1 choice per row and
    labels on existing choices."""
    letters = draw(st.booleans())
    b, c, d, m = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    k = c if letters else 1
    loc = _floats(draw, (k, d), -10, 10)
    factor = diag = None
    rowwise = draw(st.booleans())
    if covariance:
        kind = draw(st.sampled_from(["factor", "diag", "both"]))
        if kind != "diag":
            factor = _floats(draw, (k, d, m) if rowwise else (k * d, m), -3, 3)
        if kind != "factor":
            diag = _floats(draw, (k, d), 0, 4)
    phi = _floats(draw, (b, 1 if letters else c, d), -10, 10)
    mask = torch.from_numpy(draw(arrays(np.bool_, (b, c))))
    first = torch.tensor(draw(st.lists(st.integers(0, c - 1), min_size=b, max_size=b)))
    mask[torch.arange(b), first] = True  # every question has at least one choice
    y = torch.stack([row.nonzero()[draw(st.integers(0, int(row.sum()) - 1))][0] for row in mask])
    return GaussianWeights(loc, factor=factor, diag=diag, rowwise=rowwise), phi, mask, y


def _assert_valid(probs: torch.Tensor, mask: torch.Tensor) -> None:
    assert probs.shape == mask.shape
    assert torch.isfinite(probs).all(), probs
    assert (probs >= 0).all() and (probs <= 1).all(), probs
    assert torch.allclose(probs.sum(-1), torch.ones(len(probs)), atol=1e-5), probs.sum(-1)
    assert (probs[~mask] == 0).all(), "a choice the question does not have gets probability 0"


@PROPERTY
@given(heads(), st.integers(1, 64), st.integers(0, 2**31 - 1))
def test_predictive_probabilities_are_valid(case, num_samples, seed):
    q, phi, mask, _ = case
    probs = predictive_proba(q, phi, mask, num_samples, generator=torch.Generator().manual_seed(seed))
    _assert_valid(probs, mask)


@PROPERTY
@given(heads())
def test_point_probabilities_are_valid(case):
    q, phi, mask, _ = case
    _assert_valid(mean_proba(q, phi, mask), mask)


@PROPERTY
@given(heads(covariance=False), st.integers(1, 16))
def test_without_posterior_variance_the_predictive_is_the_point_prediction(case, num_samples):
    q, phi, mask, _ = case
    q.diag = torch.zeros_like(q.loc)
    assert torch.allclose(predictive_proba(q, phi, mask, num_samples), mean_proba(q, phi, mask), atol=1e-6)


@PROPERTY
@given(heads())
def test_jensen_expected_loglik_is_finite_and_below_the_point_loglik(case):
    """m_y − log Σ_c exp(m_c + v_c/2) ≤ m_y − log Σ_c exp(m_c) = log softmax(m)_y ≤ 0, since v ≥ 0."""
    q, phi, mask, y = case
    bound = jensen_expected_loglik(q, phi, y, mask)
    assert bound.shape == y.shape and torch.isfinite(bound).all(), bound
    assert (bound <= 0).all(), bound
    point = head_logits(q.loc, phi, mask).log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert (bound <= point + 1e-4 * (1 + point.abs())).all(), (bound, point)


@PROPERTY
@given(heads(), st.data())
def test_masked_choices_do_not_change_the_existing_ones(case, data):
    """Features of a choice a question does not have are ignored (options format: per-choice φ)."""
    q, phi, mask, y = case
    if phi.shape[1] == 1 or mask.all():
        return  # letters share one φ; nothing masked
    noise = _floats(data.draw, tuple(phi.shape), -10, 10)
    other = torch.where(mask.unsqueeze(-1), phi, noise)
    assert torch.equal(mean_proba(q, phi, mask), mean_proba(q, other, mask))
    draws = [predictive_proba(q, f, mask, 8, generator=torch.Generator().manual_seed(0)) for f in (phi, other)]
    assert torch.equal(*draws)
    assert torch.allclose(jensen_expected_loglik(q, phi, y, mask), jensen_expected_loglik(q, other, y, mask))
