"""Priors and guides by name (``PRIORS``, ``GUIDES``) or by a file a user writes.

A prior file defines one public class ``<Name>Prior`` subclassing ``bayes_polar.bll.model.Prior``;
a guide file defines one public builder ``<Name>Guide`` (a class or function
``model -> guide``). ``load_prior("isotropic", variance=2.0)`` and
``load_prior("my_priors/laplace.py", scale=0.1)`` work the same way.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import traceback
from functools import partial
from pathlib import Path

from pyro import poutine
from pyro.infer.autoguide import AutoGuideList, AutoNormal

from ..errors import ConfigError, MissingFileError, UserModuleError
from .model import Prior
from .posterior import WEIGHT_SITE
from .guide import DEFAULT_INIT_SCALE


def is_code_path(name) -> bool:
    """Whether a prior or guide name is a file of Python code (``.py`` or a path), not a registered name."""
    return isinstance(name, str) and (name.endswith(".py") or "/" in name)


def _load_module(path: str):
    """Import a user's ``.py`` file; any failure names the file, the line and the error."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise MissingFileError(f"No such file: {path}")
    name = "bayes_polar_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - user code: report any failure, located
        raise UserModuleError(f"{path}{_user_line(exc, path)} fails to import: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from exc
    return module


def _user_line(exc: BaseException, path: Path) -> str:
    """``:line N`` of the innermost frame in ``path`` (or of a SyntaxError in it), else ''."""
    if isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename).resolve() == path:
        return f":line {exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path]
    return f":line {frames[-1].lineno}" if frames else ""


def _first_line(exc: BaseException) -> str:
    text = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
    return text.strip().splitlines()[0] if text.strip() else repr(exc)


def _build(kind: str, name, builder, kwargs: dict):
    """``builder(**kwargs)``, with a constructor's rejection of its arguments made a ConfigError."""
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as exc:
        label = getattr(builder, "__name__", repr(builder))
        raise ConfigError(f"{kind} {name!r} ({label}) rejects the arguments {kwargs}: {_first_line(exc)}") from exc


def _single_public(module, suffix: str, accept, what: str) -> object:
    """The one public object named ``*<suffix>`` defined in ``module`` that ``accept`` likes."""
    found = [obj for name, obj in vars(module).items()
             if name.endswith(suffix) and not name.startswith("_") and accept(obj)
             and getattr(obj, "__module__", module.__name__) == module.__name__]
    if len(found) != 1:
        names = [getattr(o, "__name__", repr(o)) for o in found]
        raise ConfigError(f"{module.__file__} must define exactly one public {suffix}: {what} whose name ends "
                          f"in '{suffix}'; found {names or 'none'}")
    return found[0]


def load_prior(name_or_path: str | Prior = "isotropic", **kwargs) -> Prior:
    """A :class:`Prior` from a registered name, a ``.py`` file, or an instance (returned as is)."""
    if isinstance(name_or_path, Prior):
        return name_or_path
    if is_code_path(name_or_path):
        module = _load_module(name_or_path)
        builder = _single_public(module, "Prior", lambda o: inspect.isclass(o) and issubclass(o, Prior),
                                 "a subclass of bayes_polar.bll.model.Prior")
    else:
        from ..models import PRIORS

        if name_or_path not in PRIORS:
            raise ConfigError(f"Unknown prior {name_or_path!r}; expected one of {sorted(PRIORS)} or a .py file")
        builder = PRIORS[name_or_path]
    prior = _build("prior", name_or_path, builder, kwargs)
    if not isinstance(prior, Prior):
        raise ConfigError(f"{name_or_path!r} built a {type(prior).__name__}, not a bayes_polar.bll.model.Prior")
    return prior


def load_guide(name_or_path="full", **kwargs):
    """A guide builder ``model -> guide`` from a registered name, a ``.py`` file, or a callable."""
    if callable(name_or_path):
        builder = name_or_path
    elif is_code_path(name_or_path):
        module = _load_module(name_or_path)
        builder = _single_public(module, "Guide", callable, "a class or function model -> guide")
    else:
        from ..guides import GUIDES

        if name_or_path not in GUIDES:
            raise ConfigError(f"Unknown guide {name_or_path!r}; expected one of {sorted(GUIDES)} or a .py file")
        builder = GUIDES[name_or_path]
    return partial(builder, **kwargs) if kwargs else builder


def _covers_only_weights(builder) -> bool:
    from .guide import WeightGuide

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
        return _build_guide(guide, builder, model)
    combined = AutoGuideList(model)
    combined.append(_build_guide(guide, builder, poutine.block(model, expose=[WEIGHT_SITE])))
    combined.append(AutoNormal(poutine.block(model, hide=[WEIGHT_SITE]), init_scale=DEFAULT_INIT_SCALE))
    return combined


def _build_guide(name, builder, model):
    """``builder(model)``; a builder that rejects its arguments (e.g. ``--guide-args``) is a ConfigError."""
    target = builder.func if isinstance(builder, partial) else builder
    kwargs = builder.keywords if isinstance(builder, partial) else {}
    label = getattr(target, "__name__", repr(target))
    label = f"{name!r} ({label})" if isinstance(name, str) else label
    try:
        return builder(model)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"guide {label} rejects the arguments {kwargs}: {_first_line(exc)}") from exc
