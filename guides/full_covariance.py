"""One full-covariance Gaussian per weight row: the paper's default guide."""
import torch
from pyro.nn import PyroParam
from pyro.distributions import constraints

from bayes_polar.bll.posterior import GaussianWeights
from bayes_polar.bll.guide import WeightGuide


class FullCovarianceGuide(WeightGuide):
    """.. math:: q(W) = \\prod_k \\mathcal N(w_k;\\ \\mu_k,\\ L_k L_k^\\top), \\qquad L_k = \\operatorname{diag}(s_k)\\,U_k

    with U_k unit lower triangular and s_k > 0, so L_k is a Cholesky factor with a positive
    diagonal by construction (as Pyro's ``AutoMultivariateNormal``). Costs O(K D²) parameters.
    """

    scale_constraint = constraints.softplus_positive

    def _setup_params(self, init_loc):
        rows, features = init_loc.shape
        self.loc = PyroParam(init_loc)
        self.scale = PyroParam(torch.full_like(init_loc, self.init_scale), self.scale_constraint)
        eye = torch.eye(features, dtype=init_loc.dtype).expand(rows, features, features).clone()
        self.scale_tril = PyroParam(eye, constraints.unit_lower_cholesky)

    def weight_posterior(self):
        factor = self.scale.unsqueeze(-1) * self.scale_tril  # (K, D, D)
        return GaussianWeights(self.loc, factor=factor, rowwise=True, triangular=True)
