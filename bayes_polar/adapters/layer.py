"""PolarLinear: a frozen ``nn.Linear`` plus a PoLAR update on two Stiefel factors (arXiv 2506.03133)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import BayesPolarWarning, ConfigError, UnsupportedModuleError
from ._geoopt import geoopt
from .config import check_alpha, check_rank

POLAR_PREFIX = "polar_"
LOW_PRECISION = (torch.float16, torch.bfloat16)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters of float16/bfloat16 layers live in float32 (QR retractions need it); others match."""
    return torch.float32 if base_dtype in LOW_PRECISION else base_dtype


class PolarLinear(nn.Module):
    r"""A linear layer with a polar-decomposed low-rank update.

    .. math:: W' = W_0 + s\,X\Theta Y^\top,\qquad X^\top X = Y^\top Y = I_r,\qquad s = \alpha / r

    Parameters
    ----------
    base_layer : torch.nn.Linear
        The frozen layer, weight :math:`W_0` of shape (out, in).
    r : int
        Rank, ``0 < r <= min(in, out)``.
    alpha : float
        Scale numerator; the update is multiplied by ``scaling = alpha / r``.

    Notes
    -----
    ``polar_X`` (out, r) and ``polar_Y`` (in, r) are :class:`geoopt.ManifoldParameter` s on one
    :class:`geoopt.EuclideanStiefel` instance per layer (QR retraction, DESIGN §4), drawn as the Q
    factor of a Gaussian matrix from the global torch RNG. ``polar_theta`` (r, r) is a plain
    parameter, zero at init, so the layer starts equal to ``base_layer``. Optimise X and Y with
    :class:`geoopt.optim.RiemannianAdam` (see :func:`make_adapter_optimizer`).

    Usage::

        layer = PolarLinear(nn.Linear(64, 32), r=4, alpha=8)
        y = layer(torch.randn(2, 64))  # equals the base layer's output until theta moves
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16.0):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise UnsupportedModuleError(f"PolarLinear wraps torch.nn.Linear layers, got {type(base_layer).__name__}")
        r = check_rank(r)
        out_features, in_features = base_layer.out_features, base_layer.in_features
        if r > min(in_features, out_features):
            raise ConfigError(
                f"Expected r <= min(in_features, out_features) = {min(in_features, out_features)} but got {r}"
            )
        self.base_layer = base_layer
        self.r, self.alpha = r, check_alpha(alpha)
        self.scaling = self.alpha / r
        self.merged = False
        self.manifold = geoopt.EuclideanStiefel()
        factory = dict(dtype=adapter_dtype(base_layer.weight.dtype), device=base_layer.weight.device)
        self.polar_X = self._stiefel_parameter(out_features, **factory)  # (out, r)
        self.polar_Y = self._stiefel_parameter(in_features, **factory)  # (in, r)
        self.polar_theta = nn.Parameter(torch.zeros(r, r, **factory))  # (r, r)

    def _stiefel_parameter(self, n: int, dtype, device) -> geoopt.ManifoldParameter:
        point = self.manifold.random(n, self.r, dtype=dtype, device=device)  # Q factor of a Gaussian (n, r)
        return geoopt.ManifoldParameter(point, manifold=self.manifold)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        r""":math:`\Delta W = s\,X\Theta Y^\top`, shape (out, in), in the adapter dtype."""
        return (self.polar_X @ self.polar_theta @ self.polar_Y.transpose(0, 1)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`h = W_0 x + s\,X\Theta Y^\top x`, computed as ``((x Y) Θᵀ) Xᵀ`` (never forms ΔW)."""
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        x = x.to(self.polar_theta.dtype)
        z = x @ self.polar_Y  # (..., r)
        z = z @ self.polar_theta.transpose(0, 1)  # (..., r)
        delta = z @ self.polar_X.transpose(0, 1)  # (..., out)
        return result + (delta * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the base weight; forward then runs the base layer only. Warns if merged."""
        if self.merged:
            warnings.warn("PolarLinear is already merged; merge() did nothing", BayesPolarWarning, stacklevel=2)
            return
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight (exact up to float rounding). Warns if not merged."""
        if not self.merged:
            warnings.warn("PolarLinear is not merged; unmerge() did nothing", BayesPolarWarning, stacklevel=2)
            return
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by local name: ``polar_X``, ``polar_Y``, ``polar_theta``."""
        return {"polar_X": self.polar_X, "polar_Y": self.polar_Y, "polar_theta": self.polar_theta}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}"
        )
