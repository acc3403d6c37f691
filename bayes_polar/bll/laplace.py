"""Post-hoc last-layer Laplace approximation at a point estimate (PoLAR-VBLL + LA, Laplace baselines).

.. math::
    q(W) = \\prod_k \\mathcal N\\big(w_k;\\ \\hat w_k,\\ H_k^{-1}\\big), \\qquad
    H_k = \\sum_t \\sum_{c, c' : k(c) = k(c') = k} \\Lambda_{t,cc'}\\, \\phi_{tc}\\phi_{tc'}^\\top + \\delta I,
    \\qquad \\Lambda_t = \\operatorname{diag}(p_t) - p_t p_t^\\top

the generalised Gauss-Newton of the softmax likelihood, block-diagonal over weight rows. For
``letters`` (one row per class) this is the per-class GGN Σ_t p_tc(1 − p_tc) φ_tφ_tᵀ; for
``options`` (one shared row) it is exact. The prior precision δ is given (1/s for a N(0, s·I)
prior) or chosen by maximising the Laplace evidence (as laplace-torch does post hoc):

.. math::
    \\log p(\\mathcal D \\mid \\delta) \\approx \\log p(\\mathcal D \\mid \\hat W)
      - \\tfrac\\delta2 \\lVert \\hat W - W_0 \\rVert^2 + \\tfrac P2 \\log\\delta
      - \\tfrac12 \\sum_i \\log(\\lambda_i + \\delta)
"""
from __future__ import annotations

import math

import torch

from .model import head_logits
from .posterior import GaussianWeights, check_head_shapes


def ggn_blocks(loc: torch.Tensor, phi: torch.Tensor, mask: torch.Tensor | None = None,
               chunk: int = 256) -> torch.Tensor:
    """(K, D, D) GGN blocks Σ_t Φ_tᵀ Λ_t Φ_t restricted to each weight row, without the prior."""
    num_rows, features = loc.shape
    num_classes = check_head_shapes(phi, num_rows, features)
    blocks = phi.new_zeros(num_rows, features, features, dtype=torch.float64)
    for start in range(0, phi.shape[0], chunk):
        part = phi[start:start + chunk].double().expand(-1, num_classes, features)
        part_mask = None if mask is None else mask[start:start + chunk]
        probs = head_logits(loc.double(), part, part_mask).softmax(-1)  # (B, C)
        if num_rows == 1:
            weighted = (part * probs.unsqueeze(-1)).sum(1)  # Φᵀp: (B, D)
            blocks[0] += torch.einsum("bcd,bc,bce->de", part, probs, part) - weighted.T @ weighted
        else:
            curvature = probs * (1 - probs)  # (B, C): the diagonal of Λ_t
            blocks += torch.einsum("bcd,bc,bce->cde", part, curvature, part)
    return blocks


def laplace_evidence(loc, prior_loc, loglik: float, eigenvalues: torch.Tensor, precision: float) -> float:
    """Laplace approximation of log p(D | δ) at the fixed point ``loc`` (see module docstring)."""
    params = loc.numel()
    distance = (loc - prior_loc).double().pow(2).sum().item()
    logdet = torch.log(eigenvalues.clamp(min=0) + precision).sum().item()
    return loglik - 0.5 * precision * distance + 0.5 * params * math.log(precision) - 0.5 * logdet


def optimize_prior_precision(loc, prior_loc, loglik: float, eigenvalues, grid=None) -> float:
    """The δ maximising :func:`laplace_evidence` on a log grid (then refined around the best point)."""
    grid = torch.logspace(-4, 6, 101) if grid is None else grid
    scores = [laplace_evidence(loc, prior_loc, loglik, eigenvalues, float(d)) for d in grid]
    best = int(torch.tensor(scores).argmax())
    lo, hi = grid[max(best - 1, 0)].log10().item(), grid[min(best + 1, len(grid) - 1)].log10().item()
    fine = torch.logspace(lo, hi, 41)
    scores = [laplace_evidence(loc, prior_loc, loglik, eigenvalues, float(d)) for d in fine]
    return float(fine[int(torch.tensor(scores).argmax())])


def fit_laplace(loc: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                prior_precision: float | str = "marglik", prior_loc: torch.Tensor | None = None
                ) -> tuple[GaussianWeights, float]:
    """Last-layer Laplace at ``loc`` (K, D) from training features; returns (q, prior precision δ).

    ``prior_precision`` is a number (e.g. 1/variance of the model's prior) or ``"marglik"``.
    """
    loc = loc.detach()
    phi = phi.detach()
    prior_loc = torch.zeros_like(loc) if prior_loc is None else prior_loc.detach().expand_as(loc)
    blocks = ggn_blocks(loc, phi, mask)
    eigenvalues, eigenvectors = torch.linalg.eigh(blocks)  # (K, D), (K, D, D)
    if prior_precision == "marglik":
        logits = head_logits(loc.double(), phi.double(), mask)
        loglik = logits.log_softmax(-1).gather(-1, y.long().unsqueeze(-1)).sum().item()
        precision = optimize_prior_precision(loc, prior_loc, loglik, eigenvalues)
    else:
        precision = float(prior_precision)
        if not precision > 0:
            raise ValueError(f"Expected prior_precision > 0 or 'marglik' but got {prior_precision!r}")
    inverse = (eigenvectors / (eigenvalues.clamp(min=0) + precision).unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)
    inverse = 0.5 * (inverse + inverse.transpose(-1, -2))
    factor = torch.linalg.cholesky(inverse).to(loc.dtype)
    return GaussianWeights(loc.clone(), factor=factor, rowwise=True, triangular=True), precision
