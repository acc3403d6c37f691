"""Methods as compositions: adapters × head × steps × predictor (one training loop for all).

=================  ==========  ===========  ============================  ===========================
method             adapters    head         steps                         predict_proba
=================  ==========  ===========  ============================  ===========================
polar-vbll         PoLAR       variational  guide step + adapter step     posterior predictive
polar-vbll-la      PoLAR       variational  guide step + adapter step     last-layer Laplace, δ by evidence
polar-mle          PoLAR       point        adapter step (+ head)         softmax
lora-vbll          LoRA        variational  guide step + adapter step     posterior predictive
lora-mle           LoRA        point        adapter step (+ head)         softmax
lora-map           LoRA + wd   point+prior  adapter step (+ head)         softmax
lora-mcdropout     LoRA+drop   point        adapter step (+ head)         mean of K dropout passes
lora-laplace       LoRA + wd   point+prior  adapter step (+ head)         last-layer Laplace, δ by evidence
temperature-sc.    LoRA        point        adapter step (+ head)         softmax(z / T), T on held-out
lora-ensemble      M × lora-mle (see :mod:`bayes_polar.run`)               mean of members
lora-blob          BLoB: q(A)  point        adapter step, NLL + w·KL/N    mean of N sampled passes
polar-blob         BLoB: q(Θ)  point        adapter step, NLL + w·KL/N    mean of N sampled passes
=================  ==========  ===========  ============================  ===========================

BLoB's layers, prior and re-weighting: :mod:`bayes_polar.adapters.blob`; its loss:
:mod:`bayes_polar.training.blob_loss`. Its point prediction is the posterior mean (eval mode).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import adapter_state_dict, adapters_disabled, inject_lora, inject_polar, make_adapter_optimizer
from ..adapters.inject import find_blocks, resolve_layers
from ..config import FitConfig
from ..errors import ConfigError, NumericalError
from ..data.features import FeatureExtractor, Features, check_finite_features, final_softcap
from ..bll.model import head_logits, prior_scale
from .trainable_heads import PointHead, VariationalHead
from ..bll.laplace import fit_laplace
from ..bll.logit_noise import LogitNoise
from ..bll.predictive import logit_variance, sample_proba
from .blob_loss import BlobLoss, steps_per_epoch
from .distributed import shard
from .steps import AdapterStep, GuideStep, JointStep, lr_lambda

VARIATIONAL = ("polar-vbll", "polar-vbll-la", "lora-vbll")
LAPLACE = ("polar-vbll-la", "lora-laplace")
BLOB = ("lora-blob", "polar-blob")  # Bayesian adapters: weights sampled in training mode
SAMPLED_PASSES = ("lora-mcdropout", *BLOB)  # predict_proba averages mc_passes training-mode passes


def is_variational(method: str) -> bool:
    return method in VARIATIONAL


def is_blob(method: str) -> bool:
    return method in BLOB


def attach_adapters(model: nn.Module, config: FitConfig) -> list[str]:
    """Inject PoLAR or peft LoRA adapters as the method asks; returns the adapted module names."""
    kwargs = dict(target_modules=config.target_module_names, rank=config.rank, alpha=config.alpha,
                  layers=config.layer_indices)
    bayesian = is_blob(config.method)
    if config.method.startswith("polar"):
        inject_polar(model, bayesian=bayesian, **kwargs)
        return list(model.polar_targets)
    dropout = config.dropout if config.method == "lora-mcdropout" else 0.0
    inject_lora(model, dropout=dropout, bayesian=bayesian, **kwargs)
    return list(model.lora_targets)


def first_adapted_block(model: nn.Module, layers: list[int] | None) -> int:
    """Index of the lowest block with adapters (0 when every block has them, ``layers=None``)."""
    if layers is None:
        return 0
    return min(resolve_layers(layers, len(find_blocks(model)[1])))


@dataclass
class Method:
    """A trainable, predicting composition of backbone adapters, a head and steps."""

    name: str
    model: nn.Module
    extractor: FeatureExtractor
    head: VariationalHead | PointHead
    steps: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    adapter_steps: int = 1
    head_warmup_steps: int = 0
    mc_passes: int = 1
    warmup: list = field(default_factory=list)  # the steps run during the head-only warm-up
    laplace: object = None  # GaussianWeights after a post-hoc Laplace fit
    extras: dict = field(default_factory=dict)

    def features(self, batch, grad: bool = False) -> Features:
        """φ of a batch; NaN/Inf in it raises :class:`~bayes_polar.errors.NumericalError` naming the questions."""
        with torch.set_grad_enabled(grad):
            return check_finite_features(self.extractor(batch), batch)

    def train_step(self, batch, step: int) -> dict:
        """Run the method's steps on one minibatch, then advance every learning-rate schedule once.

        Features are computed once per adapter update. A schedule's factor is that of the outer
        ``step`` whatever ``guide_steps``, ``adapter_steps`` and ``head_warmup_steps`` are, so the
        guide, adapter and head learning rates stay in step and end where the schedule ends.
        """
        self.model.train()
        head_only = step < self.head_warmup_steps
        features = self.features(batch, grad=not head_only)
        logs = {}
        for s in self.warmup if head_only else self.steps:
            repeats = self.adapter_steps if s.updates_adapters and not head_only else 1
            for repeat in range(repeats):
                if repeat:
                    features = self.features(batch, grad=True)
                logs.update(s(features, batch.labels))
        self.step_schedules()
        return logs

    def step_schedules(self) -> None:
        """Advance the adapter (and head) schedule and the guide's by one outer training step."""
        with warnings.catch_warnings():  # the adapters may sit out a head-only warm-up: their schedule still runs
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        if isinstance(self.head, VariationalHead):
            self.head.step_schedule()

    @torch.no_grad()
    def sample_proba(self, batch, num_samples: int, features: Features | None = None) -> torch.Tensor:
        """(S, B, C) per-draw probabilities: MC-dropout passes (S = ``mc_passes``), draws of the
        last layer (variational head or Laplace, S = ``num_samples``), or S = 1 (point heads).
        ``features``: reuse an eval-mode pass."""
        if self.mc_passes > 1:
            self.model.train()  # dropout on (MC dropout), adapter weights sampled (BLoB)
            probs = torch.stack([self.head.predict_proba(self.features(batch)) for _ in range(self.mc_passes)])
            self.model.eval()
            return probs
        self.model.eval()
        features = self.features(batch) if features is None else features
        if self.laplace is not None:
            return sample_proba(self.laplace, features.phi, features.mask, num_samples)
        return self.head.sample_proba(features, num_samples)

    @torch.no_grad()
    def predict_proba(self, batch, num_samples: int, features: Features | None = None) -> torch.Tensor:
        """(B, C) predictive probabilities of this method: the mean of :meth:`sample_proba`."""
        return self.sample_proba(batch, num_samples, features).mean(0)

    @torch.no_grad()
    def predict_samples(self, batch, num_samples: int, features: Features | None = None) -> dict:
        """One eval-mode feature pass: ``samples`` (S, B, C) (:meth:`sample_proba`), ``point`` (B, C),
        ``mask`` (B, C), and ``logit_var`` and ``feature_norm2`` (B, C) (Var(z_c) and ‖φ_c‖², the inputs of
        :func:`~bayes_polar.evaluation.uncertainty.uncertainty_scores`) of a Gaussian last layer (None
        otherwise). ``features``: reuse an eval-mode pass."""
        self.model.eval()
        features = self.features(batch) if features is None else features
        if self.laplace is not None:
            var = logit_variance(self.laplace, features.phi, features.mask)
        else:
            var = self.head.logit_variance(features)
        norm2 = None if var is None else features.phi.pow(2).sum(-1).expand_as(features.mask) * features.mask
        return {"samples": self.sample_proba(batch, num_samples, features), "point": self.head.point_proba(features),
                "mask": features.mask, "logit_var": var, "feature_norm2": norm2}

    @torch.no_grad()
    def predict(self, batch, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(predictive, point)`` (B, C) probabilities from one eval-mode feature pass."""
        out = self.predict_samples(batch, num_samples)
        return out["samples"].mean(0), out["point"]

    @torch.no_grad()
    def zero_shot_proba(self, batch, weights: torch.Tensor) -> torch.Tensor:
        """(B, C) probabilities of the zero-shot LM: adapters disabled, head at ``weights``.

        ``letters``: z = w₀ᵀφ are the LM's answer-token logits, soft-capped as its own forward caps them
        (Gemma 2/3), so this is the LM's distribution over the answer words.
        """
        self.model.eval()
        with adapters_disabled(self.model):
            features = self.features(batch)
        logits = head_logits(weights, features.phi)
        if features.phi.shape[1] == 1:
            logits = final_softcap(self.model, logits)
        return logits.masked_fill(~features.mask, float("-inf")).softmax(-1)

    @torch.no_grad()
    def fit_temperature(self, loader) -> float:
        """Temperature scaling: T minimising the held-out NLL of softmax(z / T) (point heads)."""
        self.model.eval()
        logits, labels = [], []
        for batch in loader:
            logits.append(self.head.logits(self.features(batch)))
            labels.append(batch.labels)
        self.head.temperature = optimal_temperature(torch.cat(logits), torch.cat(labels))
        self.extras["temperature"] = self.head.temperature
        return self.head.temperature

    def head_mean(self) -> torch.Tensor:
        if isinstance(self.head, VariationalHead):
            return self.head.posterior().loc.detach()
        return self.head.weight.detach()

    def prior_mean(self) -> torch.Tensor:
        """(K, D) mean of the head's prior (zeros for a head without one, e.g. MLE)."""
        loc = self.head_mean()
        prior = self.head.model.prior if isinstance(self.head, VariationalHead) else self.head.prior
        if prior is None:
            return torch.zeros_like(loc)
        rows, dim = loc.shape
        if prior.hyper_sites(dim, rows):
            raise ConfigError(f"{type(prior).__name__} samples hyperparameters: the last-layer Laplace needs a "
                              "prior with a fixed mean")
        return prior.distribution(dim, rows).mean.detach().expand(rows, dim).to(loc.dtype)

    @torch.no_grad()
    def fit_laplace(self, loader, prior_precision="marglik") -> float:
        """Post-hoc last-layer Laplace at the head's mean, on the training features.

        The Gaussian prior N(m, δ⁻¹ I) has the head prior's mean m (:meth:`prior_mean`); δ is
        given or, by default, maximises the Laplace evidence (:func:`~bayes_polar.bll.laplace.fit_laplace`).
        """
        self.model.eval()
        phis, masks, labels = [], [], []
        for batch in loader:
            features = self.features(batch)
            phis.append(features.phi), masks.append(features.mask), labels.append(batch.labels)
        self.laplace, precision = fit_laplace(self.head_mean(), torch.cat(phis), torch.cat(labels),
                                              torch.cat(masks), prior_precision, prior_loc=self.prior_mean())
        self.extras["laplace_prior_precision"] = precision
        return precision

    # ----------------------------------------------------------------- state for checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"adapter.{k}": v for k, v in adapter_state_dict(self.model).items()}
        tensors.update({f"head.{k}": v for k, v in self.head.state_tensors().items()})
        if self.laplace is not None:
            tensors["laplace.loc"], tensors["laplace.factor"] = self.laplace.loc, self.laplace.factor
        if self.extractor.scaling is not None:
            tensors.update(self.extractor.scaling.state_tensors())
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        from ..adapters.io import _copy_in, check_manifest

        adapters = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
        check_manifest(adapter_state_dict(self.model), adapters)
        _copy_in(self.model, adapters)
        self.load_head_tensors({k: v for k, v in tensors.items() if not k.startswith("adapter.")})

    def load_head_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Head (Laplace, feature scaling) tensors as written by :meth:`state_tensors`, without the adapters."""
        from ..bll.posterior import GaussianWeights
        from ..data.normalization import FeatureScaling

        self.extractor.scaling = FeatureScaling.from_tensors(tensors)
        self.head.load_state_tensors({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
        if "laplace.loc" in tensors:
            self.laplace = GaussianWeights(tensors["laplace.loc"], factor=tensors["laplace.factor"],
                                           triangular=True)

    def optimizer_state(self) -> dict:
        state = {"adapter_optimizer": self.optimizer.state_dict(), "adapter_scheduler": self.scheduler.state_dict()}
        if isinstance(self.head, VariationalHead):
            state["head_optimizer"] = self.head.optimizer_state()
        return state

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["adapter_optimizer"])
        self.scheduler.load_state_dict(state["adapter_scheduler"])
        if "head_optimizer" in state:
            self.head.load_optimizer_state(state["head_optimizer"])


LOG_TEMPERATURE_BOUND = math.log(1e3)
"""B of the bound |log T| < B (T in (1e-3, 1e3)): on a separable held-out slice the optimum is T → 0."""


def optimal_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """argmin_T (1/n) Σ_t −log softmax(z_t / T)_{y_t} (Guo et al., 2017), by L-BFGS from T = 1.

    Optimised over u with log T = B tanh(u / B) (B = :data:`LOG_TEMPERATURE_BOUND`): continuous,
    smooth, ≈ u inside the bound, and finite on separable or uninformative held-out slices.
    """
    logits, labels = logits.detach().double(), labels.detach().long()
    valid = torch.isfinite(logits)  # options format: missing options are −inf
    finite = logits.masked_fill(~valid, 0.0)
    u = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([u], lr=1.0, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def log_t():
        return LOG_TEMPERATURE_BOUND * torch.tanh(u / LOG_TEMPERATURE_BOUND)

    def closure():
        optimizer.zero_grad()
        scaled = torch.where(valid, finite / log_t().exp(), float("-inf"))
        loss = torch.nn.functional.cross_entropy(scaled, labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    value = float(log_t().detach())
    if not math.isfinite(value):
        raise NumericalError(f"temperature scaling diverged (log T = {value})")
    return math.exp(value)


class Ensemble:
    """Deep ensemble: M trained members sharing one backbone; predictions are the members' mean.

    Each member's adapters and head (``Method.state_tensors``) are loaded in turn into ``method``.
    """

    def __init__(self, method: Method, members: list[dict[str, torch.Tensor]]):
        self.method, self.members = method, members
        self.model, self.extras = method.model, {"members": len(members)}

    @torch.no_grad()
    def predict_samples(self, batch, num_samples: int) -> dict:
        """The members' draws stacked: ``samples`` (M·S, B, C) (S = 1 for lora-mle members)."""
        outs = []
        for member in self.members:
            self.method.load_state_tensors(member)
            outs.append(self.method.predict_samples(batch, num_samples))
        samples = torch.cat([out["samples"] for out in outs])
        return {"samples": samples, "point": samples.mean(0), "mask": outs[0]["mask"], "logit_var": None,
                "feature_norm2": None}

    @torch.no_grad()
    def predict(self, batch, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.predict_samples(batch, num_samples)["samples"].mean(0)
        return mean, mean

    def zero_shot_proba(self, batch, weights: torch.Tensor) -> torch.Tensor:
        return self.method.zero_shot_proba(batch, weights)


def build_method(config: FitConfig, model: nn.Module, extractor: FeatureExtractor, *, dataset_size: int,
                 num_rows: int, init: torch.Tensor, prior, num_classes: int | None = None) -> Method:
    """Assemble the method of ``config`` around a backbone that already carries its adapters.

    ``num_classes``: choices per question (the logit noise's prior needs it; default ``num_rows``).
    """
    schedule = lr_lambda(config.schedule, config.warmup_step_count, config.steps)
    weight_decay = config.weight_decay if config.method in ("lora-map", "lora-laplace") else 0.0
    if config.method.startswith("polar"):
        stiefel_lr, theta_lr = config.adapter_learning_rates
    else:
        stiefel_lr, theta_lr = config.lr, None  # LoRA: A and B (the Euclidean group) at lr
    optimizer = make_adapter_optimizer(model, config.adapter_optimizer, lr=stiefel_lr, theta_lr=theta_lr,
                                       weight_decay=weight_decay, landing_lambda=config.landing_lambda)
    if is_variational(config.method):
        head = VariationalHead(
            extractor.feature_dim, num_rows, prior, config.guide, dataset_size=dataset_size,
            estimator=config.elbo, num_particles=config.num_particles, kl_weight=config.kl_weight,
            init_loc=init if config.head_init == "zero_shot" else None, lr=config.head_lr, lr_lambda=schedule,
            clip_norm=config.clip_norm, guide_kwargs=config.guide_kwargs,
            init_scale=config.guide_init_scale * prior_scale(prior, extractor.feature_dim, num_rows),
            logit_noise=LogitNoise(num_rows, num_classes or num_rows) if config.logit_noise else None)
    else:
        head_prior = prior if config.method in ("lora-map", "lora-laplace") else None
        head = PointHead(init, head_prior, dataset_size)
        optimizer.add_param_group({"params": [head.weight], "lr": config.head_lr, "name": "head",
                                   "weight_decay": 0.0})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_fn = head.loss
    adapter_loss = loss_fn
    if is_blob(config.method):  # the schedule steps once per outer step: M = minibatches per epoch
        adapter_loss = BlobLoss(loss_fn, model, scheduler, dataset_size=dataset_size, kl_weight=config.kl_weight,
                                reweighting=config.kl_reweighting,
                                steps_per_epoch=steps_per_epoch(dataset_size, config.batch_size, shard()[0]))
    adapter_step = AdapterStep(adapter_loss, optimizer, config.clip_norm,
                               name="neg_elbo" if is_variational(config.method) or is_blob(config.method) else "nll")
    if not is_variational(config.method):
        steps = warmup = [adapter_step]  # head-only warm-up: detached features, so only the head moves
    elif config.mode == "joint":
        steps, warmup = [JointStep(head, adapter_step)], [GuideStep(head, config.guide_steps)]
    else:
        steps = [GuideStep(head, config.guide_steps), adapter_step]
        warmup = steps[:1]
    return Method(config.method, model, extractor, head, steps, optimizer, scheduler,
                  adapter_steps=config.adapter_steps if config.mode == "alternating" else 1,
                  head_warmup_steps=config.head_warmup_steps, warmup=warmup,
                  mc_passes=config.mc_passes if config.method in SAMPLED_PASSES else 1)
