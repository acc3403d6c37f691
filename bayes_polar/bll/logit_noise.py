"""VBLL's learned logit noise (Harrison et al., 2024, discriminative classification).

.. math::
    z_c = w_{k(c)}^\\top \\phi_c + \\varepsilon_c, \\qquad \\varepsilon_c \\sim \\mathcal N(0, \\sigma^2_{k(c)}),
    \\qquad \\log p(\\Lambda) = \\tfrac{\\nu + C + 1}{2} \\log\\det\\Lambda - \\tfrac{s}{2}\\operatorname{tr}\\Lambda + \\text{const}

with Λ = diag(1/σ²_{k(c)}) over the C classes: VBLL's Wishart prior on the noise precision (a
Wishart with ν + 2C + 2 degrees of freedom and scale I/s, on the diagonal). σ² is one value per
weight row (per class for ``letters``, one shared by all options for ``options``), a point
estimate: the ELBO gains log p(Λ), the Jensen bound adds σ² to each logit's variance,

.. math:: m_y - \\log \\sum_c \\exp\\big(m_c + (v_c + \\sigma^2_{k(c)})/2\\big),

and the predictive samples z with that extra independent variance. Closed form only (the
``jensen`` estimator): the noise is not a site of the Pyro model. σ² starts at the prior's mode
1/(ν + C + 1). A noise shared by all classes (``options``) only lowers the bound by σ²/2, so its
learned value stays small; per-class noise (``letters``) is what VBLL learns.
"""
from __future__ import annotations

import pyro
import torch
from pyro.distributions import constraints

from ..errors import ConfigError

SITE = "head.logit_noise"


class LogitNoise:
    """σ² (K,) as the Pyro parameter ``head.logit_noise``, and its log prior.

    Parameters
    ----------
    num_rows: K, the number of weight rows (one σ² each).
    num_classes: C, the classes (``letters``) or option slots (``options``) a question has.
    dof: ν ≥ 0 (VBLL's ``dof``); wishart_scale: s > 0 (VBLL's ``wishart_scale``).
    """

    def __init__(self, num_rows: int, num_classes: int, dof: float = 1.0, wishart_scale: float = 1.0):
        if num_rows < 1 or num_classes < num_rows:
            raise ConfigError(f"Expected 1 <= num_rows <= num_classes but got {num_rows}, {num_classes}")
        if not dof >= 0 or not wishart_scale > 0:
            raise ConfigError(f"Expected dof >= 0 and wishart_scale > 0 but got {dof}, {wishart_scale}")
        self.num_rows, self.num_classes = int(num_rows), int(num_classes)
        self.dof, self.wishart_scale = float(dof), float(wishart_scale)

    @property
    def concentration(self) -> float:
        """(ν + C + 1) / 2, the weight of log det Λ."""
        return 0.5 * (self.dof + self.num_classes + 1)

    def variance(self) -> torch.Tensor:
        """σ²_{k(c)}: (C,) for ``letters``, (1,) for ``options`` (broadcasts over the options), created at
        the prior's mode on first use (inside the head's parameter store)."""
        mode = 1.0 / (2 * self.concentration / self.wishart_scale)
        return pyro.param(SITE, torch.full((self.num_rows,), mode), constraint=constraints.positive)

    def log_prior(self) -> torch.Tensor:
        """log p(Λ) up to a constant, Λ = diag(1/σ²_{k(c)}) over the C classes."""
        precision = 1.0 / self.variance()
        per_row = self.num_classes // self.num_rows  # classes read by each row: 1 (letters) or C (options)
        return per_row * (self.concentration * precision.log() - 0.5 * self.wishart_scale * precision).sum()

    def __repr__(self) -> str:
        return f"LogitNoise(num_rows={self.num_rows}, num_classes={self.num_classes}, dof={self.dof}, " \
               f"wishart_scale={self.wishart_scale})"


def check_estimator(estimator: str) -> None:
    """The noise lives in the closed form: any other ELBO estimator is a ConfigError."""
    if estimator != "jensen":
        raise ConfigError(f"logit noise needs the closed-form ELBO (elbo='jensen'), got {estimator!r}")

