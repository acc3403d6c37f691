r"""Adapter diagnostics: stable rank of the update and distance of X, Y from the Stiefel manifold.

Stable rank of an update :math:`\Delta W` with singular values :math:`\sigma_1 \ge \sigma_2 \ge \dots`:

.. math:: \operatorname{srank}(\Delta W) = \frac{\|\Delta W\|_F^2}{\|\Delta W\|_2^2}
          = \frac{\sum_i \sigma_i^2}{\sigma_1^2} \in [1, r]

It is **0.0 for** :math:`\Delta W = 0` (by convention: the adapters have not moved, e.g. at
init where Θ = 0 or LoRA's B = 0), so averages over layers stay finite.

For a factored update :math:`\Delta W = s\,U M V^\top` with tall U (out, r) and V (in, r), QR
factors :math:`U = Q_U R_U`, :math:`V = Q_V R_V` give :math:`\Delta W = Q_U (s R_U M R_V^\top) Q_V^\top`
with orthonormal :math:`Q_U, Q_V`, so :math:`\Delta W` has the singular values of the r × r
matrix :math:`s R_U M R_V^\top`: exact for any U, V (even off the manifold), in O((out + in) r²).
PoLAR: U = X, M = Θ, V = Y. LoRA: U = B, M = I, V = Aᵀ.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import OffManifoldError
from .layer import PolarLinear
from .modules import adapter_layers


def stable_rank_from_singular_values(sigma: torch.Tensor) -> float:
    r""":math:`\sum_i \sigma_i^2 / \max_i \sigma_i^2`; 0.0 when every :math:`\sigma_i` is 0."""
    top = sigma.abs().max()
    if top == 0:
        return 0.0
    return float(((sigma / top) ** 2).sum())


def stable_rank(delta_w: torch.Tensor) -> float:
    r""":math:`\|\Delta W\|_F^2 / \|\Delta W\|_2^2` of a matrix (0.0 for the zero matrix), in float64."""
    return stable_rank_from_singular_values(torch.linalg.svdvals(delta_w.detach().double()))


def factored_singular_values(u: torch.Tensor, core: torch.Tensor, v: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    r"""Singular values of :math:`s\,U M V^\top` (U: (out, r), M: (r, r), V: (in, r)) via two thin QRs."""
    u, core, v = (t.detach().double() for t in (u, core, v))
    r_u = torch.linalg.qr(u, mode="r").R  # (r, r)
    r_v = torch.linalg.qr(v, mode="r").R  # (r, r)
    return torch.linalg.svdvals(scaling * (r_u @ core @ r_v.transpose(0, 1)))


def layer_singular_values(layer: nn.Module) -> torch.Tensor:
    """Singular values of a PolarLinear's or a peft LoRA layer's (first active adapter's) ΔW."""
    if isinstance(layer, PolarLinear):
        return factored_singular_values(layer.polar_X, layer.polar_theta, layer.polar_Y, layer.scaling)
    adapter = layer.active_adapters[0]
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # (r, in), (out, r)
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    return factored_singular_values(b, eye, a.transpose(0, 1), layer.scaling[adapter])


def layer_stable_rank(layer: nn.Module) -> float:
    """Stable rank of one adapter layer's ΔW, without forming ΔW."""
    return stable_rank_from_singular_values(layer_singular_values(layer))


def _gram_error(x: torch.Tensor) -> float:
    x = x.detach().double()
    return float(torch.linalg.matrix_norm(x.transpose(0, 1) @ x - torch.eye(x.shape[1], dtype=x.dtype)))


def orthogonality_error(layer: PolarLinear) -> dict[str, float]:
    r""":math:`\|X^\top X - I_r\|_F` and :math:`\|Y^\top Y - I_r\|_F`, as ``{"X": ..., "Y": ...}`` (float64)."""
    return {"X": _gram_error(layer.polar_X), "Y": _gram_error(layer.polar_Y)}


def assert_orthogonal(layer: PolarLinear, atol: float = 1e-5) -> None:
    r"""Raise :class:`OffManifoldError` (an AssertionError) if :math:`\|X^\top X - I\|_F > atol` (or Y's)."""
    for factor, error in orthogonality_error(layer).items():
        if not error <= atol:
            raise OffManifoldError(f"||{factor}^T {factor} - I||_F = {error:.3g} > atol = {atol:g}")


def adapter_diagnostics(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per adapted module: ``stable_rank``; PoLAR layers also ``orthogonality_error_X`` and ``_Y``."""
    report = {}
    for name, layer in adapter_layers(model):
        entry = {"stable_rank": layer_stable_rank(layer)}
        if isinstance(layer, PolarLinear):
            errors = orthogonality_error(layer)
            entry.update(orthogonality_error_X=errors["X"], orthogonality_error_Y=errors["Y"])
        report[name] = entry
    return report
