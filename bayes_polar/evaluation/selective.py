"""Selective prediction: answer only the most confident questions, abstain on the rest.

Rank the N questions by confidence (most confident first; default: the max predictive
probability). Answering the top k gives coverage k/N and selective risk r_k = (errors among the
top k) / k. The risk–coverage curve's area and its excess over an oracle ranking (Geifman et al.,
2018):

.. math::
    \\mathrm{AURC} = \\frac1N \\sum_{k=1}^{N} r_k, \\qquad
    \\mathrm{E\\text{-}AURC} = \\mathrm{AURC} - \\mathrm{AURC}^\\star,

where AURC* is the AURC of the ranking that puts every correct answer first (it depends only on
the error rate). Lower is better; E-AURC ≥ 0 isolates the ranking's quality from the accuracy.
Accuracy at coverage c is the accuracy of the top ⌈cN⌉ questions. Confidence ties are broken
errors-first (pessimistic), so the numbers do not depend on the order of the questions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..errors import InvalidValueError, ShapeMismatchError
from .metrics import _check, _figure, _save

COVERAGES = (0.8, 0.9)


@dataclass(frozen=True)
class SelectiveCurve:
    """``coverage`` (N,) = k/N and ``accuracy`` (N,) of the top-k questions, k = 1..N."""

    coverage: Tensor
    accuracy: Tensor

    @property
    def risk(self) -> Tensor:
        return 1 - self.accuracy

    def accuracy_at(self, coverage: float) -> float:
        if not 0 < coverage <= 1:
            raise InvalidValueError(f"Expected 0 < coverage <= 1 but got {coverage!r}")
        k = max(1, math.ceil(coverage * len(self.coverage) - 1e-9))
        return float(self.accuracy[k - 1])

    def aurc(self) -> float:
        return float(self.risk.mean())


def _curve(correct: Tensor, confidence: Tensor) -> SelectiveCurve:
    by_correct = correct.argsort(stable=True)  # ties: errors first
    order = by_correct[(-confidence[by_correct]).argsort(stable=True)]
    hits = correct[order].cumsum(0)
    k = torch.arange(1, len(order) + 1, dtype=torch.float64)
    return SelectiveCurve(k / len(order), hits / k)


def selective_curve(probs, labels, confidence=None) -> SelectiveCurve:
    """The accuracy–coverage curve of ``probs`` (N, C), ranking by ``confidence`` (N,) (default: max probability)."""
    p, y = _check(probs, labels)
    correct = (p.argmax(1) == y).double()
    if confidence is None:
        confidence = p.max(1).values
    confidence = torch.as_tensor(confidence).detach().double()
    if tuple(confidence.shape) != (p.shape[0],):
        raise ShapeMismatchError(f"confidence must be ({p.shape[0]},) but got {tuple(confidence.shape)}")
    return _curve(correct, confidence)


def selective_metrics(probs, labels, confidence=None) -> dict:
    """``{"aurc", "e_aurc", "acc@80", "acc@90"}`` (plain floats; AURC in risk units, accuracies fractions)."""
    curve = selective_curve(probs, labels, confidence)
    p, y = _check(probs, labels)
    correct = (p.argmax(1) == y).double()
    oracle = _curve(correct, correct).aurc()
    aurc = curve.aurc()
    return {"aurc": aurc, "e_aurc": max(0.0, aurc - oracle),
            **{f"acc@{round(100 * c)}": curve.accuracy_at(c) for c in COVERAGES}}


def plot_selective(curves: Mapping[str, SelectiveCurve], path, title: str | None = None) -> Path:
    """Save accuracy–coverage curves ``{name: SelectiveCurve}`` on one axis as PNG; the legend gives each AURC."""
    if not curves:
        raise InvalidValueError("curves is empty: pass {name: SelectiveCurve}")
    fig = _figure((5, 4))
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ax.plot(curve.coverage.numpy(), curve.accuracy.numpy(), lw=1.5, label=f"{name} (AURC {curve.aurc():.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="coverage (fraction answered)", ylabel="accuracy of the answered",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)
