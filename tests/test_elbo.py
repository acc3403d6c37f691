"""The closed-form (Jensen) ELBO: a true lower bound, tight as q shrinks, and consistent with Pyro's MC ELBO."""
import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from bayes_polar.bll.elbo import JensenELBO, jensen_expected_loglik, make_elbo
from bayes_polar.errors import ConfigError
from bayes_polar.bll.model import BayesianLastLayer
from bayes_polar.models import IsotropicPrior, StudentTPrior
from bayes_polar.bll.posterior import GaussianWeights, kl_to_normal, weight_posterior
from bayes_polar.bll.registry import make_guide


def _random_case(seed, K, C, D=5, B=6, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(K, D, generator=g)
    tril = torch.tril(torch.randn(K, D, D, generator=g) * 0.4, -1) + torch.diag_embed(torch.rand(K, D, generator=g) + 0.2)
    q = GaussianWeights(loc, factor=tril * spread, triangular=True)
    phi = torch.randn(B, 1 if K == C else C, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    return q, phi, y


def _mc_expected_loglik(q, phi, y, num_samples=20000):
    W = q.rsample((num_samples,)).unsqueeze(1)  # (S, 1, K, D)
    logp = (W * phi).sum(-1).log_softmax(-1).gather(-1, y.expand(num_samples, -1).unsqueeze(-1)).squeeze(-1)
    return logp.mean(0), logp.std(0) / num_samples ** 0.5


@pytest.mark.parametrize("seed", range(30))
def test_jensen_bound_is_below_the_monte_carlo_estimate(seed):
    torch.manual_seed(seed)
    K, C = (3, 3) if seed % 2 else (1, 4)
    q, phi, y = _random_case(seed, K, C)
    bound = jensen_expected_loglik(q, phi, y)
    estimate, stderr = _mc_expected_loglik(q, phi, y)
    assert (bound <= estimate + 4 * stderr).all(), (bound, estimate, stderr)


def test_gap_shrinks_as_the_covariance_shrinks():
    torch.manual_seed(0)
    gaps = []
    for spread in (1.0, 0.3, 0.1, 0.01):
        q, phi, y = _random_case(7, 3, 3, spread=spread)
        gaps.append((_mc_expected_loglik(q, phi, y)[0] - jensen_expected_loglik(q, phi, y)).mean().item())
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] >= -1e-3 and gaps[3] < 1e-3, gaps
    assert gaps[0] > 0.05


def test_mask_excludes_missing_choices():
    q, phi, y = _random_case(1, 1, 4)
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[:, 3] = False
    y = y.clamp(max=2)
    masked = jensen_expected_loglik(q, phi, y, mask)
    dropped = jensen_expected_loglik(q, phi[:, :3], y)
    torch.testing.assert_close(masked, dropped)


def _fitted(prior=None, guide="full", K=1, C=3, D=4, B=10):
    torch.manual_seed(0)
    head = BayesianLastLayer(D, K, prior or IsotropicPrior(0.5))
    phi = torch.randn(B, 1 if K == C else C, D)
    y = torch.randint(0, C, (B,))
    g = make_guide(guide, head)
    svi = SVI(head, g, pyro.optim.Adam({"lr": 0.05}), JensenELBO())
    for _ in range(5):
        svi.step(phi, None, y, dataset_size=40)
    return head, g, phi, y


def test_jensen_elbo_is_built_from_the_prior_and_guide_objects():
    head, guide, phi, y = _fitted()
    q = weight_posterior(guide)
    expected = -(jensen_expected_loglik(q, phi, y).sum() * 40 / 10 - kl_to_normal(q, torch.zeros(()), torch.tensor(0.5)))
    loss = JensenELBO().differentiable_loss(head, guide, phi, None, y, dataset_size=40)
    torch.testing.assert_close(loss, expected)
    half = JensenELBO().differentiable_loss(head, guide, phi, None, y, dataset_size=40, kl_scale=0.5)
    torch.testing.assert_close(half, expected - 0.5 * kl_to_normal(q, torch.zeros(()), torch.tensor(0.5)))


@pytest.mark.parametrize("guide", ["full", "diagonal", "lowrank", "auto_mvn", "auto_normal"])
def test_jensen_elbo_lower_bounds_the_exact_elbo(guide):
    head, g, phi, y = _fitted(guide=guide, K=3, C=3)
    jensen_loss = JensenELBO().loss(head, g, phi, None, y, dataset_size=40)
    mc = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    mc_loss = mc.loss(head, g, phi, None, y, dataset_size=40)
    assert jensen_loss >= mc_loss - 0.05 * abs(mc_loss)
    assert jensen_loss - mc_loss < 0.5 * abs(mc_loss), "the bound should not be vacuous"


def test_adapter_gradient_flows_through_the_features():
    head, guide, phi, y = _fitted()
    phi = phi.double().requires_grad_()
    head_params = {k: v.detach().double() for k, v in pyro.get_param_store().items()}
    pyro.get_param_store().clear()
    for k, v in head_params.items():
        pyro.param(k, v)
    loss = lambda f: JensenELBO().differentiable_loss(head, guide, f, None, y, dataset_size=40)
    grad, = torch.autograd.grad(loss(phi), phi)
    eps, index = 1e-6, (3, 1, 2)
    bumped = phi.detach().clone()
    bumped[index] += eps
    lowered = phi.detach().clone()
    lowered[index] -= eps
    numeric = (loss(bumped) - loss(lowered)) / (2 * eps)
    torch.testing.assert_close(grad[index], numeric, rtol=1e-5, atol=1e-7)


def test_non_gaussian_prior_is_refused_with_the_fix():
    head = BayesianLastLayer(4, 1, StudentTPrior())
    guide = make_guide("full", head)
    phi, y = torch.randn(5, 3, 4), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ConfigError, match="use elbo='mc'"):
        JensenELBO().loss(head, guide, phi, None, y)
    svi = SVI(head, guide, pyro.optim.Adam({"lr": 0.01}), make_elbo("mc", num_particles=4))
    assert torch.isfinite(torch.tensor(svi.step(phi, None, y)))


def test_unknown_estimator():
    with pytest.raises(ConfigError, match="elbo must be one of"):
        make_elbo("laplace")
