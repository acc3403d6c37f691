"""Two estimators of one ELBO for the Bayesian last layer (PoLAR-VBLL, DESIGN §2).

.. math::
    \\mathcal L = \\frac{N}{B}\\sum_{t\\in\\text{batch}} \\mathbb E_q[\\log \\operatorname{softmax}(z_t)_{y_t}]
                 - \\beta\\,\\mathrm{KL}(q\\,\\|\\,p)

(Pyro's convention: the whole-dataset ELBO; divide by N for the per-example value, whose KL
term is KL/N.) ``jensen``: the paper's closed form for a Gaussian prior and guide,

.. math::
    \\mathbb E_q[\\log \\operatorname{softmax}(z)_y] \\ \\ge\\ m_y - \\log \\sum_c \\exp(m_c + v_c / 2),
    \\qquad m_c = \\mu_{k(c)}^\\top\\phi_c,\\ \\ v_c = \\phi_c^\\top S_{k(c)} \\phi_c,

with the analytic KL (and, with VBLL's logit noise, σ² added to v_c and log p(Λ) to the bound:
:mod:`~bayes_polar.bll.logit_noise`). ``mc``: Pyro's ``Trace_ELBO`` with vectorised particles over W only
(the backbone runs once), valid for every prior/guide pair.
"""
from __future__ import annotations

import inspect

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from ..errors import ConfigError
from .posterior import GaussianWeights, initialize_guide, kl_to_normal, weight_posterior

ESTIMATORS = ("jensen", "mc", "mc_meanfield")


def jensen_expected_loglik(q: GaussianWeights, phi, y, mask=None, noise_variance=None) -> torch.Tensor:
    """(B,) lower bound m_y − log Σ_c exp(m_c + v_c/2) of E_q[log softmax(z)_y].

    ``noise_variance``: VBLL's logit noise σ² (broadcast over (B, C)), added to each v_c.
    """
    mean, cov = q.logit_moments(phi)
    var = cov.diagonal(dim1=-2, dim2=-1)
    if noise_variance is not None:
        var = var + noise_variance
    lse_input = mean + 0.5 * var
    if mask is not None:
        lse_input = lse_input.masked_fill(~mask.bool(), float("-inf"))
    lse_term = torch.logsumexp(lse_input, dim=-1)
    return mean.gather(-1, y.long().unsqueeze(-1)).squeeze(-1) - lse_term


class JensenELBO(ELBO):
    """The closed-form ELBO, derived from the model's prior and the guide's Gaussian q(W).

    Works with :class:`~bayes_polar.bll.model.BayesianLastLayer` and any guide that
    :func:`~bayes_polar.bll.posterior.weight_posterior` can read. Drop-in for Pyro's ``SVI``.
    """

    def __init__(self):
        super().__init__(num_particles=1)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        phi, mask, y = bound.arguments["phi"], bound.arguments["mask"], bound.arguments["y"]
        if y is None:
            raise ConfigError("The ELBO needs labels: call with y=...")
        initialize_guide(guide, *args, **kwargs)
        q = weight_posterior(guide)
        prior_loc, prior_var = model.prior.gaussian_moments(model.in_features, model.num_rows)
        dataset_size = bound.arguments["dataset_size"] or phi.shape[0]
        noise = model.logit_noise
        noise_variance = None if noise is None else noise.variance()
        loglik_term = jensen_expected_loglik(q, phi, y, mask, noise_variance).sum() * (dataset_size / phi.shape[0])
        kl_term = kl_to_normal(q, prior_loc, prior_var) * bound.arguments["kl_scale"]
        if noise is not None:  # the noise is a point estimate under its prior: log p(Λ) joins the bound
            kl_term = kl_term - noise.log_prior() * bound.arguments["kl_scale"]
        return -(loglik_term - kl_term)

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("JensenELBO is closed form: it does not trace the model")

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


def make_elbo(estimator: str = "jensen", num_particles: int = 8):
    """The ELBO object for ``estimator`` in :data:`ESTIMATORS` (particles for the MC ones)."""
    if estimator == "jensen":
        return JensenELBO()
    if num_particles < 1:
        raise ConfigError(f"Expected num_particles >= 1 but got {num_particles}")
    kwargs = dict(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    if estimator == "mc":
        return Trace_ELBO(**kwargs)
    if estimator == "mc_meanfield":
        return TraceMeanField_ELBO(**kwargs)
    raise ConfigError(f"elbo must be one of {ESTIMATORS}, got {estimator!r}")
