"""Where the last layer starts, from the training split's features before any update.

The features are those of the freshly adapted model (Θ = 0, LoRA B = 0: the base model), centred
(options) and, with ``feature_standardization``, scaled by a :class:`FeatureScaling` fitted on them.
The zero-shot head w₀ (the LM's own classifier, carried into the scaled space as w₀ ⊙ s) starts at
a temperature fitted on the same questions, or at zero (uniform) if even that is worse:

.. math::
    W_{init} = w_0 / T^*, \\quad T^* = \\arg\\min_T \\mathrm{NLL}(\\operatorname{softmax}(w_0^\\top\\phi / T)),
    \\qquad W_{init} = 0 \\ \\text{ if } \\ \\mathrm{NLL}(w_0 / T^*) > \\tfrac1N \\textstyle\\sum_t \\log |V_t|

so the head never starts confidently wrong (NLL above the uniform one): a zero-shot score that
favours wrong answers (e.g. the summed log-likelihood's preference for short options) is tempered
towards uniform before the first step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..bll.model import head_logits
from ..data.features import FeatureExtractor, extract_features
from ..data.formats import EncodedTask, make_loader
from ..data.normalization import FeatureScaling

START_QUESTIONS = 512  # the first questions of the training split fit the scaling and the temperature


@dataclass
class HeadStart:
    """``scaling`` (None: unscaled), ``zero_shot`` (the LM's classifier on the scaled features) and ``init``."""

    scaling: FeatureScaling | None
    zero_shot: torch.Tensor
    init: torch.Tensor
    temperature: float  # inf: the start is uniform
    nll: float  # of ``init`` on the questions it was fitted on
    uniform_nll: float

    def report(self) -> dict:
        """For metrics.json: the fitted temperature (None when uniform) and the start's NLL against uniform's."""
        finite = self.temperature != float("inf")
        return {"temperature": self.temperature if finite else None, "nll": self.nll, "uniform_nll": self.uniform_nll}


def uniform_nll(mask: torch.Tensor) -> float:
    """Mean of log |V_t|: the NLL of the uniform prediction over each question's valid choices."""
    return float(mask.sum(-1).double().log().mean())


def nll(weights: torch.Tensor, phi: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.cross_entropy(head_logits(weights, phi, mask), labels))


def tempered_zero_shot(weights: torch.Tensor, phi: torch.Tensor, mask: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(w₀ / T*, T*)``, or ``(0, inf)`` when the tempered head is still worse than uniform (see module)."""
    from .methods import optimal_temperature

    temperature = optimal_temperature(head_logits(weights, phi, mask), labels)
    tempered = weights / temperature
    if nll(tempered, phi, mask, labels) > uniform_nll(mask):
        return torch.zeros_like(weights), float("inf")
    return tempered, temperature


@torch.no_grad()
def fit_head_start(extractor: FeatureExtractor, train: EncodedTask, tokenizer, zero_shot: torch.Tensor,
                   standardize: bool = True, batch_size: int = 16, limit: int = START_QUESTIONS) -> HeadStart:
    """Fit the scaling (sets ``extractor.scaling``) and the initial head on the first ``limit`` questions."""
    extractor.scaling = None
    extractor.model.eval()
    first = replace(train, items=train.items[:limit], task=replace(train.task, examples=train.task.examples[:limit]))
    phi, mask, labels = extract_features(extractor, make_loader(first, tokenizer, batch_size=batch_size))
    scaling = FeatureScaling.fit(phi, mask) if standardize else None
    if scaling is not None:
        extractor.scaling = scaling
        phi, zero_shot = scaling(phi), scaling.weights(zero_shot)
    init, temperature = tempered_zero_shot(zero_shot, phi, mask, labels)
    return HeadStart(scaling, zero_shot, init, temperature, nll(init, phi, mask, labels), uniform_nll(mask))
