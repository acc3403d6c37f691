r"""Optimisers for adapters: Riemannian Adam (retraction) or the landing field with AdamW (none).

Both take the parameter groups of :func:`param_groups`: ``stiefel`` (every
:class:`geoopt.ManifoldParameter`, no weight decay: :math:`\|X\|_F^2 = r` on the manifold) and
``euclidean`` (Θ, LoRA's A and B, ... with ``weight_decay``).

The landing field (Ablin & Peyré, AISTATS 2022; used for PoLAR in arXiv 2506.03133) replaces the
Euclidean gradient G of a Stiefel factor X by

.. math:: \Lambda(X) = (G X^\top - X G^\top) X + \lambda\, X (X^\top X - I_r)

(twice the relative gradient :math:`\operatorname{skew}(G X^\top) X`, plus the gradient of
:math:`\tfrac{\lambda}{4}\|X^\top X - I\|_F^2`)
and lets AdamW step along it with no retraction. X is never projected back: it "lands" on the
manifold as the second term pulls it in, and stays within a small distance of it
(:data:`LANDING_TOLERANCE`, measured, not guaranteed: Adam's per-coordinate scaling voids the
step-size bound of the original analysis).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ._geoopt import geoopt

OPTIMIZERS = ("riemannian_adam", "landing")

LANDING_TOLERANCE = 0.05
"""Documented bound on ``‖XᵀX − I‖_F`` under the landing optimiser with ``lr <= 1e-3``, ``λ = 1``.

Measured worst case over 1,000 steps, from X, Y on the manifold: 0.012 on the tiny Llama, 0.020 to
0.024 for single layers from 32×16 (r = 4) to 576×576 (r = 8). The drift grows about linearly
with lr (0.065 at lr = 3e-3 for a 576×576 layer): check ``orthogonality_error`` at larger rates."""


def param_groups(model_or_params, lr: float = 1e-3, theta_lr: float | None = None, weight_decay: float = 0.0,
                 stabilize: int | None = None) -> list[dict]:
    """Split trainable parameters into the ``stiefel`` and ``euclidean`` groups (empty ones dropped).

    Parameters
    ----------
    model_or_params : a module (its ``requires_grad`` parameters) or an iterable of parameters.
    lr : learning rate of the Stiefel factors (and of the rest unless ``theta_lr`` is given).
    theta_lr : learning rate of Θ and other Euclidean parameters; defaults to ``lr``.
    weight_decay : applied to the Euclidean group only.
    stabilize : RiemannianAdam projects the Stiefel group back every ``stabilize`` steps.
    """
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    params = [p for p in params if p.requires_grad]
    stiefel = [p for p in params if isinstance(p, geoopt.ManifoldParameter)]
    euclidean = [p for p in params if not isinstance(p, geoopt.ManifoldParameter)]
    groups = [
        dict(name="stiefel", params=stiefel, lr=lr, weight_decay=0.0, stabilize=stabilize),
        dict(name="euclidean", params=euclidean, lr=lr if theta_lr is None else theta_lr,
             weight_decay=weight_decay, stabilize=None),
    ]
    return [g for g in groups if g["params"]]


def landing_field(x: torch.Tensor, grad: torch.Tensor, landing_lambda: float) -> torch.Tensor:
    r""":math:`(G X^\top - X G^\top) X + \lambda X (X^\top X - I)` for a tall X (n, r), in O(n r²).

    The first term is computed as :math:`G (X^\top X) - X (G^\top X)`, never forming an n × n matrix.
    """
    gram = x.transpose(-1, -2) @ x  # (r, r)
    relative = grad @ gram - x @ (grad.transpose(-1, -2) @ x)  # (n, r)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return relative + landing_lambda * (x @ (gram - eye))  # (n, r)


def match_state_layout_(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (``exp_avg``, ...) its parameter's memory layout again.

    Stiefel factors are column-major (the Q of a QR) and Adam's moments are ``zeros_like`` them;
    a checkpoint stores tensors contiguous, and products such as ``Xᵀ exp_avg`` in the transport
    then sum in another order (1 ulp apart), so a resumed run would drift from an uninterrupted one.
    """
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_strided(param.shape, param.stride(), dtype=value.dtype,
                                                 device=value.device).copy_(value)


class RiemannianAdam(geoopt.optim.RiemannianAdam):
    """:class:`geoopt.optim.RiemannianAdam` whose ``load_state_dict`` resumes bit for bit.

    ``torch.optim.Adam.__setstate__`` (run by ``load_state_dict``) turns geoopt's int step counts
    into float32 tensors; geoopt then computes the bias corrections :math:`1 - \\beta^t` in float32
    instead of float64, and a resumed run drifts from the uninterrupted one (~1e-7 per step): the
    counts are made ints again. State tensors get their parameter's layout back
    (:func:`match_state_layout_`).
    """

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = int(state["step"].item())
        match_state_layout_(self)


class LandingAdamW(torch.optim.AdamW):
    r"""AdamW whose groups with a ``landing_lambda`` step along :func:`landing_field`, not the gradient.

    Build it with :func:`make_adapter_optimizer` (``name="landing"``). Groups without
    ``landing_lambda`` (or with None) are plain AdamW. State dicts round-trip like AdamW's, with
    the state tensors in their parameter's memory layout (:func:`match_state_layout_`).
    """

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        match_state_layout_(self)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                lam = group.get("landing_lambda")
                if lam is None:
                    continue
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.copy_(landing_field(p, p.grad, lam))
        super().step()
        return loss


def make_adapter_optimizer(model_or_params, name: str = "riemannian_adam", lr: float = 1e-3,
                           theta_lr: float | None = None, weight_decay: float = 0.0,
                           landing_lambda: float = 1.0, stabilize: int | None = None) -> torch.optim.Optimizer:
    r"""One optimiser for all adapter parameters, chosen by name.

    - ``riemannian_adam``: :class:`RiemannianAdam` (geoopt's, resumable); X, Y take Riemannian Adam steps
      with the QR retraction of :class:`geoopt.EuclideanStiefel`, Θ (and LoRA factors) plain Adam.
    - ``landing``: :class:`LandingAdamW`; X, Y step along the landing field (module docstring),
      no retraction; Θ plain AdamW.

    ``weight_decay`` reaches the Euclidean group only: as an L2 term added to the gradient under
    ``riemannian_adam`` (geoopt follows ``torch.optim.Adam``), decoupled under ``landing``.

    Parameters
    ----------
    model_or_params : module, iterable of parameters, or a list of param-group dicts (used as is).
    name : one of ``OPTIMIZERS``.
    lr, theta_lr, weight_decay, stabilize : see :func:`param_groups`.
    landing_lambda : :math:`\lambda > 0` of the landing field.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer name must be one of {OPTIMIZERS}, got {name!r}")
    for key, value in (("lr", lr), ("landing_lambda", landing_lambda)):
        if not value > 0:
            raise ConfigError(f"Expected {key} > 0 but got {value!r}")
    groups = _groups(model_or_params, lr, theta_lr, weight_decay, stabilize)
    if name == "riemannian_adam":
        return RiemannianAdam(groups, lr=lr)
    for group in groups:
        group.pop("stabilize", None)
        if group.get("name") == "stiefel":
            group["landing_lambda"] = landing_lambda
    return LandingAdamW(groups, lr=lr, weight_decay=0.0)


def _groups(model_or_params, lr, theta_lr, weight_decay, stabilize) -> list[dict]:
    if not isinstance(model_or_params, nn.Module):
        model_or_params = list(model_or_params)
        if model_or_params and isinstance(model_or_params[0], dict):
            return model_or_params
    groups = param_groups(model_or_params, lr, theta_lr, weight_decay, stabilize)
    if not groups:
        raise ConfigError("No trainable parameters: inject_polar or inject_lora first")
    return groups
