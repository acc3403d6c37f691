"""Numerical faults in training: caught at the step they happen, never written to a checkpoint.

:class:`TrainingGuard` wraps a method for :func:`~bayes_polar.training.loop.fit` (it has the method's
``train_step`` and ``model``). Each step is checked where it can go wrong, before any update:

- features φ (:func:`~bayes_polar.data.features.check_finite_features`), the loss and the ELBO, and
  every gradient (adapter, point head and guide steps) raise :class:`NumericalError`;
- after the step every trainable tensor (adapters, head, guide) is checked once more.

``on_nan="stop"`` re-raises with the step number and the last good checkpoint, which stays the
latest (the loop never reaches the checkpoint of a failed step). ``on_nan="skip"`` restores the
adapters, the head and every optimiser and schedule to their state before the batch, counts the
step and goes on; more than ``max_skipped`` skips stop the run.

After every step PoLAR factors whose :math:`\\|X^\\top X - I_r\\|_F` exceeds ``orthogonality_tol``
are projected back onto the Stiefel manifold (``ManifoldParameter.proj_``, the polar factor: the
nearest orthonormal matrix). Skips and projections are logged and reported by :meth:`report` for
metrics.json; :meth:`state_dict` travels in checkpoints so a resumed run reports the same.

Usage::

    guard = TrainingGuard(method, on_nan="skip", run_dir=run_dir)
    fit(guard, loader, total_steps)
    metrics["train"]["faults"] = guard.report()
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from ..adapters import orthogonality_error, polar_layers
from ..config import ON_NAN
from ..errors import BayesPolarWarning, ConfigError, NumericalError


class TrainingGuard:
    """A method whose ``train_step`` detects NaN/Inf, stops or skips, and keeps X, Y orthonormal.

    Parameters
    ----------
    method: a :class:`~bayes_polar.training.methods.Method`.
    on_nan: ``stop`` (raise :class:`NumericalError` with the step) or ``skip`` (undo the batch).
    max_skipped: with ``skip``, raise once more than this many batches have been skipped.
    orthogonality_tol: re-orthonormalise a factor when ``‖XᵀX − I‖_F`` exceeds it (None: never).
    run_dir: where checkpoints are written (named in the error message); optional.
    log: a ``print``-like function for one-line reports.
    """

    def __init__(self, method, on_nan: str = "stop", max_skipped: int = 10, orthogonality_tol: float | None = 1e-4,
                 run_dir=None, log=print):
        if on_nan not in ON_NAN:
            raise ConfigError(f"on_nan must be one of {ON_NAN}, got {on_nan!r}")
        self.method, self.model = method, method.model
        self.on_nan, self.max_skipped, self.orthogonality_tol = on_nan, int(max_skipped), orthogonality_tol
        self.run_dir, self.log = (Path(run_dir) if run_dir is not None else None), log
        self.skipped_steps: list[int] = []
        self.reorthonormalised: list[dict] = []

    @classmethod
    def from_config(cls, method, config, run_dir=None, log=print) -> "TrainingGuard":
        return cls(method, config.on_nan, config.max_skipped_batches, config.orthogonality_tolerance, run_dir, log)

    # ----------------------------------------------------------------- the step
    def train_step(self, batch, step: int) -> dict:
        """``method.train_step`` with the checks above; ``step`` is 0-based, messages count from 1."""
        snapshot = self._snapshot() if self.on_nan == "skip" else None
        try:
            logs = self.method.train_step(batch, step)
            _check_finite_parameters(self.method)
        except NumericalError as exc:
            return self._fault(exc, step + 1, snapshot)
        self._reorthonormalise(step + 1)
        return logs

    def _fault(self, exc: NumericalError, step: int, snapshot) -> dict:
        if self.on_nan == "stop":
            raise NumericalError(f"training step {step}: {exc}. {self._checkpoint_hint()}") from exc
        self._restore(snapshot)
        self.skipped_steps.append(step)
        if len(self.skipped_steps) > self.max_skipped:
            raise NumericalError(
                f"training step {step}: {exc}; {len(self.skipped_steps)} batches skipped (steps "
                f"{self.skipped_steps[:10]}), more than --max-skipped-batches {self.max_skipped}: the run diverges. "
                f"{self._checkpoint_hint()}") from exc
        warnings.warn(f"skipped training step {step} (its updates undone): {exc}", BayesPolarWarning, stacklevel=3)
        return {}

    def _checkpoint_hint(self) -> str:
        if self.run_dir is None:
            return "Pass on_nan='skip' to skip such batches"
        found = self._last_checkpoint()
        restart = "start again with --overwrite (e.g. with a lower --lr)"
        if found is None:
            return f"Nothing of this step was saved and there is no checkpoint: {restart}, or pass --on-nan skip"
        return (f"Nothing of this step was saved; the last good checkpoint is {found}: continue from it with "
                f"--resume --on-nan skip, or {restart}")

    def _last_checkpoint(self):
        from .checkpoint import latest_checkpoint

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return latest_checkpoint(self.run_dir)
            except Exception:  # noqa: BLE001 - naming the checkpoint must not hide the fault
                return None

    # ----------------------------------------------------------------- skip: undo a batch
    def _snapshot(self):
        return copy.deepcopy((self.method.state_tensors(), self.method.optimizer_state()))

    def _restore(self, snapshot) -> None:
        tensors, optimizers = snapshot
        self.method.load_state_tensors(tensors)
        self.method.load_optimizer_state(optimizers)
        for _, param in _trainable(self.method):
            param.grad = None

    # ----------------------------------------------------------------- Stiefel factors
    @torch.no_grad()
    def _reorthonormalise(self, step: int) -> None:
        if self.orthogonality_tol is None:
            return
        for name, layer in polar_layers(self.model):
            for factor, error in orthogonality_error(layer).items():
                if error <= self.orthogonality_tol:
                    continue
                getattr(layer, f"polar_{factor}").proj_()
                self.reorthonormalised.append({"step": step, "layer": name, "factor": factor, "error": error})
                self.log(f"step {step}: re-orthonormalised {name}.polar_{factor} "
                         f"(||{factor}^T {factor} - I||_F = {error:.3g} > {self.orthogonality_tol:g})")

    # ----------------------------------------------------------------- reporting and checkpoints
    def report(self) -> dict:
        """For metrics.json: the policy, skipped steps and re-orthonormalisations (count and where)."""
        return {"on_nan": self.on_nan, "skipped_batches": len(self.skipped_steps),
                "skipped_steps": list(self.skipped_steps), "orthogonality_tol": self.orthogonality_tol,
                "reorthonormalisations": len(self.reorthonormalised),
                "reorthonormalised": [dict(entry) for entry in self.reorthonormalised]}

    def state_dict(self) -> dict:
        return {"skipped_steps": list(self.skipped_steps),
                "reorthonormalised": [dict(entry) for entry in self.reorthonormalised]}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.skipped_steps = [int(s) for s in state.get("skipped_steps", [])]
        self.reorthonormalised = [dict(e) for e in state.get("reorthonormalised", [])]


def _trainable(method):
    """``(name, tensor)`` of every trainable tensor: adapters, then the head (guide or point weights)."""
    for name, param in method.model.named_parameters():
        if param.requires_grad:
            yield f"adapter.{name}", param
    head = method.head
    params = head.named_parameters() if isinstance(head, torch.nn.Module) else head.parameters().items()
    for name, param in params:
        yield f"head.{name}", param


def _check_finite_parameters(method) -> None:
    bad = [name for name, param in _trainable(method) if not torch.isfinite(param).all()]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NumericalError(f"parameters became NaN or Inf after the update: {', '.join(bad[:3])}{more}")
