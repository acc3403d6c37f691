"""Posterior inspection with ArviZ: every conversion to and from ``InferenceData`` lives here.

:func:`to_inference_data` turns a fitted run (a RUN_DIR or a :class:`~bayes_polar.run.Pipeline`),
or a bare head + guide + features, into an ``arviz.InferenceData`` with the groups

=====================  ==========================================  =====================================
group                  variables (dims)                            what
=====================  ==========================================  =====================================
posterior              ``W`` (chain, draw, class, feature)         iid draws of the last-layer weights
                                                                   (2 chains by default);
                       hyperparameter sites, if any                classes: answer words (``letters``)
                                                                   or ``"shared"`` (``options``)
posterior_predictive   ``y`` (chain, draw, question)               a label drawn per weight draw
                       ``proba`` (chain, draw, question, choice)   softmax(W_s φ) per draw
log_likelihood         ``y`` (chain, draw, question)               log p(y_t | W_s): ``az.loo``, ``az.waic``
observed_data          ``y`` (question)                            the labels
constant_data          ``mask`` (question, choice)                 which choices exist
sample_stats           ``elbo`` (step); ``stable_rank``,           the training trace and the adapters'
                       ``orthogonality_error_X/_Y`` (layer)        diagnostics (runs only; NUTS: per draw)
=====================  ==========================================  =====================================

Feature dimensions are large (D = 578 for SmolLM2 with the log-likelihood features), so
``features=`` keeps a readable subset of W in the posterior group: an int k (the k features
with the largest posterior |mean|, over classes) or a list of names or indices. Predictive and
log-likelihood always use all of W. ``az.loo`` on the training split estimates leave-one-out
predictive fit; on a held-out split, ``elpd`` is the log predictive density of new data (then
−elpd/n equals the NLL of the averaged predictive, and ``p_loo`` has no meaning).

Only this module imports ArviZ (a move to arviz 1.x touches only this file).

Usage::

    idata = to_inference_data("runs/arc", split="validation", features=20)   # save=True: also a .nc in the run
    az.summary(idata, var_names=["W"]); az.loo(idata)                          # 2 chains: r_hat, ESS defined
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ShapeMismatchError
from ..bll.posterior import WEIGHT_SITE, GaussianWeights, check_head_shapes
from ..data.tasks import LETTERS

DEFAULT_NUM_DRAWS = 1000
DEFAULT_CHAINS = 2  # iid guide draws split into chains: az.summary's r_hat / ESS are defined (and ≈ 1 / ≈ S)
LOGLIK_FEATURES = ("loglik_sum", "loglik_mean")


def _az():
    import arviz as az

    return az


# ----------------------------------------------------------------------------- weight draws
def draw_logits(weights: torch.Tensor, phi: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(S, B, C) logits for weight draws (S, K, D) and features φ (B, C|1, D); −∞ off ``mask``.

    An einsum, so no (S, B, C, D) intermediate is built (D ≈ 578, S in the thousands).
    """
    check_head_shapes(phi, weights.shape[-2], weights.shape[-1])
    if phi.shape[1] == 1:  # letters: one row per class, features shared by the classes
        logits = torch.einsum("skd,bd->sbk", weights, phi[:, 0])
    else:  # options: one shared row scores each option
        logits = torch.einsum("sd,bcd->sbc", weights[:, 0], phi)
    if mask is not None:
        logits = logits.masked_fill(~mask.bool(), float("-inf"))
    return logits


@torch.no_grad()
def guide_draws(posterior, phi=None, mask=None, num_draws: int = DEFAULT_NUM_DRAWS, seed: int = 0) -> dict:
    """Posterior draws ``{site: (S, ...)}`` with ``head.W`` shaped (S, K, D).

    ``posterior`` is a :class:`~bayes_polar.training.trainable_heads.VariationalHead` (its guide is
    read inside the head's own parameter store), a guide (any Pyro guide of the head, parameters in
    the global store: its latent sites are drawn by ``pyro.infer.Predictive``) or
    :class:`~bayes_polar.bll.posterior.GaussianWeights` (e.g. a Laplace posterior). The global RNG
    is left as it was; ``seed`` fixes the draws.
    """
    from pyro import poutine
    from pyro.infer import Predictive
    from ..training.trainable_heads import VariationalHead

    if num_draws < 1:
        raise ConfigError(f"Expected num_draws >= 1 but got {num_draws}")
    if isinstance(posterior, VariationalHead):  # outside its scope the guide reads another head's parameters
        with posterior.scope():
            return guide_draws(posterior.guide, phi, mask, num_draws, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if isinstance(posterior, GaussianWeights):
            return {WEIGHT_SITE: posterior.rsample((num_draws,)).detach()}
        trace = poutine.trace(posterior).get_trace(phi, mask)
        sites = [name for name, site in trace.nodes.items()  # not the guide's auxiliary sites
                 if site["type"] == "sample" and not site["infer"].get("is_auxiliary")]
        draws = Predictive(posterior, num_samples=num_draws, parallel=True, return_sites=sites)(phi, mask)
    if WEIGHT_SITE not in draws:
        raise ConfigError(f"The guide draws no {WEIGHT_SITE!r} site (sites: {sorted(draws)}); pass the head's guide")
    out = {name: value.detach().reshape(num_draws, *value.shape[1:]) for name, value in draws.items()}
    weights = out[WEIGHT_SITE]
    out[WEIGHT_SITE] = weights.reshape(num_draws, *weights.shape[-2:])
    return out


def split_chains(draws: dict, chains: int) -> dict:
    """``{site: (S, ...)}`` → ``{site: (chains, S / chains, ...)}``; S must divide evenly."""
    if chains < 1:
        raise ConfigError(f"Expected chains >= 1 but got {chains}")
    out = {}
    for name, value in draws.items():
        if value.shape[0] % chains:
            raise ConfigError(f"{value.shape[0]} draws do not split into {chains} chains")
        out[name] = value.reshape(chains, value.shape[0] // chains, *value.shape[1:])
    return out


# ----------------------------------------------------------------------------- names and selection
def feature_names(in_features: int, loglik_features: bool = False) -> list[str]:
    """``phi_0 ... phi_{d-1}`` (plus ``loglik_sum``, ``loglik_mean`` for the options log-likelihood features)."""
    hidden = in_features - (len(LOGLIK_FEATURES) if loglik_features else 0)
    return [f"phi_{i}" for i in range(hidden)] + (list(LOGLIK_FEATURES) if loglik_features else [])


def select_features(weights_mean: torch.Tensor, names: list[str], features) -> list[int]:
    """Indices of the features to keep: None (all), an int k (largest |mean| over classes), or names/indices."""
    if features is None:
        return list(range(len(names)))
    if isinstance(features, (int, np.integer)) and not isinstance(features, bool):
        if not 1 <= features <= len(names):
            raise ConfigError(f"Expected 1 <= features <= {len(names)} (top-k by |mean|) but got {features}")
        score = weights_mean.abs().amax(0)  # (D,)
        return sorted(torch.topk(score, int(features)).indices.tolist())
    picked = []
    for item in features:
        if isinstance(item, str):
            if item not in names:
                raise ConfigError(f"Unknown feature {item!r}; features are named {names[0]!r} ... {names[-1]!r}")
            picked.append(names.index(item))
        elif not 0 <= int(item) < len(names):
            raise ConfigError(f"Feature index {item} is outside 0..{len(names) - 1}")
        else:
            picked.append(int(item))
    return picked


def _question_names(uids, count: int):
    if uids is not None and len(uids) == count and len(set(uids)) == count:
        return [str(u) for u in uids]
    return list(range(count))


# ----------------------------------------------------------------------------- the core conversion
def from_weight_draws(weights, phi=None, mask=None, labels=None, *, extra=None, class_names=None,
                      feature_names=None, choice_names=None, question_names=None, features=None,
                      sample_stats=None, attrs=None, seed: int = 0):
    """InferenceData from weight draws (chains, draws, K, D) or (draws, K, D), e.g. from NUTS.

    Parameters
    ----------
    weights : torch.Tensor
        Draws of W; a 3-d tensor is one chain.
    phi, mask, labels : torch.Tensor, optional
        Features (B, C|1, D), choice mask (B, C) and labels (B,) of the questions the
        predictive (and, with labels, the log-likelihood) is computed on.
    extra : dict, optional
        Other posterior sites ``{name: (chains, draws, ...)}`` (hyperparameters).
    class_names, feature_names, choice_names, question_names : list, optional
        Coordinates; defaults ``class_0``..., ``phi_0``..., ``A``..., ``0``....
    features : None, int or list
        Which features of W the posterior group keeps (see :func:`select_features`).
    sample_stats : dict, optional
        ``{name: (array, dims)}``; dims ``("chain", "draw")`` for per-draw statistics.
    attrs : dict, optional
        Metadata (str or numbers) stored on every group.
    """
    az = _az()
    weights = torch.as_tensor(weights).detach()
    if weights.dim() == 3:
        weights = weights.unsqueeze(0)
    if weights.dim() != 4:
        raise ShapeMismatchError(f"Expected weight draws (chains, draws, K, D) but got {tuple(weights.shape)}")
    chains, draws, rows, dim = weights.shape
    class_names = list(class_names or [f"class_{k}" for k in range(rows)])
    feature_names = list(feature_names or [f"phi_{d}" for d in range(dim)])
    if len(class_names) != rows or len(feature_names) != dim:
        raise ShapeMismatchError(f"W has {rows} classes and {dim} features, got {len(class_names)} class names "
                                 f"and {len(feature_names)} feature names")
    keep = select_features(weights.mean((0, 1)), feature_names, features)
    coords = {"class": class_names, "feature": [feature_names[i] for i in keep]}
    dims = {"W": ["class", "feature"], "y": ["question"], "proba": ["question", "choice"], "mask": ["question", "choice"]}
    groups = {"posterior": {"W": weights[..., keep].numpy()}}
    for name, value in (extra or {}).items():
        groups["posterior"][name.removeprefix("head.")] = torch.as_tensor(value).numpy()
    if phi is not None:
        groups.update(_predictive_groups(weights, phi, mask, labels, seed))
        count, num_classes = groups["constant_data"]["mask"].shape
        coords["question"] = question_names if question_names is not None else list(range(count))
        coords["choice"] = list(choice_names or LETTERS[:num_classes])
    attrs = _clean_attrs(attrs)
    idata = az.from_dict(**groups, coords=coords, dims=dims, attrs=dict(attrs), posterior_attrs=dict(attrs))
    if sample_stats:
        idata.add_groups(sample_stats=_dataset(sample_stats))
    return idata


@torch.no_grad()
def _predictive_groups(weights, phi, mask, labels, seed: int) -> dict:
    chains, draws = weights.shape[:2]
    phi = torch.as_tensor(phi).float()
    num_classes = check_head_shapes(phi, weights.shape[-2], weights.shape[-1])
    mask = torch.ones(phi.shape[0], num_classes, dtype=torch.bool) if mask is None else mask.bool()
    logits = draw_logits(weights.reshape(chains * draws, *weights.shape[2:]).float(), phi, mask)  # (S, B, C)
    log_proba = logits.log_softmax(-1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sampled = torch.distributions.Categorical(logits=logits).sample()  # (S, B)
    shape = (chains, draws, phi.shape[0])
    groups = {"posterior_predictive": {"y": sampled.reshape(shape).numpy(),
                                       "proba": log_proba.exp().reshape(*shape, num_classes).numpy()},
              "constant_data": {"mask": mask.numpy()}}
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        if tuple(labels.shape) != (phi.shape[0],):
            raise ShapeMismatchError(f"Expected labels of shape ({phi.shape[0]},) but got {tuple(labels.shape)}")
        loglik = log_proba.gather(-1, labels.expand(chains * draws, -1).unsqueeze(-1)).squeeze(-1)
        groups["log_likelihood"] = {"y": loglik.reshape(shape).double().numpy()}
        groups["observed_data"] = {"y": labels.numpy()}
    return groups


def _dataset(stats: dict):
    import xarray as xr

    variables, coords = {}, {}
    for name, (value, dims) in stats.items():
        if isinstance(value, dict):  # {coordinate: number}, e.g. per adapted layer
            coords[dims[0]] = list(value)
            value = list(value.values())
        variables[name] = (tuple(dims), np.asarray(value, dtype=float))
    return xr.Dataset(variables, coords=coords)


def _clean_attrs(attrs) -> dict:
    clean = {}
    for key, value in (attrs or {}).items():
        if value is None:
            continue
        clean[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
    return clean


# ----------------------------------------------------------------------------- the public entry point
def to_inference_data(source, guide=None, phi=None, mask=None, labels=None, *, task: str | None = None,
                      split: str | None = None, limit: int | None = None, features=None,
                      num_draws: int = DEFAULT_NUM_DRAWS, chains: int = DEFAULT_CHAINS, class_names=None,
                      feature_names=None, run_dir=None, data_dir=None, save=False, seed: int = 0,
                      progress: bool = False):
    """An ``arviz.InferenceData`` of the last layer's posterior (groups: see the module docstring).

    Parameters
    ----------
    source : str, Path, Pipeline, VariationalHead, BayesianLastLayer or GaussianWeights
        A RUN_DIR (loaded with :func:`~bayes_polar.run.load_run`), a loaded pipeline, or a
        bare head: a :class:`~bayes_polar.training.trainable_heads.VariationalHead`, a
        :class:`~bayes_polar.bll.model.BayesianLastLayer` with its ``guide``, or a posterior
        :class:`~bayes_polar.bll.posterior.GaussianWeights`.
    guide : pyro guide, optional
        The guide of a bare ``BayesianLastLayer``.
    phi, mask, labels : torch.Tensor, optional
        Bare heads: features (B, C|1, D) (or a :class:`~bayes_polar.data.features.Features`),
        choice mask (B, C) and labels (B,).
    task, split, limit : optional
        Runs: the questions of the predictive and log-likelihood (default: the training task's
        evaluation split; ``split="train"`` gives the data the posterior was fitted on).
    features : None, int or list
        Features of W kept in the posterior group: all, the top-k by |mean|, or names/indices.
    num_draws, chains : int
        Posterior draws per chain and chains (``chains × num_draws`` iid draws in all; two chains
        make ``az.summary``'s r_hat and ESS meaningful: ≈ 1 and ≈ the number of draws).
    run_dir : path, optional
        Pipelines: where ``metrics.json`` is read (ELBO trace, adapter diagnostics) and where
        ``save=True`` writes. A RUN_DIR source sets it.
    save : bool or path
        Nothing is written by default. ``True``: write ``posterior_<task>_<split>.nc`` into the run
        directory; a path: write the NetCDF there.

    Returns
    -------
    arviz.InferenceData
    """
    from ..run import Pipeline

    if isinstance(source, (str, Path)):
        from ..run import load_run

        run_dir, source = Path(source), load_run(source, data_dir)
    if isinstance(source, Pipeline):
        return _from_pipeline(source, run_dir, task, split, limit, data_dir, features, num_draws, chains, save,
                              seed, progress)
    posterior, phi, mask = _bare_posterior(source, guide, phi, mask)
    draws = split_chains(guide_draws(posterior, phi, mask, chains * num_draws, seed), chains)
    weights = draws.pop(WEIGHT_SITE)
    idata = from_weight_draws(weights, phi, mask, labels, extra=draws, class_names=class_names,
                              feature_names=feature_names, features=features, seed=seed,
                              attrs={"posterior": type(getattr(posterior, "guide", posterior)).__name__,
                                     "num_draws": num_draws, "chains": chains})
    if save is True:
        raise ConfigError("save=True writes into a run directory; for a bare head pass save=PATH")
    if save:
        save_inference_data(idata, save)
    return idata


def _bare_posterior(source, guide, phi, mask):
    from ..data.features import Features
    from ..bll.model import BayesianLastLayer
    from ..training.trainable_heads import VariationalHead

    if isinstance(phi, Features):
        phi, mask = phi.phi, phi.mask
    if isinstance(source, VariationalHead):
        return source, phi, mask
    if isinstance(source, GaussianWeights):
        return source, phi, mask
    if isinstance(source, BayesianLastLayer):
        if guide is None:
            raise ConfigError("to_inference_data(head, guide, phi, ...) needs the head's guide")
        return guide, phi, mask
    raise ConfigError(f"to_inference_data takes a RUN_DIR, a Pipeline, a VariationalHead, a BayesianLastLayer "
                      f"(with its guide) or GaussianWeights, got {type(source).__name__}")


def _from_pipeline(pipe, run_dir, task, split, limit, data_dir, features, num_draws, chains, save, seed, progress):
    from ..training.trainable_heads import VariationalHead
    from ..run import default_split, split_features

    if not isinstance(pipe.method.head, VariationalHead):
        raise ConfigError(f"The run's method {pipe.config.method!r} has a point-estimate head, no posterior: "
                          "inspect a variational method (polar-vbll, polar-vbll-la, lora-vbll)")
    task = task or pipe.config.task
    split = split or default_split(task)
    data, labels, encoded = split_features(pipe, task, split, data_dir, limit, progress)
    posterior = pipe.method.laplace if pipe.method.laplace is not None else pipe.method.head
    draws = split_chains(guide_draws(posterior, data.phi, data.mask, chains * num_draws, seed), chains)
    weights = draws.pop(WEIGHT_SITE)
    config = pipe.config
    letters = config.format == "letters"
    classes = list(pipe.train.task.answer_words) if letters else ["shared"]
    metrics = _read_metrics(run_dir)
    idata = from_weight_draws(
        weights, data.phi, data.mask, labels, extra=draws,
        class_names=classes, feature_names=feature_names(weights.shape[-1], config.loglik_features and not letters),
        choice_names=classes if letters else None,
        question_names=_question_names([e.uid for e in encoded.task.examples], len(labels)),
        features=features, sample_stats=_training_stats(metrics), seed=seed,
        attrs={"method": config.method, "task": task, "split": split, "train_task": config.task,
               "format": config.format, "prior": config.prior, "guide": config.guide, "elbo": config.elbo,
               "posterior": "laplace" if pipe.method.laplace is not None else "guide", "num_draws": num_draws,
               "chains": chains,
               "model": config.model, "config": config.to_dict()})
    if save is True and run_dir is None:
        raise ConfigError("save=True needs the run directory: pass run_dir= (or a RUN_DIR source), or save=PATH")
    if save:
        save_inference_data(idata, Path(run_dir) / f"posterior_{task}_{split}.nc" if save is True else save)
    return idata


def _read_metrics(run_dir) -> dict:
    path = None if run_dir is None else Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path is not None and path.exists() else {}


def _training_stats(metrics: dict) -> dict:
    stats = {}
    for key in ("elbo_trace", "nll_trace"):
        if metrics.get(key):
            stats[key.removesuffix("_trace")] = ([math.nan if v is None else v for v in metrics[key]], ("step",))
    adapters = metrics.get("adapters") or {}
    for name in ("stable_rank", "orthogonality_error_X", "orthogonality_error_Y"):
        if adapters and any(name in entry for entry in adapters.values()):
            stats[name] = ({layer: entry.get(name, math.nan) for layer, entry in adapters.items()}, ("layer",))
    return stats


# ----------------------------------------------------------------------------- files, summaries, plots
def save_inference_data(idata, path) -> Path:
    """Write ``idata`` as NetCDF (h5netcdf engine); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    idata.to_netcdf(str(path), engine="h5netcdf")
    return path


def load_inference_data(path):
    """Read an InferenceData written by :func:`save_inference_data` (or ``to_inference_data``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such file: {path}; write it with bayes_polar.evaluation.inspection.to_inference_data(RUN_DIR)")
    return _az().from_netcdf(str(path), engine="h5netcdf")


def summary(idata, var_names=("W",), **kwargs):
    """``az.summary`` of the posterior; r_hat and ESS only with several chains (VI draws are iid)."""
    chains = idata.posterior.sizes["chain"]
    kwargs.setdefault("kind", "all" if chains > 1 else "stats")
    return _az().summary(idata, var_names=list(var_names), **kwargs)


def plot_forest(idatas: dict, path=None, var_names=("W",), coords=None, title: str | None = None, ax=None):
    """Forest plot (94% HDI) of one or more posteriors ``{name: idata}`` on one axis; PNG at ``path``.

    Drawn on a pyplot-free Agg figure unless ``ax`` is given, so it is safe headless.
    """
    from .metrics import _figure, _save

    names = list(idatas)
    first = idatas[names[0]].posterior
    rows = sum(first[v].sel(coords or {}).isel(chain=0, draw=0).size for v in var_names)
    fig = _figure((6, 1.5 + 0.25 * rows * len(names))) if ax is None else ax.figure
    ax = ax if ax is not None else fig.add_subplot()
    _az().plot_forest(list(idatas.values()), model_names=names, var_names=list(var_names), coords=coords,
                      combined=True, ax=ax)
    if title:
        ax.set_title(title)
    return _save(fig, path) if path is not None else fig

