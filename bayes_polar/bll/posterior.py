"""Structured Gaussian posteriors over the last-layer weights W (K × D), and how to get one from a guide.

.. math::
    q(\\operatorname{vec} W) = \\mathcal N(\\operatorname{vec}\\mu,\\ \\Sigma), \\qquad
    \\Sigma = \\begin{cases}
        \\operatorname{blockdiag}_k(F_k F_k^\\top) + \\operatorname{diag}(\\delta) & \\text{rowwise (rows independent)}\\\\
        F F^\\top + \\operatorname{diag}(\\delta) & \\text{joint (rows coupled)}
    \\end{cases}

Everything the head needs is closed form in this representation: the logit moments
``m_c = μ_{k(c)}ᵀφ_c`` and ``Cov(z)_{cc'} = φ_cᵀ Σ_{k(c)k(c')} φ_{c'}``, the KL to a diagonal
Gaussian prior, and reparameterised samples. ``K`` is the number of classes (``letters``: one
row per answer) or 1 (``options``: one shared row scores every option); ``k(c) = c`` or ``0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch.distributions.transforms import ReshapeTransform

from ..errors import ConfigError, ShapeMismatchError

WEIGHT_SITE = "head.W"
LIKELIHOOD_SITE = "head.y"


@dataclass
class GaussianWeights:
    """q(W) with ``loc`` (K, D); ``factor`` (K, D, M) rowwise or (K·D, M) joint; ``diag`` δ (K, D).

    ``triangular`` marks a square lower-triangular factor (a Cholesky factor), whose log
    determinant is read off its diagonal.
    """

    loc: torch.Tensor
    factor: torch.Tensor | None = None
    diag: torch.Tensor | None = None
    rowwise: bool = True
    triangular: bool = False

    @property
    def num_rows(self) -> int:
        return self.loc.shape[0]

    @property
    def in_features(self) -> int:
        return self.loc.shape[1]

    def _factor3(self) -> torch.Tensor | None:
        """The factor as (K, D, M) in both layouts (joint: rows of F grouped by weight row)."""
        if self.factor is None or self.rowwise:
            return self.factor
        return self.factor.reshape(self.num_rows, self.in_features, -1)

    def variance(self) -> torch.Tensor:
        """Marginal variances diag(Σ) as (K, D)."""
        var = torch.zeros_like(self.loc)
        if self.factor is not None:
            var = var + self._factor3().pow(2).sum(-1)
        if self.diag is not None:
            var = var + self.diag
        return var

    def covariance(self) -> torch.Tensor:
        """Dense Σ over vec W, (K·D, K·D); for tests and small problems only."""
        n = self.num_rows * self.in_features
        cov = torch.zeros(n, n, dtype=self.loc.dtype)
        if self.factor is not None and self.rowwise:
            cov = cov + torch.block_diag(*[f @ f.T for f in self.factor])
        elif self.factor is not None:
            cov = cov + self.factor @ self.factor.T
        if self.diag is not None:
            cov = cov + torch.diag(self.diag.reshape(-1))
        return cov

    def log_det(self) -> torch.Tensor:
        """log det Σ, using the factor's structure (triangular, low rank + diagonal, diagonal)."""
        if self.factor is None:
            return self.diag.log().sum()
        if self.triangular and self.diag is None:
            return 2 * torch.diagonal(self.factor, dim1=-2, dim2=-1).abs().log().sum()
        if self.diag is not None:  # matrix determinant lemma, per row or jointly
            factors = self.factor if self.rowwise else self.factor.unsqueeze(0)
            deltas = self.diag if self.rowwise else self.diag.reshape(1, -1)
            scaled = factors / deltas.unsqueeze(-1).sqrt()
            eye = torch.eye(factors.shape[-1], dtype=factors.dtype)
            capacitance = eye + scaled.transpose(-1, -2) @ scaled
            return deltas.log().sum() + torch.linalg.cholesky(capacitance).diagonal(dim1=-2, dim2=-1).log().sum() * 2
        blocks = [f @ f.T for f in self.factor] if self.rowwise else [self.factor @ self.factor.T]
        return sum(2 * torch.linalg.cholesky(b).diagonal().log().sum() for b in blocks)

    def logit_moments(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (B, C) and covariance (B, C, C) of the logits z_c = w_{k(c)}ᵀ φ_c.

        ``phi`` is (B, C, D), or (B, 1, D) when every class reads the same features.
        """
        num_classes = check_head_shapes(phi, self.num_rows, self.in_features)
        phi = phi.expand(phi.shape[0], num_classes, self.in_features)
        mean = (phi * self.loc).sum(-1)
        shared = self.num_rows == 1  # every class reads the same row: their logits are correlated
        cov = phi.new_zeros(phi.shape[0], num_classes, num_classes)
        if self.factor is not None:
            proj = _project(phi, self._factor3())  # (B, C, M)
            block = proj @ proj.transpose(-1, -2)
            cov = cov + (block if shared or not self.rowwise else torch.diag_embed(block.diagonal(dim1=-2, dim2=-1)))
        if self.diag is not None:
            if shared:
                cov = cov + (phi * self.diag[0]) @ phi.transpose(-1, -2)
            else:
                cov = cov + torch.diag_embed((phi.pow(2) * self.diag).sum(-1))
        return mean, cov

    def rsample(self, sample_shape: torch.Size | tuple = ()) -> torch.Tensor:
        """Reparameterised draws of W, shaped (*sample_shape, K, D)."""
        shape = torch.Size(sample_shape)
        sample = self.loc.expand(*shape, *self.loc.shape)
        if self.factor is not None:
            rank = self.factor.shape[-1]
            if self.rowwise:
                eps = torch.randn(*shape, self.num_rows, rank, dtype=self.loc.dtype, device=self.loc.device)
                sample = sample + torch.einsum("kdm,...km->...kd", self.factor, eps)
            else:
                eps = torch.randn(*shape, rank, dtype=self.loc.dtype, device=self.loc.device)
                sample = sample + (eps @ self.factor.T).reshape(*shape, *self.loc.shape)
        if self.diag is not None:
            sample = sample + self.diag.sqrt() * torch.randn_like(sample)
        return sample

    def distribution(self) -> dist.TorchDistribution:
        """A Pyro distribution with event shape (K, D), for a guide's ``head.W`` site."""
        if self.factor is None:
            return dist.Normal(self.loc, self.diag.sqrt()).to_event(2)
        if self.rowwise and self.triangular and self.diag is None:
            return dist.MultivariateNormal(self.loc, scale_tril=self.factor).to_event(1)
        if self.rowwise and self.diag is not None:
            return dist.LowRankMultivariateNormal(self.loc, self.factor, self.diag).to_event(1)
        flat_loc = self.loc.reshape(-1)
        if self.diag is not None:
            base = dist.LowRankMultivariateNormal(flat_loc, self.factor, self.diag.reshape(-1))
        else:
            base = dist.MultivariateNormal(flat_loc, scale_tril=self.factor if self.triangular else None,
                                           covariance_matrix=None if self.triangular else self.covariance())
        return dist.TransformedDistribution(base, ReshapeTransform(flat_loc.shape, self.loc.shape))


def _project(phi: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """(B, C, M): φ_cᵀ F_{k(c)} for factor (K, D, M) with K = C or 1."""
    if factor.shape[0] == 1:
        return phi @ factor[0]
    return torch.einsum("bcd,cdm->bcm", phi, factor)


def check_head_shapes(phi: torch.Tensor, num_rows: int, in_features: int) -> int:
    """Validate φ (B, C|1, D) against a head with ``num_rows`` rows; return the class count C."""
    if phi.dim() != 3 or phi.shape[-1] != in_features:
        raise ShapeMismatchError(f"Expected features of shape (B, C, {in_features}) but got {tuple(phi.shape)}")
    if num_rows > 1 and phi.shape[1] not in (1, num_rows):
        raise ShapeMismatchError(
            f"The head has {num_rows} class rows but the features have {phi.shape[1]} classes; "
            "a task's number of choices must match the head (letters format)")
    return max(num_rows, phi.shape[1])


def kl_to_normal(q: GaussianWeights, prior_loc: torch.Tensor, prior_var: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ p) for p = N(prior_loc, diag(prior_var)), both broadcastable to (K, D).

    .. math:: KL = \\tfrac12\\Big[\\sum \\frac{\\Sigma_{ii} + (\\mu_i - m_i)^2}{s_i} - n
                 + \\sum \\log s_i - \\log\\det\\Sigma\\Big]
    """
    prior_loc = prior_loc.expand_as(q.loc)
    prior_var = prior_var.expand_as(q.loc)
    n = q.loc.numel()
    fit_term = ((q.variance() + (q.loc - prior_loc).pow(2)) / prior_var).sum()
    return 0.5 * (fit_term - n + prior_var.log().sum() - q.log_det())


def initialize_guide(guide, *args, **kwargs) -> None:
    """Create an autoguide's parameters (Pyro creates them lazily on the first call)."""
    if getattr(guide, "prototype_trace", False) is None:
        from pyro import poutine

        poutine.block(guide)(*args, **kwargs)


def weight_posterior(guide, site: str = WEIGHT_SITE) -> GaussianWeights:
    """The Gaussian marginal q(W) of a fitted guide, as :class:`GaussianWeights`.

    Accepts the guides of ``bayes_polar.guides`` (their own ``weight_posterior``), Pyro's
    ``AutoNormal``, ``AutoDiagonalNormal``, ``AutoMultivariateNormal``,
    ``AutoLowRankMultivariateNormal``, and an ``AutoGuideList`` holding one of them.
    Call the guide once (e.g. one SVI step) before this, so its parameters exist.
    """
    from pyro.nn import PyroModule

    if isinstance(guide, PyroModule):
        with guide._pyro_context:  # as pyro.nn.pyro_method: PyroParams register with pyro.param
            return _weight_posterior(guide, site)
    return _weight_posterior(guide, site)


def _weight_posterior(guide, site: str) -> GaussianWeights:
    from pyro.infer import autoguide

    if hasattr(guide, "weight_posterior"):
        return guide.weight_posterior()
    if getattr(guide, "prototype_trace", None) is None and not isinstance(guide, autoguide.AutoGuideList):
        raise ConfigError("The guide has no parameters yet: call it (or run one SVI step) before weight_posterior()")
    if isinstance(guide, autoguide.AutoGuideList):
        for part in guide:
            if part.prototype_trace is not None and site in part.prototype_trace.nodes:
                return _weight_posterior(part, site)
        raise ConfigError(f"No part of the AutoGuideList covers the site {site!r}")
    if isinstance(guide, autoguide.AutoNormal):
        loc, scale = guide._get_loc_and_scale(site)
        return GaussianWeights(loc, diag=scale.pow(2))
    if isinstance(guide, autoguide.AutoContinuous):
        return _from_auto_continuous(guide, site)
    raise ConfigError(
        f"{type(guide).__name__} is not a Gaussian guide this library can read in closed form; "
        "use the Monte Carlo ELBO and predictive (elbo='mc')")


def _from_auto_continuous(guide, site: str) -> GaussianWeights:
    """Slice W's block out of an AutoContinuous guide's flat Gaussian posterior."""
    start = 0
    for name, node in guide.prototype_trace.iter_stochastic_nodes():
        size = math.prod(guide._unconstrained_shapes[name])
        if name == site:
            break
        start += size
    else:
        raise ConfigError(f"The guide has no site {site!r}")
    shape = tuple(guide._unconstrained_shapes[site])
    support = node["fn"].support
    while isinstance(support, dist.constraints.independent):
        support = support.base_constraint
    if support is not dist.constraints.real:
        raise ConfigError(f"Site {site!r} must have real support for a closed-form Gaussian reading")
    rows = slice(start, start + size)
    posterior = guide.get_posterior()
    whole = size == posterior.event_shape[-1]
    if isinstance(posterior, dist.LowRankMultivariateNormal):
        return GaussianWeights(posterior.loc[rows].reshape(shape), posterior.cov_factor[rows],
                               posterior.cov_diag[rows].reshape(shape), rowwise=False)
    if isinstance(posterior, dist.MultivariateNormal):
        return GaussianWeights(posterior.loc[rows].reshape(shape), posterior.scale_tril[rows, : (start + size)],
                               rowwise=False, triangular=whole)
    base = posterior.base_dist if isinstance(posterior, dist.Independent) else posterior
    return GaussianWeights(base.loc[rows].reshape(shape), diag=base.scale[rows].pow(2).reshape(shape))
