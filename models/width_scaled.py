"""VBLL's width-scaled Gaussian prior N(0, (gain / D)·I)."""
import pyro.distributions as dist
import torch

from bayes_polar.bll.model import Prior


class WidthScaledPrior(Prior):
    """.. math:: W_{kd} \\sim \\mathcal N(0, g / D)

    The variance shrinks with the feature dimension D so that the prior logit variance
    ``Σ_d φ_d² g/D`` stays of order ``g · mean(φ²)`` whatever the width (VBLL: g = 2).

    Parameters
    ----------
    gain: g > 0.
    """

    def __init__(self, gain: float = 2.0):
        if not gain > 0:
            raise ValueError(f"Expected gain > 0 but got {gain}")
        self.gain = float(gain)

    def weight_dist(self, in_features, num_rows):
        return dist.Normal(torch.zeros(num_rows, in_features), (self.gain / in_features) ** 0.5)
