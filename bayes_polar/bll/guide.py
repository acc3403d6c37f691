"""Base class of the Gaussian guides in ``guides/``: a Pyro autoguide for the ``head.W`` site.

A subclass implements two methods, in the spirit of Pyro's ``AutoContinuous``
(``get_posterior`` / ``_loc_scale``): :meth:`WeightGuide._setup_params`, which creates its
``PyroParam`` s from the initial weights, and :meth:`WeightGuide.weight_posterior`, which
returns q(W) as :class:`~bayes_polar.bll.posterior.GaussianWeights`. The base class inherits
Pyro's contract: same arguments as the model, parameters created lazily on the first call,
a dict of sampled values returned, ``median()`` for MAP-style predictions.
"""
from __future__ import annotations

import pyro
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_mean, init_to_median

from ..errors import ConfigError
from .posterior import LIKELIHOOD_SITE, WEIGHT_SITE, GaussianWeights

DEFAULT_INIT_SCALE = 0.01


class WeightGuide(AutoGuide):
    """Gaussian guide over W (K × D) only; compose with ``AutoNormal`` for hyperparameters.

    Parameters
    ----------
    model: the :class:`~bayes_polar.bll.model.BayesianLastLayer` (or a ``poutine.block`` of it that
        exposes only ``head.W``).
    init_scale: initial posterior standard deviation of every weight (> 0).
    init_loc_fn: Pyro init strategy for the mean; defaults to the prior mean.
    """

    site = WEIGHT_SITE

    def __init__(self, model, init_scale: float = DEFAULT_INIT_SCALE, init_loc_fn=None):
        if not init_scale > 0:
            raise ConfigError(f"Expected init_scale > 0 but got {init_scale}")
        self.init_scale = float(init_scale)
        init_loc_fn = init_loc_fn or init_to_mean(fallback=init_to_median)
        super().__init__(InitMessenger(init_loc_fn)(model))

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        latent = [name for name, _ in self.prototype_trace.iter_stochastic_nodes() if name != LIKELIHOOD_SITE]
        if latent != [self.site]:
            raise ConfigError(
                f"{type(self).__name__} covers only {self.site!r} but the model has latent sites {latent}; "
                "build it with bayes_polar.bll.registry.make_guide, which adds AutoNormal for hyperparameters")
        init = self.prototype_trace.nodes[self.site]["value"].detach()
        self._setup_params(init.reshape(init.shape[-2:]).clone())

    def _setup_params(self, init_loc):
        """Create the PyroParams of q from the initial mean ``init_loc`` (K, D)."""
        raise NotImplementedError

    def weight_posterior(self) -> GaussianWeights:
        """q(W) as structured Gaussian weights."""
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        value = pyro.sample(self.site, self.weight_posterior().distribution())
        return {self.site: value}

    def median(self, *args, **kwargs):
        """The posterior mean (= median for a Gaussian) of W."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return {self.site: self.weight_posterior().loc}
