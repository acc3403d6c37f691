"""Priors and guides by name (``PRIORS``, ``GUIDES``) or by a file a user writes.

A prior file defines one public class ``<Name>Prior`` subclassing ``bayes_polar.head.Prior``;
a guide file defines one public builder ``<Name>Guide`` (a class or function
``model -> guide``). ``load_prior("isotropic", variance=2.0)`` and
``load_prior("my_priors/laplace.py", scale=0.1)`` work the same way.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
from functools import partial
from pathlib import Path

from pyro import poutine
from pyro.infer.autoguide import AutoGuideList, AutoNormal

from .errors import ConfigError
from .head import Prior
from .posterior import WEIGHT_SITE
from .weight_guide import DEFAULT_INIT_SCALE


def _is_path(name: str) -> bool:
    return name.endswith(".py") or "/" in name


def _load_module(path: str):
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"No such file: {path}")
    name = "bayes_polar_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _single_public(module, suffix: str, accept) -> object:
    """The one public object named ``*<suffix>`` defined in ``module`` that ``accept`` likes."""
    found = [obj for name, obj in vars(module).items()
             if name.endswith(suffix) and not name.startswith("_") and accept(obj)
             and getattr(obj, "__module__", module.__name__) == module.__name__]
    if len(found) != 1:
        names = [getattr(o, "__name__", repr(o)) for o in found]
        raise ConfigError(f"{module.__file__} must define exactly one public {suffix} (a name ending in "
                          f"'{suffix}'); found {names or 'none'}")
    return found[0]


def load_prior(name_or_path: str | Prior = "isotropic", **kwargs) -> Prior:
    """A :class:`Prior` from a registered name, a ``.py`` file, or an instance (returned as is)."""
    if isinstance(name_or_path, Prior):
        return name_or_path
    if _is_path(name_or_path):
        module = _load_module(name_or_path)
        builder = _single_public(module, "Prior", lambda o: inspect.isclass(o) and issubclass(o, Prior))
    else:
        from .models import PRIORS

        if name_or_path not in PRIORS:
            raise ConfigError(f"Unknown prior {name_or_path!r}; expected one of {sorted(PRIORS)} or a .py file")
        builder = PRIORS[name_or_path]
    prior = builder(**kwargs)
    if not isinstance(prior, Prior):
        raise ConfigError(f"{name_or_path!r} built a {type(prior).__name__}, not a bayes_polar.head.Prior")
    return prior


def load_guide(name_or_path="full", **kwargs):
    """A guide builder ``model -> guide`` from a registered name, a ``.py`` file, or a callable."""
    if callable(name_or_path):
        builder = name_or_path
    elif _is_path(name_or_path):
        module = _load_module(name_or_path)
        builder = _single_public(module, "Guide", callable)
    else:
        from .guides import GUIDES

        if name_or_path not in GUIDES:
            raise ConfigError(f"Unknown guide {name_or_path!r}; expected one of {sorted(GUIDES)} or a .py file")
        builder = GUIDES[name_or_path]
    return partial(builder, **kwargs) if kwargs else builder


def _covers_only_weights(builder) -> bool:
    from .weight_guide import WeightGuide

    target = builder.func if isinstance(builder, partial) else builder
    return inspect.isclass(target) and issubclass(target, WeightGuide)


def make_guide(guide, model):
    """Build the guide for ``model`` (a BayesianLastLayer).

    Guides of ``guides/`` cover ``head.W`` only; when the prior has latent hyperparameters
    they are joined by an ``AutoNormal`` over those sites in an ``AutoGuideList``. Pyro
    autoguides and user builders receive the whole model.
    """
    builder = load_guide(guide)
    hyper = model.prior.hyper_sites(model.in_features, model.num_rows)
    if not hyper or not _covers_only_weights(builder):
        return builder(model)
    combined = AutoGuideList(model)
    combined.append(builder(poutine.block(model, expose=[WEIGHT_SITE])))
    combined.append(AutoNormal(poutine.block(model, hide=[WEIGHT_SITE]), init_scale=DEFAULT_INIT_SCALE))
    return combined
