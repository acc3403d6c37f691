"""Last-layer Laplace: the GGN is the Hessian of the softmax NLL, and δ maximises the Laplace evidence."""
import pytest
import torch

from bayes_polar.bll.model import head_logits
from bayes_polar.bll.laplace import fit_laplace, ggn_blocks, laplace_evidence


def _problem(rows, classes, n=40, features=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(rows, features, generator=g, dtype=torch.float64)
    phi = torch.randn(n, 1 if rows == classes else classes, features, generator=g, dtype=torch.float64)
    mask = torch.ones(n, classes, dtype=torch.bool)
    if rows == 1:
        mask[:5, -1] = False
    y = torch.randint(0, classes - 1, (n,), generator=g)
    return loc, phi, mask, y


def _nll_hessian(loc, phi, mask, y):
    def nll(w):
        return -head_logits(w.reshape(loc.shape), phi, mask).log_softmax(-1).gather(-1, y.unsqueeze(-1)).sum()
    return torch.autograd.functional.hessian(nll, loc.reshape(-1))


def test_shared_row_ggn_is_the_exact_hessian():
    loc, phi, mask, y = _problem(1, 4)
    torch.testing.assert_close(ggn_blocks(loc, phi, mask)[0], _nll_hessian(loc, phi, mask, y))


def test_per_class_ggn_is_the_diagonal_block_of_the_hessian():
    loc, phi, mask, y = _problem(3, 3)
    hessian = _nll_hessian(loc, phi, None, y)
    blocks = ggn_blocks(loc, phi)
    for k in range(3):
        torch.testing.assert_close(blocks[k], hessian[4 * k:4 * k + 4, 4 * k:4 * k + 4])


def test_fixed_precision_gives_the_inverse_posterior_precision():
    loc, phi, mask, y = _problem(1, 4)
    q, precision = fit_laplace(loc, phi, y, mask, prior_precision=2.0)
    assert precision == 2.0 and torch.equal(q.loc, loc)
    expected = torch.linalg.inv(_nll_hessian(loc, phi, mask, y) + 2.0 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(q.covariance(), expected)


def test_marginal_likelihood_picks_the_best_precision():
    loc, phi, mask, y = _problem(3, 3, n=200)
    q, precision = fit_laplace(loc, phi, y, prior_precision="marglik")
    eigenvalues = torch.linalg.eigvalsh(ggn_blocks(loc, phi))
    loglik = head_logits(loc, phi).log_softmax(-1).gather(-1, y.unsqueeze(-1)).sum().item()
    best = laplace_evidence(loc, torch.zeros_like(loc), loglik, eigenvalues, precision)
    for other in (precision * 0.7, precision * 1.4, 1e-3, 1e3):
        assert best >= laplace_evidence(loc, torch.zeros_like(loc), loglik, eigenvalues, other)
    assert 1e-4 < precision < 1e6


def test_bad_precision():
    loc, phi, mask, y = _problem(1, 4)
    with pytest.raises(ValueError, match="prior_precision > 0"):
        fit_laplace(loc, phi, y, mask, prior_precision=-1.0)
