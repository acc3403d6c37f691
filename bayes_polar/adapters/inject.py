"""inject_polar: match linear layers by name and transformer block, wrap them, freeze the rest.

Matching follows peft (``tuners_utils.check_target_module_exists``): a ``str`` is a regex that
must match the whole module name; a list matches a name exactly or as a ``.name`` suffix;
``exclude_modules`` is checked first. Block selection is by index into the decoder's block list
(found through ``model.get_decoder()``), so it works for any model whose decoder keeps its blocks
in one ``nn.ModuleList``. Unlike peft's ``layers_to_transform``, ``layers`` also restricts regex
targets. ``target_modules=None`` takes the family's default (:mod:`~bayes_polar.adapters.architectures`:
``q_proj``, ``v_proj`` for Llama, ``qkv_proj`` for Phi-3, ``query_key_value`` for GPT-NeoX, ...).
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Iterable

from torch import nn

from ..errors import ConfigError, NoTargetModulesError, UnsupportedArchitectureError, UnsupportedModuleError
from .architectures import resolve_target_modules, supported_families
from .config import PolarConfig
from .blob import BayesPolarLinear
from .layer import PolarLinear
from .modules import is_adapter_layer, polar_layers, unwrap

BLOCK_LIST_NAMES = ("layers", "h", "blocks", "layer")  # Llama/Mistral/Qwen/Gemma/Phi-3/GPT-NeoX, GPT-2, others


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def is_target(name: str, target_modules, exclude_modules=None) -> bool:
    """Whether module ``name`` is a target (peft semantics; excludes win)."""
    if exclude_modules and _matches(name, exclude_modules):
        return False
    return _matches(name, target_modules)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, blocks)`` of the transformer blocks of a causal LM.

    The decoder is ``model.get_decoder()`` (transformers' generic accessor); the blocks are its
    ``nn.ModuleList`` child (``layers``, ``h``, ... when it has several): ``model.layers`` for Llama,
    Mistral, Qwen2, Gemma 2/3 and Phi-3, ``gpt_neox.layers`` for GPT-NeoX.

    Raises
    ------
    UnsupportedArchitectureError
        No such child; the message lists the supported families.
    """
    model = unwrap(model)
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if callable(getter) else model
    lists = {n: m for n, m in decoder.named_children() if isinstance(m, nn.ModuleList)}
    preferred = [n for n in BLOCK_LIST_NAMES if n in lists]
    if len(lists) != 1 and not preferred:
        found = sorted(lists) or "none"
        raise UnsupportedArchitectureError(
            f"Cannot tell the transformer blocks of {type(decoder).__name__} (model type "
            f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}): nn.ModuleList children {found}. "
            f"Supported families: {supported_families()}. For another model, pass layers=None and select blocks "
            "with a target_modules regex (no prefix cache)"
        )
    blocks = lists[preferred[0]] if preferred else next(iter(lists.values()))
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(blocks)], blocks


def resolve_layers(layers: Iterable[int], num_blocks: int) -> list[int]:
    """Sorted non-negative block indices; negative ones count from the end (-1 is the last block)."""
    resolved = set()
    for i in layers:
        if not -num_blocks <= i < num_blocks:
            raise ConfigError(
                f"Expected layer indices in [{-num_blocks}, {num_blocks - 1}] for a model with "
                f"{num_blocks} blocks but got {i}"
            )
        resolved.add(i % num_blocks)
    return sorted(resolved)


def block_prefixes(model: nn.Module, layers) -> tuple[str, ...] | None:
    """Name prefixes (``model.layers.28.``) of the selected blocks, or None for all blocks."""
    if layers is None:
        return None
    blocks_name, blocks = find_blocks(model)
    head = f"{blocks_name}." if blocks_name else ""
    return tuple(f"{head}{i}." for i in resolve_layers(layers, len(blocks)))


def find_target_modules(model: nn.Module, target_modules=None, layers=None, exclude_modules=None) -> list[str]:
    """Names of the ``nn.Linear`` layers to adapt (relative to :func:`unwrap` (model)).

    ``target_modules=None`` (or ``"auto"``) is the family's default
    (:func:`~bayes_polar.adapters.architectures.default_target_modules`).

    Raises
    ------
    UnsupportedArchitectureError
        Default targets asked of a model type with none (the message lists the supported families).
    NoTargetModulesError
        Nothing matched; the message echoes ``target_modules`` and lists the linear layer names.
    UnsupportedModuleError
        A match that is not an ``nn.Linear`` or already carries an adapter.
    """
    model = unwrap(model)
    target_modules = resolve_target_modules(model, target_modules)
    prefixes = block_prefixes(model, layers)
    names, inside = [], ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue  # never adapt the internals of an adapter layer
        if is_adapter_layer(module):
            inside = (*inside, name + ".")
        if is_target(name, target_modules, exclude_modules) and (prefixes is None or name.startswith(prefixes)):
            _check_replaceable(name, module)
            names.append(name)
    if not names:
        raise NoTargetModulesError(_no_match_message(model, target_modules, layers, exclude_modules))
    return names


def _check_replaceable(name: str, module: nn.Module) -> None:
    if is_adapter_layer(module):
        raise UnsupportedModuleError(f"{name} already carries an adapter ({type(module).__name__}); inject once")
    if not isinstance(module, nn.Linear):
        raise UnsupportedModuleError(f"{name} matched target_modules but is a {type(module).__name__}, not nn.Linear")


def _no_match_message(model, target_modules, layers, exclude_modules) -> str:
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    where = f" in blocks {list(layers)}" if layers is not None else ""
    return (
        f"No module matched target_modules={target_modules!r}{where} (exclude_modules={exclude_modules!r}); "
        f"linear layers of this model end in: {', '.join(linear[:12]) or 'none'}"
    )


def inject_polar(model: nn.Module, target_modules=None, rank: int = 8, alpha: float = 16.0,
                 layers=None, exclude_modules=None, *, config: PolarConfig | None = None,
                 bayesian: bool = False) -> nn.Module:
    r"""Wrap the target linear layers of ``model`` in :class:`PolarLinear`, in place; freeze the rest.

    Each target computes :math:`h = W_0 x + (\alpha / r)\, X \Theta Y^\top x` with :math:`\Theta = 0`
    at init, so the model's outputs do not change. Only the adapter parameters (``polar_X``, ``polar_Y``,
    ``polar_theta``; ``polar_theta_rho`` too when ``bayesian``) stay trainable (other adapters of a peft-wrapped model are frozen too).

    Parameters
    ----------
    model : a transformers causal LM, or a peft ``PeftModel`` around one.
    target_modules : regex (str, full match) or names (exact or ``.name`` suffix); None: the family's
        default (``q_proj``, ``v_proj``; ``qkv_proj`` for Phi-3, ``query_key_value`` for GPT-NeoX).
    rank, alpha : :math:`r` and :math:`\alpha`; ``0 < r <= min(in, out)`` per layer.
    layers : block indices (negative counts from the end), None for all blocks.
    exclude_modules : like ``target_modules``, checked first.
    config : a :class:`PolarConfig` instead of the five settings above.
    bayesian : wrap in :class:`~bayes_polar.adapters.blob.BayesPolarLinear` (a Gaussian posterior on Θ, BLoB).

    Returns
    -------
    The same ``model``; its (unwrapped) transformers model gains ``polar_config`` (with the resolved
    ``target_modules``) and ``polar_targets`` (the adapted module names, in model order).

    Usage::

        inject_polar(model, rank=8, layers=[-4, -3, -2, -1])
        optimizer = make_adapter_optimizer(model, "riemannian_adam", lr=1e-3)
    """
    config = _config_from(config, target_modules, rank, alpha, layers, exclude_modules)
    base = unwrap(model)
    if getattr(base, "polar_config", None) is not None:
        raise ConfigError(f"model already carries PoLAR adapters on {base.polar_targets}; inject once with all targets")
    config = replace(config, target_modules=resolve_target_modules(base, config.target_modules))
    names = find_target_modules(base, config.target_modules, config.layers, config.exclude_modules)
    layer_cls = BayesPolarLinear if bayesian else PolarLinear
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name)
        setattr(parent, child, layer_cls(getattr(parent, child), config.r, config.alpha))
    mark_only_polar_trainable(base)
    base.polar_config, base.polar_targets = config, names
    return model


def _config_from(config, target_modules, rank, alpha, layers, exclude_modules) -> PolarConfig:
    settings = dict(target_modules=target_modules, r=rank, alpha=alpha, layers=layers, exclude_modules=exclude_modules)
    if config is None:
        return PolarConfig(**settings)
    defaults = dict(target_modules=None, r=8, alpha=16.0, layers=None, exclude_modules=None)
    changed = sorted(k for k, v in settings.items() if v != defaults[k])
    if changed:
        raise ConfigError(f"Pass either config or settings, not both; got config and {changed}")
    return config


def mark_only_polar_trainable(model: nn.Module) -> None:
    """``requires_grad`` is True for ``polar_X``, ``polar_Y``, ``polar_theta`` and False for all else."""
    model.requires_grad_(False)
    for _, layer in polar_layers(model):
        for parameter in layer.adapter_parameters().values():
            parameter.requires_grad_(True)
