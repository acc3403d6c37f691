"""The Bayesian last layer as a Pyro model, and the prior contract that ``models/`` implements.

.. math::
    W \\sim p(W) \\quad (K \\times D), \\qquad
    y_t \\sim \\operatorname{Categorical}\\big(\\operatorname{softmax}(z_t)\\big), \\quad
    z_{tc} = w_{k(c)}^\\top \\phi_{tc}

``letters``: K = C rows, one per answer letter, and φ_t is shared by the classes (φ of shape
(B, 1, D)). ``options``: K = 1 shared row scores each option's features φ_tc (B, C, D); a
mask removes the choices a question does not have. The likelihood sits in a subsampled
``pyro.plate`` scaled by ``dataset_size / B``, so a minibatch ELBO estimates the full one.

Usage::

    head = BayesianLastLayer(in_features=578, num_rows=1, prior=IsotropicPrior(1.0))
    svi = SVI(head, FullCovarianceGuide(head), pyro.optim.Adam({"lr": 1e-2}), JensenELBO())
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from ..errors import ConfigError, NumericalError, ShapeMismatchError
from .posterior import LIKELIHOOD_SITE, WEIGHT_SITE, check_head_shapes


class Prior(ABC):
    """A prior over the last-layer weights W (K × D). Subclasses implement :meth:`weight_dist`.

    The base class reinterprets the distribution's trailing dims as the event (K, D) and puts
    it on the ``head.W`` site: prior files never call ``.to_event`` or name sites. Hierarchical
    priors may draw hyperparameters inside :meth:`weight_dist` on sites named ``head.<name>``.
    """

    site = WEIGHT_SITE

    @abstractmethod
    def weight_dist(self, in_features: int, num_rows: int) -> dist.TorchDistribution:
        """A distribution whose trailing shape is (num_rows, in_features)."""

    def attach(self, context: dict) -> None:
        """Hook for priors that need something from the backbone (e.g. LM head rows); no-op."""

    def distribution(self, in_features: int, num_rows: int) -> dist.TorchDistribution:
        """:meth:`weight_dist` with event shape exactly (num_rows, in_features)."""
        d = self.weight_dist(in_features, num_rows)
        missing = 2 - len(d.event_shape)
        if 0 < missing <= len(d.batch_shape):
            d = d.to_event(missing)
        if tuple(d.event_shape) != (num_rows, in_features):
            raise ShapeMismatchError(
                f"{type(self).__name__}.weight_dist must have shape (..., {num_rows}, {in_features}); "
                f"got batch {tuple(d.batch_shape)} event {tuple(d.event_shape)}")
        return d

    def sample(self, in_features: int, num_rows: int) -> torch.Tensor:
        return pyro.sample(self.site, self.distribution(in_features, num_rows))

    def hyper_sites(self, in_features: int, num_rows: int) -> list[str]:
        """Names of the latent hyperparameter sites drawn by :meth:`weight_dist` (empty if none)."""
        with poutine.block(), poutine.trace() as tracer:
            self.weight_dist(in_features, num_rows)
        return [name for name, site in tracer.trace.nodes.items() if site["type"] == "sample"]

    def gaussian_moments(self, in_features: int, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) broadcastable to (K, D), for the closed-form (Jensen) ELBO.

        Raises ConfigError for priors that are not Gaussian or that sample hyperparameters.
        """
        hyper = self.hyper_sites(in_features, num_rows)
        if hyper:
            raise ConfigError(f"{type(self).__name__} samples hyperparameters {hyper}; the closed-form "
                              "(Jensen) ELBO needs a fixed Gaussian prior: use elbo='mc'")
        base = self.weight_dist(in_features, num_rows)
        while isinstance(base, dist.Independent):
            base = base.base_dist
        if not isinstance(base, dist.Normal):
            raise ConfigError(f"{type(self).__name__} is {type(base).__name__}, not Gaussian; the closed-form "
                              "(Jensen) ELBO needs a Gaussian prior: use elbo='mc'")
        return base.loc, base.scale.pow(2)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not isinstance(v, torch.Tensor))
        return f"{type(self).__name__}({args})"


def prior_scale(prior: Prior, in_features: int, num_rows: int, draws: int = 64) -> float:
    """A typical prior standard deviation of one weight: the median over weights of the scale of p(W).

    The scale is the distribution's ``scale`` (σ of a Normal, s of a Student-t or Laplace), else its
    ``stddev``. Hierarchical priors are drawn ``draws`` times (hyperparameters included, outside any
    trace and with the global RNG restored) and the median is over all draws.
    """
    scales = []
    with poutine.block(), torch.random.fork_rng():
        torch.manual_seed(0)
        hierarchical = bool(prior.hyper_sites(in_features, num_rows))
        for _ in range(draws if hierarchical else 1):
            base = prior.distribution(in_features, num_rows)
            while isinstance(base, dist.Independent):
                base = base.base_dist
            scale = base.scale if hasattr(base, "scale") else base.stddev
            scales.append(torch.as_tensor(scale).detach().expand(num_rows, in_features).flatten())
    value = float(torch.cat(scales).median())
    if not (value > 0 and value < float("inf")):
        raise ConfigError(f"{type(prior).__name__} has no finite positive scale ({value}) to derive the guide's from: "
                          "give the guide an absolute init_scale in guide_args")
    return value


class FnPrior(Prior):
    """Escape hatch: ``FnPrior(lambda d, k: dist.Laplace(torch.zeros(k, d), 0.1))``."""

    def __init__(self, fn):
        if not callable(fn):
            raise ConfigError(f"FnPrior expects a callable (in_features, num_rows) -> distribution, got {fn!r}")
        self.fn = fn

    def weight_dist(self, in_features, num_rows):
        return self.fn(in_features, num_rows)


def head_logits(W: torch.Tensor, phi: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """z = (W ⊙ φ).sum(-1): (..., B, C) for W (..., 1, K, D) or (K, D) and φ (B, C|1, D).

    W's leading dims are sample/particle dims with a trailing size-1 dim for the data plate,
    which is how Pyro shapes a site drawn outside ``head.data`` under vectorised particles.
    Missing choices (``mask`` False) get logit −∞.
    """
    logits = (W * phi).sum(-1)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits


class BayesianLastLayer(PyroModule):
    """Pyro model of the last layer: ``head(phi, mask, y, dataset_size)``.

    Parameters
    ----------
    in_features: D, the feature dimension.
    num_rows: K, the number of weight rows: the class count (``letters``) or 1 (``options``).
    prior: a :class:`Prior`; defaults to the isotropic N(0, I).
    logit_noise: VBLL's learned logit noise (:class:`~bayes_polar.bll.logit_noise.LogitNoise`), read by the
        closed-form ELBO and the predictive only (not a site of this model); None: none.
    """

    def __init__(self, in_features: int, num_rows: int, prior: Prior | None = None, logit_noise=None):
        super().__init__()
        if in_features <= 0 or num_rows <= 0:
            raise ConfigError(f"Expected in_features > 0 and num_rows > 0 but got {in_features}, {num_rows}")
        if prior is None:
            from ..models import IsotropicPrior

            prior = IsotropicPrior()
        if not isinstance(prior, Prior):
            raise ConfigError(f"prior must be a bayes_polar.bll.model.Prior, got {type(prior).__name__}")
        self.in_features, self.num_rows, self.prior = in_features, num_rows, prior
        self.logit_noise = logit_noise

    def forward(self, phi, mask=None, y=None, dataset_size=None, kl_scale=1.0):
        batch = phi.shape[0]
        num_classes = check_head_shapes(phi, self.num_rows, self.in_features)
        mask = _check_mask(mask, batch, num_classes)
        _check_labels(y, mask, batch, num_classes)
        if not torch.isfinite(phi).all():
            raise NumericalError(f"Features contain NaN or Inf ({(~torch.isfinite(phi)).sum().item()} entries)")
        with poutine.scale(scale=kl_scale):
            W = self.prior.sample(self.in_features, self.num_rows)
        logits = head_logits(W, phi, mask)
        size = batch if dataset_size is None else int(dataset_size)
        with pyro.plate("head.data", size=size, subsample=torch.arange(batch)):
            return pyro.sample(LIKELIHOOD_SITE, dist.Categorical(logits=logits), obs=y)


def _check_mask(mask, batch: int, num_classes: int):
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, num_classes):
        raise ShapeMismatchError(f"Expected a choice mask of shape ({batch}, {num_classes}) but got {tuple(mask.shape)}")
    return mask.bool()


def _check_labels(y, mask, batch: int, num_classes: int) -> None:
    if y is None:
        return
    if tuple(y.shape) != (batch,):
        raise ShapeMismatchError(f"Expected labels of shape ({batch},) but got {tuple(y.shape)}")
    bad = (y < 0) | (y >= num_classes)
    if mask is not None and not bad.any():
        bad = ~mask.gather(1, y.long().unsqueeze(1)).squeeze(1)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ShapeMismatchError(f"Label {int(y[row])} of example {row} is outside its choices "
                                 f"(the head has {num_classes} classes)")
