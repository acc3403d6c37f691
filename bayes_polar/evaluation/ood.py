"""Out-of-distribution detection: how well each uncertainty score separates ID from OOD questions.

OOD questions are the positive class and every score is oriented so that larger means more
uncertain (:func:`~bayes_polar.evaluation.uncertainty.uncertainty`: ``max_prob`` → 1 − max_prob).
Per score, with torchmetrics' binary metrics on the pooled questions:

.. math::
    \\mathrm{AUROC} = P(u_{\\text{ood}} > u_{\\text{id}}) + \\tfrac12 P(u_{\\text{ood}} = u_{\\text{id}}), \\qquad
    \\mathrm{AUPR} = \\sum_k (R_k - R_{k-1}) P_k \\ \\text{(average precision, OOD positive)}.

AUROC 1: every OOD question is more uncertain than every ID one; 0.5: no separation. AUPR's
chance level is the OOD fraction of the pool.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InvalidValueError
from .uncertainty import uncertainty


def detection_metrics(id_score, ood_score) -> dict:
    """``{"auroc", "aupr"}`` of an uncertainty score (larger = more uncertain), OOD positive."""
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    id_score, ood_score = (torch.as_tensor(s).detach().double().flatten() for s in (id_score, ood_score))
    if not len(id_score) or not len(ood_score):
        raise InvalidValueError(f"Need ID and OOD questions, got {len(id_score)} ID and {len(ood_score)} OOD")
    if not (torch.isfinite(id_score).all() and torch.isfinite(ood_score).all()):
        raise InvalidValueError("uncertainty scores must be finite")
    scores = torch.cat([id_score, ood_score])
    target = torch.cat([torch.zeros(len(id_score)), torch.ones(len(ood_score))]).long()
    return {"auroc": float(binary_auroc(scores, target)), "aupr": float(binary_average_precision(scores, target))}


def ood_detection(id_scores: dict[str, Tensor], ood_scores: dict[str, Tensor]) -> dict[str, dict]:
    """``{score: {"auroc", "aupr"}}`` for every score both dicts have (from ``uncertainty_scores``)."""
    names = [name for name in id_scores if name in ood_scores]
    if not names:
        raise InvalidValueError(f"No common scores: ID has {sorted(id_scores)}, OOD has {sorted(ood_scores)}")
    return {name: detection_metrics(uncertainty(id_scores, name), uncertainty(ood_scores, name)) for name in names}
