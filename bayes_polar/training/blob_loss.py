r"""The adapter step's loss of BLoB (``lora-blob``, ``polar-blob``): the negative per-example ELBO.

.. math:: \mathcal L_i = -\frac1B \sum_{t \in \text{batch } i} \log \operatorname{softmax}(z_t(\tilde A))_{y_t}
          + w_i\,\lambda\,KL(q \,\|\, p),\qquad \tilde A \sim q \text{ (one flipout draw per pass)},

λ = ``kl_weight`` or 1/N (the ELBO's), :math:`w_i` BLoB's re-weighting
(:func:`~bayes_polar.adapters.blob.kl_reweighting`, mean ≈ 1 over each epoch) or 1. The adapter-step index
i is the adapter scheduler's ``last_epoch``, which checkpoints save and restore, so a resumed run weighs
every step as an uninterrupted one.
"""
from __future__ import annotations

import math

import torch

from ..adapters.blob import adapter_kl, kl_reweighting


class BlobLoss:
    """``loss(features, labels)``: ``nll(features, labels) + w_i λ KL`` (see the module docstring)."""

    def __init__(self, nll, model: torch.nn.Module, scheduler, *, dataset_size: int, steps_per_epoch: int,
                 kl_weight: float | None = None, reweighting: bool = True):
        self.nll, self.model, self.scheduler = nll, model, scheduler
        self.scale = 1.0 / dataset_size if kl_weight is None else float(kl_weight)
        self.period, self.reweighting = max(1, int(steps_per_epoch)), reweighting

    def kl_factor(self) -> float:
        """:math:`w_i \\lambda` at the current adapter step."""
        w = kl_reweighting(self.scheduler.last_epoch, self.period) if self.reweighting else 1.0
        return w * self.scale

    def __call__(self, features, labels) -> torch.Tensor:
        return self.nll(features, labels) + self.kl_factor() * adapter_kl(self.model)


def steps_per_epoch(dataset_size: int, batch_size: int, world_size: int = 1) -> int:
    """Training steps per epoch, M of BLoB's re-weighting: ⌈N / (B · processes)⌉ minibatches (the schedule,
    and so i, advances once per minibatch whatever ``adapter_steps`` is)."""
    return math.ceil(dataset_size / (batch_size * world_size))
