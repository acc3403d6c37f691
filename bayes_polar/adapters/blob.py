r"""BLoB: Bayesian low-rank adaptation by backpropagation (Wang et al., NeurIPS 2024), on LoRA and on PoLAR.

Choices, as in the reference implementation (``Wang-ML-Lab/bayesian-peft``, ``modelwrappers/blob.py`` and
``scripts/blob/*.sh``) unless said otherwise:

- **What is Bayesian.** LoRA (``lora-blob``): A (r × in) has a mean-field Gaussian posterior
  :math:`q(A) = \prod_{ij} N(A_{ij}; M_{ij}, \sigma_{ij}^2)`; B (out × r) stays a point estimate ("asymmetric":
  with B = 0 at init the weight noise :math:`B E` starts at zero). PoLAR (``polar-blob``, the paper's
  "PoLAR-ized BLoB"): Θ (r × r) gets that posterior, X and Y stay points on the Stiefel manifold (a Gaussian
  in their ambient coordinates would leave the manifold; Θ is PoLAR's one free Euclidean factor and, like
  LoRA's A, enters ΔW linearly, :math:`\Delta W = s\,X\Theta Y^\top`).
- **Standard deviation.** :math:`\sigma = \operatorname{softplus}(\rho)`. The reference's scripts use its
  other branch, :math:`\sigma = \rho^2` with :math:`\rho \sim U[\varepsilon/\sqrt2, \varepsilon]`,
  :math:`\varepsilon = 0.05`; we start from the same distribution of σ,
  :math:`\sigma_0 = u^2,\ u \sim U[\varepsilon/\sqrt2, \varepsilon]` (σ₀ in [0.00125, 0.0025]), and store
  :math:`\rho = \operatorname{softplus}^{-1}(\sigma_0)`.
- **Prior.** :math:`p = N(0, \sigma_p^2 I)` with :math:`\sigma_p = \beta = 0.2` (``--bayes-beta 0.2``), and
  the closed-form KL :math:`\sum_{ij} \log\frac{\sigma_p}{\sigma_{ij}} + \frac{\sigma_{ij}^2 + M_{ij}^2}
  {2\sigma_p^2} - \frac12`.
- **Sampling: flipout** (Wen et al., 2018), as the reference: one draw :math:`E = \sigma \circ \epsilon`,
  :math:`\epsilon \sim N(0, I)`, per forward pass, decorrelated per token by random signs
  :math:`r \in \{\pm1\}^{in}`, :math:`s \in \{\pm1\}^{r}`:
  :math:`h = W_0 x + s_\alpha B (M x + ((x \circ r) E^\top) \circ s)` (LoRA; PoLAR: the same on
  :math:`z = Y^\top x` with X in place of B). Weights are sampled in training mode, like dropout; in eval
  mode the layer uses the posterior mean (the point prediction).

The KL's weight per training step (BLoB's re-weighting) is :func:`kl_reweighting`.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .layer import PolarLinear

PRIOR_STD = 0.2  # σ_p, BLoB's β
INIT_EPS = 0.05  # BLoB's ε: initial σ in [ε²/2, ε²]


def softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    r""":math:`\rho = y + \log(1 - e^{-y})`, so that :math:`\operatorname{softplus}(\rho) = y` (y > 0)."""
    return y + torch.log(-torch.expm1(-y))


def init_rho(shape, eps: float = INIT_EPS, **factory) -> torch.Tensor:
    r""":math:`\rho = \operatorname{softplus}^{-1}(u^2)`, :math:`u \sim U[\varepsilon/\sqrt2, \varepsilon]` (global RNG)."""
    u = torch.empty(shape, dtype=torch.float32).uniform_(eps / math.sqrt(2), eps)
    return softplus_inverse(u.square()).to(**factory)


def gaussian_kl(mean: torch.Tensor, rho: torch.Tensor, prior_std: float = PRIOR_STD) -> torch.Tensor:
    r""":math:`KL(N(M, \operatorname{diag}\sigma^2) \,\|\, N(0, \sigma_p^2 I))`, σ = softplus(ρ), summed over entries."""
    sigma = F.softplus(rho)
    return (math.log(prior_std) - sigma.log() + (sigma.square() + mean.square()) / (2 * prior_std ** 2) - 0.5).sum()


def flipout(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    r""":math:`((x \circ r) E^\top) \circ s`, :math:`E = \sigma \circ \epsilon` (one draw), r, s random signs per row of x.

    ``x`` (..., in), ``sigma`` (out, in); returns (..., out): the weight noise E applied to x, made
    (nearly) independent across tokens at the cost of one extra low-rank matmul.
    """
    noise = sigma * torch.randn_like(sigma)
    r = torch.empty_like(x).bernoulli_(0.5).mul_(2).sub_(1)
    s = torch.empty(*x.shape[:-1], sigma.shape[0], dtype=x.dtype, device=x.device).bernoulli_(0.5).mul_(2).sub_(1)
    return ((x * r) @ noise.transpose(0, 1)) * s


def kl_reweighting(step: int, period: int) -> float:
    r"""Per-example weight :math:`w_i = M \pi_i` of the KL at adapter step ``step`` (0-based), period M.

    BLoB re-weights the KL within each cycle of M minibatches (M = minibatches per epoch) by
    :math:`\pi_i = 2^i / (2^{M+1} - 1)`, i = 1..M (its code; it grows over the cycle, unlike Blundell et
    al.'s :math:`2^{M-i}`), so :math:`\sum_i \pi_i \approx 1`. The loss here is per example
    (:math:`-\frac1B\sum_t \log p(y_t) + w_i\,KL/N`), hence :math:`w_i = M \pi_i`, whose mean over a cycle is
    :math:`\approx 1`: over every epoch the KL counts exactly as in the ELBO. Computed as
    :math:`M\,2^{i-M-1} / (1 - 2^{-M-1})` (no overflow for large M).
    """
    if period < 1:
        raise ValueError(f"Expected period >= 1 but got {period}")
    i = step % period + 1
    return period * 2.0 ** (i - period - 1) / (1 - 2.0 ** (-period - 1))


# ---------------------------------------------------------------------------------------------- PoLAR
class BayesPolarLinear(PolarLinear):
    r"""PoLAR with a Gaussian posterior on Θ: :math:`h = W_0 x + s\,X(\Theta + E)Y^\top x`, :math:`E \sim N(0, \sigma^2)`.

    ``polar_theta`` is the posterior mean (0 at init), ``polar_theta_rho`` its softplus-std parameter; X, Y
    as in :class:`PolarLinear`. Training mode samples E by :func:`flipout`; eval mode uses the mean.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16.0):
        super().__init__(base_layer, r, alpha)
        theta = self.polar_theta
        self.polar_theta_rho = nn.Parameter(init_rho(theta.shape, dtype=theta.dtype, device=theta.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        z = x.to(self.polar_theta.dtype) @ self.polar_Y  # (..., r)
        delta = z @ self.polar_theta.transpose(0, 1)
        if self.training:
            delta = delta + flipout(z, F.softplus(self.polar_theta_rho))
        return result + (delta @ self.polar_X.transpose(0, 1) * self.scaling).to(result.dtype)

    def kl(self, prior_std: float = PRIOR_STD) -> torch.Tensor:
        return gaussian_kl(self.polar_theta, self.polar_theta_rho, prior_std)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_parameters(), "polar_theta_rho": self.polar_theta_rho}


# ---------------------------------------------------------------------------------------------- LoRA
@functools.cache
def lora_linear_class():
    from peft.tuners.lora import Linear

    class BlobLoraLinear(Linear):
        r"""peft LoRA with a Gaussian posterior on A: :math:`h = W_0 x + s\,B(A + E)x`, :math:`E \sim N(0, \sigma^2)`.

        ``lora_A`` holds the posterior mean (peft's init), ``lora_A_rho`` (a ``ParameterDict`` per adapter,
        saved by peft's state dict like every ``lora_*`` tensor) the softplus-std parameter.
        """

        adapter_layer_names = Linear.adapter_layer_names + ("lora_A_rho",)

        def update_layer(self, adapter_name, *args, **kwargs):
            if "lora_A_rho" not in self._modules:
                self.lora_A_rho = nn.ParameterDict()  # before peft's set_adapter looks for it
            super().update_layer(adapter_name, *args, **kwargs)
            weight = self.lora_A[adapter_name].weight
            self.lora_A_rho[adapter_name] = nn.Parameter(init_rho(weight.shape, dtype=weight.dtype,
                                                                  device=weight.device))

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = super().forward(x, *args, **kwargs)
            if not self.training or self.disable_adapters or self.merged:
                return result
            for name in self.active_adapters:
                if name in self.lora_A_rho:
                    rho, B = self.lora_A_rho[name], self.lora_B[name].weight
                    noise = flipout(x.to(rho.dtype), F.softplus(rho)) @ B.transpose(0, 1)
                    result = result + (noise * self.scaling[name]).to(result.dtype)
            return result

        def kl(self, prior_std: float = PRIOR_STD) -> torch.Tensor:
            return sum(gaussian_kl(self.lora_A[n].weight, rho, prior_std) for n, rho in self.lora_A_rho.items())

    return BlobLoraLinear


def bayesian_layers(model: nn.Module):
    """``(name, layer)`` of every BLoB layer (PoLAR or LoRA) of ``model``."""
    return [(name, m) for name, m in model.named_modules() if callable(getattr(m, "kl", None))
            and (isinstance(m, BayesPolarLinear) or hasattr(m, "lora_A_rho"))]


def adapter_kl(model: nn.Module, prior_std: float = PRIOR_STD) -> torch.Tensor:
    """KL(q ‖ p) summed over every BLoB layer of ``model`` (differentiable in the means and ρ)."""
    layers = bayesian_layers(model)
    if not layers:
        raise ConfigError("model carries no BLoB layers: inject_polar / inject_lora with bayesian=True")
    return sum(layer.kl(prior_std) for _, layer in layers)
