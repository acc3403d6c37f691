"""The guide contract over GUIDES: fit, recover a known decision rule, match NUTS, load from a user file."""
import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVI

from bayes_polar.bll.elbo import make_elbo
from bayes_polar.errors import ConfigError
from bayes_polar.guides import GUIDES, DiagonalGuide, FullCovarianceGuide, LowRankGuide
from bayes_polar.bll.model import BayesianLastLayer, head_logits
from bayes_polar.models import ARDPrior, IsotropicPrior
from bayes_polar.bll.posterior import weight_posterior
from bayes_polar.bll.predictive import mean_proba, predictive_proba, pyro_predictive_proba
from bayes_polar.bll.registry import load_guide, make_guide


def synthetic(num_rows, num_classes, features=5, n=300, seed=0, scale=3.0):
    """Features and labels drawn from a known W (K × D)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(num_rows, features, generator=g) * scale / features ** 0.5
    phi = torch.randn(n, 1 if num_rows == num_classes else num_classes, features, generator=g)
    mask = torch.ones(n, num_classes, dtype=torch.bool)
    if num_rows == 1:
        mask[: n // 5, -1] = False  # some questions have one option fewer
    logits = head_logits(W, phi, mask)
    y = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(-1)
    return W, phi, mask, y


def fit(head, guide, phi, mask, y, estimator="jensen", steps=300, lr=0.05):
    svi = SVI(head, guide, pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.01 ** (1 / steps)}),
              make_elbo(estimator, num_particles=8))
    losses = [svi.step(phi, mask, y, dataset_size=len(y)) for _ in range(steps)]
    return losses


@pytest.mark.parametrize("name", sorted(GUIDES))
@pytest.mark.parametrize("rows,classes", [(1, 4), (3, 3)])
def test_every_guide_recovers_the_decision_rule(name, rows, classes):
    W, phi, mask, y = synthetic(rows, classes)
    head = BayesianLastLayer(phi.shape[-1], rows, IsotropicPrior(1.0))
    guide = make_guide(name, head)
    losses = fit(head, guide, phi[:200], mask[:200], y[:200])
    assert sum(losses[-20:]) < sum(losses[:20])
    q = weight_posterior(guide)
    test = slice(200, None)
    truth = head_logits(W, phi[test], mask[test]).argmax(-1)
    agreement = (mean_proba(q, phi[test], mask[test]).argmax(-1) == truth).float().mean()
    assert agreement >= 0.9, agreement
    assert torch.equal(guide.median(phi, mask, y)["head.W"], q.loc)


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_every_guide_fits_a_hierarchical_prior_by_monte_carlo(name):
    W, phi, mask, y = synthetic(1, 4, n=120)
    head = BayesianLastLayer(phi.shape[-1], 1, ARDPrior())
    guide = make_guide(name, head)
    losses = fit(head, guide, phi, mask, y, estimator="mc", steps=60)
    assert all(torch.isfinite(torch.tensor(losses)))
    probs = pyro_predictive_proba(guide, phi, mask, num_samples=64)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(y)))
    assert (probs[~mask] == 0).all()
    assert {"head.W", "head.ard_scale"} <= set(pyro.poutine.trace(guide).get_trace(phi, mask, y).nodes)


def _vi_moments(guide_cls, head, phi, mask, y):
    pyro.clear_param_store()
    guide = guide_cls(head, init_scale=0.1)
    fit(head, guide, phi, mask, y, estimator="mc", steps=1500, lr=0.02)
    q = weight_posterior(guide)
    return q.loc.detach().reshape(-1), q.covariance().detach()


def _corr(cov):
    return cov / torch.outer(cov.diagonal().sqrt(), cov.diagonal().sqrt())


def test_full_covariance_guide_matches_nuts():
    """On a small problem with correlated features the full-covariance VI posterior (exact MC
    ELBO) matches NUTS in mean, spread and correlations; a diagonal guide cannot."""
    torch.manual_seed(0)
    W, phi, mask, y = synthetic(1, 3, features=3, n=80, seed=3, scale=2.0)
    phi = phi @ torch.tensor([[1.0, 0.8, 0.0], [0.0, 0.6, 0.0], [0.3, 0.0, 1.0]])  # correlated features
    head = BayesianLastLayer(3, 1, IsotropicPrior(1.0))
    mcmc = MCMC(NUTS(head, jit_compile=False), num_samples=600, warmup_steps=300, disable_progbar=True)
    mcmc.run(phi, mask, y)
    draws = mcmc.get_samples()["head.W"].reshape(-1, 3)
    nuts_mean, nuts_cov = draws.mean(0), torch.cov(draws.T)
    nuts_sd = nuts_cov.diagonal().sqrt()
    assert _corr(nuts_cov)[0, 1] < -0.5, "the problem must have strong posterior correlation"

    vi_mean, vi_cov = _vi_moments(FullCovarianceGuide, head, phi, mask, y)
    assert ((vi_mean - nuts_mean).abs() / nuts_sd).max() < 0.25, (vi_mean, nuts_mean, nuts_sd)
    ratio = vi_cov.diagonal().sqrt() / nuts_sd
    assert ((ratio > 0.8) & (ratio < 1.2)).all(), ratio
    assert (_corr(vi_cov) - _corr(nuts_cov)).abs().max() < 0.15

    _, diag_cov = _vi_moments(DiagonalGuide, head, phi, mask, y)
    assert (_corr(diag_cov) - _corr(nuts_cov)).abs().max() > 0.5, "the check must be able to fail"


def test_predictive_probabilities_and_convergence():
    W, phi, mask, y = synthetic(1, 4, n=50)
    head = BayesianLastLayer(phi.shape[-1], 1, IsotropicPrior(1.0))
    guide = make_guide("full", head)
    fit(head, guide, phi, mask, y, steps=50)
    q = weight_posterior(guide)
    with torch.no_grad():
        closed = predictive_proba(q, phi, mask, num_samples=20000)
        mc = pyro_predictive_proba(guide, phi, mask, num_samples=20000)
        few = predictive_proba(q, phi, mask, num_samples=10)
    torch.testing.assert_close(closed.sum(-1), torch.ones(50))
    assert (closed[~mask] == 0).all() and (closed >= 0).all()
    assert (closed - mc).abs().max() < 0.02
    assert (closed - few).abs().max() > (closed - mc).abs().max(), "more samples, closer agreement"


@pytest.mark.parametrize("build,message", [
    (lambda h: FullCovarianceGuide(h, init_scale=0.0), "Expected init_scale > 0 but got 0.0"),
    (lambda h: LowRankGuide(h, rank=0), "Expected rank >= 1 but got 0"),
])
def test_guide_arguments_are_validated(build, message):
    with pytest.raises(ConfigError, match=message):
        build(BayesianLastLayer(3, 1))


def test_weight_guide_alone_refuses_hyperparameters():
    head = BayesianLastLayer(3, 1, ARDPrior())
    with pytest.raises(ConfigError, match="make_guide"):
        FullCovarianceGuide(head)(torch.randn(4, 2, 3), None, torch.zeros(4, dtype=torch.long))


USER_GUIDE = '''
from functools import partial

from pyro.infer.autoguide import AutoLaplaceApproximation


def MapGuide(model):
    """A point-mass guide (MAP), written by a user."""
    return AutoLaplaceApproximation(model)
'''


def test_guide_from_a_user_file(tmp_path):
    path = tmp_path / "my_guide.py"
    path.write_text(USER_GUIDE)
    builder = load_guide(str(path))
    W, phi, mask, y = synthetic(1, 4, n=100)
    head = BayesianLastLayer(phi.shape[-1], 1, IsotropicPrior(1.0))
    guide = make_guide(builder, head)
    fit(head, guide, phi, mask, y, estimator="mc", steps=100)
    probs = pyro_predictive_proba(guide, phi, mask, num_samples=8)
    torch.testing.assert_close(probs.sum(-1), torch.ones(100))
    with pytest.raises(ConfigError, match="Unknown guide"):
        load_guide("gaussian")
