"""Optimisation steps: each updates one block of parameters on one minibatch and returns logs.

PoLAR-VBLL alternates a :class:`GuideStep` (SVI on q with the features detached) and an
:class:`AdapterStep` (X, Y, Θ on the same ELBO with q fixed). Point-estimate methods use one
:class:`AdapterStep` that also moves their head. :class:`JointStep` is the non-alternating
ablation. Learning-rate schedules are :func:`lr_lambda` factors of the *outer* training step:
the method advances them once per minibatch (``Method.train_step``), however many inner steps
it takes. ``clip_norm`` has one meaning everywhere (:func:`clip_gradients`).
"""
from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.infer.util import zero_grads

from ..errors import NumericalError


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplicative learning-rate factor per step: linear warm-up, then cosine/linear decay or constant."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def clip_gradients(params, clip_norm: float | None) -> torch.Tensor | None:
    """Rescale the gradients of ``params`` so that their global norm ‖(g_1, …, g_n)‖₂ ≤ ``clip_norm``.

    The gradients are those of a per-example loss (the guide's are divided by N first). Returns
    the norm before clipping (None when ``clip_norm`` is None or 0: no clipping).
    """
    if not clip_norm:
        return None
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip_norm)
    _check_finite("gradient norm", norm)
    return norm


def _check_finite(name: str, value: torch.Tensor) -> None:
    if not torch.isfinite(value).all():
        raise NumericalError(f"{name} is not finite")


def _check_finite_grads(name: str, params, grads) -> None:
    """Raise before any update if a gradient holds NaN/Inf (says how many tensors, and their shapes)."""
    bad = [tuple(p.shape) for p, g in zip(params, grads) if g is not None and not torch.isfinite(g).all()]
    if bad:
        raise NumericalError(f"gradients of the loss {name} are not finite in {len(bad)} of {len(params)} "
                             f"parameter tensors (shapes {bad[:3]})")


class GuideStep:
    """SVI step(s) on the guide, features detached: ``{"elbo": per-example ELBO}``."""

    updates_adapters = False

    def __init__(self, head, repeats: int = 1):
        self.head, self.repeats = head, repeats

    def __call__(self, features, labels) -> dict:
        for _ in range(self.repeats):
            elbo = self.head.guide_step(features, labels)
        if not math.isfinite(elbo):
            raise NumericalError(f"the ELBO is not finite ({elbo})")
        return {"elbo": elbo}


class AdapterStep:
    """One optimiser step of ``params`` on ``loss_fn(features, labels)``; other parameters untouched.

    Gradients are taken with ``torch.autograd.grad`` with respect to ``params`` only, so a guide
    whose parameters also appear in the loss keeps no stale gradient for its next SVI step.
    """

    updates_adapters = True

    def __init__(self, loss_fn, optimizer, clip_norm: float | None = None, name: str = "loss"):
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.clip_norm, self.name = clip_norm, name
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.grad_sync = None  # multi-process: averages gradients over ranks (bayes_polar.training.distributed.replicate)

    def __call__(self, features, labels) -> dict:
        loss = self.loss_fn(features, labels)
        _check_finite(self.name, loss.detach())
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        _check_finite_grads(self.name, self.params, grads)
        for p, g in zip(self.params, grads):
            p.grad = g
        if self.grad_sync is not None:
            self.grad_sync(self.params)
        logs = {self.name: loss.item()}
        norm = clip_gradients(self.params, self.clip_norm)
        if norm is not None:
            logs["grad_norm"] = norm.item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logs


class JointStep:
    """Non-alternating ablation: one backward through guide and adapters, both optimisers step."""

    updates_adapters = True

    def __init__(self, head, adapter_step: AdapterStep):
        self.head, self.adapter_step = head, adapter_step

    def __call__(self, features, labels) -> dict:
        with self.head.scope():
            return self._step(features, labels)

    def _step(self, features, labels) -> dict:
        with poutine.trace(param_only=True) as capture:
            loss = self.head.loss(features, labels)
        _check_finite("loss", loss.detach())
        # a list, not a set: the same order on every rank when the gradients are averaged
        guide_params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
        adapters = self.adapter_step.params
        loss.backward()
        if self.adapter_step.grad_sync is not None:
            self.adapter_step.grad_sync(adapters + guide_params)
        _check_finite_grads("neg_elbo", [*adapters, *guide_params], [p.grad for p in (*adapters, *guide_params)])
        clip_gradients(adapters, self.adapter_step.clip_norm)
        clip_gradients(guide_params, self.head.clip_norm)
        self.head.optim(guide_params)
        zero_grads(guide_params)
        self.adapter_step.optimizer.step()
        self.adapter_step.optimizer.zero_grad(set_to_none=True)
        return {"elbo": -loss.item()}
