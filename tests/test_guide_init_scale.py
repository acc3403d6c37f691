"""A posterior that moves: the guide starts at a fraction of the prior's scale, not at a fixed 0.01."""
import pyro
import pytest
import torch

from bayes_polar.bll.model import prior_scale
from bayes_polar.data.features import Features
from bayes_polar.data.normalization import FeatureScaling, centre_options
from bayes_polar.models import ARDPrior, StudentTPrior, WidthScaledPrior
from bayes_polar.training.trainable_heads import VariationalHead

D, CHOICES = 32, 4


def _questions(n, g, basis, w):
    """Hidden-state-like options: low-rank structure, a large component shared by the question's options, noise."""
    phi = (torch.randn(n, CHOICES, basis.shape[0], generator=g) @ basis + 0.3 * torch.randn(n, CHOICES, D, generator=g)
           + 3.0 * torch.randn(n, 1, D, generator=g))
    labels = torch.distributions.Categorical(logits=(phi * w).sum(-1)).sample()
    return phi, torch.ones(n, CHOICES, dtype=torch.bool), labels


def test_prior_scale_of_the_priors():
    assert prior_scale(WidthScaledPrior(), 578, 1) == pytest.approx((2 / 578) ** 0.5)
    assert prior_scale(StudentTPrior(scale=0.3), 10, 2) == pytest.approx(0.3)
    state = torch.random.get_rng_state()
    assert 0.1 < prior_scale(ARDPrior(global_scale=1.0), 16, 1) < 10  # hierarchical: median over draws
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG is left as it was"


def test_the_predictive_leaves_the_point_prediction_where_data_are_scarce_only():
    g = torch.Generator().manual_seed(0)
    basis, w = torch.randn(6, D, generator=g), 0.3 * torch.randn(1, D, generator=g)
    held, pool = _questions(500, g, basis, w), _questions(2000, g, basis, w)
    scaling = FeatureScaling.fit(centre_options(pool[0], pool[1]), pool[1])
    prepare = lambda phi, mask: Features(scaling(centre_options(phi, mask)), mask)  # noqa: E731
    held_features = prepare(held[0], held[1])
    prior = WidthScaledPrior()

    def gap(n, fraction):
        """Mean total-variation distance between the posterior predictive and the point prediction."""
        pyro.clear_param_store()
        features, labels = prepare(pool[0][:n], pool[1][:n]), pool[2][:n]
        head = VariationalHead(D, 1, prior, "full", dataset_size=n, lr=1e-2,
                               init_scale=fraction * prior_scale(prior, D, 1))
        head.setup(features, labels)
        for _ in range(150):
            head.guide_step(features, labels)
        torch.manual_seed(0)
        predictive, point = head.predict_proba(held_features, 512), head.point_proba(held_features)
        return 0.5 * (predictive - point).abs().sum(-1).mean().item()

    scarce, plentiful = gap(10, 0.5), gap(2000, 0.5)
    assert scarce > 0.02, scarce  # measured 0.046
    assert plentiful < 0.01 and scarce > 5 * plentiful, (scarce, plentiful)  # measured 0.002
    assert gap(10, 0.01 / prior_scale(prior, D, 1)) < 0.01  # the old fixed 0.01 barely moves in 150 steps
