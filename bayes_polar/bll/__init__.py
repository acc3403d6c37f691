"""Stage 3, the Bayesian last layer: priors, guides, ELBOs, predictive and Laplace.

Takes features φ (B, C|1, D) and labels; hands on a posterior q(W) over the weights W (K × D)
and predictive probabilities. ``model`` is the Pyro model y ~ Categorical(W φ) and the
:class:`Prior` contract that ``bayes_polar.models`` implements; ``guide`` the Gaussian guide base
that ``bayes_polar.guides`` builds on; ``posterior`` reads q(W) as :class:`GaussianWeights`;
``elbo`` the closed-form (Jensen) and Monte Carlo ELBOs; ``predictive`` samples logits;
``laplace`` the post-hoc Laplace fit; ``registry`` finds priors and guides by name or file.
"""
from .elbo import JensenELBO, make_elbo
from .guide import WeightGuide
from .laplace import fit_laplace
from .model import BayesianLastLayer, Prior, head_logits
from .posterior import GaussianWeights, weight_posterior
from .predictive import predictive_proba, sample_logits
from .registry import load_guide, load_prior, make_guide

__all__ = [
    "BayesianLastLayer",
    "GaussianWeights",
    "JensenELBO",
    "Prior",
    "WeightGuide",
    "fit_laplace",
    "head_logits",
    "load_guide",
    "load_prior",
    "make_elbo",
    "make_guide",
    "predictive_proba",
    "sample_logits",
    "weight_posterior",
]
