"""Automatic relevance determination: one prior scale per feature dimension."""
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from bayes_polar.bll.model import Prior


class ARDPrior(Prior):
    """.. math:: W_{kd} \\mid \\tau_d \\sim \\mathcal N(0, \\tau_d^2), \\qquad \\tau_d \\sim \\mathrm{HalfCauchy}(\\tau_0)

    Features the data does not need are shrunk towards zero by their own scale τ_d.

    Sites: ``head.ard_scale`` (D,), the per-feature scales τ (sampled; ``empirical=False``).
    With ``empirical=True`` τ is instead a learned ``pyro.param`` of the same name (type-II
    maximum likelihood): the prior is then Gaussian given τ and the closed-form ELBO applies.

    Parameters
    ----------
    global_scale: τ₀ > 0, the HalfCauchy scale (and the initial τ when empirical).
    empirical: learn τ as a parameter instead of sampling it.
    """

    def __init__(self, global_scale: float = 1.0, empirical: bool = False):
        if not global_scale > 0:
            raise ValueError(f"Expected global_scale > 0 but got {global_scale}")
        self.global_scale = float(global_scale)
        self.empirical = bool(empirical)

    def weight_dist(self, in_features, num_rows):
        if self.empirical:
            tau = pyro.param("head.ard_scale", torch.full((in_features,), self.global_scale),
                             constraint=constraints.positive)
        else:
            tau = pyro.sample("head.ard_scale",
                              dist.HalfCauchy(torch.full((in_features,), self.global_scale)).to_event(1))
        scale = tau.unsqueeze(-2).expand(*tau.shape[:-1], num_rows, in_features)
        return dist.Normal(torch.zeros_like(scale), scale)
