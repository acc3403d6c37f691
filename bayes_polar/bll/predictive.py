"""Posterior predictive of the Bayesian last layer: one backbone pass, cheap sampling after it.

.. math:: p(y \\mid x) \\approx \\frac1S \\sum_{s=1}^S \\operatorname{softmax}(z^{(s)}), \\qquad
          z^{(s)} \\sim \\mathcal N(m, \\operatorname{Cov}(z))

For Gaussian guides the logits are sampled directly from their Gaussian (exact for a linear
head: C-dimensional draws, S in the hundreds costs nothing next to the backbone). For any
guide, :func:`pyro_predictive_proba` samples W through ``pyro.infer.Predictive``.
"""
from __future__ import annotations

import torch
from pyro.infer import Predictive

from .model import head_logits
from .posterior import WEIGHT_SITE, GaussianWeights

DEFAULT_NUM_SAMPLES = 256


def _psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a batch of PSD matrices (robust to singular ones)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    return eigenvectors * eigenvalues.clamp(min=0).sqrt().unsqueeze(-2) @ eigenvectors.transpose(-1, -2)


def sample_logits(q: GaussianWeights, phi, mask=None, num_samples: int = DEFAULT_NUM_SAMPLES,
                  generator: torch.Generator | None = None, noise_variance=None) -> torch.Tensor:
    """(S, B, C) logit draws z ~ N(m, Cov(z) + diag(σ²)) under q; missing choices get −∞.

    ``noise_variance``: VBLL's logit noise σ² (C,) or (1,), independent per logit; None: none.
    """
    mean, cov = q.logit_moments(phi)
    if noise_variance is not None:
        cov = cov + torch.diag_embed(noise_variance.to(cov.dtype).expand(mean.shape))
    if mask is not None:  # missing choices: no variance (their logit is −∞ anyway)
        keep = (mask.unsqueeze(-1) & mask.unsqueeze(-2)).to(cov.dtype)
        cov = cov * keep
    noise = torch.randn(num_samples, *mean.shape, dtype=mean.dtype, generator=generator)
    logits = mean + torch.einsum("bij,sbj->sbi", _psd_sqrt(cov), noise)
    if mask is not None:
        logits = logits.masked_fill(~mask.bool(), float("-inf"))
    return logits


def sample_proba(q: GaussianWeights, phi, mask=None, num_samples: int = DEFAULT_NUM_SAMPLES,
                 generator: torch.Generator | None = None, noise_variance=None) -> torch.Tensor:
    """(S, B, C) per-draw probabilities softmax(z_s), z_s sampled by :func:`sample_logits`."""
    return sample_logits(q, phi, mask, num_samples, generator, noise_variance).softmax(-1)


def predictive_proba(q: GaussianWeights, phi, mask=None, num_samples: int = DEFAULT_NUM_SAMPLES,
                     generator: torch.Generator | None = None, noise_variance=None) -> torch.Tensor:
    """(B, C) posterior predictive probabilities, averaging softmax over sampled logits."""
    return sample_proba(q, phi, mask, num_samples, generator, noise_variance).mean(0)


def logit_variance(q: GaussianWeights, phi, mask=None) -> torch.Tensor:
    """(B, C) marginal logit variances Var(z_c) = φ_cᵀ Σ_{k(c)} φ_c under q (logit noise not included);
    0 on missing choices."""
    var = q.logit_moments(phi)[1].diagonal(dim1=-2, dim2=-1)
    return var if mask is None else var * mask


def mean_proba(q: GaussianWeights, phi, mask=None) -> torch.Tensor:
    """(B, C) point prediction softmax(m) at the posterior mean (no sampling)."""
    logits = head_logits(q.loc, phi, mask)
    return logits.softmax(-1)


@torch.no_grad()
def pyro_sample_proba(guide, phi, mask=None, num_samples: int = DEFAULT_NUM_SAMPLES) -> torch.Tensor:
    """(S, B, C) per-draw probabilities for any guide: W drawn by ``pyro.infer.Predictive``."""
    weights = sample_weights(guide, phi, mask, num_samples=num_samples)  # (S, K, D)
    return head_logits(weights.unsqueeze(1), phi, mask).softmax(-1)


@torch.no_grad()
def pyro_predictive_proba(guide, phi, mask=None, num_samples: int = DEFAULT_NUM_SAMPLES) -> torch.Tensor:
    """(B, C) predictive probabilities for any guide: W drawn by ``pyro.infer.Predictive``."""
    return pyro_sample_proba(guide, phi, mask, num_samples).mean(0)


@torch.no_grad()
def sample_weights(guide, phi, mask=None, num_samples: int = DEFAULT_NUM_SAMPLES) -> torch.Tensor:
    """(S, K, D) draws of W from the guide, vectorised by ``pyro.infer.Predictive``.

    The guide is run on its own: it has no data plate, so its sample dim sits right before W's
    event dims (Predictive on model + guide would place it by the model's plate nesting).
    """
    predictive = Predictive(guide, num_samples=num_samples, parallel=True, return_sites=(WEIGHT_SITE,))
    return predictive(phi, mask)[WEIGHT_SITE]
