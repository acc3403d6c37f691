"""Mean-field Gaussian guide: an independent variance per weight."""
import torch
from pyro.nn import PyroParam
from pyro.distributions import constraints

from bayes_polar.bll.posterior import GaussianWeights
from bayes_polar.bll.guide import WeightGuide


class DiagonalGuide(WeightGuide):
    """.. math:: q(W) = \\prod_{k,d} \\mathcal N(w_{kd};\\ \\mu_{kd},\\ \\sigma_{kd}^2)

    O(K D) parameters; ignores correlations between features.
    """

    scale_constraint = constraints.softplus_positive

    def _setup_params(self, init_loc):
        self.loc = PyroParam(init_loc)
        self.scale = PyroParam(torch.full_like(init_loc, self.init_scale), self.scale_constraint)

    def weight_posterior(self):
        return GaussianWeights(self.loc, diag=self.scale.pow(2))
