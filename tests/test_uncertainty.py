"""Uncertainty scores: hand-computed values, the entropy decomposition as a property, masks, errors;
every head's per-sample probabilities."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bayes_polar.bll.posterior import GaussianWeights
from bayes_polar.bll.predictive import logit_variance
from bayes_polar.data.features import Features
from bayes_polar.errors import InvalidValueError, ShapeMismatchError
from bayes_polar.evaluation.uncertainty import uncertainty, uncertainty_scores
from bayes_polar.models import IsotropicPrior
from bayes_polar.training.trainable_heads import PointHead, VariationalHead

PROPERTY = settings(max_examples=60, deadline=None)


def test_by_hand():
    # two draws that disagree with certainty: each is certain (aleatoric 0), the mean is uniform (total log 2)
    p = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    s = uncertainty_scores(p)
    assert s["max_prob"].item() == pytest.approx(0.5)
    assert s["entropy"].item() == pytest.approx(math.log(2))
    assert s["aleatoric"].item() == pytest.approx(0.0)
    assert s["mutual_information"].item() == pytest.approx(math.log(2))
    # two identical uniform draws: all aleatoric
    s = uncertainty_scores(torch.full((2, 1, 4), 0.25))
    assert s["aleatoric"].item() == pytest.approx(math.log(4)) and s["mutual_information"].item() == pytest.approx(0)
    assert uncertainty(s, "max_prob").item() == pytest.approx(0.75)


@st.composite
def sample_probs(draw, max_s=6):
    s, b, c = draw(st.integers(1, max_s)), draw(st.integers(1, 5)), draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    scale = draw(st.floats(0.1, 10.0))
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(s, b, c, generator=g, dtype=torch.float64)
    mask = torch.rand(b, c, generator=g) < 0.8
    mask[:, 0] = True
    return logits.masked_fill(~mask, float("-inf")).softmax(-1), mask


@PROPERTY
@given(sample_probs())
def test_total_is_aleatoric_plus_epistemic_and_all_nonnegative(case):
    p, mask = case
    s = uncertainty_scores(p, mask)
    torch.testing.assert_close(s["entropy"], s["aleatoric"] + s["mutual_information"], atol=1e-9, rtol=0)
    for name, value in s.items():
        assert value.shape == (p.shape[1],) and (value >= 0).all(), name
    assert (s["entropy"] <= mask.sum(-1).double().log() + 1e-9).all()  # at most log(#valid choices)
    assert ((s["max_prob"] > 0) & (s["max_prob"] <= 1)).all()


@PROPERTY
@given(sample_probs(max_s=1))
def test_one_draw_has_no_epistemic_uncertainty(case):
    p, mask = case
    s = uncertainty_scores(p, mask)
    assert (s["mutual_information"] == 0).all()
    torch.testing.assert_close(s["entropy"], s["aleatoric"])


def test_logit_variance_averages_valid_choices():
    p = torch.tensor([[[0.5, 0.5, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    s = uncertainty_scores(p, mask, logit_var=torch.tensor([[1.0, 3.0, 0.0]]))
    assert s["logit_variance"].item() == pytest.approx(2.0)
    assert "logit_variance" not in uncertainty_scores(p, mask)


def test_novelty_is_the_logit_variance_per_unit_feature_length():
    # Var(z_c) = ‖φ_c‖² · novelty_c: a masked choice and a zero feature (novelty 0 by definition) are left out
    p = torch.tensor([[[0.2, 0.3, 0.5, 0.0]]])
    mask = torch.tensor([[True, True, True, False]])
    s = uncertainty_scores(p, mask, logit_var=torch.tensor([[2.0, 3.0, 0.0, 9.0]]),
                           feature_norm2=torch.tensor([[4.0, 1.0, 0.0, 1.0]]))
    assert s["spread"].item() == pytest.approx(5.0 / 3)
    assert s["novelty"].item() == pytest.approx((0.5 + 3.0 + 0.0) / 3)
    assert "novelty" not in uncertainty_scores(p, mask, logit_var=torch.ones(1, 4))


def _gaussian_scores(q, phi, mask, scale=1.0):
    phi = scale * phi
    var = logit_variance(q, phi, mask)
    norm2 = phi.pow(2).sum(-1) * mask
    return uncertainty_scores(torch.full((1, *mask.shape), 1.0 / mask.shape[1]), mask, var, norm2)


def test_novelty_ignores_the_feature_scale_and_reads_the_posterior_variance():
    g = torch.Generator().manual_seed(0)
    phi, mask = torch.randn(6, 4, 5, generator=g), torch.ones(6, 4, dtype=torch.bool)
    # isotropic posterior Σ = σ² I: every direction equally uncertain, so novelty = σ² whatever φ is
    iso = GaussianWeights(torch.zeros(1, 5), diag=torch.full((1, 5), 0.3 ** 2))
    torch.testing.assert_close(_gaussian_scores(iso, phi, mask)["novelty"], torch.full((6,), 0.09, dtype=torch.float64))
    # any posterior: scaling the features by a scales spread and logit variance by a², novelty not at all
    q = GaussianWeights(torch.zeros(1, 5), factor=torch.randn(1, 5, 3, generator=g), diag=torch.rand(1, 5, generator=g))
    small, large = _gaussian_scores(q, phi, mask), _gaussian_scores(q, phi, mask, scale=7.0)
    torch.testing.assert_close(large["spread"], 49 * small["spread"], rtol=1e-5, atol=0)
    torch.testing.assert_close(large["logit_variance"], 49 * small["logit_variance"], rtol=1e-5, atol=0)
    torch.testing.assert_close(large["novelty"], small["novelty"], rtol=1e-5, atol=0)
    # the OOD case: options far apart along a direction the posterior is sure of get *more* logit variance
    # than options close together along one it knows nothing about; novelty ranks them the right way round
    q = GaussianWeights(torch.zeros(1, 5), diag=torch.tensor([[1e-4, 1.0, 1.0, 1.0, 1.0]]))
    known, new = torch.zeros(1, 2, 5), torch.zeros(1, 2, 5)
    known[0, :, 0], new[0, :, 1] = torch.tensor([10.0, -10.0]), torch.tensor([0.05, -0.05])
    two = torch.ones(1, 2, dtype=torch.bool)
    a, b = _gaussian_scores(q, known, two), _gaussian_scores(q, new, two)
    assert a["logit_variance"].item() == pytest.approx(0.01) and b["logit_variance"].item() == pytest.approx(0.0025)
    assert a["novelty"].item() == pytest.approx(1e-4) and b["novelty"].item() == pytest.approx(1.0)


def test_errors_say_what_to_pass():
    with pytest.raises(ShapeMismatchError, match=r"\(S, B, C\)"):
        uncertainty_scores(torch.full((3, 2), 0.5))
    with pytest.raises(InvalidValueError, match="not logits"):
        uncertainty_scores(torch.randn(2, 3, 4))
    with pytest.raises(InvalidValueError, match="missing"):
        uncertainty_scores(torch.full((1, 1, 2), 0.5), torch.tensor([[True, False]]))
    with pytest.raises(ShapeMismatchError, match="mask"):
        uncertainty_scores(torch.full((1, 1, 2), 0.5), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ShapeMismatchError, match="logit_var"):
        uncertainty_scores(torch.full((1, 1, 2), 0.5), logit_var=torch.ones(2))
    with pytest.raises(InvalidValueError, match="needs logit_var"):
        uncertainty_scores(torch.full((1, 1, 2), 0.5), feature_norm2=torch.ones(1, 2))
    with pytest.raises(ShapeMismatchError, match="feature_norm2"):
        uncertainty_scores(torch.full((1, 1, 2), 0.5), logit_var=torch.ones(1, 2), feature_norm2=torch.ones(2))
    with pytest.raises(InvalidValueError, match="squared norms"):
        uncertainty_scores(torch.full((1, 1, 2), 0.5), logit_var=torch.ones(1, 2), feature_norm2=-torch.ones(1, 2))
    with pytest.raises(InvalidValueError, match="No score"):
        uncertainty({}, "nope")


def test_heads_give_per_sample_probabilities():
    g = torch.Generator().manual_seed(0)
    phi, mask = torch.randn(8, 3, 5, generator=g), torch.ones(8, 3, dtype=torch.bool)
    mask[0, 2] = False
    y = torch.randint(0, 2, (8,), generator=g)
    features = Features(phi, mask)
    head = VariationalHead(5, 1, IsotropicPrior(1.0), "full", dataset_size=8)
    head.setup(features, y)
    samples = head.sample_proba(features, 64)
    assert samples.shape == (64, 8, 3) and (samples[:, 0, 2] == 0).all()
    torch.manual_seed(1)
    mean = head.sample_proba(features, 64).mean(0)
    torch.manual_seed(1)
    torch.testing.assert_close(head.predict_proba(features, 64), mean)  # the predictive is the draws' mean
    var = head.logit_variance(features)
    assert var.shape == (8, 3) and (var[mask] > 0).all() and var[0, 2] == 0
    scores = uncertainty_scores(samples, mask, var)
    assert (scores["mutual_information"] > 0).all()
    point = PointHead(torch.randn(1, 5))
    assert point.sample_proba(features).shape == (1, 8, 3) and point.logit_variance(features) is None
    assert (uncertainty_scores(point.sample_proba(features), mask)["mutual_information"] == 0).all()
