"""Per-question uncertainty scores from per-sample predictive probabilities (every method, one function).

``sample_proba`` is (S, B, C): S draws of the class probabilities of B questions with C choices,
each draw summing to 1 over the choices (a choice that does not exist has probability 0). The
draws are last-layer samples (VBLL, Laplace), ensemble members or MC-dropout passes; S = 1 for
point methods. With p̄ = (1/S) Σ_s p_s the averaged predictive:

.. math::
    \\text{max\\_prob} = \\max_c \\bar p_c, \\qquad
    \\text{entropy} = H[\\bar p] = -\\sum_c \\bar p_c \\log \\bar p_c \\quad (\\text{total}),

    \\text{aleatoric} = \\frac1S \\sum_s H[p_s], \\qquad
    \\text{mutual\\_information} = \\max(0,\\ H[\\bar p] - \\tfrac1S \\textstyle\\sum_s H[p_s]) \\quad (\\text{epistemic}),

so total = aleatoric + epistemic (H is concave, so the difference is ≥ 0 up to rounding; the
clamp removes the rounding). With ``logit_var`` (B, C), the marginal variances Var(z_c) of a
Gaussian last layer (VBLL, Laplace), ``logit_variance`` is their mean over the question's valid
choices. With ``feature_norm2`` (B, C) too, the squared norms ‖φ_c‖² of the features the head reads,
the variance Var(z_c) = φ_cᵀ Σ φ_c = ‖φ_c‖² · (φ_cᵀ Σ φ_c / ‖φ_c‖²) splits into a *spread* and a
*novelty*, each averaged over the valid choices:

.. math::
    \\text{spread} = \\operatorname{mean}_c \\lVert\\phi_c\\rVert^2, \\qquad
    \\text{novelty} = \\operatorname{mean}_c \\frac{\\phi_c^\\top \\Sigma\\, \\phi_c}{\\lVert\\phi_c\\rVert^2}
    \\quad (0 \\text{ where } \\phi_c = 0).

In the ``options`` format φ_c is centred over the question's options, so ``spread`` is how far they
lie apart (a diagnostic, not an uncertainty) and ``novelty`` the posterior variance per unit length
along them: invariant to the features' scale, large in directions the training data left
uncertain. A shifted task whose options are more alike has less logit variance however novel its
directions (``benchmarks/ood_epistemic.py``); ``novelty`` is the epistemic score that sees past that.
Entropies are in nats; 0 log 0 = 0.

For every score but ``max_prob`` larger means more uncertain; :data:`HIGHER_IS_CERTAIN` lists the
exceptions, and :func:`uncertainty` turns any score into "larger = more uncertain".
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InvalidValueError, NumericalError, ShapeMismatchError

SCORES = ("max_prob", "entropy", "aleatoric", "mutual_information", "logit_variance", "spread", "novelty")
HIGHER_IS_CERTAIN = ("max_prob",)
ROW_SUM_ATOL = 1e-4


def _entropy(p: Tensor) -> Tensor:
    """H[p] = −Σ_c p_c log p_c over the last dim, with 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(-1)


def _check(sample_proba, mask) -> tuple[Tensor, Tensor | None]:
    p = torch.as_tensor(sample_proba)
    if p.ndim != 3 or 0 in p.shape:
        raise ShapeMismatchError(f"sample_proba must be (S, B, C) with S, B, C >= 1 but got shape {tuple(p.shape)} "
                                 "(a point method has S = 1: pass probs.unsqueeze(0))")
    p = p.detach().double()
    if not torch.isfinite(p).all():
        raise NumericalError("sample_proba has NaN/Inf entries")
    if (p < 0).any():
        raise InvalidValueError("sample_proba must be >= 0 (pass probabilities, not logits)")
    deviation = (p.sum(-1) - 1).abs().max()
    if deviation > ROW_SUM_ATOL:
        raise InvalidValueError(f"each draw of sample_proba must sum to 1 over the choices (off by {float(deviation):.3g}); "
                                "pass probabilities, not logits")
    if mask is None:
        return p, None
    mask = torch.as_tensor(mask).bool()
    if tuple(mask.shape) != tuple(p.shape[1:]):
        raise ShapeMismatchError(f"mask must be (B, C) = {tuple(p.shape[1:])} but got {tuple(mask.shape)}")
    if (p.masked_select(~mask.expand_as(p)) > ROW_SUM_ATOL).any():
        raise InvalidValueError("sample_proba puts probability on choices the mask marks as missing")
    return p, mask


def uncertainty_scores(sample_proba, mask=None, logit_var=None, feature_norm2=None) -> dict[str, Tensor]:
    """Per-question scores ``{max_prob, entropy, aleatoric, mutual_information[, logit_variance[, spread,
    novelty]]}``, each (B,) float64.

    Parameters
    ----------
    sample_proba : Tensor (S, B, C)
        Per-draw class probabilities (see the module docstring); S = 1 gives mutual information 0.
    mask : Tensor (B, C), optional
        Which choices exist; checked (no probability on missing choices) and used for ``logit_variance``.
    logit_var : Tensor (B, C), optional
        Marginal logit variances of a Gaussian last layer; adds ``logit_variance`` (mean over valid choices).
    feature_norm2 : Tensor (B, C), optional
        ‖φ_c‖² of the head's features (needs ``logit_var``); adds ``spread`` and ``novelty``.
    """
    p, mask = _check(sample_proba, mask)
    mean = p.mean(0)  # (B, C)
    total = _entropy(mean)
    aleatoric = _entropy(p).mean(0)
    scores = {"max_prob": mean.max(-1).values, "entropy": total, "aleatoric": aleatoric,
              "mutual_information": (total - aleatoric).clamp(min=0)}
    if logit_var is not None:
        var = torch.as_tensor(logit_var).detach().double()
        if tuple(var.shape) != tuple(mean.shape):
            raise ShapeMismatchError(f"logit_var must be (B, C) = {tuple(mean.shape)} but got {tuple(var.shape)}")
        valid = torch.ones_like(mean, dtype=torch.bool) if mask is None else mask
        count = valid.sum(-1).clamp(min=1)
        scores["logit_variance"] = (var * valid).sum(-1) / count
        if feature_norm2 is not None:
            norm2 = torch.as_tensor(feature_norm2).detach().double()
            if tuple(norm2.shape) != tuple(mean.shape):
                raise ShapeMismatchError(f"feature_norm2 must be (B, C) = {tuple(mean.shape)} but got {tuple(norm2.shape)}")
            if (norm2 < 0).any() or not torch.isfinite(norm2).all():
                raise InvalidValueError("feature_norm2 must be finite squared norms (>= 0)")
            novelty = torch.where(norm2 > 0, var / norm2.clamp(min=torch.finfo(norm2.dtype).tiny), torch.zeros_like(var))
            scores["spread"] = (norm2 * valid).sum(-1) / count
            scores["novelty"] = (novelty * valid).sum(-1) / count
    elif feature_norm2 is not None:
        raise InvalidValueError("feature_norm2 needs logit_var (spread and novelty split the logit variance)")
    return scores


def uncertainty(scores: dict[str, Tensor], name: str) -> Tensor:
    """Score ``name`` oriented so that larger means more uncertain (``max_prob`` → 1 − max_prob)."""
    if name not in scores:
        raise InvalidValueError(f"No score {name!r}; have {sorted(scores)}")
    return 1 - scores[name] if name in HIGHER_IS_CERTAIN else scores[name]
