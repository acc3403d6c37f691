"""Isotropic Gaussian prior N(0, s·I): the default."""
import pyro.distributions as dist
import torch

from bayes_polar.bll.model import Prior


class IsotropicPrior(Prior):
    """.. math:: W_{kd} \\sim \\mathcal N(0, s)

    Parameters
    ----------
    variance: s > 0, the prior variance of every weight.
    """

    def __init__(self, variance: float = 1.0):
        if not variance > 0:
            raise ValueError(f"Expected variance > 0 but got {variance}")
        self.variance = float(variance)

    def weight_dist(self, in_features, num_rows):
        return dist.Normal(torch.zeros(num_rows, in_features), self.variance ** 0.5)
