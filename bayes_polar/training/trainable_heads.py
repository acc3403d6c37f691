"""Last layers the training loop drives: the variational Bayesian head and a point-estimate head.

Both take :class:`~bayes_polar.data.features.Features` and labels, expose ``loss`` (per example,
differentiable in the features: what the adapter step minimises) and ``predict_proba``. The
loop never needs to know which one it drives.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from functools import partial

import pyro
import pyro.optim
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.autoguide.initialization import init_to_value
from pyro.infer.util import zero_grads
from pyro.optim.optim import is_scheduler
from torch import nn

from ..bll.elbo import make_elbo
from ..bll.logit_noise import check_estimator
from ..errors import ConfigError, NumericalError
from ..data.features import Features
from ..bll.model import BayesianLastLayer, Prior, head_logits
from ..bll.posterior import WEIGHT_SITE, initialize_guide, weight_posterior
from ..bll.predictive import DEFAULT_NUM_SAMPLES, logit_variance, mean_proba, pyro_sample_proba, sample_proba
from ..bll.registry import load_guide, make_guide
from .steps import clip_gradients


def zero_shot_weights(format: str, feature_dim: int, answer_rows: torch.Tensor | None = None,
                      loglik_features: bool = True) -> torch.Tensor:
    """Head weights that reproduce the zero-shot LM: (K, D).

    ``letters``: the LM head rows of the answer tokens. ``options``: 1 on the summed option
    log-likelihood feature (index D − 2), 0 elsewhere; zeros (uniform) without those features.
    """
    if format == "letters":
        return answer_rows.detach().float().clone()
    weights = torch.zeros(1, feature_dim)
    if loglik_features:
        weights[0, feature_dim - 2] = 1.0
    return weights


def _scoped(method):
    """Run a VariationalHead method inside the head's own parameter store."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.scope():
            return method(self, *args, **kwargs)
    return wrapper


class VariationalHead:
    """The Bayesian last layer (Pyro model) and its guide, fitted by SVI on detached features.

    Parameters
    ----------
    in_features, num_rows: D and K of W.
    prior: a :class:`~bayes_polar.bll.model.Prior`.
    guide: a guide name, file or builder (see :func:`~bayes_polar.bll.registry.load_guide`).
    dataset_size: N, the number of training examples (scales the minibatch likelihood).
    estimator: ``jensen``, ``mc`` or ``mc_meanfield``.
    kl_weight: weight of KL in the per-example ELBO; None means 1/N (the true ELBO).
    init_loc: initial posterior mean (K, D), e.g. the zero-shot head; None: the prior mean.
    lr, lr_lambda, clip_norm: the guide optimiser: Adam on the gradients of the per-example loss
        (−ELBO / N), clipped to global norm ``clip_norm`` over all guide parameters, with a LambdaLR
        schedule that :meth:`step_schedule` advances (once per outer training step).
    init_scale: initial posterior standard deviation of each weight, for guides that take one
        (None, or ``init_scale`` in ``guide_kwargs``: the guide's own).
    logit_noise: VBLL's learned logit noise (:class:`~bayes_polar.bll.logit_noise.LogitNoise`, jensen only).
    """

    def __init__(self, in_features: int, num_rows: int, prior: Prior, guide="full", *, dataset_size: int,
                 estimator: str = "jensen", num_particles: int = 8, kl_weight: float | None = None,
                 init_loc: torch.Tensor | None = None, lr: float = 1e-2, lr_lambda=None,
                 clip_norm: float | None = None, guide_kwargs: dict | None = None, init_scale: float | None = None,
                 logit_noise=None):
        self._store, self._active = None, False
        if logit_noise is not None:
            check_estimator(estimator)
        self.model = BayesianLastLayer(in_features, num_rows, prior, logit_noise)
        builder = load_guide(guide, **(guide_kwargs or {}))
        if init_scale is not None and "init_scale" not in (guide_kwargs or {}) and _accepts(builder, "init_scale"):
            builder = partial(builder, init_scale=float(init_scale))
        if init_loc is not None and _accepts(builder, "init_loc_fn"):
            builder = partial(builder, init_loc_fn=init_to_value(values={WEIGHT_SITE: init_loc}))
        self.guide = make_guide(builder, self.model)
        self.dataset_size = int(dataset_size)
        self.kl_scale = 1.0 if kl_weight is None else float(kl_weight) * self.dataset_size
        self.estimator = estimator
        self.elbo = make_elbo(estimator, num_particles)
        scaled = estimator == "jensen" or self.kl_scale == 1.0
        self.elbo_guide = self.guide if scaled else poutine.scale(self.guide, scale=self.kl_scale)
        self.clip_norm = clip_norm
        self.optim = pyro.optim.LambdaLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": lr},
                                          "lr_lambda": lr_lambda or (lambda step: 1.0)})
        self.grad_sync = None  # multi-process: averages the guide's gradients over ranks
        self.svi = SVI(self.model, self.elbo_guide, self.optim, loss=self.elbo.loss,
                       loss_and_grads=self._loss_and_grads)

    @contextlib.contextmanager
    def scope(self):
        """Activate this head's own Pyro parameter store (``ParamStoreDict.scope``), re-entrantly.

        Pyro's store is global and keyed by name; scoping lets several heads (priors, guides,
        ensemble members) live side by side in one process, e.g. in a notebook.
        """
        if self._active:
            yield
            return
        with pyro.get_param_store().scope(self._store) as state:
            self._active = True
            try:
                yield
            finally:
                self._active = False
        self._store = state

    def _args(self, features: Features, labels):
        kwargs = dict(dataset_size=self.dataset_size, kl_scale=self.kl_scale)
        return (features.phi, features.mask, labels), kwargs

    @_scoped
    def setup(self, features: Features, labels) -> None:
        """Create the guide's parameters (Pyro does it lazily on the first call)."""
        args, kwargs = self._args(features.detach(), labels)
        initialize_guide(self.guide, *args, **kwargs)
        if self.model.logit_noise is not None:
            self.model.logit_noise.variance()  # its parameter exists before a checkpoint is loaded into it

    def _loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The ELBO's ``loss_and_grads``, then gradient averaging over processes (``grad_sync``,
        set by :func:`bayes_polar.training.distributed.replicate`), a finiteness check, division by N
        (gradients of the per-example loss) and global-norm clipping, all before ``SVI.step`` moves a
        parameter: a non-finite ELBO or gradient raises NumericalError."""
        with poutine.trace(param_only=True) as capture:
            loss = self.elbo.loss_and_grads(model, guide, *args, **kwargs)
        params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
        if self.grad_sync is not None:
            self.grad_sync(params)
        try:
            _check_guide_update(loss / self.dataset_size, params)
        except NumericalError:
            zero_grads(params)
            raise
        for p in params:
            if p.grad is not None:
                p.grad.div_(self.dataset_size)
        clip_gradients(params, self.clip_norm)
        return loss

    @_scoped
    def guide_step(self, features: Features, labels) -> float:
        """One ``SVI.step`` on the guide (features detached); returns the per-example ELBO."""
        args, kwargs = self._args(features.detach(), labels)
        loss = self.svi.step(*args, **kwargs)
        return -loss / self.dataset_size

    @_scoped
    def step_schedule(self) -> None:
        """Advance the guide's learning-rate schedule by one (outer) training step."""
        self.optim.step()

    @_scoped
    def loss(self, features: Features, labels) -> torch.Tensor:
        """Negative per-example ELBO, differentiable in the features (the adapter step's loss)."""
        args, kwargs = self._args(features, labels)
        return self.elbo.differentiable_loss(self.model, self.elbo_guide, *args, **kwargs) / self.dataset_size

    @_scoped
    def posterior(self):
        return weight_posterior(self.guide)

    @_scoped
    @torch.no_grad()
    def predict_proba(self, features: Features, num_samples: int = DEFAULT_NUM_SAMPLES) -> torch.Tensor:
        """Posterior predictive (B, C): the mean of :meth:`sample_proba`."""
        return self.sample_proba(features, num_samples).mean(0)

    @_scoped
    @torch.no_grad()
    def sample_proba(self, features: Features, num_samples: int = DEFAULT_NUM_SAMPLES) -> torch.Tensor:
        """(S, B, C) softmax of sampled logits: closed-form for Gaussian guides, W drawn by Pyro otherwise."""
        try:
            q = self.posterior()
        except ConfigError:
            return pyro_sample_proba(self.guide, features.phi, features.mask, num_samples)
        noise = self.model.logit_noise
        return sample_proba(q, features.phi, features.mask, num_samples,
                            noise_variance=None if noise is None else noise.variance().detach())

    @_scoped
    @torch.no_grad()
    def logit_variance(self, features: Features) -> torch.Tensor | None:
        """(B, C) marginal logit variances under a Gaussian guide; None for other guides."""
        try:
            q = self.posterior()
        except ConfigError:
            return None
        return logit_variance(q, features.phi, features.mask)

    @_scoped
    @torch.no_grad()
    def point_proba(self, features: Features) -> torch.Tensor:
        """softmax at the posterior mean (median for non-Gaussian guides): no sampling."""
        try:
            return mean_proba(self.posterior(), features.phi, features.mask)
        except ConfigError:
            args, kwargs = self._args(features, None)
            weights = self.guide.median(*args, **kwargs)[WEIGHT_SITE]
            return head_logits(weights, features.phi, features.mask).softmax(-1)

    @_scoped
    def parameters(self) -> dict[str, torch.Tensor]:
        """Unconstrained guide (and prior) parameters by Pyro name."""
        return dict(pyro.get_param_store().named_parameters())

    @_scoped
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.parameters().items()}

    @_scoped
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        params = self.parameters()
        if set(params) != set(tensors):
            raise ConfigError(f"Head parameters {sorted(tensors)} do not match the guide's {sorted(params)}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])

    @_scoped
    def optimizer_state(self) -> dict:
        return self.optim.get_state()

    @_scoped
    def load_optimizer_state(self, state: dict) -> None:
        """Restore :meth:`optimizer_state`: into the optimisers that exist, the rest when created."""
        store, pending = pyro.get_param_store(), dict(state)
        for param, optimizer in self.optim.optim_objs.items():
            saved = pending.pop(store.param_name(param), None)
            if saved is None:
                continue
            if is_scheduler(optimizer):
                optimizer.load_state_dict(saved["scheduler"])
                optimizer.optimizer.load_state_dict(saved["optimizer"])
            else:
                optimizer.load_state_dict(saved)
        self.optim.set_state(pending)


class PointHead(nn.Module):
    """A point-estimate last layer W (K × D): MLE (cross-entropy) or MAP (plus −log p(W) / N).

    .. math:: \\mathcal L = -\\frac1B \\sum_t \\log \\operatorname{softmax}(z_t)_{y_t} - \\frac1N \\log p(W)
    """

    def __init__(self, init: torch.Tensor, prior: Prior | None = None, dataset_size: int = 1):
        super().__init__()
        self.weight = nn.Parameter(init.detach().clone().float())
        self.prior, self.dataset_size = prior, int(dataset_size)
        self.temperature = 1.0

    def logits(self, features: Features) -> torch.Tensor:
        return head_logits(self.weight, features.phi, features.mask)

    def loss(self, features: Features, labels) -> torch.Tensor:
        loss = F.cross_entropy(self.logits(features), labels)
        if self.prior is not None:
            rows, dim = self.weight.shape
            loss = loss - self.prior.distribution(dim, rows).log_prob(self.weight) / self.dataset_size
        return loss

    @torch.no_grad()
    def predict_proba(self, features: Features, num_samples: int | None = None) -> torch.Tensor:
        return (self.logits(features) / self.temperature).softmax(-1)

    point_proba = predict_proba

    @torch.no_grad()
    def sample_proba(self, features: Features, num_samples: int | None = None) -> torch.Tensor:
        """(1, B, C): a point estimate is one draw."""
        return self.predict_proba(features).unsqueeze(0)

    def logit_variance(self, features: Features) -> None:
        return None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach().clone(), "temperature": torch.tensor(self.temperature)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.weight.copy_(tensors["weight"])
        self.temperature = float(tensors.get("temperature", torch.tensor(1.0)))


def _check_guide_update(loss: float, params) -> None:
    """Raise :class:`NumericalError` if the (per-example) loss or a guide gradient is NaN/Inf."""
    if not math.isfinite(loss):
        raise NumericalError(f"the ELBO is not finite ({-loss})")
    store = pyro.get_param_store()
    bad = sorted(store.param_name(p) for p in params if p.grad is not None and not torch.isfinite(p.grad).all())
    if bad:
        raise NumericalError(f"gradients of the guide parameters {bad} are not finite")


def _accepts(builder, name: str) -> bool:
    """Whether ``builder`` takes keyword ``name`` (every WeightGuide takes init_scale and init_loc_fn)."""
    from ..bll.guide import WeightGuide

    target = builder.func if isinstance(builder, partial) else builder
    if inspect.isclass(target) and issubclass(target, WeightGuide):
        return True
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
