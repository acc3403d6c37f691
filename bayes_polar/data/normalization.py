"""What the last layer sees: option features centred within each question, then scaled per dimension.

.. math::
    \\tilde\\phi_{tc} = (\\phi_{tc} - \\bar\\phi_t) \\oslash s, \\qquad
    \\bar\\phi_t = \\frac{1}{|V_t|}\\sum_{c' \\in V_t} \\phi_{tc'}, \\qquad
    s_d = \\Big(\\frac{1}{|V|} \\sum_{(t, c) \\in V} (\\phi_{tcd} - \\bar\\phi_{td})^2\\Big)^{1/2}

with V_t the valid options of question t and s the root mean square of the centred features over
the training split's valid options (fitted once, saved with the run); ``letters``: φ̄ = 0.

Centring (``options`` only): the softmax over a question's options ignores a shift shared by all of
them, but the Jensen bound m_y − log Σ_c exp(m_c + v_c/2) charges the variance along it; centring
changes no likelihood, only the bound's slack and the posterior it yields. ``letters`` features,
one per question, are not shifted: a shift there is a class-dependent bias the head does not have.

Scaling is a reparameterisation of the head: w̃ = w ⊙ s gives w̃ᵀφ̃ = wᵀ(φ − φ̄), so a head for
unscaled features carries over exactly (:meth:`FeatureScaling.weights`), while the prior and the guide see
features of unit scale, whatever the hidden state's and the log-likelihoods' units.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ShapeMismatchError

TINY_SCALE = 1e-6  # a dimension with less spread than this (e.g. always 0 after centring) is left unscaled
SCALE_KEY = "features.scale"


def centre_options(phi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """φ_tc − mean over the valid options of φ_t, for (B, C, D) options features; missing options stay 0.

    ``letters`` features (B, 1, D) are returned as they are. Differentiable (the adapter step).
    """
    if phi.shape[1] == 1:
        return phi
    if tuple(mask.shape) != tuple(phi.shape[:2]):
        raise ShapeMismatchError(f"Expected a choice mask of shape {tuple(phi.shape[:2])} but got {tuple(mask.shape)}")
    weights = mask.unsqueeze(-1).to(phi.dtype)
    centre = (phi * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
    return (phi - centre) * weights


@dataclass
class FeatureScaling:
    """φ ↦ φ ⊘ s with a per-dimension ``scale`` s (D,) fitted on (centred) training features."""

    scale: torch.Tensor

    @classmethod
    def fit(cls, phi: torch.Tensor, mask: torch.Tensor) -> "FeatureScaling":
        """s_d = RMS of the centred features φ (B, C|1, D) over the valid options (all rows for letters)."""
        rows = phi[:, 0] if phi.shape[1] == 1 else phi[mask.bool()]
        if rows.shape[0] == 0:
            raise ShapeMismatchError("Cannot fit a feature scaling on no features")
        rms = rows.double().pow(2).mean(0).sqrt()
        return cls(torch.where(rms > TINY_SCALE, rms, torch.ones_like(rms)).float())

    def __call__(self, phi: torch.Tensor) -> torch.Tensor:
        if phi.shape[-1] != self.scale.shape[0]:
            raise ShapeMismatchError(f"Features have {phi.shape[-1]} dimensions, the scaling {self.scale.shape[0]}")
        return phi / self.scale.to(phi.dtype)

    def weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Head weights (K, D) for unscaled features ↦ the weights with the same logits on scaled ones."""
        return weights * self.scale.to(weights.dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {SCALE_KEY: self.scale.detach().clone()}

    @classmethod
    def from_tensors(cls, tensors: dict) -> "FeatureScaling | None":
        """The scaling saved by :meth:`state_tensors` among ``tensors``; None if the run has none."""
        return cls(tensors[SCALE_KEY].float().clone()) if SCALE_KEY in tensors else None


def head_features(phi: torch.Tensor, mask: torch.Tensor, scaling: FeatureScaling | None = None) -> torch.Tensor:
    """The one transform from extracted features to the head's input: centre (options), then scale."""
    phi = centre_options(phi, mask)
    return phi if scaling is None else scaling(phi)
