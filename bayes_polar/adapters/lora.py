r"""LoRA baseline from peft, on exactly the modules that :func:`inject_polar` would adapt.

.. math:: h = W_0 x + (\alpha / r)\, B A x,\qquad B \in \mathbb{R}^{out \times r} (0 at init),\;
          A \in \mathbb{R}^{r \times in}

peft's ``inject_adapter_in_model`` works in place, so the model keeps its class (``LlamaForCausalLM``,
``GPTNeoXForCausalLM``, ...; ``get_decoder``, ``generate`` and our feature extractors keep working)
instead of becoming a ``PeftModel``.
"""
from __future__ import annotations

from torch import nn

from ..errors import BayesPolarError, ConfigError
from .config import check_alpha, check_layers, check_names, check_rank
from .inject import find_blocks, find_target_modules, resolve_layers
from .modules import lora_layers, unwrap

LORA_SETTINGS = ("r", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform", "layers_pattern")


def inject_lora(model: nn.Module, target_modules=None, rank: int = 8, alpha: float = 16.0,
                layers=None, dropout: float = 0.0, exclude_modules=None, bayesian: bool = False) -> nn.Module:
    """Add peft LoRA adapters, in place, to the modules :func:`inject_polar` would adapt; freeze the rest.

    Targets are resolved by the same matcher as :func:`inject_polar` (same ``target_modules``,
    ``layers``, ``exclude_modules`` semantics) and handed to peft as exact module names, so both
    adapters wrap the same layers; peft's own ``layers_to_transform`` check is skipped for regex
    targets, which is why it is recorded in the ``LoraConfig`` (with ``layers_pattern``) but not
    relied on. ``target_modules=None`` takes the family's default
    (:func:`~bayes_polar.adapters.architectures.default_target_modules`). The model gains ``lora_targets`` (names) and peft's ``peft_config``. ``bayesian``: each
    layer is a :func:`~bayes_polar.adapters.blob.lora_linear_class` (BLoB: a Gaussian posterior on A), through
    peft's custom-module dispatch.

    Usage::

        inject_lora(model, rank=8, layers=[-4, -3, -2, -1])
        optimizer = make_adapter_optimizer(model, "riemannian_adam", lr=1e-3)  # plain Adam for A, B
    """
    rank, alpha = check_rank(rank), check_alpha(alpha)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"Expected 0 <= dropout < 1 but got {dropout!r}")
    target_modules = check_names(target_modules, "target_modules", allow_none=True)
    layers = check_layers(layers)
    exclude_modules = check_names(exclude_modules, "exclude_modules", allow_none=True)
    base = unwrap(model)
    names = find_target_modules(base, target_modules, layers, exclude_modules)
    settings = dict(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    if layers is not None:
        blocks_name, blocks = find_blocks(base)
        settings.update(layers_to_transform=resolve_layers(layers, len(blocks)),
                        layers_pattern=blocks_name.rpartition(".")[2])
    inject_lora_settings(base, settings, bayesian=bayesian)
    return model


def inject_lora_settings(model: nn.Module, settings: dict, bayesian: bool = False) -> list[str]:
    """Inject peft LoRA from :data:`LORA_SETTINGS` values (as saved by :func:`lora_settings`)."""
    from peft import LoraConfig, inject_adapter_in_model

    base = unwrap(model)
    names = list(settings["target_modules"])
    config = LoraConfig(**settings)
    if bayesian:
        from .blob import lora_linear_class

        config._register_custom_module({nn.Linear: lora_linear_class()})
    inject_adapter_in_model(config, base)
    found = [name for name, _ in lora_layers(base)]
    if sorted(found) != sorted(names):
        raise BayesPolarError(f"peft adapted {found}, expected {names}")
    base.lora_targets = names
    return names


def lora_settings(model: nn.Module) -> dict:
    """The :data:`LORA_SETTINGS` of the model's default peft LoRA config, JSON-ready."""
    config = unwrap(model).peft_config["default"]
    settings = {key: getattr(config, key) for key in LORA_SETTINGS}
    settings["target_modules"] = sorted(settings["target_modules"])
    return settings
