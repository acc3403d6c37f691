"""Heavy-tailed Student-t prior: only the Monte Carlo ELBO can fit it."""
import pyro.distributions as dist
import torch

from bayes_polar.bll.model import Prior


class StudentTPrior(Prior):
    """.. math:: W_{kd} \\sim t_\\nu(0, s)

    Heavier tails than a Gaussian let a few weights grow large while most stay small. Not
    Gaussian, so the closed-form (Jensen) ELBO refuses it; use ``elbo='mc'``.

    Parameters
    ----------
    df: ν > 0 degrees of freedom.
    scale: s > 0.
    """

    def __init__(self, df: float = 3.0, scale: float = 1.0):
        if not df > 0:
            raise ValueError(f"Expected df > 0 but got {df}")
        if not scale > 0:
            raise ValueError(f"Expected scale > 0 but got {scale}")
        self.df, self.scale = float(df), float(scale)

    def weight_dist(self, in_features, num_rows):
        return dist.StudentT(self.df, torch.zeros(num_rows, in_features), self.scale)
