"""VBLL's learned logit noise: its Wishart prior, its place in the Jensen bound and the predictive, its state."""
import math

import pytest
import torch

from bayes_polar.bll.logit_noise import SITE, LogitNoise
from bayes_polar.config import FitConfig
from bayes_polar.data.features import Features
from bayes_polar.errors import ConfigError
from bayes_polar.models import WidthScaledPrior
from bayes_polar.training.trainable_heads import VariationalHead


@pytest.mark.parametrize("rows, classes", [(4, 4), (1, 4)])  # letters (a noise per class), options (one shared)
def test_log_prior_is_vbll_s_wishart_on_the_diagonal_precision(rows, classes):
    import pyro

    noise, dof, scale = LogitNoise(rows, classes, dof=1.0, wishart_scale=2.0), 1.0, 2.0
    wishart = torch.distributions.Wishart(df=torch.tensor(dof + 2 * classes + 2.0),
                                          covariance_matrix=torch.eye(classes) / scale)
    gaps = []
    for variance in (torch.rand(rows) + 0.1 for _ in range(4)):
        pyro.param(SITE, variance)  # set σ²
        pyro.get_param_store()[SITE] = variance
        precision = torch.diag((1 / variance).expand(classes))
        gaps.append(noise.log_prior().item() - wishart.log_prob(precision).item())
        pyro.clear_param_store()
    assert max(gaps) - min(gaps) < 1e-3, gaps  # equal up to the normalising constant


def _variance(head) -> float:
    with head.scope():
        return head.model.logit_noise.variance().item()


def _options(n, choices=4, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, choices, dim, generator=g)
    labels = torch.distributions.Categorical(logits=phi[..., 0] * 2).sample()
    return Features(phi, torch.ones(n, choices, dtype=torch.bool)), labels


def test_a_shared_noise_reaches_its_closed_form_optimum():
    """options: the bound loses exactly σ²/2 per example, so σ²* solves −N/2 − C·a/σ² + s·C/(2σ⁴) = 0."""
    n, choices = 200, 4
    features, labels = _options(n, choices)
    noise = LogitNoise(1, choices)
    head = VariationalHead(6, 1, WidthScaledPrior(), "full", dataset_size=n, lr=5e-2, logit_noise=noise,
                           init_scale=0.1)
    head.setup(features, labels)
    start = _variance(head)
    assert start == pytest.approx(1 / (1 + choices + 1))  # the prior's mode
    for _ in range(400):
        head.guide_step(features, labels)
    a, s = noise.concentration, noise.wishart_scale
    optimum = (-choices * a + math.sqrt((choices * a) ** 2 + n * s * choices)) / n
    assert _variance(head) == pytest.approx(optimum, rel=0.05), (_variance(head), optimum)


def test_noise_widens_the_predictive_and_is_saved_with_the_head():
    features, labels = _options(64)
    heads = []
    for noise in (None, LogitNoise(1, 4)):
        head = VariationalHead(6, 1, WidthScaledPrior(), "full", dataset_size=64, init_loc=torch.ones(1, 6),
                               init_scale=0.05, logit_noise=noise)
        head.setup(features, labels)
        with head.scope():
            import pyro
            if noise is not None:
                pyro.get_param_store()[SITE] = torch.tensor([2.0])
        heads.append(head)
    torch.manual_seed(0)
    plain = heads[0].predict_proba(features, 2048)
    torch.manual_seed(0)
    noisy = heads[1].predict_proba(features, 2048)
    assert noisy.max(-1).values.mean() < plain.max(-1).values.mean() - 0.02
    torch.testing.assert_close(heads[1].point_proba(features), heads[0].point_proba(features))  # mean logits only
    saved = heads[1].state_tensors()
    assert SITE in saved
    fresh = VariationalHead(6, 1, WidthScaledPrior(), "full", dataset_size=64, logit_noise=LogitNoise(1, 4))
    fresh.setup(features, labels)
    fresh.load_state_tensors(saved)
    assert _variance(fresh) == pytest.approx(2.0)


def test_logit_noise_options_are_checked():
    with pytest.raises(ConfigError, match="jensen"):
        FitConfig(model="tiny-random-llama", logit_noise=True, elbo="mc")
    with pytest.raises(ConfigError, match="variational"):
        FitConfig(model="tiny-random-llama", logit_noise=True, method="lora-mle")
    with pytest.raises(ConfigError, match="jensen"):
        VariationalHead(6, 1, WidthScaledPrior(), "full", dataset_size=4, estimator="mc", logit_noise=LogitNoise(1, 4))
    assert FitConfig(model="tiny-random-llama", logit_noise=True, method="lora-vbll").logit_noise
