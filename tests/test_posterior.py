"""Structured Gaussian q(W): moments, log-determinants, KL and samples against dense formulas."""
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from bayes_polar.errors import ShapeMismatchError
from bayes_polar.bll.posterior import GaussianWeights, check_head_shapes, kl_to_normal



@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _tril(n, *batch):
    a = torch.randn(*batch, n, n) * 0.3
    return torch.tril(a, -1) + torch.diag_embed(torch.rand(*batch, n) + 0.5)


def structures(K, D):
    """One q of each structure the library builds, for K rows and D features."""
    loc = torch.randn(K, D)
    return {
        "rowwise_full": GaussianWeights(loc, factor=_tril(D, K), triangular=True),
        "rowwise_lowrank": GaussianWeights(loc, factor=torch.randn(K, D, 2) * 0.3, diag=torch.rand(K, D) + 0.1),
        "diagonal": GaussianWeights(loc, diag=torch.rand(K, D) + 0.1),
        "joint_full": GaussianWeights(loc, factor=_tril(K * D), rowwise=False, triangular=True),
        "joint_lowrank": GaussianWeights(loc, factor=torch.randn(K * D, 3) * 0.3, diag=torch.rand(K, D) + 0.1,
                                         rowwise=False),
        "joint_rectangular": GaussianWeights(loc, factor=torch.randn(K * D, K * D + 2) * 0.5, rowwise=False),
    }


def _dense_logit_moments(q, phi):
    """Reference: z_b = A_b vec(W) with A_b (C, K·D) built explicitly."""
    B, _, D = phi.shape
    K = q.num_rows
    C = max(K, phi.shape[1])
    phi = phi.expand(B, C, D)
    cov_w = q.covariance()
    means, covs = [], []
    for b in range(B):
        A = torch.zeros(C, K * D)
        for c in range(C):
            k = 0 if K == 1 else c
            A[c, k * D:(k + 1) * D] = phi[b, c]
        means.append(A @ q.loc.reshape(-1))
        covs.append(A @ cov_w @ A.T)
    return torch.stack(means), torch.stack(covs)


NAMES = ["rowwise_full", "rowwise_lowrank", "diagonal", "joint_full", "joint_lowrank", "joint_rectangular"]


@pytest.mark.parametrize("K,C", [(3, 3), (1, 4)])
@pytest.mark.parametrize("name", NAMES)
def test_logit_moments_match_dense_algebra(name, K, C):
    D = 4
    q = structures(K, D)[name]
    phi = torch.randn(5, 1 if K == C else C, D)
    mean, cov = q.logit_moments(phi)
    ref_mean, ref_cov = _dense_logit_moments(q, phi)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(cov, ref_cov)


@pytest.mark.parametrize("name", NAMES)
def test_variance_and_log_det_match_dense(name):
    q = structures(2, 3)[name]
    cov = q.covariance()
    torch.testing.assert_close(q.variance().reshape(-1), cov.diagonal())
    torch.testing.assert_close(q.log_det(), torch.logdet(cov))


@pytest.mark.parametrize("name", NAMES)
def test_kl_matches_torch_kl_divergence(name):
    q = structures(2, 3)[name]
    prior_loc, prior_var = torch.randn(2, 3), torch.rand(2, 3) + 0.2
    dense_q = MultivariateNormal(q.loc.reshape(-1), covariance_matrix=q.covariance())
    dense_p = MultivariateNormal(prior_loc.reshape(-1), covariance_matrix=torch.diag(prior_var.reshape(-1)))
    torch.testing.assert_close(kl_to_normal(q, prior_loc, prior_var), kl_divergence(dense_q, dense_p))
    scalar = kl_to_normal(q, torch.zeros(()), torch.tensor(2.0))  # isotropic prior broadcasts
    dense_iso = MultivariateNormal(torch.zeros(6), covariance_matrix=2.0 * torch.eye(6))
    torch.testing.assert_close(scalar, kl_divergence(dense_q, dense_iso))


@pytest.mark.parametrize("name", NAMES)
def test_samples_and_distribution_have_the_right_law(name):
    torch.manual_seed(0)
    q = structures(2, 3)[name]
    draws = q.rsample((40000,))
    assert draws.shape == (40000, 2, 3)
    flat = draws.reshape(40000, -1)
    torch.testing.assert_close(flat.mean(0), q.loc.reshape(-1), atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(flat.T), q.covariance(), atol=0.04, rtol=0)
    d = q.distribution()
    assert tuple(d.event_shape) == (2, 3) and tuple(d.batch_shape) == ()
    w = torch.randn(2, 3)
    dense = MultivariateNormal(q.loc.reshape(-1), covariance_matrix=q.covariance())
    torch.testing.assert_close(d.log_prob(w), dense.log_prob(w.reshape(-1)))


def test_rsample_is_differentiable():
    loc = torch.zeros(1, 3, requires_grad=True)
    scale = torch.ones(1, 3, requires_grad=True)
    GaussianWeights(loc, diag=scale.pow(2)).rsample((4,)).sum().backward()
    assert loc.grad is not None and scale.grad is not None


def test_shape_checks_name_the_mismatch():
    with pytest.raises(ShapeMismatchError, match=r"features of shape \(B, C, 5\)"):
        check_head_shapes(torch.zeros(2, 1, 4), 3, 5)
    with pytest.raises(ShapeMismatchError, match="3 class rows but the features have 4 classes"):
        check_head_shapes(torch.zeros(2, 4, 5), 3, 5)
    assert check_head_shapes(torch.zeros(2, 1, 5), 3, 5) == 3
    assert check_head_shapes(torch.zeros(2, 4, 5), 1, 5) == 4
