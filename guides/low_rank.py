"""Low-rank-plus-diagonal Gaussian guide, one per weight row."""
import torch
from pyro.nn import PyroParam
from pyro.distributions import constraints

from bayes_polar.errors import ConfigError
from bayes_polar.bll.posterior import GaussianWeights
from bayes_polar.bll.guide import WeightGuide


class LowRankGuide(WeightGuide):
    """.. math:: q(W) = \\prod_k \\mathcal N\\big(w_k;\\ \\mu_k,\\ D_k (F_k F_k^\\top + I) D_k\\big), \\qquad D_k = \\operatorname{diag}(s_k)

    Parameterised as Pyro's ``AutoLowRankMultivariateNormal`` (factor scaled by s, diagonal
    s²): O(K D r) parameters and O(C D r) logit moments instead of O(C D²).

    Parameters
    ----------
    rank: r ≥ 1, the number of correlated directions per row.
    """

    scale_constraint = constraints.softplus_positive

    def __init__(self, model, rank: int = 8, **kwargs):
        if not (isinstance(rank, int) and rank >= 1):
            raise ConfigError(f"Expected rank >= 1 but got {rank!r}")
        self.rank = rank
        super().__init__(model, **kwargs)

    def _setup_params(self, init_loc):
        rows, features = init_loc.shape
        self.loc = PyroParam(init_loc)
        self.scale = PyroParam(torch.full_like(init_loc, self.init_scale * 0.5 ** 0.5), self.scale_constraint)
        self.cov_factor = PyroParam(torch.randn(rows, features, self.rank, dtype=init_loc.dtype) / self.rank ** 0.5)

    def weight_posterior(self):
        scale = self.scale
        return GaussianWeights(self.loc, factor=self.cov_factor * scale.unsqueeze(-1), diag=scale.pow(2))
